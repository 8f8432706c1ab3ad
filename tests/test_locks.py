"""Pair locks: a holder killed with SIGKILL on this machine frees its pairs at once; a live holder
(or one on another machine) keeps them until its lease ends. Leases, the queue's settle time and the
webhook replay window are measured on an injected clock: the tests move it, they never sleep."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from connector.clock import FakeClock
from connector.errors import LockHeldError
from connector.ledger.journal import Journal
from connector.locks import Coordinator, holder_id, holder_is_dead

HOLD = """
import sys, time
from connector.ledger.journal import Journal
from connector.locks import Coordinator
c = Coordinator(Journal(sys.argv[1]), lease_seconds=600)
assert c.try_acquire("vip", "meta") is None
print(c.holder, flush=True)
sys.stdin.read()  # hold the lock until killed
"""


def test_a_killed_holder_frees_its_pair_without_waiting_for_the_lease(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    holder = proc.stdout.readline().strip()
    ledger = Journal(url)
    coord = Coordinator(ledger, lease_seconds=600)
    try:
        assert coord.try_acquire("vip", "meta") == holder  # alive: its 600 s lease holds
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()  # reaped: the pid no longer exists (a zombie, before that, counts as dead too)
        assert holder_is_dead(holder)
        assert coord.try_acquire("vip", "meta") is None
        assert coord.holders()[("vip", "meta")][0] == coord.holder
    finally:
        proc.kill()
        proc.wait()
        ledger.close()


def test_holders_elsewhere_or_alive_are_never_declared_dead() -> None:
    me = holder_id().split(":")
    gone = 2**22 + 12345  # above the default pid_max: no such process
    assert holder_is_dead(":".join([me[0], str(gone), "abcd", me[3]]))
    assert not holder_is_dead(":".join([me[0], str(os.getpid()), "abcd", me[3]]))  # ourselves
    assert not holder_is_dead(":".join([me[0], "1", "abcd", me[3]]))  # pid 1 is alive
    assert not holder_is_dead(":".join(["another-host", str(gone), "abcd", me[3]]))
    # same host name, another pid namespace (a container with the host's name, another machine): its pids
    # mean nothing here
    assert not holder_is_dead(":".join([me[0], str(gone), "abcd", "0123456789ab.4026531999"]))
    assert not holder_is_dead(f"{socket.gethostname()}:{gone}:abcd")  # an older holder format: lease decides
    assert not holder_is_dead("dead")  # no pid: only its lease can free it


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Journal]:
    led = Journal(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield led
    led.close()


def test_a_lease_holds_until_it_expires_on_the_clock(ledger: Journal) -> None:
    clock = FakeClock()
    first = Coordinator(ledger, lease_seconds=60, holder="first", clock=clock)
    second = Coordinator(ledger, lease_seconds=60, holder="second", clock=clock)
    assert first.try_acquire("vip", "meta") is None
    clock.advance(59)
    assert second.try_acquire("vip", "meta") == "first"
    clock.advance(2)  # the lease ran out: its holder is presumed gone
    assert second.try_acquire("vip", "meta") is None
    holder, expires = second.holders()[("vip", "meta")]
    assert holder == "second" and expires.replace(tzinfo=None) == (clock.now() + timedelta(seconds=60)).replace(tzinfo=None)


def test_renewing_a_lease_keeps_the_pair(ledger: Journal) -> None:
    clock = FakeClock()
    first = Coordinator(ledger, lease_seconds=60, holder="first", clock=clock)
    second = Coordinator(ledger, lease_seconds=60, holder="second", clock=clock)
    assert first.try_acquire("vip", "meta") is None
    clock.advance(50)
    first.renew([("vip", "meta")])
    clock.advance(50)  # 100 s after taking it, 50 s after the renewal
    assert second.try_acquire("vip", "meta") == "first"
    clock.advance(11)
    assert second.try_acquire("vip", "meta") is None


def test_waiting_for_a_busy_pair_uses_the_clock_and_gives_up_after_the_timeout(ledger: Journal) -> None:
    clock = FakeClock()
    Coordinator(ledger, lease_seconds=120, holder="busy", clock=clock).try_acquire("vip", "meta")
    waits: list[tuple[str, str, str]] = []
    lock = Coordinator(ledger, lease_seconds=60, holder="waiter", clock=clock).pair_lock(
        wait=True, timeout=30, on_wait=lambda *a: waits.append(a))  # fmt: skip
    started = clock.monotonic()
    with pytest.raises(LockHeldError, match="being synced by busy"), lock("vip", "meta"):
        pass
    assert 30 < clock.monotonic() - started <= 31 and waits == [("vip", "meta", "busy")]
    # without a timeout the waiter gets the pair once the holder's lease runs out
    with Coordinator(ledger, lease_seconds=60, holder="patient", clock=clock).pair_lock(wait=True)("vip", "meta"):
        assert Coordinator(ledger, clock=clock).holders()[("vip", "meta")][0] == "patient"
    assert clock.monotonic() - started >= 120


def test_a_queued_sync_waits_its_settle_time_on_the_clock(ledger: Journal) -> None:
    clock = FakeClock()
    coord = Coordinator(ledger, clock=clock)
    coord.enqueue("vip", ["meta"], "webhook")
    assert coord.pop(settle_seconds=5) is None
    clock.advance(5)
    popped = coord.pop(settle_seconds=5)
    assert popped is not None and popped[:3] == ("vip", ["meta"], "webhook")


def test_webhook_replays_are_remembered_for_the_window_only(ledger: Journal) -> None:
    clock = FakeClock()
    coord = Coordinator(ledger, clock=clock)
    keep = timedelta(minutes=10)
    assert coord.seen_before("event-1", keep) is False
    clock.advance(599)
    assert coord.seen_before("event-1", keep) is True
    clock.advance(602)  # the first sighting is now older than the window
    assert coord.seen_before("event-1", keep) is False
