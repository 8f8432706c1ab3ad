"""Secret and PII hygiene: a full sync with a known token and known raw identifiers, then every
byte the run wrote is scanned: stdout, stderr, logs, ledger, state files, emulator request logs."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from connector.cli import app
from connector.sandbox.google_datamanager import DataManagerEmulator
from connector.sandbox.meta_graph import MetaGraphEmulator

TOKEN = "EAAB-very-secret-token-0123456789"
RAW = ["zelda.quux@example.org", "Zelda", "Quuxington", "+1 415 555 0199", "4155550199", "zelda.quux", "quuxington"]


def test_no_token_or_raw_identifier_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    with MetaGraphEmulator(expected_token=TOKEN) as meta, DataManagerEmulator() as google:
        (tmp_path / "c.toml").write_text(f"""
state_dir = "state"
[destinations.meta]
type = "meta"
ad_account_id = "act_7"
graph_url = "{meta.url}"
[destinations.google]
type = "google"
customer_id = "1234567890"
customer_match_terms = "accepted"
datamanager_endpoint = "{google.url}"
sandbox = false
service_account_file = "missing.json"
[destinations.google_dm]
type = "google"
customer_id = "1234567890"
customer_match_terms = "accepted"
sandbox = true
[destinations.google_jobs]
type = "google"
customer_id = "1234567890"
customer_match_terms = "accepted"
upload_api = "google_ads"
sandbox = true
[segments.s]
source = {{ type = "csv", path = "m.csv" }}
key = "id"
identifiers = {{ email = "email", phone = "phone", first_name = "fn", last_name = "ln", zip = "zip" }}
destinations = ["meta", "google_dm", "google_jobs"]
""")
        with (tmp_path / "m.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "email", "phone", "fn", "ln", "zip"])
            w.writerow(["1", "Zelda.Quux@example.org", "+1 415 555 0199", "Zelda", "Quuxington", "94107"])
            w.writerow(["2", "broken-email", "n/a", "Zelda", "Quuxington", "94107"])
        monkeypatch.setenv("CONNECTOR_DESTINATIONS__META__ACCESS_TOKEN", TOKEN)
        runner = CliRunner()
        outputs = []
        for args in (["sync", "--json"], ["sync"], ["sync", "--full-refresh"], ["status", "--json"], ["runs"],
                     ["validate"]):  # fmt: skip
            res = runner.invoke(app, [args[0], "--config", str(tmp_path / "c.toml"), *args[1:]])
            outputs += [res.stdout, res.stderr, repr(res.exception)]
            if args == ["sync", "--json"]:
                runs = json.loads(res.stdout)["runs"]
                assert [r["status"] for r in runs] == ["success"] * 3 and all(r["adds"] >= 1 for r in runs), runs
        # a wrong token: the error text must not echo it either
        monkeypatch.setenv("CONNECTOR_DESTINATIONS__META__ACCESS_TOKEN", TOKEN + "-wrong")
        res = runner.invoke(app, ["sync", "--config", str(tmp_path / "c.toml"), "--full-refresh"])
        assert res.exit_code == 1
        outputs += [res.stdout, res.stderr]
        wire = [e["path"] + repr(e["query_keys"]) + e["body"] for e in meta.request_log]
        wire += [e["path"] + repr(e["query"]) + e["body"] for e in google.request_log]
        assert meta.request_log and all(e["headers"].get("authorization", "").startswith("Bearer ")
                                        for e in meta.request_log)  # fmt: skip
    files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "m.csv"
                     and p.name != "c.toml")  # fmt: skip
    text = "\n".join([*outputs, caplog.text, *wire])
    for secret in [TOKEN, *RAW]:
        assert secret not in text, secret
        assert secret.encode() not in files, secret
        assert secret.lower() not in text.lower(), secret
