"""Member files on object storage: an S3-compatible server on loopback (moto's server mode)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import Harness, person
from s3_server import S3Server, s3_server

from connector.errors import ConfigError
from connector.ledger.files import MemberStore, PairFiles, member_root, member_schema
from connector.settings import ConnectorSettings


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        server.create_bucket("ledger")
        yield server


def _table(n: int) -> pa.Table:
    schema = member_schema(["em"])
    rows = {f.name: [None] * n for f in schema}
    rows.update(k=[bytes([i]) * 16 for i in range(n)], kind=[0] * n, fp=list(range(n)), p_em=[bytes([i]) * 32 for i in range(n)])
    return pa.table(rows, schema=schema)


def test_a_written_file_is_read_back_by_another_machine(s3: S3Server, tmp_path: Path) -> None:
    url = s3.url("ledger", "roundtrip")
    mine = PairFiles(MemberStore(url, tmp_path / "a"), "vip", "meta")
    mine.write("base-1-x.parquet", _table(5))
    assert [p.rsplit("/", 1)[-1] for p in s3.objects("ledger", "roundtrip")] == ["base-1-x.parquet"]
    # another worker: an empty working copy fetches the object on first use
    theirs = PairFiles(MemberStore(url, tmp_path / "b"), "vip", "meta")
    assert not (theirs.dir / "base-1-x.parquet").exists()
    import pyarrow.parquet as pq

    assert pq.read_table(theirs.path("base-1-x.parquet")).cast(_table(5).schema).equals(_table(5))  # keys, digests fixed-width


def test_an_unpublished_file_is_not_on_the_store(s3: S3Server, tmp_path: Path) -> None:
    files = PairFiles(MemberStore(s3.url("ledger", "unpublished"), tmp_path), "vip", "meta")
    with files.writer("delta-2-y.parquet", _table(1).schema) as w:
        w.write(_table(1))
    assert s3.objects("ledger", "unpublished") == []  # the pointer cannot name it yet: nobody reads it
    files.publish("delta-2-y.parquet")
    assert len(s3.objects("ledger", "unpublished")) == 1


def test_collect_deletes_objects_no_pointer_names(s3: S3Server, tmp_path: Path) -> None:
    files = PairFiles(MemberStore(s3.url("ledger", "collect"), tmp_path), "vip", "meta")
    for name in ("base-1-a.parquet", "delta-2-b.parquet", "base-3-c.parquet"):
        files.write(name, _table(2))
    assert files.collect(["base-3-c.parquet", None]) == 2
    assert [p.rsplit("/", 1)[-1] for p in s3.objects("ledger", "collect")] == ["base-3-c.parquet"]
    assert sorted(p.name for p in files.dir.iterdir()) == ["base-3-c.parquet"]


def test_sync_with_ledger_files_on_s3_converges_from_any_working_copy(s3: S3Server, tmp_path: Path) -> None:
    converges_from_any_working_copy(tmp_path, s3.url("ledger", "engine"), lambda: s3.objects("ledger", "engine"))


def converges_from_any_working_copy(tmp_path: Path, url: str, objects: Callable[[], list[str]]) -> None:
    """Syncs with `ledger_files = url`, each from an empty working copy as if on another machine."""
    h = Harness(tmp_path)
    toml = h.dir / "connector.toml"
    toml.write_text(f'ledger_files = "{url}"\n' + toml.read_text())
    rows = [person(i) for i in range(30)]
    assert h.sync(rows)["meta"].status == "success"
    assert objects() and all(o.endswith(".parquet") for o in objects())
    assert not (tmp_path / "state" / "members").exists()  # nothing beside the working copy
    import shutil

    for round_ in range(2):  # twice: the second run writes a delta over a base it had to fetch
        shutil.rmtree(tmp_path / "state" / "cache")  # as if the next run were on another machine
        rows = rows[5:] + [person(i) for i in range(100 + 10 * round_, 104 + 10 * round_)]
        res = h.sync(rows)
        assert res["meta"].status == "success", res["meta"].error
        assert (res["meta"].counts.adds, res["meta"].counts.removes) == (4, 5)
    assert len(h.audience("meta")) == len(rows) and len(h.audience("google")) == len(rows)
    assert h.sync(rows)["meta"].write_calls == 0
    # only the files the pointers name are left: one or two per pair
    assert 2 <= len(objects()) <= 4


def test_member_root_default_is_state_dir_members(tmp_path: Path) -> None:
    s = ConnectorSettings(state_dir=tmp_path / "st")
    assert member_root(s) == tmp_path / "st" / "members"
    assert member_root(ConnectorSettings(state_dir=tmp_path, ledger_files=str(tmp_path / "elsewhere"))) == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("s3://b/p?access_key=AKIA&secret_key=x", "must not carry credentials"),
        ("ftp://host/p", "unsupported scheme 'ftp'"),
        ("s3:///prefix", "needs a bucket"),
    ],
)
def test_bad_ledger_files_are_refused_without_echoing_secrets(value: str, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        ConnectorSettings(ledger_files=value)
    assert message in str(err.value)
    assert "AKIA" not in str(err.value).split("input_value")[0]


def test_an_unreachable_store_is_a_ledger_error(tmp_path: Path) -> None:
    from connector.errors import LedgerError

    files = PairFiles(MemberStore("s3://b/p?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1", tmp_path),
                      "vip", "meta")  # nothing listens on port 9
    with pytest.raises(LedgerError) as err:
        files.write("base-1-z.parquet", _table(1))
    assert "could not upload a member file to s3://b/p" in str(err.value)
    assert "127.0.0.1:9" not in str(err.value)  # the endpoint stays out of messages


def test_a_bad_store_url_is_a_config_error_without_the_query_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        MemberStore("s3://b/p?endpoint_override=10.1.2.3:9&colour=blue", tmp_path)
    assert "s3://b/p" in str(err.value) and "colour" in str(err.value)
    assert "10.1.2.3" not in str(err.value) and "blue" not in str(err.value)
