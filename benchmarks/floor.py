"""Floors: what the steps a sync cannot skip cost on this machine, and the least time a run could take.

    python benchmarks/floor.py --members 1000000

Times, one core each, on the same generated rows as `pipeline.py` (email + phone, messy formats):
reading the CSV into Python strings; the member keys and raw-row fingerprints; SHA-256 of every
identifier form both platforms are sent (bare `hashlib`, the values already normalized); our own
normalize-and-hash (`normalize_for`, both platforms) for comparison; writing one ledger row per member
and destination, as the design has it (DESIGN.md "The ledger"), into a minimal SQLite table and into
the members table, one row a statement (the driver's executemany) and many (`insert_rows`); and
updating one random row per changed member (a warm run's 1%).

Then it adds up the floors for 10M members and 2 destinations as if every other cost were zero and
the work split perfectly over 2 cores, and prints them beside the targets of issue 2. Per-row costs
are measured at --members and scaled linearly: SQLite's B-trees only get dearer per row as they grow,
so the 10M figures are lower bounds.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import pyarrow.csv as pacsv  # noqa: E402
from pipeline import generate, sdk_baseline  # noqa: E402

from connector.identifiers.hashing import fingerprints, member_key_array  # noqa: E402
from connector.identifiers.normalize import normalize_email, normalize_for, normalize_phone  # noqa: E402
from connector.ledger.store import SqlLedger, insert_rows  # noqa: E402

TARGET_MEMBERS = 10_000_000
CORES = 2


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def read_csv(path: Path) -> dict[str, list[Any]]:
    table = pacsv.read_csv(path)
    return {c: table.column(c).to_pylist() for c in ("customer_id", "email", "phone")}


def identifier_forms(emails: list[str], phones: list[str]) -> list[bytes]:
    """Every distinct value the two platforms are sent, per row: the email as Meta and as Google take it
    (one value unless a Gmail address), the phone with '+' (Google) and without (Meta)."""
    forms: list[bytes] = []
    for e, p in zip(emails, phones, strict=True):
        meta_e = normalize_email(e, "meta")
        google_e = normalize_email(e, "google")
        phone = normalize_phone(p, "US")
        for v in {meta_e, google_e}:
            if v:
                forms.append(v.encode())
        if phone:
            forms += [phone.encode(), phone[1:].encode()]
    return forms


def fresh_db(directory: Path, name: str) -> sqlite3.Connection:
    path = directory / name
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def minimal_insert(db: sqlite3.Connection, keys: list[bytes], payloads: list[bytes]) -> float:
    """One row per member (destination number, 16-byte key, fingerprint, binary payload, state code) in key
    order, many rows a statement, a transaction per 10,000."""
    db.execute("CREATE TABLE m (d INTEGER, k BLOB, fp INTEGER, p BLOB, st INTEGER, PRIMARY KEY (d, k))")

    def run() -> None:
        for i in range(0, len(keys), 10_000):
            insert_rows(db.execute, "INSERT INTO m", [(1, keys[j], j, payloads[j], 3)
                                                      for j in range(i, min(len(keys), i + 10_000))])  # fmt: skip
            db.commit()

    return timed(run)


def members_insert(directory: Path, name: str, keys: list[str], payloads: list[str], many: bool) -> float:
    """Rows of connector's own `members` table, as a cold run writes them (in their final state)."""
    path = directory / name
    SqlLedger(f"sqlite:///{path}").close()  # the schema, its indexes and pragmas as connector makes them
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=NORMAL")
    cols = SqlLedger._FRESH_COLUMNS
    head = f"INSERT INTO members ({', '.join(cols)})"
    ts = "2026-12-01 00:00:00.000000"

    def run() -> None:
        for i in range(0, len(keys), 10_000):
            rows = [("bench", "meta", keys[j], j, payloads[j], j, "", "confirmed", None, None, ts, ts, None)
                    for j in range(i, min(len(keys), i + 10_000))]  # fmt: skip
            if many:
                insert_rows(db.execute, head, rows)
            else:
                db.executemany(f"{head} VALUES ({','.join('?' * len(cols))})", rows)
            db.commit()

    spent = timed(run)
    db.close()
    return spent


