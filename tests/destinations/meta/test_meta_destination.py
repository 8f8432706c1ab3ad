"""MetaDestination against the Graph API emulator: mapping of samples, errors, throttling, lookalikes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from connector.destinations.base import AudienceRef, BatchSession, Member
from connector.destinations.meta.client import GraphClient, map_graph_error
from connector.destinations.meta.destination import MetaDestination
from connector.errors import AuthError, FatalError, RetriableError, TermsNotAcceptedError, ThrottledError
from connector.identifiers.hashing import sha256_hex
from connector.retry import RetryPolicy, RetryStats
from connector.sandbox.meta_graph import MetaGraphEmulator
from connector.settings import MetaDestinationConfig

TOKEN = "meta-test-token-xyz"
SESSION = BatchSession(session_id=1, seq=1, last=True, estimated_total=1)


class Waits(list[float]):
    def __call__(self, s: float) -> None:
        self.append(s)


@pytest.fixture
def emu() -> Iterator[MetaGraphEmulator]:
    with MetaGraphEmulator(expected_token=TOKEN, min_lookalike_seed=3) as e:
        yield e


def make(emu: MetaGraphEmulator, waits: Waits | None = None, max_wait: float = 600) -> MetaDestination:
    cfg = MetaDestinationConfig(type="meta", ad_account_id="act_42", access_token=SecretStr(TOKEN), graph_url=emu.url)
    policy = RetryPolicy(max_attempts=8, backoff_base_seconds=0.0, backoff_max_seconds=max_wait, sleep=waits or Waits())
    client = GraphClient(graph_url=emu.url, api_version="v26.0", token=SecretStr(TOKEN), ad_account_id="42",
                         timeout=10, policy=policy, stats=RetryStats())  # fmt: skip
    return MetaDestination("m", cfg, client, policy=policy)


def member(i: int, email: str | None = None) -> Member:
    return Member(f"k{i}", {"EMAIL": email or sha256_hex(f"u{i}@x.com"), "PHONE": sha256_hex(f"1415{i:07d}")})


def audience(dest: MetaDestination) -> AudienceRef:
    return dest.ensure_audience("vip", None, ["EMAIL", "PHONE", "FN"])


def test_audience_is_found_again_never_duplicated(emu: MetaGraphEmulator) -> None:
    dest = make(emu)
    a = audience(dest)
    b = dest.ensure_audience("vip", None, ["EMAIL", "PHONE", "FN"])
    c = dest.ensure_audience("vip", a, ["EMAIL", "PHONE", "FN"])
    assert a.audience_id == b.audience_id == c.audience_id and len(emu.audiences) == 1
    assert a.extra["schema"] == "EMAIL,PHONE,FN"


def test_rows_use_one_schema_and_invalid_samples_map_to_members(emu: MetaGraphEmulator) -> None:
    dest = make(emu)
    a = audience(dest)
    out = dest.add_members(a, [member(1), member(2, email="not-a-hash")], SESSION)
    assert out.rejected == {"k2": "meta: Invalid EMAIL value: expected a SHA-256 hash (64 lowercase hex)"}
    (row,) = emu.members(a.audience_id)
    assert row == (sha256_hex("u1@x.com"), sha256_hex("14150000001"), "")  # "" for the missing FN


def test_invalid_samples_in_list_shape_map_to_members(emu: MetaGraphEmulator) -> None:
    emu.invalid_samples_shape = "list"
    dest = make(emu)
    a = audience(dest)
    out = dest.add_members(a, [member(1), member(2, email="NOT-HEX"), member(3, email="A" * 64)], SESSION)
    assert out.rejected == {"k2": "meta: invalid entry", "k3": "meta: invalid entry"}
    assert len(emu.members(a.audience_id)) == 1


def test_more_invalid_entries_than_samples_maps_what_the_samples_name(emu: MetaGraphEmulator,
                                                                       caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    emu.max_invalid_samples = 1
    dest = make(emu)
    a = audience(dest)
    out = dest.add_members(a, [member(1, email="bad-1"), member(2, email="bad-2"), member(3)], SESSION)
    assert out.rejected.keys() == {"k1"} and out.received == 3
    assert "2 invalid entries, 1 traced back to members from samples" in caplog.text


def test_terms_not_accepted_says_where_to_accept(emu: MetaGraphEmulator) -> None:
    emu.tos_accepted = False
    with pytest.raises(TermsNotAcceptedError, match="customaudiences/tos/\\?act=42"):
        audience(make(emu))


def test_size_too_low_removal_is_deferred_not_lost(emu: MetaGraphEmulator) -> None:
    dest = make(emu)
    a = audience(dest)
    dest.add_members(a, [member(i) for i in range(3)], SESSION)
    emu.size_too_low_threshold = 3
    out = dest.remove_members(a, [member(0)], SESSION)
    assert set(out.deferred) == {"k0"} and len(emu.members(a.audience_id)) == 3


def test_throttling_waits_for_the_platform_estimate(emu: MetaGraphEmulator) -> None:
    waits = Waits()
    dest = make(emu, waits)
    a = audience(dest)
    emu.faults.throttle_rate, emu.faults.throttle_retry_after = 1.0, 120.0
    emu.faults.reseed(1)

    def stop_throttling(s: float) -> None:
        waits.append(s)
        emu.faults.throttle_rate = 0.0

    dest._policy = RetryPolicy(max_attempts=5, backoff_base_seconds=0.0, backoff_max_seconds=600, sleep=stop_throttling)
    dest.client._policy = dest._policy
    dest.add_members(a, [member(1)], SESSION)
    assert waits == [120.0]  # X-Business-Use-Case-Usage estimated_time_to_regain_access = 2 minutes


def test_token_never_in_a_url(emu: MetaGraphEmulator) -> None:
    dest = make(emu)
    a = audience(dest)
    dest.add_members(a, [member(1)], SESSION)
    dest.remove_members(a, [member(1)], SESSION)
    dest.audience_status(a)
    assert emu.request_log and not any(e["token_in_url"] for e in emu.request_log)
    assert all(TOKEN not in e["path"] for e in emu.request_log)
    removal = [e for e in emu.request_log if "method=DELETE" in e["body"]]
    assert removal and removal[0]["method"] == "POST"  # payload in the body, not the URL


def test_lookalike_created_once_and_found_after_2654(emu: MetaGraphEmulator) -> None:
    dest = make(emu)
    a = audience(dest)
    spec = {"country": "US", "ratio": 0.02, "min_seed_size": 3}
    dest.add_members(a, [member(1), member(2)], SESSION)
    assert dest.ensure_lookalike(a, spec, None, seed_size=2) is None  # seed too small
    dest.add_members(a, [member(3)], SESSION)
    first = dest.ensure_lookalike(a, spec, None, seed_size=3)
    assert first is not None
    again = dest.ensure_lookalike(a, spec, None, seed_size=3)  # ledger lost it: 2654, then found
    assert again is not None and again.lookalike_id == first.lookalike_id
    assert sum(1 for x in emu.audiences.values() if x["subtype"] == "LOOKALIKE") == 1


def test_error_mapping_by_code() -> None:
    h = httpx.Headers()

    def err(code: int, sub: int | None = None, status: int = 400) -> Exception:
        return map_graph_error(status, {"error": {"code": code, "error_subcode": sub, "message": "m"}}, h, "add", "42")

    assert isinstance(err(190), AuthError) and "60 days" in str(err(190))
    assert isinstance(err(200, 1870090), TermsNotAcceptedError)
    assert isinstance(err(10), AuthError)
    assert isinstance(err(80003), ThrottledError) and isinstance(err(613), ThrottledError)
    assert isinstance(err(2), RetriableError) and not isinstance(err(2), ThrottledError)
    assert type(err(2650)) is FatalError and type(err(2654)) is FatalError
    assert isinstance(map_graph_error(502, None, h, "add", "42"), RetriableError)


def test_5xx_or_non_json_body_is_never_success(tmp_path: Path) -> None:
    answers = iter([httpx.Response(502, text="<html>bad gateway</html>"), httpx.Response(200, text="OK")])
    client = GraphClient(graph_url="http://127.0.0.1:9", api_version="v26.0", token=SecretStr(TOKEN),
                         ad_account_id="42", timeout=5, policy=RetryPolicy(max_attempts=1),
                         transport=httpx.MockTransport(lambda _r: next(answers)))  # fmt: skip
    with pytest.raises(RetriableError, match="HTTP 502"):
        client.upload("1", "users", json.dumps({"schema": ["EMAIL"], "data": [[sha256_hex("a")]]}), {"session_id": 1})
    with pytest.raises(FatalError, match="HTTP 200"):
        client.upload("1", "users", json.dumps({"schema": ["EMAIL"], "data": [[sha256_hex("a")]]}), {"session_id": 1})


def test_an_audience_deleted_in_ads_manager_is_replaced_by_a_new_empty_one(emu: MetaGraphEmulator) -> None:
    dest = make(emu)
    a = audience(dest)
    dest.add_members(a, [member(1)], SESSION)
    emu.delete_audience(a.audience_id)
    b = dest.ensure_audience("vip", a, ["EMAIL", "PHONE", "FN"])
    assert b.audience_id != a.audience_id and emu.members(b.audience_id) == set()


def valued(i: int, value: float | None) -> Member:
    return Member(f"k{i}", {"EMAIL": sha256_hex(f"u{i}@x.com")}, value=value)


def test_value_based_audiences_send_lookalike_value_and_never_switch(emu: MetaGraphEmulator) -> None:
    dest = make(emu)
    plain = dest.ensure_audience("vip", None, ["EMAIL"])
    vb = dest.ensure_audience("vip", plain, ["EMAIL"], value_based=True)
    # the plain audience cannot become value-based: a new one, named apart, and the reason for the run's output
    assert vb.audience_id != plain.audience_id and vb.name == "vip (value-based)"
    assert vb.note == "is not value-based and cannot become so" and vb.extra["schema"] == "EMAIL,LOOKALIKE_VALUE"
    assert emu.audiences[vb.audience_id]["is_value_based"] and not emu.audiences[plain.audience_id]["is_value_based"]
    assert dest.ensure_audience("vip (value-based)", vb, ["EMAIL"], value_based=True).audience_id == vb.audience_id
    assert dest.ensure_audience("vip", None, ["EMAIL"], value_based=True).audience_id == vb.audience_id  # by name
    dest.add_members(vb, [valued(1, 44.5), valued(2, 140.0), valued(3, 0.0)], SESSION)
    key = lambda i: frozenset({("EMAIL", sha256_hex(f"u{i}@x.com"))})  # noqa: E731
    assert emu.values(vb.audience_id) == {key(1): 44.5, key(2): 140, key(3): 0}
    # a removal keeps the audience's schema; its value does not matter (and a member without one gets 0)
    dest.remove_members(vb, [valued(1, None), valued(2, 7.0)], SESSION)
    assert emu.values(vb.audience_id) == {key(3): 0}
    back = dest.ensure_audience("vip (value-based)", vb, ["EMAIL"], value_based=False)
    assert back.audience_id == plain.audience_id and back.note == "is value-based and cannot stop being so"


def test_the_lookalike_of_a_value_based_audience_is_value_based(emu: MetaGraphEmulator) -> None:
    dest = make(emu)
    vb = dest.ensure_audience("vip", None, ["EMAIL"], value_based=True)
    dest.add_members(vb, [valued(i, float(i)) for i in range(5)], SESSION)
    ref = dest.ensure_lookalike(vb, {"country": "US", "ratio": 0.01, "min_seed_size": 3}, None, 5)
    assert ref is not None and ref.details["value_based"] == "true"
    assert emu.audiences[ref.lookalike_id]["is_value_based"]


def test_form_bodies_are_the_bytes_httpx_would_send() -> None:
    """The payload's form encoding (str.replace for a JSON payload's characters) is `quote_plus`'s, for any text."""
    import random
    import string
    from urllib.parse import urlencode

    from connector.destinations.meta.client import form_body

    rng = random.Random(3)
    alphabet = string.printable + "é€😀"
    payload = json.dumps({"schema": ["EMAIL", "EXTERN_ID"], "data": [[sha256_hex("a"), "id/1+2 %x"]]})
    cases = [{"payload": payload, "session": json.dumps({"session_id": 1})}, {"method": "DELETE", "x": ""}]
    cases += [{"".join(rng.choices(alphabet, k=rng.randint(0, 5))): "".join(rng.choices(alphabet, k=rng.randint(0, 40)))
               for _ in range(rng.randint(1, 3))} for _ in range(3000)]  # fmt: skip
    for data in cases:
        assert form_body(data) == urlencode(data).encode(), data
    assert form_body({"a": True, "b": None, "c": 2}) == b"a=true&b=&c=2"
