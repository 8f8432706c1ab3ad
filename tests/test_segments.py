"""Named sources read once per sync, `where` predicates and value tiers (connector/segments.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import SHOP_HEAD, Shop, customers, segment
from pydantic import ValidationError
from typer.testing import CliRunner

from connector.cli import app
from connector.segments import predicate_columns
from connector.settings import ConnectorSettings
from connector.sources.files import CsvFileSource

# ----------------------------------------------------------------------------- predicates


def test_predicate_columns_are_the_columns_it_reads() -> None:
    assert predicate_columns("orders > 1 AND lower(country) IN ('us', 'ca')") == ["orders", "country"]
    assert predicate_columns('"first name" LIKE \'M%\' OR c.clv > 2') == ["first name", "clv"]
    assert predicate_columns("list_filter(tags, t -> t = 'vip') <> []") == ["tags"]  # a lambda's parameter is not a column
    assert predicate_columns("true") == []
    assert predicate_columns("orders > 1 -- a comment to the end") == ["orders"]


@pytest.mark.parametrize("bad", [
    "orders >",  # does not parse
    "1) UNION ALL SELECT * FROM secrets WHERE (1",  # closes the condition and adds a query
    "1) LIMIT (5",
    "1); DROP TABLE x; SELECT (1",
    "1) GROUP BY (1",
])  # fmt: skip
def test_what_is_not_one_predicate_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="predicate"):
        predicate_columns(bad)


# ----------------------------------------------------------------------------- where


def test_where_over_typed_columns_keeps_the_members_text(tmp_path: Path) -> None:
    shop = Shop(tmp_path, segment("big", where='"orders" >= 3 AND zip = \'02134\' AND since < DATE \'2024-06-01\''))
    shop.write(customers(12, orders=lambda i: i, zip=lambda i: "02134" if i % 2 else "10001",
                         since=lambda i: f"2024-0{1 + i % 9}-15"))  # fmt: skip
    res = shop.sync()["big"]
    assert res.status == "success", res.error
    # orders >= 3 (integers: as text, "11" < "3"), zip compared as text (its leading zero kept), since < June
    assert shop.members("big") == {3, 9, 11}


def test_a_predicate_that_does_not_bind_is_a_config_error_with_the_column_types(tmp_path: Path) -> None:
    shop = Shop(tmp_path, segment("s", where="email > 3"))
    shop.write(customers(3))
    res = shop.sync()["s"]
    assert res.status == "failed" and res.error_kind == "config"
    assert "segments.s.where" in (res.error or "") and "email (varchar)" in (res.error or "")
    assert "user1@example.com" not in (res.error or "")


def test_a_conversion_error_never_quotes_the_value(tmp_path: Path) -> None:
    shop = Shop(tmp_path, segment("s", where="CAST(email AS INTEGER) > 3"))
    shop.write(customers(3))
    res = shop.sync()["s"]
    assert res.status == "failed" and "segments.s.where" in (res.error or "") and "TRY_CAST" in (res.error or "")
    assert "example.com" not in (res.error or "")


def test_inline_source_with_where(tmp_path: Path) -> None:
    shop = Shop(tmp_path, '\n[segments.s]\nsource = { type = "csv", path = "customers.csv" }\nkey = "customer_id"\n'
                          'identifiers = { email = "email" }\ndestinations = ["meta"]\nwhere = "n % 2 = 0"\n')  # fmt: skip
    shop.write(customers(6, n=lambda i: i))
    assert shop.sync()["s"].status == "success"
    assert shop.members("s") == {0, 2, 4}


# ----------------------------------------------------------------------------- read once


def test_a_named_source_is_read_once_per_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real = CsvFileSource.relation

    def counting(self: CsvFileSource, con: Any, columns: Any) -> Any:
        reads.append(self.path.name)
        return real(self, con, columns)

    monkeypatch.setattr(CsvFileSource, "relation", counting)
    shop = Shop(tmp_path, segment("a", where="n < 5") + segment("b", where="n >= 5")
                + segment("v", tiers='{ by = "n", top = 0.5 }'))  # fmt: skip
    shop.write(customers(10, n=lambda i: i))
    results = shop.sync()
    assert {r.status for r in results.values()} == {"success"}
    assert set(results) == {"a", "b", "v_top", "v_rest"}
    assert reads == ["customers.csv"]
    assert shop.members("a") == {0, 1, 2, 3, 4} and shop.members("b") == {5, 6, 7, 8, 9}
    assert shop.members("v_top") == {5, 6, 7, 8, 9} and shop.members("v_rest") == {0, 1, 2, 3, 4}
    reads.clear()
    shop.sync(["v"])  # a tiered segment's name stands for its tiers
    assert reads == ["customers.csv"]


# ----------------------------------------------------------------------------- tiers


def tiers_of(shop: Shop, names: list[str]) -> dict[str, set[int]]:
    results = shop.sync()
    assert all(r.status == "success" for r in results.values()), [r.error for r in results.values()]
    return {n: shop.members(n) for n in names}


def test_tier_cuts_are_exact_cumulative_shares(tmp_path: Path) -> None:
    shop = Shop(tmp_path, segment("v", tiers='{ by = "value", high = 0.10, medium = 0.30 }'))
    shop.write(customers(10, value=lambda i: i * 10))
    got = tiers_of(shop, ["v_high", "v_medium", "v_rest"])
    # 0.3 * 10 is 3 (not 3.0000000000000004, which would make the medium tier three rows)
    assert got == {"v_high": {9}, "v_medium": {7, 8}, "v_rest": set(range(7))}
    shop.write(customers(7, value=lambda i: i))  # ceil: the top 10% of 7 rows is one row, the top 30% three
    assert tiers_of(shop, ["v_high", "v_medium", "v_rest"]) == {"v_high": {6}, "v_medium": {4, 5}, "v_rest": {0, 1, 2, 3}}


def test_ties_are_broken_by_the_key_and_missing_values_go_last(tmp_path: Path) -> None:
    shop = Shop(tmp_path, segment("v", tiers='{ by = "value", gold = 0.25, silver = 0.5, bronze = 1.0 }'))
    values = {0: "5", 1: "7", 2: "7", 3: "", 4: "n/a", 5: "NaN", 6: "inf", 7: "7", 8: "1", 9: "-2"}
    rows = customers(10, value=lambda i: values[i])
    shop.write(list(reversed(rows)))  # the file's order must not matter: the key orders ties
    got = tiers_of(shop, ["v_gold", "v_silver", "v_bronze"])
    # 6 rows with a number: gold = ceil(1.5) = 2 of the three 7s, by key C001 < C002 < C007
    assert got == {"v_gold": {1, 2}, "v_silver": {7}, "v_bronze": {0, 8, 9, 3, 4, 5, 6}}
    res = shop.sync()["v_bronze"]
    assert res.tier == {"name": "bronze", "by": "value", "members": 7, "of_rows": 10, "rows_without_value": 4}


def test_ascending_tiers_after_a_where(tmp_path: Path) -> None:
    shop = Shop(tmp_path, segment("v", where="active", tiers='{ by = "days", ascending = true, recent = 0.5 }'))
    shop.write(customers(8, days=lambda i: 100 - i, active=lambda i: "true" if i != 7 else "false"))
    # active: 0..6; fewest days first: 6, 5, 4, 3 (ceil(3.5) = 4)
    assert tiers_of(shop, ["v_recent", "v_rest"]) == {"v_recent": {3, 4, 5, 6}, "v_rest": {0, 1, 2}}


def test_a_member_whose_value_moves_changes_audience(tmp_path: Path) -> None:
    shop = Shop(tmp_path, segment("v", tiers='{ by = "value", top = 0.2 }'))
    shop.write(customers(10, value=lambda i: i))
    assert tiers_of(shop, ["v_top", "v_rest"]) == {"v_top": {8, 9}, "v_rest": set(range(8))}
    shop.write(customers(10, value=lambda i: 100 if i == 0 else i))
    results = shop.sync()
    assert results["v_top"].counts.adds == 1 and results["v_top"].counts.removes == 1
    assert results["v_rest"].counts.adds == 1 and results["v_rest"].counts.removes == 1
    assert shop.members("v_top") == {0, 9} and shop.members("v_rest") == set(range(1, 9))


def test_tier_rows_carry_their_tier(tmp_path: Path) -> None:
    import duckdb

    from connector.segments import SegmentSources

    shop = Shop(tmp_path, segment("v", tiers='{ by = "value", top = 0.5 }'))
    shop.write(customers(4, value=lambda i: i))
    settings = shop.settings
    sources = SegmentSources(settings, duckdb.connect())
    try:
        for name, tier in (("v_top", "top"), ("v_rest", "rest")):
            con = sources.db.cursor()
            with sources.rows(con, name, settings.segments[name], ["customer_id"]) as rows:
                got = con.execute(f"SELECT DISTINCT _tier FROM {rows.name}").fetchall()
            assert got == [(tier,)]
            con.close()
    finally:
        sources.close()


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(("tiers", "message"), [
    ('{ by = "v", high = 1.5 }', "at most 1"),
    ('{ by = "v", a = 0.2, b = 0.2 }', "same cumulative share"),
    ('{ by = "v", rest = 0.5 }', "implicit last tier"),
    ('{ by = "v", "top tier" = 0.5 }', "letters, digits"),
    ('{ by = "v" }', "at least one tier"),
])  # fmt: skip
def test_bad_tiers_are_refused_when_loading(tmp_path: Path, tiers: str, message: str) -> None:
    shop = Shop(tmp_path, segment("v", tiers=tiers))
    with pytest.raises(Exception, match=message):
        _ = shop.settings


def test_expanded_names_must_not_collide(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="v_top"):
        ConnectorSettings(
            destinations={"m": {"type": "meta", "ad_account_id": "1"}},
            sources={"c": {"type": "csv", "path": "c.csv"}},
            segments={"v": {"source": "c", "tiers": {"by": "x", "top": 0.5}, "identifiers": {"email": "e"}, "destinations": ["m"]},
                      "v_top": {"source": "c", "identifiers": {"email": "e"}, "destinations": ["m"]}},
        )


def test_a_segment_naming_an_unknown_source_is_refused(tmp_path: Path) -> None:
    shop = Shop(tmp_path, segment("s").replace('"customers"', '"people"'))
    with pytest.raises(Exception, match=r"segments\.s\.source names 'people'.*known: customers"):
        _ = shop.settings


def test_settings_dumped_and_loaded_again_are_the_same(tmp_path: Path) -> None:
    shop = Shop(tmp_path, segment("v", tiers='{ by = "value", high = 0.1, medium = 0.3 }'))
    s = shop.settings
    again = ConnectorSettings(**s.model_dump(exclude={"config_path"}))
    assert again.segments == s.segments and list(again.segments) == ["v_high", "v_medium", "v_rest"]


def test_validate_names_the_segment_the_setting_and_the_columns(tmp_path: Path) -> None:
    shop = Shop(tmp_path, segment("a", where='"orders" >') + segment("b", where="nope > 1")
                + segment("v", tiers='{ by = "missing", top = 0.5 }'))  # fmt: skip
    shop.write(customers(2, orders=lambda i: i))
    res = CliRunner().invoke(app, ["validate", "--config", str(tmp_path / "connector.toml"), "--json"])
    assert res.exit_code == 2
    problems = json.loads(res.stdout)["problems"]
    columns = "available columns: customer_id, email, orders"
    assert any(p.startswith("segments.a.where: not a SQL predicate") and columns in p for p in problems), problems
    assert any(p.startswith("segments.b.where names column(s) 'nope'") and columns in p for p in problems), problems
    assert [p for p in problems if p.startswith("segments.v.tiers.by")] == [
        f"segments.v.tiers.by: the source has no column 'missing'; {columns}"]  # once, under the configured name
    shop.write(customers(2, orders=lambda i: i, nope=lambda i: i, missing=lambda i: i))
    (tmp_path / "connector.toml").write_text(SHOP_HEAD + segment("b", where="nope > 1") + segment("v", tiers='{ by = "missing", top = 0.5 }'))
    res = CliRunner().invoke(app, ["validate", "--config", str(tmp_path / "connector.toml")])
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "segment v_top: sources.customers tier top by missing -> meta" in res.stdout


def test_cli_sync_takes_a_tiered_segments_name(tmp_path: Path) -> None:
    shop = Shop(tmp_path, segment("v", tiers='{ by = "n", top = 0.5 }') + segment("other"))
    shop.write(customers(4, n=lambda i: i))
    res = CliRunner().invoke(app, ["sync", "v", "--config", str(tmp_path / "connector.toml"), "--dry-run", "--json"])
    assert res.exit_code == 0, res.stdout
    runs = json.loads(res.stdout)["runs"]
    assert [(r["segment"], r["tier"]["members"]) for r in runs] == [("v_top", 2), ("v_rest", 2)]


def test_an_inline_source_with_tiers_is_read_once_for_its_tiers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real = CsvFileSource.relation
    monkeypatch.setattr(CsvFileSource, "relation", lambda self, con, cols: reads.append(self.path.name) or real(self, con, cols))
    shop = Shop(tmp_path, '\n[segments.v]\nsource = { type = "csv", path = "customers.csv" }\nkey = "customer_id"\n'
                          'identifiers = { email = "email" }\ndestinations = ["meta"]\ntiers = { by = "n", top = 0.5 }\n')  # fmt: skip
    shop.write(customers(4, n=lambda i: i))
    assert {r.status for r in shop.sync().values()} == {"success"}
    assert reads == ["customers.csv"] and shop.members("v_top") == {2, 3}


def test_a_named_source_with_a_column_twice_fails_its_segments_saying_so(tmp_path: Path) -> None:
    shop = Shop(tmp_path, segment("s", where="n > 0"))
    (tmp_path / "customers.csv").write_text("customer_id,email,n,n\nC1,user1@example.com,1,2\n")
    res = shop.sync()["s"]
    assert res.status == "failed" and "sources.customers: column(s) 'n' appear more than once" in (res.error or "")