def random_updates(db: sqlite3.Connection, keys: list[bytes], share: float, seed: int) -> tuple[int, float]:
    """Update the payload of `share` of the members, at random places, a transaction per 10,000."""
    picked = sorted(random.Random(seed).sample(range(len(keys)), int(len(keys) * share)))
    new = hashlib.sha256(b"changed").digest() * 2

    def run() -> None:
        for i in range(0, len(picked), 10_000):
            db.executemany("UPDATE m SET p = ?, st = 1 WHERE d = 1 AND k = ?",
                           [(new, keys[j]) for j in picked[i : i + 10_000]])  # fmt: skip
            db.commit()

    return len(picked), timed(run)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    n = args.members
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        data = work / "members.csv"
        generate(data, n, args.seed)
        rows: list[tuple[str, float, str]] = []  # step, seconds at n, what it is

        cols: dict[str, list[Any]] = {}
        rows.append(("read the CSV into Python strings", timed(lambda: cols.update(read_csv(data))), "floor"))
        ids, emails, phones = cols["customer_id"], cols["email"], cols["phone"]
        keys_arr: list[Any] = []
        rows.append((
            "member keys (SHA-256) and fingerprints (BLAKE2b)",
            timed(lambda: keys_arr.extend([member_key_array(ids), fingerprints([ids, emails, phones])])),
            "floor",
        ))  # fmt: skip
        forms = identifier_forms(emails, phones)
        sha = hashlib.sha256
        rows.append((
            f"SHA-256 of the identifier forms ({len(forms) / n:.2f} a member)",
            timed(lambda: [sha(v).hexdigest() for v in forms]), "floor",
        ))  # fmt: skip
        rows.append((
            "normalize + hash, both platforms (normalize_for)",
            timed(lambda: normalize_for([("meta", "US"), ("google", "US")], [("email", emails), ("phone", phones)])),
            "ours",
        ))  # fmt: skip

        keys = sorted(bytes(k) for k in keys_arr[0].tolist())
        payloads = [sha(k).digest() + sha(k[::-1]).digest() for k in keys]
        db = fresh_db(work, "minimal.db")
        rows.append(("ledger row per member: minimal table", minimal_insert(db, keys, payloads), "floor, x2 dest."))
        hex_keys = [k.hex() for k in keys]
        json_payloads = [f'{{"EMAIL":"{p[:32].hex()}","PHONE":"{p[32:].hex()}"}}' for p in payloads]
        rows.append(("members table, one row a statement", members_insert(work, "one.db", hex_keys, json_payloads, False),
                     "ours before"))  # fmt: skip
        rows.append(("members table, many rows a statement", members_insert(work, "many.db", hex_keys, json_payloads,
                                                                           True), "ours"))  # fmt: skip
        changed, upd = random_updates(db, keys, 0.01, args.seed)
        db.close()
        n_base, base_s = sdk_baseline(data, min(n, 100_000))

    scale = TARGET_MEMBERS / n
    print(f"\n{n:,} members measured, one core each; core-seconds scaled to {TARGET_MEMBERS:,} members")
    print(f"{'step':<56}{'us/member':>10}{'core-s at 10M':>15}  kind")
    for label, sec, kind in rows:
        print(f"{label:<56}{sec / n * 1e6:>10.2f}{sec * scale:>15.1f}  {kind}")
    per_change = upd / changed
    print(f"{'update one random row per changed member (1%)':<56}{per_change * 1e6:>10.2f}"
          f"{per_change * TARGET_MEMBERS * 0.01:>15.1f}  floor, per change, x2 dest.")  # fmt: skip
    by = {label: sec * scale for label, sec, _ in rows}
    read, keys_fp = by["read the CSV into Python strings"], by["member keys (SHA-256) and fingerprints (BLAKE2b)"]
    hashes = next(v for k, v in by.items() if k.startswith("SHA-256 of the identifier forms"))
    insert = by["ledger row per member: minimal table"]
    cold = (read + keys_fp + hashes + 2 * insert) / CORES
    warm = (read + keys_fp + 2 * per_change * TARGET_MEMBERS * 0.01) / CORES
    sdk = n_base / base_s
    print(f"\nfloors for {TARGET_MEMBERS:,} members, 2 destinations, the work split perfectly over {CORES} cores and")
    print("nothing else costing anything (no normalization rules, no staging, no pushing, no objects):")
    print(f"  cold: (read + keys/fingerprints + SHA-256 + 2 ledger rows) / {CORES} = {cold:.1f} s   (target <= 60 s)")
    print(f"  warm: (read + keys/fingerprints + 2 updates per changed member) / {CORES} = {warm:.1f} s   "
          "(target <= 10 s)")  # fmt: skip
    print(f"  SDK per-row baseline: {sdk:,.0f} rows/s; 4x = {4 * sdk:,.0f} rows/s = {TARGET_MEMBERS:,} members in "
          f"{TARGET_MEMBERS / (4 * sdk):.1f} s, against the cold floor's {TARGET_MEMBERS / cold:,.0f} rows/s "
          f"({TARGET_MEMBERS / cold / sdk:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
