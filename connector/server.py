"""`connector serve`: webhook-triggered and scheduled syncs in one process (Starlette + uvicorn).

One worker thread runs queued syncs through the same engine and ledger as `connector sync`.
The queue lives in the ledger database, keyed by segment: triggers that arrive while a sync of
the segment waits or runs collapse into one follow-up run. Pair locks (also in the ledger) keep
any two processes - servers or manual syncs - from syncing the same (segment, destination) at once.
On SIGTERM the batch in flight is finished and committed; what was queued stays queued.

With ``[workers]`` in the config, this process only accepts webhooks and enqueues them as jobs on
PostgreSQL; `connector worker` processes run the syncs and the schedules (see `connector.jobs`).

Webhook security: HMAC-SHA256 over ``timestamp + "." + raw body`` with the shared secret
(``CONNECTOR_WEBHOOK_SECRET``), sent as ``X-Connector-Timestamp`` and ``X-Connector-Signature``
(hex, optionally ``sha256=``); timestamps older or newer than 5 minutes are refused, and so is
an ``event_id`` or signature seen before. Callers that cannot sign may use a bearer token
(``CONNECTOR_WEBHOOK_BEARER_TOKEN``). With neither configured, the endpoint refuses every call.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from connector.engine import DestinationFactory, Engine, RunResult, SyncOptions
from connector.ledger.journal import Journal
from connector.locks import Coordinator
from connector.settings import ConnectorSettings

log = logging.getLogger("connector.server")

MAX_BODY = 64 * 1024
MAX_SKEW_SECONDS = 300
REPLAY_MEMORY = timedelta(minutes=15)


class SyncService:
    """Queue, worker and scheduler around one engine."""

    def __init__(self, settings: ConnectorSettings, *, destination_factory: DestinationFactory | None = None,
                 jitter_seconds: float = 0.0, lease_seconds: float = 60.0) -> None:  # fmt: skip
        self.settings = settings
        self.ledger = Journal(settings.ledger_sqlalchemy_url())
        self.coord = Coordinator(self.ledger, lease_seconds=lease_seconds)
        self.stop = threading.Event()
        self._wake = threading.Event()
        self.engine = Engine(settings, ledger=self.ledger, destination_factory=destination_factory,
                             pair_lock=self.coord.pair_lock(wait=True), stop=self.stop)  # type: ignore[arg-type]
        self.jobs: Any = None  # connector.jobs.JobQueue when [workers] is set: syncs run in `connector worker`
        if settings.workers is not None:
            from connector.jobs import JobQueue

            self.jobs = JobQueue(settings, self.ledger)
        self.jitter = jitter_seconds
        self.counters: Counter[tuple[str, ...]] = Counter()
        self.current: str | None = None
        # held while a queued sync is taken and marked current: `state()` never sees it in neither
        self._taking = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self.jobs is not None:
            self.jobs.open()
            log.info("jobs: webhooks are queued on PostgreSQL; `connector worker` runs them and the schedules")
            log.info("webhooks: %s", webhook_mode(self.settings))
            return
        schedules = [f"{name} ({seg.schedule}, {self.settings.timezone})"
                     for name, seg in self.settings.segments.items() if seg.schedule]  # fmt: skip
        log.info("schedules active: %s", ", ".join(schedules) if schedules else "none")
        log.info("webhooks: %s", webhook_mode(self.settings))
        for target, name in ((self._worker, "connector-worker"), (self._scheduler, "connector-scheduler")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.coord.pending():
            log.info("resuming queued syncs: %s", ", ".join(self.coord.pending()))
            self._wake.set()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Finish and commit the batch in flight; leave queued work queued."""
        self.stop.set()
        log.info("shutting down: the batch in flight is finished and committed, queued syncs stay queued")
        self._wake.set()
        if self.jobs is not None:
            self.jobs.close()
        for t in self._threads:
            t.join(timeout=timeout)
        self.engine.close()
        self.ledger.close()

    # ------------------------------------------------------------------ triggers

    def trigger(self, segment: str, destinations: list[str] | None, trigger: str) -> tuple[bool, dict[str, int]]:
        if self.jobs is not None:
            new: bool
            new, ids = self.jobs.enqueue(segment, destinations, trigger)
            return new, ids
        new, run_ids = self.coord.enqueue(segment, destinations, trigger, self.settings.segments[segment].destinations)
        self._wake.set()
        return new, run_ids

    def _worker(self) -> None:
        while not self.stop.is_set():
            with self._taking:
                item = self.coord.pop(self.settings.webhook_debounce_seconds)
                if item is not None:
                    self.current = item[0]
            if item is None:
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            segment, destinations, trigger, run_ids = item
            log.info("run start: %s -> %s (trigger %s, run ids %s)", segment,
                     ", ".join(destinations or self.settings.segments[segment].destinations), trigger,
                     ", ".join(map(str, sorted(run_ids.values()))) or "-")  # fmt: skip
            try:
                opts = SyncOptions(trigger=trigger, destinations=frozenset(destinations) if destinations else None,
                                   run_ids=run_ids)  # fmt: skip
                results = self.engine.sync([segment], opts)
            except Exception:
                log.exception("sync of %s crashed", segment)
                results = []
            finally:
                self.current = None
            for r in results:
                c = r.counts
                log.info("run end: %s -> %s %s (run %s): %s adds, %s removes, %s unchanged, %s rejected in %.1f s",
                         r.segment, r.destination, r.status, r.run_id, f"{c.adds + c.changes:,}",
                         f"{c.removes + c.changes:,}", f"{c.unchanged:,}", f"{r.rejected:,}", r.seconds)  # fmt: skip
            self._record(results)
            if any(r.status == "interrupted" for r in results):
                # shutting down mid-sync: the rest is sent after the next start
                self.trigger(segment, destinations, trigger)

    def state(self) -> tuple[str | None, list[str]]:
        """(segment running, segments queued), read together."""
        if self.jobs is not None:
            return None, list(self.jobs.pending())
        with self._taking:
            return self.current, self.coord.pending()

    def _record(self, results: list[RunResult]) -> None:
        with self._lock:
            for r in results:
                pair = (r.segment, r.destination)
                self.counters[("runs", r.status)] += 1
                self.counters[("added", *pair)] += r.counts.adds + r.counts.changes
                self.counters[("removed", *pair)] += r.counts.removes + r.counts.changes
                self.counters[("rejected", *pair)] += r.rejected

    def _scheduler(self) -> None:
        from croniter import croniter

        tz = ZoneInfo(self.settings.timezone)
        due: dict[str, datetime] = {}
        for name, seg in self.settings.segments.items():
            if seg.schedule:
                due[name] = self._next(croniter, seg.schedule, datetime.now(tz))
        while not self.stop.wait(0.5):
            now_ = datetime.now(tz)
            for name, when in list(due.items()):
                if now_ >= when:
                    # a missed or overlapping tick collapses into the one queued run
                    self.trigger(name, None, "schedule")
                    due[name] = self._next(croniter, self.settings.segments[name].schedule or "", now_)

    def _next(self, croniter: Any, expr: str, after: datetime) -> datetime:
        nxt: datetime = croniter(expr, after).get_next(datetime)
        return nxt + timedelta(seconds=random.uniform(0, self.jitter)) if self.jitter else nxt

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> str:
        lines = [
            "# HELP connector_runs_total Sync runs by status since the server started.",
            "# TYPE connector_runs_total counter",
        ]
        with self._lock:
            counters = dict(self.counters)
        for (kind, *labels), value in sorted(counters.items()):
            if kind == "runs":
                lines.append(f'connector_runs_total{{status="{labels[0]}"}} {value}')
        for kind, help_ in (("added", "Members added"), ("removed", "Members removed"), ("rejected", "Members rejected")):
            lines += [f"# HELP connector_members_{kind}_total {help_} since the server started.",
                      f"# TYPE connector_members_{kind}_total counter"]  # fmt: skip
            for (k, *labels), value in sorted(counters.items()):
                if k == kind:
                    lines.append(f'connector_members_{kind}_total{{segment="{labels[0]}",destination="{labels[1]}"}} {value}')
        lines += ["# HELP connector_last_success_timestamp_seconds Last successful sync per pair.",
                  "# TYPE connector_last_success_timestamp_seconds gauge"]  # fmt: skip
        for seg_name, seg in self.settings.segments.items():
            for dest in seg.destinations:
                last = self.ledger.last_success(seg_name, dest)
                if last is not None:
                    lines.append(f'connector_last_success_timestamp_seconds{{segment="{seg_name}",destination="{dest}"}} '
                                 f"{last.timestamp():.0f}")  # fmt: skip
        stats = sorted(self.engine.stats.items())
        # each family's samples follow its own HELP and TYPE lines (the exposition format wants them together)
        lines += ["# HELP connector_retries_total Platform calls retried.", "# TYPE connector_retries_total counter"]
        lines += [f'connector_retries_total{{destination="{dest}"}} {st.retries}' for dest, st in stats]
        lines += ["# HELP connector_throttle_wait_seconds_total Time spent waiting for throttling.",
                  "# TYPE connector_throttle_wait_seconds_total counter"]  # fmt: skip
        lines += [f'connector_throttle_wait_seconds_total{{destination="{dest}"}} {st.throttle_wait_seconds:.3f}'
                  for dest, st in stats]  # fmt: skip
        lines += ["# HELP connector_queue_length Segments queued for a sync.", "# TYPE connector_queue_length gauge",
                  f"connector_queue_length {len(self.state()[1])}"]  # fmt: skip
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- HTTP


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature a caller sends: hex HMAC-SHA256 of ``timestamp + "." + body``."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def webhook_mode(settings: ConnectorSettings) -> str:
    """Whether webhooks are enabled and how callers authenticate (never the secret itself)."""
    ways = [w for w, on in (("HMAC signature", settings.webhook_secret), ("bearer token", settings.webhook_bearer_token)) if on]
    if not ways:
        return "disabled (set CONNECTOR_WEBHOOK_SECRET or CONNECTOR_WEBHOOK_BEARER_TOKEN to enable them)"
    return "enabled (" + " or ".join(ways) + ")"


