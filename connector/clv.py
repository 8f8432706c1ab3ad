"""Predicted customer lifetime value: orders -> one predicted value per customer over a horizon.

The orders (customer, time, amount; text columns, as every source hands them) are summarized in DuckDB
SQL into the RFM table the models take, with the conventions of pymc-marketing's `rfm_summary` (daily
periods, orders of one day summed, the first day not counted as a repeat; `tests/test_clv.py` holds the
two equal):

- ``frequency``: days with an order after the first one;
- ``recency``: days from the first to the last order day;
- ``T``: days from the first order day to the last order day of the whole table (the end of observation,
  so a given table always gives the same summary, whatever the date of the run);
- ``monetary_value``: the mean order-day total of the repeat days (0 without one).

An order row counts when it has a customer, a readable time (ISO date or timestamp) and a positive finite
amount below 10^13; the others are skipped and counted per reason. Amounts are summed as decimals, so the
summary does not depend on the order DuckDB's threads add them in.

Then pymc-marketing's BG/NBD model (`BetaGeoModel`: how many orders each customer will place) and
Gamma-Gamma model (`GammaGammaModel`: the value of an order; fitted on the customers with a repeat day)
are fitted by MAP, and `expected_customer_lifetime_value` gives each customer's expected spend over
``horizon_days``, rounded to cents. pymc-marketing is an optional dependency: ``pip install
'connector[clv]'``.

A fit's predictions are kept in the state directory (``clv/``), by the SHA-256 of the RFM table, the
horizon and the pymc-marketing version: the same orders are not fitted again (nor pymc-marketing
imported), on the next sync or by the next tier's. Only the values are kept, in the summary's customer
order: no customer id is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from connector.errors import ConfigError, SourceError
from connector.settings import ClvConfig
from connector.sources.base import ident

log = logging.getLogger("connector.clv")

MAX_AMOUNT = 1e13  # larger amounts are typos or test data; beyond DECIMAL(18, 4) anyway
DAYS_A_MONTH = 30  # pymc-marketing's `future_t` counts months of 30 days when time_unit = "D"
CACHE_KEEP = 8  # fits kept in the state directory (the most recently used)
SKIP_REASONS = ("no_customer", "time_unreadable", "amount_unreadable", "amount_not_positive", "amount_too_large")


@dataclass(slots=True)
class ClvSummary:
    """What one fit saw and predicted; reported with each run of a segment that uses it."""

    source: str
    orders_source: str
    horizon_days: int
    orders: int = 0  # order rows used
    skipped_orders: dict[str, int] = field(default_factory=dict)  # reason -> rows
    customers: int = 0  # customers with an order (the fitted population)
    repeat_customers: int = 0  # customers with orders on more than one day
    matched_customers: int = 0  # rows of the customer source that got a value
    mean_value: float | None = None  # mean predicted value over the fitted customers
    fit_seconds: float = 0.0
    cached: bool = False  # the predictions of an earlier fit of the same orders: no fit this time

    @property
    def repeat_share(self) -> float:
        return self.repeat_customers / self.customers if self.customers else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "orders_source": self.orders_source,
            "horizon_days": self.horizon_days,
            "orders": self.orders,
            "skipped_orders": {k: v for k, v in self.skipped_orders.items() if v},
            "customers": self.customers,
            "repeat_customers": self.repeat_customers,
            "repeat_share": round(self.repeat_share, 4),
            "matched_customers": self.matched_customers,
            "mean_value": None if self.mean_value is None else round(self.mean_value, 2),
            "fit_seconds": round(self.fit_seconds, 3),
            "cached": self.cached,
        }


def order_columns(spec: ClvConfig) -> list[str]:
    return list(dict.fromkeys([spec.customer, spec.time, spec.amount]))


def rfm_sql(orders: str, spec: ClvConfig) -> str:
    """SQL of the per-customer summary (customer_id, frequency, recency, T, monetary_value) of the order
    rows in `orders` (a table or view of text columns), ordered by customer."""
    return f"""WITH days AS (
        SELECT c, d, sum(amt) AS amt FROM ({_parsed(orders, spec)}) WHERE reason IS NULL GROUP BY c, d
    ), per AS (
        SELECT c, count(*) - 1 AS f, min(d) AS first, max(d) AS last, sum(amt) - arg_min(amt, d) AS repeat_total
        FROM days GROUP BY c
    )
    SELECT c AS customer_id, f::DOUBLE AS frequency, (last - first)::DOUBLE AS recency,
           ((SELECT max(d) FROM days) - first)::DOUBLE AS "T",
           CASE WHEN f > 0 THEN (repeat_total / f)::DOUBLE ELSE 0.0 END AS monetary_value
    FROM per ORDER BY c"""


def _parsed(orders: str, spec: ClvConfig) -> str:
    """Each order row: customer, day, amount as a decimal, and why it is skipped (NULL: it counts)."""
    c, t, a = ident(spec.customer), ident(spec.time), ident(spec.amount)
    ts = f"coalesce(TRY_CAST({t} AS TIMESTAMP), timezone('UTC', TRY_CAST({t} AS TIMESTAMPTZ)))"
    return f"""SELECT c, ts::DATE AS d, CASE WHEN reason IS NULL THEN round(x, 4)::DECIMAL(18, 4) END AS amt, reason FROM (
        SELECT c, ts, x, CASE
            WHEN c IS NULL THEN 'no_customer'
            WHEN ts IS NULL THEN 'time_unreadable'
            WHEN x IS NULL OR isnan(x) THEN 'amount_unreadable'
            WHEN x <= 0 THEN 'amount_not_positive'
            WHEN NOT isfinite(x) OR x >= {MAX_AMOUNT} THEN 'amount_too_large'
        END AS reason
        FROM (SELECT nullif(trim({c}), '') AS c, {ts} AS ts, TRY_CAST(trim({a}) AS DOUBLE) AS x FROM {orders}))"""


def predict(con: duckdb.DuckDBPyConnection, orders: str, spec: ClvConfig, *, source: str,
            cache: Path | None = None) -> tuple[pa.Table, ClvSummary]:  # fmt: skip
    """Fit both models on the orders in `orders` (a table of text columns) and predict every ordering
    customer's value over the horizon: a table (customer_id string, value double) and the summary.
    `cache`: the folder of earlier fits' predictions (None: always fit).

    Raises `ConfigError` when pymc-marketing is not installed, `SourceError` when the orders cannot give
    a fit (too few repeat customers, a fit that does not converge)."""
    where = f"sources.{source}.clv"
    summary = ClvSummary(source, spec.orders, spec.horizon_days)
    reasons = dict(con.execute(f"SELECT reason, count(*) FROM ({_parsed(orders, spec)}) GROUP BY reason").fetchall())
    summary.orders = int(reasons.pop(None, 0))
    summary.skipped_orders = {r: int(reasons.get(r, 0)) for r in SKIP_REASONS}
    rfm = con.sql(rfm_sql(orders, spec)).to_arrow_table()
    summary.customers = rfm.num_rows
    summary.repeat_customers = int(pc.sum(pc.greater(rfm.column("frequency"), 0)).as_py() or 0)
    if summary.repeat_customers < spec.min_repeat_customers:
        raise SourceError(
            f"{where}: {summary.repeat_customers} of {summary.customers} customers ordered on more than one day "
            f"({summary.orders} usable orders); at least min_repeat_customers = {spec.min_repeat_customers} are needed "
            "to fit the models"
        )
    key = fit_key(rfm, spec)
    values = _cached(cache, key, rfm.num_rows)
    summary.cached = values is not None
    if values is None:
        models = _models(where)
        t0 = time.perf_counter()
        values = _fit_and_predict(models, rfm, spec, where)
        summary.fit_seconds = time.perf_counter() - t0
        _keep(cache, key, values)
    summary.mean_value = float(pc.mean(values).as_py()) if len(values) else None
    return pa.table({"customer_id": rfm.column("customer_id"), "value": values}), summary


def fit_key(rfm: pa.Table, spec: ClvConfig) -> str:
    """What a fit's predictions depend on: the RFM table, the horizon, the models' version."""
    try:
        version = metadata.version("pymc-marketing")
    except metadata.PackageNotFoundError:
        version = "-"
    h = hashlib.sha256(f"connector.clv/1 horizon={spec.horizon_days} pymc-marketing={version}\n".encode())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rfm.schema) as w:
        w.write_table(rfm)
    h.update(memoryview(sink.getvalue()))
    return h.hexdigest()


def _cache_file(cache: Path, key: str) -> Path:
    return cache / f"clv-{key[:32]}.arrow"


def _cached(cache: Path | None, key: str, rows: int) -> pa.Array | None:
    """An earlier fit's predictions for `key`, or None (none kept, or unreadable: fitted again)."""
    if cache is None or not (path := _cache_file(cache, key)).exists():
        return None
    try:
        with pa.OSFile(str(path)) as f:  # read into memory: another process may replace or prune the file
            table = pa.ipc.open_file(f).read_all()
        if table.schema.metadata is None or table.schema.metadata.get(b"key") != key.encode():
            return None
        values = table.column("value").combine_chunks()
        if len(values) != rows or values.type != pa.float64():
            return None
        os.utime(path)  # recently used: kept
        return values
    except (OSError, pa.ArrowException, KeyError) as exc:
        log.warning("predicted values kept in %s are unreadable (%s): fitting again", path.name, type(exc).__name__)
        return None


