"""The member ledger: what each platform has accepted, per (segment, destination, member).

One SQL implementation (SQLAlchemy Core) serves SQLite (default, a file in `state_dir`) and
PostgreSQL. Only hashes and the unhashed fields platforms require are stored, never raw values.

Member states (``members.state``)::

    planned ──send──> sent ──ack──> accepted ──reconcile──> confirmed
       │                                 └────────────────> rejected(reason)
       └─ deferred (refused for now: retried next run)
    remove_planned ──ack──> (row deleted)

A member whose identifiers changed keeps its old payload in ``prev_payload`` until the removal
of that old payload is acknowledged; then the new payload is added. A `planned` payload may already
be on the platform (a run died after sending it), so a further change owes its removal too:
``prev_payload`` then holds a JSON list of payloads. A payload another member on the platform also
holds is not removed (the pair's index keeps each member's ``payload_hash`` to find them).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import operator
import os
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import SQLAlchemyError

from connector.errors import LedgerError
from connector.identifiers.hashing import hex_of_keys

log = logging.getLogger("connector.ledger")

# a plan is committed in parts of about this many rows (see `apply_plan`)
_PLAN_COMMIT_ROWS = 100_000

# 2: members.payload_hash; 3: indexes of owed removals and expiry; 4: pair_versions; 5: no payload_hash index;
# 6: plan_journal, the expiry index only of members with an expiry; 7: the state index without `confirmed`
SCHEMA_VERSION = 7

# a run's changes are patched into the pair's index snapshot while they touch at most this many
# members (or a quarter of the pair); beyond that the snapshot is read again from the database
_PATCH_MAX_KEYS = 200_000
# CONNECTOR_CHECK_INDEX_SNAPSHOTS=1: every snapshot used or written is compared with the database
# (the test suite and the chaos benchmark run with it)
_CHECK_ENV = "CONNECTOR_CHECK_INDEX_SNAPSHOTS"
_TOUCHED = "connector_touched_pairs"  # Connection.info: pairs whose version this transaction bumped

# States that count as "on the platform, or will be once confirmed".
ON_PLATFORM = ("accepted", "confirmed")
# States whose member still has to be (re-)sent as an add.
TO_ADD = ("planned", "sent", "deferred")

metadata = MetaData()

audiences = Table(
    "audiences",
    metadata,
    Column("segment", String(200), primary_key=True),
    Column("destination", String(200), primary_key=True),
    Column("platform", String(20), nullable=False),
    Column("audience_id", String(200), nullable=False),
    Column("name", String(400), nullable=False),
    Column("extra", Text, nullable=False, default="{}"),
    Column("lookalike_id", String(200)),
    Column("lookalike_state", String(100)),
    Column("lookalike_details", Text),
    Column("last_replace_at", DateTime(timezone=True)),
    Column("last_status", Text),
    Column("last_status_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

members = Table(
    "members",
    metadata,
    Column("segment", String(200), primary_key=True),
    Column("destination", String(200), primary_key=True),
    Column("member_key", String(64), primary_key=True),
    Column("fingerprint", BigInteger, nullable=False),
    Column("payload", Text, nullable=False),
    # 64-bit hash of `payload`: finds other members that send the very same payload
    Column("payload_hash", BigInteger),
    Column("prev_payload", Text),
    Column("consent", String(8), nullable=False, default=""),
    Column("state", String(20), nullable=False),
    Column("reason", String(200)),
    Column("request_id", String(300)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("accepted_at", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True)),
    # (no index on payload_hash: its entries went in at random places, the costliest part of writing
    # a large plan; members sharing a payload are found through the pair's in-memory index instead)
)

# Pending work is found by state without scanning the whole audience. The state index leaves out
# `confirmed` members (most of an audience, in their final state): writing a member in that state, or
# taking it from there and back, touches no entry of it at a random place in a large index. A query on
# another state names that condition too (`_in_state`): SQLite uses a partial index only for a query whose
# WHERE clause has the index's own terms.
_UNSETTLED = members.c.state != "confirmed"
ix_members_state = Index(
    "ix_members_state", members.c.segment, members.c.destination, members.c.state, members.c.member_key,
    sqlite_where=_UNSETTLED, postgresql_where=_UNSETTLED,
)  # fmt: skip


def _in_state(*states: str) -> Any:
    """`state IN states`, as the state index can serve it."""
    cond = members.c.state == states[0] if len(states) == 1 else members.c.state.in_(states)
    return cond if "confirmed" in states else and_(cond, _UNSETTLED)


# members owing removals of old payloads (few): found without walking every `planned` member
ix_members_owed = Index(
    "ix_members_owed", members.c.segment, members.c.destination, members.c.member_key,
    sqlite_where=members.c.prev_payload.is_not(None), postgresql_where=members.c.prev_payload.is_not(None),
)  # fmt: skip
# memberships close to expiry (Google) found without reading the whole audience; members without an
# expiry (every Meta member, Google members not yet accepted) are not in it: nothing to write for them
_EXPIRES = members.c.expires_at.is_not(None)
ix_members_expires = Index(
    "ix_members_expires", members.c.segment, members.c.destination, members.c.expires_at,
    sqlite_where=_EXPIRES, postgresql_where=_EXPIRES,
)  # fmt: skip

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("trigger", String(20), nullable=False),
    Column("segment", String(200), nullable=False),
    Column("destination", String(200), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
    Column("status", String(20), nullable=False),
    Column("dry_run", Integer, nullable=False, default=0),
    Column("counts", Text, nullable=False, default="{}"),
    Column("error", Text),
    Column("match_rate", Float),
)

# Bumped in the same transaction as every change to a pair's members: an index snapshot (a file of
# the pair's keys, fingerprints and state codes) is valid exactly while the version is unchanged.
pair_versions = Table(
    "pair_versions",
    metadata,
    Column("segment", String(200), primary_key=True),
    Column("destination", String(200), primary_key=True),
    Column("version", BigInteger, nullable=False),
)

# New members of a plan (no `members` row yet) wait here, one row per part of the plan, until the
# platform has answered for them: each is then written to `members` once, in its final state (a cold run
# used to insert every new member as `planned`, read it back to send it, and update it when accepted).
# A run that dies in between leaves its parts here, and the next run of the pair (under the pair's lock,
# before it plans) writes their members as `planned`: nothing that may have been sent is forgotten.
plan_journal = Table(
    "plan_journal",
    metadata,
    Column("segment", String(200), primary_key=True),
    Column("destination", String(200), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    # how many of the part's members are not in `members` yet (a part may be sent in smaller batches)
    Column("members", Integer, nullable=False),
    # JSON: [keys, fingerprints, payloads, consents] (payloads are hashed, as in `members`)
    Column("body", Text, nullable=False),
)

meta_table = Table(
    "ledger_meta",
    metadata,
    Column("key", String(100), primary_key=True),
    Column("value", String(200), nullable=False),
)


# a member's state as the index keeps it: 2 on the platform, 1 rejected, 0 anything else
_STATE_CODE = case((members.c.state.in_(ON_PLATFORM), 2), (members.c.state == "rejected", 1), else_=0)


def _state_code(state: str) -> int:
    """`_STATE_CODE` of a state, for rows written from memory."""
    return 2 if state in ON_PLATFORM else 1 if state == "rejected" else 0


_PAYLOAD_HASH = func.coalesce(members.c.payload_hash, 0)

# Pending work, as (state, extra condition) parts: each part is one range of the state index (or of
# the partial index of owed payloads), so finding pending members never scans the whole audience.
# A changed member is `planned` with its old payload kept: both kinds of removal live in two states.
_Parts = tuple[tuple[str, Any], ...]
_OWED = members.c.prev_payload.is_not(None)
_REMOVAL_PARTS: _Parts = (("remove_planned", None), ("planned", _OWED))
_ADD_PARTS: _Parts = tuple((st, members.c.prev_payload.is_(None)) for st in TO_ADD)
_PRESENT_PARTS: _Parts = tuple((st, None) for st in (*ON_PLATFORM, *TO_ADD))


# States whose payload is, or may be, on the platform: a `planned` payload may have been sent by a
# run that died before recording the answer.
MAYBE_ON_PLATFORM = (*ON_PLATFORM, "remove_planned", "planned")


def payload_hash(payload: str) -> int:
    """A signed 64-bit hash of a payload, for the `payload_hash` index."""
    return int.from_bytes(hashlib.blake2b(payload.encode(), digest_size=8).digest(), "big", signed=True)


def payload_hashes(payloads: Sequence[str]) -> list[int]:
    """`payload_hash` of many payloads, in one pass."""
    b2 = hashlib.blake2b
    out: list[int] = np.frombuffer(b"".join([b2(p.encode(), digest_size=8).digest() for p in payloads]), ">i8").tolist()
    return out


def owed_payloads(prev: str | None) -> list[str]:
    """The payloads a member still owes removals for: `prev_payload` holds one payload (a JSON
    object) or, after several interrupted changes, a JSON list of them."""
    if prev is None:
        return []
    if prev.startswith("["):
        return [str(x) for x in json.loads(prev)]
    return [prev]


def encode_owed(payloads: list[str]) -> str | None:
    unique = list(dict.fromkeys(payloads))
    if not unique:
        return None
    return unique[0] if len(unique) == 1 else json.dumps(unique)


# bound values per statement of `insert_rows`: SQLite's limit before 3.32 (newer builds allow 32,766)
_SQLITE_MAX_PARAMS = 999


def insert_rows(execute: Callable[[str, Sequence[Any]], Any], head: str, rows: Sequence[Sequence[Any]]) -> None:
    """Insert `rows` (tuples of one width) on SQLite as `head VALUES (?, ...), (?, ...), ...` statements of up
    to 999 bound values each. The driver's executemany runs its statement once per row: with many rows in a
    statement, 1M rows of the members table took 3.9-4.1 s instead of 5.1 s, and of a plan's spill 0.55 s
    instead of 1.32 s (`benchmarks/floor.py` measures both ways)."""
    if not rows:
        return
    width = len(rows[0])
    per = max(1, _SQLITE_MAX_PARAMS // width)
    one = "(" + ",".join("?" * width) + ")"
    full = f"{head} VALUES {','.join([one] * per)}"
    chain = itertools.chain.from_iterable
    for i in range(0, len(rows), per):
        part = rows[i : i + per]
        execute(full if len(part) == per else f"{head} VALUES {','.join([one] * len(part))}", tuple(chain(part)))


def now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite drops tzinfo; every timestamp we write is UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def key_prefixes(keys: npt.NDArray[np.bytes_]) -> npt.NDArray[np.uint64]:
    """The first 8 bytes of each 16-byte key as a number: numbers sort as the keys do, and
    searching numbers is several times faster than searching 16-byte strings."""
    return _halves(keys)[::2].astype(np.uint64)


def _halves(keys: npt.NDArray[np.bytes_]) -> npt.NDArray[Any]:
    """Each 16-byte key as two big-endian 8-byte numbers, without copying the keys."""
    return np.ascontiguousarray(keys, dtype="S16").view(">u8")


def find_keys(
    sorted_prefixes: npt.NDArray[np.uint64], sorted_keys: npt.NDArray[np.bytes_], keys: npt.NDArray[np.bytes_],
    prefixes: npt.NDArray[np.uint64] | None = None,
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:  # fmt: skip
    """Positions of `keys` in sorted keys (with their prefixes) and whether each is there."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(len(keys), dtype=np.intp), np.zeros(len(keys), dtype=bool)
    pre = key_prefixes(keys) if prefixes is None else prefixes
    order = np.argsort(pre)  # sorted needles: the search walks the index once, in order
    pos = np.empty(len(keys), dtype=np.intp)
    pos[order] = np.searchsorted(sorted_prefixes, pre[order])
    pos = np.minimum(pos, n - 1)
    found = sorted_keys[pos] == keys
    # keys sharing a prefix (a pair in ~10^12 at 10M keys) sit next to each other: walk them
    for i in np.flatnonzero(~found & (sorted_prefixes[pos] == pre)).tolist():
        j = int(pos[i]) + 1
        while j < n and sorted_prefixes[j] == pre[i]:
            if sorted_keys[j] == keys[i]:
                pos[i], found[i] = j, True
                break
            j += 1
    return pos, found


