"""Member files: each pair's members as an immutable Parquet base plus one cumulative delta.

One row per member (`kind` 0) and one per payload still owed a removal (`kind` 1: a member who
left, or the old payload of one whose identifiers changed); a delta marks a member that is gone
entirely with a `kind` 2 row. For a key the delta names, the delta's rows replace all of the base's:
the delta lists those base rows by position (`kind` 3, the base's row number in `b`, and always one with
`b` = -1), so reading the pair drops them by row number, not by a join on 16-byte keys. A delta
without `kind` 3 rows (written before they existed) replaces by key.

Columns (narrow and binary; never a raw identifier)::

    k      BLOB(16)  member key: the first 16 bytes of sha256("connector:key:" + key)
    kind   UTINYINT  0 member, 1 owed removal, 2 gone, 3 a base row replaced (both delta only)
    fp, fq UBIGINT   the 128-bit fingerprint of the member's raw source row, key included: a warm run finds
                     unchanged rows by it alone (no member key computed, no normalization)
    p_*    payload exactly as sent: BLOB(32) SHA-256 digests, VARCHAR for the fields a platform wants clear
    c      UTINYINT  Google consent code (3 * ad_user_data + ad_personalization; 0 unspecified, 1 granted,
                     2 denied each), NULL for Meta
    v      DOUBLE    the member's value as last sent (`value = "<column>"`; NULL: none); a value that moved
                     less than `value_resend_threshold` is not sent and keeps the value last sent here
    t      VARCHAR   the member's tier (the source's `_tier` column) as last sent, NULL without tiers
    st     UTINYINT  0 to send, 1 on the platform, 2 rejected, 3 sent in batch (run, b): on the platform
                     once that batch is acknowledged (the control plane's `batches`), 4 maybe on the platform
    run    UINTEGER  the run that sent the row (add for members, removal for owed rows)
    b      INTEGER   the batch of that run (`kind` 3: the base's row number)
    acc    TIMESTAMP when the platform accepted the member (Google memberships expire from there)

The key and the digests are fixed-width columns in the files this module writes (FIXED_LEN_BYTE_ARRAY: read
back as one copy of their bytes), variable-width in those DuckDB writes; both read as BLOB.

Files are written to a temporary name, fsynced and renamed: a reader sees a whole file or none.

The files live in a local folder (default ``state_dir/members``) or on object storage
(``ledger_files = "s3://bucket/prefix"``, through pyarrow's filesystem layer; see `MemberStore`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import re
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from hashlib import sha1
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from connector.errors import ConfigError, LedgerError
from connector.identifiers.columns import CLEAR_KEYS as CLEAR_KEYS

if TYPE_CHECKING:
    from connector.settings import ConnectorSettings

log = logging.getLogger("connector.ledger.files")

MEMBER, OWED, GONE, REPLACED = 0, 1, 2, 3
TO_SEND, ON, REJECTED, SENT, MAYBE = 0, 1, 2, 3, 4


def payload_column(key: str) -> str:
    return f"p_{key}"


def member_schema(payload_keys: Sequence[str]) -> pa.Schema:
    fields = [pa.field("k", pa.binary()), pa.field("kind", pa.uint8()), pa.field("fp", pa.uint64()),
              pa.field("fq", pa.uint64())]
    fields += [pa.field(payload_column(k), pa.string() if k in CLEAR_KEYS else pa.binary()) for k in payload_keys]
    fields += [
        pa.field("c", pa.uint8()), pa.field("v", pa.float64()), pa.field("t", pa.string()),
        pa.field("st", pa.uint8()), pa.field("run", pa.uint32()),
        pa.field("b", pa.int32()), pa.field("acc", pa.timestamp("us", tz="UTC")),
    ]  # fmt: skip
    return pa.schema(fields)


# widths of the binary columns as written by `MemberWriter`: fixed-width Parquet columns (FIXED_LEN_BYTE_ARRAY)
# are read back as one copy of their bytes, where variable-width ones are decoded value by value (sending a
# 10M-member file reads about half as much CPU time); DuckDB reads either as BLOB
KEY_BYTES, DIGEST_BYTES = 16, 32


def stored_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` as `MemberWriter` writes it: the key and the digests fixed-width."""
    out = schema
    for i, f in enumerate(schema):
        if pa.types.is_binary(f.type):
            out = out.set(i, f.with_type(pa.binary(KEY_BYTES if f.name == "k" else DIGEST_BYTES)))
    return out


