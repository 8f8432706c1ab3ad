"""Value benchmark: predicted CLV and value tiers at N customers, each phase in a process of its own.

    python benchmarks/value.py --customers 1000000

Generates N customers (`pipeline.generate`: messy emails and phones, keys C0..C{N-1}) and their orders by
fixed formulas of a hash of the customer number (no randomness): 90% of the customers ordered, over two
years at a personal pace and a personal basket size (about 3 orders a customer).
Then each phase runs in a fresh process (spawned), so its peak RSS is its own:

- ``orders -> RFM``: the orders CSV read into DuckDB and summarized per customer (`connector.clv.rfm_sql`),
  and for comparison pymc-marketing's own `rfm_summary` (pandas) on the same file;
- ``CLV fit + predict``: that, plus pymc-marketing's BG/NBD and Gamma-Gamma fitted by MAP and every
  customer's value over 365 days (`connector.clv.predict`); `--cold-compile` also runs it with an empty
  PyTensor cache, the price of the first fit on a new machine;
- ``tiers``: a customer source with a value column read once and cut into three tiers
  (`connector.segments`: type inference, ranking, per-tier counts);
- ``sync cold`` / ``sync warm``: the public engine API, a segment tiered by the predicted value (three
  audiences) into two acknowledging destinations (one Meta, one Google, `pipeline.AckDestination`): read
  both sources, fit, tier, plan, write member files, send; then again with nothing changed (the
  predictions kept by the first sync: no fit).

The baseline is the facebook-business SDK's per-row normalize-and-hash path (`pipeline.sdk_baseline`) on
the first rows of the same customers, in the same run. Prints one table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline import AckDestination, generate, sdk_baseline  # noqa: E402

CONFIG = """
state_dir = "state"
[destinations.meta]
type = "meta"
ad_account_id = "1"
[destinations.google]
type = "google"
customer_id = "1"
customer_match_terms = "accepted"

[sources.customers]
type = "csv"
path = "members.csv"
clv = { orders = "orders", customer = "customer_id", time = "ordered_at", amount = "amount", horizon_days = 365 }

[sources.orders]
type = "csv"
path = "orders.csv"

[segments.value]
source = "customers"
tiers = { by = "clv", high = 0.10, medium = 0.30 }
key = "customer_id"
identifiers = { email = "email", phone = "phone" }
destinations = ["meta", "google"]
consent = { ad_user_data = "granted", ad_personalization = "granted" }
"""


def generate_orders(path: Path, customers: int) -> int:
    """Orders of customers C0..C{n-1}: uniform draws from hashes of (customer, k), the last day 729."""
    con = quiet_duckdb()
    u = "((hash(i, {k}) % 1000003) / 1000003.0)"
    con.execute(f"""COPY (
        WITH c AS (
            SELECT i, {u.format(k=1)} AS u1, floor({u.format(k=2)} * 700)::INT AS first,
                   5 + floor({u.format(k=3)} * 150)::INT AS gap, 15 + 180 * pow({u.format(k=4)}, 2) AS basket
            FROM range({customers}) t(i)
        ), o AS (
            SELECT i, j, first + j * gap AS day, basket FROM c, range(least(1 + floor(-ln(1 - u1 * 0.999) * 3.5), 40)::INT) r(j)
            WHERE {u.format(k=5)} >= 0.1 AND first + j * gap <= 729
        )
        SELECT 'C' || i AS customer_id,
               strftime(DATE '2024-11-01' + day::INT + INTERVAL (hash(i, j, 6) % 86400) SECOND, '%Y-%m-%dT%H:%M:%S')
                 AS ordered_at,
               round(basket * (0.7 + 0.6 * ((hash(i, j, 7) % 1000) / 1000.0)), 2) AS amount
        FROM o ORDER BY day, i
    ) TO '{path}' (HEADER, DELIMITER ',')""")
    n = int(con.execute(f"SELECT count(*) FROM read_csv('{path}')").fetchall()[0][0])
    con.close()
    return n


def quiet_duckdb() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    return con


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- phases (each in its own process)


def phase_rfm(work: Path) -> dict[str, Any]:
    from connector.clv import rfm_sql
    from connector.settings import ClvConfig

    t0 = time.perf_counter()
    con = quiet_duckdb()
    con.execute(f"CREATE TABLE orders AS SELECT * FROM read_csv('{work / 'orders.csv'}', all_varchar = true)")
    read = time.perf_counter() - t0
    rows = con.sql(rfm_sql("orders", ClvConfig(orders="orders"))).to_arrow_table().num_rows
    return {"seconds": time.perf_counter() - t0, "rows": rows, "note": f"read {read:.1f} s"}


def phase_pandas_rfm(work: Path) -> dict[str, Any]:
    import pandas as pd
    from pymc_marketing.clv import rfm_summary

    t0 = time.perf_counter()
    orders = pd.read_csv(work / "orders.csv", dtype={"customer_id": str})
    read = time.perf_counter() - t0
    rows = len(rfm_summary(orders, "customer_id", "ordered_at", "amount"))
    return {"seconds": time.perf_counter() - t0, "rows": rows, "note": f"read {read:.1f} s"}


def phase_fit(work: Path, compiledir: str | None = None) -> dict[str, Any]:
    if compiledir:
        os.environ["PYTENSOR_FLAGS"] = f"compiledir={compiledir}"
    from connector.clv import predict
    from connector.settings import ClvConfig

    t0 = time.perf_counter()
    con = quiet_duckdb()
    con.execute(f"CREATE TABLE orders AS SELECT * FROM read_csv('{work / 'orders.csv'}', all_varchar = true)")
    t1 = time.perf_counter()
    values, summary = predict(con, "orders", ClvConfig(orders="orders"), source="customers")
    t2 = time.perf_counter()
    note = (f"import + RFM {t2 - t1 - summary.fit_seconds:.1f} s, fit + predict {summary.fit_seconds:.1f} s; "
            f"{summary.repeat_share:.0%} repeat, mean value {summary.mean_value:,.2f}")  # fmt: skip
    return {"seconds": t2 - t0, "rows": values.num_rows, "note": note}


def phase_tiers(work: Path) -> dict[str, Any]:
    from connector.segments import SegmentSources
    from connector.settings import load_settings

    (work / "tiers.toml").write_text(CONFIG.replace("clv = {", "# clv = {").replace('by = "clv"', 'by = "value"')
                                     .replace('path = "members.csv"', 'path = "valued.csv"'))  # fmt: skip
    settings = load_settings(work / "tiers.toml")
    t0 = time.perf_counter()
    sources = SegmentSources(settings, quiet_duckdb())
    counts = []
    for tier in ("high", "medium", "rest"):
        seg = settings.segments[f"value_{tier}"]
        con = sources.db.cursor()
        with sources.rows(con, f"value_{tier}", seg, ["customer_id", "email", "phone"]) as rows:
            counts.append(int(con.execute(f"SELECT count(*) FROM {rows.name}").fetchall()[0][0]))
        con.close()
    sources.close()
    return {"seconds": time.perf_counter() - t0, "rows": sum(counts), "note": "tiers " + " / ".join(f"{c:,}" for c in counts)}


def phase_sync(work: Path) -> dict[str, Any]:
    from connector.engine import Engine, SyncOptions
    from connector.settings import load_settings

    settings = load_settings(work / "connector.toml")
    dests = {"meta": AckDestination("meta", "meta"), "google": AckDestination("google", "google")}
    t0 = time.perf_counter()
    with Engine(settings, destination_factory=lambda n, c, s, st: dests[n]) as engine:  # type: ignore[arg-type,return-value]
        results = engine.sync(None, SyncOptions(force=True))
    dt = time.perf_counter() - t0
    for r in results:
        assert r.status == "success", r.error
    first = results[0]
    fit = (first.clv or {}).get("fit_seconds", 0.0)
    adds = sum(r.counts.adds for r in results)
    # a segment's pairs share one plan; the first tier's planning includes reading the sources and the fit
    planning = sum(r.phases.get("planning", 0.0) - r.phases.get("source", 0.0) for r in results[::2])
    return {"seconds": dt, "rows": sum(int(r.counts.source_rows) for r in results[::2]),
            "note": f"source (read, fit, tiers) {first.phases.get('source', 0.0):.1f} s incl. fit {fit:.1f} s; "
                    f"planning 3 tiers (x 2 platforms) {planning:.1f} s; adds {adds:,}; "
                    f"tiers {' / '.join(str(r.tier['members']) for r in results[::2] if r.tier)}"}  # fmt: skip


def in_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run a phase in a fresh process; its peak RSS is that process's."""

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_measured, fn, *args).result()


