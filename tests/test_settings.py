from __future__ import annotations

from pathlib import Path

import pytest

from connector.errors import ConfigError
from connector.settings import check_endpoint, load_settings

BASE = """
[destinations.meta_ads]
type = "meta"
ad_account_id = "act_123"
[segments.vip]
source = { type = "csv", path = "x.csv" }
identifiers = { email = "email" }
destinations = ["meta_ads"]
"""


def test_env_overrides_file_and_secrets_stay_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE)
    monkeypatch.setenv("CONNECTOR_DESTINATIONS__META_ADS__ACCESS_TOKEN", "tok-123-secret")
    monkeypatch.setenv("CONNECTOR_MAX_REMOVE_SHARE", "0.05")
    s = load_settings(cfg)
    token = s.destinations["meta_ads"].access_token  # type: ignore[union-attr]
    assert token is not None and token.get_secret_value() == "tok-123-secret"
    assert "tok-123-secret" not in repr(s) and "tok-123-secret" not in str(s.model_dump())
    assert s.max_remove_share == 0.05 and s.destinations["meta_ads"].ad_account_id == "123"
    assert s.resolve(Path("x.csv")) == tmp_path / "x.csv"


@pytest.mark.parametrize(
    ("url", "ok"),
    [("http://127.0.0.1:8080", True), ("http://localhost:1", True), ("http://[::1]:9", True),
     ("https://graph.facebook.com", True), ("http://graph.facebook.com", False), ("http://10.0.0.5", False),
     ("ftp://127.0.0.1", False)],
)  # fmt: skip
def test_plain_http_only_on_loopback(url: str, ok: bool) -> None:
    if ok:
        assert check_endpoint(url) == url
    else:
        with pytest.raises(ValueError):
            check_endpoint(url)


def test_bad_toml_and_unknown_destination(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[segments\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg)
    cfg.write_text(BASE.replace('destinations = ["meta_ads"]', 'destinations = ["google"]'))
    with pytest.raises(ConfigError, match="names 'google', which is not a"):
        load_settings(cfg)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    cfg = conf_dir / "c.toml"
    cfg.write_text(
        'state_dir = "var/state"\n'
        '[destinations.g]\ntype = "google"\ncustomer_id = "1234567890"\ncustomer_match_terms = "accepted"\nservice_account_file = "keys/sa.json"\n'
        '[segments.vip]\nsource = { type = "csv", path = "data/x.csv" }\nidentifiers = { email = "email" }\n'
        'destinations = ["g"]\n'
        '[segments.shoes]\nsource = { type = "parquet", path = "data/x.parquet" }\nidentifiers = { email = "email" }\n'
        'destinations = ["g"]\n'
    )
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    s = load_settings(Path("conf/c.toml"))
    # the state directory's parent ("conf/var") is not the config's directory: the old resolution used it
    assert s.destinations["g"].service_account_file == conf_dir / "keys" / "sa.json"  # type: ignore[union-attr]
    assert s.segments["vip"].source.path == conf_dir / "data" / "x.csv"  # type: ignore[union-attr]
    assert s.segments["shoes"].source.path == conf_dir / "data" / "x.parquet"  # type: ignore[union-attr]
    assert s.state_path == conf_dir / "var" / "state"
    # an environment override is a path in the config too
    monkeypatch.setenv("CONNECTOR_DESTINATIONS__G__SERVICE_ACCOUNT_FILE", "other.json")
    assert load_settings(cfg).destinations["g"].service_account_file == conf_dir / "other.json"  # type: ignore[union-attr]
    # absolute paths stay as they are
    monkeypatch.setenv("CONNECTOR_DESTINATIONS__G__SERVICE_ACCOUNT_FILE", str(tmp_path / "abs.json"))
    assert load_settings(cfg).destinations["g"].service_account_file == tmp_path / "abs.json"  # type: ignore[union-attr]


def test_relative_sqlite_ledger_url_resolves_against_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('ledger_url = "sqlite:///db/ledger.db"\n' + BASE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_settings(cfg).ledger_sqlalchemy_url() == f"sqlite:///{tmp_path / 'db' / 'ledger.db'}"


def test_google_destination_reads_the_service_account_file_beside_the_config(tmp_path: Path) -> None:
    from connector.destinations import build_destination

    cfg = tmp_path / "c.toml"
    cfg.write_text('state_dir = "var/state"\n[destinations.g]\ntype = "google"\ncustomer_id = "1234567890"\ncustomer_match_terms = "accepted"\n'
                   'service_account_file = "sa.json"\n')  # fmt: skip
    s = load_settings(cfg)
    # the file is missing: the error names where it was looked for, which must be beside the config
    with pytest.raises(ConfigError) as err:
        build_destination("g", s.destinations["g"], s.state_path)
    assert f"{tmp_path / 'sa.json'} not found" in str(err.value)


@pytest.mark.parametrize(("segment", "top", "error"), [
    ('value = "ltv"', "", None),
    ('value = "ltv"\nvalue_resend_threshold = 0.25', "", None),
    ('value = "   "', "", "segments.vip.value: name the column that holds each member's value"),
    ('value = "email"', "", "value = 'email' is also the column of identifier 'email'"),
    ("value_resend_threshold = 0.2", "", "value_resend_threshold is set but `value` is not"),
    ('value = "ltv"\nvalue_resend_threshold = -0.1', "", "segments.vip.value_resend_threshold"),
    ('value = "ltv"', "value_resend_threshold = -1\n", "value_resend_threshold"),
])  # fmt: skip
def test_value_settings_are_checked(tmp_path: Path, segment: str, top: str, error: str | None) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(top + BASE + segment + "\n")
    if error is None:
        s = load_settings(cfg)
        assert s.segments["vip"].value == "ltv" and s.value_resend_threshold == 0.10
        return
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    assert error in str(exc.value)
