"""What every emulator shares: start/stop as a context manager, a clock, and its audiences kept in a
state file (hashes only) that survives the process.

Members are held per audience in a dict keyed by the member's identifiers packed into `bytes`
(`connector.sandbox.members`) with numbers as values, which the garbage collector never walks: a
10,000-row call is 10,000 dict operations whatever the audience's size. HTTP emulators handle each
request with the cyclic collector paused (`collector_paused`): a request's parsed body is freed by
reference counting before the pause ends.

Persistence is a snapshot plus an append-only journal. The snapshot is an Arrow IPC file: one row per
member in the emulator's columns (`MEMBERS`: its key and values), audience by audience, and the rest of
the state (audiences, ids, request statuses, how many members each audience has) as JSON in the file's
schema metadata; each column goes to and from the member dicts in one Arrow conversion. The journal is a
sequence of frames, one for each change a call made: a length, a CRC-32, a JSON header (the operation)
and, for members added or removed, an Arrow IPC stream of their columns. A 10,000-row call appends the
frames of its own rows, whether the audience holds 10 or 10 million members. The journal is folded into
a new snapshot on `stop()` (if anything changed), and during a run only when it grows far larger than
the snapshot (a long-lived emulator); a process killed mid-run leaves the journal, which loading
replays. Both carry a generation number: a journal older than the snapshot (the process died between
writing one and deleting the other) is deleted, never replayed. A torn last frame (the process was
killed mid-write: short, or its CRC does not match) is cut off, like a call the platform never
received. A state file that is not an Arrow file (an older emulator's JSON) is set aside, with its
journal, and the emulator starts empty.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import pyarrow as pa

from connector.clock import SYSTEM_CLOCK, Clock
from connector.sandbox.faults import FaultKnobs

log = logging.getLogger("connector.sandbox")

# fold the journal into the snapshot during a run only past this size and this multiple of the snapshot
COMPACT_MIN_BYTES = 64 * 1024 * 1024
COMPACT_RATIO = 4
_FRAME = struct.Struct("<II")  # body length, CRC-32 of the body
_HEADER = struct.Struct("<I")  # the body starts with its JSON header's length
_STATE_KEY = b"connector.sandbox"  # the snapshot's schema metadata key holding the JSON state


def _ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def frame(entry: dict[str, Any], rows: pa.Table | None = None) -> bytes:
    """One journal frame: a change (`entry`) and the members it names (`rows`), if any."""
    header = json.dumps(entry, separators=(",", ":")).encode()
    body = _HEADER.pack(len(header)) + header + (_ipc(rows).to_pybytes() if rows is not None else b"")
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def read_journal(data: bytes) -> tuple[list[tuple[dict[str, Any], pa.Table | None]], int]:
    """The complete frames of a journal and the length they span; a torn or corrupt frame ends it."""
    out: list[tuple[dict[str, Any], pa.Table | None]] = []
    view = memoryview(data)
    pos, end = 0, len(data)
    while pos + _FRAME.size <= end:
        size, crc = _FRAME.unpack_from(view, pos)
        body = view[pos + _FRAME.size : pos + _FRAME.size + size]
        if len(body) < size or zlib.crc32(body) != crc or size < _HEADER.size:
            break
        (header_size,) = _HEADER.unpack_from(body)
        try:
            entry = json.loads(bytes(body[_HEADER.size : _HEADER.size + header_size]))
        except ValueError:
            break
        rest = body[_HEADER.size + header_size :]
        rows = pa.ipc.open_stream(pa.py_buffer(rest)).read_all() if len(rest) else None
        out.append((entry, rows))
        pos += _FRAME.size + size
    return out, pos


_gc_lock = threading.Lock()
_gc_pauses = 0  # requests being handled with the cyclic collector paused
_gc_was_enabled = False


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a request is handled (threads share the pause; the collector is
    enabled again, if it was, when the last one ends). A 10,000-member body parses into some 30,000 lists and
    dicts; alive while the call runs, they would survive into the oldest generation and set off a full
    collection of the whole process (every module google-ads and pyarrow load: 0.2 s a time) every other
    call. They hold no cycles: reference counting frees them when the handler returns, inside the pause."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


class Emulator:
    state_file: Path | None = None
    clock: Clock = SYSTEM_CLOCK
    faults: FaultKnobs
    _lock: threading.RLock
    # request logs keep the start of each body: enough to scan for leaks, bounded on million-member runs
    log_body_bytes: int = 64 * 1024
    # the columns of the snapshot's member table and of the journal's rows (the first is the member key)
    MEMBERS: pa.Schema

    def _audiences(self) -> dict[str, Any]:
        """The emulator's audiences (or user lists) by id."""
        raise NotImplementedError

    def delete_audience(self, audience_id: str) -> None:
        """The advertiser deleted the audience on the platform (or the platform removed it for inactivity)."""
        with self._lock:
            if self._audiences().pop(audience_id, None) is not None:
                self._record({"op": "drop", "id": audience_id})
                self._flush()

    def between_runs(self) -> None:
        """Roll `faults.audience_deletion_rate` for each audience, as if time passed between two runs."""
        with self._lock:
            for aid in list(self._audiences()):
                if self.faults.deletes_audience():
                    self.delete_audience(aid)

    def _log_body(self, body: bytes) -> str:
        return body[: self.log_body_bytes].decode("utf-8", "replace")

    def _start_server(self) -> str:
        raise NotImplementedError

    def _stop_server(self) -> None:
        raise NotImplementedError

    def _state(self) -> tuple[dict[str, Any], dict[str, pa.Table]]:
        """The state to persist as a snapshot: JSON-able, and each audience's members as a `MEMBERS` table."""
        raise NotImplementedError

    def _restore(self, state: dict[str, Any], members: dict[str, pa.Table]) -> None:
        """Load a snapshot written from `_state`."""
        raise NotImplementedError

    def _replay(self, entry: dict[str, Any], rows: pa.Table | None) -> None:
        """Apply one journal entry written by `_record` (idempotent: the entry sets, never adds)."""
        raise NotImplementedError

    def start(self) -> str:
        """Serve on loopback; returns the address clients use."""
        return self._start_server()

    def stop(self) -> None:
        self._stop_server()
        self._flush()
        # a stopped emulator leaves one complete snapshot (tools and tests read it as the platform's state)
        self._compact()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ persistence

    @property
    def _journal_file(self) -> Path | None:
        return self.state_file.with_name(self.state_file.name + ".journal") if self.state_file else None

    def _load_state(self) -> None:
        """Snapshot, then the journal of the same generation."""
        self._pending: list[bytes] = []
        self._generation = 0
        self._snapshot_bytes = 0
        self._journal_bytes = 0
        if not self.state_file:
            return
        journal = self._journal_file
        assert journal is not None
        if self.state_file.is_file():
            try:
                with pa.memory_map(str(self.state_file)) as source:
                    table = pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                self._set_aside()
                return
            meta = json.loads((table.schema.metadata or {})[_STATE_KEY])
            self._generation = int(meta["generation"])
            self._snapshot_bytes = self.state_file.stat().st_size
            members, start = {}, 0
            for aid, n in meta["members"]:
                members[aid] = table.slice(start, n)
                start += n
            self._restore(meta["state"], members)
        if not journal.is_file():
            return
        data = journal.read_bytes()
        frames, valid = read_journal(data)
        if valid < len(data):
            # a torn write of the last call (never acknowledged, so never applied): cut it off, so the next
            # frames are not appended behind it
            with journal.open("r+b") as f:
                f.truncate(valid)
        if not frames or frames[0][0].get("generation") != self._generation:
            # a journal already folded into the snapshot (the process died between the two writes)
            journal.unlink()
            return
        for entry, rows in frames[1:]:
            self._replay(entry, rows)
        self._journal_bytes = valid

    def _set_aside(self) -> None:
        """A state file this emulator cannot read (an older emulator's JSON): kept beside, not replayed."""
        assert self.state_file is not None and self._journal_file is not None
        for path in (self.state_file, self._journal_file):
            if path.is_file():
                os.replace(path, path.with_name(path.name + ".old"))
        log.warning("sandbox state %s was written by an older emulator: set aside as %s.old; the emulator starts "
                    "empty", self.state_file, self.state_file.name)  # fmt: skip

    def _record(self, entry: dict[str, Any], rows: pa.Table | None = None) -> None:
        """Note a change (and the `MEMBERS` rows it names); written to the journal by `_flush` once the call is done."""
        if self.state_file:
            self._pending.append(frame(entry, rows))

    def _flush(self) -> None:
        if not self.state_file or not self._pending:
            return
        journal = self._journal_file
        assert journal is not None
        journal.parent.mkdir(parents=True, exist_ok=True)
        frames = self._pending
        self._pending = []
        if not journal.is_file() or journal.stat().st_size == 0:
            frames.insert(0, frame({"generation": self._generation}))
        data = b"".join(frames)
        with journal.open("ab") as f:
            f.write(data)
        self._journal_bytes += len(data)
        if self._journal_bytes > max(COMPACT_RATIO * self._snapshot_bytes, COMPACT_MIN_BYTES):
            self._compact()

    def _compact(self) -> None:
        """Write a snapshot of the current state and start an empty journal of the next generation."""
        if not self.state_file:
            return
        journal = self._journal_file
        assert journal is not None
        if self.state_file.is_file() and self._journal_bytes == 0 and not (journal.is_file() and journal.stat().st_size):
            return  # nothing changed since the snapshot
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self._generation += 1
        state, members = self._state()
        tables = [t.select(self.MEMBERS.names).cast(self.MEMBERS) for t in members.values()]
        table = pa.concat_tables(tables) if tables else self.MEMBERS.empty_table()
        meta = {"generation": self._generation, "members": [[aid, t.num_rows] for aid, t in members.items()],
                "state": state}  # fmt: skip
        table = table.replace_schema_metadata({_STATE_KEY: json.dumps(meta, separators=(",", ":")).encode()})
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, self.state_file)
        journal.unlink(missing_ok=True)
        self._snapshot_bytes = self.state_file.stat().st_size
        self._journal_bytes = 0


class HttpEmulator(Emulator):
    """An emulator served by the shared loopback HTTP server; subclasses implement `handle`."""

    def _serve(self, port: int) -> None:
        from connector.sandbox.server import LoopbackHttpServer

        self._server = LoopbackHttpServer(self._handle_paused, port=port)

    def _handle_paused(self, req: Any) -> Any:
        with collector_paused():
            return self.handle(req)

    def handle(self, req: Any) -> Any:
        raise NotImplementedError

    def _start_server(self) -> str:
        self._server.start()
        return self.url

    @property
    def url(self) -> str:
        return self._server.url

    def _stop_server(self) -> None:
        self._server.stop()
