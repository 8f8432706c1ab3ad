"""Run the chaos convergence suite over many seeds and print a table and the summary line.

    python benchmarks/chaos.py --seeds 200 --workers 2

Each seed is one scenario of tests/chaos/scenario.py (real `connector sync` processes SIGKILLed at
chosen write requests, all three emulators with faults on; odd seeds map email and phone only, even
seeds six fields). A seed replays the same scenario. Exit code 1 when any scenario ends with a
mismatch, or killed no process, or injected no fault.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "chaos"))
from scenario import Outcome, run_scenario, summary


def one(seed: int, verbose: bool, ledger_url: str | None) -> Outcome:
    with tempfile.TemporaryDirectory(prefix=f"chaos-{seed}-") as tmp:
        return run_scenario(seed, Path(tmp), verbose=verbose, ledger_url=ledger_url)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=200, help="how many scenarios")
    ap.add_argument("--first", type=int, default=1, help="first seed")
    ap.add_argument("--workers", type=int, default=2, help="scenarios run at once")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each scenario's steps")
    ap.add_argument("--ledger-url", help="a PostgreSQL ledger (SQLAlchemy URL) instead of SQLite files")
    args = ap.parse_args()
    seeds = range(args.first, args.first + args.seeds)
    outcomes: list[Outcome] = []
    print(f"{'seed':>6} {'runs':>5} {'kills':>5} {'faults':>6} {'writes':>6} {'seconds':>8}  mismatches", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(one, s, args.verbose, args.ledger_url) for s in seeds]
        for fut in as_completed(futures):
            o = fut.result()
            outcomes.append(o)
            print(f"{o.seed:>6} {o.runs:>5} {o.kills:>5} {o.faults_injected:>6} {o.writes:>6} {o.seconds:>8.1f}  "
                  f"{'; '.join(o.mismatches) or 0}", flush=True)  # fmt: skip
            if o.mismatches:
                print("\n".join("        " + line for line in o.log), flush=True)
    print(summary(sorted(outcomes, key=lambda o: o.seed)))
    return 1 if any(o.mismatches for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
