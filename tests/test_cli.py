"""CLI contract: exit codes, --json documents on stdout, config errors naming file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


# ----------------------------------------------------------------------------- validate: what a sync needs

PROD = """
state_dir = "state"
[destinations.meta]
type = "meta"
ad_account_id = "act_1"
{meta_extra}
[destinations.google]
type = "google"
customer_id = "1234567890"
customer_match_terms = "accepted"
{google_extra}
[segments.vip]
source = {source}
key = "customer_id"
identifiers = {{ email = "email", phone = "phone" }}
consent = {{ ad_user_data_column = "consent" }}
destinations = ["meta", "google"]
{segment_extra}
"""


def write_prod(tmp: Path, *, meta_extra: str = "", google_extra: str = "", segment_extra: str = "",
               source: str = '{ type = "csv", path = "members.csv" }') -> Path:  # fmt: skip
    cfg = tmp / "connector.toml"
    cfg.write_text(PROD.format(meta_extra=meta_extra, google_extra=google_extra, segment_extra=segment_extra,
                               source=source))  # fmt: skip
    return cfg


def service_account(path: Path) -> None:
    path.write_text(json.dumps({"type": "service_account", "client_email": "sync@p.iam.gserviceaccount.com",
                                "private_key": "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n"}))  # fmt: skip


def problems_of(cfg: Path) -> list[str]:
    code, out, _ = invoke("validate", "--config", str(cfg), "--json")
    doc = json.loads(out)
    assert (code == 0) is doc["ok"] is (not doc["problems"])
    return list(doc["problems"])


def test_validate_checks_that_every_file_exists_beside_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_prod(tmp_path, meta_extra="sandbox = true", google_extra='service_account_file = "keys/sa.json"',
                     source='{ type = "csv", path = "data/members.csv" }')  # fmt: skip
    monkeypatch.chdir(tmp_path.parent)  # paths are the config's, not the working directory's
    found = problems_of(cfg)
    assert f"destinations.google.service_account_file: {tmp_path / 'keys' / 'sa.json'} not found" in found
    assert any(p.startswith("segments.vip.source:") and f"{tmp_path / 'data' / 'members.csv'}: file not found" in p for p in found), found
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "sa.json").write_text("not json")
    (tmp_path / "data").mkdir()
    write_csv(tmp_path / "data" / "members.csv", [person(1)])
    assert problems_of(cfg) == [f"destinations.google.service_account_file: {tmp_path / 'keys' / 'sa.json'} is not a "
                                "JSON key file (download one for the service account in the Cloud console)"]  # fmt: skip
    service_account(tmp_path / "keys" / "sa.json")
    assert problems_of(cfg) == []


def test_validate_credentials_for_the_path_each_destination_takes(tmp_path: Path) -> None:
    write_csv(tmp_path / "members.csv", [person(1)])
    cfg = write_prod(tmp_path, google_extra='oauth_client_id = "cid.apps.googleusercontent.com"\noauth_client_secret = "s"')
    found = problems_of(cfg)
    assert found[0].startswith("destinations.meta.access_token: missing; set CONNECTOR_DESTINATIONS__META__ACCESS_TOKEN")
    assert "ads_management" in found[0]
    assert found[1] == ("destinations.google: OAuth credentials need oauth_client_id, oauth_client_secret and "
                        "oauth_refresh_token; missing oauth_refresh_token "
                        "(e.g. CONNECTOR_DESTINATIONS__GOOGLE__OAUTH_REFRESH_TOKEN)")  # fmt: skip
    assert len(found) == 2
    # the Google Ads API path and Google lookalikes need a developer token
    cfg = write_prod(tmp_path, meta_extra='access_token = "t"',
                     google_extra='upload_api = "google_ads"\noauth_client_id = "c"\noauth_client_secret = "s"\n'
                                  'oauth_refresh_token = "r"',
                     segment_extra='lookalike.google = { country_codes = ["US"] }')  # fmt: skip
    found = problems_of(cfg)
    assert len(found) == 2 and all(p.startswith("destinations.google.developer_token: missing") for p in found)
    assert 'upload_api = "google_ads"' in found[0] and "lookalikes (segments vip)" in found[1]
    cfg = write_prod(tmp_path, meta_extra='access_token = "t"',
                     google_extra='oauth_client_id = "c"\noauth_client_secret = "s"\noauth_refresh_token = "r"\n'
                                  'developer_token = "d"',
                     segment_extra='lookalike.google = { country_codes = ["US"] }')  # fmt: skip
    assert problems_of(cfg) == []
    # no credentials at all; a sandbox needs none
    cfg = write_prod(tmp_path, meta_extra="sandbox = true")
    assert [p.split(":")[0] for p in problems_of(cfg)] == ["destinations.google"]
    cfg = write_prod(tmp_path, meta_extra="sandbox = true", google_extra="sandbox = true")
    assert problems_of(cfg) == []


def test_validate_has_one_verdict(tmp_path: Path) -> None:
    write_csv(tmp_path / "members.csv", [person(1)])
    cfg = write_prod(tmp_path)  # no credentials for either destination
    code, out, err = invoke("validate", "--config", str(cfg))
    assert code == 2
    assert "ok" not in out.split()  # no "ok" line next to the problems
    assert err.count("problem:") == 2 and "2 problem(s)" in err
    code, out, _ = invoke("validate", "--config", str(cfg), "--json")
    doc = json.loads(out)
    assert code == 2 and doc["ok"] is False and doc["error_kind"] == "config" and len(doc["problems"]) == 2


def test_validate_reads_headers_of_every_source_kind(tmp_path: Path) -> None:
    import sqlite3

    import pyarrow as pa
    import pyarrow.parquet as pq

    sandbox = {"meta_extra": "sandbox = true", "google_extra": "sandbox = true"}
    (tmp_path / "members.csv").write_text("customer_id,email,phone\nC1,a@example.com,+14155550100\n")
    found = problems_of(write_prod(tmp_path, **sandbox))
    assert found == ["segments.vip.source: CSV file " + str(tmp_path / "members.csv") + " has no column(s) 'consent'; "
                     "it has: 'customer_id', 'email', 'phone' (fix the segment's key, identifiers or consent columns, "
                     "or the export)"]  # fmt: skip
    pq.write_table(pa.table({"customer_id": ["C1"], "mail": ["a@example.com"], "phone": ["1"], "consent": ["y"]}),
                   tmp_path / "m.parquet")  # fmt: skip
    found = problems_of(write_prod(tmp_path, **sandbox, source='{ type = "parquet", path = "m.parquet" }'))
    assert len(found) == 1 and "Parquet file" in found[0] and "no column(s) 'email'" in found[0]
    db = sqlite3.connect(tmp_path / "shop.db")
    db.execute("CREATE TABLE c (customer_id TEXT, email TEXT, phone TEXT, consent TEXT)")
    db.commit()
    db.close()
    sql = '{{ type = "sql", url = "sqlite:///shop.db", query = "{q}" }}'
    assert problems_of(write_prod(tmp_path, **sandbox, source=sql.format(q="SELECT * FROM c;"))) == []
    found = problems_of(write_prod(tmp_path, **sandbox, source=sql.format(q="SELECT customer_id, email FROM c")))
    assert len(found) == 1 and "no column(s) 'phone', 'consent'" in found[0]
    found = problems_of(write_prod(tmp_path, **sandbox, source=sql.format(q="SELECT * FROM nope")))
    assert len(found) == 1 and "query failed" in found[0] and "nope" in found[0], found


def test_validate_reads_the_first_page_of_an_http_source(tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    pages: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            pages.append(self.path)
            body = json.dumps({"data": [{"customer_id": "C1", "email": "a@example.com", "phone": "1"}],
                               "next": "abc"}).encode()  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/members"
        cfg = write_prod(tmp_path, meta_extra="sandbox = true", google_extra="sandbox = true",
                         source=f'{{ type = "http", url = "{url}", next_cursor_path = "next" }}')  # fmt: skip
        found = problems_of(cfg)
    finally:
        server.shutdown()
    assert len(found) == 1 and "has no column(s) 'consent'" in found[0], found
    assert pages == ["/members"]  # the first page only


def test_settings_that_contradict_each_other(tmp_path: Path) -> None:
    write_csv(tmp_path / "members.csv", [person(1)])
    cfg = write_prod(tmp_path, meta_extra="sandbox = true",
                     google_extra="sandbox = true\nmembership_days = 30\nresend_before_expiry_days = 30")  # fmt: skip
    code, _, err = invoke("validate", "--config", str(cfg))
    assert code == 2
    assert "destinations.google: membership_days (30) must be larger than resend_before_expiry_days (30)" in err
    code, _, err = invoke("sync", "--config", str(cfg), "--dry-run")  # refused by every command
    assert code == 2 and "membership_days" in err
    cfg = write_prod(tmp_path, meta_extra="sandbox = true", google_extra="sandbox = true",
                     segment_extra='destinations = ["google"]\nlookalike.meta = { country = "US" }'
                     .replace('destinations = ["google"]', ""))  # fmt: skip
    assert problems_of(cfg) == []
    cfg.write_text(cfg.read_text().replace('destinations = ["meta", "google"]', 'destinations = ["google"]'))
    assert problems_of(cfg) == ["segments.vip.lookalike.meta: the segment has no meta destination "
                                "(destinations = ['google']); the lookalike would never be made"]  # fmt: skip


# ----------------------------------------------------------------------------- one JSON document, usage errors


def test_json_errors_are_one_document(tmp_path: Path, harness: Harness) -> None:
    code, out, _ = invoke("sync", "--config", str(tmp_path / "nope.toml"), "--json")
    assert code == 2 and json.loads(out) == {
        "error": f"{tmp_path / 'nope.toml'}: config file not found (pass --config PATH or set CONNECTOR_CONFIG)",
        "error_kind": "config"}  # fmt: skip
    for command in ("status", "runs", "validate"):
        code, out, _ = invoke(command, "--config", str(tmp_path / "nope.toml"), "--json")
        assert code == 2 and json.loads(out)["error_kind"] == "config"
    code, out, _ = invoke("sync", "nope", "--config", str(harness.dir / "connector.toml"), "--json")
    assert code == 2 and json.loads(out) == {"error": "unknown segment(s): nope (configured: vip)", "error_kind": "usage"}


def test_json_usage_errors_and_crashes_through_the_entry_point(harness: Harness, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from connector import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["sync", "--no-such-option", "--json"])
    assert exit_.value.code == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["error_kind"] == "usage" and "--no-such-option" in doc["error"]

    def crash(*_a: object, **_k: object) -> None:
        raise RuntimeError("boom with data@example.com")

    monkeypatch.setattr(cli.Engine, "sync", crash)
    with pytest.raises(RuntimeError):
        cli.main(["sync", "--config", str(harness.dir / "connector.toml"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"error": "internal error (RuntimeError); the traceback is on stderr", "error_kind": "internal"}


def test_destination_not_of_the_segment_is_a_usage_error(tmp_path: Path) -> None:
    write_csv(tmp_path / "members.csv", [person(1)])
    cfg = write_prod(tmp_path, meta_extra="sandbox = true", google_extra="sandbox = true",
                     segment_extra='destinations = ["meta"]'.replace('destinations = ["meta"]', ""))  # fmt: skip
    cfg.write_text(cfg.read_text().replace('destinations = ["meta", "google"]', 'destinations = ["meta"]'))
    code, out, _ = invoke("sync", "vip", "--destination", "google", "--config", str(cfg), "--json")
    assert code == 2
    assert json.loads(out) == {"error": "segment vip has no destination google; its destinations: meta",
                               "error_kind": "usage"}  # fmt: skip
    code, _, err = invoke("sync", "--destination", "google", "--config", str(cfg))
    assert code == 2 and "destination(s) google not used by any segment (destinations: vip: meta)" in err
    code, _, err = invoke("sync", "--destination", "nope", "--config", str(cfg))
    assert code == 2 and "nope" in err


def test_version() -> None:
    import connector

    code, out, _ = invoke("--version")
    assert code == 0 and out == f"connector {connector.__version__}\n"


# ----------------------------------------------------------------------------- tables and errors


def test_results_never_cut_audience_ids_or_counts_and_group_thousands() -> None:
    import io

    from rich.console import Console

    from connector.cli import show_results
    from connector.diff import PlanCounts
    from connector.engine import RunResult

    ids = ["120212345678901234567", "9876543210987"]
    results = [RunResult("vip_buyers", dest, dest, "success", sandbox=True, audience_id=aud,
                         counts=PlanCounts(source_rows=1_234_567, adds=1_200_000, unchanged=34_567), write_calls=1_234)
               for dest, aud in zip(("meta_ads", "google_ads"), ids, strict=True)]  # fmt: skip
    for width in (160, 80, 40):
        buf = io.StringIO()
        show_results(Console(file=buf, width=width), results, dry_run=False)
        text = buf.getvalue()
        assert "…" not in text, text
        for value in (*ids, "1,234,567", "1,200,000", "34,567", "1,234"):
            assert value in text, (width, value, text)
        assert ("┃ audience" in text) is (width == 160), text  # a table when it fits, blocks of lines otherwise


def test_status_table_never_cuts_audience_ids(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from connector import cli

    write_csv(harness.csv, [person(i) for i in range(1_200)])
    monkeypatch.setattr(cli.out, "width", 70)
    code, out, _ = invoke("sync", "--config", str(harness.dir / "connector.toml"))
    assert code == 0, out
    code, js, _ = invoke("status", "--config", str(harness.dir / "connector.toml"), "--json")
    ids = [p["audience_id"] for p in json.loads(js)["pairs"]]
    assert all(ids) and all(i in out for i in ids), out
    assert "1,200" in out and "…" not in out
    code, out, _ = invoke("status", "--config", str(harness.dir / "connector.toml"))
    assert code == 0 and all(i in out for i in ids), out
    assert "1,200" in out and "…" not in out
    code, out, _ = invoke("runs", "--config", str(harness.dir / "connector.toml"))
    assert code == 0 and "1,200" in out and "…" not in out


def test_without_workers_status_and_runs_show_no_job_queue(harness: Harness) -> None:
    cfg = str(harness.dir / "connector.toml")
    for command in ("status", "runs"):
        code, js, _ = invoke(command, "--config", cfg, "--json")
        assert code == 0 and "jobs" not in json.loads(js), js  # the embedded mode's queue is not a job table
        code, out, _ = invoke(command, "--config", cfg)
        assert code == 0 and "job queue" not in out, out


def test_a_failed_segment_error_is_printed_once(harness: Harness) -> None:
    harness.csv.write_text("customer_id,mail\nC1,a@example.com\n")
    code, _, err = invoke("sync", "--config", str(harness.dir / "connector.toml"))
    assert code == 1
    assert err.count("missing column(s) 'email'") == 1, err


def test_sync_off_a_terminal_logs_progress(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from connector import cli
    from connector.progress import LogProgress

    write_csv(harness.csv, [person(i) for i in range(30)])
    monkeypatch.setattr(cli, "progress_renderer", lambda console: LogProgress(interval=0.0))
    code, _, err = invoke("sync", "--config", str(harness.dir / "connector.toml"))
    assert code == 0
    assert "reading vip: 30 rows" in err and "sending vip -> meta: 30 of 30 rows (100%)" in err
