"""Time as a dependency: leases, cutoffs and the emulators read it from a `Clock`, so tests move time
forward (`FakeClock.advance`) instead of sleeping and waiting for it to pass."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (wall clock)."""
        ...

    def now(self) -> datetime:
        """The wall clock as an aware UTC datetime."""
        ...

    def monotonic(self) -> float:
        """Seconds for measuring intervals."""
        ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """A clock that moves only when told: `advance()`, or `sleep()` (which returns at once). Thread-safe."""

    def __init__(self, start: datetime | float | None = None) -> None:
        if start is None:
            start = datetime(2026, 1, 1, tzinfo=UTC)
        self._t = start.timestamp() if isinstance(start, datetime) else float(start)
        self._mono = 1000.0
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self._t

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), UTC)

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float = 0.0, *, days: float = 0.0) -> None:
        step = seconds + days * 86400
        if step < 0:
            raise ValueError("a clock only moves forward")
        with self._lock:
            self._t += step
            self._mono += step

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    def __repr__(self) -> str:
        return f"FakeClock({self.now().isoformat()})"


__all__ = ["SYSTEM_CLOCK", "Clock", "FakeClock", "SystemClock"]
