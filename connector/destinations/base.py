"""The contract between the engine and a platform destination.

The engine owns planning, the ledger and retries around whole batches; a destination owns one
platform's wire protocol. A destination method either returns (the platform acknowledged the
call) or raises an error of `connector.errors` (mapped from the SDK at the client boundary).

Members arrive already normalized and hashed for the destination's platform (see
`connector.identifiers`): a destination never normalizes or hashes again and never sees raw PII.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, Protocol, overload, runtime_checkable

import numpy as np
import pyarrow as pa

Platform = Literal["meta", "google"]

# Keys of `Member.payload` per platform. Values are final: hashed (64 lowercase hex) where the
# platform wants a hash, plain where it wants plain text (Meta MADID/EXTERN_ID, Google
# country_code/postal_code/mobile_id/user_id).
META_KEYS = (
    "EMAIL", "PHONE", "FN", "LN", "FI", "ZIP", "CT", "ST", "COUNTRY",
    "GEN", "DOBY", "DOBM", "DOBD", "MADID", "EXTERN_ID",
)  # fmt: skip
GOOGLE_KEYS = (
    "email", "phone", "first_name", "last_name", "country_code", "postal_code",
    "mobile_id", "user_id",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Consent:
    """Google EU consent for one member; None means "not stated" (the request default applies)."""

    ad_user_data: bool | None = None
    ad_personalization: bool | None = None


@dataclass(frozen=True, slots=True)
class Member:
    """One person, as sent to one platform. `key` is the ledger's member key (opaque hex)."""

    key: str
    payload: Mapping[str, str]
    consent: Consent | None = None
    value: float | None = None  # the member's value (a value-based audience), already checked for the platform


_CONSENT_VALUES = (None, True, False)


