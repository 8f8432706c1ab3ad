"""HTTP JSON API source: pages of member records, by cursor or next-link, through httpx.

The auth token goes in a header (never the URL); 429 and 5xx answers, timeouts and dropped
connections are retried with backoff (honouring ``Retry-After``); anything else that is not a
JSON page is a `SourceError` that says what came back, without echoing the body (it may hold PII).
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator, Sequence
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import duckdb
import httpx
import pyarrow as pa

from connector.errors import RetriableError, SourceError, ThrottledError
from connector.retry import RetryPolicy
from connector.settings import HttpSource
from connector.sources.base import (
    ArrowStream,
    check_columns,
    ident,
    missing_columns,
    row_number,
    text_batch,
    text_schema,
)


def _dig(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _as_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def safe_url(url: str) -> str:
    """The URL without query string or credentials, for messages."""
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urlunsplit((p.scheme, host, p.path, "", ""))


class HttpJsonSource:
    def __init__(self, config: HttpSource, *, transport: httpx.BaseTransport | None = None,
                 policy: RetryPolicy | None = None) -> None:  # fmt: skip
        self.config = config
        self.description = f"HTTP source {safe_url(config.url)}"
        self._transport = transport
        self._policy = policy or RetryPolicy(max_attempts=5, backoff_base_seconds=0.5, backoff_max_seconds=30)
        self._stream = ArrowStream(self.description)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", **self.config.headers}
        if self.config.auth_token is not None:
            token = self.config.auth_token.get_secret_value()
            headers[self.config.auth_header] = f"{self.config.auth_scheme} {token}".strip()
        return headers

    def _get(self, client: httpx.Client, url: str, params: dict[str, str], page: int) -> Any:
        where = f"{self.description} page {page}"

        def once() -> Any:
            try:
                resp = client.get(url, params=params)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                raise RetriableError(f"{where}: {type(exc).__name__}") from None
            if resp.status_code == 429 or resp.status_code >= 500:
                retry_after = resp.headers.get("retry-after")
                wait = float(retry_after) if retry_after and retry_after.isdigit() else None
                if resp.status_code == 429:
                    raise ThrottledError(f"{where}: HTTP 429", code=429, retry_after=wait)
                raise RetriableError(f"{where}: HTTP {resp.status_code}", code=resp.status_code)
            if resp.status_code >= 400:
                raise SourceError(f"{where}: HTTP {resp.status_code} (check the URL and the auth token)")
            ctype = resp.headers.get("content-type", "")
            try:
                return resp.json()
            except ValueError:
                kind = "HTML" if "html" in ctype or resp.text.lstrip().startswith("<") else "not JSON"
                raise SourceError(
                    f"{where}: the answer is {kind} (content-type {ctype or 'none'}, {len(resp.content)} bytes, "
                    "possibly truncated); expected a JSON page"
                ) from None

        try:
            return self._policy.call(once, what=where)
        except RetriableError as exc:
            raise SourceError(f"{exc} (gave up after {self._policy.max_attempts} attempts)") from None

    def _records(self, doc: Any, page: int) -> list[Any]:
        cfg = self.config
        records = _dig(doc, cfg.records_path) if cfg.records_path else doc
        if not isinstance(records, list):
            raise SourceError(f"{self.description} page {page}: no list at records_path {cfg.records_path!r}")
        return records

    def _pages(self) -> Generator[list[Any], None, None]:
        """The record lists of each page, in order; the client lives as long as the iteration."""
        cfg = self.config
        url: str | None = cfg.url
        params: dict[str, str] = {}
        with httpx.Client(timeout=cfg.timeout_seconds, headers=self._headers(), transport=self._transport,
                          follow_redirects=False) as client:  # fmt: skip
            for page in range(1, cfg.max_pages + 1):
                assert url is not None
                doc = self._get(client, url, params, page)
                records = self._records(doc, page)
                yield records
                if cfg.next_cursor_path:
                    cursor = _dig(doc, cfg.next_cursor_path)
                    if not cursor or not records:
                        return
                    params = {cfg.cursor_param: str(cursor)}
                elif cfg.next_url_path:
                    nxt = _dig(doc, cfg.next_url_path)
                    if not nxt or not records:
                        return
                    url, params = urljoin(url, str(nxt)), {}
                else:
                    return
        raise SourceError(f"{self.description}: more than max_pages = {cfg.max_pages} pages; raise max_pages")

    def columns(self) -> list[str]:
        """The fields of the first record (nested objects as dotted paths), from the first page only."""
        pages = self._pages()
        try:
            first = next(pages, [])
        finally:
            pages.close()
        return _fields(first[0]) if first and isinstance(first[0], dict) else []

    def relation(self, con: duckdb.DuckDBPyConnection, columns: Sequence[str]) -> duckdb.DuckDBPyRelation:
        pages = self._pages()
        try:
            first = next(pages, [])  # read now: a wrong URL, token or field fails before the engine starts
            check_columns(self.description, columns, columns)
            if first and isinstance(first[0], dict):
                missing = [c for c in columns if _dig(first[0], c) is None and c not in first[0]]
                if missing and all(all(_dig(r, c) is None for r in first if isinstance(r, dict)) for c in missing):
                    have = list(dict.fromkeys(_fields(first[0]) + [c for c in columns if c not in missing]))
                    raise missing_columns(self.description, columns, have)
        except BaseException:
            pages.close()
            raise
        schema = text_schema(columns)

        def batches() -> Iterator[pa.RecordBatch]:
            records: list[Any] | None = first
            while records is not None:
                # one page at a time: its values go into Arrow columns, its records are dropped
                yield text_batch(schema, [[_as_str(_dig(r, c)) if isinstance(r, dict) else None for r in records]
                                          for c in columns])  # fmt: skip
                records = next(pages, None)

        stream = self._stream.reader(schema, batches(), close=pages.close)
        return con.from_arrow(stream).select(f"{row_number()}, {', '.join(ident(c) for c in columns)}")

    def explain(self, exc: Exception) -> SourceError | None:
        return self._stream.explain(exc)


def _fields(record: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for k, v in record.items():
        if isinstance(v, dict) and v:
            out.extend(_fields(v, f"{prefix}{k}."))
        else:
            out.append(f"{prefix}{k}")
    return out
