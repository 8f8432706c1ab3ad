"""The floor of the problem on this machine: what any design must spend on a cold sync of N members.

    python benchmarks/floor.py --members 1000000

A cold sync into Meta and Google cannot do less than: read the source once; compute each member's key
and, per platform, the SHA-256 of each identifier in that platform's form (email once, plus Google's
form of Gmail addresses; the phone twice: `1...` for Meta, `+1...` for Google); write what was sent.
This script measures those three steps alone, on values already cleaned (no trimming, no validation,
no fallback), with every SHA-256 implementation at hand (DuckDB's `sha256` on all cores and on one;
DataFusion's, which the engine uses, 100,000 rows at a time on every core as the engine calls it; Python's
`hashlib` on one: a thread pool does not help `hashlib` on short values, it holds the GIL), and, in
the same run, the SDK per-row baseline of `pipeline.py`. It prints one table and, from it, the fastest
a cold sync of both platforms could possibly go here, against the SDK.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline import generate, sdk_baseline  # noqa: E402

from connector.identifiers.hashing import sha256_columns  # noqa: E402

_GMAIL = "('gmail.com', 'googlemail.com')"


def cleaned(con: duckdb.DuckDBPyConnection, path: Path) -> pa.Table:
    """The generated members with values cleaned as the platforms want them (not timed: cleaning is a
    design's own cost, and the floor is what no design avoids)."""
    return con.sql(f"""
        SELECT customer_id AS id, e AS email,
          CASE WHEN split_part(e, '@', 2) IN {_GMAIL}
               THEN replace(split_part(split_part(e, '@', 1), '+', 1), '.', '') || '@' || split_part(e, '@', 2)
          END AS gmail,
          '1' || right(regexp_replace(phone, '[^0-9]', '', 'g'), 10) AS phone
        FROM (SELECT customer_id, lower(trim(email)) AS e, phone
              FROM read_csv({_lit(str(path))}, all_varchar = true))""").to_arrow_table()


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=1_000_000)
    ap.add_argument("--baseline-rows", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out")
    args = ap.parse_args()
    n = args.members
    work = args.workdir / f"floor{n}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "members.csv"
    generate(data, n)
    con = duckdb.connect()
    con.execute(f"SET threads = {os.cpu_count() or 1}")
    rows: list[tuple[str, float, float]] = []  # step, seconds, hashes per member

    read_s = timed(lambda: con.sql(f"SELECT count(*) FROM read_csv({_lit(str(data))}, all_varchar = true)").fetchall())
    t = time.perf_counter()
    read_all = con.sql(f"SELECT * FROM read_csv({_lit(str(data))}, all_varchar = true)").to_arrow_table()
    arrow_s = time.perf_counter() - t
    rows.append(("read the CSV (DuckDB, count only)", read_s, 0))
    rows.append(("read the CSV into Arrow (DuckDB)", arrow_s, 0))
    del read_all

    tbl = cleaned(con, data)
    con.execute("CREATE TABLE m AS SELECT * FROM tbl")  # a DuckDB table: scanned by every thread
    gmail_share = 1 - tbl.column("gmail").null_count / max(n, 1)
    per_member = 1 + 1 + gmail_share + 2  # key, email, Gmail form where it differs, phone twice
    sql_hashes = """SELECT count(k), count(e), count(g), count(pm), count(pg) FROM (
        SELECT unhex(sha256('ns' || id)) AS k, unhex(sha256(email)) AS e, unhex(sha256(gmail)) AS g,
               unhex(sha256(phone)) AS pm, unhex(sha256('+' || phone)) AS pg FROM m)"""
    duck_s = timed(lambda: con.sql(sql_hashes).fetchall())
    rows.append((f"SHA-256, DuckDB ({os.cpu_count()} threads)", duck_s, per_member))
    con.execute("SET threads = 1")
    duck1_s = timed(lambda: con.sql(sql_hashes).fetchall())
    con.execute(f"SET threads = {os.cpu_count() or 1}")
    rows.append(("SHA-256, DuckDB (1 thread)", duck1_s, per_member))

    def datafusion_hashes() -> None:
        for rb in tbl.to_batches(100_000):
            sha256_columns({"k": (rb.column(0), "ns")}, size=16)
            sha256_columns({"e": (rb.column(1), ""), "g": (rb.column(2), ""), "pm": (rb.column(3), ""),
                            "pg": (rb.column(3), "+")})  # fmt: skip

    df_s = timed(datafusion_hashes)
    rows.append(("SHA-256, DataFusion (engine's batches)", df_s, per_member))

    cols = {c: [v.encode() for v in tbl.column(c).to_pylist() if v is not None] for c in ("id", "email", "gmail", "phone")}

    def py_hashes() -> None:
        sha = hashlib.sha256
        for v in cols["id"]:
            sha(b"ns" + v).digest()
        for c in ("email", "gmail", "phone"):
            for v in cols[c]:
                sha(v).digest()
        for v in cols["phone"]:
            sha(b"+" + v).digest()

    py_s = timed(py_hashes)
    rows.append(("SHA-256, hashlib (1 thread)", py_s, per_member))

    digests = con.sql("""SELECT unhex(left(sha256('ns' || id), 32)) AS k, hash(id, email, phone) AS fp,
        unhex(sha256(email)) AS e, unhex(sha256(phone)) AS p, 3::UTINYINT AS st FROM m""").to_arrow_table()

    def write_two() -> None:
        for name in ("meta", "google"):
            pq.write_table(digests, work / f"{name}.parquet", compression="none", use_dictionary=False)

    rows.append(("write two member files (Parquet)", timed(write_two), 0))

    n_base, base_s = sdk_baseline(data, min(args.baseline_rows, n))
    base_rps = n_base / base_s
    print(f"\n{n:,} members; {gmail_share:.0%} Gmail; {per_member:.2f} SHA-256 a member; DuckDB {duckdb.__version__}")
    print(f"{'step':<40}{'seconds':>9}{'µs/member':>11}{'µs/hash':>9}")
    for step, s, h in rows:
        print(f"{step:<40}{s:>9.2f}{s / n * 1e6:>11.2f}{(s / n / h * 1e6) if h else float('nan'):>9.2f}")
    print(f"{'SDK format_params (Meta only), per row':<40}{base_s:>9.2f}{base_s / n_base * 1e6:>11.2f}")
    best_hash = min(duck_s, duck1_s, df_s, py_s)
    floor = read_s + best_hash + rows[-1][1]
    print(f"\nfloor of a cold sync (read + fastest hashing + write, nothing else): {floor:.2f} s = "
          f"{n / floor:,.0f} members/s = {n / floor / base_rps:.2f}x the SDK's {base_rps:,.0f} rows/s")
    print(f"4x the SDK would be {n / (4 * base_rps):.2f} s for {n:,} members")


if __name__ == "__main__":
    main()
