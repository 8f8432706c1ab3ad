"""Hostile input, end to end through `connector sync`: each case first syncs a good segment of 60
members into the Meta sandbox, then feeds one kind of bad input. The run must fail (or skip the bad
rows) with a message naming the input and what to fix, exit 2 for config mistakes and 1 for data,
and lose nothing: the audience and the ledger still hold the 60 members, and the next good run
changes nothing."""

from __future__ import annotations

import csv
import http.server
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from connector.cli import app
from connector.ledger.journal import Journal
from connector.sandbox.meta_graph import MetaGraphEmulator

N = 60
FIELDS = ["id", "email", "phone"]


def rows(n: int = N) -> list[list[str]]:
    return [[f"C{i}", f"user{i}@example.com", f"+1 415 555 {i:04d}"] for i in range(n)]


def write_csv(path: Path, data: list[list[str]], header: list[str] = FIELDS) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(data)


class Api:
    """An HTTP JSON source on loopback whose answers a test can break."""

    def __init__(self) -> None:
        self.mode = "ok"
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                body, ctype, status = api.answer()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/members"

    def answer(self) -> tuple[bytes, str, int]:
        good = json.dumps({"data": [dict(zip(FIELDS, r, strict=True)) for r in rows()], "next": None}).encode()
        if self.mode == "500":
            return b'{"error": "boom"}', "application/json", 500
        if self.mode == "html":
            return b"<html><body>Maintenance</body></html>", "text/html", 200
        if self.mode == "truncated":
            return good[: len(good) // 2], "application/json", 200
        if self.mode == "no_list":
            return b'{"data": {"oops": 1}}', "application/json", 200
        if self.mode == "surrogates":  # JSON escapes of lone surrogates: valid JSON, not valid Unicode
            data = [dict(zip(FIELDS, r, strict=True)) for r in rows()]
            data[3]["email"] = "user3\ud800@example.com"
            data.append({"id": "X\ud800", "email": "x@example.com", "phone": "+1 415 555 9999"})
            return json.dumps({"data": data, "next": None}).encode(), "application/json", 200
        return good, "application/json", 200


class Case:
    def __init__(self, tmp: Path, source: str) -> None:
        self.dir = tmp
        self.source = source
        self.cfg = tmp / "connector.toml"
        self.extra = ""
        self.write_config()

    def write_config(self, extra_top: str = "", extra_dest: str = "", extra_seg: str = "") -> None:
        self.cfg.write_text(f"""state_dir = "state"
{extra_top}
[destinations.meta]
type = "meta"
ad_account_id = "act_5"
sandbox = true
max_attempts = 2
backoff_max_seconds = 0.01
{extra_dest}
[segments.vip]
source = {self.source}
key = "id"
identifiers = {{ email = "email", phone = "phone" }}
destinations = ["meta"]
{extra_seg}
""")

    def sync(self, *args: str) -> tuple[int, str, dict[str, object] | None]:
        res = CliRunner().invoke(app, ["sync", "--config", str(self.cfg), "--json", *args])
        doc = json.loads(res.stdout) if res.stdout.strip().startswith("{") else None
        return res.exit_code, res.stderr + res.stdout, doc

    def audience_size(self) -> int:
        with MetaGraphEmulator(state_file=self.dir / "state" / "sandbox-meta-meta.arrow") as emu:
            (aid,) = emu.audiences
            return emu.member_count(aid) or 0

    def ledger_counts(self) -> dict[str, int]:
        ledger = Journal(f"sqlite:///{self.dir / 'state' / 'ledger.db'}")
        try:
            return ledger.counts("vip", "meta")
        finally:
            ledger.close()

    def assert_intact(self, restore: Callable[[], None]) -> None:
        """Nothing lost: 60 members on the platform and in the ledger; the good input changes nothing."""
        assert self.audience_size() == N
        assert sum(self.ledger_counts().values()) == N
        restore()
        code, out, doc = self.sync()
        assert code == 0, out
        assert doc is not None
        (run,) = doc["runs"]  # type: ignore[index]
        assert (run["adds"], run["removes"], run["unchanged"]) == (0, 0, N), run
        assert self.audience_size() == N


@pytest.fixture
def csv_case(tmp_path: Path) -> Iterator[Case]:
    case = Case(tmp_path, '{ type = "csv", path = "m.csv" }')
    write_csv(tmp_path / "m.csv", rows())
    code, out, _ = case.sync()
    assert code == 0, out
    yield case


def restore_csv(case: Case) -> Callable[[], None]:
    return lambda: write_csv(case.dir / "m.csv", rows())


# ----------------------------------------------------------------------------- CSV


def test_csv_bad_encoding_names_the_file_and_the_setting(csv_case: Case) -> None:
    (csv_case.dir / "m.csv").write_bytes(b"id,email,phone\n" + "C1,jos\xe9@example.com,1\n".encode("latin-1"))
    code, out, _ = csv_case.sync()
    assert code == 1
    assert "m.csv" in out and "encoding" in out
    assert "jos" not in out  # no row content in the message
    csv_case.assert_intact(restore_csv(csv_case))


def test_csv_latin1_file_reads_with_the_encoding_setting(tmp_path: Path) -> None:
    case = Case(tmp_path, '{ type = "csv", path = "m.csv", encoding = "latin-1" }')
    text = "id,email,phone\n" + "".join(f"C{i},jos\xe9{i}@example.com,\n" for i in range(N))
    (tmp_path / "m.csv").write_bytes(text.encode("latin-1"))
    code, out, doc = case.sync()
    assert code == 0, out
    assert doc is not None and doc["runs"][0]["adds"] == N  # type: ignore[index]


def test_csv_with_bom_and_crlf_is_the_same_segment(csv_case: Case) -> None:
    body = "\r\n".join(",".join(r) for r in [FIELDS, *rows()]) + "\r\n"
    (csv_case.dir / "m.csv").write_bytes(b"\xef\xbb\xbf" + body.encode())
    code, out, doc = csv_case.sync()
    assert code == 0, out
    assert doc is not None and doc["runs"][0]["unchanged"] == N  # type: ignore[index]


def test_csv_missing_key_column_names_it_and_the_columns_found(csv_case: Case) -> None:
    write_csv(csv_case.dir / "m.csv", [r[1:] for r in rows()], header=["email", "phone"])
    code, out, _ = csv_case.sync()
    assert code == 1
    assert "segment vip" in out and "'id'" in out and "email" in out and "m.csv" in out and "`key`" in out
    csv_case.assert_intact(restore_csv(csv_case))


def test_csv_duplicate_keys_count_once_and_keep_the_first(csv_case: Case) -> None:
    data = rows() + [["C1", "someone.else@example.com", ""], ["C2", "third@example.com", ""]]
    write_csv(csv_case.dir / "m.csv", data)
    code, out, doc = csv_case.sync()
    assert code == 0, out
    assert doc is not None
    (run,) = doc["runs"]  # type: ignore[index]
    assert run["invalid_reasons"] == {"duplicate_key": 2} and run["adds"] == 0 and run["unchanged"] == N
    csv_case.assert_intact(restore_csv(csv_case))


def test_csv_huge_fields_drop_that_identifier_not_the_batch(csv_case: Case) -> None:
    data = rows()
    data[3][1] = "x" * 2_000_000 + "@example.com"  # a 2 MB "email"
    data[4][2] = "9" * 500_000
    write_csv(csv_case.dir / "m.csv", data)
    code, out, doc = csv_case.sync()
    assert code == 0, out
    assert doc is not None
    (run,) = doc["runs"]  # type: ignore[index]
    # both members stay, with the identifier they still have: old payload out, new one in
    assert run["left_segment"] == 0 and run["invalid"] == 0 and run["identifier_changes"] == 2
    assert run["invalid_reasons"] == {"email_invalid": 1, "phone_invalid": 1}, run
    assert "xxxxxxxx" not in out
    assert csv_case.audience_size() == N and sum(csv_case.ledger_counts().values()) == N
    restore_csv(csv_case)()
    code, out, doc = csv_case.sync()
    assert code == 0 and doc is not None and doc["runs"][0]["identifier_changes"] == 2  # type: ignore[index]
    assert csv_case.audience_size() == N


def test_ten_percent_garbage_identifiers_are_counted_and_the_rest_synced(csv_case: Case) -> None:
    data = rows(N + 40)
    for i in range(0, N + 40, 10):
        data[i][1:] = ["not an email", "call me maybe"]
    write_csv(csv_case.dir / "m.csv", data)
    code, out, doc = csv_case.sync()
    assert code == 0, out
    assert doc is not None
    (run,) = doc["runs"]  # type: ignore[index]
    assert run["invalid"] == 10
    assert run["invalid_reasons"] == {"email_invalid": 10, "phone_invalid": 10, "no_identifier": 10}
    # six of the original members became garbage: they leave; 36 new ones join
    assert run["removes"] == 6 and run["adds"] == 36
    assert csv_case.audience_size() == N + 40 - 10


def test_csv_truncated_mid_row_fails_naming_the_file(csv_case: Case) -> None:
    """An export cut off mid-row: the short row is a parse error, and no member is removed."""
    good = (csv_case.dir / "m.csv").read_text()
    (csv_case.dir / "m.csv").write_text(good[: len(good) // 2] + '"C999,"unterminated@example.com')
    code, out, _ = csv_case.sync()
    assert code == 1
    assert "segment vip" in out and "m.csv" in out and "parse error" in out and "unterminated" not in out


def test_csv_cut_off_at_a_row_boundary_is_stopped_by_the_guardrail(csv_case: Case) -> None:
    write_csv(csv_case.dir / "m.csv", rows()[:20])  # a partial export that still parses
    code, out, _ = csv_case.sync()
    assert code == 1
    assert "removes 40 of 60" in out and "--force" in out
    csv_case.assert_intact(restore_csv(csv_case))
    csv_case.assert_intact(restore_csv(csv_case))


def test_an_emptied_export_is_stopped_by_the_guardrail(csv_case: Case) -> None:
    write_csv(csv_case.dir / "m.csv", [])
    code, out, _ = csv_case.sync()
    assert code == 1
    assert "0 rows" in out and "--force" in out
    csv_case.assert_intact(restore_csv(csv_case))


# ----------------------------------------------------------------------------- Parquet


def test_parquet_corrupt_or_missing_key_column(tmp_path: Path) -> None:
    case = Case(tmp_path, '{ type = "parquet", path = "m.parquet" }')
    table = pa.table({f: [r[i] for r in rows()] for i, f in enumerate(FIELDS)})
    pq.write_table(table, tmp_path / "m.parquet")
    assert case.sync()[0] == 0
    good = (tmp_path / "m.parquet").read_bytes()
    (tmp_path / "m.parquet").write_bytes(good[: len(good) // 2])  # truncated upload
    code, out, _ = case.sync()
    assert code == 1 and "m.parquet" in out and "Parquet" in out
    case.assert_intact(lambda: (tmp_path / "m.parquet").write_bytes(good))
    pq.write_table(table.drop_columns(["id"]), tmp_path / "m.parquet")
    code, out, _ = case.sync()
    assert code == 1 and "'id'" in out and "m.parquet" in out
    case.assert_intact(lambda: (tmp_path / "m.parquet").write_bytes(good))


# ----------------------------------------------------------------------------- SQL


def test_sql_errors_name_the_segment_and_hide_the_password(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE customers (id TEXT, email TEXT, phone TEXT)")
        conn.executemany("INSERT INTO customers VALUES (?, ?, ?)", rows())
    case = Case(tmp_path, '{ type = "sql", url = "sqlite:///shop.db", query = "SELECT id, email, phone FROM customers" }')
    assert case.sync()[0] == 0
    case.source = '{ type = "sql", url = "sqlite:///shop.db", query = "SELECT id, email, phone FROM customer" }'
    case.write_config()
    code, out, _ = case.sync()
    assert code == 1 and "segment vip" in out and "no such table" in out
    case.source = '{ type = "sql", url = "postgresql+psycopg://shop:hunter2@127.0.0.1:1/nope", query = "SELECT 1" }'
    case.write_config()
    code, out, _ = case.sync()
    assert code == 1 and "hunter2" not in out and "vip" in out

    def restore() -> None:
        case.source = '{ type = "sql", url = "sqlite:///shop.db", query = "SELECT id, email, phone FROM customers" }'
        case.write_config()

    case.assert_intact(restore)


# ----------------------------------------------------------------------------- HTTP


def synced_http_case(tmp_path: Path, api: Api) -> Case:
    """A segment read from `api`, synced once while it answers well."""
    case = Case(tmp_path, f'{{ type = "http", url = "{api.url}", records_path = "data", next_url_path = "next", '
                          'timeout_seconds = 5 }')  # fmt: skip
    code, out, _ = case.sync()
    assert code == 0, out
    return case


@pytest.mark.parametrize(("mode", "message"), [("500", "500"), ("html", "JSON"), ("truncated", "JSON"),
                                               ("no_list", "list")])  # fmt: skip
def test_http_source_bad_answers_fail_the_run_and_keep_the_audience(tmp_path: Path, mode: str, message: str) -> None:
    api = Api()
    try:
        case = synced_http_case(tmp_path, api)
        api.mode = mode
        code, out, _ = case.sync()
        assert code == 1, out
        assert message in out and "vip" in out, out
        case.assert_intact(lambda: setattr(api, "mode", "ok"))
    finally:
        api.server.shutdown()


def test_http_source_lone_surrogates_are_values_not_errors(tmp_path: Path) -> None:
    api = Api()
    try:
        case = synced_http_case(tmp_path, api)
        api.mode = "surrogates"
        code, out, doc = case.sync()
        assert code == 0 and doc is not None, out
        (run,) = doc["runs"]  # type: ignore[index]
        # the new key is a member of its own; the broken email is dropped, member 3 keeps its phone
        assert (run["new_members"], run["identifier_changes"], run["left_segment"]) == (1, 1, 0), run
        assert run["invalid_reasons"] == {"email_invalid": 1}, run
        assert case.audience_size() == N + 1
        code, out, doc = case.sync()
        assert code == 0 and doc is not None, out
        (run,) = doc["runs"]  # type: ignore[index]
        assert (run["adds"], run["removes"], run["unchanged"]) == (0, 0, N + 1), run
    finally:
        api.server.shutdown()


# ----------------------------------------------------------------------------- config (exit 2)


@pytest.mark.parametrize(
    ("where", "text", "expected"),
    [
        ("top", "colour = 'blue'", "colour"),
        ("seg", 'schedule = "every hour"', "schedule"),
        ("seg", 'schedule = "61 * * * *"', "cron"),
        ("dest", 'graph_url = "http://graph.example.com"', "loopback"),
        ("seg", 'mode = "sometimes"', "mode"),
        ("dest", "customer_file_source = 'SOMEONE'", "customer_file_source"),
    ],
)
def test_config_mistakes_exit_2_naming_the_key(csv_case: Case, where: str, text: str, expected: str) -> None:
    csv_case.write_config(**{f"extra_{where}": text})
    code, out, _ = csv_case.sync()
    assert code == 2, out
    assert expected in out and "connector.toml" in out, out

    csv_case.assert_intact(lambda: csv_case.write_config())


def test_missing_secret_exits_2_naming_the_env_variable(csv_case: Case) -> None:
    csv_case.cfg.write_text(csv_case.cfg.read_text().replace("sandbox = true", "sandbox = false"))
    code, out, _ = csv_case.sync()
    assert code == 2, out
    assert "CONNECTOR_DESTINATIONS__META__ACCESS_TOKEN" in out
    csv_case.assert_intact(lambda: csv_case.write_config())


# ----------------------------------------------------------------------------- member values


def test_hostile_values_are_counted_per_reason_and_never_sink_the_batch(tmp_path: Path) -> None:
    """A value-based Meta audience needs a non-negative number per member: rows whose value is negative,
    not a number, not finite or missing are not sent, counted per reason; the rest of the batch goes."""
    case = Case(tmp_path, '{ type = "csv", path = "m.csv" }')
    case.write_config(extra_seg='value = "ltv"')
    header = [*FIELDS, "ltv"]
    good = [[*r, str(10 + i)] for i, r in enumerate(rows())]
    bad = [r[:] for r in good]
    for i, v in enumerate(["-1", "NaN", "a lot", "", "1e999", "Infinity", "12,5"]):
        bad[i][3] = v
    write_csv(tmp_path / "m.csv", bad, header=header)
    code, out, doc = case.sync()
    assert code == 0, out
    assert doc is not None
    (run,) = doc["runs"]  # type: ignore[index]
    assert run["value_reasons"] == {"value_negative": 1, "value_not_a_number": 2, "value_missing": 1,
                                    "value_not_finite": 3}  # fmt: skip
    assert run["invalid"] == 7 and run["adds"] == N - 7 and case.audience_size() == N - 7
    assert "a lot" not in out and "12,5" not in out  # counted, never echoed
    shown = CliRunner().invoke(app, ["sync", "--config", str(case.cfg)])  # the same run, as text
    assert shown.exit_code == 0, shown.stdout
    assert "value problems (not sent, or kept at the value last sent)" in shown.stdout
    assert "value_not_finite=3" in shown.stdout
    write_csv(tmp_path / "m.csv", good, header=header)  # repaired: the 7 are sent, with their values
    code, out, doc = case.sync()
    assert code == 0 and doc is not None
    (run,) = doc["runs"]  # type: ignore[index]
    assert (run["adds"], run["unchanged"], run["value_reasons"]) == (7, N - 7, {}), run
    assert case.audience_size() == N
