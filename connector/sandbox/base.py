"""What every emulator shares: start/stop as a context manager, and its audiences kept in a JSON
state file (hashes only), loaded at construction and written atomically after each change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self


class Emulator:
    state_file: Path | None = None
    # request logs keep the start of each body: enough to scan for leaks, bounded on million-member runs
    log_body_bytes: int = 64 * 1024

    def _log_body(self, body: bytes) -> str:
        return body[: self.log_body_bytes].decode("utf-8", "replace")

    def _start_server(self) -> str:
        raise NotImplementedError

    def _stop_server(self) -> None:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        """The JSON-able state to persist."""
        raise NotImplementedError

    def start(self) -> str:
        """Serve on loopback; returns the address clients use."""
        return self._start_server()

    def stop(self) -> None:
        self._stop_server()
        self._save()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read_state(self) -> dict[str, Any] | None:
        if self.state_file and self.state_file.is_file():
            data: dict[str, Any] = json.loads(self.state_file.read_text(encoding="utf-8"))
            return data
        return None

    def _save(self) -> None:
        if not self.state_file:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state()), encoding="utf-8")
        tmp.replace(self.state_file)


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