@dataclass(slots=True)
class LedgerIndex:
    """Compact in-memory view of a pair's members for planning: sorted 16-byte keys (and their
    8-byte prefixes, for searching) with fingerprints, a code for the state and the payload's hash.
    About 42 bytes a member (10M members: ~420 MB)."""

    keys: npt.NDArray[np.bytes_]
    fingerprints: npt.NDArray[np.uint64]
    stable: npt.NDArray[np.bool_]  # accepted/confirmed/rejected: nothing to do if unchanged
    on_platform: npt.NDArray[np.bool_]
    payload_hashes: npt.NDArray[np.int64]  # `payload_hash` of each member's payload
    prefixes: npt.NDArray[np.uint64] = field(init=False)
    # payload hashes sorted, with their members' positions: made when first searched
    _by_payload: tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.prefixes = key_prefixes(self.keys)

    @classmethod
    def empty(cls) -> LedgerIndex:
        return cls(
            np.empty(0, dtype="S16"),
            np.empty(0, dtype=np.uint64),
            np.empty(0, dtype=bool),
            np.empty(0, dtype=bool),
            np.empty(0, dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(
        self, keys: npt.NDArray[np.bytes_], prefixes: npt.NDArray[np.uint64] | None = None
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """Positions of `keys` in the index and whether each was found."""
        return find_keys(self.prefixes, self.keys, keys, prefixes)

    def holding(self, hashes: Iterable[int]) -> npt.NDArray[np.intp]:
        """Positions of the members whose payload hash is one of `hashes` (sorted)."""
        if self._by_payload is None:
            by_hash = np.argsort(self.payload_hashes, kind="stable")
            self._by_payload = (self.payload_hashes[by_hash], by_hash.astype(np.int32))
            del by_hash
        sorted_hashes, order = self._by_payload
        wanted = np.unique(np.fromiter(hashes, dtype=np.int64))
        lo = np.searchsorted(sorted_hashes, wanted, side="left")
        hi = np.searchsorted(sorted_hashes, wanted, side="right")
        spans = [order[a:b] for a, b in zip(lo.tolist(), hi.tolist(), strict=True) if b > a]
        return np.sort(np.concatenate(spans)).astype(np.intp) if spans else np.empty(0, dtype=np.intp)

    @classmethod
    def from_codes(
        cls, keys: npt.NDArray[np.bytes_], fps: npt.NDArray[np.uint64], codes: npt.NDArray[np.uint8],
        payload_hashes: npt.NDArray[np.int64],
    ) -> LedgerIndex:  # fmt: skip
        """From state codes: 2 on the platform, 1 rejected, 0 anything else."""
        return cls(keys=keys, fingerprints=fps, stable=codes >= 1, on_platform=codes == 2,
                   payload_hashes=payload_hashes)  # fmt: skip

    def codes(self) -> npt.NDArray[np.uint8]:
        return self.stable.astype(np.uint8) + self.on_platform.astype(np.uint8)

    def same_as(self, other: LedgerIndex) -> bool:
        return (
            len(self) == len(other)
            and self.keys.tobytes() == other.keys.tobytes()
            and bool(np.array_equal(self.fingerprints, other.fingerprints))
            and bool(np.array_equal(self.codes(), other.codes()))
            and bool(np.array_equal(self.payload_hashes, other.payload_hashes))
        )

    def patched(
        self, dirty: npt.NDArray[np.bytes_], keys: npt.NDArray[np.bytes_], fps: npt.NDArray[np.uint64],
        codes: npt.NDArray[np.uint8], payload_hashes: npt.NDArray[np.int64],
    ) -> LedgerIndex:  # fmt: skip
        """This index with the `dirty` keys replaced by the rows now in the database (`keys`,
        which are dirty keys still there, with their fingerprints, codes and payload hashes).

        Members still there are updated in place (this index is then returned); only members who
        joined or left make new arrays, built one at a time so a 10M-member index is not copied
        several times over at once."""
        order = np.lexsort((_key_suffixes(keys), key_prefixes(keys)))  # exact 16-byte order
        keys, fps, codes, phs = keys[order], fps[order], codes[order], payload_hashes[order]
        pre = key_prefixes(keys)
        pos, known = self.lookup(keys, pre)
        self._by_payload = None
        self.payload_hashes = np.require(self.payload_hashes, requirements="W")
        self.payload_hashes[pos[known]] = phs[known]
        self.fingerprints = np.require(self.fingerprints, requirements="W")
        self.stable, self.on_platform = np.require(self.stable, requirements="W"), np.require(
            self.on_platform, requirements="W"
        )
        self.fingerprints[pos[known]] = fps[known]
        self.stable[pos[known]] = codes[known] >= 1
        self.on_platform[pos[known]] = codes[known] == 2
        dpos, dfound = self.lookup(dirty)
        _, still = find_keys(pre, keys, dirty)
        gone = np.unique(dpos[dfound & ~still])
        joined = ~known
        if not len(gone) and not joined.any():
            return self
        keep = np.ones(len(self), dtype=bool)
        keep[gone] = False
        keys, fps, codes, phs, pre = keys[joined], fps[joined], codes[joined], phs[joined], pre[joined]
        kept_pre = self.prefixes[keep]
        at = np.searchsorted(kept_pre, pre)
        n = len(kept_pre)
        # keys sharing an 8-byte prefix with a kept key (about never): place them by all 16 bytes
        ties = np.flatnonzero((at < n) & (kept_pre[np.minimum(at, n - 1)] == pre)) if n else np.empty(0, np.intp)
        if len(ties):
            kept = np.flatnonzero(keep)
            for i in ties.tolist():
                j, key = int(at[i]), keys[i].ljust(16, b"\0")
                while j < n and kept_pre[j] == pre[i] and self.keys[kept[j]].ljust(16, b"\0") < key:
                    j += 1
                at[i] = j
        del kept_pre
        new_keys = np.insert(self.keys[keep], at, keys)
        new_fps = np.insert(self.fingerprints[keep], at, fps)
        new_codes = np.insert(self.codes()[keep], at, codes)
        new_phs = np.insert(self.payload_hashes[keep], at, phs)
        return LedgerIndex.from_codes(new_keys, new_fps, new_codes, new_phs)


def _patch(base: LedgerIndex, dirty: npt.NDArray[np.bytes_], read: _IndexRows, written: list[_IndexRows]) -> LedgerIndex:
    """`base` with the members this process changed: `read` (the `dirty` keys still in the database,
    as read back) and `written` (inserted, as recorded then; a key changed again since is dirty, and
    its row as read wins)."""
    if written:
        parts = list(zip(*written, strict=True))
        written.clear()
        keys, fps, codes, phs = (np.concatenate(p) for p in parts)
        del parts
        if len(dirty):
            _, again = find_keys(key_prefixes(dirty), dirty, keys)
            keys, fps, codes, phs = keys[~again], fps[~again], codes[~again], phs[~again]
        if not len(base) and not len(read[0]):
            # a first run: the index is what it inserted, in key order
            if len(keys) > 1 and not bool(np.all(keys[1:] > keys[:-1])):
                order = np.argsort(keys, kind="stable")
                keys, fps, codes, phs = keys[order], fps[order], codes[order], phs[order]
            return LedgerIndex.from_codes(keys, fps, codes, phs)
        read = (
            np.concatenate([read[0], keys]), np.concatenate([read[1], fps]),
            np.concatenate([read[2], codes]), np.concatenate([read[3], phs]),
        )  # fmt: skip
    return base.patched(dirty, *read)


def _key_suffixes(keys: npt.NDArray[np.bytes_]) -> npt.NDArray[np.uint64]:
    return _halves(keys)[1::2].astype(np.uint64)


def hex_keys(keys: Sequence[str]) -> npt.NDArray[np.bytes_]:
    """Ledger keys (hex) as the index's 16-byte keys."""
    if not keys:
        return np.empty(0, dtype="S16")
    return np.frombuffer(bytes.fromhex("".join([k[:32] for k in keys])), dtype="S16")


_IndexRows = tuple[npt.NDArray[np.bytes_], npt.NDArray[np.uint64], npt.NDArray[np.uint8], npt.NDArray[np.int64]]


@dataclass(slots=True)
class _Tracked:
    """A pair's index as loaded, and what this process changed since (see `SqlLedger.save_index`)."""

    base: LedgerIndex
    version: int
    own: int = 0  # versions this process added
    dirty: set[str] | None = field(default_factory=set)  # keys changed; None: too many to patch
    # members this process inserted, as the index holds them (keys, fingerprints, state codes, payload
    # hashes): patched in without being read back, unless changed again later (then in `dirty`)
    written: list[_IndexRows] = field(default_factory=list)


@dataclass(slots=True)
class StagedMember:
    """A member to (re-)add, as planned: its new payload (JSON) and raw-row fingerprint."""

    key: str
    fingerprint: int
    payload: str
    consent: str = ""
    known: bool = True  # False: the planner saw no ledger row for this key (skip the lookup)


@dataclass(slots=True)
class PendingMember:
    key: str
    payload: str
    consent: str
    prev_payload: str | None
    # a new member still in the plan journal (no `members` row yet): its part, its fingerprint, and
    # whether it is the part's last member (the part is deleted when that one is committed)
    fresh: tuple[int, int, bool] | None = None


# new members of a plan, column-wise: keys, fingerprints (unsigned), payloads, consents
NewColumns = tuple[list[str], list[int], list[str], list[str]]


def _columns(part: Sequence[StagedMember]) -> NewColumns:
    return [m.key for m in part], [m.fingerprint for m in part], [m.payload for m in part], [m.consent for m in part]


def _encode_part(part: NewColumns) -> str:
    return json.dumps(part, separators=(",", ":"))


def _decode_part(body: str) -> NewColumns:
    """A journal part as (keys, fingerprints, payloads, consents)."""
    ks, fps, ps, cs = json.loads(body)
    if not len(ks) == len(fps) == len(ps) == len(cs):
        raise LedgerError("a plan journal part is damaged (its columns differ in length)")
    return ks, fps, ps, cs


@dataclass(slots=True)
class RunRecord:
    id: int
    trigger: str
    segment: str
    destination: str
    started_at: datetime
    ended_at: datetime | None
    status: str
    dry_run: bool
    counts: dict[str, Any]
    error: str | None
    match_rate: float | None = None


@dataclass(slots=True)
class AudienceRecord:
    segment: str
    destination: str
    platform: str
    audience_id: str
    name: str
    extra: dict[str, str]
    lookalike_id: str | None
    lookalike_state: str | None
    lookalike_details: dict[str, str]
    last_replace_at: datetime | None
    last_status: dict[str, Any] = field(default_factory=dict)
    last_status_at: datetime | None = None


def _fp_to_db(fp: int) -> int:
    # Fingerprints are unsigned 64-bit; BIGINT is signed.
    return fp - (1 << 64) if fp >= (1 << 63) else fp


def _planned_row(
    segment: str, destination: str, key: str, fp: int, payload: str, consent: str, ts_bound: Any
) -> tuple[Any, ...]:
    """A new `planned` member as `SqlLedger._insert_new` takes it (`_NEW_COLUMNS` order)."""
    return (segment, destination, key, _fp_to_db(fp), payload, payload_hash(payload), consent, "planned", ts_bound)


class SqlLedger:
    """The ledger on any SQLAlchemy database (SQLite file by default, PostgreSQL)."""

    def __init__(self, url: str, index_dir: Path | None = None) -> None:
        self.url = url
        # where index snapshots are kept (None: every run reads its pairs' indexes from the database)
        self.index_dir = index_dir
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        self._check = os.environ.get(_CHECK_ENV) == "1"
        self.index_reads = 0  # pair indexes read whole from the database (not from a snapshot)
        self.ledger_id = ""
        try:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, future=True)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "commit", self._committed)
            event.listen(self.engine, "rollback", self._rolled_back)
            create_tables(metadata, self.engine)
            for attempt in range(3):  # another process may be migrating the same database right now
                try:
                    self._check_version()
                    break
                except SQLAlchemyError:
                    if attempt == 2:
                        raise
                    time.sleep(0.2 * (attempt + 1))
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot open the ledger database ({type(exc).__name__})") from None
        self._lock = threading.Lock()

    def _check_version(self) -> None:
        with self.engine.begin() as conn:
            # names this database: a snapshot written for another ledger (or for a database that was
            # deleted and created again, whose versions start over) never matches
            row = conn.execute(select(meta_table.c.value).where(meta_table.c.key == "ledger_id")).first()
            if row is None:
                self.ledger_id = uuid.uuid4().hex
                conn.execute(insert(meta_table).values(key="ledger_id", value=self.ledger_id))
            else:
                self.ledger_id = str(row[0])
            row = conn.execute(select(meta_table.c.value).where(meta_table.c.key == "schema")).first()
            if row is None:
                conn.execute(insert(meta_table).values(key="schema", value=str(SCHEMA_VERSION)))
            elif int(row[0]) > SCHEMA_VERSION:
                raise LedgerError(
                    f"the ledger was written by a newer connector (schema {row[0]} > {SCHEMA_VERSION})"
                )
            elif int(row[0]) < SCHEMA_VERSION:
                if int(row[0]) < 2:
                    self._migrate_to_2(conn)
                if int(row[0]) < 6:  # 6: the expiry index holds only memberships that expire
                    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_members_expires")
                if int(row[0]) < 7:  # 7: the state index leaves `confirmed` members out
                    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_members_state")
                for ix in (ix_members_owed, ix_members_expires, ix_members_state):  # 3: new indexes only
                    ix.create(conn, checkfirst=True)
                # 4: pair_versions (a new table, created above); the schema number keeps older
                # connectors, which would change members without bumping versions, out
                # 5: the payload_hash index goes (older connectors relied on it: kept out too)
                conn.exec_driver_sql("DROP INDEX IF EXISTS ix_members_payload")
                conn.execute(
                    update(meta_table).where(meta_table.c.key == "schema").values(value=str(SCHEMA_VERSION))
                )

    @staticmethod
    def _migrate_to_2(conn: Any) -> None:
        """Schema 1 -> 2: add and fill members.payload_hash."""
        columns = {c["name"] for c in inspect(conn).get_columns("members")}
        if "payload_hash" not in columns:
            conn.exec_driver_sql("ALTER TABLE members ADD COLUMN payload_hash BIGINT")
        pk = (members.c.segment, members.c.destination, members.c.member_key)
        todo = conn.execute(select(*pk, members.c.payload).where(members.c.payload_hash.is_(None))).all()
        for i in range(0, len(todo), 10_000):
            conn.execute(
                update(members)
                .where(members.c.segment == bindparam("s"), members.c.destination == bindparam("d"),
                       members.c.member_key == bindparam("k"))
                .values(payload_hash=bindparam("h")),
                [{"s": s, "d": d, "k": k, "h": payload_hash(p)} for s, d, k, p in todo[i : i + 10_000]],
            )  # fmt: skip

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ audiences

    def get_audience(self, segment: str, destination: str) -> AudienceRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(audiences).where(
                    audiences.c.segment == segment, audiences.c.destination == destination
                )
            ).first()
        if row is None:
            return None
        m = row._mapping
        return AudienceRecord(
            segment=m["segment"],
            destination=m["destination"],
            platform=m["platform"],
            audience_id=m["audience_id"],
            name=m["name"],
            extra=json.loads(m["extra"] or "{}"),
            lookalike_id=m["lookalike_id"],
            lookalike_state=m["lookalike_state"],
            lookalike_details=json.loads(m["lookalike_details"] or "{}"),
            last_replace_at=_aware(m["last_replace_at"]),
            last_status=json.loads(m["last_status"] or "{}"),
            last_status_at=_aware(m["last_status_at"]),
        )

    def list_audiences(self) -> list[AudienceRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(audiences.c.segment, audiences.c.destination)).all()
        out = [self.get_audience(r[0], r[1]) for r in rows]
        return [a for a in out if a is not None]

    def save_audience(
        self, segment: str, destination: str, platform: str, audience_id: str, name: str,
        extra: dict[str, str],
    ) -> None:
        values = {
            "platform": platform, "audience_id": audience_id, "name": name,
            "extra": json.dumps(extra, sort_keys=True), "updated_at": now(),
        }  # fmt: skip
        with self.engine.begin() as conn:
            done = conn.execute(
                update(audiences)
                .where(audiences.c.segment == segment, audiences.c.destination == destination)
                .values(**values)
            ).rowcount
            if not done:
                conn.execute(insert(audiences).values(segment=segment, destination=destination, **values))

    def update_audience(self, segment: str, destination: str, **values: Any) -> None:
        for k in ("lookalike_details", "last_status"):
            if k in values and not isinstance(values[k], str):
                values[k] = json.dumps(values[k], sort_keys=True)
        with self.engine.begin() as conn:
            conn.execute(
                update(audiences)
                .where(audiences.c.segment == segment, audiences.c.destination == destination)
                .values(updated_at=now(), **values)
            )

    # ------------------------------------------------------------------ planning

    @staticmethod
    def _key_in(conn: Any, keys: Sequence[str]) -> Any:
        """`member_key IN keys` as one bound value (a JSON array on SQLite, an array on PostgreSQL):
        one statement for a whole batch, without thousands of bound parameters."""
        if conn.dialect.name == "sqlite":
            each = func.json_each(bindparam("keys_json", json.dumps(list(keys)))).table_valued("value")
            return members.c.member_key.in_(select(each.c.value))
        if conn.dialect.name == "postgresql":
            return members.c.member_key == any_(bindparam("keys_arr", list(keys), type_=ARRAY(String)))
        return members.c.member_key.in_(list(keys))

    _NEW_COLUMNS = ("segment", "destination", "member_key", "fingerprint", "payload", "payload_hash", "consent",
                    "state", "updated_at")  # fmt: skip

    def _insert_new(self, conn: Any, rows: list[tuple[Any, ...]], cols: Sequence[str] = _NEW_COLUMNS) -> None:
        """Bulk insert of new members (tuples in `cols` order, timestamps already bound) straight through
        the driver (SQLAlchemy's per-row parameter processing dominated cold runs): on SQLite many rows a
        statement (`insert_rows`), elsewhere the driver's executemany (psycopg pipelines it)."""
        if conn.dialect.name == "sqlite":
            insert_rows(conn.exec_driver_sql, f"INSERT INTO members ({', '.join(cols)})", rows)
            return
        stmt = insert(members).compile(dialect=conn.dialect, column_keys=list(cols))
        if stmt.positional:
            order = [cols.index(k) for k in (stmt.positiontup or [])]
            if order != list(range(len(cols))):
                rows = list(map(operator.itemgetter(*order), rows))
            conn.exec_driver_sql(str(stmt), rows)
        else:
            conn.exec_driver_sql(str(stmt), [dict(zip(cols, r, strict=True)) for r in rows])

    def _pair(self, segment: str, destination: str) -> Any:
        return and_(members.c.segment == segment, members.c.destination == destination)

    def _stream(self, conn: Any, stmt: Any, size: int = 100_000) -> Iterator[list[tuple[Any, ...]]]:
        """Rows of a SELECT in lists of `size`, as plain driver tuples. SQLite: the driver cursor
        itself (SQLAlchemy's per-row processing cost as much as the query on large audiences);
        other databases: a server-side cursor, so millions of rows are never held at once."""
        if conn.dialect.name != "sqlite":
            result = conn.execution_options(stream_results=True, yield_per=size).execute(stmt)
            for part in result.partitions():
                yield [tuple(r) for r in part]
            return
        compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
        params = compiled.construct_params()
        args = tuple(params[k] for k in (compiled.positiontup or []))
        cur = conn.connection.driver_connection.cursor()
        try:
            cur.execute(str(compiled), args)
            while rows := cur.fetchmany(size):
                yield rows
        finally:
            cur.close()

    # ------------------------------------------------------------------ index snapshots

    def _version(self, conn: Any, segment: str, destination: str) -> int:
        v = conn.execute(
            select(pair_versions.c.version).where(
                pair_versions.c.segment == segment, pair_versions.c.destination == destination
            )
        ).scalar()
        return int(v or 0)

    def _touch(
        self, conn: Any, segment: str, destination: str, keys: Iterable[str] | None, written: _IndexRows | None = None
    ) -> None:
        """Record, in the transaction that changes them, that these members of the pair changed
        (None: any number of them). Every change to `members` goes through here. `written`: members
        inserted with these index values (their keys need not be among `keys`)."""
        values = {"segment": segment, "destination": destination, "version": 1}
        name = conn.dialect.name
        if name in ("sqlite", "postgresql"):
            ins = (sqlite.insert if name == "sqlite" else postgresql.insert)(pair_versions).values(**values)
            conn.execute(ins.on_conflict_do_update(
                index_elements=[pair_versions.c.segment, pair_versions.c.destination],
                set_={"version": pair_versions.c.version + 1},
            ))  # fmt: skip
        elif not conn.execute(
            update(pair_versions)
            .where(pair_versions.c.segment == segment, pair_versions.c.destination == destination)
            .values(version=pair_versions.c.version + 1)
        ).rowcount:
            conn.execute(insert(pair_versions).values(**values))
        t = self._tracked.get((segment, destination))
        if t is None:
            return
        conn.info.setdefault(_TOUCHED, set()).add((segment, destination))
        t.own += 1
        if t.dirty is not None:
            if keys is None:
                t.dirty = None
            else:
                t.dirty.update(keys)
                if len(t.dirty) > max(_PATCH_MAX_KEYS, len(t.base) // 4):
                    t.dirty = None
        if t.dirty is None:
            t.written = []
        elif written is not None and len(written[0]):
            t.written.append(written)

    def _committed(self, conn: Any) -> None:
        conn.info.pop(_TOUCHED, None)

    def _rolled_back(self, conn: Any) -> None:
        """A transaction that bumped versions was rolled back: its bumps are counted in `own` but
        never happened, so own changes no longer explain the version: read those pairs again."""
        for pair in conn.info.pop(_TOUCHED, ()):
            t = self._tracked.get(pair)
            if t is not None:
                t.dirty, t.written = None, []

    def _snapshot_path(self, segment: str, destination: str) -> Path | None:
        if self.index_dir is None:
            return None
        name = hashlib.sha256(f"{self.ledger_id}\x1f{segment}\x1f{destination}".encode()).hexdigest()[:32]
        return self.index_dir / f"{name}.npz"

    def _read_snapshot(self, segment: str, destination: str, version: int) -> LedgerIndex | None:
        path = self._snapshot_path(segment, destination)
        if path is None or not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"][0]) != version:
                    return None
                keys, fps, codes, phs = z["keys"], z["fingerprints"], z["codes"], z["payload_hashes"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None  # unreadable, half-written by a crashed process, or older: read the database
        if keys.dtype != np.dtype("S16") or fps.dtype != np.uint64 or phs.dtype != np.int64:
            return None
        if not len(keys) == len(fps) == len(codes) == len(phs):
            return None
        return LedgerIndex.from_codes(keys, fps, codes.astype(np.uint8), phs)

    def _write_snapshot(self, segment: str, destination: str, version: int, index: LedgerIndex) -> None:
        path = self._snapshot_path(segment, destination)
        if path is None:
            return
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                np.savez(f, version=np.array([version], dtype=np.int64), keys=index.keys,
                         fingerprints=index.fingerprints, codes=index.codes(),
                         payload_hashes=index.payload_hashes)  # fmt: skip
            os.replace(tmp, path)
        except OSError as exc:  # a cache: the ledger itself is intact
            log.warning("could not write the index snapshot of %s -> %s (%s)", segment, destination, exc.strerror)
            tmp.unlink(missing_ok=True)

    def _checked(self, segment: str, destination: str, index: LedgerIndex, what: str) -> None:
        if self._check and not index.same_as(self._read_index(segment, destination, checking=True)):
            raise LedgerError(f"index snapshot of {segment} -> {destination} differs from the ledger ({what})")

    def open_index(self, segment: str, destination: str) -> None:
        """Start following the pair's changes from its snapshot, before a run changes anything
        (reconciling earlier requests, planning re-sends): `load_index` then patches them in."""
        self._current(segment, destination)

    def load_index(self, segment: str, destination: str) -> LedgerIndex:
        """Every member of the pair, sorted by key, as compact arrays: from the pair's snapshot
        (with this process's changes since patched in) when nobody else changed the pair since the
        snapshot was written, else from the database (and a new snapshot is written)."""
        index = self._current(segment, destination)
        if index is not None:
            return index
        with self.engine.connect() as conn:
            version = self._version(conn, segment, destination)
        index = self._read_index(segment, destination)
        with self.engine.connect() as conn:
            stable = self._version(conn, segment, destination) == version
        if stable:
            self._write_snapshot(segment, destination, version, index)
            self._tracked[(segment, destination)] = _Tracked(index, version)
        else:  # changed while it was read: no snapshot
            self._tracked.pop((segment, destination), None)
        return index

    def save_index(self, segment: str, destination: str) -> None:
        """After a run: bring the pair's snapshot up to date (patched when the run changed few
        members, else read again) and stop following the pair."""
        if self.index_dir is not None and (segment, destination) in self._tracked:
            if self._current(segment, destination) is None:
                self.load_index(segment, destination)
        self._tracked.pop((segment, destination), None)

    def _current(self, segment: str, destination: str) -> LedgerIndex | None:
        """The pair's index as it is now, without reading the whole pair, or None."""
        if self.index_dir is None:
            return None
        pair = (segment, destination)
        with self.engine.connect() as conn:
            version = self._version(conn, segment, destination)
        t = self._tracked.get(pair)
        if t is None or (t.version != version and (t.dirty is None or version != t.version + t.own)):
            # nothing followed, or changed by someone else (or too much): the snapshot, if current
            self._tracked.pop(pair, None)
            snap = self._read_snapshot(segment, destination, version)
            if snap is None:
                return None
            self._checked(segment, destination, snap, "read")
            self._tracked[pair] = _Tracked(snap, version)
            return snap
        if t.version == version:
            return t.base
        assert t.dirty is not None
        dirty = sorted(t.dirty)
        rows: list[tuple[Any, ...]] = []
        with self.engine.connect() as conn:
            for i in range(0, len(dirty), 10_000):
                chunk = dirty[i : i + 10_000]
                rows.extend(conn.execute(
                    select(members.c.member_key, members.c.fingerprint, _STATE_CODE, _PAYLOAD_HASH)
                    .where(self._pair(segment, destination), self._key_in(conn, chunk))
                ).all())  # fmt: skip
            if self._version(conn, segment, destination) != version:
                self._tracked.pop(pair, None)  # changed while read
                return None
        read: _IndexRows = (
            hex_keys([r[0] for r in rows]),
            np.array([r[1] for r in rows], dtype=np.int64).view(np.uint64),
            np.array([r[2] for r in rows], dtype=np.uint8),
            np.array([r[3] for r in rows], dtype=np.int64),
        )
        index = _patch(t.base, hex_keys(dirty), read, t.written)
        t.written = []
        self._checked(segment, destination, index, "patched")
        self._write_snapshot(segment, destination, version, index)
        self._tracked[pair] = _Tracked(index, version)
        return index

    def _read_index(self, segment: str, destination: str, checking: bool = False) -> LedgerIndex:
        """The pair's index from the database: read in key order through the primary key (rows were
        written in key order, so this reads the table front to back), with the state reduced to a
        small number in SQL."""
        self.index_reads += 0 if checking else 1
        key_parts: list[bytes] = []
        fp_parts: list[npt.NDArray[np.uint64]] = []
        code_parts: list[npt.NDArray[np.uint8]] = []
        ph_parts: list[npt.NDArray[np.int64]] = []
        with self.engine.connect() as conn:
            stmt = (
                select(members.c.member_key, members.c.fingerprint, _STATE_CODE, _PAYLOAD_HASH)
                .where(self._pair(segment, destination))
                .order_by(members.c.member_key)
            )
            for rows in self._stream(conn, stmt):
                ks, fs, cs, phs = zip(*rows, strict=True)
                # keys are 64 hex digits; the index keeps their first 16 bytes
                key_parts.append(bytes.fromhex("".join([k[:32] for k in ks])))
                fp_parts.append(np.array(fs, dtype=np.int64).view(np.uint64))
                code_parts.append(np.array(cs, dtype=np.uint8))
                ph_parts.append(np.array(phs, dtype=np.int64))
        if not key_parts:
            return LedgerIndex.empty()
        karr = np.frombuffer(b"".join(key_parts), dtype="S16")
        fps, codes, ph = np.concatenate(fp_parts), np.concatenate(code_parts), np.concatenate(ph_parts)
        if not bool(np.all(karr[1:] >= karr[:-1])):  # a database collation that orders hex differently
            order = np.argsort(karr, kind="stable")
            karr, fps, codes, ph = karr[order], fps[order], codes[order], ph[order]
        return LedgerIndex.from_codes(karr, fps, codes, ph)

    def payloads(self, segment: str, destination: str, keys: Sequence[str]) -> dict[str, tuple[str, str]]:
        """member_key -> (payload, state) for the given keys."""
        out: dict[str, tuple[str, str]] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(keys), 900):
                chunk = list(keys[i : i + 900])
                rows = conn.execute(
                    select(members.c.member_key, members.c.payload, members.c.state).where(
                        self._pair(segment, destination), members.c.member_key.in_(chunk)
                    )
                )
                for k, p, s in rows:
                    out[k] = (p, s)
        return out

    def apply_plan(
        self,
        segment: str,
        destination: str,
        staged: Iterator[Sequence[StagedMember]],
        remove_keys: Iterator[Sequence[str]],
        refresh_keys: Sequence[tuple[str, int]] = (),
        keep_removals: bool = True,
        journal: bool = False,
        new: Iterable[NewColumns] = (),
    ) -> None:
        """Write a plan: staged members become `planned` (keeping the old payload for removal when
        it changed), removed members `remove_planned`, and members whose raw row changed but whose
        payload did not just get their new fingerprint. `new`: members the planner found no ledger row
        for, column-wise in parts (a cold run's millions, without an object each). With `journal`,
        staged members the ledger has no row for, and `new` ones, go to the plan journal instead, one
        part per chunk (see `plan_journal`): the push then inserts each of them once, in its final state.

        Committed every `_PLAN_COMMIT_ROWS` rows, not in one transaction (a 10M-member plan grew
        SQLite's write-ahead log by gigabytes): a crash in between leaves some members planned and
        others as they were, which the next run handles like any interrupted run (planned members
        are re-planned, and a payload they may have sent is owed for removal)."""
        ts = now()
        with self.engine.connect() as conn:
            ts_bound = self._bound_time(conn, ts)
            written = 0
            seq = self._last_part(conn, segment, destination) if journal else 0

            def wrote(n: int) -> None:
                nonlocal written
                written += n
                if written >= _PLAN_COMMIT_ROWS:
                    conn.commit()
                    written = 0

            def write_new(part: NewColumns) -> None:
                nonlocal seq
                if not part[0]:
                    return
                if journal:
                    seq += 1
                    conn.execute(insert(plan_journal).values(
                        segment=segment, destination=destination, seq=seq, members=len(part[0]), body=_encode_part(part),
                    ))  # fmt: skip
                    return
                self._insert_new(conn, [
                    _planned_row(segment, destination, k, fp, p, c, ts_bound) for k, fp, p, c in zip(*part, strict=True)
                ])  # fmt: skip
                self._touch(conn, segment, destination, part[0])

            for chunk in staged:
                if not chunk:
                    continue
                wrote(len(chunk))
                existing: dict[str, tuple[str, str, str | None]] = {}
                keys = [m.key for m in chunk if m.known]
                for i in range(0, len(keys), 900):
                    for k, p, st, prev in conn.execute(
                        select(
                            members.c.member_key, members.c.payload, members.c.state,
                            members.c.prev_payload,
                        ).where(self._pair(segment, destination), members.c.member_key.in_(keys[i : i + 900]))
                    ):  # fmt: skip
                        existing[k] = (p, st, prev)
                fresh: list[StagedMember] = []
                changed: list[dict[str, Any]] = []
                for m in chunk:
                    old = existing.get(m.key)
                    if old is None:
                        fresh.append(m)
                        continue
                    payload, state, prev = old
                    owed = owed_payloads(prev)  # removals still owed from an earlier interrupted change
                    if state in MAYBE_ON_PLATFORM:
                        # on the platform, or may be: a `planned` payload was perhaps sent by a run that
                        # died before it could record the answer. Removing a non-member is harmless.
                        owed.append(payload)
                    prev_payload = encode_owed([x for x in owed if x != m.payload]) if keep_removals else None
                    changed.append({
                        "k": m.key, "fingerprint": _fp_to_db(m.fingerprint), "payload": m.payload,
                        "payload_hash": payload_hash(m.payload),
                        "prev_payload": prev_payload, "consent": m.consent,
                    })  # fmt: skip
                if changed:
                    # one statement, many parameter sets: executemany in the driver
                    conn.execute(
                        update(members)
                        .where(self._pair(segment, destination), members.c.member_key == bindparam("k"))
                        .values(state="planned", reason=None, updated_at=ts),
                        changed,
                    )
                    self._touch(conn, segment, destination, [c["k"] for c in changed])
                write_new(_columns(fresh))
            for part in new:
                wrote(len(part[0]))
                write_new(part)
            for rchunk in remove_keys:
                if rchunk:
                    wrote(len(rchunk))
                    conn.execute(
                        update(members)
                        .where(self._pair(segment, destination), members.c.member_key.in_(list(rchunk)))
                        .values(state="remove_planned", updated_at=ts)
                    )
                    self._touch(conn, segment, destination, rchunk)
            if refresh_keys:
                conn.execute(
                    update(members)
                    .where(self._pair(segment, destination), members.c.member_key == bindparam("k"))
                    .values(updated_at=ts),
                    [{"k": k, "fingerprint": _fp_to_db(fp)} for k, fp in refresh_keys],
                )
                self._touch(conn, segment, destination, [k for k, _ in refresh_keys])
            conn.commit()

    @staticmethod
    def _bound_time(conn: Any, ts: datetime) -> Any:
        """`ts` as the driver takes it (for rows written straight through the driver's executemany)."""
        bind_ts = members.c.updated_at.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
        return bind_ts(ts) if bind_ts else ts

    @staticmethod
    def _journal_of(segment: str, destination: str) -> Any:
        return and_(plan_journal.c.segment == segment, plan_journal.c.destination == destination)

    def _last_part(self, conn: Any, segment: str, destination: str) -> int:
        last = conn.execute(select(func.max(plan_journal.c.seq)).where(self._journal_of(segment, destination)))
        return int(last.scalar() or 0)

    def _journal_size(self, conn: Any, segment: str, destination: str) -> int:
        n = conn.execute(select(func.sum(plan_journal.c.members)).where(self._journal_of(segment, destination)))
        return int(n.scalar() or 0)

    def _iter_journal(
        self, segment: str, destination: str
    ) -> Iterator[tuple[int, NewColumns]]:
        """The pair's plan parts still in the journal, in order, one at a time."""
        last = -1
        while True:
            with self.engine.connect() as conn:
                row = conn.execute(
                    select(plan_journal.c.seq, plan_journal.c.body)
                    .where(self._journal_of(segment, destination), plan_journal.c.seq > last)
                    .order_by(plan_journal.c.seq)
                    .limit(1)
                ).first()
            if row is None:
                return
            last = int(row[0])
            yield last, _decode_part(row[1])

    def recover_journal(self, segment: str, destination: str) -> int:
        """Parts of a plan that a run left in the journal (it died or was stopped before the
        platform answered for them): their members become `planned`, so they are sent again and,
        should they leave the segment first, removed. Members of a part already committed (a part
        is sent in more than one batch when the platform's batches are smaller) are kept as they
        are. Returns how many members were planned."""
        n = 0
        for seq, (keys, fps, payloads, consents) in self._iter_journal(segment, destination):
            with self.engine.begin() as conn:
                present = set(conn.execute(
                    select(members.c.member_key).where(self._pair(segment, destination), self._key_in(conn, keys))
                ).scalars())  # fmt: skip
                ts_bound = self._bound_time(conn, now())
                rows = [
                    _planned_row(segment, destination, k, fp, p, c, ts_bound)
                    for k, fp, p, c in zip(keys, fps, payloads, consents, strict=True) if k not in present
                ]  # fmt: skip
                if rows:
                    self._insert_new(conn, rows)
                    self._touch(conn, segment, destination, [r[2] for r in rows])
                conn.execute(delete(plan_journal).where(self._journal_of(segment, destination), plan_journal.c.seq == seq))
                n += len(rows)
        return n

    def pending_counts(self, segment: str, destination: str) -> tuple[int, int]:
        """(payloads to remove, members to add) waiting to be pushed."""
        pair = self._pair(segment, destination)
        with self.engine.connect() as conn:
            n_remove = sum(
                conn.execute(self._part(select(func.count()).select_from(members).where(pair), st, extra)).scalar_one()
                for st, extra in _REMOVAL_PARTS
            )
            n_add = sum(
                conn.execute(select(func.count()).where(pair, _in_state(st))).scalar_one() for st in TO_ADD
            )
            n_add += self._journal_size(conn, segment, destination)
        return int(n_remove), int(n_add)

    def mark_for_resend(self, segment: str, destination: str, before: datetime) -> int:
        """Members whose platform membership expires before `before` are planned again."""
        due = (
            self._pair(segment, destination),
            members.c.state.in_(ON_PLATFORM),
            _EXPIRES,
            members.c.expires_at < before,
        )
        with self.engine.begin() as conn:
            keys = conn.execute(select(members.c.member_key).where(*due)).scalars().all()
            if not keys:
                return 0
            n = int(conn.execute(update(members).where(*due).values(state="planned", updated_at=now())).rowcount)
            self._touch(conn, segment, destination, keys)
            return n

    def plan_full_refresh(self, segment: str, destination: str) -> None:
        """Everything that should be on the platform is planned again (replace)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(members)
                .where(self._pair(segment, destination), members.c.state.in_((*ON_PLATFORM, *TO_ADD)))
                .values(state="planned", updated_at=now())
            )
            self._touch(conn, segment, destination, None)

    # ------------------------------------------------------------------ pushing

    @staticmethod
    def _part(stmt: Any, state: str, extra: Any) -> Any:
        """One part of pending work: a state, and an extra condition. Owed removals are read through
        their partial index (SQLite would otherwise walk every `planned` member to find the few)."""
        if extra is _OWED:
            # only `planned` members owe old payloads (a `remove_planned` one is the other part); no
            # equality on the state, or SQLite's planner picks the state index
            return stmt.where(_OWED, members.c.state != "remove_planned")
        stmt = stmt.where(_in_state(state))
        return stmt if extra is None else stmt.where(extra)

    def _iter_pending(
        self, segment: str, destination: str, parts: _Parts, batch: int, cols: Sequence[Any]
    ) -> Iterator[list[Any]]:
        """Pending members in key order, `batch` at a time. One sub-query per part, each an ordered
        range of an index, merged by the database: a single `state IN (...)` query made SQLite walk
        the primary key (for the ORDER BY) through every member of the pair."""
        last = ""
        while True:
            subs = [
                self._part(
                    select(members.c.member_key, *cols).where(
                        self._pair(segment, destination), members.c.member_key > last
                    ),
                    st, extra,
                )
                .order_by(members.c.member_key)
                .limit(batch)
                .subquery()
                for st, extra in parts
            ]  # fmt: skip
            merged = union_all(*(select(sq) for sq in subs)).subquery()
            with self.engine.connect() as conn:
                rows = conn.execute(select(merged).order_by(merged.c.member_key).limit(batch)).all()
            if not rows:
                return
            yield list(rows)
            last = rows[-1][0]

    def iter_removals(
        self, segment: str, destination: str, batch: int, index: LedgerIndex | None = None
    ) -> Iterator[list[PendingMember]]:
        """Payloads to remove: members that left, and old payloads of changed members; at most
        `batch` payloads per list. `index`: the pair's index loaded before this run planned (by
        default the pair's index now), which finds the members that may share a payload."""
        out: list[PendingMember] = []
        for rows in self._iter_pending(
            segment, destination, _REMOVAL_PARTS, batch,
            (members.c.payload, members.c.consent, members.c.prev_payload, members.c.state),
        ):  # fmt: skip
            owed: list[tuple[str, str, str | None, list[str]]] = []
            for k, p, c, prev, st in rows:
                payloads = owed_payloads(prev)
                if st == "remove_planned" and p not in payloads:
                    payloads.append(p)
                owed.append((k, c, prev, payloads))
            # a payload another member still holds on the platform (two customers sharing every
            # identifier are one user to the platform) must stay: only this member's claim goes
            shared = self._held_by_others(segment, destination, {x for *_, ps in owed for x in ps}, index)
            settled = []
            for k, c, prev, payloads in owed:
                payloads = [x for x in payloads if x not in shared]
                if not payloads:
                    settled.append(k)
                    continue
                # a member's payloads stay in one batch: its removal is committed once, for all of them
                if out and len(out) + len(payloads) > batch:
                    yield out
                    out = []
                out.extend(PendingMember(k, x, c, prev) for x in payloads)
            if settled:
                self.commit_removals(segment, destination, settled)
        if out:
            yield out

    def _held_by_others(
        self, segment: str, destination: str, payloads: set[str], index: LedgerIndex | None = None
    ) -> set[str]:
        """The payloads among these that a member on the platform (accepted/confirmed) holds.

        The index (of the pair before this run planned, or now) gives the members whose payload
        hash matches one of these, which are then read. A member that holds a payload on the
        platform now held it when the run started: a run's plan only takes members off the
        platform (planned, remove_planned), and its removals are sent before its additions."""
        if not payloads:
            return set()
        if index is None:
            index = self.load_index(segment, destination)
        positions = index.holding(payload_hash(p) for p in payloads)
        keys = hex_of_keys(index.keys[positions])
        held: set[str] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(keys), 10_000):
                rows = conn.execute(
                    select(members.c.payload, members.c.state).where(
                        self._pair(segment, destination), self._key_in(conn, keys[i : i + 10_000])
                    )
                )
                held |= {p for p, st in rows if st in ON_PLATFORM and p in payloads}
        return held

    def iter_additions(self, segment: str, destination: str, batch: int) -> Iterator[list[PendingMember]]:
        """Members to add, `batch` at a time: the new members in the plan journal (`fresh` set),
        then the planned members of the ledger. A batch may hold both: as many calls as the total
        needs, however the plan was split."""
        out: list[PendingMember] = []
        for seq, (keys, fps, payloads, consents) in self._iter_journal(segment, destination):
            if not keys:
                continue
            marks = [(seq, fp, False) for fp in fps]
            marks[-1] = (seq, fps[-1], True)  # the part's last member: committing it closes the part
            part = list(map(PendingMember, keys, payloads, consents, itertools.repeat(None), marks))
            at = 0
            while at < len(part):
                take = part[at : at + batch - len(out)]
                out.extend(take)
                at += len(take)
                if len(out) == batch:
                    yield out
                    out = []
        for rows in self._iter_pending(
            segment, destination, _ADD_PARTS, batch, (members.c.payload, members.c.consent)
        ):
            for k, p, c in rows:
                out.append(PendingMember(k, p, c, None))
                if len(out) == batch:
                    yield out
                    out = []
        if out:
            yield out

    def iter_present(self, segment: str, destination: str, batch: int) -> Iterator[list[PendingMember]]:
        """Everything that should be on the platform (for replace)."""
        for rows in self._iter_pending(
            segment, destination, _PRESENT_PARTS, batch, (members.c.payload, members.c.consent)
        ):
            yield [PendingMember(k, p, c, None) for k, p, c in rows]

    def commit_removals(self, segment: str, destination: str, keys: Sequence[str]) -> None:
        """The platform acknowledged removing these payloads."""
        ts = now()
        with self.engine.begin() as conn:
            for i in range(0, len(keys), 900):
                chunk = list(keys[i : i + 900])
                conn.execute(
                    delete(members).where(
                        self._pair(segment, destination),
                        members.c.member_key.in_(chunk),
                        members.c.state == "remove_planned",
                    )
                )
                conn.execute(
                    update(members)
                    .where(self._pair(segment, destination), members.c.member_key.in_(chunk))
                    .values(prev_payload=None, updated_at=ts)
                )
                self._touch(conn, segment, destination, chunk)

    def defer(self, segment: str, destination: str, reasons: dict[str, str]) -> None:
        ts = now()
        with self.engine.begin() as conn:
            for k, why in reasons.items():
                conn.execute(
                    update(members)
                    .where(self._pair(segment, destination), members.c.member_key == k)
                    .values(reason=why[:200], updated_at=ts)
                )
            self._touch(conn, segment, destination, reasons)

    def commit_additions(
        self,
        segment: str,
        destination: str,
        keys: Sequence[str],
        *,
        state: str,
        request_id: str | None,
        rejected: dict[str, str],
        deferred: dict[str, str],
        ttl_days: int | None,
        fresh: Sequence[PendingMember] = (),
    ) -> None:
        """The platform acknowledged adding these members (all in one transaction). `fresh`: those
        of them still in the plan journal (from `iter_additions`), inserted here in their final
        state; a journal part goes once its last member is committed."""
        ts = now()
        expires = ts + timedelta(days=ttl_days) if ttl_days else None
        new = {p.key for p in fresh}
        ok = [k for k in keys if k not in rejected and k not in deferred and k not in new]
        with self.engine.begin() as conn:
            written: _IndexRows | None = None
            if fresh:
                written = self._insert_fresh(conn, segment, destination, fresh, state, request_id, rejected,
                                             deferred, ts, expires)  # fmt: skip
                rejected = {k: v for k, v in rejected.items() if k not in new}
                deferred = {k: v for k, v in deferred.items() if k not in new}
            if ok:
                conn.execute(
                    update(members)
                    .where(self._pair(segment, destination), self._key_in(conn, ok))
                    .values(
                        state=state, request_id=request_id, reason=None, updated_at=ts,
                        accepted_at=ts, expires_at=expires,
                    )
                )
            for k, why in rejected.items():
                conn.execute(
                    update(members)
                    .where(self._pair(segment, destination), members.c.member_key == k)
                    .values(state="rejected", reason=why[:200], request_id=request_id, updated_at=ts)
                )
            for k, why in deferred.items():
                conn.execute(
                    update(members)
                    .where(self._pair(segment, destination), members.c.member_key == k)
                    .values(state="deferred", reason=why[:200], updated_at=ts)
                )
            self._touch(conn, segment, destination, [k for k in keys if k not in new], written)

    # in the table's order, as the driver takes them (no reordering of every row)
    _FRESH_COLUMNS = ("segment", "destination", "member_key", "fingerprint", "payload", "payload_hash", "consent",
                      "state", "reason", "request_id", "updated_at", "accepted_at", "expires_at")  # fmt: skip

    def _insert_fresh(
        self, conn: Any, segment: str, destination: str, fresh: Sequence[PendingMember], state: str,
        request_id: str | None, rejected: dict[str, str], deferred: dict[str, str], ts: datetime,
        expires: datetime | None,
    ) -> _IndexRows:  # fmt: skip
        """Journal members the platform answered for become `members` rows in their final state.
        Returns them as the pair's index holds them."""
        at = self._bound_time(conn, ts)
        until = self._bound_time(conn, expires) if expires else None
        keys = [p.key for p in fresh]
        payloads = [p.payload for p in fresh]
        marks = [p.fresh for p in fresh if p.fresh is not None]  # (part, fingerprint, closes its part)
        assert len(marks) == len(fresh)
        fps = np.array([m[1] for m in marks], dtype=np.uint64)
        done = [m[0] for m in marks if m[2]]
        per_part: dict[int, int] = {}
        for seq, _, _ in marks:
            per_part[seq] = per_part.get(seq, 0) + 1
        hashes = payload_hashes(payloads)
        # each row's state, reason, request, updated, accepted, expires
        final: list[tuple[Any, ...]] = [(state, None, request_id, at, at, until)] * len(keys)
        codes = np.full(len(keys), _state_code(state), dtype=np.uint8)
        if rejected or deferred:
            for i, k in enumerate(keys):
                if k in rejected:
                    final[i] = ("rejected", rejected[k][:200], request_id, at, None, None)
                    codes[i] = _state_code("rejected")
                elif k in deferred:
                    final[i] = ("deferred", deferred[k][:200], None, at, None, None)
                    codes[i] = _state_code("deferred")
        signed = fps.view(np.int64).tolist()  # BIGINT is signed
        rows = [
            (segment, destination, k, fp, p, h, m.consent, *f)
            for k, fp, p, h, m, f in zip(keys, signed, payloads, hashes, fresh, final, strict=True)
        ]
        self._insert_new(conn, rows, self._FRESH_COLUMNS)
        if done:
            conn.execute(delete(plan_journal).where(self._journal_of(segment, destination), plan_journal.c.seq.in_(done)))
        for seq, n in per_part.items():  # a part sent in smaller batches: what is left of it, for the counts
            if seq not in done:
                conn.execute(
                    update(plan_journal)
                    .where(self._journal_of(segment, destination), plan_journal.c.seq == seq)
                    .values(members=plan_journal.c.members - n)
                )
        return hex_keys(keys), fps, codes, np.array(hashes, dtype=np.int64)

    def commit_replace(self, segment: str, destination: str, state: str, request_id: str | None,
                       ttl_days: int | None) -> None:  # fmt: skip
        """A replace finished: the platform holds exactly the planned/present members."""
        ts = now()
        expires = ts + timedelta(days=ttl_days) if ttl_days else None
        with self.engine.begin() as conn:
            conn.execute(
                delete(members).where(
                    self._pair(segment, destination), _in_state("remove_planned")
                )
            )
            conn.execute(
                update(members)
                .where(self._pair(segment, destination), members.c.state.in_((*ON_PLATFORM, *TO_ADD)))
                .values(
                    state=state, prev_payload=None, request_id=request_id, reason=None,
                    updated_at=ts, accepted_at=ts, expires_at=expires,
                )
            )
            conn.execute(
                update(audiences)
                .where(audiences.c.segment == segment, audiences.c.destination == destination)
                .values(last_replace_at=ts, updated_at=ts)
            )
            self._touch(conn, segment, destination, None)

    def pending_requests(self, segment: str, destination: str) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(members.c.request_id)
                .where(
                    self._pair(segment, destination),
                    _in_state("accepted"),
                    members.c.request_id.is_not(None),
                )
                .distinct()
            ).all()
        return [r[0] for r in rows]

    def resolve_request(
        self, segment: str, destination: str, request_id: str, state: str, reason: str | None,
        rejected: dict[str, str],
    ) -> None:  # fmt: skip
        """A polled request finished: its accepted members become `state` (confirmed, or planned
        again to be re-sent), with per-member rejections where the platform named them."""
        ts = now()
        with self.engine.begin() as conn:
            conn.execute(
                update(members)
                .where(
                    self._pair(segment, destination),
                    members.c.request_id == request_id,
                    _in_state("accepted"),
                )
                .values(state=state, reason=reason, updated_at=ts)
            )
            for k, why in rejected.items():
                conn.execute(
                    update(members)
                    .where(self._pair(segment, destination), members.c.member_key == k)
                    .values(state="rejected", reason=why[:200], updated_at=ts)
                )
            # accepted -> confirmed keeps a member's index entry; any other outcome changes it
            self._touch(conn, segment, destination, rejected if state in ON_PLATFORM else None)

    # ------------------------------------------------------------------ reporting

    def counts(self, segment: str, destination: str) -> dict[str, int]:
        with self.engine.connect() as conn:
            # every state but `confirmed` through the state index; `confirmed` is what the pair has besides
            total = conn.execute(select(func.count()).select_from(members).where(self._pair(segment, destination)))
            n_total = int(total.scalar_one())
            rows = conn.execute(
                select(members.c.state, func.count())
                .where(self._pair(segment, destination), _UNSETTLED)
                .group_by(members.c.state)
            ).all()
            journal = self._journal_size(conn, segment, destination)
        out = {st: int(n) for st, n in rows}
        if n_total > sum(out.values()):
            out["confirmed"] = n_total - sum(out.values())
        if journal:  # new members of a plan being (or left to be) pushed
            out["planned"] = out.get("planned", 0) + journal
        return out

    def rejected_reasons(self, segment: str, destination: str) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(members.c.reason, func.count())
                .where(self._pair(segment, destination), _in_state("rejected"))
                .group_by(members.c.reason)
            ).all()
        return {str(r): int(n) for r, n in rows}

    def start_run(self, trigger: str, segment: str, destination: str, dry_run: bool, status: str = "running") -> int:
        with self.engine.begin() as conn:
            res = conn.execute(
                insert(runs).values(
                    trigger=trigger, segment=segment, destination=destination, started_at=now(),
                    status=status, dry_run=int(dry_run), counts="{}",
                )
            )
            pk = res.inserted_primary_key
            assert pk is not None
            return int(pk[0])

    def mark_running(self, run_id: int) -> None:
        """A queued run (created when its trigger arrived) starts now."""
        with self.engine.begin() as conn:
            conn.execute(update(runs).where(runs.c.id == run_id).values(status="running", started_at=now()))

    def finish_run(
        self, run_id: int, status: str, counts: dict[str, Any], error: str | None,
        match_rate: float | None = None,
    ) -> None:  # fmt: skip
        with self.engine.begin() as conn:
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(
                    status=status, ended_at=now(), counts=json.dumps(counts, sort_keys=True),
                    error=error, match_rate=match_rate,
                )
            )

    def list_runs(self, limit: int = 50) -> list[RunRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(runs).order_by(runs.c.id.desc()).limit(limit)).all()
        return [
            RunRecord(
                id=r.id, trigger=r.trigger, segment=r.segment, destination=r.destination,
                started_at=_aware(r.started_at) or now(), ended_at=_aware(r.ended_at),
                status=r.status, dry_run=bool(r.dry_run), counts=json.loads(r.counts or "{}"),
                error=r.error, match_rate=r.match_rate,
            )
            for r in rows
        ]

    def last_success(self, segment: str, destination: str) -> datetime | None:
        with self.engine.connect() as conn:
            v = conn.execute(
                select(func.max(runs.c.ended_at)).where(
                    runs.c.segment == segment,
                    runs.c.destination == destination,
                    runs.c.status == "success",
                    runs.c.dry_run == 0,
                )
            ).scalar()
        return _aware(v)


def create_tables(meta: MetaData, engine: Engine) -> None:
    """create_all, tolerant of another process creating the same tables at the same moment."""
    for attempt in range(3):
        try:
            meta.create_all(engine)
            return
        except SQLAlchemyError:
            if attempt == 2:
                raise
            time.sleep(0.1 * (attempt + 1))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets `status` read while a sync writes; NORMAL sync is durable at each commit in WAL.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA cache_size=-65536")
    # fewer, larger checkpoints: each one syncs the database file
    cur.execute("PRAGMA wal_autocheckpoint=20000")
    cur.close()


def open_ledger(url: str) -> SqlLedger:
    return SqlLedger(url)


__all__ = [
    "ON_PLATFORM",
    "TO_ADD",
    "AudienceRecord",
    "LedgerIndex",
    "PendingMember",
    "RunRecord",
    "SqlLedger",
    "StagedMember",
    "find_keys",
    "key_prefixes",
    "open_ledger",
]

