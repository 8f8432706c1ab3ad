"""End-to-end Meta benchmark: sync N members into the Graph API emulator (no latency) through the
engine, the ledger, our Graph client and the emulator's HTTP server, and print members per second.

    python benchmarks/meta_push.py --members 1000000
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
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out")
    args = ap.parse_args()
    work = args.workdir / f"meta-{args.members}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    generate(work / "members.csv", args.members, args.seed)
    (work / "connector.toml").write_text("""
state_dir = "state"
[destinations.meta]
type = "meta"
ad_account_id = "act_1"
sandbox = true
[segments.bench]
source = { type = "csv", path = "members.csv" }
key = "customer_id"
identifiers = { email = "email", phone = "phone" }
destinations = ["meta"]
""")
    settings = load_settings(work / "connector.toml")
    rows = []
    for label in ("cold: every member added", "warm: nothing changed"):
        t0 = time.perf_counter()
        with Engine(settings) as engine:
            (res,) = engine.sync(None, SyncOptions(force=True))
            emulator = engine.destination("meta").emulator  # type: ignore[attr-defined]
            size = len(emulator.members(res.audience_id))
        dt = time.perf_counter() - t0
        assert res.status == "success", res.error
        rows.append((label, res.counts.adds, res.write_calls, dt, size))
    print(f"\n{'run':<28}{'adds':>10}{'calls':>7}{'seconds':>9}{'members/s':>11}{'audience':>10}")
    for label, adds, calls, dt, size in rows:
        print(f"{label:<28}{adds:>10,}{calls:>7}{dt:>9.1f}{args.members / dt:>11,.0f}{size:>10,}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")


if __name__ == "__main__":
    main()
