"""The documentation a newcomer reads: links that resolve, a way to production, no session diaries."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from connector.settings import GoogleDestinationConfig, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_every_relative_link_points_at_a_file_of_the_repository() -> None:
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # a web page
            path = target.split("#", 1)[0]
            assert path and (doc.parent / path).exists(), f"{doc.relative_to(ROOT)} links to {target}, which is not in the repository"


def test_documentation_holds_no_commit_hashes_dates_or_session_diaries() -> None:
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        where = doc.relative_to(ROOT)
        assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), f"{where} has a dated entry"
        assert not re.search(r"\bcommits? [0-9a-f]{7,40}\b|\bat [0-9a-f]{7}\b", text), f"{where} names a commit"
        assert "this session" not in text and "DESIGN.md" not in text, where


def test_quick_start_keeps_its_two_commands() -> None:
    quick = section("Quick start")
    assert "python3 -m venv .venv && .venv/bin/pip install -q -e '.[clv]' && .venv/bin/connector sync --config config.example.toml" in quick
    assert "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && .venv/bin/python -m pytest -q" in quick


def test_going_to_production_says_what_each_platform_needs() -> None:
    prod = section("Going to production")
    for fact in ("system user", "ads_management", "ad_account_id", "customaudiences/tos",
                 "https://www.googleapis.com/auth/datamanager", "service_account_file", "oauth_refresh_token",
                 "customer_id", "login_customer_id", 'customer_match_terms = "accepted"', "developer token",
                 "upload_api = \"google_ads\"", "lookalike", "CONNECTOR_DESTINATIONS__<NAME>__ACCESS_TOKEN",
                 "CONNECTOR_DESTINATIONS__<NAME>__OAUTH_REFRESH_TOKEN", "CONNECTOR_DESTINATIONS__<NAME>__DEVELOPER_TOKEN",
                 "CONNECTOR_WEBHOOK_SECRET", "connector validate"):  # fmt: skip
        assert fact in prod, fact
    assert "Going to production" in (ROOT / "config.example.toml").read_text(encoding="utf-8")


@pytest.mark.skipif("customer_match_terms" not in GoogleDestinationConfig.model_fields,
                    reason="the customer_match_terms setting is not in this tree yet")  # fmt: skip
def test_the_minimal_production_config_is_valid(tmp_path: Path) -> None:
    block = section("Going to production").split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = tmp_path / "connector.toml"
    cfg.write_text(block, encoding="utf-8")
    settings = load_settings(cfg)
    assert settings.segments["vip_buyers"].destinations == ["meta_ads", "google_ads"]
    assert not settings.destinations["meta_ads"].sandbox and not settings.destinations["google_ads"].sandbox