def as_stored(data: pa.RecordBatch | pa.Table, schema: pa.Schema) -> pa.RecordBatch | pa.Table:
    """`data` with its binary columns fixed-width as `schema` (a `stored_schema`) has them: a column of keys
    or digests without nulls is reinterpreted as it is, others are cast (a value of another width is an
    error naming the column, never a file that says something else)."""
    cols = []
    for f in schema:
        col = data.column(f.name)
        if pa.types.is_fixed_size_binary(f.type) and not pa.types.is_fixed_size_binary(col.type):
            try:
                chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
                fixed = [_fixed(c, f.type) for c in chunks]
            except pa.ArrowInvalid:
                raise LedgerError(f"member column {f.name!r}: a value is not {f.type.byte_width} bytes") from None
            col = pa.chunked_array(fixed, f.type) if isinstance(col, pa.ChunkedArray) else fixed[0]
        cols.append(col)
    if isinstance(data, pa.Table):
        return pa.Table.from_arrays(cols, schema=schema)
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _fixed(arr: pa.Array, typ: pa.FixedSizeBinaryType) -> pa.Array:
    width = typ.byte_width
    if arr.null_count == 0 and len(arr):
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
        if offsets[-1] - offsets[0] == width * len(arr):  # every value `width` bytes: the bytes as they are
            data = arr.buffers()[2]
            return pa.Array.from_buffers(typ, len(arr), [None, data.slice(int(offsets[0]), width * len(arr))])
    return arr.cast(typ)


def as_read(rb: pa.RecordBatch) -> pa.RecordBatch:
    """A batch read from a member file with its fixed-width columns as variable-width binary again (the
    columns' bytes as they are, and offsets), as every other reader of member rows has them."""
    if not any(pa.types.is_fixed_size_binary(t) for t in rb.schema.types):
        return rb
    cols = []
    for col in rb.columns:
        if pa.types.is_fixed_size_binary(col.type):
            n, width = len(col), col.type.byte_width
            offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * width).tobytes())
            validity, data = col.buffers()
            data = data.slice(col.offset * width, n * width)
            if validity is not None and col.null_count:
                validity = pa.array(col.is_valid()).buffers()[1]
            else:
                validity = None
            col = pa.Array.from_buffers(pa.binary(), n, [validity, offsets, data])
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, names=rb.schema.names)


def _safe(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60]
    return f"{clean}-{sha1(name.encode('utf-8')).hexdigest()[:8]}"  # noqa: S324 - a folder name, not security


class MemberStore:
    """Member files on object storage (any pyarrow filesystem: S3 and S3-compatible servers, GCS), with a
    local working copy under `cache`.

    DuckDB reads and writes local files only (its httpfs extension is not assumed to be installable), so
    a file is written and fsynced in the working copy, then `publish`ed: uploaded under its final name.
    Names are unique and never reused, and an object appears only whole (S3 completes an upload at once),
    so an object no pointer names yet is the "temporary object": nothing reads it until the journal's
    pointer move names it - that move is the commit. A crash between upload and pointer move leaves an
    unreferenced object that `PairFiles.collect` deletes. A pointed-at object is fetched into the working
    copy once; since names are never reused, a cached copy never goes stale."""

    def __init__(self, url: str, cache: Path, filesystem: pafs.FileSystem | None = None) -> None:
        if filesystem is None:
            try:
                filesystem, base = pafs.FileSystem.from_uri(url)
            except (pa.ArrowInvalid, OSError, ValueError) as exc:
                raise ConfigError(f"ledger_files: cannot open {_shown(url)}: {_redacted(str(exc), url)}") from None
        else:
            base = url.split("://", 1)[-1].split("?", 1)[0]
        self.fs: pafs.FileSystem = filesystem
        self.base = base.rstrip("/")
        self.cache = cache
        self.shown = _shown(url)
        self._url = url

    def _error(self, what: str, exc: OSError) -> LedgerError:
        return LedgerError(f"{what} {self.shown}: {_redacted(str(exc), self._url)}")

    def remote(self, *parts: str) -> str:
        return "/".join((self.base, *parts))

    def upload(self, local: Path, remote: str) -> None:
        try:
            with local.open("rb") as src, self.fs.open_output_stream(remote) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        except OSError as exc:
            raise self._error("could not upload a member file to", exc) from None

    def download(self, remote: str, local: Path) -> bool:
        """Fetch `remote` into `local` (whole or not at all); False when there is no such object."""
        try:
            if self.fs.get_file_info(remote).type == pafs.FileType.NotFound:
                return False
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f"{local.name}.{uuid.uuid4().hex[:8]}.part")
            try:
                with self.fs.open_input_stream(remote) as src, tmp.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
                os.replace(tmp, local)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise self._error("could not read a member file from", exc) from None
        return True

    def names(self, remote_dir: str) -> list[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(remote_dir, allow_not_found=True))
        except OSError as exc:
            raise self._error("could not list member files in", exc) from None
        return [i.base_name for i in infos if i.type == pafs.FileType.File]

    def delete(self, remote: str) -> None:
        try:
            self.fs.delete_file(remote)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete an unreferenced member file in %s (%s); the next run tries again",
                        self.shown, type(exc).__name__)  # fmt: skip


