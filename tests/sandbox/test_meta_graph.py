"""The Graph API emulator: driven by the official facebook-business SDK (what real clients send) and by
raw requests for what a real client could get wrong; it refuses what Meta refuses, in Meta's shapes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from facebook_business.adobjects.adaccount import AdAccount
from facebook_business.adobjects.customaudience import CustomAudience
from facebook_business.api import FacebookAdsApi
from facebook_business.exceptions import FacebookRequestError
from facebook_business.session import FacebookSession

from connector.clock import FakeClock
from connector.identifiers.hashing import sha256_hex
from connector.sandbox.base import frame, read_journal
from connector.sandbox.faults import FaultKnobs
from connector.sandbox.meta_graph import MetaGraphEmulator

TOKEN = "emulator-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SESSION = {"session_id": 7, "batch_seq": 1, "last_batch_flag": True, "estimated_num_total": 2}


@pytest.fixture
def emu() -> Iterator[MetaGraphEmulator]:
    with MetaGraphEmulator(expected_token=TOKEN) as e:
        yield e


@pytest.fixture
def api(emu: MetaGraphEmulator) -> FacebookAdsApi:
    session = FacebookSession(access_token=TOKEN, timeout=10)
    session.GRAPH = emu.url
    return FacebookAdsApi(session, api_version="v26.0")


@pytest.fixture
def http(emu: MetaGraphEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{emu.url}/v26.0", headers=AUTH, timeout=30) as c:
        yield c


def create(api: FacebookAdsApi, name: str = "vip") -> CustomAudience:
    return AdAccount("act_42", api=api).create_custom_audience(params={
        "name": name, "subtype": "CUSTOM", "customer_file_source": "USER_PROVIDED_ONLY"})  # fmt: skip


def new_audience(http: httpx.Client, name: str = "vip") -> str:
    r = http.post("/act_42/customaudiences", data={"name": name, "subtype": "CUSTOM",
                                                   "customer_file_source": "USER_PROVIDED_ONLY"})  # fmt: skip
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def upload(http: httpx.Client, aid: str, rows: list[Any], schema: Any = ("EMAIL", "PHONE"), *, edge: str = "users",
           session: Any = SESSION, **extra: Any) -> httpx.Response:  # fmt: skip
    payload = {"schema": list(schema) if not isinstance(schema, str) else schema, "data": rows}
    data = {"payload": json.dumps(payload), **extra}
    if session is not None:
        data["session"] = json.dumps(session)
    return http.post(f"/{aid}/{edge}", data=data)


def graph_error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code >= 400, r.text
    err: dict[str, Any] = r.json()["error"]
    assert {"message", "type", "code", "fbtrace_id"} <= err.keys()
    return err


def row(i: int) -> list[str]:
    return [sha256_hex(f"u{i}@x.com"), sha256_hex(f"1415555{i:04d}")]


# ---------------------------------------------------------------------------- the SDK's own requests


def test_sdk_create_read_add_remove(api: FacebookAdsApi, emu: MetaGraphEmulator) -> None:
    aud = create(api)
    schema = ["EMAIL", "PHONE"]
    rows = [row(i) for i in range(5)]
    resp = aud.add_users(schema, rows, is_raw=True, pre_hashed=True, session=SESSION).json()
    assert resp["num_received"] == 5 and resp["num_invalid_entries"] == 0 and resp["invalid_entry_samples"] == {}
    got = CustomAudience(aud["id"], api=api).api_get(fields=["approximate_count_lower_bound", "operation_status"])
    assert got["approximate_count_lower_bound"] == 5 and got["operation_status"]["code"] == 200
    aud.remove_users(schema, rows[:2], is_raw=True, pre_hashed=True, session=SESSION)
    assert len(emu.members(aud["id"])) == 3
    # the SDK's own paths put the token in the URL: the emulator records it (our client never does)
    assert any(e["token_in_url"] for e in emu.request_log)


def test_sdk_limits_schema_and_errors(api: FacebookAdsApi, emu: MetaGraphEmulator) -> None:
    aud = create(api)
    with pytest.raises(FacebookRequestError) as err:
        aud.add_users(["EMAIL"], [[sha256_hex(str(i))] for i in range(10_001)], is_raw=True, pre_hashed=True,
                      session=SESSION)  # fmt: skip
    assert err.value.api_error_code() == 100 and "at most 10000" in err.value.api_error_message()
    aud.add_users(["EMAIL"], [[sha256_hex("a")]], is_raw=True, pre_hashed=True, session=SESSION)
    with pytest.raises(FacebookRequestError) as err:
        aud.add_users(["PHONE"], [[sha256_hex("1")]], is_raw=True, pre_hashed=True, session=SESSION)
    assert err.value.api_error_code() == 2650
    assert emu.members(aud["id"]) == {(sha256_hex("a"),)}


def test_bad_token_is_190(emu: MetaGraphEmulator) -> None:
    session = FacebookSession(access_token="wrong", timeout=10)
    session.GRAPH = emu.url
    api = FacebookAdsApi(session, api_version="v26.0")
    with pytest.raises(FacebookRequestError) as err:
        create(api)
    assert err.value.api_error_code() == 190


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("change", "needle"), [
    ({"extra": {"pre_hashed": "1"}}, "'pre_hashed' is not a parameter of /users"),
    ({"session": None}, "session is required"),
    ({"session": {**SESSION, "resume": True}}, "'resume' is not a parameter of session"),
    ({"session": {"session_id": 7, "last_batch_flag": True}}, "session.batch_seq is required"),
    ({"session": {**SESSION, "batch_seq": "first"}}, "session.batch_seq must be an integer"),
    ({"session": {**SESSION, "batch_seq": 0}}, "batch_seq starts at 1"),
    ({"session": {**SESSION, "last_batch_flag": "yes"}}, "last_batch_flag must be true or false"),
    ({"schema": ["EMAIL", "SHOE_SIZE"]}, "unknown schema key(s) ['SHOE_SIZE']"),
    ({"schema": ["EMAIL", "EMAIL"]}, "a schema key appears twice"),
    ({"rows": [row(1), [sha256_hex("x")]]}, "payload.data[1] must be a list of 2 value(s)"),
    ({"rows": [row(1), [sha256_hex("x"), 5]]}, "payload.data[1][1] must be a string"),
    ({"rows": []}, "payload.data must be a non-empty list"),
])  # fmt: skip
def test_users_refuses_requests_meta_refuses(http: httpx.Client, emu: MetaGraphEmulator, change: dict[str, Any],
                                             needle: str) -> None:  # fmt: skip
    aid = new_audience(http)
    r = upload(http, aid, change.get("rows", [row(1)]), change.get("schema", ("EMAIL", "PHONE")),
               session=change.get("session", SESSION), **change.get("extra", {}))  # fmt: skip
    err = graph_error(r)
    assert err["code"] == 100 and needle in err["message"], err
    assert emu.members(aid) == set()


def test_unknown_payload_keys_and_read_fields_are_refused(http: httpx.Client) -> None:
    aid = new_audience(http)
    payload = {"schema": ["EMAIL"], "data": [[sha256_hex("a")]], "hashed": True}
    r = http.post(f"/{aid}/users", data={"payload": json.dumps(payload), "session": json.dumps(SESSION)})
    assert "'hashed' is not a parameter of payload" in graph_error(r)["message"]
    err = graph_error(http.get(f"/{aid}/", params={"fields": "id,approximate_count"}))
    assert err["code"] == 100 and "nonexisting field (approximate_count)" in err["message"]
    err = graph_error(http.post("/act_42/customaudiences", data={"name": "x", "subtype": "CUSTOM", "colour": "red",
                                                                 "customer_file_source": "USER_PROVIDED_ONLY"}))  # fmt: skip
    assert "'colour' is not a parameter of creating a custom audience" in err["message"]


def test_more_than_10000_rows_is_error_100(http: httpx.Client, emu: MetaGraphEmulator) -> None:
    aid = new_audience(http)
    err = graph_error(upload(http, aid, [row(i) for i in range(10_001)]))
    assert err["code"] == 100 and err["error_subcode"] == 1870065
    assert upload(http, aid, [row(i) for i in range(10_000)]).status_code == 200
    assert len(emu.members(aid)) == 10_000


# ---------------------------------------------------------------------------- response shapes


def test_invalid_entries_are_counted_and_sampled_as_a_map_of_value_to_reason(http: httpx.Client,
                                                                             emu: MetaGraphEmulator) -> None:  # fmt: skip
    aid = new_audience(http)
    upper = sha256_hex("b").upper()  # a hash, but not lowercase: Meta wants lowercase hex
    newline = sha256_hex("c") + "\n"  # a hash and a line break: 65 characters
    body = upload(http, aid, [row(1), ["not-a-hash", row(2)[1]], [upper, ""], ["", ""], ["", newline]]).json()
    assert body["num_received"] == 5 and body["num_invalid_entries"] == 4
    reason = "Invalid EMAIL value: expected a SHA-256 hash (64 lowercase hex)"
    assert body["invalid_entry_samples"] == {"not-a-hash": reason, upper: reason,
                                             newline: reason.replace("EMAIL", "PHONE")}  # fmt: skip
    assert body["session_id"] == "7" and body["audience_id"] == aid
    assert emu.members(aid) == {tuple(row(1))}


def test_samples_can_be_fewer_than_invalid_entries_and_shaped_as_a_list(http: httpx.Client,
                                                                         emu: MetaGraphEmulator) -> None:  # fmt: skip
    aid = new_audience(http)
    emu.max_invalid_samples = 2
    body = upload(http, aid, [[f"bad-{i}", ""] for i in range(5)]).json()
    assert body["num_invalid_entries"] == 5 and len(body["invalid_entry_samples"]) == 2
    emu.invalid_samples_shape = "list"
    body = upload(http, aid, [["bad-x", ""], row(3)]).json()
    assert body["invalid_entry_samples"] == ["bad-x"] and body["num_invalid_entries"] == 1


# ---------------------------------------------------------------------------- deleted audiences, time


def test_an_audience_deleted_between_runs_is_gone(tmp_path: Path) -> None:
    state = tmp_path / "meta.json"
    with MetaGraphEmulator(expected_token=TOKEN, state_file=state) as e, \
            httpx.Client(base_url=e.url, headers=AUTH) as http:  # fmt: skip
        kept, dropped = new_audience(http, "kept"), new_audience(http, "dropped")
        assert http.delete(f"/v26.0/{dropped}").json() == {"success": True}
        err = graph_error(http.get(f"/v26.0/{dropped}/", params={"fields": "id"}))
        assert err["code"] == 100 and err["error_subcode"] == 33
    # the next run: every audience is deleted on the platform before it starts
    with MetaGraphEmulator(expected_token=TOKEN, state_file=state, faults=FaultKnobs(audience_deletion_rate=1.0)) as e:
        assert e.audiences == {} and e.faults.injected == {"audience_deleted": 1}
    with MetaGraphEmulator(expected_token=TOKEN, state_file=state) as e:
        assert kept not in e.audiences and dropped not in e.audiences


def test_replace_window_is_measured_on_the_emulator_clock(http: httpx.Client, emu: MetaGraphEmulator) -> None:
    emu.clock = clock = FakeClock()
    aid = new_audience(http)
    first = {"session_id": 9, "batch_seq": 1, "last_batch_flag": False, "estimated_num_total": 4}
    assert upload(http, aid, [row(1), row(2)], edge="usersreplace", session=first).status_code == 200
    status = http.get(f"/{aid}/", params={"fields": "operation_status"}).json()["operation_status"]["code"]
    assert status == 414
    assert graph_error(upload(http, aid, [row(5)]))["code"] == 2655  # no /users while a replace runs
    clock.advance(90 * 60 + 1)
    last = {**first, "batch_seq": 2, "last_batch_flag": True}
    assert "expired" in graph_error(upload(http, aid, [row(3)], edge="usersreplace", session=last))["message"]
    assert http.get(f"/{aid}/", params={"fields": "operation_status"}).json()["operation_status"]["code"] == 415
    assert emu.members(aid) == set()


def test_replace_session_and_lookalike_rules(api: FacebookAdsApi, emu: MetaGraphEmulator) -> None:
    aud = create(api)
    aud.add_users(["EMAIL"], [[sha256_hex(f"old{i}")] for i in range(3)], is_raw=True, pre_hashed=True, session=SESSION)
    new = [[sha256_hex(f"new{i}")] for i in range(150)]
    for seq, chunk in ((1, new[:100]), (2, new[100:])):
        session = {"session_id": 9, "batch_seq": seq, "last_batch_flag": seq == 2, "estimated_num_total": 150}
        api.call("POST", (aud["id"], "usersreplace"), params={
            "payload": json.dumps({"schema": ["EMAIL"], "data": chunk}), "session": json.dumps(session)})  # fmt: skip
        if seq == 1:
            assert CustomAudience(aud["id"], api=api).api_get(fields=["operation_status"])["operation_status"]["code"] == 414
    assert {r[0] for r in emu.members(aud["id"])} == {r[0] for r in new}
    spec = {"country": "US", "ratio": 0.01}
    account = AdAccount("act_42", api=api)
    lal = account.create_custom_audience(params={"name": "lal", "subtype": "LOOKALIKE",
                                                 "origin_audience_id": aud["id"], "lookalike_spec": json.dumps(spec)})  # fmt: skip
    assert emu.audiences[lal["id"]]["origin_audience_id"] == aud["id"]
    with pytest.raises(FacebookRequestError) as err:
        account.create_custom_audience(params={"name": "lal2", "subtype": "LOOKALIKE",
                                               "origin_audience_id": aud["id"], "lookalike_spec": json.dumps(spec)})  # fmt: skip
    assert err.value.api_error_code() == 2654


# ---------------------------------------------------------------------------- state file


def test_state_file_keeps_audiences_across_restarts_without_rewriting_it_per_call(tmp_path: Path) -> None:
    state = tmp_path / "meta.json"
    with MetaGraphEmulator(expected_token=TOKEN, state_file=state) as e, \
            httpx.Client(base_url=f"{e.url}/v26.0", headers=AUTH) as http:  # fmt: skip
        aid = new_audience(http)
        upload(http, aid, [row(i) for i in range(10)])
        upload(http, aid, [row(i) for i in range(5)], method="DELETE")
        assert not state.exists()  # changes so far are journal frames, not a rewritten snapshot
        journal = state.with_name("meta.json.journal")
        frames, _ = read_journal(journal.read_bytes())
        # header, audience, its schema, add, del: each call's frame holds its own rows only
        assert [(entry.get("op"), rows.num_rows if rows is not None else None) for entry, rows in frames] == [
            (None, None), ("audience", None), ("audience", None), ("add", 10), ("del", 5)]  # fmt: skip
    assert state.exists() and not journal.exists()  # folded into the snapshot on stop
    with MetaGraphEmulator(expected_token=TOKEN, state_file=state) as again:
        assert again.members(aid) == {tuple(row(i)) for i in range(5, 10)}


def test_a_torn_journal_frame_is_ignored_and_cut_off(tmp_path: Path) -> None:
    state = tmp_path / "meta.json"
    e = MetaGraphEmulator(expected_token=TOKEN, state_file=state)
    e.start()
    with httpx.Client(base_url=f"{e.url}/v26.0", headers=AUTH) as http:
        aid = new_audience(http)
        upload(http, aid, [row(1)])
    e._stop_server()  # killed: no snapshot written
    journal = state.with_name("meta.json.journal")
    torn = frame({"op": "add", "id": aid}, e._table([bytes(66)], [None]))
    with journal.open("ab") as f:
        f.write(torn[: len(torn) // 2])  # the process died mid-write
    with MetaGraphEmulator(expected_token=TOKEN, state_file=state) as again, \
            httpx.Client(base_url=f"{again.url}/v26.0", headers=AUTH) as http:  # fmt: skip
        assert again.members(aid) == {tuple(row(1))}
        upload(http, aid, [row(2)])
        again._stop_server()
        again._flush()  # a second crash: the new line must not sit behind the torn one
    with MetaGraphEmulator(expected_token=TOKEN, state_file=state) as third:
        assert third.members(aid) == {tuple(row(1)), tuple(row(2))}


# ---------------------------------------------------------------------------- value-based audiences


def value_audience(http: httpx.Client, name: str = "ltv") -> str:
    r = http.post("/act_42/customaudiences", data={"name": name, "subtype": "CUSTOM", "is_value_based": "1",
                                                   "customer_file_source": "USER_PROVIDED_ONLY"})  # fmt: skip
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_value_based_audiences_take_a_non_negative_number_per_member(http: httpx.Client, emu: MetaGraphEmulator) -> None:
    """Value-based lookalikes guide: created with is_value_based, populated with LOOKALIKE_VALUE, "an integer
    or floating-point arbitrary non-negative number"; a plain audience does not know the key."""
    plain, valued = new_audience(http), value_audience(http)
    assert http.get(f"/{valued}/", params={"fields": "is_value_based"}).json()["is_value_based"] is True
    assert http.get(f"/{plain}/", params={"fields": "is_value_based"}).json()["is_value_based"] is False
    schema = ("EMAIL", "LOOKALIKE_VALUE")
    assert graph_error(upload(http, plain, [[row(1)[0], 5]], schema))["code"] == 100
    assert graph_error(upload(http, valued, [[row(1)[0]]], ("EMAIL",)))["code"] == 100  # the value is required
    bad = [[row(2)[0], -1], [row(3)[0], "12.5"], [row(4)[0], None], [row(5)[0], True]]
    r = upload(http, valued, [[row(1)[0], 44.5], [row(6)[0], 0], *bad], schema)
    body = r.json()
    assert (body["num_received"], body["num_invalid_entries"]) == (6, 4), body
    # NaN and infinity are not numbers Meta takes (JSON has neither; Python's json module writes them)
    r = http.post(f"/{valued}/users", data={"payload": '{"schema": ["EMAIL", "LOOKALIKE_VALUE"], "data": '
                                            f'[["{row(7)[0]}", NaN], ["{row(8)[0]}", Infinity]]}}',
                                            "session": json.dumps(SESSION)})  # fmt: skip
    assert r.json()["num_invalid_entries"] == 2
    email = lambda i: frozenset({("EMAIL", row(i)[0])})  # noqa: E731
    assert emu.values(valued) == {email(1): 44.5, email(6): 0}
    # the value is the member's, not who the member is: a new value updates it, a removal ignores it
    upload(http, valued, [[row(1)[0], 140]], schema)
    assert emu.member_dicts(valued) == {email(1), email(6)} and emu.values(valued)[email(1)] == 140
    upload(http, valued, [[row(1)[0], 3]], schema, method="DELETE")
    assert emu.member_dicts(valued) == {email(6)} and emu.values(valued) == {email(6): 0}


