"""Normalization in worker processes gives exactly what the main process would."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from conftest import Harness, person, write_csv

from connector.engine import Engine, SyncOptions
from connector.identifiers.normalize import normalize_many
from connector.identifiers.pool import NormalizePool

COLUMNS = [
    ("email", [f"User.{i}+x@GMail.com" if i % 7 else "not an email" for i in range(300)]),
    ("phone", [f"(415) 555-{i:04d}" if i % 5 else None for i in range(300)]),
    ("first_name", ["Mary", "Dr. José", "", None] * 75),
]


def test_workers_return_what_the_main_process_computes() -> None:
    pool = NormalizePool(2, min_rows=1)
    try:
        waits = [pool.submit(platform, "US", COLUMNS) for platform in ("meta", "google")]
        # both went to a worker (one each), the third finds none idle and runs in place
        third = pool.submit("meta", "US", COLUMNS[:1])
        assert pool.batches_in_workers == 2 and len(pool.worker_pids()) == 2
        assert [w() for w in waits] == [normalize_many(p, "US", COLUMNS) for p in ("meta", "google")]
        assert third() == normalize_many("meta", "US", COLUMNS[:1])
        payloads, reasons = waits[0]()  # waiting again gives the same answer
        assert payloads[0] is not None and '"EMAIL"' not in payloads[0] and reasons["email_invalid"] == 43
    finally:
        pool.close()


def test_small_batches_stay_in_process() -> None:
    pool = NormalizePool(2, min_rows=1000)
    assert pool.submit("meta", "US", COLUMNS)() == normalize_many("meta", "US", COLUMNS)
    assert pool.batches_in_workers == 0 and pool.worker_pids() == []


def test_a_killed_worker_costs_no_rows() -> None:
    pool = NormalizePool(1, min_rows=1)
    try:
        wait = pool.submit("google", "US", COLUMNS)
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        assert wait() == normalize_many("google", "US", COLUMNS)
        # the pool gave up on workers: later batches run in place
        assert pool.submit("meta", "US", COLUMNS)() == normalize_many("meta", "US", COLUMNS)
        assert pool.batches_in_workers == 1 and pool.worker_pids() == []
    finally:
        pool.close()


def test_a_killed_worker_costs_no_rows_of_the_batch_another_worker_holds() -> None:
    pool = NormalizePool(2, min_rows=1)
    try:
        waits = [pool.submit(platform, "US", COLUMNS) for platform in ("meta", "google")]
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        # the pool gives up on workers when it finds the first one dead: the second one's batch too is
        # then redone in place
        assert [w() for w in waits] == [normalize_many(p, "US", COLUMNS) for p in ("meta", "google")]
        assert pool.worker_pids() == []
    finally:
        pool.close()


def test_ctrl_c_in_the_terminal_leaves_the_workers_to_their_parent() -> None:
    pool = NormalizePool(1, min_rows=1)
    try:
        pool.submit("meta", "US", COLUMNS)()  # the worker is up (and ignores SIGINT by now)
        wait = pool.submit("meta", "US", COLUMNS)
        os.kill(pool.worker_pids()[0], signal.SIGINT)
        assert wait() == normalize_many("meta", "US", COLUMNS)
        assert len(pool.worker_pids()) == 1 and pool.batches_in_workers == 2  # not given up on
    finally:
        pool.close()


def test_a_sync_in_workers_plans_and_sends_like_one_without(tmp_path: Path) -> None:
    rows = [person(i) for i in range(40)]
    rows += [person(3, email="again@example.com")]  # duplicate key: the first row wins
    rows += [person(50, email="bad", phone="", first_name="")]  # no identifier left
    rows += [person(51, consent="denied")]  # Google: consent denied
    outcomes = []
    for workers in (0, 2):
        (tmp_path / f"w{workers}").mkdir()
        h = Harness(tmp_path / f"w{workers}")
        pool = NormalizePool(workers, min_rows=1)
        for source in (rows, [*rows[5:], person(60)]):
            write_csv(h.csv, source)
            with Engine(h.settings, destination_factory=h.factory, normalize_pool=pool, batch_rows=7) as engine:
                results = {r.destination: r.as_dict() for r in engine.sync(None, SyncOptions(force=True))}
                assert pool.worker_pids() == []  # stopped when the sync ended
        assert (pool.batches_in_workers > 0) == (workers > 0)
        outcomes.append(({d: {k: v for k, v in r.items() if k not in ("seconds", "run_id", "audience_id")}
                          for d, r in results.items()},
                         h.audience("meta"), h.audience("google")))  # fmt: skip
    assert outcomes[0] == outcomes[1]
    results, meta, _ = outcomes[1]
    # C0-C4 left; C3's first row is now the duplicate, so its identifiers changed; C60 is new
    m = results["meta"]
    assert (m["left_segment"], m["identifier_changes"], m["new_members"], len(meta)) == (4, 1, 1, 39)
