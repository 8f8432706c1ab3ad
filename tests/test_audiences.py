"""What a sync asks the platform about an audience: request outcomes, the lookalike, the audience's status."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from connector.audiences import ensure_lookalike, reconcile, record_status
from connector.destinations.base import AudienceRef, LookalikeRef, RequestOutcome
from connector.destinations.memory import InMemoryDestination
from connector.errors import DestinationError
from connector.ledger.journal import BatchAck, Journal, PairPointer
from connector.settings import MetaLookalikeSpec


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Journal, InMemoryDestination, AudienceRef]]:
    journal = Journal(f"sqlite:///{tmp_path / 'ledger.db'}")
    dest = InMemoryDestination("dest", "meta")
    aud = dest.ensure_audience("seg", None, ("EMAIL",))
    journal.save_audience("seg", "dest", "meta", aud.audience_id, aud.name, aud.extra)
    journal.move_pair("seg", "dest", PairPointer(), None, None, 1)
    yield journal, dest, aud
    journal.close()


def test_a_lookalike_waits_for_its_seed_then_is_made_once(setup: tuple[Journal, InMemoryDestination, AudienceRef]) -> None:
    journal, dest, aud = setup
    spec = MetaLookalikeSpec(country="US", min_seed_size=3)
    journal.set_counts("seg", "dest", {"confirmed": 2})
    assert ensure_lookalike(journal, "seg", "dest", dest, aud, spec) == (None, "waiting for seed (>= 3 matched members)", None)
    journal.set_counts("seg", "dest", {"confirmed": 2, "accepted": 1})
    made = ensure_lookalike(journal, "seg", "dest", dest, aud, spec)
    assert made == (f"lal-{aud.audience_id}", "created", None)
    rec = journal.get_audience("seg", "dest")
    assert rec is not None and rec.lookalike_id == made[0]
    dest.lookalikes.clear()  # the ledger's record is what is passed on: no second lookalike
    assert ensure_lookalike(journal, "seg", "dest", dest, aud, spec)[0] == made[0]
    assert not dest.lookalikes


class Refusing(InMemoryDestination):
    def ensure_lookalike(self, audience: AudienceRef, spec: Mapping[str, object], known: LookalikeRef | None,
                         seed_size: int) -> LookalikeRef | None:  # fmt: skip
        raise DestinationError("seed audience too small on the platform")


def test_a_lookalike_the_platform_refuses_is_a_warning(setup: tuple[Journal, InMemoryDestination, AudienceRef]) -> None:
    journal, _, aud = setup
    journal.set_counts("seg", "dest", {"confirmed": 10})
    got = ensure_lookalike(journal, "seg", "dest", Refusing("dest"), aud, MetaLookalikeSpec(country="US", min_seed_size=1))
    assert got == (None, None, "lookalike not created: seed audience too small on the platform")


class Polled(InMemoryDestination):
    def reconcile(self, audience: AudienceRef, request_ids: Sequence[str]) -> Mapping[str, RequestOutcome]:
        return {"r1": RequestOutcome("succeeded"), "r2": RequestOutcome("failed", reason="INTERNAL"),
                "r3": RequestOutcome("processing")}  # fmt: skip


def test_pending_requests_are_settled_by_what_the_platform_says(setup: tuple[Journal, InMemoryDestination, AudienceRef]) -> None:
    journal = setup[0]
    for seq, rid in enumerate(("r1", "r2", "r3")):
        journal.ack_batch("seg", "dest", BatchAck(1, seq, "add", 10, rid, "pending"))
    reconcile(journal, "seg", "dest", Polled("dest"))
    assert journal.pending_requests("seg", "dest") == ["r3"]  # still processing: asked again next time
    acks = {a["b"]: (a["ok"], a["pending"]) for a in journal.acks("seg", "dest").to_pylist()}
    assert acks[0] == (True, False) and acks[1][0] is not True and acks[2] == (True, True)


def test_the_audience_status_is_kept_for_status(setup: tuple[Journal, InMemoryDestination, AudienceRef]) -> None:
    journal, dest, aud = setup
    record_status(journal, "seg", "dest", dest, aud)
    rec = journal.get_audience("seg", "dest")
    assert rec is not None and rec.last_status["state"] == "ready" and rec.last_status_at is not None