def _authenticate(settings: ConnectorSettings, request: Request, body: bytes) -> tuple[JSONResponse | None, str | None]:
    """(error response or None, replay key from the signature or None)."""
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    bearer = settings.webhook_bearer_token.get_secret_value() if settings.webhook_bearer_token else None
    if not secret and not bearer:
        return _error(503, "webhooks are disabled: set CONNECTOR_WEBHOOK_SECRET (or CONNECTOR_WEBHOOK_BEARER_TOKEN)"), None
    sig = request.headers.get("x-connector-signature")
    if secret and sig:
        ts = request.headers.get("x-connector-timestamp", "")
        try:
            age = abs(time.time() - float(ts))
        except ValueError:
            age = math.nan
        if not math.isfinite(age):  # "nan" or "inf" would slip past a plain comparison
            return _error(401, "X-Connector-Timestamp must be a Unix timestamp"), None
        if age > MAX_SKEW_SECONDS:
            return _error(401, "stale or future timestamp (more than 5 minutes off)"), None
        given = sig.removeprefix("sha256=").strip().lower()
        if not hmac.compare_digest(given, sign(secret, ts, body)):
            return _error(401, "bad signature"), None
        return None, f"sig:{given}"
    auth = request.headers.get("authorization", "")
    if bearer and auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].strip(), bearer):
        return None, None
    return _error(401, "missing or bad credentials: sign the request (X-Connector-Signature) or send the bearer token"), None


