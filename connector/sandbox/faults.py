"""Fault knobs shared by every emulator: error rates, throttling, latency, dropped connections.

Knobs are plain attributes so a test can change them between calls. Decisions come from a seeded
`random.Random`, so a failing chaos run can be replayed.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from dataclasses import dataclass, field


@dataclass
class FaultKnobs:
    """What an emulator should do wrong, per write call unless said otherwise.

    `error_rates`: platform error code -> probability (e.g. {"2": 0.2} for Meta transient code 2,
    {"UNAVAILABLE": 0.2} or {"CONCURRENT_MODIFICATION": 0.1} for Google).
    `throttle_rate`: probability of a throttling answer (platform-specific shape and headers).
    `throttle_retry_after`: seconds the platform says to wait when throttling.
    `latency_seconds`: added to every request.
    `drop_rate`: probability that the connection is closed without an answer, after (with
    `drop_after_apply`) or before the change is applied: both happen in real life.
    `fail_writes_only`: faults only on write calls (reads stay clean) when True.
    `reject_rate`: share of hashed values the platform refuses as invalid (Meta `invalid_entry_samples`).
    The choice depends on the value and the seed only, so the platform refuses the same value every time.
    `failed_request_rate`: share of accepted write requests whose processing ends FAILED, nothing applied
    (Data Manager request status FAILED; a Google Ads offline user data job that ends FAILED).
    `audience_deletion_rate`: share of audiences deleted on the platform between runs (deleted in Ads
    Manager / Google Ads): rolled for each audience when an emulator starts from its state file (a
    sandbox starts one per run) and whenever `between_runs()` is called on an emulator.
    Membership expiry needs no knob: Google lists drop members older than their membership life span,
    as the platform does, by the emulator's clock (advance a `FakeClock` to see it).
    """

    error_rates: dict[str, float] = field(default_factory=dict)
    throttle_rate: float = 0.0
    throttle_retry_after: float = 0.0
    latency_seconds: float = 0.0
    drop_rate: float = 0.0
    drop_after_apply: bool = False
    fail_writes_only: bool = True
    reject_rate: float = 0.0
    failed_request_rate: float = 0.0
    audience_deletion_rate: float = 0.0
    seed: int = 0
    injected: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def reseed(self, seed: int) -> None:
        with self._lock:
            self.seed = seed
            self._rng = random.Random(seed)

    def _roll(self, p: float) -> bool:
        if p <= 0:
            return False
        with self._lock:
            return self._rng.random() < p

    def _count(self, what: str) -> None:
        with self._lock:
            self.injected[what] = self.injected.get(what, 0) + 1

    def delay(self) -> None:
        if self.latency_seconds > 0:
            time.sleep(self.latency_seconds)

    def pick_error(self, write: bool) -> str | None:
        """The error code to answer with for this call, or None."""
        if self.fail_writes_only and not write:
            return None
        for code, p in self.error_rates.items():
            if self._roll(p):
                self._count(f"error:{code}")
                return code
        return None

    def throttle(self, write: bool) -> bool:
        if self.fail_writes_only and not write:
            return False
        if self._roll(self.throttle_rate):
            self._count("throttle")
            return True
        return False

    def drop(self, write: bool) -> bool:
        if self.fail_writes_only and not write:
            return False
        if self._roll(self.drop_rate):
            self._count("drop")
            return True
        return False

    def rejects(self, value: str, *, count: bool = True) -> bool:
        """Whether the platform refuses this (hashed) value; stable across calls and restarts."""
        if self.reject_rate <= 0 or not value:
            return False
        digest = hashlib.sha256(f"{self.seed}:{value}".encode()).digest()
        if int.from_bytes(digest[:4], "big") / 2**32 < self.reject_rate:
            if count:
                self._count("reject")
            return True
        return False

    def fails_request(self) -> bool:
        """Whether this accepted request ends FAILED."""
        if self._roll(self.failed_request_rate):
            self._count("failed_request")
            return True
        return False

    def deletes_audience(self) -> bool:
        """Whether this audience was deleted on the platform since the last run."""
        if self._roll(self.audience_deletion_rate):
            self._count("audience_deleted")
            return True
        return False

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())
