"""Member files: each pair's members as an immutable Parquet base plus one cumulative delta.

One row per member (`kind` 0) and one per payload still owed a removal (`kind` 1: a member who
left, or the old payload of one whose identifiers changed); a delta marks a member that is gone
entirely with a `kind` 2 row. For a key the delta names, the delta's rows replace all of the base's.

Columns (narrow and binary; never a raw identifier)::

    k      BLOB(16)  member key: the first 16 bytes of sha256("connector:key:" + key)
    kind   UTINYINT  0 member, 1 owed removal, 2 gone (delta only)
    fp     UBIGINT   fingerprint of the member's raw source row (unchanged rows skip normalization)
    p_*    payload exactly as sent: BLOB(32) SHA-256 digests, VARCHAR for the fields a platform wants clear
    c      UTINYINT  Google consent code (3 * ad_user_data + ad_personalization; 0 unspecified, 1 granted,
                     2 denied each), NULL for Meta
    st     UTINYINT  0 to send, 1 on the platform, 2 rejected, 3 sent in batch (run, b): on the platform
                     once that batch is acknowledged (the control plane's `batches`), 4 maybe on the platform
    run    UINTEGER  the run that sent the row (add for members, removal for owed rows)
    b      INTEGER   the batch of that run
    acc    TIMESTAMP when the platform accepted the member (Google memberships expire from there)

Files are written to a temporary name, fsynced and renamed: a reader sees a whole file or none.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import uuid
from collections.abc import Iterable, Sequence
from hashlib import sha1
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from connector.identifiers.columns import CLEAR_KEYS as CLEAR_KEYS

MEMBER, OWED, GONE = 0, 1, 2
TO_SEND, ON, REJECTED, SENT, MAYBE = 0, 1, 2, 3, 4


def payload_column(key: str) -> str:
    return f"p_{key}"


def member_schema(payload_keys: Sequence[str]) -> pa.Schema:
    fields = [pa.field("k", pa.binary()), pa.field("kind", pa.uint8()), pa.field("fp", pa.uint64())]
    fields += [pa.field(payload_column(k), pa.string() if k in CLEAR_KEYS else pa.binary()) for k in payload_keys]
    fields += [
        pa.field("c", pa.uint8()), pa.field("st", pa.uint8()), pa.field("run", pa.uint32()),
        pa.field("b", pa.int32()), pa.field("acc", pa.timestamp("us", tz="UTC")),
    ]  # fmt: skip
    return pa.schema(fields)


def _safe(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60]
    return f"{clean}-{sha1(name.encode('utf-8')).hexdigest()[:8]}"  # noqa: S324 - a folder name, not security


class PairFiles:
    """The folder of one (segment, destination) pair's member files."""

    def __init__(self, root: Path, segment: str, destination: str) -> None:
        self.dir = root / _safe(segment) / _safe(destination)

    def path(self, name: str) -> Path:
        return self.dir / name

    def new_name(self, what: str, run_id: int) -> str:
        return f"{what}-{run_id}-{uuid.uuid4().hex[:8]}.parquet"

    def writer(self, name: str, schema: pa.Schema) -> MemberWriter:
        self.dir.mkdir(parents=True, exist_ok=True)
        return MemberWriter(self.path(name), schema)

    def write(self, name: str, table: pa.Table) -> None:
        with self.writer(name, table.schema) as w:
            w.write(table)

    def collect(self, keep: Iterable[str | None]) -> int:
        """Delete the member files no pointer names (and temporary files a crash left); returns how many."""
        wanted = {k for k in keep if k}
        n = 0
        if not self.dir.is_dir():
            return 0
        for p in self.dir.iterdir():
            if p.name not in wanted and (p.suffix == ".parquet" or p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)
                n += 1
        return n


class MemberWriter:
    """Streams record batches into one Parquet file; the file appears (fsynced) only on `close`.
    Hash columns are random bytes: no dictionary, no compression (both cost time and win nothing).
    Batches are encoded on a thread of their own (pyarrow releases the GIL), beside whatever makes them."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.rows = 0
        self._w = pq.ParquetWriter(self.tmp, schema, compression="none", use_dictionary=False,
                                   write_statistics=["run", "b", "kind", "st"])  # fmt: skip
        self._queue: queue.Queue[pa.RecordBatch | pa.Table | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="member-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                if isinstance(data, pa.RecordBatch):
                    self._w.write_batch(data)
                else:
                    self._w.write_table(data)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller on close
                self._error = exc

    def write(self, data: pa.RecordBatch | pa.Table) -> None:
        if data.num_rows:
            if self._error is not None:
                raise self._error
            self._queue.put(data)
            self.rows += data.num_rows

    def _finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._w.close()

    def close(self) -> None:
        self._finish()
        if self._error is not None:
            self.tmp.unlink(missing_ok=True)
            raise self._error
        fsync_replace(self.tmp, self.path)

    def abort(self) -> None:
        self._finish()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> MemberWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def fsync_replace(tmp: Path, path: Path) -> None:
    """Make a written file durable, then give it its name (and make the name durable)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_columns(path: Path, schema: pa.Schema) -> str:
    """A DuckDB select list reading `path` as `schema` (a column the file lacks reads as NULL: a segment
    may gain an identifier field after its files were written)."""
    have = set(pq.read_schema(path).names)
    cols = []
    for f in schema:
        if f.name in have:
            cols.append(f'"{f.name}"')
        else:
            cols.append(f'NULL::{_duck_type(f.type)} AS "{f.name}"')
    return ", ".join(cols)


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_binary(t):
        return "BLOB"
    if pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    return {pa.uint8(): "UTINYINT", pa.uint32(): "UINTEGER", pa.uint64(): "UBIGINT", pa.int32(): "INTEGER"}[t]


def sql_path(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"
