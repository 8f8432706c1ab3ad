"""Members' values (`value = "<column>"`): carried to the platforms that take them, sent again only when a
value moved past `value_resend_threshold` or the member crossed a tier, and hostile values counted per
reason without ever failing a batch. In-memory destinations for the planning rules; the bundled emulators
(Meta value-based audience and lookalike, Google Ads API attribute jobs) end to end."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.destinations.memory import InMemoryDestination
from connector.engine import Engine, RunResult, SyncOptions
from connector.identifiers.hashing import sha256_hex
from connector.sandbox.google_ads import GoogleAdsEmulator
from connector.sandbox.meta_graph import MetaGraphEmulator
from connector.settings import load_settings

FIELDS = ["id", "email", "lifetime_value", "_tier"]


def member(i: int, value: object = None, tier: str = "") -> dict[str, str]:
    return {"id": f"C{i}", "email": f"user{i}@example.com",
            "lifetime_value": str(100 + i if value is None else value), "_tier": tier}  # fmt: skip


def write(path: Path, rows: list[dict[str, str]], fields: list[str] = FIELDS) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def email(i: int) -> str:
    return sha256_hex(f"user{i}@example.com")


class Shop:
    """One segment with a value column, to Meta and to Google (Google Ads API or Data Manager), on
    in-memory destinations that outlive each engine (like a platform)."""

    def __init__(self, tmp: Path, *, upload_api: str = "google_ads", fields: list[str] = FIELDS, extra: str = "") -> None:
        self.dir, self.csv, self.fields = tmp, tmp / "m.csv", fields
        self.destinations = {"meta": InMemoryDestination("meta", "meta"), "google": InMemoryDestination("google", "google")}
        (tmp / "connector.toml").write_text(f"""
