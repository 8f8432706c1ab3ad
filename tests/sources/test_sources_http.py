"""HTTP source against a real loopback server (the sandbox's threaded HTTP server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from connector.errors import SourceError
from connector.sandbox.server import HttpRequest, HttpResponse, LoopbackHttpServer
from connector.settings import HttpSource
from connector.sources import open_source
from connector.sources.http import HttpJsonSource

TOKEN = "tok-super-secret-123"
PEOPLE = [{"id": i, "contact": {"email": f"u{i}@x.com"}} for i in range(5)]


class Api:
    def __init__(self) -> None:
        self.calls: list[HttpRequest] = []
        self.fail_first = 0
        self.mode = "cursor"

    def __call__(self, req: HttpRequest) -> HttpResponse:
        self.calls.append(req)
        if req.headers.get("authorization") != f"Bearer {TOKEN}":
            return HttpResponse(401, {"error": "unauthorized"})
        if self.fail_first:
            self.fail_first -= 1
            return HttpResponse(503, raw=b"<html>busy</html>")
        if self.mode == "html":
            return HttpResponse(200, raw=b"<html>login</html>")
        if self.mode == "truncated":
            return HttpResponse(200, raw=b'{"data": [{"id": 1', headers={"Content-Type": "application/json"})
        if self.mode == "404":
            return HttpResponse(404, {"error": "no"})
        if self.mode == "cursor":
            page = int((req.query.get("cursor") or ["0"])[0])
            nxt = page + 2 if page + 2 < len(PEOPLE) else None
            return HttpResponse(200, {"data": PEOPLE[page : page + 2], "meta": {"next": nxt}})
        page = int(req.path.rsplit("/", 1)[-1])
        nxt = f"/people/{page + 2}" if page + 2 < len(PEOPLE) else None
        return HttpResponse(200, {"items": PEOPLE[page : page + 2], "links": {"next": nxt}})


@pytest.fixture
def api() -> Iterator[tuple[Api, str]]:
    handler = Api()
    server = LoopbackHttpServer(handler).start()
    yield handler, server.url
    server.stop()


def emails(src: HttpJsonSource) -> list[str | None]:
    return [e for b in src.read_batches(["id", "contact.email"]) for e in b.columns["contact.email"]]


def fast(cfg: HttpSource) -> HttpJsonSource:
    from connector.retry import RetryPolicy

    return HttpJsonSource(cfg, policy=RetryPolicy(max_attempts=3, backoff_base_seconds=0.0, sleep=lambda _s: None))


def test_cursor_pagination_with_auth(api: tuple[Api, str]) -> None:
    handler, url = api
    cfg = HttpSource(type="http", url=f"{url}/people", next_cursor_path="meta.next", auth_token=SecretStr(TOKEN))
    assert emails(fast(cfg)) == [f"u{i}@x.com" for i in range(5)]
    assert all(TOKEN not in (r.path + str(r.query)) for r in handler.calls)
    assert isinstance(open_source(cfg, Path()), HttpJsonSource)


def test_next_link_pagination(api: tuple[Api, str]) -> None:
    handler, url = api
    handler.mode = "link"
    cfg = HttpSource(type="http", url=f"{url}/people/0", records_path="items", next_url_path="links.next",
                     auth_token=SecretStr(TOKEN))  # fmt: skip
    assert emails(fast(cfg)) == [f"u{i}@x.com" for i in range(5)]


def test_5xx_is_retried(api: tuple[Api, str]) -> None:
    handler, url = api
    handler.fail_first = 2
    cfg = HttpSource(type="http", url=f"{url}/people", next_cursor_path="meta.next", auth_token=SecretStr(TOKEN))
    assert len(emails(fast(cfg))) == 5


@pytest.mark.parametrize(("mode", "message"), [("404", "HTTP 404"), ("html", "HTML"), ("truncated", "not JSON")])
def test_bad_answers_are_source_errors_without_secrets(api: tuple[Api, str], mode: str, message: str) -> None:
    handler, url = api
    handler.mode = mode
    cfg = HttpSource(type="http", url=f"{url}/people?key=abc", auth_token=SecretStr(TOKEN))
    with pytest.raises(SourceError, match=message) as err:
        emails(fast(cfg))
    assert TOKEN not in str(err.value) and "key=abc" not in str(err.value)


def test_persistent_5xx_gives_up(api: tuple[Api, str]) -> None:
    handler, url = api
    handler.fail_first = 10
    cfg = HttpSource(type="http", url=f"{url}/people", auth_token=SecretStr(TOKEN))
    with pytest.raises(SourceError, match="gave up after 3 attempts"):
        emails(fast(cfg))


def test_plain_http_only_for_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        HttpSource(type="http", url="http://example.com/people")
