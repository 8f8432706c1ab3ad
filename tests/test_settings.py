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