MemberRoot = Path | MemberStore


def _shown(url: str) -> str:
    """A storage URL as shown in messages: scheme, bucket and prefix (no query: endpoints, regions)."""
    return url.split("?", 1)[0]


def _redacted(message: str, url: str) -> str:
    """`message` without the values of the URL's query (an endpoint may be private)."""
    from urllib.parse import parse_qsl, urlsplit

    for _, value in parse_qsl(urlsplit(url).query):
        if value:
            message = message.replace(value, "...")
    return message


def member_root(settings: ConnectorSettings) -> MemberRoot:
    """Where the member files live: `ledger_files` (a URL or a folder), default state_dir/members."""
    where = settings.ledger_files_location
    if isinstance(where, Path):
        return where
    return MemberStore(where, settings.state_path / "cache" / "members")


class PairFiles:
    """The folder of one (segment, destination) pair's member files (a local folder: the files themselves,
    or the working copy of a `MemberStore`'s)."""

    def __init__(self, root: MemberRoot, segment: str, destination: str) -> None:
        self.store = root if isinstance(root, MemberStore) else None
        self._parts = (_safe(segment), _safe(destination))
        self.dir = (root.cache if isinstance(root, MemberStore) else root) / self._parts[0] / self._parts[1]

    def path(self, name: str) -> Path:
        """The local path of file `name`; from object storage, a file not in the working copy is fetched first."""
        p = self.dir / name
        if self.store is not None and not p.exists():
            self.store.download(self.store.remote(*self._parts, name), p)
        return p

    def publish(self, name: str) -> None:
        """Make a written file visible to every worker (upload it), before any pointer names it."""
        if self.store is not None:
            self.store.upload(self.dir / name, self.store.remote(*self._parts, name))

    def new_name(self, what: str, run_id: int) -> str:
        return f"{what}-{run_id}-{uuid.uuid4().hex[:8]}.parquet"

    def writer(self, name: str, schema: pa.Schema) -> MemberWriter:
        self.dir.mkdir(parents=True, exist_ok=True)
        return MemberWriter(self.dir / name, schema)

    def write(self, name: str, table: pa.Table) -> None:
        with self.writer(name, table.schema) as w:
            w.write(table)
        self.publish(name)

    def collect(self, keep: Iterable[str | None]) -> int:
        """Delete the member files no pointer names (and temporary files a crash left); returns how many."""
        wanted = {k for k in keep if k}
        n = 0
        if self.store is not None:
            # the caller holds the pair's lock: no other writer has an upload of this pair under way
            for name in self.store.names(self.store.remote(*self._parts)):
                if name not in wanted and (name.endswith(".parquet") or name.endswith(".tmp")):
                    self.store.delete(self.store.remote(*self._parts, name))
                    n += 1
        if not self.dir.is_dir():
            return n
        for p in self.dir.iterdir():
            if p.name not in wanted and (p.suffix == ".parquet" or p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)
                n += 0 if self.store is not None else 1  # the working copy's files were counted as objects
        return n