def decode_consent(code: int | None) -> Consent | None:
    """A ledger consent code (3 * ad_user_data + ad_personalization; 0 unspecified, 1 granted, 2 denied)."""
    if code is None:
        return None
    return Consent(ad_user_data=_CONSENT_VALUES[code // 3], ad_personalization=_CONSENT_VALUES[code % 3])


_HEX_PAIRS = np.array([f"{i:02x}" for i in range(256)], dtype="S2").view(np.uint16)


def hex_strings(arr: pa.Array) -> pa.Array:
    """Lowercase hex text of each value of a binary array (nulls stay null), built from its buffers at once."""
    n = len(arr)
    validity, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[arr.offset : arr.offset + n + 1]
    start, end = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(data_buf, dtype=np.uint8)[start:end] if data_buf is not None else np.zeros(0, np.uint8)
    text = _HEX_PAIRS[data].tobytes()
    new_offsets = ((offsets - start) * 2).astype(np.int32)
    if validity is not None and arr.null_count:
        validity = pa.array(arr.is_valid()).buffers()[1]
    else:
        validity = None
    return pa.Array.from_buffers(pa.string(), n, [validity, pa.py_buffer(new_offsets), pa.py_buffer(text)])


class MemberBatch(Sequence[Member]):
    """The members of one call, column by column as the ledger file holds them: `keys` (16-byte member
    keys), `columns` (payload key -> strings: lowercase hex digests or clear text; null = no value),
    Google's `consent` codes and each member's `values` (float64, null = sent without a value; None when
    the segment has no `value`). A destination that builds its request from columns never makes a
    `Member`; one that needs objects (an SDK's message per person) iterates and gets them built on
    demand. Digests arrive as bytes and become hex text only when a destination asks for `columns`."""

    def __init__(self, keys: pa.Array, payload: Mapping[str, pa.Array], consent: pa.Array | None = None,
                 values: pa.Array | None = None) -> None:  # fmt: skip
        self.keys = keys
        self.payload = dict(payload)
        self.consent = consent
        self.values = values

    def __len__(self) -> int:
        return len(self.keys)

    @cached_property
    def columns(self) -> dict[str, pa.Array]:
        return {k: hex_strings(v) if pa.types.is_binary(v.type) else v for k, v in self.payload.items()}

    @cached_property
    def key_hex(self) -> list[str]:
        return [k.hex() for k in self.keys.to_pylist()]

    @cached_property
    def _members(self) -> list[Member]:
        names = list(self.columns)
        values = [self.columns[n].to_pylist() for n in names]
        codes = self.consent.to_pylist() if self.consent is not None else [None] * len(self)
        worth = self.value_list()
        out = []
        for i, key in enumerate(self.key_hex):
            payload = {n: v[i] for n, v in zip(names, values, strict=True) if v[i] is not None}
            out.append(Member(key, payload, decode_consent(codes[i]), worth[i]))
        return out

    def value_list(self) -> list[float | None]:
        """Each member's value (None: sent without one)."""
        if self.values is None:
            return [None] * len(self)
        return [float(v) if v is not None else None for v in self.values.to_pylist()]

    @overload
    def __getitem__(self, i: int) -> Member: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Member]: ...
    def __getitem__(self, i: int | slice) -> Member | Sequence[Member]:
        return self._members[i]

    def __iter__(self) -> Iterator[Member]:
        return iter(self._members)


@dataclass(slots=True)
class AudienceRef:
    """A platform audience as the ledger remembers it. `extra` holds platform details that
    must stay stable across runs (Meta: the multi-key schema; Google: resource names)."""

    audience_id: str
    name: str
    extra: dict[str, str] = field(default_factory=dict)
    # why a destination replaced the audience the ledger named with a new one (said in the run's output;
    # not stored): e.g. an audience that cannot become value-based
    note: str | None = None


@dataclass(slots=True)
class BatchResult:
    """What the platform said about one add/remove/replace call.

    `request_id`: Google request id / job resource name, Meta session id; the engine stores it
    on each member so that `reconcile` can confirm or reject them later.
    `rejected`: member key -> reason, for members the platform refused in this call (Meta
    invalid_entry_samples mapped back, Google partial failures). They are not "on the platform".
    `deferred`: member key -> reason, members refused for now (e.g. Meta "audience size too
    low" on removal): kept pending and retried on a later run.
    `pending`: the platform accepted the call but confirms asynchronously (Google): members are
    `accepted` now and `confirmed` by `reconcile`.
    `received`: how many rows the platform said it received (Meta num_received), if it says.
    """

    request_id: str | None = None
    rejected: dict[str, str] = field(default_factory=dict)
    deferred: dict[str, str] = field(default_factory=dict)
    pending: bool = False
    received: int | None = None


@dataclass(slots=True)
class RequestOutcome:
    """Result of polling one earlier request (`reconcile`)."""

    state: Literal["pending", "succeeded", "failed"]
    reason: str | None = None
    rejected: dict[str, str] = field(default_factory=dict)  # member key -> reason, when known


@dataclass(slots=True)
class AudienceStatus:
    audience_id: str
    size_lower: int | None = None
    size_upper: int | None = None
    match_rate: float | None = None  # percent, 0..100
    state: str = "unknown"  # platform words: ready, populating, replace_running, ...
    details: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class LookalikeRef:
    lookalike_id: str
    state: str = "created"
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BatchSession:
    """Where a batch stands in its run's sequence of same-kind batches (Meta upload sessions;
    other platforms may ignore it). `seq` counts from 1; `last` marks the final batch."""

    session_id: int
    seq: int
    last: bool
    estimated_total: int


@dataclass(frozen=True, slots=True)
class ValueSupport:
    """How a destination takes a member's value (`value = "<column>"`): `none` (never sent), `optional`
    (a member whose value the platform cannot take is sent without one) or `required` (such a member is
    not sent). `max_value`: the largest value the platform accepts (None: any finite number)."""

    mode: Literal["none", "optional", "required"]
    max_value: float | None = None
    field: str = ""  # the platform's name for it, for messages


@dataclass(frozen=True, slots=True)
class Capabilities:
    max_batch_size: int = 10_000
    supports_replace: bool = True
    supports_lookalike: bool = True
    confirms_async: bool = False  # results come later via `reconcile` (Google)


@runtime_checkable
class Destination(Protocol):
    """One configured destination (an ad account on one platform)."""

    name: str
    platform: Platform
    capabilities: Capabilities

    def ensure_audience(
        self, segment: str, known: AudienceRef | None, schema: Sequence[str], *, value_based: bool = False
    ) -> AudienceRef:
        """Return the audience for `segment`, creating it if `known` is None or gone.

        `schema` lists the payload keys this segment can fill (stable across runs); Meta keeps
        it in `AudienceRef.extra` and sends every row in it (``""`` for missing values).
        `value_based`: members carry a value (Meta: a value-based custom audience; an audience that
        is not cannot become one, so a new one replaces it and says why in `AudienceRef.note`).
        """
        ...

    def add_members(self, audience: AudienceRef, members: Sequence[Member], session: BatchSession) -> BatchResult:
        """Add at most `capabilities.max_batch_size` members in one write call."""
        ...

    def remove_members(self, audience: AudienceRef, members: Sequence[Member], session: BatchSession) -> BatchResult:
        """Remove at most `capabilities.max_batch_size` members in one write call."""
        ...

    def finish(self, audience: AudienceRef) -> None:
        """Called once after the run's last add/remove batch for `audience` (not after replace).
        Destinations that stage work (Google Ads offline user data jobs) run it here; others do
        nothing. Members of staged batches were reported `pending` and are confirmed later by
        `reconcile`, so a crash before `finish` costs a re-send, never a false "on the platform"."""
        ...

    def replace_members(self, audience: AudienceRef, batches: Iterator[Sequence[Member]], total: int) -> BatchResult:
        """Make the audience hold exactly the members yielded by `batches` (full refresh).

        Blocks until the platform confirms (Meta operation_status 200; Google request status
        then remove_all(remove_as_of_time)), or raises.
        """
        ...

    def reconcile(self, audience: AudienceRef, request_ids: Sequence[str]) -> Mapping[str, RequestOutcome]:
        """Poll earlier asynchronous requests. Platforms confirming synchronously return
        `succeeded` for every id."""
        ...

    def audience_status(self, audience: AudienceRef) -> AudienceStatus: ...

    def ensure_lookalike(
        self,
        audience: AudienceRef,
        spec: Mapping[str, object],
        known: LookalikeRef | None,
        seed_size: int,
    ) -> LookalikeRef | None:
        """Create the lookalike once (`known` is the ledger's record), or return None when the
        seed is not big enough yet. Idempotent: an existing lookalike is found, not duplicated."""
        ...

    def close(self) -> None: ...
