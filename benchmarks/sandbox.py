"""A real sync into both bundled sandbox emulators (Meta Graph API, Google Data Manager), cold then warm:
engine, member files, our platform clients and the emulators' HTTP servers, all in one process.

    python benchmarks/sandbox.py --members 300000
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline import generate  # noqa: E402

from connector.engine import Engine, SyncOptions  # noqa: E402
from connector.settings import load_settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out")
    args = ap.parse_args()
    work = args.workdir / f"sandbox-{args.members}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    generate(work / "members.csv", args.members)
    (work / "connector.toml").write_text("""
state_dir = "state"
[destinations.meta]
type = "meta"
ad_account_id = "act_1"
sandbox = true
[destinations.google]
type = "google"
customer_id = "1234567890"
customer_match_terms = "accepted"
sandbox = true
[segments.bench]
source = { type = "csv", path = "members.csv" }
key = "customer_id"
identifiers = { email = "email", phone = "phone" }
destinations = ["meta", "google"]
""")
    settings = load_settings(work / "connector.toml")
    rows = []
    for label in ("cold: every member added", "warm: nothing changed"):
        t0 = time.perf_counter()
        with Engine(settings) as engine:
            results = engine.sync(None, SyncOptions(force=True))
            sizes = {r.destination: len(engine.destination(r.destination).emulator.members(  # type: ignore[attr-defined]
                r.audience_id)) for r in results}  # fmt: skip
        dt = time.perf_counter() - t0
        for res in results:
            assert res.status == "success", res.error
        rows.append((label, sum(r.counts.adds for r in results), sum(r.write_calls for r in results), dt, sizes))
    print(f"\n{'run (both platforms)':<28}{'adds':>10}{'calls':>7}{'seconds':>9}{'members/s':>11}  audiences after")
    for label, adds, calls, dt, sizes in rows:
        print(f"{label:<28}{adds:>10,}{calls:>7}{dt:>9.1f}{args.members / dt:>11,.0f}  {sizes}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")


if __name__ == "__main__":
    main()
