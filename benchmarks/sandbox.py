"""A real sync into both bundled sandbox emulators (Meta Graph API, Google Data Manager), cold then warm:
engine, member files, our platform clients and the emulators' HTTP servers, all in one process.

    python benchmarks/sandbox.py --members 300000

The baseline is `pipeline.py`'s: the facebook-business SDK's per-row `CustomAudience.format_params` (email
and phone, Meta only, nothing kept) on the first rows of the same file, in the same run; the machine is
shared and its speed changes, so only figures of one run compare. `x SDK` divides members/s (a member
counts once for both platforms) by the baseline's rows/s.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline import generate, peak_rss_mb, sdk_baseline  # noqa: E402

from connector.engine import Engine, SyncOptions  # noqa: E402
from connector.settings import load_settings  # noqa: E402

CONFIG = """
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
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=100_000)
    ap.add_argument("--baseline-rows", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out")
    args = ap.parse_args()
    work = args.workdir / f"sandbox-{args.members}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    generate(work / "members.csv", args.members)
    (work / "connector.toml").write_text(CONFIG)
    settings = load_settings(work / "connector.toml")
    rows = []
    for label in ("cold: every member added", "warm: nothing changed"):
        t0 = time.perf_counter()
        with Engine(settings) as engine:
            results = engine.sync(None, SyncOptions(force=True))
            sizes = {r.destination: engine.destination(r.destination).emulator.member_count(r.audience_id)  # type: ignore[attr-defined]
                     for r in results}  # fmt: skip
        dt = time.perf_counter() - t0
        for res in results:
            assert res.status == "success", res.error
            assert sizes[res.destination] == args.members, sizes
        rows.append((label, sum(r.write_calls for r in results), dt, peak_rss_mb()))
    n_base, base_s = sdk_baseline(work / "members.csv", min(args.baseline_rows, args.members))
    base_rps = n_base / base_s
    print(f"\n{'members':>9}  {'run (both platforms)':<26}{'write calls':>12}{'seconds':>9}{'members/s':>11}"
          f"{'peak RSS MB':>13}{'SDK rows/s':>12}{'x SDK':>7}")  # fmt: skip
    for label, calls, dt, rss in rows:
        rate = args.members / dt
        print(f"{args.members:>9,}  {label:<26}{calls:>12}{dt:>9.1f}{rate:>11,.0f}{rss:>13,.0f}{base_rps:>12,.0f}"
              f"{rate / base_rps:>7.3f}")  # fmt: skip
    print(f"{n_base:>9,}  {'SDK format_params, Meta':<26}{'':>12}{base_s:>9.1f}{base_rps:>11,.0f}{'':>13}{base_rps:>12,.0f}"
          f"{1:>7.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
