"""Pipeline benchmark: read, normalize, hash, diff and commit N members, cold then warm.

    python benchmarks/pipeline.py --members 1000000

Generates N members (seeded; messy emails and phones in mixed formats) as a CSV, syncs them
through the real engine and ledger (SQLite) into two acknowledging destinations (one Meta, one
Google: both platforms' normalization and hashes), then changes 1% of the members and syncs again.
The baseline runs the facebook-business SDK's own per-row normalize-and-hash path
(`CustomAudience.format_params`, email + phone) on a sample of the same rows.
Prints one table: phase, rows, seconds, rows/s, peak RSS.
"""

from __future__ import annotations

import argparse
import collections
import csv
import functools
import random
import resource
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import connector.engine as engine_module  # noqa: E402
from connector.destinations.base import (  # noqa: E402
    AudienceRef,
    AudienceStatus,
    BatchResult,
    BatchSession,
    Capabilities,
    LookalikeRef,
    Member,
    RequestOutcome,
)
from connector.engine import Engine, SyncOptions  # noqa: E402
from connector.ledger.store import SqlLedger  # noqa: E402
from connector.settings import load_settings  # noqa: E402


class AckDestination:
    """Acknowledges every batch at once (like an emulator with no latency, minus the HTTP)."""

    def __init__(self, name: str, platform: Any) -> None:
        self.name, self.platform = name, platform
        self.capabilities = Capabilities()
        self.rows = 0

    def ensure_audience(self, segment: str, known: AudienceRef | None, schema: Sequence[str]) -> AudienceRef:
        return known or AudienceRef("bench", segment, {"schema": ",".join(schema)})

    def add_members(self, audience: AudienceRef, members: Sequence[Member], session: BatchSession) -> BatchResult:
        self.rows += len(members)
        return BatchResult()

    remove_members = add_members

    def replace_members(self, audience: AudienceRef, batches: Iterator[Sequence[Member]], total: int) -> BatchResult:
        for _ in batches:
            pass
        return BatchResult()

    def finish(self, audience: AudienceRef) -> None: ...

    def reconcile(self, audience: AudienceRef, request_ids: Sequence[str]) -> Mapping[str, RequestOutcome]:
        return {r: RequestOutcome("succeeded") for r in request_ids}

    def audience_status(self, audience: AudienceRef) -> AudienceStatus:
        return AudienceStatus(audience.audience_id)

    def ensure_lookalike(self, audience: AudienceRef, spec: Mapping[str, object], known: LookalikeRef | None,
                         seed_size: int) -> LookalikeRef | None:  # fmt: skip
        return None

    def close(self) -> None: ...


def messy_email(rng: random.Random, i: int) -> str:
    local = f"user.{i}"
    domain = rng.choice(("gmail.com", "example.com", "shop.co.uk", "googlemail.com", "mail.de"))
    e = f"{local}{'+promo' if rng.random() < 0.2 else ''}@{domain}"
    r = rng.random()
    return f"  {e.upper()} " if r < 0.2 else (e.title() if r < 0.3 else e)


def messy_phone(rng: random.Random, i: int) -> str:
    n = f"{2000000 + i % 7999999:07d}"
    r = rng.random()
    if r < 0.4:
        return f"+1 415 {n[:3]} {n[3:]}"
    if r < 0.7:
        return f"(415) {n[:3]}-{n[3:]}"
    if r < 0.85:
        return f"415.{n[:3]}.{n[3:]}"
    return f"+1415{n}"


def generate(path: Path, n: int, seed: int, changed: float = 0.0) -> None:
    rng = random.Random(seed)
    change_rng = random.Random(seed + 1)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["customer_id", "email", "phone"])
        for i in range(n):
            email, phone = messy_email(rng, i), messy_phone(rng, i)
            if changed and change_rng.random() < changed:
                email = f"changed.{i}@example.com"
            w.writerow([f"C{i}", email, phone])


# --phases: wall-clock seconds spent in these parts of a run (nested: pushing includes inserting)
PHASES = (
    (Engine, "_read_and_classify", "reading"), (SqlLedger, "apply_plan", "planning"), (Engine, "_push", "pushing"),
    (SqlLedger, "_insert_fresh", "inserting"), (SqlLedger, "iter_additions", "journal"),
    (engine_module, "to_members", "payloads"), (SqlLedger, "save_index", "snapshot"),
)  # fmt: skip