state_dir = "state"
[destinations.meta]
type = "meta"
ad_account_id = "act_1"
sandbox = true
[destinations.google]
type = "google"
customer_id = "1234567890"
customer_match_terms = "accepted"
upload_api = "{upload_api}"
developer_token = "t"
sandbox = true
[segments.vip]
source = {{ type = "csv", path = "m.csv" }}
key = "id"
identifiers = {{ email = "email" }}
value = "lifetime_value"
destinations = ["meta", "google"]
{extra}
""")

    def factory(self, name: str, _cfg: Any, _state: Path, stats: Any) -> InMemoryDestination:
        self.destinations[name].stats = stats
        return self.destinations[name]

    def sync(self, rows: list[dict[str, str]]) -> dict[str, RunResult]:
        write(self.csv, rows, self.fields)
        with Engine(load_settings(self.dir / "connector.toml"), destination_factory=self.factory) as engine:
            return {r.destination: r for r in engine.sync(None, SyncOptions())}

    def values(self, dest: str) -> dict[str, float | None]:
        """email digest -> value as last sent to the destination."""
        d = self.destinations[dest]
        (aid,) = d.audiences
        return {dict(row)["EMAIL" if dest == "meta" else "email"]: v for row, v in d.values(aid).items()}


@pytest.fixture
def shop(tmp_path: Path) -> Shop:
    return Shop(tmp_path)


def test_values_are_sent_again_only_past_the_threshold_or_across_a_tier(shop: Shop) -> None:
    rows = [member(i, 100.0, "medium") for i in range(20)]
    first = shop.sync(rows)
    assert all(r.status == "success" for r in first.values()), first
    assert shop.values("meta") == {email(i): 100.0 for i in range(20)}
    assert shop.values("google") == {email(i): 100.0 for i in range(20)}
    calls = {n: d.write_calls for n, d in shop.destinations.items()}
    rows[0]["lifetime_value"] = "105"  # +5%: no change
    rows[1]["lifetime_value"] = "91"  # -9%: no change
    rows[2]["lifetime_value"] = "120"  # +20%: sent again
    rows[3]["lifetime_value"] = "0"  # -100%: sent again
    rows[4]["_tier"] = "high"  # same value, another tier: sent again
    rows[5]["lifetime_value"] = "110.5"  # +10.5%: sent again
    res = shop.sync(rows)
    for dest in ("meta", "google"):
        c = res[dest].counts
        assert (c.value_changes, c.adds, c.removes, c.changes, c.resends) == (4, 0, 0, 0, 0), c
        assert c.as_dict()["adds"] == 4 and c.unchanged == 16
        assert shop.destinations[dest].write_calls == calls[dest] + 1
        sent = shop.values(dest)
        assert (sent[email(0)], sent[email(1)], sent[email(2)], sent[email(3)], sent[email(5)]) == (100, 100, 120, 0, 110.5)
    # the ledger keeps the value last sent: drifting by 5% twice is a move of 10.25% from it
    rows[0]["lifetime_value"] = "110.25"
    res = shop.sync(rows)
    assert res["meta"].counts.value_changes == 1 and shop.values("meta")[email(0)] == 110.25
    assert shop.sync(rows)["meta"].write_calls == 0


def test_a_threshold_per_segment_and_changed_identifiers_carry_the_new_value(tmp_path: Path) -> None:
    shop = Shop(tmp_path, extra="value_resend_threshold = 0.5")
    rows = [member(i, 100) for i in range(10)]
    shop.sync(rows)
    rows[0]["lifetime_value"] = "140"  # +40%: under this segment's 50%
    rows[1]["lifetime_value"] = "151"
    rows[2]["email"], rows[2]["lifetime_value"] = "new2@example.com", "101"  # new identifiers: re-sent with the value now
    res = shop.sync(rows)
    c = res["meta"].counts
    assert (c.value_changes, c.changes) == (1, 1), c
    sent = shop.values("meta")
    assert sent[email(0)] == 100 and sent[email(1)] == 151 and sent[sha256_hex("new2@example.com")] == 101
    assert email(2) not in sent


HOSTILE = {"C0": "-5", "C1": "NaN", "C2": "lots", "C3": "", "C4": "1e400", "C5": "1e13", "C6": "-inf", "C7": " 12.5 "}


def test_hostile_values_are_counted_per_reason_and_never_sink_a_batch(shop: Shop) -> None:
    rows = [member(i) for i in range(30)]
    for r in rows:
        if r["id"] in HOSTILE:
            r["lifetime_value"] = HOSTILE[r["id"]]
    res = shop.sync(rows)
    meta, google = res["meta"], res["google"]
    assert meta.status == google.status == "success", (meta.error, google.error)
    # Meta: a value-based audience needs a non-negative number for every member: those without are not sent
    assert meta.counts.value_reasons == {"value_negative": 1, "value_not_a_number": 1, "value_missing": 1,
                                         "value_not_finite": 3}  # fmt: skip
    assert meta.counts.invalid_reasons == meta.counts.value_reasons and meta.counts.invalid == 6
    assert meta.counts.adds == 24 and shop.values("meta")[email(5)] == 1e13 and shop.values("meta")[email(7)] == 12.5
    assert not any(email(i) in shop.values("meta") for i in range(5))
    # Google Ads API: lifetime value is an optional int64 of micros; members are sent without what it cannot take
    assert google.counts.value_reasons == {**meta.counts.value_reasons, "value_too_large": 1}
    assert google.counts.invalid == 0 and google.counts.adds == 30
    sent = shop.values("google")
    assert all(sent[email(i)] is None for i in range(7)) and sent[email(7)] == 12.5 and sent[email(8)] == 108
    # the next run counts them again (they are still in the source) and sends nothing
    again = shop.sync(rows)
    assert again["meta"].counts.value_reasons == meta.counts.value_reasons
    assert again["meta"].write_calls == 0 and again["google"].write_calls == 0
    assert again["meta"].counts.unchanged == 24 and again["google"].counts.unchanged == 30
    # a member whose value turns bad keeps the value last sent (Meta: not removed, Google: not sent again)
    rows[10]["lifetime_value"] = "oops"
    rows[0]["lifetime_value"] = "7"  # repaired: now sent, with its value
    res = shop.sync(rows)
    assert res["meta"].counts.removes == 0 and shop.values("meta")[email(10)] == 110 and shop.values("meta")[email(0)] == 7
    assert res["google"].counts.value_changes == 1 and shop.values("google")[email(10)] == 110
    assert res["meta"].counts.value_reasons["value_not_a_number"] == 2


def test_a_data_manager_destination_sends_no_value_and_says_so(tmp_path: Path) -> None:
    shop = Shop(tmp_path, upload_api="datamanager")
    rows = [member(i) for i in range(5)]
    res = shop.sync(rows)
    google = res["google"]
    assert google.status == "success" and google.counts.adds == 5
    assert len(google.notes) == 1 and "Data Manager API has no per-member value" in google.notes[0]
    assert shop.values("google") == {}  # the in-memory list is not value-based: nothing kept
    rows[0]["lifetime_value"] = "5000"
    again = shop.sync(rows)["google"]
    assert again.write_calls == 0 and again.counts.value_changes == 0 and again.counts.value_reasons == {}


def test_without_a_tier_column_only_the_value_counts(tmp_path: Path) -> None:
    shop = Shop(tmp_path, fields=["id", "email", "lifetime_value"])
    rows = [member(i, 50) for i in range(5)]
    shop.sync(rows)
    rows[0]["lifetime_value"] = "60"
    assert shop.sync(rows)["meta"].counts.value_changes == 1


# ----------------------------------------------------------------------------- end to end, bundled emulators

N = 120  # Meta needs a seed of 100 people for a lookalike; the Google lookalike below asks for as many


def e2e_config(tmp: Path, value: bool) -> Path:
    cfg = tmp / "connector.toml"
    cfg.write_text(f"""
