"""Logging: human-readable lines by default, JSON lines with `--log-format json`; every line
carries the run id, segment and destination when a sync is running (context variables)."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

run_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("connector_run", default={})  # noqa: B039


@contextmanager
def log_context(**values: str) -> Iterator[None]:
    token = run_context.set({**run_context.get(), **{k: v for k, v in values.items() if v}})
    try:
        yield
    finally:
        run_context.reset(token)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = run_context.get()
        record.run_id = ctx.get("run_id", "")
        record.segment = ctx.get("segment", "")
        record.destination = ctx.get("destination", "")
        record.ctx = " ".join(f"{k}={v}" for k, v in ctx.items())
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **run_context.get(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            doc["error"] = record.exc_info[0].__name__  # the type only: exception text may hold payloads
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(fmt: str = "text", verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s %(ctx)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # the SDKs log request details at DEBUG: keep them quiet even with -v
    for noisy in ("urllib3", "httpx", "httpcore", "google", "grpc", "facebook_business", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
