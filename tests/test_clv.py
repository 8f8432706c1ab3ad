"""Predicted customer lifetime value (connector/clv.py): the RFM summary in SQL, the fit, its failures."""

from __future__ import annotations

import csv
import json
import random
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest
from conftest import Shop, customers, segment
from typer.testing import CliRunner

from connector import clv
from connector.cli import app
from connector.errors import ConfigError, SourceError
from connector.settings import ClvConfig

ORDERS = """
[sources.orders]
type = "csv"
path = "orders.csv"
"""
CLV = 'clv = { orders = "orders", customer = "customer_id", time = "ordered_at", amount = "amount", horizon_days = 365 }\n'


def history(customers_: int, seed: int = 7, end: datetime = datetime(2026, 6, 30)) -> list[dict[str, str]]:
    """Orders drawn as the models assume: a personal rate until a personal dropout, values around a
    personal mean."""
    rng = random.Random(seed)
    rows = []
    for i in range(customers_):
        rate, dropout = rng.gammavariate(1.0, 1 / 30), rng.betavariate(1.0, 3.0)
        mean = rng.gammavariate(4.0, 15.0)
        t = rng.uniform(0, 500)
        while t <= 500:
            when = end - timedelta(days=500 - t)
            rows.append({"customer_id": f"C{i:03d}", "ordered_at": when.isoformat(timespec="seconds"),
                         "amount": f"{rng.gammavariate(5.0, mean / 5.0):.2f}"})  # fmt: skip
            if rng.random() < dropout:
                break
            t += rng.expovariate(rate)
    return rows


def write_orders(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["customer_id", "ordered_at", "amount"])
        w.writeheader()
        w.writerows(rows)


