"""What a sync asks a platform about an audience besides sending members: the outcome of earlier
requests, the lookalike built from it, and its size and match rate (kept for `status`)."""

from __future__ import annotations

import logging

from connector.destinations.base import AudienceRef, Destination, LookalikeRef
from connector.errors import DestinationError
from connector.ledger.journal import ON_PLATFORM, Journal, now
from connector.settings import GoogleLookalikeSpec, MetaLookalikeSpec

log = logging.getLogger("connector.audiences")


def reconcile(journal: Journal, segment: str, destination: str, dest: Destination) -> None:
    """Poll the pair's requests the platform has not confirmed yet (Google) and record their outcome: a
    failed one's members are sent again by the next plan."""
    ids = journal.pending_requests(segment, destination)
    if not ids:
        return
    rec = journal.get_audience(segment, destination)
    if rec is None:
        return
    outcomes = dest.reconcile(AudienceRef(rec.audience_id, rec.name, dict(rec.extra)), ids)
    for rid, outcome in outcomes.items():
        if outcome.state == "succeeded":
            journal.resolve_request(segment, destination, rid, True, None, outcome.rejected)
        elif outcome.state == "failed":
            log.warning("%s/%s: request failed on the platform (%s); its members will be sent again",
                        segment, destination, outcome.reason)  # fmt: skip
            journal.resolve_request(segment, destination, rid, False, outcome.reason, outcome.rejected)


def ensure_lookalike(journal: Journal, segment: str, destination: str, dest: Destination, audience: AudienceRef,
                     spec: MetaLookalikeSpec | GoogleLookalikeSpec) -> tuple[str | None, str | None, str | None]:  # fmt: skip
    """Make sure of the audience's lookalike once its seed (members on the platform) is large enough.
    Returns (lookalike id, its state, a warning when the platform would not create it)."""
    rec = journal.get_audience(segment, destination)
    known = (
        LookalikeRef(rec.lookalike_id, rec.lookalike_state or "created", dict(rec.lookalike_details))
        if rec and rec.lookalike_id
        else None
    )
    counts = journal.counts(segment, destination)
    seed = sum(counts.get(s, 0) for s in ON_PLATFORM)
    try:
        ref = dest.ensure_lookalike(audience, spec.model_dump(exclude_none=True), known, seed)
    except DestinationError as exc:
        warning = f"lookalike not created: {exc}"
        log.warning("%s -> %s: %s", segment, destination, warning)
        return None, None, warning
    if ref is None:
        return None, f"waiting for seed (>= {spec.min_seed_size} matched members)", None
    if not ref.lookalike_id:
        return None, ref.state, None  # not available for this destination; the reason is in the state
    journal.update_audience(segment, destination, lookalike_id=ref.lookalike_id, lookalike_state=ref.state,
                            lookalike_details=ref.details)  # fmt: skip
    return ref.lookalike_id, ref.state, None


def record_status(journal: Journal, segment: str, destination: str, dest: Destination, audience: AudienceRef) -> None:
    """Read the audience's size and match rate from the platform and keep them for `status`."""
    try:
        st = dest.audience_status(audience)
    except DestinationError as exc:
        log.warning("%s -> %s: could not read audience status: %s", segment, destination, exc)
        return
    journal.update_audience(
        segment, destination,
        last_status={"size_lower": st.size_lower, "size_upper": st.size_upper, "match_rate": st.match_rate,
                     "state": st.state, **st.details},
        last_status_at=now(),
    )  # fmt: skip
