"""What every emulator shares: start/stop as a context manager, a clock, and its audiences kept in a
state file (hashes only) that survives the process.

Persistence is a snapshot plus an append-only journal: each call that changed something appends one
line describing the change (the rows added or removed, not the whole audience), so a 10,000-row call
costs the same whether the audience holds 10 or 10 million members. The journal is folded into a new
snapshot on `stop()` (if anything changed), and during a run only when it grows far larger than the
snapshot (a long-lived emulator); a process killed mid-run leaves the journal, which loading replays.
Both carry a generation number: a snapshot written after a crash never replays an older journal
twice. A torn last line (the process was killed mid-write) is ignored, like a call the platform
never received.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Self

from connector.clock import SYSTEM_CLOCK, Clock
from connector.sandbox.faults import FaultKnobs

# fold the journal into the snapshot during a run only past this size and this multiple of the snapshot
COMPACT_MIN_BYTES = 64 * 1024 * 1024
COMPACT_RATIO = 4


class Emulator:
    state_file: Path | None = None
    clock: Clock = SYSTEM_CLOCK
    faults: FaultKnobs
    _lock: threading.RLock
    # request logs keep the start of each body: enough to scan for leaks, bounded on million-member runs
    log_body_bytes: int = 64 * 1024

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

    def _state(self) -> dict[str, Any]:
        """The JSON-able state to persist as a snapshot."""
        raise NotImplementedError

    def _restore(self, state: dict[str, Any]) -> None:
        """Load a snapshot written by `_state`."""
        raise NotImplementedError

    def _replay(self, entry: dict[str, Any]) -> None:
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
        self._pending: list[dict[str, Any]] = []
        self._generation = 0
        self._snapshot_bytes = 0
        self._journal_bytes = 0
        if not self.state_file:
            return
        if self.state_file.is_file():
            raw = self.state_file.read_bytes()
            data: dict[str, Any] = json.loads(raw)
            self._generation = int(data.pop("generation", 0))
            self._snapshot_bytes = len(raw)
            self._restore(data)
        journal = self._journal_file
        if journal is None or not journal.is_file():
            return
        with journal.open("rb") as f:
            lines = f.read().split(b"\n")
        if not lines or not lines[0]:
            return
        try:
            header = json.loads(lines[0])
        except ValueError:
            return
        if header.get("generation") != self._generation:
            return  # a journal already folded into the snapshot (the process died between the two writes)
        valid = len(lines[0]) + 1
        for line in lines[1:]:
            if not line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                # torn write of the last call (never acknowledged, so never applied): cut it off, so the
                # next entries are not appended behind it
                with journal.open("r+b") as f:
                    f.truncate(valid)
                break
            self._replay(entry)
            valid += len(line) + 1
            self._journal_bytes += len(line)

    def _record(self, entry: dict[str, Any]) -> None:
        """Note a change; written to the journal by `_flush` once the call is done."""
        if self.state_file:
            self._pending.append(entry)

    def _flush(self) -> None:
        if not self.state_file or not self._pending:
            return
        journal = self._journal_file
        assert journal is not None
        journal.parent.mkdir(parents=True, exist_ok=True)
        lines = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in self._pending)
        self._pending = []
        new = not journal.is_file() or journal.stat().st_size == 0
        with journal.open("ab") as f:
            if new:
                f.write(json.dumps({"generation": self._generation}).encode() + b"\n")
            f.write(lines)
        self._journal_bytes += len(lines)
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
        raw = json.dumps({"generation": self._generation, **self._state()}, separators=(",", ":")).encode()
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, self.state_file)
        journal.unlink(missing_ok=True)
        self._snapshot_bytes = len(raw)
        self._journal_bytes = 0

    # kept for callers that persisted explicitly
    def _save(self) -> None:
        self._flush()


class HttpEmulator(Emulator):
    """An emulator served by the shared loopback HTTP server; subclasses implement `handle`."""

    def _serve(self, port: int) -> None:
        from connector.sandbox.server import LoopbackHttpServer

        self._server = LoopbackHttpServer(self.handle, port=port)

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
