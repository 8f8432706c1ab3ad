"""Conversion of a ledger of the row-per-member design (schema 7 and before) on first open.

Each pair's `members` rows become its base file: members on the platform stay on it (with the time
it accepted them), rejected ones stay rejected, members in flight (planned, sent, deferred, or waiting
in the plan journal) become "maybe on the platform" (sent again if still in the segment, removed if
not), and owed removals stay owed. Fingerprints are not carried over (the new ones hash differently):
the first run afterwards normalizes every member once and finds them unchanged.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from sqlalchemy import inspect, text

from connector.errors import LedgerError
from connector.identifiers.columns import CLEAR_KEYS
from connector.ledger.files import (
    MAYBE,
    MEMBER,
    ON,
    OWED,
    REJECTED,
    TO_SEND,
    MemberRoot,
    PairFiles,
    member_schema,
    payload_column,
)
from connector.ledger.journal import Journal, PairPointer, rejected

log = logging.getLogger("connector.ledger")

_ON = ("accepted", "confirmed")
_CONSENT = {"U": 0, "G": 1, "D": 2}


def _consent(code: str | None) -> int | None:
    if not code:
        return None
    padded = code + "UU"
    return 3 * _CONSENT.get(padded[0], 0) + _CONSENT.get(padded[1], 0)


def _owed(prev: str | None) -> list[dict[str, str]]:
    if not prev:
        return []
    v = json.loads(prev)
    items = v if isinstance(v, list) else [v]
    return [json.loads(x) if isinstance(x, str) else x for x in items]


def _is_hex(v: object) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _ts(v: Any) -> datetime | None:
    if v is None:
        return None
    ts: datetime = datetime.fromisoformat(v) if isinstance(v, str) else v
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def migrate_legacy(journal: Journal, root: MemberRoot) -> None:
    """Convert every pair of a legacy ledger in this database, then drop the legacy tables."""
    with journal.engine.begin() as conn:
        tables = set(inspect(conn).get_table_names())
        if "members" not in tables:
            journal.mark_current_schema()
            return
        pair_rows = [(str(r[0]), str(r[1])) for r in conn.execute(text("SELECT DISTINCT segment, destination FROM members"))]
        if "plan_journal" in tables:
            pair_rows += [(str(r[0]), str(r[1]))
                          for r in conn.execute(text("SELECT DISTINCT segment, destination FROM plan_journal"))]  # fmt: skip
    for segment, destination in sorted(set(pair_rows)):
        if journal.pointer(segment, destination).version:
            continue  # converted by an earlier (interrupted) conversion, or by another process just now
        try:
            n = _convert_pair(journal, root, segment, destination, "plan_journal" in tables)
        except LedgerError:
            continue  # another process converted it at the same moment: its pointer won
        log.warning("ledger converted to member files: %s -> %s, %d members", segment, destination, n)
    with journal.engine.begin() as conn:
        for t in ("members", "pair_versions", "plan_journal"):
            conn.execute(text(f"DROP TABLE IF EXISTS {t}"))
    journal.mark_current_schema()


def _convert_pair(journal: Journal, root: MemberRoot, segment: str, destination: str, has_journal: bool) -> int:
    rows: list[dict[str, Any]] = []
    keys: set[str] = set()
    rejected_rows: list[dict[str, Any]] = []
    params = {"s": segment, "d": destination}
    with journal.engine.connect() as conn:
        result = conn.execute(text(
            "SELECT member_key, payload, prev_payload, consent, state, reason, accepted_at FROM members "
            "WHERE segment = :s AND destination = :d"), params)  # fmt: skip
        for key, payload, prev, consent, state, reason, accepted_at in result:
            k = bytes.fromhex(key[:32])
            p = json.loads(payload) if payload else {}
            c = _consent(consent)
            for old in _owed(prev):
                keys.update(old)
                rows.append({"k": k, "kind": OWED, "p": old, "c": c, "st": TO_SEND, "acc": None})
            if state == "remove_planned":
                keys.update(p)
                rows.append({"k": k, "kind": OWED, "p": p, "c": c, "st": TO_SEND, "acc": None})
                continue
            st = ON if state in _ON else REJECTED if state == "rejected" else MAYBE
            if st == REJECTED:
                rejected_rows.append({"segment": segment, "destination": destination, "run_id": 0,
                                      "member_key": k.hex(), "reason": (reason or "rejected")[:200], "deferred": 0})  # fmt: skip
            keys.update(p)
            rows.append({"k": k, "kind": MEMBER, "p": p, "c": c, "st": st, "acc": _ts(accepted_at) if st == ON else None})
        if has_journal:
            for (body,) in conn.execute(text(
                    "SELECT body FROM plan_journal WHERE segment = :s AND destination = :d ORDER BY seq"), params):  # fmt: skip
                ks, _fps, ps, cs = json.loads(body)
                for key, payload, consent in zip(ks, ps, cs, strict=True):
                    p = json.loads(payload)
                    keys.update(p)
                    rows.append({"k": bytes.fromhex(key[:32]), "kind": MEMBER, "p": p, "c": _consent(consent),
                                 "st": MAYBE, "acc": None})  # fmt: skip
    payload_keys = tuple(sorted(keys))
    schema = member_schema(payload_keys)
    cols: dict[str, list[Any]] = defaultdict(list)
    seen_members: set[bytes] = set()
    skipped = 0
    for r in rows:
        if any(not (pk in CLEAR_KEYS or _is_hex(v)) for pk, v in r["p"].items()):
            skipped += 1  # not what this connector ever wrote (a hash that is not one): nothing to carry over
            continue
        if r["kind"] == MEMBER:
            if r["k"] in seen_members:
                continue
            seen_members.add(r["k"])
        cols["k"].append(r["k"])
        cols["kind"].append(r["kind"])
        cols["fp"].append(None)
        cols["fq"].append(None)
        for pk in payload_keys:
            v = r["p"].get(pk)
            cols[payload_column(pk)].append(v if (v is None or pk in CLEAR_KEYS) else bytes.fromhex(v))
        cols["c"].append(r["c"])
        cols["v"].append(None)  # the old ledger kept no values
        cols["t"].append(None)
        cols["st"].append(r["st"])
        cols["run"].append(None)
        cols["b"].append(None)
        cols["acc"].append(r["acc"])
    if skipped:
        log.warning("%s -> %s: %d ledger rows whose payload is not hashed were not converted", segment, destination,
                    skipped)  # fmt: skip
    files = PairFiles(root, segment, destination)
    name = files.new_name("base", 0)
    files.write(name, pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema))
    journal.move_pair(segment, destination, PairPointer(), name, None, None)
    if rejected_rows:
        with journal.engine.begin() as conn:
            conn.execute(rejected.insert(), rejected_rows)
    return len(seen_members)