def test_value_based_lookalikes_come_from_value_based_seeds(http: httpx.Client, emu: MetaGraphEmulator) -> None:
    plain, valued = new_audience(http), value_audience(http)
    upload(http, plain, [row(i) for i in range(120)])
    upload(http, valued, [[row(i)[0], float(i)] for i in range(120)], ("EMAIL", "LOOKALIKE_VALUE"))
    spec = json.dumps({"type": "custom_ratio", "ratio": 0.01, "country": "US"})
    r = http.post("/act_42/customaudiences", data={"name": "lal", "subtype": "LOOKALIKE", "origin_audience_id": plain,
                                                   "lookalike_spec": spec, "is_value_based": "1"})  # fmt: skip
    assert graph_error(r)["code"] == 100 and "value-based seed" in graph_error(r)["message"]
    lal = http.post("/act_42/customaudiences", data={"name": "lal", "subtype": "LOOKALIKE", "origin_audience_id": valued,
                                                     "lookalike_spec": spec}).json()["id"]  # fmt: skip
    assert http.get(f"/{lal}/", params={"fields": "is_value_based,origin_audience_id"}).json()["is_value_based"] is True
    other = http.post("/act_42/customaudiences", data={"name": "lal2", "subtype": "LOOKALIKE",
                                                       "origin_audience_id": plain, "lookalike_spec": spec}).json()["id"]  # fmt: skip
    assert http.get(f"/{other}/", params={"fields": "is_value_based"}).json()["is_value_based"] is False


