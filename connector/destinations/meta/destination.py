"""`MetaDestination`: Meta Custom Audiences (customer file) through the Graph API."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from connector.destinations.base import (
    AudienceRef,
    AudienceStatus,
    BatchResult,
    BatchSession,
    Capabilities,
    LookalikeRef,
    Member,
    MemberBatch,
    Platform,
    RequestOutcome,
)
from connector.destinations.meta.client import GraphClient, terms_url
from connector.errors import (
    ConfigError,
    FatalError,
    RetriableError,
    SkippableError,
    TermsNotAcceptedError,
)
from connector.retry import RetryPolicy, RetryStats, policy_from
from connector.settings import MetaDestinationConfig

log = logging.getLogger("connector.meta")

MAX_ROWS = 10_000
# Value-based custom audiences take each member's value in this schema key, unhashed: "an integer or
# floating-point arbitrary non-negative number" (Marketing API guide "Value-Based Lookalikes", step 2)
VALUE_KEY = "LOOKALIKE_VALUE"
VALUE_SUFFIX = " (value-based)"  # names a value-based audience apart from the plain one it may replace
SANDBOX_TOKEN = "sandbox-token"  # noqa: S105 - the emulator's fixed token, not a secret
REPLACE_POLL_SECONDS = 2.0


class MetaDestination:
    platform: Platform = "meta"

    def __init__(self, name: str, config: MetaDestinationConfig, client: GraphClient, *,
                 policy: RetryPolicy, emulator: Any = None) -> None:  # fmt: skip
        self.name = name
        self.config = config
        self.client = client
        self.capabilities = Capabilities(max_batch_size=MAX_ROWS, supports_replace=True, supports_lookalike=True)
        self.emulator = emulator  # the sandbox emulator this destination started, if any
        self._policy = policy
        self._sleep = policy.sleep or time.sleep

    @classmethod
    def from_config(cls, name: str, config: MetaDestinationConfig, state_dir: Path, *,
                    stats: RetryStats | None = None) -> MetaDestination:  # fmt: skip
        emulator = None
        graph_url = config.graph_url or "https://graph.facebook.com"
        token = config.access_token
        if config.sandbox:
            from connector.sandbox.meta_graph import start_meta_emulator

            emulator = start_meta_emulator(state_dir / f"sandbox-meta-{name}.arrow", expected_token=SANDBOX_TOKEN)
            graph_url, token = emulator.url, SecretStr(SANDBOX_TOKEN)
            log.warning("destination %s is a SANDBOX: Meta Graph API emulator at %s, no real ad account", name,
                        graph_url)  # fmt: skip
        if token is None:
            raise ConfigError(
                f"destinations.{name}.access_token is not set (set CONNECTOR_DESTINATIONS__{name.upper()}"
                "__ACCESS_TOKEN, or sandbox = true)"
            )
        policy = policy_from(config)
        client = GraphClient(graph_url=graph_url, api_version=config.api_version, token=token,
                             ad_account_id=config.ad_account_id, timeout=config.timeout_seconds,
                             policy=policy, stats=stats)  # fmt: skip
        return cls(name, config, client, policy=policy, emulator=emulator)

    def close(self) -> None:
        self.client.close()
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None

    # ------------------------------------------------------------------ audiences

    def ensure_audience(self, segment: str, known: AudienceRef | None, schema: Sequence[str], *,
                        value_based: bool = False) -> AudienceRef:  # fmt: skip
        keys = [*schema, VALUE_KEY] if value_based else list(schema)
        note = None
        if known is not None:
            found = self.client.get_audience(known.audience_id)
            if found is not None and bool(found.get("is_value_based")) == value_based:
                if not known.extra.get("schema"):
                    known.extra["schema"] = ",".join(keys)
                return known
            if found is None:
                log.warning("Meta audience %s of %s no longer exists; creating a new one", known.audience_id, segment)
            else:
                # Meta: an audience is value-based from its creation or never (a replace cannot switch it either)
                note = ("is not value-based and cannot become so" if value_based else
                        "is value-based and cannot stop being so")  # fmt: skip
                log.warning("Meta audience %s of %s %s; creating a new one", known.audience_id, segment, note)
        segment = segment.removesuffix(VALUE_SUFFIX) + (VALUE_SUFFIX if value_based else "")
        extra = {"schema": ",".join(keys)}
        existing = self._find_by_name(segment, value_based)
        if existing:
            return AudienceRef(existing, segment, extra, note)
        if not self.client.tos_accepted():
            raise TermsNotAcceptedError(
                f"Meta: the Custom Audience terms are not accepted for ad account act_{self.config.ad_account_id}; "
                f"accept them at {terms_url(self.config.ad_account_id)} and run again"
            )
        for attempt in range(self._policy.max_attempts):
            try:
                aid = self.client.create_custom_audience(
                    segment,
                    "Managed by connector: members are synced from a segment",
                    self.config.customer_file_source,
                    value_based,
                )
                return AudienceRef(aid, segment, extra, note)
            except RetriableError:
                # the create may have happened before the connection dropped: look before retrying
                existing = self._find_by_name(segment, value_based)
                if existing:
                    return AudienceRef(existing, segment, extra, note)
                if attempt + 1 >= self._policy.max_attempts:
                    raise
                self._sleep(min(self._policy.backoff_max_seconds, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def _find_by_name(self, name: str, value_based: bool = False) -> str | None:
        for a in self.client.list_audiences(("id", "name", "subtype", "is_value_based")):
            if (a.get("name") == name and a.get("subtype", "CUSTOM") == "CUSTOM"
                    and bool(a.get("is_value_based")) == value_based):  # fmt: skip
                return str(a["id"])
        return None

    # ------------------------------------------------------------------ members

    @staticmethod
    def _schema(audience: AudienceRef) -> list[str]:
        return [k for k in audience.extra.get("schema", "").split(",") if k]

    @staticmethod
    def _payload(schema: list[str], members: Sequence[Member], removal: bool = False) -> str:
        """The `payload` parameter: {"schema": [...], "data": [[...], ...]} as JSON text, written column by column
        (a batch's columns as they are; no list per row). "" for identifiers a member lacks: the schema stays the
        same for every row and call."""
        ids = [k for k in schema if k != VALUE_KEY]
        if isinstance(members, MemberBatch):
            n = len(members)
            cols = [members.columns[k].fill_null("").to_pylist() if k in members.columns else [""] * n for k in ids]
            worth = members.value_list()
        else:
            cols = [[m.payload.get(k, "") for m in members] for k in ids]
            worth = [m.value for m in members]
        texts = [list(map(_quote, col)) for col in cols]
        if VALUE_KEY in schema:
            texts.insert(schema.index(VALUE_KEY), [json.dumps(_number(v, removal)) for v in worth])
        data = ",".join(["[" + ",".join(row) + "]" for row in zip(*texts, strict=True)])
        return '{"schema":' + json.dumps(schema, separators=(",", ":")) + ',"data":[' + data + "]}"

    @staticmethod
    def _map_samples(schema: list[str], members: Sequence[Member], samples: Any) -> dict[str, str]:
        """invalid_entry_samples name offending values; find the members that sent them."""
        if not samples:
            return {}
        items = samples.items() if isinstance(samples, dict) else ((s, "invalid entry") for s in samples)
        by_value: dict[str, list[str]] = {}
        for m in members:
            for k in schema:
                v = m.payload.get(k, "")
                if v:
                    by_value.setdefault(v, []).append(m.key)
        rejected: dict[str, str] = {}
        for value, reason in items:
            for key in by_value.get(str(value), []):
                rejected[key] = f"meta: {reason}"[:200]
        return rejected

    def _upload(self, audience: AudienceRef, members: Sequence[Member], session: Mapping[str, Any],
                endpoint: str, delete: bool) -> BatchResult:  # fmt: skip
        if len(members) > MAX_ROWS:
            raise ValueError(f"a Meta upload holds at most {MAX_ROWS} rows, got {len(members)}")
        schema = self._schema(audience)
        body = self.client.upload(audience.audience_id, endpoint, self._payload(schema, members, delete), session,
                                  delete)  # fmt: skip
        rejected = self._map_samples(schema, members, body.get("invalid_entry_samples"))
        invalid = int(body.get("num_invalid_entries") or 0)
        if invalid and len(rejected) < invalid:
            log.warning("Meta %s: %d invalid entries, %d traced back to members from samples", endpoint, invalid,
                        len(rejected))  # fmt: skip
        return BatchResult(request_id=str(session.get("session_id")), rejected=rejected,
                           received=body.get("num_received"))  # fmt: skip

    @staticmethod
    def _session(s: BatchSession) -> dict[str, Any]:
        return {"session_id": s.session_id, "batch_seq": s.seq, "last_batch_flag": s.last,
                "estimated_num_total": s.estimated_total}  # fmt: skip

    def add_members(self, audience: AudienceRef, members: Sequence[Member], session: BatchSession) -> BatchResult:
        return self._upload(audience, members, self._session(session), "users", delete=False)

    def remove_members(self, audience: AudienceRef, members: Sequence[Member], session: BatchSession) -> BatchResult:
        try:
            return self._upload(audience, members, self._session(session), "users", delete=True)
        except SkippableError as exc:
            # "Audience Size too low": kept as pending removals, retried on a later run
            return BatchResult(deferred={m.key: str(exc)[:200] for m in members})

    def replace_members(self, audience: AudienceRef, batches: Iterator[Sequence[Member]], total: int) -> BatchResult:
        if total == 0:
            raise FatalError("Meta: cannot replace an audience with zero members; run a normal sync to remove them")
        sid = uuid.uuid4().int % (1 << 62)
        rejected: dict[str, str] = {}
        seq = 0
        started = time.monotonic()
        pending = next(batches, None)
        while pending is not None:
            nxt = next(batches, None)
            seq += 1
            session = {"session_id": sid, "batch_seq": seq, "last_batch_flag": nxt is None,
                       "estimated_num_total": total}  # fmt: skip
            if time.monotonic() - started > self.config.replace_timeout_seconds:
                raise FatalError("Meta: replace took longer than the platform's 90-minute window")
            out = self._upload(audience, pending, session, "usersreplace", delete=False)
            rejected.update(out.rejected)
            pending = nxt
        self._wait_replace(audience)
        return BatchResult(request_id=str(sid), rejected=rejected)

    def _wait_replace(self, audience: AudienceRef) -> None:
        deadline = time.monotonic() + self.config.replace_timeout_seconds
        while True:
            info = self.client.get_audience(audience.audience_id) or {}
            code = int((info.get("operation_status") or {}).get("code", 200))
            if code == 200:
                return
            if code == 415:
                raise RetriableError("Meta: the replace failed on the platform (operation_status 415)", code=415)
            if time.monotonic() > deadline:
                raise FatalError("Meta: the replace did not finish within its window")
            self._sleep(REPLACE_POLL_SECONDS)

    def finish(self, audience: AudienceRef) -> None:
        return None

    def reconcile(self, audience: AudienceRef, request_ids: Sequence[str]) -> Mapping[str, RequestOutcome]:
        # Meta answers each upload synchronously; invalid entries were mapped when it answered
        return {rid: RequestOutcome("succeeded") for rid in request_ids}

    def audience_status(self, audience: AudienceRef) -> AudienceStatus:
        info = self.client.get_audience(audience.audience_id)
        if info is None:
            return AudienceStatus(audience.audience_id, state="missing")
        op = info.get("operation_status") or {}
        delivery = info.get("delivery_status") or {}
        return AudienceStatus(
            audience.audience_id,
            size_lower=info.get("approximate_count_lower_bound"),
            size_upper=info.get("approximate_count_upper_bound"),
            state="ready" if delivery.get("code") == 200 else str(delivery.get("description") or "populating"),
            details={"operation_status": str(op.get("code", "")), "delivery_status": str(delivery.get("code", ""))},
        )

    # ------------------------------------------------------------------ lookalikes

    def _lookalike_spec(self, spec: Mapping[str, object]) -> dict[str, Any]:
        out: dict[str, Any] = {"ratio": spec.get("ratio", 0.01)}
        for key in ("country", "location_spec", "starting_ratio", "type"):
            if spec.get(key) is not None:
                out[key] = spec[key]
        return out

    def _find_lookalike(self, audience: AudienceRef, spec: dict[str, Any]) -> str | None:
        for a in self.client.list_audiences(("id", "name", "subtype", "origin_audience_id", "lookalike_spec")):
            ls = a.get("lookalike_spec") or {}
            if (a.get("subtype") == "LOOKALIKE" and str(a.get("origin_audience_id")) == audience.audience_id
                    and abs(float(ls.get("ratio", -1)) - float(spec["ratio"])) < 1e-9
                    and ls.get("country") == spec.get("country")):  # fmt: skip
                return str(a["id"])
        return None

    def ensure_lookalike(self, audience: AudienceRef, spec: Mapping[str, object], known: LookalikeRef | None,
                         seed_size: int) -> LookalikeRef | None:  # fmt: skip
        if known is not None:
            info = self.client.get_audience(known.lookalike_id)
            if info is not None:
                delivery = info.get("delivery_status") or {}
                known.state = "ready" if delivery.get("code") == 200 else "populating"
                known.details["approximate_count_lower_bound"] = str(info.get("approximate_count_lower_bound"))
                return known
        lal_spec = self._lookalike_spec(spec)
        min_seed = int(str(spec.get("min_seed_size", 100)))
        info = self.client.get_audience(audience.audience_id) or {}
        matched = info.get("approximate_count_lower_bound")
        seed = int(matched) if matched is not None else seed_size
        if seed < min_seed:
            return None
        where = lal_spec.get("country") or "location"
        name = f"Lookalike ({where}, {float(lal_spec['ratio']):.0%}) of {audience.name}"
        try:
            lid = self.client.create_lookalike(name, audience.audience_id, lal_spec)
        except FatalError as exc:
            if exc.code != 2654:
                raise
            found = self._find_lookalike(audience, lal_spec)
            if found is None:
                raise
            lid = found
        # a lookalike of a value-based seed is a value-based lookalike: Meta weighs the seed's members by their
        # LOOKALIKE_VALUE (value-based lookalikes guide); the lookalike_spec is the same as for any lookalike
        details = {"spec": str(lal_spec), "seed_size": str(seed)}
        if info.get("is_value_based"):
            details["value_based"] = "true"
        return LookalikeRef(lid, "populating", details)


# a JSON string literal with everything outside ASCII escaped (the json module's own C function)
_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _number(value: float | None, removal: bool) -> str | int | float:
    """A member's LOOKALIKE_VALUE as a JSON number. A member without one is never added to a value-based
    audience (the engine holds it back); a removal matches on the identifiers, so its value is only there
    to keep the audience's schema."""
    if value is None:
        return 0 if removal else ""
    return int(value) if value.is_integer() and abs(value) < 2**53 else value