state_dir = "state"
[destinations.meta]
type = "meta"
ad_account_id = "act_77"
sandbox = true
[destinations.gads]
type = "google"
sandbox = true
upload_api = "google_ads"
customer_id = "1234567890"
customer_match_terms = "accepted"
[segments.best]
source = {{ type = "csv", path = "m.csv" }}
key = "id"
identifiers = {{ email = "email" }}
{'value = "lifetime_value"' if value else ""}
destinations = ["meta", "gads"]
lookalike.meta = {{ country = "US", ratio = 0.02 }}
lookalike.google = {{ expansion_level = "NARROW", country_codes = ["US"], min_seed_size = 100 }}
""")
    return cfg


def run(cfg: Path, **opts: Any) -> dict[str, RunResult]:
    with Engine(load_settings(cfg)) as engine:
        return {r.destination: r for r in engine.sync(None, SyncOptions(**opts))}


def meta_state(tmp: Path) -> dict[str, Any]:
    """The Meta sandbox's audiences as its emulator loads them from the state file, each with its members'
    values by email digest."""
    with MetaGraphEmulator(state_file=tmp / "state" / "sandbox-meta-meta.arrow") as emu:
        return {aid: {**a, "values": {dict(k)["EMAIL"]: v for k, v in emu.values(aid).items()}}
                for aid, a in emu.audiences.items()}  # fmt: skip


def meta_values(audience: dict[str, Any]) -> dict[str, float]:
    values: dict[str, float] = audience["values"]
    return values


def google_values(tmp: Path, list_id: str) -> dict[str, int]:
    with GoogleAdsEmulator(state_file=tmp / "state" / "sandbox-google-ads-gads.arrow") as emu:
        return {dict(key)["email"]: micros for key, micros in emu.values(list_id).items()}


@pytest.fixture
def e2e(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def test_end_to_end_value_based_meta_audience_and_lookalike_and_google_ads_attributes(e2e: Path) -> None:
    rows = [member(i, 10 * i, "high" if i < 12 else "rest") for i in range(N)]
    write(e2e / "m.csv", rows)
    # first without values: a plain Meta audience and lookalike
    plain = run(e2e_config(e2e, value=False))
    assert plain["meta"].status == "success", plain["meta"].error
    plain_id = plain["meta"].audience_id
    # the segment gains a value: Meta cannot turn the audience value-based, so a new one takes its place
    cfg = e2e_config(e2e, value=True)
    first = run(cfg)
    meta, gads = first["meta"], first["gads"]
    assert meta.status == "success" and gads.status == "success", (meta.error, meta.warning, gads.error, gads.warning)
    assert meta.audience_recreated and meta.audience_id != plain_id
    assert any("not value-based and cannot become so" in n for n in meta.notes), meta.notes
    assert meta.counts.adds == N and gads.counts.value_changes == N  # Google: the same list, every member gains a value
    audiences = meta_state(e2e)
    seed = audiences[meta.audience_id]
    assert seed["is_value_based"] and seed["name"].endswith("(value-based)")
    assert "LOOKALIKE_VALUE" in seed["schema"]
    assert meta_values(seed) == {email(i): 10 * i for i in range(N)}
    lookalike = audiences[meta.lookalike_id or ""]
    assert lookalike["subtype"] == "LOOKALIKE" and lookalike["origin_audience_id"] == meta.audience_id
    assert lookalike["is_value_based"] and meta.lookalike_id != plain["meta"].lookalike_id
    assert google_values(e2e, gads.audience_id or "") == {email(i): 10 * i * 1_000_000 for i in range(N)}
    assert gads.lookalike_id
    # a second run with a few values changed: only those past the threshold or across a tier are sent
    rows[20]["lifetime_value"] = "205"  # 200 -> 205: +2.5%, kept
    rows[21]["lifetime_value"] = "300"  # 210 -> 300: sent
    rows[22]["lifetime_value"] = "0"  # 220 -> 0: sent
    rows[30]["_tier"] = "high"  # crossed a tier: sent
    rows[5]["lifetime_value"] = "-3"  # hostile: counted; Meta keeps 50, Google keeps 50
    write(e2e / "m.csv", rows)
    second = run(cfg)
    for dest in ("meta", "gads"):
        c = second[dest].counts
        assert second[dest].status == "success", second[dest].error
        assert (c.value_changes, c.adds, c.removes, c.changes) == (3, 0, 0, 0), (dest, c)
        assert c.value_reasons == {"value_negative": 1} and c.unchanged == N - 3
        assert not second[dest].audience_recreated
    assert second["meta"].write_calls == 1
    values = meta_values(meta_state(e2e)[meta.audience_id])
    assert (values[email(20)], values[email(21)], values[email(22)], values[email(5)]) == (200, 300, 0, 50)
    micros = google_values(e2e, gads.audience_id or "")
    assert (micros[email(20)], micros[email(21)], micros[email(22)], micros[email(5)]) == (200e6, 300e6, 0, 50e6)
    third = run(cfg)
    assert third["meta"].write_calls == 0 and third["gads"].write_calls == 0
    # a full refresh replaces each audience with the members and the values last decided
    full = run(cfg, full_refresh=True)
    assert full["meta"].status == "success" and full["gads"].status == "success", (full["meta"].error, full["gads"].error)
    assert meta_values(meta_state(e2e)[meta.audience_id]) == values
    assert google_values(e2e, gads.audience_id or "") == micros
    assert run(cfg)["meta"].write_calls == 0


# ----------------------------------------------------------------------------- orders -> tiers -> platforms


def test_orders_to_value_tiers_on_both_platforms_end_to_end(tmp_path: Path) -> None:
    """The issue's whole path on the emulators: predicted value from an orders table, three value tiers,
    value-based Meta audiences (and the top tier's value-based lookalike), a Google Data Manager list per
    tier; then new orders for five customers and a refit that moves every prediction a little: only the
    members whose value moved past the threshold (or who changed tier) are sent again."""
    from test_clv import history, write_orders

    n = 1000
    write(tmp_path / "customers.csv", [{"id": f"C{i:03d}", "email": f"user{i}@example.com"} for i in range(n)],
          ["id", "email"])  # fmt: skip
    orders = [{**o, "customer_id": "C" + o["customer_id"][1:].zfill(3)} for o in history(n)]
    write_orders(tmp_path / "orders.csv", orders)
    cfg = tmp_path / "connector.toml"
    cfg.write_text("""
state_dir = "state"
[destinations.meta]
type = "meta"
ad_account_id = "act_5"
sandbox = true
[destinations.gdm]
type = "google"
sandbox = true
upload_api = "datamanager"
customer_id = "1234567890"
customer_match_terms = "accepted"
[sources.customers]
type = "csv"
path = "customers.csv"
clv = { orders = "orders", customer = "customer_id", key = "id", time = "ordered_at", amount = "amount" }
[sources.orders]
type = "csv"
path = "orders.csv"
[segments.value]
source = "customers"
tiers = { by = "clv", high = 0.10, medium = 0.30 }
key = "id"
identifiers = { email = "email" }
value = "clv"
destinations = ["meta", "gdm"]
lookalike.meta = { country = "US", ratio = 0.01 }
""")
    tiers = ("high", "medium", "rest")

    def meta_tiers() -> dict[str, dict[str, float]]:
        """tier -> {email digest: value} of each value-based Meta audience."""
        out = {}
        for a in meta_state(tmp_path).values():
            for t in tiers:
                if a.get("subtype", "CUSTOM") == "CUSTOM" and a["name"] == f"connector: value_{t} (value-based)":
                    assert a["is_value_based"] and "LOOKALIKE_VALUE" in a["schema"]
                    out[t] = meta_values(a)
        return out

    first = {(r.segment, r.destination): r for r in engine_sync(cfg)}
    assert {r.status for r in first.values()} == {"success"}, [(r.error, r.warning) for r in first.values()]
    summary = first[("value_high", "meta")].clv
    assert summary is not None and summary["customers"] > 0 and summary["mean_value"] > 0
    before = meta_tiers()
    with_orders = summary["customers"]  # customers without orders have no predicted value: not on Meta
    assert len(before["high"]) == 100 and len(before["medium"]) == 200 and len(before["rest"]) == with_orders - 300
    assert min(before["high"].values()) >= max(before["medium"].values()) >= max(before["rest"].values())
    # the top tier's lookalike is value-based (seeded by a value-based audience)
    look = meta_state(tmp_path)[first[("value_high", "meta")].lookalike_id or ""]
    assert look["subtype"] == "LOOKALIKE" and look["is_value_based"]
    # Google Data Manager: no per-member value; a list per tier, every member (ordering or not) on one
    google = {t: first[(f"value_{t}", "gdm")] for t in tiers}
    assert [google[t].counts.adds for t in tiers] == [100, 200, n - 300]
    assert all("no per-member value" in " ".join(google[t].notes) for t in tiers)

    # five customers order big and often: they climb; the refit nudges everyone else
    climbers = [f"C{i:03d}" for i in range(990, 995)]
    orders += [{"customer_id": c, "ordered_at": f"2026-06-{d:02d}T12:00:00", "amount": "900"}
               for c in climbers for d in range(1, 29, 3)]  # fmt: skip
    write_orders(tmp_path / "orders.csv", orders)
    second = {(r.segment, r.destination): r for r in engine_sync(cfg)}
    assert {r.status for r in second.values()} == {"success"}, [(r.error, r.warning) for r in second.values()]
    after = meta_tiers()
    for c in climbers:
        assert email(int(c[1:])) in after["high"]
    # on each tier's audience: a member who stayed is sent again exactly when its value moved past 10%
    sent_again = resent = 0
    for t in tiers:
        stayed = set(before[t]) & set(after[t])
        moved = {m for m in stayed if abs(after[t][m] - before[t][m]) > 0.10 * abs(before[t][m])}
        kept = stayed - moved
        assert all(after[t][m] == before[t][m] for m in kept)  # the value last sent stays
        c = second[(f"value_{t}", "meta")].counts
        assert c.value_changes == len(moved), (t, c.value_changes, len(moved))
        assert c.adds == len(set(after[t]) - set(before[t])) and c.removes == len(set(before[t]) - set(after[t]))
        sent_again += c.value_changes + c.adds
        resent += len(moved)
    assert resent > 0 and sent_again < with_orders // 4  # drift is not a change: most members are not sent again
    assert all(second[(f"value_{t}", "gdm")].counts.value_changes == 0 for t in tiers)


def engine_sync(cfg: Path) -> list[RunResult]:
    with Engine(load_settings(cfg)) as engine:
        return engine.sync(None, SyncOptions(force=True))