def _keep(cache: Path | None, key: str, values: pa.Array) -> None:
    """Keep a fit's predictions (written whole, then renamed into place) and drop the least recently
    used beyond CACHE_KEEP. A cache that cannot be written only costs the next sync a fit."""
    if cache is None:
        return
    path = _cache_file(cache, key)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")  # two processes may fit at once
    try:
        cache.mkdir(parents=True, exist_ok=True)
        table = pa.table({"value": values}).replace_schema_metadata({"key": key})
        with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        os.replace(tmp, path)
        kept = sorted(cache.glob("clv-*.arrow"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.warning("could not keep the predicted values in %s (%s)", cache, exc.strerror or type(exc).__name__)


def _models(where: str) -> tuple[Any, Any]:
    # arviz logs which of its optional packages are missing: noise in a sync's output
    logging.getLogger("arviz.preview").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # arviz and pytensor announce their own plans on import
            from pymc_marketing.clv import BetaGeoModel, GammaGammaModel
    except ImportError as exc:
        raise ConfigError(
            f"{where}: predicted values need pymc-marketing, which is not installed "
            f"({exc.name} is missing): pip install 'connector[clv]'"
        ) from None
    return BetaGeoModel, GammaGammaModel


def _fit_and_predict(models: tuple[Any, Any], rfm: pa.Table, spec: ClvConfig, where: str) -> pa.Array:
    import numpy as np

    beta_geo, gamma_gamma = models
    # the models index customers by `customer_id` (coordinates, sorted when combined): positions, not the
    # keys, keep that cheap at a million customers and map the values back without depending on a sort
    positions = np.arange(rfm.num_rows)
    data = rfm.drop_columns(["customer_id"]).to_pandas().assign(customer_id=positions)
    repeat = data[data["frequency"] > 0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bg = beta_geo()
            bg.fit(data[["customer_id", "frequency", "recency", "T"]], method="map", progressbar=False)
            gg = gamma_gamma()
            gg.fit(repeat[["customer_id", "frequency", "monetary_value"]], method="map", progressbar=False)
            q = float(np.asarray(gg.fit_result["q"]).ravel()[0])
            if not q > 1:
                # the expected order value is p * v / (q - 1): no finite mean without q > 1
                raise ArithmeticError("the order values do not fit the Gamma-Gamma model (q <= 1)")
            clv = gg.expected_customer_lifetime_value(
                bg, data, future_t=spec.horizon_days / DAYS_A_MONTH, discount_rate=0.0, time_unit="D"
            )
    except Exception as exc:  # noqa: BLE001 - the library's errors are many; the segment stops with the reason
        first = str(exc).strip().split("\n", 1)[0][:200]
        raise SourceError(f"{where}: the fit failed ({type(exc).__name__}: {first})") from None
    values = np.asarray(clv.sel(customer_id=positions)).reshape(-1)
    if values.shape[0] != rfm.num_rows or not np.all(np.isfinite(values)):
        raise SourceError(f"{where}: the fit gave {int(np.sum(~np.isfinite(values)))} non-finite predictions; "
                          "check the orders' amounts and times")  # fmt: skip
    return pc.round(pa.array(np.maximum(values, 0.0), pa.float64()), 2)
