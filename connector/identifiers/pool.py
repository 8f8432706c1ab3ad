"""Normalization in worker processes: a large sync normalizes and hashes on every core.

`NormalizePool.submit` hands one batch, for one or more platforms, to idle workers (split between
them when it is large enough) and returns a callable that waits for the results, so the engine reads
and classifies the next batch meanwhile; a part with no idle worker is normalized in place (the main
process is a core too). Small batches (a webhook's few changed members) are always normalized in
place: a worker costs ~0.5 s to start.

Workers are plain subprocesses (`python -m connector.identifiers.worker`) speaking length-prefixed
pickles over their stdin/stdout, not `multiprocessing` children: those re-run the caller's main
script (a user's unguarded script would sync twice) or fork the server's HTTP and gRPC threads.
A worker that dies (killed, out of memory) costs no rows: its batch is normalized in place and the
rest of the engine's life does without workers.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import IO

from connector.identifiers.normalize import NormalizedBatch, normalize_for

log = logging.getLogger("connector.identifiers")

# below this many rows a batch is normalized in place
MIN_POOL_ROWS = 5_000

Columns = Sequence[tuple[str, Sequence[str | None]]]
Specs = Sequence[tuple[str, str]]  # (platform, region) of each result wanted
Task = tuple[Specs, Columns]
_HEADER = 8  # bytes of the little-endian length before each pickle
# a worker that died, or was stopped (its pipe closed: ValueError) while its answer was awaited
_LOST = (EOFError, OSError, ValueError, pickle.UnpicklingError)


def default_workers() -> int:
    """One worker per core; none on a single core (the main process would compete with it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if cores > 1 else 0


def write_message(out: IO[bytes], obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(len(data).to_bytes(_HEADER, "little"))
    out.write(data)
    out.flush()


def read_message(inp: IO[bytes]) -> object:
    """The next message, or EOFError when the other side is gone."""
    head = inp.read(_HEADER)
    if len(head) < _HEADER:
        raise EOFError("worker pipe closed")
    size = int.from_bytes(head, "little")
    data = inp.read(size)
    if len(data) < size:
        raise EOFError("worker pipe closed mid-message")
    return pickle.loads(data)  # noqa: S301 - our own child process, over a private pipe


class _Worker:
    def __init__(self) -> None:
        # stderr is dropped: nothing a worker could print may carry a member's raw values into logs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connector.identifiers.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.busy = False

    def send(self, task: Task) -> None:
        assert self.proc.stdin is not None
        write_message(self.proc.stdin, task)
        self.busy = True

    def receive(self) -> list[NormalizedBatch]:
        assert self.proc.stdout is not None
        try:
            result = read_message(self.proc.stdout)
        finally:
            self.busy = False
        return result  # type: ignore[return-value]

    def stop(self) -> None:
        try:
            if self.busy:  # its answer is not wanted any more (and would fill the pipe)
                self.proc.kill()
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class _Result:
    """Waits for a worker's answer once; a lost worker's batch is normalized in place."""

    def __init__(self, pool: NormalizePool, worker: _Worker, task: Task) -> None:
        self._pool, self._worker, self._task = pool, worker, task
        self._done: list[NormalizedBatch] | None = None

    def __call__(self) -> list[NormalizedBatch]:
        if self._done is None:
            try:
                self._done = self._worker.receive()
            except _LOST as exc:
                self._pool._give_up(exc)
                self._done = normalize_for(*self._task)
            self._task = ((), ())
        return self._done


class _Joined:
    """The results of a batch's parts (normalized apart), as one batch's results."""

    def __init__(self, parts: list[Callable[[], list[NormalizedBatch]]]) -> None:
        self._parts = parts
        self._done: list[NormalizedBatch] | None = None

    def __call__(self) -> list[NormalizedBatch]:
        if self._done is None:
            results = [part() for part in self._parts]
            self._done = []
            for per_spec in zip(*results, strict=True):
                payloads: list[str | None] = []
                reasons: dict[str, int] = {}
                for part_payloads, part_reasons in per_spec:
                    payloads.extend(part_payloads)
                    for reason, n in part_reasons.items():
                        reasons[reason] = reasons.get(reason, 0) + n
                self._done.append((payloads, reasons))
            self._parts = []
        return self._done


class NormalizePool:
    def __init__(self, workers: int, min_rows: int = MIN_POOL_ROWS) -> None:
        self.workers = workers
        self.min_rows = min_rows
        self._all: list[_Worker] = []
        self._broken = False
        self.batches_in_workers = 0  # how many batches went to a worker (for tests and logs)

    def submit(self, specs: Specs, columns: Columns) -> Callable[[], list[NormalizedBatch]]:
        """Normalize these rows for each (platform, region) of `specs` (`normalize_for`): a large
        batch is split between the workers, a part each."""
        rows = len(columns[0][1]) if columns else 0
        parts = max(1, min(self.workers, rows // self.min_rows))
        if parts == 1:
            return self._submit_part((specs, columns))
        cuts = [rows * i // parts for i in range(parts + 1)]
        return _Joined([
            self._submit_part((specs, [(f, col[lo:hi]) for f, col in columns]))
            for lo, hi in itertools.pairwise(cuts)
        ])  # fmt: skip

    def _submit_part(self, task: Task) -> Callable[[], list[NormalizedBatch]]:
        columns = task[1]
        rows = len(columns[0][1]) if columns else 0
        worker = self._idle() if rows >= self.min_rows else None
        if worker is not None:
            try:
                worker.send(task)
            except OSError as exc:  # the worker died while idle
                worker.busy = False
                self._give_up(exc)
            else:
                self.batches_in_workers += 1
                return _Result(self, worker, task)
        done = normalize_for(*task)
        return lambda: done

    def _idle(self) -> _Worker | None:
        if self._broken or self.workers <= 0:
            return None
        for w in self._all:
            if not w.busy:
                return w
        if len(self._all) < self.workers:
            try:
                self._all.append(_Worker())
            except OSError as exc:
                self._give_up(exc)
                return None
            return self._all[-1]
        return None

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._all]

    def drain(self) -> None:
        """Read and drop results nobody waits for any more (a read that failed midway)."""
        for w in self._all:
            if w.busy:
                try:
                    w.receive()
                except _LOST as exc:
                    self._give_up(exc)

    def _give_up(self, exc: BaseException) -> None:
        if not self._broken:
            log.warning("a normalization worker failed (%s); continuing in this process", type(exc).__name__)
        self._broken = True
        self.close()

    def close(self) -> None:
        for w in self._all:
            w.stop()
        self._all.clear()
