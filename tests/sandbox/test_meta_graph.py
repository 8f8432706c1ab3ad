"""The Graph API emulator, driven by the official facebook-business SDK (what real clients send)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from facebook_business.adobjects.adaccount import AdAccount
from facebook_business.adobjects.customaudience import CustomAudience
from facebook_business.api import FacebookAdsApi
from facebook_business.exceptions import FacebookRequestError
from facebook_business.session import FacebookSession

from connector.identifiers.hashing import sha256_hex
from connector.sandbox.meta_graph import MetaGraphEmulator

TOKEN = "emulator-token-123"


@pytest.fixture
def emu() -> Iterator[MetaGraphEmulator]:
    with MetaGraphEmulator(expected_token=TOKEN) as e:
        yield e


@pytest.fixture
def api(emu: MetaGraphEmulator) -> FacebookAdsApi:
    session = FacebookSession(access_token=TOKEN, timeout=10)
    session.GRAPH = emu.url
    return FacebookAdsApi(session, api_version="v26.0")


def create(api: FacebookAdsApi, name: str = "vip") -> CustomAudience:
    return AdAccount("act_42", api=api).create_custom_audience(params={
        "name": name, "subtype": "CUSTOM", "customer_file_source": "USER_PROVIDED_ONLY"})  # fmt: skip


def test_sdk_create_read_add_remove(api: FacebookAdsApi, emu: MetaGraphEmulator) -> None:
    aud = create(api)
    schema = ["EMAIL", "PHONE"]
    rows = [[sha256_hex(f"u{i}@x.com"), sha256_hex(f"1415555{i:04d}")] for i in range(5)]
    resp = aud.add_users(schema, rows, is_raw=True, pre_hashed=True).json()
    assert resp["num_received"] == 5 and resp["num_invalid_entries"] == 0
    got = CustomAudience(aud["id"], api=api).api_get(fields=["approximate_count_lower_bound", "operation_status"])
    assert got["approximate_count_lower_bound"] == 5 and got["operation_status"]["code"] == 200
    aud.remove_users(schema, rows[:2], is_raw=True, pre_hashed=True)
    assert len(emu.members(aud["id"])) == 3
    # the SDK's own paths put the token in the URL: the emulator records it (our client never does)
    assert any(e["token_in_url"] for e in emu.request_log)


def test_limits_schema_hashes_and_errors(api: FacebookAdsApi, emu: MetaGraphEmulator) -> None:
    aud = create(api)
    too_many = [[sha256_hex(str(i))] for i in range(10_001)]
    with pytest.raises(FacebookRequestError) as err:
        aud.add_users(["EMAIL"], too_many, is_raw=True, pre_hashed=True)
    assert err.value.api_error_code() == 100
    aud.add_users(["EMAIL"], [[sha256_hex("a")], ["not-a-hash"]], is_raw=True, pre_hashed=True)
    with pytest.raises(FacebookRequestError) as err:
        aud.add_users(["PHONE"], [[sha256_hex("1")]], is_raw=True, pre_hashed=True)
    assert err.value.api_error_code() == 2650
    log = emu.request_log[-2]
    assert log["path"].endswith("/users")


def test_bad_token_is_190(emu: MetaGraphEmulator) -> None:
    session = FacebookSession(access_token="wrong", timeout=10)
    session.GRAPH = emu.url
    api = FacebookAdsApi(session, api_version="v26.0")
    with pytest.raises(FacebookRequestError) as err:
        create(api)
    assert err.value.api_error_code() == 190


def test_replace_session_and_lookalike_rules(api: FacebookAdsApi, emu: MetaGraphEmulator) -> None:
    import json

    aud = create(api)
    aud.add_users(["EMAIL"], [[sha256_hex(f"old{i}")] for i in range(3)], is_raw=True, pre_hashed=True)
    new = [[sha256_hex(f"new{i}")] for i in range(150)]
    base = f"/{aud['id']}/usersreplace"
    for seq, chunk in ((1, new[:100]), (2, new[100:])):
        session = {"session_id": 9, "batch_seq": seq, "last_batch_flag": seq == 2, "estimated_num_total": 150}
        api.call("POST", (aud["id"], "usersreplace"), params={
            "payload": json.dumps({"schema": ["EMAIL"], "data": chunk}), "session": json.dumps(session)})  # fmt: skip
        if seq == 1:
            assert CustomAudience(aud["id"], api=api).api_get(fields=["operation_status"])["operation_status"]["code"] == 414
            with pytest.raises(FacebookRequestError):  # no /users calls while a replace runs
                aud.add_users(["EMAIL"], [[sha256_hex("x")]], is_raw=True, pre_hashed=True)
    assert {r[0] for r in emu.members(aud["id"])} == {r[0] for r in new}
    assert base
    spec = {"country": "US", "ratio": 0.01}
    account = AdAccount("act_42", api=api)
    lal = account.create_custom_audience(params={"name": "lal", "subtype": "LOOKALIKE",
                                                 "origin_audience_id": aud["id"], "lookalike_spec": json.dumps(spec)})  # fmt: skip
    assert lal["id"]
    with pytest.raises(FacebookRequestError) as err:
        account.create_custom_audience(params={"name": "lal2", "subtype": "LOOKALIKE",
                                               "origin_audience_id": aud["id"], "lookalike_spec": json.dumps(spec)})  # fmt: skip
    assert err.value.api_error_code() == 2654


def test_state_file_persists_audiences(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "meta.json"
    with MetaGraphEmulator(expected_token=TOKEN, state_file=state) as e:
        session = FacebookSession(access_token=TOKEN, timeout=10)
        session.GRAPH = e.url
        aud = create(FacebookAdsApi(session, api_version="v26.0"))
        aud.add_users(["EMAIL"], [[sha256_hex("a")]], is_raw=True, pre_hashed=True)
    with MetaGraphEmulator(expected_token=TOKEN, state_file=state) as again:
        assert again.members(aud["id"]) == {(sha256_hex("a"),)}
