"""`InMemoryDestination`: a real but volatile destination for tests and dry experiments.

It keeps audiences as sets of payloads, counts write calls, and can fail on purpose
(`failure_rate`, seeded) with the same error classes the platform clients raise, so the engine's
retry and commit logic is exercised without any platform.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from connector.destinations.base import (
    AudienceRef,
    AudienceStatus,
    BatchResult,
    BatchSession,
    Capabilities,
    LookalikeRef,
    Member,
    Platform,
    RequestOutcome,
)
from connector.errors import RetriableError
from connector.retry import RetryPolicy, RetryStats


def payload_row(m: Member) -> frozenset[tuple[str, str]]:
    return frozenset(m.payload.items())


@dataclass
class InMemoryAudience:
    audience_id: str
    name: str
    rows: set[frozenset[tuple[str, str]]] = field(default_factory=set)
    value_based: bool = False
    values: dict[frozenset[tuple[str, str]], float | None] = field(default_factory=dict)  # row -> value last sent


class InMemoryDestination:
    def __init__(
        self,
        name: str = "memory",
        platform: Platform = "meta",
        *,
        max_batch_size: int = 10_000,
        failure_rate: float = 0.0,
        seed: int = 0,
        retry: RetryPolicy | None = None,
        stats: RetryStats | None = None,
        reject_predicate: object = None,
    ) -> None:
        self.name = name
        self.platform: Platform = platform
        self.capabilities = Capabilities(max_batch_size=max_batch_size)
        self.audiences: dict[str, InMemoryAudience] = {}
        self.lookalikes: dict[str, LookalikeRef] = {}
        self.write_calls = 0
        self.failure_rate = failure_rate
        self._rng = random.Random(seed)
        self._retry = retry or RetryPolicy(max_attempts=20, backoff_base_seconds=0.0, sleep=lambda _s: None)
        self.stats = stats
        self.reject_predicate = reject_predicate  # callable(Member) -> reason | None
        self.closed = False

    def _maybe_fail(self) -> None:
        if self.failure_rate and self._rng.random() < self.failure_rate:
            raise RetriableError("injected transient failure", code="memory")

    def _write(self, what: str, fn: object) -> BatchResult:
        def call() -> BatchResult:
            self._maybe_fail()
            self.write_calls += 1
            return fn()  # type: ignore[operator,no-any-return]

        return self._retry.call(call, what=what, stats=self.stats)

    def members(self, audience_id: str) -> set[frozenset[tuple[str, str]]]:
        return set(self.audiences[audience_id].rows)

    def ensure_audience(self, segment: str, known: AudienceRef | None, schema: Sequence[str], *,
                        value_based: bool = False) -> AudienceRef:  # fmt: skip
        if known is not None and known.audience_id in self.audiences:
            self.audiences[known.audience_id].value_based = value_based
            return known
        for aud in self.audiences.values():
            if aud.name == segment:
                aud.value_based = value_based
                return AudienceRef(aud.audience_id, aud.name, {"schema": ",".join(schema)})
        aid = uuid.uuid4().hex[:12]
        self.audiences[aid] = InMemoryAudience(aid, segment, value_based=value_based)
        return AudienceRef(aid, segment, {"schema": ",".join(schema)})

    def values(self, audience_id: str) -> dict[frozenset[tuple[str, str]], float | None]:
        """Each member's value as last sent (value-based audiences)."""
        return dict(self.audiences[audience_id].values)

    def _check(self, members: Sequence[Member]) -> dict[str, str]:
        if len(members) > self.capabilities.max_batch_size:
            raise ValueError(f"batch of {len(members)} exceeds {self.capabilities.max_batch_size}")
        rejected: dict[str, str] = {}
        if callable(self.reject_predicate):
            for m in members:
                why = self.reject_predicate(m)
                if why:
                    rejected[m.key] = str(why)
        return rejected

    def add_members(self, audience: AudienceRef, members: Sequence[Member], session: BatchSession) -> BatchResult:
        def do() -> BatchResult:
            rejected = self._check(members)
            aud = self.audiences[audience.audience_id]
            for m in members:
                if m.key not in rejected:
                    aud.rows.add(payload_row(m))
                    if aud.value_based:
                        aud.values[payload_row(m)] = m.value
            return BatchResult(request_id=f"s{session.session_id}", rejected=rejected, received=len(members))

        return self._write("add", do)

    def remove_members(self, audience: AudienceRef, members: Sequence[Member], session: BatchSession) -> BatchResult:
        def do() -> BatchResult:
            self._check(members)
            aud = self.audiences[audience.audience_id]
            for m in members:
                aud.rows.discard(payload_row(m))
                aud.values.pop(payload_row(m), None)
            return BatchResult(request_id=f"s{session.session_id}", received=len(members))

        return self._write("remove", do)

    def replace_members(self, audience: AudienceRef, batches: Iterator[Sequence[Member]], total: int) -> BatchResult:
        new_rows: dict[frozenset[tuple[str, str]], float | None] = {}
        rejected: dict[str, str] = {}
        for batch in batches:
            out = self._write("replace", lambda b=batch: BatchResult(rejected=self._check(b)))
            rejected.update(out.rejected)
            new_rows.update((payload_row(m), m.value) for m in batch if m.key not in out.rejected)
        aud = self.audiences[audience.audience_id]
        aud.rows = set(new_rows)
        aud.values = new_rows if aud.value_based else {}
        return BatchResult(request_id="replace", rejected=rejected)

    def finish(self, audience: AudienceRef) -> None:
        return None

    def reconcile(self, audience: AudienceRef, request_ids: Sequence[str]) -> Mapping[str, RequestOutcome]:
        return {rid: RequestOutcome("succeeded") for rid in request_ids}

    def audience_status(self, audience: AudienceRef) -> AudienceStatus:
        n = len(self.audiences[audience.audience_id].rows)
        return AudienceStatus(audience.audience_id, size_lower=n, size_upper=n, state="ready")

    def ensure_lookalike(
        self, audience: AudienceRef, spec: Mapping[str, object], known: LookalikeRef | None, seed_size: int
    ) -> LookalikeRef | None:
        if known is not None:
            return known
        min_seed = spec.get("min_seed_size", 100)
        if seed_size < int(min_seed):  # type: ignore[call-overload]
            return None
        ref = self.lookalikes.get(audience.audience_id)
        if ref is None:
            ref = LookalikeRef(f"lal-{audience.audience_id}", "created", {"spec": repr(sorted(spec.items()))})
            self.lookalikes[audience.audience_id] = ref
        return ref

    def close(self) -> None:
        self.closed = True
