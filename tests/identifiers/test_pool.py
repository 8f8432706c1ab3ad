"""Normalization in worker processes gives exactly what the main process would."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from conftest import Harness, person, write_csv

from connector.engine import Engine, SyncOptions
from connector.identifiers.normalize import NormalizedBatch, normalize_for, normalize_many
from connector.identifiers.pool import Columns, NormalizePool

COLUMNS = [
    ("email", [f"User.{i}+x@GMail.com" if i % 7 else "not an email" for i in range(300)]),
    ("phone", [f"(415) 555-{i:04d}" if i % 5 else None for i in range(300)]),
    ("first_name", ["Mary", "Dr. José", "", None] * 75),
]


def test_workers_return_what_the_main_process_computes() -> None:
    pool = NormalizePool(2, min_rows=200)  # 300 rows: too few to split
    try:
        waits = [pool.submit([(platform, "US")], COLUMNS) for platform in ("meta", "google")]
        # both went to a worker (one each), the third finds none idle and runs in place
        third = pool.submit([("meta", "US")], COLUMNS[:1])
        assert pool.batches_in_workers == 2 and len(pool.worker_pids()) == 2
        assert [w() for w in waits] == [[normalize_many(p, "US", COLUMNS)] for p in ("meta", "google")]
        assert third() == [normalize_many("meta", "US", COLUMNS[:1])]
        [(payloads, reasons)] = waits[0]()  # waiting again gives the same answer
        assert payloads[0] is not None and '"EMAIL"' not in payloads[0] and reasons["email_invalid"] == 43
    finally:
        pool.close()


def test_a_large_batch_is_split_between_the_workers_for_every_platform_at_once() -> None:
    specs = [("meta", "US"), ("google", "US")]
    email_phone = COLUMNS[:2]  # cleaned once for both platforms
    pool = NormalizePool(2, min_rows=100)
    try:
        for columns in (COLUMNS, email_phone):
            before = pool.batches_in_workers
            wait = pool.submit(specs, columns)
            assert pool.batches_in_workers == before + 2  # 150 rows each
            assert wait() == normalize_for(specs, columns) == [normalize_many(p, r, columns) for p, r in specs]
            assert wait() is wait()  # joined once
    finally:
        pool.close()


def test_small_batches_stay_in_process() -> None:
    pool = NormalizePool(2, min_rows=1000)
    assert pool.submit([("meta", "US")], COLUMNS)() == [normalize_many("meta", "US", COLUMNS)]
    assert pool.batches_in_workers == 0 and pool.worker_pids() == []


def test_a_killed_worker_costs_no_rows() -> None:
    pool = NormalizePool(1, min_rows=1)
    try:
        wait = pool.submit([("google", "US")], COLUMNS)
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        assert wait() == [normalize_many("google", "US", COLUMNS)]
        # the pool gave up on workers: later batches run in place
        assert pool.submit([("meta", "US")], COLUMNS)() == [normalize_many("meta", "US", COLUMNS)]
        assert pool.batches_in_workers == 1 and pool.worker_pids() == []
    finally:
        pool.close()


def test_a_killed_worker_costs_no_rows_of_the_batch_another_worker_holds() -> None:
    pool = NormalizePool(2, min_rows=200)
    try:
        waits = [pool.submit([(platform, "US")], COLUMNS) for platform in ("meta", "google")]
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        # the pool gives up on workers when it finds the first one dead: the second one's batch too is
        # then redone in place
        assert [w() for w in waits] == [[normalize_many(p, "US", COLUMNS)] for p in ("meta", "google")]
        assert pool.worker_pids() == []
    finally:
        pool.close()


def test_ctrl_c_in_the_terminal_leaves_the_workers_to_their_parent() -> None:
    pool = NormalizePool(1, min_rows=1)
    try:
        pool.submit([("meta", "US")], COLUMNS)()  # the worker is up (and ignores SIGINT by now)
        wait = pool.submit([("meta", "US")], COLUMNS)
        os.kill(pool.worker_pids()[0], signal.SIGINT)
        assert wait() == [normalize_many("meta", "US", COLUMNS)]
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


class _Recording(NormalizePool):
    """A pool that notes what each batch was sent to normalization for."""

    def __init__(self, workers: int, min_rows: int) -> None:
        super().__init__(workers, min_rows)
        self.sent: list[tuple[list[str], int]] = []

    def submit(self, specs: Sequence[tuple[str, str]], columns: Columns) -> Callable[[], list[NormalizedBatch]]:
        self.sent.append(([p for p, _ in specs], len(columns[0][1])))
        return super().submit(specs, columns)


def test_a_segments_destinations_share_one_normalization_of_each_batch(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    write_csv(h.csv, [person(i) for i in range(14)] + [person(14, consent="denied")])
    pool = _Recording(2, min_rows=1)
    with Engine(h.settings, destination_factory=h.factory, normalize_pool=pool, batch_rows=7) as engine:
        results = {r.destination: r for r in engine.sync(None, SyncOptions(force=True))}
    # batches of 7, 7 and 1 rows; the last one's member denied Google consent, so its pairs want other rows
    assert pool.sent == [(["meta", "google"], 7), (["meta", "google"], 7), (["meta"], 1), (["google"], 0)]
    assert (results["meta"].counts.adds, results["google"].counts.adds) == (15, 14)
    assert (len(h.audience("meta")), len(h.audience("google"))) == (15, 14)
