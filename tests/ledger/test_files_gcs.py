"""Member files on Google Cloud Storage: `ledger_files = "gs://..."` through pyarrow's GcsFileSystem, against
gcp-storage-emulator (the GCS JSON API on loopback, a dev dependency). The credentials come the documented way,
`GOOGLE_APPLICATION_CREDENTIALS`: an authorized-user file whose token endpoint is a stub on loopback (the
emulator accepts any token; the stub proves the client asked for one and sent nothing to Google)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
from test_files_s3 import converges_from_any_working_copy

from connector.ledger.files import MemberStore, PairFiles, member_schema


@dataclass
class Gcs:
    endpoint: str  # host:port
    token_requests: list[str] = field(default_factory=list)

    def url(self, bucket: str, prefix: str) -> str:
        return f"gs://{bucket}/{prefix}?scheme=http&endpoint_override={self.endpoint}&retry_limit_seconds=5"

    def objects(self, bucket: str, prefix: str) -> list[str]:
        fs = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=self.endpoint)
        infos = fs.get_file_info(pafs.FileSelector(f"{bucket}/{prefix}", recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gcs]:
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="ledger")
    server.start()
    found = Gcs(f"127.0.0.1:{port}")

    class TokenEndpoint(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            found.token_requests.append(body.split("&", 1)[0])
            doc = json.dumps({"access_token": "loopback-access", "expires_in": 3600, "token_type": "Bearer"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(doc)))
            self.end_headers()
            self.wfile.write(doc)

        def log_message(self, format: str, *args: Any) -> None:
            return

    tokens = ThreadingHTTPServer(("127.0.0.1", 0), TokenEndpoint)
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    creds = tmp_path_factory.mktemp("gcs") / "credentials.json"
    creds.write_text(json.dumps({"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r",
                                 "token_uri": f"http://127.0.0.1:{tokens.server_address[1]}/token"}))  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(creds))
        try:
            yield found
        finally:
            tokens.shutdown()
            server.stop()


def test_a_file_written_to_gcs_is_read_back_and_collected(gcs: Gcs, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = member_schema(["em"])
    rows = {f.name: [None] * 3 for f in schema}
    rows.update(k=[bytes([i]) * 16 for i in range(3)], kind=[0] * 3, fp=[1, 2, 3], p_em=[bytes([i]) * 32 for i in range(3)])
    table = pa.table(rows, schema=schema)
    url = gcs.url("ledger", "unit")
    mine = PairFiles(MemberStore(url, tmp_path / "a"), "vip", "meta")
    mine.write("base-1-x.parquet", table)
    mine.write("delta-2-y.parquet", table)
    assert [o.rsplit("/", 1)[-1] for o in gcs.objects("ledger", "unit")] == ["base-1-x.parquet", "delta-2-y.parquet"]
    theirs = PairFiles(MemberStore(url, tmp_path / "b"), "vip", "meta")  # another machine: an empty working copy
    assert pq.read_table(theirs.path("delta-2-y.parquet")).cast(schema).equals(table)  # keys and digests fixed-width
    assert theirs.collect(["delta-2-y.parquet", None]) == 1
    assert [o.rsplit("/", 1)[-1] for o in gcs.objects("ledger", "unit")] == ["delta-2-y.parquet"]
    assert gcs.token_requests and set(gcs.token_requests) == {"grant_type=refresh_token"}


def test_sync_with_ledger_files_on_gcs_converges_from_any_working_copy(gcs: Gcs, tmp_path: Path) -> None:
    converges_from_any_working_copy(tmp_path, gcs.url("ledger", "engine"), lambda: gcs.objects("ledger", "engine"))
