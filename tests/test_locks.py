"""Pair locks: a holder killed with SIGKILL on this machine frees its pairs at once; a live holder
(or one on another machine) keeps them until its lease ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from connector.ledger.journal import Journal
from connector.locks import Coordinator, holder_id, holder_is_dead

HOLD = """
import sys, time
from connector.ledger.journal import Journal
from connector.locks import Coordinator
c = Coordinator(Journal(sys.argv[1]), lease_seconds=600)
assert c.try_acquire("vip", "meta") is None
print(c.holder, flush=True)
time.sleep(600)
"""


def test_a_killed_holder_frees_its_pair_without_waiting_for_the_lease(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, url], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    holder = proc.stdout.readline().strip()
    ledger = Journal(url)
    coord = Coordinator(ledger, lease_seconds=600)
    try:
        assert coord.try_acquire("vip", "meta") == holder  # alive: its 600 s lease holds
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.time() + 10
        while not holder_is_dead(holder):  # a zombie until reaped, then gone: dead either way
            assert time.time() < deadline
            time.sleep(0.05)
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