def time_phases(spent: collections.Counter[str]) -> None:
    """Wrap each phase's function so its wall-clock time adds up in `spent` (generators: while running)."""
    for owner, name, label in PHASES:
        fn = getattr(owner, name)

        def timed(*a: Any, _fn: Any = fn, _label: str = label, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                out = _fn(*a, **k)
            finally:
                spent[_label] += time.perf_counter() - t
            if hasattr(out, "__next__"):
                return _timed_iter(out, _label, spent)
            return out

        setattr(owner, name, functools.wraps(fn)(timed))


def _timed_iter(it: Iterator[Any], label: str, spent: collections.Counter[str]) -> Iterator[Any]:
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            spent[label] += time.perf_counter() - t
            return
        spent[label] += time.perf_counter() - t
        yield item


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sdk_baseline(path: Path, limit: int) -> tuple[int, float]:
    from facebook_business.adobjects.customaudience import CustomAudience

    schema = [CustomAudience.Schema.MultiKeySchema.email, CustomAudience.Schema.MultiKeySchema.phone]
    rows = 0
    t0 = time.perf_counter()
    with path.open(newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            # one call per row, as the SDK's add_users path does for each member
            CustomAudience.format_params(schema, [[rec["email"], rec["phone"]]], is_raw=True)
            rows += 1
            if rows >= limit:
                break
    return rows, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--baseline-rows", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out")
    ap.add_argument("--phases", action="store_true", help="also print where each run's time went")
    args = ap.parse_args()
    spent: collections.Counter[str] = collections.Counter()
    if args.phases:
        time_phases(spent)
    work = args.workdir / f"n{args.members}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "members.csv"
    t = time.perf_counter()
    generate(data, args.members, args.seed)
    gen_s = time.perf_counter() - t
    (work / "connector.toml").write_text(
        """
state_dir = "state"
[destinations.meta]
type = "meta"
ad_account_id = "1"
[destinations.google]
type = "google"
customer_id = "1"
[segments.bench]
source = { type = "csv", path = "members.csv" }
key = "customer_id"
identifiers = { email = "email", phone = "phone" }
destinations = ["meta", "google"]
consent = { ad_user_data = "granted", ad_personalization = "granted" }
"""
    )
    settings = load_settings(work / "connector.toml")
    dests = {"meta": AckDestination("meta", "meta"), "google": AckDestination("google", "google")}

    phases: list[str] = []

    def run(label: str) -> tuple[str, int, float, float, dict[str, Any]]:
        spent.clear()
        t0 = time.perf_counter()
        with Engine(settings, destination_factory=lambda n, c, s, st: dests[n]) as engine:  # type: ignore[arg-type,return-value]
            results = engine.sync(None, SyncOptions(force=True))
        dt = time.perf_counter() - t0
        if args.phases:
            phases.append(f"{label}: " + ", ".join(f"{k} {spent[k]:.1f}s" for _, _, k in PHASES))
        for r in results:
            assert r.status == "success", r.error
        c = results[0].counts
        return label, args.members, dt, args.members / dt, {"adds": c.adds, "changes": c.changes,
                                                             "unchanged": c.unchanged}  # fmt: skip

    rows = []
    rows.append(run("cold (2 platforms)"))
    generate(data, args.members, args.seed, changed=0.01)
    rows.append(run("warm, 1% changed"))
    n_base, base_s = sdk_baseline(data, min(args.baseline_rows, args.members))
    print(f"\ngenerate {args.members:,} rows: {gen_s:.1f}s")
    print(f"{'phase':<28}{'rows':>12}{'seconds':>10}{'rows/s':>12}  counts (meta)")
    for label, n, dt, rps, counts in rows:
        print(f"{label:<28}{n:>12,}{dt:>10.1f}{rps:>12,.0f}  {counts}")
    base_rps = n_base / base_s
    print(f"{'SDK format_params, 1 platform':<28}{n_base:>12,}{base_s:>10.1f}{base_rps:>12,.0f}")
    cold_rps = rows[0][3]
    print(f"\nratio cold rows/s (both platforms) / SDK rows/s (Meta only): {cold_rps / base_rps:.2f}x")
    print(f"peak RSS: {peak_rss_mb():,.0f} MB")
    if phases:
        print("\nseconds by phase (nested: pushing includes inserting, journal and payloads)")
        print("\n".join(phases))


if __name__ == "__main__":
    main()
