"""CLI contract: exit codes, --json documents on stdout, config errors naming file and key."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Harness, person, write_csv
from typer.testing import CliRunner

from connector.cli import app

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def test_validate_ok_and_json(harness: Harness) -> None:
    code, out, _ = invoke("validate", "--config", str(harness.dir / "connector.toml"), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["ok"] is True and set(doc["destinations"]) == {"meta", "google"}


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[destinations.m]\ntype = "meta"\nad_account_id = "act_1"\nsandbox = true\ngraph_url = "http://example.com"\n'
        '[segments.s]\nsource = { type = "csv", path = "x.csv" }\nidentifiers = { email = "e" }\n'
        'destinations = ["m", "nope"]\nschedule = "every hour"\nfoo = 1\n'
    )
    code, _, err = invoke("validate", "--config", str(cfg))
    assert code == 2
    assert str(cfg) in err
    assert "graph_url" in err and "loopback" in err
    assert "schedule" in err and "cron" in err
    assert "foo" in err and "unknown key" in err


def test_missing_config_exits_2(tmp_path: Path) -> None:
    code, _, err = invoke("sync", "--config", str(tmp_path / "nope.toml"))
    assert code == 2 and "not found" in err


def test_unknown_segment_is_usage_error(harness: Harness) -> None:
    code, _, err = invoke("sync", "nope", "--config", str(harness.dir / "connector.toml"), "--dry-run")
    assert code == 2 and "unknown segment" in err


def test_dry_run_json_document(harness: Harness) -> None:
    write_csv(harness.csv, [person(i) for i in range(4)] + [person(9, email="bad", phone="", first_name="")])
    code, out, _ = invoke("sync", "--config", str(harness.dir / "connector.toml"), "--dry-run", "--json")
    assert code == 0, out
    doc = json.loads(out)
    (meta,) = [r for r in doc["runs"] if r["destination"] == "meta"]
    for key in ("segment", "destination", "status", "source_rows", "invalid", "adds", "removes", "unchanged",
                "invalid_reasons"):  # fmt: skip
        assert key in meta
    assert meta["status"] == "dry_run" and meta["source_rows"] == 5 and meta["adds"] == 5
    assert meta["invalid_reasons"].get("email_invalid") == 1
    code, out, _ = invoke("runs", "--config", str(harness.dir / "connector.toml"), "--json")
    assert code == 0 and len(json.loads(out)["runs"]) == 2
    code, out, _ = invoke("status", "--config", str(harness.dir / "connector.toml"), "--json")
    assert code == 0 and {p["destination"] for p in json.loads(out)["pairs"]} == {"meta", "google"}


def test_source_failure_exits_1(harness: Harness) -> None:
    harness.csv.unlink()
    code, out, _err = invoke("sync", "--config", str(harness.dir / "connector.toml"), "--dry-run", "--json")
    assert code == 1
    assert all(r["status"] == "failed" for r in json.loads(out)["runs"])


def test_public_api_plan_sends_nothing(harness: Harness) -> None:
    import connector

    write_csv(harness.csv, [person(i) for i in range(3)])
    settings = connector.load_settings(harness.dir / "connector.toml")
    runs = connector.plan(settings, ["vip"], destinations=frozenset({"meta"}))
    assert [r.status for r in runs] == ["dry_run"] and runs[0].counts.adds == 3