class MemberWriter:
    """Streams record batches into one Parquet file; the file appears (fsynced) only on `close`.
    Hash columns are random bytes: no dictionary, no compression (both cost time and win nothing).
    Batches are encoded on a thread of their own (pyarrow releases the GIL), beside whatever makes them;
    the same thread starts the disk writes as the file grows, and finishes and fsyncs it once the last
    batch is in (`seal`)."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.rows = 0
        self.schema = stored_schema(schema)
        self._w = pq.ParquetWriter(self.tmp, self.schema, compression="none", use_dictionary=False,
                                   write_statistics=["run", "b", "kind", "st", "fp", "fq"])  # fmt: skip
        self._queue: queue.Queue[pa.RecordBatch | pa.Table | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._sealed = False
        self._thread = threading.Thread(target=self._run, name="member-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        flushing = _Writeback(self.tmp)
        while (data := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                data = as_stored(data, self.schema)
                if isinstance(data, pa.RecordBatch):
                    self._w.write_batch(data)
                else:
                    self._w.write_table(data)
                flushing.start()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller on close
                self._error = exc
        flushing.close()
        try:
            self._w.close()
            if self._error is None:
                fsync_file(self.tmp)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller on close
            self._error = self._error or exc

    def write(self, data: pa.RecordBatch | pa.Table) -> None:
        if data.num_rows:
            if self._error is not None:
                raise self._error
            self._queue.put(data)
            self.rows += data.num_rows

    def seal(self) -> None:
        """No more batches: the file is finished and fsynced in the background, while the caller decides
        whether to `close` (keep) or `abort` it."""
        if not self._sealed:
            self._sealed = True
            self._queue.put(None)

    def _finish(self) -> None:
        self.seal()
        self._thread.join()

    def close(self) -> None:
        self._finish()
        if self._error is not None:
            self.tmp.unlink(missing_ok=True)
            raise self._error
        replace_durably(self.tmp, self.path)

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


class _Writeback:
    """Starts the disk writes of a file being written (Linux `sync_file_range`, asynchronous) as it grows,
    so that its fsync, once it is whole, has little left to wait for: without it the kernel keeps a
    gigabyte-sized file dirty in memory until the fsync, then writes it all while the run waits."""

    def __init__(self, path: Path) -> None:
        self._fd = -1
        if _sync_file_range is not None:
            try:
                self._fd = os.open(path, os.O_RDONLY)
            except OSError:  # only a speed-up: the closing fsync makes the file durable either way
                pass

    def start(self) -> None:
        if self._fd >= 0 and _sync_file_range is not None:
            _sync_file_range(self._fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # from 0 to the end: what is not written yet

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = _libc_sync_file_range()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Give a durable file its name, and make the name durable."""
    os.replace(tmp, path)
    fsync_file(path.parent)


def fsync_replace(tmp: Path, path: Path) -> None:
    """Make a written file durable, then give it its name (and make the name durable)."""
    fsync_file(tmp)
    replace_durably(tmp, path)


def copy_to(con: duckdb.DuckDBPyConnection, files: PairFiles, name: str, query: str) -> None:
    """Write a query's rows as one of the pair's member files (whole or absent, like `MemberWriter`'s)."""
    files.dir.mkdir(parents=True, exist_ok=True)
    path = files.path(name)
    tmp = path.with_name(path.name + ".tmp")
    con.execute(f"COPY ({query}) TO {sql_path(tmp)} (FORMAT parquet, COMPRESSION uncompressed, DICTIONARY_SIZE_LIMIT 1)")
    fsync_replace(tmp, path)


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
    if pa.types.is_binary(t) or pa.types.is_fixed_size_binary(t):
        return "BLOB"
    if pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    return {pa.uint8(): "UTINYINT", pa.uint32(): "UINTEGER", pa.uint64(): "UBIGINT", pa.int32(): "INTEGER",
            pa.float64(): "DOUBLE"}[t]  # fmt: skip


def members_fingerprinted(con: duckdb.DuckDBPyConnection, paths: Iterable[Path]) -> bool:
    """Whether every member row of these files has a whole fingerprint (only a ledger converted from the
    row-per-member one has members without). A file whose statistics show no NULL fingerprint at all is
    not read; another is read for its members' fingerprints."""
    for path in paths:
        md = pq.ParquetFile(path).metadata
        names = md.schema.to_arrow_schema().names
        if "fp" not in names or "fq" not in names:
            return False
        cols = [names.index("fp"), names.index("fq")]
        stats = [md.row_group(i).column(c).statistics for i in range(md.num_row_groups) for c in cols]
        if all(s is not None and s.has_null_count and s.null_count == 0 for s in stats):
            continue
        lacking = con.execute(f"""SELECT count(*) FROM read_parquet({sql_path(path)})
            WHERE kind = {MEMBER} AND (fp IS NULL OR fq IS NULL)""").fetchall()[0][0]
        if lacking:
            return False
    return True


def replaces_by_position(delta: Path) -> bool:
    """Whether a delta lists the base rows it replaces by position (`kind` 3; its statistics tell)."""
    md = pq.ParquetFile(delta).metadata
    col = md.schema.to_arrow_schema().get_field_index("kind")
    for i in range(md.num_row_groups):
        stats = md.row_group(i).column(col).statistics
        if stats is not None and stats.has_min_max and int(stats.max) >= REPLACED:
            return True
    return False


def sql_path(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"
