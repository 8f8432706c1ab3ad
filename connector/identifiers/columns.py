"""Identifier columns of a whole table, normalized and hashed for each platform.

Email and phone columns (the usual Customer Match segment) take the SQL rules of `sql.py` inside the
query that reads them; the values SQL does not vouch for come back flagged and go through the Python
rules one by one. Segments with other fields (names, addresses...) go through the Python rules row by
row. Either way the result is one payload column per platform key (SHA-256 digests as bytes, clear
fields as text) and, per reason, the rows a value was dropped for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from connector.identifiers import sql as idsql
from connector.identifiers.hashing import sha256_columns, unhex_column
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

    def __init__(self, identifiers: Mapping[str, str], platforms: Sequence[str], region: str) -> None:
        self.identifiers = dict(identifiers)
        self.platforms = sorted(set(platforms))
        self.region = region
        self.in_sql = set(self.identifiers) <= SQL_FIELDS

    def select(self, relation: str, gate: str) -> str:
        """`relation` with the columns `payloads` reads added: for each row where `gate` holds, the cleaned
        values (SQL fields: hashed by `digests`, outside SQL), or the raw values (the Python rules')."""
        if not self.in_sql:
            raw = [f"CASE WHEN {gate} THEN {idsql.quote(c)} END AS raw_{f}" for f, c in self.identifiers.items()]
            return f"SELECT *, {', '.join(raw)} FROM ({relation})"
        steps = {
            f: idsql.clean_email(col, gate, f"e{i}") if f == "email" else idsql.clean_phone(col, self.region, gate, f"p{i}")
            for i, (f, col) in enumerate(self.identifiers.items())
        }
        q = relation
        for depth in range(max(len(c.levels) for c in steps.values())):
            cols = [f"{expr} AS {name}" for c in steps.values() if depth < len(c.levels) for name, expr in c.levels[depth]]
            q = f"SELECT *, {', '.join(cols)} FROM ({q})"
        cleaned = []
        for f, c in steps.items():
            cleaned += [
                f"{c.clean} AS c_{f}",
                f"{c.given} AS g_{f}",
                f"{c.fallback} AS fb_{f}",
                f"CASE WHEN {c.fallback} THEN {c.value} END AS raw_{f}",
                f"{c.present} AS pr_{f}",
            ]
        inner = ", ".join(name for c in steps.values() for name in c.names())
        q = f"SELECT * EXCLUDE ({inner}), {', '.join(cleaned)} FROM ({q})"
        if "email" in self.identifiers and "google" in self.platforms:
            gmail, form = idsql.google_gmail("c_email")
            q = f"SELECT *, {gmail} AS gm_email, {form} AS x_email FROM ({q})"
        return q

    def digests(self, rb: pa.RecordBatch) -> dict[tuple[str, str], pa.Array]:
        """A batch of `select`'s rows: per (platform, SQL field), the digests of the values SQL cleaned and
        of those given already hashed. Google's email outside Gmail is Meta's form, hashed once; phones are
        hashed as E.164, without `+` for Meta."""
        if not self.in_sql:
            return {}
        forms: dict[str, tuple[pa.Array, str]] = {}
        for f in self.identifiers:
            clean = whole(rb.column(f"c_{f}"))
            if f == "phone":
                for p in self.platforms:
                    forms[f"{p}_phone"] = (clean, "+1" if p == "google" else "1")
            else:
                forms["email"] = (clean, "")
                if "google" in self.platforms:
                    forms["gmail"] = (whole(rb.column("x_email")), "")
        hashed = sha256_columns(forms)
        out: dict[tuple[str, str], pa.Array] = {}
        for f in self.identifiers:
            given = whole(rb.column(f"g_{f}"))
            for p in self.platforms:
                d = hashed[f"{p}_phone"] if f == "phone" else hashed["email"]
                if f == "email" and p == "google":
                    d = pc.if_else(whole(rb.column("gm_email")), hashed["gmail"], d)
                if given.null_count < len(given):
                    d = pc.if_else(given.is_valid(), unhex_column(given), d)
                out[(p, f)] = d
        return out

    def fallback_count(self, rb: pa.RecordBatch) -> int:
        return sum(int(as_bool(rb.column(f"fb_{f}")).sum()) for f in self.identifiers) if self.in_sql else 0

    def payloads(self, rb: pa.RecordBatch, platform: str, gate: Mask,
                 digests: Mapping[tuple[str, str], pa.Array] | None = None) -> Payload:  # fmt: skip
        """A batch of `select`'s rows for one platform: payload columns and, per reason, the gated rows
        a value was dropped for (`no_identifier` not included: a row without any payload value).
        `digests`: the batch's `digests`, when several platforms share them."""
        if not self.in_sql:
            return self._rows(rb, platform, gate)
        if digests is None:
            digests = self.digests(rb)
        payload: dict[str, pa.Array] = {}
        reasons: dict[str, Mask] = {}
        for f in self.identifiers:
            d = digests[(platform, f)]
            fb = as_bool(rb.column(f"fb_{f}"))
            bad = as_bool(rb.column(f"pr_{f}")) & ~fb & is_null(d)
            if fb.any():
                d, fb_bad = self._fallback(rb, f, platform, d, fb)
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
