"""Pipeline benchmark: a real sync of N members into two platforms, cold then warm, with the SDK baseline.

    python benchmarks/pipeline.py --members 1000000
    python benchmarks/pipeline.py --members 10000000 --baseline-rows 200000

Generates N members (fixed formulas, no randomness: messy emails and phones in mixed formats; about 40%
Gmail addresses, which Google hashes differently) as a CSV, then runs the public engine API: a cold sync
into two acknowledging destinations (one Meta, one Google: both platforms' normalization, hashes and
member files, ledger committed), then a warm sync after 1% of the members changed their email, 0.2%
joined and 0.2% left. The destinations acknowledge each call without sending it anywhere, like an
emulator with no latency, minus the HTTP.

The baseline is the facebook-business SDK's own per-row normalize-and-hash path
(`CustomAudience.format_params`, email + phone, one platform) on the first rows of the same file, in the
same run: the machine is shared and its speed changes, so only figures of one run compare.
Prints one table: run, rows, seconds, rows/s, peak RSS, the engine's own phases, and the ratio.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
from connector.engine import Engine, RunResult, SyncOptions  # noqa: E402
from connector.settings import load_settings  # noqa: E402


class AckDestination:
    """Acknowledges every call at once. Members arrive as a column batch: nothing is built per member."""

    def __init__(self, name: str, platform: Any) -> None:
        self.name, self.platform = name, platform
        self.capabilities = Capabilities()
        self.rows = 0

    def ensure_audience(self, segment: str, known: AudienceRef | None, schema: Sequence[str], *,
                        value_based: bool = False) -> AudienceRef:  # fmt: skip
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


def generate(path: Path, n: int, *, warm: bool = False) -> None:
    """N members; `warm`: 1% changed their email, 0.2% left, 0.2% joined (rows n .. n + 0.2%)."""
    last = n + (n // 500 if warm else 0)
    email = """'user.' || i || CASE WHEN i % 5 = 0 THEN '+promo' ELSE '' END || '@' ||
        ['gmail.com', 'example.com', 'shop.co.uk', 'googlemail.com', 'mail.de'][1 + (i * 7) % 5]"""
    if warm:
        email = f"CASE WHEN i % 100 = 37 THEN 'changed.' || i || '@example.com' ELSE {email} END"
    phone = "lpad((2000000 + i % 7999999)::VARCHAR, 7, '0')"
    con = duckdb.connect()
    con.execute(f"""COPY (
        SELECT 'C' || i AS customer_id,
          CASE WHEN i % 10 < 2 THEN '  ' || upper(e) || ' ' ELSE e END AS email,
          CASE WHEN i % 20 < 8 THEN '+1 415 ' || left(p, 3) || ' ' || right(p, 4)
               WHEN i % 20 < 14 THEN '(415) ' || left(p, 3) || '-' || right(p, 4)
               WHEN i % 20 < 17 THEN '415.' || left(p, 3) || '.' || right(p, 4)
               ELSE '+1415' || p END AS phone
        FROM (SELECT i, {email} AS e, {phone} AS p FROM range({last}) t(i))
        WHERE {"i % 500 <> 123" if warm else "true"}
        ORDER BY i
    ) TO '{path}' (HEADER, DELIMITER ',')""")
    con.close()


def peak_rss_mb() -> float:
    """The process's peak RSS since it started, or since the last `reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start the peak RSS over from the current RSS (Linux: /proc/self/clear_refs), so a run's peak is its own,
    not the data generator's or an earlier run's. Elsewhere the peak stays the process's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


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


CONFIG = """
state_dir = "state"
{extra}
[destinations.meta]
type = "meta"
ad_account_id = "1"
[destinations.google]
type = "google"
customer_id = "1"
customer_match_terms = "accepted"
[segments.bench]
source = {{ type = "csv", path = "members.csv" }}
key = "customer_id"
identifiers = {{ email = "email", phone = "phone" }}
destinations = ["meta", "google"]
consent = {{ ad_user_data = "granted", ad_personalization = "granted" }}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=100_000)
    ap.add_argument("--baseline-rows", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out")
    ap.add_argument("--memory-limit", default=None, help="the engine's DuckDB memory_limit (default: the setting's)")
    args = ap.parse_args()
    work = args.workdir / f"n{args.members}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "members.csv"
    t = time.perf_counter()
    generate(data, args.members)
    gen_s = time.perf_counter() - t
    os.sync()  # the generated file on disk before a run is timed: its write-back is the generator's, not the run's
    extra = f'memory_limit = "{args.memory_limit}"' if args.memory_limit else ""
    config = CONFIG.format(extra=extra)
    (work / "connector.toml").write_text(config)
    settings = load_settings(work / "connector.toml")
    dests = {"meta": AckDestination("meta", "meta"), "google": AckDestination("google", "google")}

    def run(label: str) -> tuple[str, float, list[RunResult]]:
        reset_peak_rss()
        t0 = time.perf_counter()
        with Engine(settings, destination_factory=lambda n, c, s, st: dests[n]) as engine:  # type: ignore[arg-type,return-value]
            results = engine.sync(None, SyncOptions(force=True))
        dt = time.perf_counter() - t0
        for r in results:
            assert r.status == "success", r.error
        return label, dt, results

    runs = [run("cold (2 platforms)")]
    rss_cold = peak_rss_mb()
    generate(data, args.members, warm=True)
    os.sync()
    runs.append(run("warm (1% changed, 0.2% in/out)"))
    rss_warm = peak_rss_mb()
    n_base, base_s = sdk_baseline(data, min(args.baseline_rows, args.members))
    base_rps = n_base / base_s
    print(f"\n{args.members:,} members generated in {gen_s:.1f} s; DuckDB {duckdb.__version__}")
    print(f"{'run':<32}{'rows':>12}{'seconds':>9}{'rows/s':>12}{'x SDK':>7}{'peak RSS MB':>13}  phases (s), counts (meta)")
    for (label, dt, results), rss in zip(runs, (rss_cold, rss_warm), strict=True):
        meta = next(r for r in results if r.destination == "meta")
        phases = ", ".join(f"{k} {v:.1f}" for k, v in meta.phases.items())
        c = meta.as_dict()
        counts = {k: c[k] for k in ("new_members", "identifier_changes", "left_segment", "unchanged", "fallback_values")}
        rps = args.members / dt
        print(f"{label:<32}{args.members:>12,}{dt:>9.1f}{rps:>12,.0f}{rps / base_rps:>7.2f}{rss:>13,.0f}  {phases}; {counts}")
    print(f"{'SDK format_params (Meta only)':<32}{n_base:>12,}{base_s:>9.1f}{base_rps:>12,.0f}{1:>7.2f}")
    print(f"\nratio cold rows/s (both platforms, ledger committed) / SDK rows/s (one platform, nothing kept): "
          f"{args.members / runs[0][1] / base_rps:.2f}x")


if __name__ == "__main__":
    main()
