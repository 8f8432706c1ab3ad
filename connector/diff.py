"""Planning: one pass over a segment's source for all its pairs, then each pair's diff, in DuckDB.

The pass computes each row's 128-bit fingerprint (of its raw key, identifier and consent columns) and
joins every pair's current members on it (a FULL OUTER JOIN: members missing from the source come out
too). A row with a settled member's fingerprint is that member unchanged and costs nothing more: no
member key (a SHA-256) is computed for it. Every other row gets its key and is normalized and hashed for
each platform (SQL where the shape allows, the Python rules otherwise); a member whose row changed is
found again by key among them. A first run (a pair without member files) and the exact pass that drops
duplicate keys join on the key instead.

A pair without member files (a first run) writes its base file straight from the pass. A pair with
files collects its changed rows and decides, in one SQL statement over them and its members, what
to add, what old payloads to remove, what to send again (unacknowledged batches, expiring Google
memberships, consent changes) and what is unchanged; the result is the pair's new cumulative delta.
Either file numbers the batches it will be sent in: removals first, then additions.

Members' values (`value = "<column>"`) are not part of the fingerprint: a member whose value moved by
at most `value_resend_threshold` of the value last sent (and whose `_tier` is the same) is unchanged,
and the ledger keeps the value last sent. A value the platform cannot take (missing, not a number,
not finite, negative, too large) is counted per reason; the member is then sent without a value where
the platform allows it (Google Ads) or not sent (a Meta value-based audience), never failing a batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from connector.errors import GuardrailError
from connector.identifiers import sql as idsql
from connector.identifiers.columns import CLEAR_KEYS, ColumnNormalizer, Mask, as_bool, is_null, whole
from connector.identifiers.hashing import sha256_columns
from connector.identifiers.normalize import NO_IDENTIFIER
from connector.ledger.files import (
    GONE,
    MAYBE,
    MEMBER,
    ON,
    OWED,
    REJECTED,
    REPLACED,
    SENT,
    TO_SEND,
    MemberWriter,
    PairFiles,
    copy_to,
    member_schema,
    payload_column,
    read_columns,
    replaces_by_position,
    sql_path,
)
from connector.ledger.journal import PairPointer
from connector.ledger.recovery import ACCEPTED, CONFIRMED, PLANNED, STATES, resolved_sql, state_class

log = logging.getLogger("connector.diff")

CONSENT_WORDS = {
    "granted": 1, "true": 1, "yes": 1, "y": 1, "1": 1, "t": 1,
    "denied": 2, "false": 2, "no": 2, "n": 2, "0": 2, "f": 2,
}  # fmt: skip
_CONSENT_DEFAULT = {"unspecified": 0, "granted": 1, "denied": 2}


@dataclass(slots=True)
class PlanCounts:
    """What one (segment, destination) plan holds; also the run's reported counts. Every count of
    sends equals what goes on the wire: adds = new_members + identifier_changes + resends +
    consent_changes + value_changes, removes = left_segment + identifier_changes."""

    source_rows: int = 0
    invalid: int = 0  # rows that yield no member for this platform (no usable identifier...)
    invalid_reasons: Counter[str] = field(default_factory=Counter)
    unchanged: int = 0
    adds: int = 0  # members new to the platform
    changes: int = 0  # members whose identifiers changed: remove old payload + add new
    removes: int = 0  # members who left the segment
    consent_denied: int = 0
    consent_changes: int = 0  # same identifiers, new consent: sent again (Google)
    value_changes: int = 0  # same identifiers, a value moved past the threshold or a new tier: sent again
    value_reasons: Counter[str] = field(default_factory=Counter)  # values the destination cannot take
    resends: int = 0  # sent again: unacknowledged batches, failed requests, memberships near expiry
    audience_before: int = 0  # members on the platform before this run
    fallback_values: int = 0  # identifier values the SQL rules left to the Python rules

    def as_dict(self) -> dict[str, object]:
        return {
            "source_rows": self.source_rows,
            "invalid": self.invalid,
            "invalid_reasons": {k: v for k, v in sorted(self.invalid_reasons.items()) if v},
            "unchanged": self.unchanged,
            "adds": self.adds + self.changes + self.resends + self.consent_changes + self.value_changes,
            "new_members": self.adds,
            "identifier_changes": self.changes,
            "removes": self.removes + self.changes,
            "left_segment": self.removes,
            "consent_denied": self.consent_denied,
            "consent_changes": self.consent_changes,
            "value_changes": self.value_changes,
            "value_reasons": {k: v for k, v in sorted(self.value_reasons.items()) if v},
            "resends": self.resends,
            "audience_before": self.audience_before,
            "fallback_values": self.fallback_values,
        }


def check_guardrails(counts: PlanCounts, *, mode: str, max_remove_share: float, force: bool, pair: str) -> None:
    """Stop a plan that looks like an accident before anything is sent."""
    if force or mode == "add_only":
        return
    if counts.source_rows == 0 and counts.audience_before > 0:
        raise GuardrailError(
            f"{pair}: the source returned 0 rows but the audience has {counts.audience_before} "
            "members; refusing to empty it (check the source, or pass --force)"
        )
    if counts.audience_before == 0:
        return
    share = counts.removes / counts.audience_before
    if share > max_remove_share:
        raise GuardrailError(
            f"{pair}: the plan removes {counts.removes} of {counts.audience_before} members "
            f"({share:.0%}), more than max_remove_share = {max_remove_share:.0%}; "
            "check the source, raise max_remove_share, or pass --force"
        )


@dataclass(slots=True)
class PairInput:
    """One pair as the planner needs it."""

    name: str
    platform: str
    payload_keys: tuple[str, ...]
    files: PairFiles
    pointer: PairPointer
    current: str | None  # SQL of its rows as its files hold them (None: no member files yet)
    journal: tuple[str, str]  # its acknowledged batches and rejections (`register_journal`'s relations)
    run_id: int
    positioned: str | None = None  # `current` with each base row's row number (`pos`), for its delta's list
    batch_size: int = 10_000
    expire_before: datetime | None = None  # Google: members accepted before this are sent again
    full_refresh: bool = False
    value_mode: str = "none"  # none | optional | required (`connector.destinations.base.ValueSupport`)
    value_max: float | None = None  # the largest value the platform takes (None: any finite number)
    fingerprinted: bool = False  # every member in its files has a whole fingerprint (`members_fingerprinted`)

    @property
    def values(self) -> bool:
        return self.value_mode != "none"

    @property
    def resolved(self) -> str | None:
        """SQL of its current rows, states settled."""
        return None if self.current is None else resolved_sql(self.current, *self.journal)

    def resolved_where(self, condition: str) -> str:
        """SQL of its current rows that meet `condition` (on columns other than the state's), states
        settled: only those rows are joined with the journal."""
        assert self.current is not None
        return resolved_sql(f"SELECT * FROM ({self.current}) WHERE {condition}", *self.journal)


@dataclass(slots=True)
class PairPlan:
    input: PairInput
    counts: PlanCounts = field(default_factory=PlanCounts)
    file: str | None = None  # the file written for this run (its new base or delta)
    as_base: bool = False
    remove_batches: int = 0
    add_batches: int = 0
    sends: int = 0  # rows to send
    states: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(len(STATES), np.int64))  # members before
    # members by STATES whose rows the file leaves as they were, and the member rows it writes anew (k, kind, st,
    # run, b, acc): the pair's counts after sending, without reading all of it again (None: not known)
    kept_states: list[int] | None = None
    rewritten: pa.Table | None = None
    # delta planning: changed rows and keys gone from the segment, collected by the pass
    _cand: list[pa.RecordBatch] = field(default_factory=list)
    _gone: list[pa.Array] = field(default_factory=list)
    _writer: MemberWriter | None = None
    _written: int = 0
    _left: int = 0  # members the source no longer has
    _new_for: dict[int, int] = field(default_factory=dict)  # source rows of keys the pair does not know
    # a pass by fingerprint: keys of the rows no member of the pair has the fingerprint of, and of the pair's
    # members no row has the fingerprint of (the duplicate check: a key among the first must be among the second)
    _unmatched: list[pa.Array] = field(default_factory=list)
    _unmet: list[pa.Array] = field(default_factory=list)
    _read: bool = False  # its rows the plan can touch are read (`Planner._read_old`)
    _nokey: int = 0
    _same_seen: int = 0  # unchanged rows that came through (a pair without member files took every row)


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    key: str | None
    identifiers: dict[str, str]  # field -> column
    default_region: str
    mode: str  # mirror | add_only
    consent_columns: tuple[str | None, str | None]
    consent_defaults: tuple[str, str]
    value: str | None = None  # column of each member's value
    tier: str | None = None  # column of each member's tier (`_tier`), when the source has one
    value_threshold: float = 0.10  # a value is sent again when it moved by more than this share


Summary = dict[tuple[object, object], tuple[object, ...]]  # see `Planner._summary`

# source rows planned together: DataFusion's cleaning query costs ~6 ms a call whatever its size
BATCH_ROWS = 250_000

# why a value cannot be sent, by the code the pass computes (0: a usable value)
VALUE_REASONS = {1: "value_missing", 2: "value_not_a_number", 3: "value_not_finite", 4: "value_negative",
                 5: "value_too_large"}  # fmt: skip


class Planner:
    """Plans every pair of one segment in one pass over its source (`src`, a DuckDB relation)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, seg: SegmentSpec, pairs: Sequence[PairInput],
                 *, dry_run: bool, on_rows: Callable[[int], None] | None = None, batch_rows: int = BATCH_ROWS,
                 threads: int | None = None) -> None:  # fmt: skip
        self.con = con
        self.seg = seg
        self.plans = [PairPlan(p) for p in pairs]
        self.dry_run = dry_run
        self.platforms = sorted({p.platform for p in pairs})
        self.threads = threads  # for normalizing and hashing (default: one per core)
        self.ids = ColumnNormalizer(seg.identifiers, self.platforms, seg.default_region, threads)
        self.duplicates = 0
        self.source_rows = 0
        self._repeated = False  # the pass counted a row to plan more than once (a key there twice)
        self._by_fp = False  # the pass met rows and members by fingerprint (see `_pass_sql`)
        self._keys_outside = False  # the pass hands over what member keys hash, not the keys (see `_pass_sql`)
        self._differences: dict[int, str] = {}  # pair -> its members where they differ from the first pair's
        self._on_rows = on_rows
        self._batch_rows = batch_rows

    # ------------------------------------------------------------------ the pass

    def _fingerprinted(self) -> list[str]:
        """The columns of a row's fingerprint: the key, the identifiers, the consent columns."""
        cols = list(dict.fromkeys([*self.seg.identifiers.values(), *(c for c in self.seg.consent_columns if c)]))
        return cols if self.seg.key is None else list(dict.fromkeys([self.seg.key, *cols]))

    def source_columns(self) -> list[str]:
        """The source columns a plan reads: the fingerprinted ones, then the value and tier columns."""
        return list(dict.fromkeys([*self._fingerprinted(), *(c for c in (self.seg.value, self.seg.tier) if c)]))

    def _value_sql(self) -> str:
        """The row's value as DOUBLE (`vd`, NULL when unusable) and why it is unusable (`vbad`, 0: usable)."""
        assert self.seg.value is not None
        txt = f"nullif(trim({idsql.quote(self.seg.value)}), '')"
        num = f"TRY_CAST({txt} AS DOUBLE)"
        code = (f"(CASE WHEN {txt} IS NULL THEN 1 WHEN {num} IS NULL THEN 2 WHEN NOT isfinite({num}) THEN 3 "
                f"WHEN {num} < 0 THEN 4 ELSE 0 END)::UTINYINT")  # fmt: skip
        return f"CASE WHEN {code} = 0 THEN {num} END AS vd, {code} AS vbad"

    @staticmethod
    def _pair_value(plan: PairPlan, of: str = "") -> tuple[str, str]:
        """SQL of a pair's value (NULL when the platform cannot take it) and of its reason code, from the
        pass's `vd`, `vbad` (of relation `of`)."""
        vd, vbad, mx = f"{of}vd", f"{of}vbad", plan.input.value_max
        if mx is None:
            return vd, vbad
        return (f"CASE WHEN {vd} <= {mx!r} THEN {vd} END",
                f"(CASE WHEN {vbad} = 0 AND {vd} > {mx!r} THEN 5 ELSE {vbad} END)::UTINYINT")  # fmt: skip

    def _value_same(self, plan: PairPlan, old_v: str, old_t: str, new_v: str, new_bad: str, new_t: str) -> str:
        """SQL: the value and tier a member has now need no re-send (its value is usable, moved by at most
        the threshold from the value last sent, and its tier is the same)."""
        if not plan.input.values or self.seg.value is None:
            return "true"
        thr = float(self.seg.value_threshold)
        moved = f"({new_v} IS NOT NULL AND ({old_v} IS NULL OR abs({new_v} - {old_v}) > {thr!r} * abs({old_v})))"
        tier = f"{new_t} IS NOT DISTINCT FROM {old_t}" if self.seg.tier else "true"
        return f"({new_bad} = 0 AND NOT {moved} AND {tier})"

    def _consent_sql(self) -> str:
        parts = []
        for col, default in zip(self.seg.consent_columns, self.seg.consent_defaults, strict=True):
            d = _CONSENT_DEFAULT[default]
            if col is None:
                parts.append(str(d))
                continue
            v = f"lower(trim({idsql.quote(col)}))"
            granted = ", ".join(idsql.literal(w) for w, c in CONSENT_WORDS.items() if c == 1)
            denied = ", ".join(idsql.literal(w) for w, c in CONSENT_WORDS.items() if c == 2)
            parts.append(f"(CASE WHEN {v} IN ({granted}) THEN 1 WHEN {v} IN ({denied}) THEN 2 ELSE {d} END)")
        return f"(3 * {parts[0]} + {parts[1]})::UTINYINT"

    def _pass_sql(self, src: str, dedupe: bool, filtered: bool = False, by_fp: bool = False) -> str:
        """Each source row (and each member the source no longer has) with its pairs' flags: `inI` the
        pair knows the member, `sameI` unchanged for it, `todoI` to normalize for it, `leftI` gone from the
        source, `clsI` its state before the run (an index in STATES); then the normalized columns of rows to
        normalize. `n`: how many rows an output row stands for.

        `filtered` (every pair has member files): the rows there is nothing to do with (unchanged for every
        pair, or without a key) are not output one by one but counted, a row for each combination of their
        flags, in the same pass (a key there twice shows as a row counted twice).

        `by_fp`: rows meet members by fingerprint, not by key. A row with a member's fingerprint is that
        member unchanged and takes its key; only the others get theirs computed (a SHA-256). A member whose
        row changed then comes out twice: its new row (no member has its fingerprint: `inI` false) and
        itself (no row has its fingerprint: `leftI`); `_plan_delta` joins the two again by key."""
        cols = self._fingerprinted()
        fp, fq = idsql.fingerprint(cols)
        # source columns under names of ours (a source column may be called `k` or `fp`)
        raw_names = {c: f"v{j}" for j, c in enumerate(dict.fromkeys(self.seg.identifiers.values()))}
        raw = ", ".join(f"{idsql.quote(c)} AS {a}" for c, a in raw_names.items())
        cons = f", {self._consent_sql()} AS cons0" if "google" in self.platforms else ""
        # no row number in the plain pass: numbering rows in a scan serializes it
        row = "__row AS r, " if dedupe else ""
        valued = self._valued()
        if valued:
            cons += f", {self._value_sql()}"
            cons += f", {idsql.quote(self.seg.tier)} AS tier" if self.seg.tier else ", NULL::VARCHAR AS tier"
        ids = list(self.seg.identifiers.values())
        if by_fp:
            # the key's own column travels with the row; its key is computed after the join, where needed
            kraw = f"{idsql.quote(self.seg.key)} AS kraw, " if self.seg.key is not None else ""
            key = idsql.member_key("kraw" if self.seg.key is not None else None, [raw_names[c] for c in ids])
            s = f"SELECT {row}true AS pres, {kraw}{fp} AS fp, {fq} AS fq, {raw}{cons} FROM {src}"
        else:
            # without member files, no join needs the key: the pass carries what it hashes (a string that tells
            # members apart as well) and `_batch` hashes it, outside DuckDB
            key = (idsql.key_preimage if self._keys_outside else idsql.member_key)(self.seg.key, ids)
            s = f"SELECT {row}true AS pres, {key} AS k, {fp} AS fp, {fq} AS fq, {raw}{cons} FROM {src}"
        if dedupe:
            # the first row of a key wins; the others are counted as duplicates
            s = f"SELECT * EXCLUDE (r) FROM ({s}) QUALIFY k IS NULL OR row_number() OVER (PARTITION BY k ORDER BY r) = 1"
        jcols = ("fp", "fq") if by_fp else ("k",)  # what rows and members meet on
        joins, flags = [], []
        prev = [f"s.{c}" for c in jcols]
        keys = []  # the members' keys (by fingerprint: the row's key, when a member has its fingerprint)
        first = self._first_pair()
        if first is not None:
            on = " AND ".join(f"s.{c} = l.{c}" for c in jcols)
            # by fingerprint the first pair's members come without keys (a hash table of 10M fixed-width rows,
            # not of 10M strings): the rows that need one look it up after grouping (`_with_keys`)
            joins.append(f"FULL JOIN ({self._members_sql(self.plans[first], by_fp, key=not by_fp)}) AS l ON {on}")
            prev = [f"coalesce(s.{c}, l.{c})" for c in jcols]
            keys += [] if by_fp else ["l.k"]
        first_same = ""
        alias: dict[int, int] = {}  # pair -> the pair whose flags are its own (the same members, compared alike)
        for i, plan in enumerate(self.plans):
            if plan.input.current is None:
                continue
            # the first ledgered pair's members, and each other pair's where they differ from those
            m = {c: f"l.{c}" for c in self._member_columns()} | {"known": "l.cls IS NOT NULL"}
            if i != first and i in self._differences:
                on = " AND ".join(f"{p} = d{i}.j_{c}" for p, c in zip(prev, jcols, strict=True))
                joins.append(f"FULL JOIN {self._differences[i]} AS d{i} ON {on}")
                prev = [f"coalesce({p}, d{i}.j_{c})" for p, c in zip(prev, jcols, strict=True)]
                m = {c: f"(CASE WHEN d{i}.j_{jcols[0]} IS NULL THEN {v} ELSE d{i}.{c} END)" for c, v in m.items()}
                keys.append(f"d{i}.k")
            same = f"{m['fp']} = s.fp AND {m['fq']} = s.fq AND {m['cls']} <> {PLANNED} AND NOT {m['exp']}"
            if valued and plan.input.values:
                pv, pb = self._pair_value(plan, "s.")
                same += " AND " + self._value_same(plan, m["v"], m["t"], pv, pb, "s.tier")
            if i == first:
                first_same = same
            elif first is not None and i not in self._differences and same == first_same:
                alias[i] = first  # its flags would be the first pair's, row for row: computed once
                continue
            flags.append(
                f"{m['known']} AS in{i}, coalesce({same}, false) AS same{i}, "
                f"{m['cls']} AS cls{i}, {m['known']} AND s.pres IS NULL AS left{i}"
            )
        # `kk` the row's key; `lk`: the first pair has its fingerprint, whose key the row takes (looked up later)
        # coalesce evaluates an argument only for the rows the ones before it left NULL
        kk = f"coalesce({', '.join([*keys, f'CASE WHEN s.pres AND l.cls IS NULL THEN {key} END'])})" if by_fp else prev[0]
        lk = "l.cls IS NOT NULL" if by_fp else "false"
        drop = "pres, kraw" if by_fp and self.seg.key is not None else "pres"
        j = (
            f"SELECT s.* EXCLUDE ({drop}), coalesce(s.pres, false) AS pres, {kk} AS kk, {lk} AS lk"
            f"{', l.fp AS lfp0, l.fq AS lfq0' if by_fp else ''}{''.join(', ' + f for f in flags)} "
            f"FROM ({s}) AS s {' '.join(joins)}"
        )
        own_flags = [i for i in range(len(self.plans)) if i not in alias]  # the pairs whose flags the pass computes
        todo = []
        for i in own_flags:
            same = f"same{i}" if self.plans[i].input.current is not None else "false"
            todo.append(f"(pres AND (kk IS NOT NULL OR lk) AND NOT {same}) AS todo{i}")
        anytodo = " OR ".join(f"todo{i}" for i in own_flags)
        t = f"SELECT *, {', '.join(todo)} FROM ({j})"
        outs = ["pres", "kk AS k", "pres AND kk IS NULL AND NOT lk AS nokey", "(" + anytodo + ") AS anytodo"]
        if by_fp:  # a member who left has the fingerprint of the first pair's member; `lookup`: a key to look up by it
            outs += ["coalesce(fp, lfp0) AS fp", "coalesce(fq, lfq0) AS fq", "kk IS NULL AND lk AS lookup"]
        else:
            outs += ["fp", "fq"]
        for i in own_flags:
            if self.plans[i].input.current is not None:
                outs += [f"in{i}", f"same{i}", f"cls{i}", f"left{i}"]
        outs += [f"todo{i}" for i in own_flags]
        ident = ["k", "fp", "fq"]  # what tells the rows to plan apart
        own = [*ident, *raw_names.values()]  # a row's own columns (the others are flags)
        if "google" in self.platforms:
            outs.append(f"CASE WHEN {anytodo} THEN cons0 END AS cons")
            own.append("cons")
        if valued:
            outs.append("tier")
            own.append("tier")
            for i, p in enumerate(self.plans):
                if p.input.values:
                    pv, pb = self._pair_value(p)
                    outs += [f"{pv} AS worth{i}", f"{pb} AS worthless{i}"]
                    own += [f"worth{i}", f"worthless{i}"]
        rows = f"SELECT {', '.join(outs)}, {', '.join(raw_names.values())} FROM ({t})"
        if filtered:
            # only the rows to plan go on one by one (to normalization, and out of DuckDB): changed, new, departed
            keep = " OR ".join(["anytodo", *(f"left{i}" for i in own_flags if self.plans[i].input.current is not None)])
            # grouped by the flags and, for a row to plan, its key and fingerprint (a narrow key: grouping by
            # every column a row carries costs several times the join); its other columns go along
            masked = [f"CASE WHEN {keep} THEN {c} END AS {c}" for c in ident]
            masked += [f"any_value(CASE WHEN {keep} THEN {c} END) AS {c}" for c in own if c not in ident]
            flag_cols = [o.rsplit(" AS ", 1)[-1] for o in outs if o.rsplit(" AS ", 1)[-1] not in own]
            packed, unpacked = _packed(flag_cols)
            codes = [f"code{j}" for j in range(len(packed))]
            rows = (
                f"SELECT {', '.join(unpacked)}, * EXCLUDE ({', '.join(codes)}) FROM ("
                f"SELECT {', '.join(codes)}, {', '.join(masked)}, count(*) AS n FROM "
                f"(SELECT *, {', '.join(f'{e} AS {c}' for e, c in zip(packed, codes, strict=True))} FROM ({rows})) "
                f"GROUP BY {', '.join(codes)}, {', '.join(f'CASE WHEN {keep} THEN {c} END' for c in ident)})"
            )
            if by_fp:
                assert first is not None
                rows = self._with_keys(rows, self.plans[first])
        else:
            rows = f"SELECT *, 1 AS n FROM ({rows})"
        ids_n = ColumnNormalizer({f: raw_names[c] for f, c in self.seg.identifiers.items()}, self.platforms,
                                 self.seg.default_region)  # fmt: skip
        normalized = ids_n.select(rows, "anytodo")
        copies = "".join(f", {f}{j} AS {f}{i}" for i, j in alias.items() for f in ("in", "same", "cls", "left", "todo"))
        return f"SELECT * EXCLUDE ({', '.join(raw_names.values())}){copies} FROM ({normalized})"

    def _with_keys(self, rows: str, plan: PairPlan) -> str:
        """`rows` with the keys they lack (`lookup`) taken from `plan`'s members with their fingerprint: the
        few rows to plan are the hash table, the members stream past it."""
        members = f"SELECT k, {self._fingerprint_sql(plan, by_fp=True)} FROM ({plan.input.current}) WHERE kind = {MEMBER}"
        return (f"SELECT g.* EXCLUDE (k, lookup), coalesce(g.k, m.k) AS k FROM ({members}) AS m "
                f"RIGHT JOIN ({rows}) AS g ON g.lookup AND m.fp = g.fp AND m.fq = g.fq")  # fmt: skip

    def _valued(self) -> bool:
        """Whether the pass compares members' values (the segment has them and a pair sends them)."""
        return self.seg.value is not None and any(p.input.values for p in self.plans)

    def _first_pair(self) -> int | None:
        """The ledgered pair the pass joins whole (one that sends values, when one does), or None."""
        ledgered = [i for i, p in enumerate(self.plans) if p.input.current is not None]
        valued = [i for i in ledgered if self.plans[i].input.values] if self._valued() else []
        return next(iter(valued or ledgered), None)

    def _member_columns(self) -> tuple[str, ...]:
        """What the pass compares of a member beside its key: fingerprint, state, expiring, value and tier."""
        return ("fp", "fq", "cls", "exp", "v", "t") if self._valued() else ("fp", "fq", "cls", "exp")

    def _members_sql(self, plan: PairPlan, by_fp: bool = False, key: bool = True) -> str:
        """A pair's members as the pass compares rows with them (`_member_columns`), with their keys (`key`)."""
        exp = "false"
        if plan.input.expire_before is not None:
            exp = f"(st = {ON} AND acc < TIMESTAMPTZ '{plan.input.expire_before.isoformat()}')"
        vt = ", v, t" if self._valued() else ""
        k = "k, " if key else ""
        return (f"SELECT {k}{self._fingerprint_sql(plan, by_fp)}, {state_class()} AS cls, {exp} AS exp{vt} "
                f"FROM ({plan.input.resolved}) WHERE kind = {MEMBER}")  # fmt: skip

    @staticmethod
    def _fingerprint_sql(plan: PairPlan, by_fp: bool) -> str:
        """A member's fingerprint; `by_fp`: one without a whole fingerprint (converted from an older ledger)
        gets one from its key, which no row has (reading the keys only where a file may hold such a member)."""
        if not by_fp or plan.input.fingerprinted:
            return "fp, fq"
        return ("CASE WHEN fp IS NULL OR fq IS NULL THEN hash(k) ELSE fp END AS fp, "
                "CASE WHEN fp IS NULL OR fq IS NULL THEN hash(k, 'no fingerprint') ELSE fq END AS fq")  # fmt: skip

    def _compare_pairs(self, by_fp: bool) -> None:
        """For each ledgered pair but the first, the members where it differs from the first (a member one
        of them lacks, another fingerprint, state or value), by what the pass joins on (`j_` columns: the
        fingerprint or the key): the pairs of a segment mostly hold the same members in the same states, so
        the pass joins the source with one pair's members and these few rows, one large hash table where a
        join with each pair would hold one per pair (and spill beyond memory_limit). A pair that holds the
        same members as the first has no table (`_pass_sql` joins nothing for it). A pair that sends no
        values is compared without them (it never reads them)."""
        self._drop_differences()
        first = self._first_pair()
        jcols = ("fp", "fq") if by_fp else ("k",)
        summaries: dict[tuple[int, bool], Summary] = {}  # (pair, with values) -> its `_summary`
        for i, plan in enumerate(self.plans):
            if plan.input.current is None or i == first:
                continue
            assert first is not None
            cols = self._member_columns() if plan.input.values else ("fp", "fq", "cls", "exp")
            # the common case first: the same members in the same states, told by one cheap aggregate each
            for p in (i, first):
                if (p, "v" in cols) not in summaries:
                    summaries[p, "v" in cols] = self._summary(self.plans[p], "v" in cols, by_fp)
            if summaries[i, "v" in cols] == summaries[first, "v" in cols]:
                continue
            differ = " OR ".join(f"a.{c} IS DISTINCT FROM b.{c}" for c in cols if c not in jcols)
            on = " AND ".join(f"a.{c} = b.{c}" for c in jcols)
            name = f"differences{i}_{id(self)}"
            # the first pair's side carries only what is compared (a key there would go into the hash table)
            compared = list(dict.fromkeys([*jcols, *cols]))
            a = ", ".join(compared)
            # the pairs mostly hold the same members in the same states: sums of hashes per bucket of the join
            # columns tell where they do not (a false "same" takes two 64-bit hash sums colliding at once), and
            # only those buckets are joined
            mine, theirs = (self._checksums(p, compared, jcols, by_fp) for p in (plan, self.plans[first]))
            buckets = sorted(b for b in mine.keys() | theirs.keys() if mine.get(b) != theirs.get(b))
            b_rows, a_rows = self._members_sql(plan, by_fp), self._members_sql(self.plans[first], by_fp)
            if 0 < len(buckets) <= _BUCKETS // 4:
                only = f"WHERE {_bucket(jcols)} IN ({', '.join(map(str, buckets))})"
                b_rows, a_rows = f"SELECT * FROM ({b_rows}) {only}", f"SELECT * FROM ({a_rows}) {only}"
            if not buckets:  # the same members in the same states: the pass takes this pair's from the first's
                continue
            with self._joins_as_written():  # the first pair's side (no keys) is the hash table
                self.con.execute(f"""CREATE OR REPLACE TEMP TABLE {name} AS
                    SELECT {", ".join(f"coalesce(a.{c}, b.{c}) AS j_{c}" for c in jcols)}, b.k IS NOT NULL AS known,
                           b.k, {", ".join(f"b.{c}" for c in self._member_columns())}
                    FROM ({b_rows}) AS b
                    FULL JOIN (SELECT {a} FROM ({a_rows})) AS a ON {on}
                    WHERE a.{jcols[0]} IS NULL OR b.k IS NULL OR {differ}""")
            self._differences[i] = name

    def _summary(self, plan: PairPlan, values: bool, by_fp: bool) -> Summary:
        """A pair's members as a multiset of (fingerprint, key, state, expiring, value, tier), summed up per
        (state, expiring): counts and sums of the fingerprint halves (themselves hashes: no hashing per member)
        and, where the pass joins by key or compares values, of hashes of those with the fingerprint. Two
        pairs with the same summary hold the same members in the same states (a false "same" takes two
        64-bit sums colliding at once in every group)."""
        sums = "count(*), sum(fp), sum(fq)" + ("" if by_fp else ", sum(hash(k, fp, fq)::HUGEINT)")
        if values:
            sums += ", sum(hash(fp, fq, v, t)::HUGEINT)"
        rows = self.con.execute(f"""SELECT cls, exp, {sums}
            FROM ({self._members_sql(plan, by_fp, key=not by_fp)}) GROUP BY cls, exp""").fetchall()
        return {(r[0], r[1]): tuple(r[2:]) for r in rows}

    def _checksums(self, plan: PairPlan, cols: list[str], jcols: Sequence[str], by_fp: bool) -> dict[int, tuple[object, ...]]:
        """A pair's members as multisets of `cols` tuples, one per bucket of `jcols`: their count and two
        sums of their hashes."""
        fwd, rev = ", ".join(cols), ", ".join(reversed(cols))
        rows = self.con.execute(f"""SELECT {_bucket(jcols)} AS bk, count(*), sum(hash({fwd})::HUGEINT),
                sum(hash({rev}, 'b')::HUGEINT)
            FROM ({self._members_sql(plan, by_fp, key="k" in cols)}) GROUP BY bk""").fetchall()
        return {int(r[0]): tuple(r[1:]) for r in rows}

    @contextmanager
    def _joins_as_written(self) -> Iterator[None]:
        """Plan statements with each join's right side as its hash table: DuckDB guesses a CSV source's size
        low, and would otherwise build its hash table from every source row and its strings, not from the
        members (fixed-width columns), and spill it."""
        self.con.execute("SET disabled_optimizers = 'join_order,build_side_probe_side'")
        try:
            yield
        finally:
            self.con.execute("RESET disabled_optimizers")

    def _drop_differences(self) -> None:
        for name in self._differences.values():
            self.con.execute(f"DROP TABLE IF EXISTS {name}")
        self._differences = {}

    def run(self, src: str) -> list[PairPlan]:
        """Read the source once, plan every pair. Duplicate keys found: plan again on the deduplicated
        source (the first row of each key wins)."""
        try:
            ok = self._pass(src, dedupe=False)
            if ok and self._by_fp:  # a list: every pair's rows are read once, for the check and its delta
                ok = not any([self._unmatched_known(p) for p in self.plans if p.input.current is not None])
            if not ok:
                rows = self.source_rows  # the first pass counted every row
                self.plans = [PairPlan(p.input) for p in self.plans]
                self._pass(src, dedupe=True)
                self.duplicates = rows - self.source_rows
                self.source_rows = rows
        finally:
            self._drop_differences()
        for plan in self.plans:
            plan.counts.source_rows = self.source_rows
            if self.duplicates:
                plan.counts.invalid += self.duplicates
                plan.counts.invalid_reasons["duplicate_key"] += self.duplicates
            if plan.input.current is not None:
                self._plan_delta(plan)
        return self.plans

    def _pass(self, src: str, *, dedupe: bool) -> bool:
        """One pass; False when it found duplicate keys it was not told to drop.

        Without member files (a first run) every row streams from the source into each pair's new base.
        With them, only the rows to normalize and the members who left come out of DuckDB one by one; the
        others come out counted (see `_pass_sql`)."""
        ledgered = [(i, p) for i, p in enumerate(self.plans) if p.input.current is not None]
        filtered = bool(ledgered) and len(ledgered) == len(self.plans) and not dedupe
        # a required value the platform cannot take holds a member as it is, which takes knowing the member by
        # key in the pass itself
        self._by_fp = filtered and not any(p.input.value_mode == "required" for p in self.plans)
        self._keys_outside = not ledgered
        self._compare_pairs(by_fp=self._by_fp)
        sql = self._pass_sql(src, dedupe, filtered, by_fp=self._by_fp)
        self.source_rows = 0
        self._repeated = False
        for plan in self.plans:
            if plan.input.current is None and not self.dry_run:
                name = plan.input.files.new_name("base", plan.input.run_id)
                plan.file, plan.as_base = name, True
                plan._writer = plan.input.files.writer(name, member_schema(plan.input.payload_keys))
        new_keys: list[Prefixes] = []  # first 8 bytes of each new key (duplicate check)
        try:
            with self._joins_as_written():
                reader = self.con.sql(sql).to_arrow_reader(self._batch_rows)
                try:
                    for rb in prefetched(reader):
                        self._batch(rb, new_keys)
                        if self._on_rows and not filtered:
                            self._on_rows(self.source_rows)
                finally:
                    reader.close()  # the connection takes no other statement while its result is open
            if self._on_rows and filtered:
                self._on_rows(self.source_rows)
            for plan in self.plans:
                plan.counts.unchanged += plan._same_seen
                plan.counts.audience_before = int(plan.states[CONFIRMED] + plan.states[ACCEPTED])
                if plan._writer is not None:
                    plan._writer.seal()  # finished and fsynced while the keys are checked
            dups = not dedupe and self._duplicates(ledgered, new_keys)
        except BaseException:
            self._close_writers(abort=True)
            raise
        self._close_writers(abort=dups)
        return not dups

    def _duplicates(self, ledgered: list[tuple[int, PairPlan]], new_keys: list[Prefixes]) -> bool:
        """Whether the pass may have seen a key twice: a row counted twice, a new key twice, or more source
        rows matched to a pair's members than it has members."""
        if self._repeated or _has_duplicates(new_keys):
            return True
        for i, plan in ledgered:
            members = self.con.execute(f"SELECT count(*) FROM ({plan.input.current}) WHERE kind = {MEMBER}").fetchall()
            matched = self.source_rows - plan._nokey - plan._new_for.get(i, 0)
            if matched > int(members[0][0]) - plan._left:
                return True
        return False

    def _unmatched_known(self, plan: PairPlan) -> bool:
        """A pass by fingerprint: whether a row no member has the fingerprint of has the key of a member that
        another row had the fingerprint of (a key there twice: once unchanged, once not)."""
        tag = self._read_old(plan)
        n = self.con.execute(f"""SELECT count(*) FROM old_{tag} WHERE kind = {MEMBER}
            AND k IN (SELECT k FROM unmatched_{tag}) AND k NOT IN (SELECT k FROM unmet_{tag})""").fetchall()[0][0]
        return bool(n)

    def _close_writers(self, *, abort: bool) -> None:
        for plan in self.plans:
            if plan._writer is not None:
                plan._writer.abort() if abort else plan._writer.close()
                plan._writer = None

    def _batch(self, rb: pa.RecordBatch, new_keys: list[Prefixes]) -> None:
        """One batch of the pass: every source row, or (with member files) the rows to plan and the counts
        of the others."""
        if self._keys_outside:
            k = sha256_columns({"k": (whole(rb.column("k")), "")}, size=16, threads=self.threads)["k"]
            rb = rb.set_column(rb.schema.get_field_index("k"), "k", k)
        w = np.asarray(rb.column("n").to_numpy(zero_copy_only=False), dtype=np.int64)  # rows each row stands for
        nokey = as_bool(rb.column("nokey"))
        anytodo = as_bool(rb.column("anytodo"))
        pres = as_bool(rb.column("pres"))
        self.source_rows += int(w[pres].sum())
        keyed = pres & ~nokey
        self._repeated |= bool((w[anytodo] > 1).any())
        known_any = np.zeros(rb.num_rows, dtype=bool)
        n_nokey = int(w[nokey].sum())
        for i, plan in enumerate(self.plans):
            plan._nokey += n_nokey
            if n_nokey:
                plan.counts.invalid += n_nokey
                plan.counts.invalid_reasons["key_missing"] += n_nokey
            if plan.input.current is not None:
                inl = as_bool(rb.column(f"in{i}"))
                known_any |= inl
                plan._left += int(w[as_bool(rb.column(f"left{i}"))].sum())
                plan._same_seen += int(w[as_bool(rb.column(f"same{i}"))].sum())
                plan._new_for[i] = plan._new_for.get(i, 0) + int(w[keyed & ~inl].sum())
                if self._by_fp:
                    k = whole(rb.column("k"))
                    plan._unmatched.append(k.filter(pa.array(keyed & ~inl)))
                    plan._unmet.append(k.filter(pa.array(as_bool(rb.column(f"left{i}")))))
                cls = np.asarray(pc.fill_null(rb.column(f"cls{i}"), 0).to_numpy(zero_copy_only=False))
                plan.states += np.bincount(cls[inl], weights=w[inl], minlength=len(STATES)).astype(np.int64)
        rows_new = keyed & ~known_any
        if rows_new.any():
            new_keys.append(key_prefixes(whole(rb.column("k")).filter(pa.array(rows_new))))
        if not anytodo.any() and not any(p.input.current is not None for p in self.plans):
            return
        cleaned = self.ids.clean(rb)
        digests = {p: self.ids.payloads(cleaned, p, anytodo) for p in self.platforms}
        cons = rb.column("cons") if "cons" in rb.schema.names else None
        for i, plan in enumerate(self.plans):
            c = plan.counts
            todo = as_bool(rb.column(f"todo{i}"))
            payload, reasons = digests[plan.input.platform]
            has = np.zeros(rb.num_rows, dtype=bool)
            for arr in payload.values():
                has |= ~is_null(arr)
            for reason, mask in reasons.items():
                if n := int((mask & todo).sum()):
                    c.invalid_reasons[reason] += n
            no_id = todo & ~has
            if n := int(no_id.sum()):
                c.invalid += n
                c.invalid_reasons[NO_IDENTIFIER] += n
            member = todo & has
            ccol: pa.Array | None = None
            if plan.input.platform == "google" and cons is not None:
                ccol = whole(cons)
                denied = member & (np.asarray(pc.fill_null(ccol, 0).to_numpy(zero_copy_only=False)) // 3 == 2)
                c.consent_denied += int(denied.sum())
                member &= ~denied
            held = np.zeros(rb.num_rows, dtype=bool)
            worth: tuple[pa.Array, pa.Array] | None = None
            if plan.input.values and self.seg.value is not None:
                member, held = self._check_values(plan, rb, i, member)
                worth = whole(rb.column(f"worth{i}")), whole(rb.column("tier"))
            if plan.input.current is None:
                self._write_base(plan, rb, member, payload, ccol, worth)
            else:
                self._collect(plan, rb, i, member, todo & ~held, payload, ccol, worth)
        fallback = self.ids.fallback_count(cleaned)
        for plan in self.plans:
            plan.counts.fallback_values += fallback

    def _check_values(self, plan: PairPlan, rb: pa.RecordBatch, i: int, member: Mask) -> tuple[Mask, Mask]:
        """Count the members whose value the platform cannot take, by reason. Where a value is required,
        they are not sent: a new one is an invalid row, a known one is `held` as it is (its value last
        sent stays). Returns (members to plan, members held)."""
        c = plan.counts
        codes = np.asarray(pc.fill_null(whole(rb.column(f"worthless{i}")), 0).to_numpy(zero_copy_only=False))
        bad = member & (codes != 0)
        held = np.zeros(rb.num_rows, dtype=bool)
        if not bad.any():
            return member, held
        known = as_bool(rb.column(f"in{i}")) if plan.input.current is not None else held
        for code, reason in VALUE_REASONS.items():
            hit = bad & (codes == code)
            if n := int(hit.sum()):
                c.value_reasons[reason] += n
                if plan.input.value_mode == "required" and (m := int((hit & ~known).sum())):
                    c.invalid += m
                    c.invalid_reasons[reason] += m
        if plan.input.value_mode != "required":
            return member, held
        held = bad & known
        c.unchanged += int(held.sum())
        return member & ~bad, held

    def _payload_arrays(self, plan: PairPlan, payload: dict[str, pa.Array], mask: pa.Array | None,
                        n: int) -> list[pa.Array]:  # fmt: skip
        out = []
        for k in plan.input.payload_keys:
            arr = payload.get(k)
            typ = pa.string() if k in CLEAR_KEYS else pa.binary()
            out.append(_picked(arr, mask) if arr is not None else pa.nulls(n, typ))
        return out

    @staticmethod
    def _value_arrays(worth: tuple[pa.Array, pa.Array] | None, mask: pa.Array | None, n: int) -> list[pa.Array]:
        """The `v` and `t` columns of the members in `mask` (nulls for a pair without values)."""
        if worth is None:
            return [pa.nulls(n, pa.float64()), pa.nulls(n, pa.string())]
        return [_picked(worth[0], mask).cast(pa.float64()), _picked(worth[1], mask).cast(pa.string())]

    def _write_base(self, plan: PairPlan, rb: pa.RecordBatch, member: Mask, payload: dict[str, pa.Array],
                    ccol: pa.Array | None, worth: tuple[pa.Array, pa.Array] | None = None) -> None:  # fmt: skip
        n = int(member.sum())
        if not n:
            return
        plan.counts.adds += n
        if plan._writer is None:  # dry run
            plan._written += n
            return
        mask = None if n == rb.num_rows else pa.array(member)
        size = plan.input.batch_size
        pos = np.arange(plan._written, plan._written + n)
        b = np.zeros(n, dtype=np.int32) if plan.input.full_refresh else (pos // size).astype(np.int32)
        plan._written += n
        cols = [
            _picked(rb.column("k"), mask), pa.array(np.zeros(n, np.uint8)), _picked(rb.column("fp"), mask),
            _picked(rb.column("fq"), mask),
            *self._payload_arrays(plan, payload, mask, n),
            _picked(ccol, mask) if ccol is not None else pa.nulls(n, pa.uint8()), *self._value_arrays(worth, mask, n),
            pa.array(np.full(n, SENT, np.uint8)), pa.array(np.full(n, plan.input.run_id, np.uint32)),
            pa.array(b), pa.nulls(n, pa.timestamp("us", tz="UTC")),
        ]  # fmt: skip
        plan._writer.write(pa.RecordBatch.from_arrays(cols, schema=member_schema(plan.input.payload_keys)))

    def _collect(self, plan: PairPlan, rb: pa.RecordBatch, i: int, member: Mask, todo: Mask,
                 payload: dict[str, pa.Array], ccol: pa.Array | None,
                 worth: tuple[pa.Array, pa.Array] | None = None) -> None:  # fmt: skip
        inl = as_bool(rb.column(f"in{i}"))
        gone = inl & ((todo & ~member) | as_bool(rb.column(f"left{i}")))
        if gone.any():
            plan._gone.append(whole(rb.column("k")).filter(pa.array(gone)))
        if not member.any():
            return
        n = int(member.sum())
        mask = None if n == rb.num_rows else pa.array(member)
        names = ["k", "fp", "fq", *(payload_column(k) for k in plan.input.payload_keys), "c", "v", "t"]
        cols = [
            _picked(rb.column("k"), mask), _picked(rb.column("fp"), mask), _picked(rb.column("fq"), mask),
            *self._payload_arrays(plan, payload, mask, n),
            _picked(ccol, mask) if ccol is not None else pa.nulls(n, pa.uint8()), *self._value_arrays(worth, mask, n),
        ]  # fmt: skip
        plan._cand.append(pa.RecordBatch.from_arrays(cols, names=names))

    # ------------------------------------------------------------------ a pair's delta

    def _read_old(self, plan: PairPlan) -> str:
        """Register the pass's changed rows and departed keys for a pair and read, once, the pair's rows a plan
        can touch: changed and departed members, every owed removal and (by fingerprint) the members with
        the key of a row no member had the fingerprint of. Returns the tag of the tables."""
        inp = plan.input
        con = self.con
        tag = f"p{id(plan)}"
        if plan._read:
            return tag
        keys = [payload_column(k) for k in inp.payload_keys]
        schema = member_schema(inp.payload_keys)
        cand_schema = pa.schema([pa.field("k", pa.binary()), pa.field("fp", pa.uint64()), pa.field("fq", pa.uint64()),
                                 *(schema.field(c) for c in keys), pa.field("c", pa.uint8()),
                                 pa.field("v", pa.float64()), pa.field("t", pa.string())])  # fmt: skip
        cand = pa.Table.from_batches([b.cast(cand_schema) for b in plan._cand], schema=cand_schema)
        gone = pa.table({"k": pa.concat_arrays(plan._gone) if plan._gone else pa.array([], pa.binary())})
        con.register(f"cand_{tag}", cand)
        for name, arrays in (("unmatched", plan._unmatched), ("unmet", plan._unmet)):
            con.register(f"{name}_{tag}", pa.table({"k": pa.concat_arrays(arrays) if arrays else pa.array([], pa.binary())}))
        # a member the pass saw leave by fingerprint whose key is among the changed rows changed, not left
        con.register(f"gone0_{tag}", gone)
        con.execute(f"CREATE OR REPLACE TEMP TABLE gone_{tag} AS SELECT k FROM gone0_{tag} EXCEPT SELECT k FROM cand_{tag}")
        # the pair's rows this plan can touch: changed and departed members, and every owed removal
        con.execute(f"CREATE OR REPLACE TEMP TABLE owedk_{tag} AS SELECT DISTINCT k FROM ({inp.current}) WHERE kind = {OWED}")
        touched = (f"k IN (SELECT k FROM cand_{tag} UNION ALL SELECT k FROM gone_{tag} UNION ALL "
                   f"SELECT k FROM owedk_{tag} UNION ALL SELECT k FROM unmatched_{tag})")  # fmt: skip
        # with their base row numbers (`pos`), which the new delta lists as the base rows it replaces
        rows = f"SELECT * FROM ({inp.positioned or inp.current}) WHERE {touched}"
        con.execute(f"CREATE OR REPLACE TEMP TABLE old_{tag} AS {resolved_sql(rows, *inp.journal)}")
        plan._read = True
        return tag

    def _plan_delta(self, plan: PairPlan) -> None:
        inp = plan.input
        con = self.con
        keys = [payload_column(k) for k in inp.payload_keys]
        schema = member_schema(inp.payload_keys)
        tag = self._read_old(plan)
        mirror = self.seg.mode == "mirror"
        exp = "false"
        if inp.expire_before is not None:
            exp = f"(o.st = {ON} AND o.acc < TIMESTAMPTZ '{inp.expire_before.isoformat()}')"
        same_pay = " AND ".join(f"n.{c} IS NOT DISTINCT FROM o.{c}" for c in keys) or "true"
        ph_new = "hash(" + ", ".join(keys) + ")"  # a payload's identity (NULL and '' hash apart)
        pay_cols = ", ".join(keys)
        o_pay = ", ".join(f"o.{c}" for c in keys)
        # each changed row against the member it was: what to do with it
        # a value that moved by at most the threshold (same tier) is no change; a usable one is never NULL here
        samev = self._value_same(plan, "o.v", "o.t", "n.v", "0", "n.t")
        con.execute(f"""CREATE OR REPLACE TEMP TABLE cmp_{tag} AS
            SELECT n.*, o.k IS NOT NULL AS known, o.st AS ost, o.acc AS oat, o.pending AS opend, o.run AS orun,
                   o.b AS ob, o.c AS oc, o.v AS ov, o.t AS ot, {", ".join(f"o.{c} AS o_{c}" for c in keys)},
                   ({same_pay}) AS samepay, (n.c IS NOT DISTINCT FROM o.c) AS samec, {exp} AS expiring,
                   coalesce({samev}, true) AS samev
            FROM cand_{tag} n LEFT JOIN (SELECT * FROM old_{tag} WHERE kind = {MEMBER}) o USING (k)""")
        # a rejected member is not sent again for its value: the platform refused its identifiers
        keep = f"known AND samepay AND samec AND (samev OR ost = {REJECTED}) AND ost IN ({ON}, {REJECTED}) AND NOT expiring"
        revalue = f"known AND samepay AND samec AND NOT samev AND ost = {ON} AND NOT expiring"
        counts = con.execute(f"""SELECT
            count(*) FILTER (WHERE {keep}),
            count(*) FILTER (WHERE NOT known OR (NOT samepay AND ost NOT IN ({ON}, {MAYBE}))),
            count(*) FILTER (WHERE known AND NOT samepay AND ost IN ({ON}, {MAYBE})),
            count(*) FILTER (WHERE known AND samepay AND samec AND NOT ({keep}) AND NOT ({revalue})),
            count(*) FILTER (WHERE known AND samepay AND NOT samec),
            count(*) FILTER (WHERE {revalue})
            FROM cmp_{tag}""").fetchall()[0]  # fmt: skip
        assert counts is not None
        c = plan.counts
        c.unchanged += int(counts[0])
        c.adds += int(counts[1])
        c.changes += int(counts[2]) if mirror else 0
        c.adds += 0 if mirror else int(counts[2])
        c.resends += int(counts[3])
        c.consent_changes += int(counts[4])
        c.value_changes += int(counts[5])
        leavers = con.execute(f"""SELECT count(*) FROM (SELECT DISTINCT k FROM gone_{tag}) g
            JOIN old_{tag} o ON o.k = g.k AND o.kind = {MEMBER} AND o.st IN ({ON}, {MAYBE})""").fetchall()[0]
        c.removes += int(leavers[0]) if (leavers and mirror) else 0
        if self.dry_run:
            return
        R = inp.run_id
        # new rows of every key this run touches
        member_rows = f"""
            SELECT k, {MEMBER}::UTINYINT AS kind, fp, fq, {pay_cols}, c,
              CASE WHEN {keep} THEN ov ELSE v END AS v, CASE WHEN {keep} THEN ot ELSE t END AS t,
              CASE WHEN {keep} THEN (CASE WHEN opend THEN {SENT} ELSE ost END) ELSE {SENT} END::UTINYINT AS st,
              CASE WHEN {keep} THEN (CASE WHEN opend THEN orun END) ELSE {R} END::UINTEGER AS run,
              CASE WHEN {keep} THEN (CASE WHEN opend THEN ob END) END::INTEGER AS b,
              CASE WHEN {keep} THEN oat END AS acc, NOT ({keep}) AS send
            FROM cmp_{tag}"""
        owed_new = f"""
            SELECT k, {OWED}::UTINYINT AS kind, NULL::UBIGINT AS fp, NULL::UBIGINT AS fq,
                   {", ".join(f"o_{c} AS {c}" for c in keys)}, oc AS c, ov AS v, ot AS t
            FROM cmp_{tag} WHERE {"true" if mirror else "false"} AND known AND NOT samepay
                   AND ost IN ({ON}, {MAYBE})
            UNION ALL
            SELECT o.k, {OWED}::UTINYINT, NULL::UBIGINT, NULL::UBIGINT, {o_pay}, o.c, o.v, o.t FROM old_{tag} o
              WHERE {"true" if mirror else "false"} AND o.kind = {MEMBER} AND o.st IN ({ON}, {MAYBE})
              AND o.k IN (SELECT k FROM gone_{tag})
            UNION ALL
            SELECT o.k, {OWED}::UTINYINT, NULL::UBIGINT, NULL::UBIGINT, {o_pay}, o.c, o.v, o.t FROM old_{tag} o
              WHERE o.kind = {OWED} AND o.st = {TO_SEND}"""
        touched = f"""SELECT k FROM cand_{tag} UNION SELECT k FROM old_{tag} WHERE kind = {OWED}
                      {f"UNION SELECT k FROM gone_{tag}" if mirror else ""}"""
        con.execute(f"CREATE OR REPLACE TEMP TABLE touched_{tag} AS {touched}")
        con.execute(f"CREATE OR REPLACE TEMP TABLE members_{tag} AS {member_rows}")
        # members of touched keys that are otherwise untouched (only an owed row of theirs changed)
        con.execute(f"""INSERT INTO members_{tag}
            SELECT o.k, {MEMBER}, o.fp, o.fq, {o_pay}, o.c, o.v, o.t,
              CASE WHEN o.pending THEN {SENT} ELSE o.st END, CASE WHEN o.pending OR o.st = {MAYBE} THEN o.run END,
              CASE WHEN o.pending THEN o.b END, o.acc, false
            FROM old_{tag} o WHERE o.kind = {MEMBER} AND o.k IN (SELECT k FROM touched_{tag})
              AND o.k NOT IN (SELECT k FROM cand_{tag})
              AND o.k NOT IN (SELECT k FROM gone_{tag} WHERE {"true" if mirror else "false"})""")
        # an owed payload that a member in the new state still sends is not removed (one user to the platform)
        con.execute(f"CREATE OR REPLACE TEMP TABLE owed_{tag} AS SELECT DISTINCT ON (k, ph) * FROM "
                    f"(SELECT *, {ph_new} AS ph FROM ({owed_new}))")  # fmt: skip
        n_owed, n_null = con.execute(f"SELECT count(*), count(*) FILTER (WHERE {keys[0]} IS NULL) FROM owed_{tag}").fetchall()[0]
        if n_owed:
            # the pair's other members that may hold one: those with the first payload field of one
            first = f"{keys[0]} IN (SELECT {keys[0]} FROM owed_{tag})" + (f" OR {keys[0]} IS NULL" if n_null else "")
            holders = inp.resolved_where(f"kind = {MEMBER} AND ({first})")
            con.execute(f"""DELETE FROM owed_{tag} WHERE ph IN (
              SELECT {ph_new} FROM members_{tag} WHERE st IN ({ON}, {MAYBE}, {SENT})
              UNION ALL
              SELECT ph FROM (SELECT k, {ph_new} AS ph FROM ({holders})
                              WHERE st IN ({ON}, {MAYBE}))
                WHERE ph IN (SELECT ph FROM owed_{tag}) AND k NOT IN (SELECT k FROM touched_{tag}))""")
        size = inp.batch_size
        n_rm = con.execute(f"SELECT count(*) FROM owed_{tag}").fetchall()[0]
        n_add = con.execute(f"SELECT count(*) FROM members_{tag} WHERE send").fetchall()[0]
        plan.remove_batches = -(-int(n_rm[0] if n_rm else 0) // size)
        plan.add_batches = -(-int(n_add[0] if n_add else 0) // size)
        plan.sends = int(n_rm[0] if n_rm else 0) + int(n_add[0] if n_add else 0)
        cols = ", ".join(f.name for f in schema)
        rm_b = "0" if inp.full_refresh else f"((row_number() OVER (ORDER BY k, ph) - 1) // {size})"
        add_b = "0" if inp.full_refresh else f"({plan.remove_batches} + (row_number() OVER (ORDER BY k) - 1) // {size})"
        # every member row of the touched keys as the file holds it (the ones to send in their batches)
        con.execute(f"""CREATE OR REPLACE TEMP TABLE rewritten_{tag} AS
            SELECT k, kind, fp, fq, {pay_cols}, c, v, t, st, run, {add_b}::INTEGER AS b, acc FROM members_{tag} WHERE send
            UNION ALL
            SELECT {cols} FROM members_{tag} WHERE NOT send""")
        new_rows = f"""
            SELECT k, kind, fp, fq, {pay_cols}, c, v, t, {SENT}::UTINYINT AS st, {R}::UINTEGER AS run,
                   {rm_b}::INTEGER AS b, NULL::TIMESTAMPTZ AS acc FROM owed_{tag}
            UNION ALL
            SELECT {cols} FROM rewritten_{tag}
            UNION ALL
            SELECT k, {GONE}::UTINYINT, NULL, NULL, {", ".join("NULL" for _ in keys)}, NULL, NULL, NULL, NULL, NULL, NULL, NULL
            FROM touched_{tag} WHERE k NOT IN (SELECT k FROM members_{tag}) AND k NOT IN (SELECT k FROM owed_{tag})"""
        if inp.full_refresh:
            self._write_replace_base(plan, tag, new_rows, cols)
            return
        # the members the file leaves as they were, by state; the ones it rewrites are counted after sending
        kept = plan.states.copy()
        for cls, n in con.execute(f"""SELECT {state_class()}, count(*) FROM old_{tag}
                WHERE kind = {MEMBER} AND k IN (SELECT k FROM touched_{tag}) GROUP BY ALL""").fetchall():
            kept[int(cls)] -= int(n)
        plan.kept_states = [int(n) for n in kept]
        plan.rewritten = con.sql(f"SELECT k, kind, st, run, b, acc FROM rewritten_{tag}").to_arrow_table()
        carried = ""
        if inp.pointer.delta:
            dpath = inp.files.path(inp.pointer.delta)
            carried = (f"UNION ALL SELECT {read_columns(dpath, schema)} FROM read_parquet({sql_path(dpath)}) "
                       f"WHERE kind IN ({MEMBER}, {OWED}, {GONE}) AND k NOT IN (SELECT k FROM touched_{tag})")  # fmt: skip
        con.execute(f"CREATE OR REPLACE TEMP TABLE delta_{tag} AS SELECT {cols} FROM ({new_rows} {carried})")
        # the base rows the delta's keys replace, by row number (and -1: the positions are listed): the rows
        # of the keys this run touched were read with theirs, the earlier delta lists those of its keys
        replaced = "SELECT -1 AS pos"
        prev = inp.files.path(inp.pointer.delta) if inp.pointer.delta else None
        if inp.pointer.base and inp.positioned is not None and (prev is None or replaces_by_position(prev)):
            replaced += f" UNION ALL SELECT pos FROM old_{tag} WHERE pos IS NOT NULL AND k IN (SELECT k FROM delta_{tag})"
            if prev is not None:
                replaced += f" UNION ALL SELECT b FROM read_parquet({sql_path(prev)}) WHERE kind = {REPLACED} AND b >= 0"
        elif inp.pointer.base:  # an earlier delta that replaces by key: the base's rows of the delta's keys
            bpath = inp.files.path(inp.pointer.base)
            replaced += (f" UNION ALL SELECT file_row_number FROM read_parquet({sql_path(bpath)}, file_row_number = true) "
                         f"WHERE k IN (SELECT k FROM delta_{tag})")  # fmt: skip
        name = inp.files.new_name("delta", R)
        plan.file, plan.as_base = name, False
        copy_to(con, inp.files, name, f"""SELECT {cols} FROM (SELECT * FROM delta_{tag} UNION ALL BY NAME
                SELECT {REPLACED}::UTINYINT AS kind, pos::INTEGER AS b FROM ({replaced}))
            ORDER BY (run = {R} AND st = {SENT}) DESC, b, k""")  # fmt: skip

    def _write_replace_base(self, plan: PairPlan, tag: str, new_rows: str, cols: str) -> None:
        """A full refresh: one base holding the pair's whole new state, every member and owed removal in
        the run's replace (batch 0), which settles them all at once when the platform confirms it."""
        inp = plan.input
        R = inp.run_id
        state = f"""SELECT {cols} FROM ({new_rows}) WHERE kind <> {GONE}
            UNION ALL SELECT {cols} FROM ({inp.resolved}) WHERE k NOT IN (SELECT k FROM touched_{tag})"""
        n = self.con.execute(f"SELECT count(*) FROM ({state}) WHERE kind = {MEMBER} AND st <> {REJECTED}").fetchall()[0]
        plan.sends = int(n[0]) if n else 0
        name = inp.files.new_name("base", R)
        plan.file, plan.as_base = name, True
        pay = ", ".join(payload_column(k) for k in inp.payload_keys)
        copy_to(self.con, inp.files, name, f"""SELECT k, kind, fp, fq, {pay}, c, v, t,
              CASE WHEN st = {REJECTED} AND kind = {MEMBER} THEN st ELSE {SENT} END::UTINYINT AS st,
              CASE WHEN st = {REJECTED} AND kind = {MEMBER} THEN run ELSE {R} END::UINTEGER AS run,
              CASE WHEN st = {REJECTED} AND kind = {MEMBER} THEN b ELSE 0 END::INTEGER AS b, acc
            FROM ({state}) ORDER BY st = {SENT} DESC""")  # fmt: skip


Prefixes = npt.NDArray[np.uint64]


def _picked(col: pa.Array | pa.ChunkedArray, mask: pa.Array | None) -> pa.Array:
    """The rows of `col` that `mask` selects (None: every row, not copied)."""
    arr = whole(col)
    return arr if mask is None else arr.filter(mask)


_BUCKETS = 4096  # of a pair's members, for comparing two pairs


def _packed(flags: Sequence[str]) -> tuple[list[str], list[str]]:
    """The pass's flag columns packed into as few UBIGINTs as hold them (booleans a bit each, NULL as false;
    the state classes `cls*` three bits, NULL as 0), and the select list that unpacks them again: grouping by
    one or two integers costs a fraction of grouping by a dozen columns."""
    packed: list[list[str]] = [[]]
    unpacked, shift = [], 0
    for f in flags:
        width = 3 if f.startswith("cls") else 1
        if shift + width > 64:
            packed.append([])
            shift = 0
        code = f"code{len(packed) - 1}"
        if width == 3:
            packed[-1].append(f"(coalesce({f} + 1, 0)::UBIGINT << {shift})")
            unpacked.append(f"(nullif(({code} >> {shift}) & 7, 0) - 1)::UTINYINT AS {f}")
        else:
            packed[-1].append(f"((CASE WHEN {f} THEN 1 ELSE 0 END)::UBIGINT << {shift})")
            unpacked.append(f"(({code} >> {shift}) & 1) = 1 AS {f}")
        shift += width
    return [" | ".join(p) for p in packed], unpacked


def _bucket(cols: Sequence[str]) -> str:
    return f"(hash({', '.join(cols)}) % {_BUCKETS})::INTEGER"


def prefetched(reader: pa.RecordBatchReader, depth: int = 2) -> Iterator[pa.RecordBatch]:
    """The reader's batches, the next ones fetched on a thread of their own while the caller works on the
    current one (DuckDB computes a batch when it is fetched, and releases the GIL while it does)."""
    q: queue.Queue[pa.RecordBatch | BaseException | None] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def pump() -> None:
        try:
            for rb in reader:
                if stop.is_set():
                    return
                q.put(rb)
            q.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=pump, name="pass-reader", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let the pump see `stop` (it may be blocked on a full queue)
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def key_prefixes(keys: pa.Array) -> Prefixes:
    """The first 8 bytes of each 16-byte key (no nulls), as integers: 80 MB for 10M keys, where a set or
    a hash table of the keys would take several times that."""
    _, offsets, data = keys.buffers()
    start = int(np.frombuffer(offsets, dtype=np.int32)[keys.offset])
    raw = np.frombuffer(data, dtype=np.uint64, count=2 * len(keys), offset=start)
    return raw[::2].copy()


def _has_duplicates(prefixes: list[Prefixes]) -> bool:
    """Whether a key may be there twice (equal 64-bit prefixes: a false alarm only costs the exact,
    deduplicating pass)."""
    if not prefixes:
        return False
    p = np.sort(np.concatenate(prefixes))
    return bool((p[1:] == p[:-1]).any())