def orders_table(rows: list[dict[str, str]]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("CREATE TABLE orders (customer_id VARCHAR, ordered_at VARCHAR, amount VARCHAR)")
    con.executemany("INSERT INTO orders VALUES (?, ?, ?)", [[r["customer_id"], r["ordered_at"], r["amount"]] for r in rows])
    return con


SPEC = ClvConfig(orders="orders")


# ----------------------------------------------------------------------------- the summary


def test_rfm_summary_in_sql_is_pymc_marketings() -> None:
    from pymc_marketing.clv import rfm_summary

    rows = history(60)
    # orders of one day are one period: a second order on a customer's first and last days
    rows += [{**rows[0], "amount": "12.5"}, {**rows[-1], "ordered_at": rows[-1]["ordered_at"][:10] + "T23:59:59"}]
    con = orders_table(rows)
    ours = con.sql(clv.rfm_sql("orders", SPEC)).to_df()
    frame = pd.DataFrame(rows).assign(amount=lambda d: d["amount"].astype(float), ordered_at=lambda d: pd.to_datetime(d["ordered_at"]))
    theirs = rfm_summary(frame, "customer_id", "ordered_at", "amount").sort_values("customer_id").reset_index(drop=True)
    assert list(ours["customer_id"]) == list(theirs["customer_id"])
    for col in ("frequency", "recency", "T", "monetary_value"):
        assert ours[col].tolist() == pytest.approx(theirs[col].tolist(), abs=1e-6), col
    assert (ours["frequency"] > 0).sum() > 20  # the data has repeat customers to compare


def test_hostile_orders_are_skipped_and_counted_per_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = history(40)
    hostile = [("", "2026-01-01", "10"), ("C001", "yesterday", "10"), ("C001", "2026-01-01", "ten"),
               ("C001", "2026-01-01", "NaN"), ("C001", "2026-01-01", "-5"), ("C001", "2026-01-01", "0"),
               ("C001", "2026-01-01", "1e300"), ("C001", "2026-01-01", "inf"), ("C001", "2026-01-01T10:00:00+02:00", "3")]  # fmt: skip
    rows += [{"customer_id": c, "ordered_at": t, "amount": a} for c, t, a in hostile]
    con = orders_table(rows)
    seen: list[pd.DataFrame] = []
    monkeypatch.setattr(clv, "_fit_and_predict", lambda models, rfm, spec, where: seen.append(rfm) or rfm.column("frequency"))
    monkeypatch.setattr(clv, "_models", lambda where: (None, None))
    _, summary = clv.predict(con, "orders", SPEC.model_copy(update={"min_repeat_customers": 1}), source="customers")
    assert summary.skipped_orders == {"no_customer": 1, "time_unreadable": 1, "amount_unreadable": 2,
                                      "amount_not_positive": 2, "amount_too_large": 2}  # fmt: skip
    assert summary.orders == len(rows) - 8  # the order with a time zone counts
    assert summary.customers == 40 and summary.customers == seen[0].num_rows


def test_too_few_repeat_customers_is_a_source_error_saying_why() -> None:
    con = orders_table([{"customer_id": f"C{i}", "ordered_at": "2026-01-01", "amount": "5"} for i in range(30)])
    with pytest.raises(SourceError, match=r"sources.customers.clv: 0 of 30 customers .* min_repeat_customers = 20"):
        clv.predict(con, "orders", SPEC, source="customers")


def test_without_pymc_marketing_the_fix_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymc_marketing.clv", None)
    with pytest.raises(ConfigError, match=r"pip install 'connector\[clv\]'"):
        clv.predict(orders_table(history(60)), "orders", SPEC, source="customers")


def test_a_fit_that_raises_is_a_source_error_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def fit(self, *a: Any, **k: Any) -> None:
            raise RuntimeError("Optimization failed\nwith details")

    monkeypatch.setattr(clv, "_models", lambda where: (Broken, Broken))
    with pytest.raises(SourceError, match=r"the fit failed \(RuntimeError: Optimization failed\)$"):
        clv.predict(orders_table(history(60)), "orders", SPEC, source="customers")


def test_the_same_orders_are_not_fitted_again_and_no_customer_id_is_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fits: list[int] = []

    def fit(models: Any, rfm: Any, spec: Any, where: str) -> Any:
        fits.append(rfm.num_rows)
        return rfm.column("monetary_value")

    monkeypatch.setattr(clv, "_fit_and_predict", fit)
    monkeypatch.setattr(clv, "_models", lambda where: (None, None))
    rows = history(60)
    cache = tmp_path / "clv"
    first, s1 = clv.predict(orders_table(rows), "orders", SPEC, source="customers", cache=cache)
    again, s2 = clv.predict(orders_table(rows), "orders", SPEC, source="customers", cache=cache)
    assert fits == [60] and not s1.cached and s2.cached and s2.fit_seconds == 0
    assert again.equals(first) and s2.mean_value == s1.mean_value
    (kept,) = cache.glob("clv-*.arrow")
    assert b"C00" not in kept.read_bytes()  # values only, in the summary's order
    # another horizon, or one more order: fitted again
    clv.predict(orders_table(rows), "orders", SPEC.model_copy(update={"horizon_days": 30}), source="customers", cache=cache)
    clv.predict(orders_table([*rows, {**rows[0], "ordered_at": "2026-06-30"}]), "orders", SPEC, source="customers", cache=cache)
    assert len(fits) == 3
    # a damaged file is fitted again, never an error; only the CACHE_KEEP most recently used stay
    kept.write_bytes(kept.read_bytes()[:40])
    _, s3 = clv.predict(orders_table(rows), "orders", SPEC, source="customers", cache=cache)
    assert not s3.cached and len(fits) == 4
    for days in range(1, clv.CACHE_KEEP + 2):
        clv.predict(orders_table(rows), "orders", SPEC.model_copy(update={"horizon_days": days}), source="customers", cache=cache)
    assert len(list(cache.glob("clv-*.arrow"))) == clv.CACHE_KEEP and not list(cache.glob("*.tmp"))


# ----------------------------------------------------------------------------- through a sync


def shop_with_orders(tmp: Path, config: str, orders: list[dict[str, str]], n_customers: int) -> Shop:
    shop = Shop(tmp, ORDERS + config)
    text = (tmp / "connector.toml").read_text()
    (tmp / "connector.toml").write_text(text.replace('path = "customers.csv"\n', f'path = "customers.csv"\n{CLV}', 1))
    shop.write(customers(n_customers, segment=lambda i: "a" if i % 2 else "b"))
    write_orders(tmp / "orders.csv", orders)
    return shop


def test_value_tiers_from_orders_end_to_end(tmp_path: Path) -> None:
    orders = history(300)
    # C000 orders big and often until the end; C001 once, long ago, a little
    orders = [o for o in orders if o["customer_id"] not in ("C000", "C001")]
    orders += [{"customer_id": "C000", "ordered_at": (datetime(2026, 6, 30) - timedelta(days=7 * k)).isoformat(),
                "amount": "400"} for k in range(40)]  # fmt: skip
    orders += [{"customer_id": "C001", "ordered_at": "2025-02-01T10:00:00", "amount": "3"},
               {"customer_id": "C999", "ordered_at": "oops", "amount": "3"}]  # fmt: skip
    shop = shop_with_orders(tmp_path, segment("value", tiers='{ by = "clv", high = 0.10, medium = 0.30 }')
                            + segment("big", where="clv > 100"), orders, 320)  # fmt: skip
    results = shop.sync()
    assert {r.status for r in results.values()} == {"success"}, [r.error for r in results.values()]
    summary = results["value_high"].clv
    assert summary is not None and summary == results["big"].clv  # one fit for the source
    assert summary["customers"] == 300 and summary["matched_customers"] == 300  # C300..C319 never ordered
    assert 0.2 < summary["repeat_share"] < 0.9 and summary["mean_value"] > 0 and summary["fit_seconds"] > 0
    assert summary["skipped_orders"] == {"time_unreadable": 1}
    high, rest = shop.members("value_high"), shop.members("value_rest")
    assert len(high) == 30 and len(shop.members("value_medium")) == 60 and len(rest) == 230
    assert 0 in high and 1 in rest and set(range(300, 320)) <= rest
    assert results["value_rest"].tier == {"name": "rest", "by": "clv", "members": 230, "of_rows": 320,
                                          "rows_without_value": 20}  # fmt: skip
    assert 0 in shop.members("big") and 1 not in shop.members("big")
    # the same orders give the same values: nothing moves on the next run
    again = shop.sync()
    assert all(r.counts.adds == 0 and r.counts.removes == 0 and r.write_calls == 0 for r in again.values())
    kept = again["value_high"].clv
    assert kept is not None and kept["cached"] and kept["fit_seconds"] == 0 and not summary["cached"]
    assert kept["mean_value"] == summary["mean_value"] and kept["matched_customers"] == 300


def test_a_failed_fit_stops_only_the_segments_reading_the_value(tmp_path: Path) -> None:
    once = [{"customer_id": f"C{i:03d}", "ordered_at": "2026-01-01", "amount": "5"} for i in range(10)]
    shop = shop_with_orders(tmp_path, segment("value", tiers='{ by = "clv", top = 0.5 }') + segment("b", where="segment = 'b'"),
                            once, 10)  # fmt: skip
    results = shop.sync()
    assert results["b"].status == "success" and shop.members("b") == {0, 2, 4, 6, 8}
    for name in ("value_top", "value_rest"):
        assert results[name].status == "failed"
        assert "0 of 10 customers ordered on more than one day" in (results[name].error or "")
        assert results[name].error_kind is None  # the data's doing, not the config's: exit code 1


def test_validate_checks_the_clv_columns(tmp_path: Path) -> None:
    shop = Shop(tmp_path, ORDERS + segment("value", tiers='{ by = "clv", top = 0.5 }'))
    bad = 'clv = { orders = "orders", customer = "buyer", key = "customer_id", time = "when", amount = "amount" }\n'
    text = (tmp_path / "connector.toml").read_text().replace('path = "customers.csv"\n', f'path = "customers.csv"\n{bad}', 1)
    (tmp_path / "connector.toml").write_text(text)
    shop.write(customers(2))
    write_orders(tmp_path / "orders.csv", [])
    res = CliRunner().invoke(app, ["validate", "--config", str(tmp_path / "connector.toml"), "--json"])
    assert res.exit_code == 2
    assert json.loads(res.stdout)["problems"] == [
        "sources.customers.clv: the orders (sources.orders) have no column(s) 'buyer', 'when' (set clv.customer, "
        "clv.time, clv.amount); available columns: customer_id, ordered_at, amount"]
