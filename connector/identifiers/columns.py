"""Identifier columns of a whole table, normalized and hashed for each platform.

The query that reads the source hands over the raw values of the rows to normalize (`select`). Email and
phone columns (the usual Customer Match segment) then take the SQL rules of `sql.py` in DataFusion, a batch
at a time (`clean`); the values SQL does not vouch for come back flagged and go through the Python rules
one by one. Segments with other fields (names, addresses...) go through the Python rules row by
row. Either way the result is one payload column per platform key (SHA-256 digests as bytes, clear
fields as text) and, per reason, the rows a value was dropped for.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from connector.identifiers import sql as idsql
from connector.identifiers.hashing import run_sql
from connector.identifiers.normalize import FIELD_REASONS, NO_IDENTIFIER, Normalizer

SQL_FIELDS = frozenset({"email", "phone"})
PLATFORM_KEY = {("meta", "email"): "EMAIL", ("meta", "phone"): "PHONE",
                ("google", "email"): "email", ("google", "phone"): "phone"}  # fmt: skip
# payload fields a platform wants unhashed (Meta MADID/EXTERN_ID; Google address parts and raw ids)
CLEAR_KEYS = frozenset({"MADID", "EXTERN_ID", "country_code", "postal_code", "mobile_id", "user_id"})

Mask = npt.NDArray[np.bool_]
Payload = tuple[dict[str, pa.Array], dict[str, Mask]]


def as_bool(col: pa.Array | pa.ChunkedArray) -> Mask:
    return np.asarray(whole(col).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


class ColumnNormalizer:
    """Normalizes a segment's identifier columns for some platforms, in SQL where it can."""

    def __init__(self, identifiers: Mapping[str, str], platforms: Sequence[str], region: str,
                 threads: int | None = None) -> None:  # fmt: skip
        self.identifiers = dict(identifiers)
        self.threads = threads  # DataFusion's, for `clean` (default: one per core)
        self.platforms = sorted(set(platforms))
        self.region = region
        self.in_sql = set(self.identifiers) <= SQL_FIELDS

    def select(self, relation: str, gate: str) -> str:
        """`relation` with the raw values `clean` reads (`raw_<field>`): NULL where `gate` does not hold."""
        raw = [f"CASE WHEN {gate} THEN {idsql.quote(c)} END AS raw_{f}" for f, c in self.identifiers.items()]
        return f"SELECT *, {', '.join(raw)} FROM ({relation})"

    @functools.cached_property
    def _clean_sql(self) -> str:
        """DataFusion's query over a batch's raw values (table `batch`): per SQL field, the digests of each
        platform's form (`d_<platform>_<field>`: of the value cleaned, or the value given already hashed),
        whether a value was given (`pr_`), and the values for the Python rules (`fb_`, their raw value in
        `raw_`). Google's email outside Gmail is Meta's form, hashed once; phones are E.164, without `+`
        for Meta."""
        steps = {
            f: idsql.clean_email(f"raw_{f}", f"e{i}") if f == "email" else idsql.clean_phone(f"raw_{f}", self.region, f"p{i}")
            for i, (f, col) in enumerate(self.identifiers.items())
        }
        q = "batch"
        for depth in range(max(len(c.levels) for c in steps.values())):
            cols = [f"{expr} AS {name}" for c in steps.values() if depth < len(c.levels) for name, expr in c.levels[depth]]
            q = f"(SELECT *, {', '.join(cols)} FROM {q})"
        outs: list[str] = []
        base: list[str] = []
        for f, c in steps.items():
            outs += [f"{c.fallback} AS fb_{f}", f"CASE WHEN {c.fallback} THEN {c.value} END AS raw_{f}", f"{c.present} AS pr_{f}"]
            given = f"decode({c.given}, 'hex')"
            if f == "email":
                base.append(f"CASE WHEN {c.given} IS NOT NULL THEN {given} ELSE sha256({c.clean}) END AS d_email")
                if "google" in self.platforms:
                    gmail, digest = idsql.google_gmail(c.clean)
                    base += [f"{gmail} AS gm_email", f"{digest} AS x_email"]
            else:
                for p in self.platforms:
                    plus = "'+1'" if p == "google" else "'1'"
                    outs.append(f"CASE WHEN {c.given} IS NOT NULL THEN {given} ELSE sha256({plus} || {c.clean}) END AS d_{p}_{f}")
        q = f"(SELECT {', '.join(outs + base)} FROM {q})"
        final = [o.rsplit(" AS ", 1)[-1] for o in outs]
        if "email" in steps:
            final += [f"d_email AS d_{p}_email" for p in self.platforms if p != "google"]
            if "google" in self.platforms:
                final.append("CASE WHEN gm_email THEN x_email ELSE d_email END AS d_google_email")
        return f"SELECT {', '.join(final)} FROM {q}"

    def clean(self, rb: pa.RecordBatch) -> pa.RecordBatch:
        """A batch of `select`'s rows, normalized: for SQL fields, the columns of `_clean_sql` (computed by
        DataFusion, which cleans and hashes a column at a time several times faster than DuckDB's string
        functions); otherwise the raw values, for the Python rules."""
        raw = pa.RecordBatch.from_arrays([whole(rb.column(f"raw_{f}")) for f in self.identifiers],
                                         names=[f"raw_{f}" for f in self.identifiers])  # fmt: skip
        if not self.in_sql:
            return raw
        return run_sql(self._clean_sql, raw, self.threads)

    def fallback_count(self, cleaned: pa.RecordBatch) -> int:
        return sum(int(as_bool(cleaned.column(f"fb_{f}")).sum()) for f in self.identifiers) if self.in_sql else 0

    def payloads(self, cleaned: pa.RecordBatch, platform: str, gate: Mask) -> Payload:
        """A batch of `clean`'s rows for one platform: payload columns and, per reason, the gated rows a
        value was dropped for (`no_identifier` not included: a row without any payload value)."""
        if not self.in_sql:
            return self._rows(cleaned, platform, gate)
        payload: dict[str, pa.Array] = {}
        reasons: dict[str, Mask] = {}
        for f in self.identifiers:
            d = whole(cleaned.column(f"d_{platform}_{f}")).cast(pa.binary())
            fb = as_bool(cleaned.column(f"fb_{f}"))
            bad = as_bool(cleaned.column(f"pr_{f}")) & ~fb & is_null(d)
            if fb.any():
                d, fb_bad = self._fallback(cleaned, f, platform, d, fb)
                bad |= fb_bad
            payload[PLATFORM_KEY[(platform, f)]] = d
            reasons[FIELD_REASONS[f]] = bad & gate
        return payload, reasons

    def _fallback(self, rb: pa.RecordBatch, f: str, platform: str, d: pa.Array, fb: Mask) -> tuple[pa.Array, Mask]:
        """The values SQL left alone, through the Python rules (the reference), one by one."""
        norm = Normalizer(platform, [f], self.region)
        key = PLATFORM_KEY[(platform, f)]
        values = d.to_pylist()
        raws = rb.column(f"raw_{f}").to_pylist()
        bad = np.zeros(len(values), dtype=bool)
        for i in np.flatnonzero(fb).tolist():
            res = norm.normalize({f: raws[i]})
            v = res.payload.get(key)
            values[i] = bytes.fromhex(v) if v is not None else None
            bad[i] = f in res.errors
        return pa.array(values, pa.binary()), bad

    def _rows(self, rb: pa.RecordBatch, platform: str, gate: Mask) -> Payload:
        fields = list(self.identifiers)
        norm = Normalizer(platform, fields, self.region)
        keys = list(norm.schema())
        cols = {f: rb.column(f"raw_{f}").to_pylist() for f in fields}
        vals: dict[str, list[object]] = {k: [None] * rb.num_rows for k in keys}
        reasons: dict[str, Mask] = {}
        for i in np.flatnonzero(gate).tolist():
            res = norm.normalize({f: cols[f][i] for f in fields})
            for k, v in res.payload.items():
                vals[k][i] = v if k in CLEAR_KEYS else bytes.fromhex(v)
            for reason in res.errors.values():
                if reason != NO_IDENTIFIER:
                    reasons.setdefault(reason, np.zeros(rb.num_rows, dtype=bool))[i] = True
        payload = {k: pa.array(v, pa.string() if k in CLEAR_KEYS else pa.binary()) for k, v in vals.items()}
        return payload, reasons


def whole(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def is_null(col: pa.Array | pa.ChunkedArray) -> Mask:
    return np.asarray(whole(col).is_null().to_numpy(zero_copy_only=False), dtype=bool)
