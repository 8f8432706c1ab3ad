from __future__ import annotations

import pytest

from connector.errors import FatalError, QuotaExhaustedError, RetriableError, ThrottledError
from connector.retry import RetryPolicy, RetryStats


def test_retries_only_retriable_and_counts() -> None:
    waits: list[float] = []
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise RetriableError("boom", code="UNAVAILABLE")
        return "ok"

    stats = RetryStats()
    assert RetryPolicy(max_attempts=5, sleep=waits.append).call(flaky, what="x", stats=stats) == "ok"
    assert stats.retries == 2 and stats.by_code == {"UNAVAILABLE": 2} and len(waits) == 2
    for exc in (FatalError("no"), QuotaExhaustedError("quota")):
        n = {"c": 0}
        quiet: list[float] = []
        after = RetryStats()

        def fail(e: Exception = exc, counter: dict[str, int] = n) -> None:
            counter["c"] += 1
            raise e

        with pytest.raises(type(exc)):
            RetryPolicy(max_attempts=5, sleep=quiet.append).call(fail, what="x", stats=after)
        # never retried, never waited for: a used-up quota stops the pair at once (no spin)
        assert n["c"] == 1 and quiet == [] and after.retries == 0 and after.by_code == {}


def test_throttle_waits_for_the_platform_but_never_beyond_the_cap() -> None:
    waits: list[float] = []
    seq = iter([ThrottledError("slow down", retry_after=30.0), ThrottledError("slow", retry_after=3600.0)])

    def throttled() -> str:
        e = next(seq, None)
        if e:
            raise e
        return "ok"

    stats = RetryStats()
    RetryPolicy(max_attempts=5, backoff_max_seconds=120, sleep=waits.append).call(throttled, what="x", stats=stats)
    assert waits == [30.0, 120.0] and stats.throttled == 2 and stats.throttle_wait_seconds == 150.0


def test_gives_up_after_max_attempts() -> None:
    with pytest.raises(RetriableError):
        RetryPolicy(max_attempts=3, sleep=lambda _s: None).call(lambda: (_ for _ in ()).throw(RetriableError("x")),
                                                                 what="x")  # fmt: skip