def _measured(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    out = fn(*args)
    out["rss"] = peak_rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--baseline-rows", type=int, default=100_000)
    ap.add_argument("--cold-compile", action="store_true", help="also fit once with an empty PyTensor cache")
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out")
    args = ap.parse_args()
    work = args.workdir / f"value-{args.customers}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.perf_counter()
    generate(work / "members.csv", args.customers)
    orders = generate_orders(work / "orders.csv", args.customers)
    con = quiet_duckdb()  # customers with a value column of their own, for the tiers phase
    con.execute(f"""COPY (SELECT *, CASE WHEN hash(customer_id) % 10 = 0 THEN NULL
                                    ELSE round((hash(customer_id, 1) % 100000) / 100.0, 2) END AS value
                        FROM read_csv('{work / 'members.csv'}', all_varchar = true))
                    TO '{work / 'valued.csv'}' (HEADER, DELIMITER ',')""")  # fmt: skip
    con.close()
    gen = time.perf_counter() - t
    (work / "connector.toml").write_text(CONFIG)

    phases: list[tuple[str, dict[str, Any]]] = [("orders -> RFM (DuckDB SQL)", in_process(phase_rfm, work)),
                                              ("orders -> RFM (pymc-marketing, pandas)", in_process(phase_pandas_rfm, work))]
    if args.cold_compile:
        with tempfile.TemporaryDirectory() as compiledir:
            phases.append(("CLV fit + predict, empty PyTensor cache", in_process(phase_fit, work, compiledir)))
    phases.append(("CLV fit + predict", in_process(phase_fit, work)))
    phases.append(("tiers (read, type, rank, count)", in_process(phase_tiers, work)))
    phases.append(("sync cold: fit, 3 tiers x 2 platforms", in_process(phase_sync, work)))
    phases.append(("sync warm: nothing changed", in_process(phase_sync, work)))
    n_base, base_s = sdk_baseline(work / "members.csv", min(args.baseline_rows, args.customers))
    base_rps = n_base / base_s

    print(f"\n{args.customers:,} customers, {orders:,} orders, generated in {gen:.1f} s; DuckDB {duckdb.__version__}")
    print(f"{'phase':<42}{'rows':>12}{'seconds':>9}{'rows/s':>12}{'x SDK':>7}{'peak RSS MB':>13}  notes")
    for label, p in phases:
        rps = p["rows"] / p["seconds"]
        print(f"{label:<42}{p['rows']:>12,}{p['seconds']:>9.1f}{rps:>12,.0f}{rps / base_rps:>7.2f}{p['rss']:>13,.0f}  "
              f"{p['note']}")
    print(f"{'SDK format_params (Meta only)':<42}{n_base:>12,}{base_s:>9.1f}{base_rps:>12,.0f}{1:>7.2f}")


if __name__ == "__main__":
    main()