def create_app(settings: ConnectorSettings, service: SyncService | None = None, *, start_service: bool = True) -> Starlette:
    svc = service or SyncService(settings)

    async def webhook(request: Request) -> Response:
        response = await handle_webhook(request)
        # the segment name comes from the URL: shown quoted and cut short; never a header (secret, signature)
        name = repr(str(request.path_params.get("name", ""))[:100])
        if response.status_code == 202:
            doc = json.loads(bytes(response.body))
            log.info("webhook for segment %s accepted: %s, run ids %s", name, doc["status"],
                     ", ".join(map(str, sorted(doc["run_ids"].values()))) or "-")  # fmt: skip
        else:
            reason = json.loads(bytes(response.body)).get("error", "")
            log.warning("webhook for segment %s refused: %d %s", name, response.status_code, reason)
        return response

    async def handle_webhook(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
            return _error(413, f"body larger than {MAX_BODY} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return _error(413, f"body larger than {MAX_BODY} bytes")
        denied, replay_key = _authenticate(settings, request, body)
        if denied is not None:
            return denied
        try:
            doc = json.loads(body) if body.strip() else {}
        except ValueError:
            return _error(400, "body is not valid JSON")
        if not isinstance(doc, dict):
            return _error(400, "body must be a JSON object")
        if name not in settings.segments:
            return _error(404, f"unknown segment {name!r}")
        destinations = doc.get("destinations")
        if destinations is not None:
            known = settings.segments[name].destinations
            if not isinstance(destinations, list) or any(d not in known for d in destinations):
                return _error(400, f"destinations must be a list of this segment's destinations: {known}")
        event_id = doc.get("event_id")
        keys = [k for k in (f"event:{event_id}" if event_id else None, replay_key) if k]
        for key in keys:
            if svc.coord.seen_before(key, REPLAY_MEMORY):
                return _error(409, "replayed request (event_id or signature seen before)")
        new, run_ids = svc.trigger(name, destinations, "webhook")
        # a coalesced trigger shares the queued run ids: one run will serve all of them
        return JSONResponse({"status": "queued" if new else "coalesced", "segment": name, "run_ids": run_ids,
                             "run_id": min(run_ids.values()) if run_ids else None}, status_code=202)  # fmt: skip

    async def healthz(_request: Request) -> Response:
        running, queued_ = svc.state()
        return JSONResponse({"status": "ok", "running": running, "queued": queued_})

    async def runs(request: Request) -> Response:
        limit = min(int(request.query_params.get("limit", "50") or 50), 500)
        return JSONResponse({"runs": [
            {"id": r.id, "trigger": r.trigger, "segment": r.segment, "destination": r.destination,
             "started_at": r.started_at.isoformat(), "ended_at": r.ended_at.isoformat() if r.ended_at else None,
             "status": r.status, "counts": r.counts, "error": r.error}
            for r in svc.ledger.list_runs(limit)
        ]})  # fmt: skip

    async def metrics(_request: Request) -> Response:
        return PlainTextResponse(svc.metrics(), media_type="text/plain; version=0.0.4")

    async def openapi(_request: Request) -> Response:
        return JSONResponse(OPENAPI)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if start_service:
            svc.start()
        try:
            yield
        finally:
            if start_service:
                svc.shutdown()

    app = Starlette(routes=[
        Route("/webhooks/segments/{name}", webhook, methods=["POST"]),
        Route("/healthz", healthz), Route("/runs", runs), Route("/metrics", metrics), Route("/openapi.json", openapi),
    ], lifespan=lifespan)  # fmt: skip
    app.state.service = svc
    return app


def serve(settings: ConnectorSettings, host: str, port: int, jitter_seconds: float = 0.0) -> None:
    """Serve until SIGTERM or Ctrl-C; a graceful shutdown returns normally (exit code 0)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn raises the signal again once it shut down, so the process dies of it (exit 143 for
            # SIGTERM), which Docker, systemd and CI report as a failure. A finished shutdown is a success.
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()

    app = create_app(settings, SyncService(settings, jitter_seconds=jitter_seconds))
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown, which runs the lifespan's shutdown
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
    server = GracefulServer(config)
    server.run()
    if not server.started:
        raise SystemExit(3)  # could not start (the port is taken...): uvicorn logged why
    log.info("stopped")


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "connector", "version": "0.1.0",
             "description": "Webhook-triggered and scheduled audience syncs."},
    "paths": {
        "/webhooks/segments/{name}": {"post": {
            "summary": "Queue a sync of one segment (202); signed with X-Connector-Timestamp/X-Connector-Signature",
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "X-Connector-Timestamp", "in": "header", "schema": {"type": "string"}},
                {"name": "X-Connector-Signature", "in": "header", "schema": {"type": "string"}},
            ],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"event_id": {"type": "string"},
                                                 "destinations": {"type": "array", "items": {"type": "string"}}}}}}},
            "responses": {"202": {"description": "queued or coalesced"}, "400": {"description": "malformed"},
                          "401": {"description": "bad or stale signature"}, "404": {"description": "unknown segment"},
                          "409": {"description": "replay"}, "413": {"description": "body too large"},
                          "503": {"description": "webhooks disabled"}},
        }},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
        "/runs": {"get": {"summary": "Recent runs", "responses": {"200": {"description": "runs"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
    },
}