def test_values_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "meta.json"
    with MetaGraphEmulator(state_file=state, expected_token=TOKEN) as e, \
            httpx.Client(base_url=f"{e.url}/v26.0", headers=AUTH, timeout=30) as http:  # fmt: skip
        aid = value_audience(http)
        upload(http, aid, [[row(i)[0], i * 1.5] for i in range(3)], ("EMAIL", "LOOKALIKE_VALUE"))
        upload(http, aid, [[row(0)[0], 9]], ("EMAIL", "LOOKALIKE_VALUE"))
    with MetaGraphEmulator(state_file=state, expected_token=TOKEN) as e:
        assert e.values(aid) == {frozenset({("EMAIL", row(0)[0])}): 9, frozenset({("EMAIL", row(1)[0])}): 1.5,
                                 frozenset({("EMAIL", row(2)[0])}): 3.0}  # fmt: skip


def test_form_bodies_are_read_as_parse_qs_reads_them() -> None:
    """Form decoding (str.replace for a JSON payload's escapes, then `unquote`) gives `parse_qs`'s values for any
    body: encoded, with lowercase or broken escapes, raw characters, repeated or blank names."""
    import random
    import string
    from urllib.parse import parse_qs, urlencode

    from connector.sandbox.meta_graph import _form

    rng = random.Random(5)
    alphabet = string.printable + "é€"
    bodies = ["a", "a&&b=", "=x", "a=1&a=2", "%zz=%E2%22", "x=%E2%80%9C%22", "p=%%22", "p=%2%2C", "q=+%2B+"]
    for _ in range(3000):
        data = {"".join(rng.choices(alphabet, k=rng.randint(0, 5))): "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
                for _ in range(rng.randint(1, 3))}  # fmt: skip
        body = urlencode(data)
        bodies += [body, body.lower(), body.replace("%2C", ",")]
    for body in bodies:
        assert _form(body) == {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}, body
