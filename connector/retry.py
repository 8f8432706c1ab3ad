"""Retry policies (tenacity), built from a destination's settings.

Only `RetriableError` is retried: a `FatalError`, `QuotaExhaustedError` or `SkippableError`
goes straight to the caller. `ThrottledError.retry_after` (the platform's own estimate, e.g.
Meta's ``estimated_time_to_regain_access``) is honoured as the minimum wait; otherwise the wait
is exponential with full jitter, capped by ``backoff_max_seconds``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from connector.errors import RetriableError, ThrottledError

T = TypeVar("T")
log = logging.getLogger("connector.retry")


@dataclass
class RetryStats:
    """Counters a run reports (and `/metrics` exposes): retries and time spent throttled."""

    retries: int = 0
    throttled: int = 0
    throttle_wait_seconds: float = 0.0
    by_code: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 60.0
    sleep: Callable[[float], None] | None = None  # tests inject a fake clock; None = time.sleep

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        exp = min(self.backoff_max_seconds, self.backoff_base_seconds * 2 ** (state.attempt_number - 1))
        jittered = random.uniform(0, exp)
        if isinstance(exc, ThrottledError) and exc.retry_after is not None:
            # The platform's estimate wins, but never beyond our cap: the pair is rescheduled
            # rather than holding a worker for an hour.
            return min(max(exc.retry_after, jittered), self.backoff_max_seconds)
        return jittered

    def call(self, fn: Callable[[], T], *, what: str, stats: RetryStats | None = None) -> T:
        """Run `fn`, retrying RetriableError. `what` names the call in logs (no payloads)."""

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            if stats is not None:
                stats.retries += 1
                code = str(getattr(exc, "code", None) or type(exc).__name__)
                stats.by_code[code] = stats.by_code.get(code, 0) + 1
                if isinstance(exc, ThrottledError):
                    stats.throttled += 1
                    stats.throttle_wait_seconds += wait
            log.warning(
                "%s failed (attempt %d/%d): %s; retrying in %.1fs",
                what, state.attempt_number, self.max_attempts, exc, wait,
            )

        kwargs: dict[str, object] = {}
        if self.sleep is not None:
            kwargs["sleep"] = self.sleep
        retrying = Retrying(
            retry=retry_if_exception_type(RetriableError),
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            before_sleep=before_sleep,
            reraise=True,
            **kwargs,  # type: ignore[arg-type]
        )
        return retrying(fn)


def policy_from(config: object, sleep: Callable[[float], None] | None = None) -> RetryPolicy:
    """Build a policy from any destination config (`max_attempts`, `backoff_max_seconds`)."""
    return RetryPolicy(
        max_attempts=int(getattr(config, "max_attempts", 6)),
        backoff_max_seconds=float(getattr(config, "backoff_max_seconds", 60.0)),
        sleep=sleep,
    )
