"""HTTP source against a real loopback server (the sandbox's threaded HTTP server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from conftest import read_source
from pydantic import SecretStr

from connector.errors import SourceError
from connector.sandbox.server import HttpRequest, HttpResponse, LoopbackHttpServer
from connector.settings import HttpSource
from connector.sources import open_source, reading
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
    return read_source(src, ["id", "contact.email"])["contact.email"]


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


# ----------------------------------------------------------------------------- relations


class Pages:
    """Pages of records served in order; `broken_page` answers HTML instead."""

    def __init__(self, pages: list[list[object]]) -> None:
        self.pages = pages
        self.broken_page: int | None = None

    def __call__(self, req: HttpRequest) -> HttpResponse:
        page = int((req.query.get("cursor") or ["0"])[0])
        if page == self.broken_page:
            return HttpResponse(200, raw=b"<html>secret.person@example.com</html>")
        nxt = page + 1 if page + 1 < len(self.pages) else None
        return HttpResponse(200, {"data": self.pages[page], "meta": {"next": nxt}})


@pytest.fixture
def pages() -> Iterator[tuple[Pages, str]]:
    handler = Pages([])
    server = LoopbackHttpServer(handler).start()
    yield handler, server.url
    server.stop()


def scan(src, columns):  # type: ignore[no-untyped-def]
    con = duckdb.connect(config={"threads": 2})
    rel = src.relation(con, columns)
    with reading(src):
        rows = rel.order("__row").fetchall()
    return rel.columns, [str(t) for t in rel.types], rows


def test_relation_numbers_rows_across_pages_and_turns_values_into_text(pages: tuple[Pages, str]) -> None:
    handler, url = pages
    handler.pages = [
        [{"id": 1.0, "vip": True, "score": 2.5, "c": {"email": "a@x.com"}, "tags": ["x"]}, {"id": 2, "vip": False, "c": {}}],
        [{"id": "007", "c": {"email": ""}, "score": None}, "not a record"],
        [{"id": 99}],
    ]
    cfg = HttpSource(type="http", url=f"{url}/people", next_cursor_path="meta.next")
    src = fast(cfg)
    assert src.columns() == ["id", "vip", "score", "c.email", "tags"]
    names, types, rows = scan(src, ["c.email", "id", "vip", "score", "tags"])
    assert names == ["__row", "c.email", "id", "vip", "score", "tags"] and types == ["BIGINT"] + ["VARCHAR"] * 5
    assert rows == [
        (0, "a@x.com", "1", "true", "2.5", '["x"]'),
        (1, None, "2", "false", None, None),
        (2, "", "007", None, None, None),
        (3, None, None, None, None, None),
        (4, None, "99", None, None, None),
    ]


def test_relation_missing_field_names_the_fields_records_have(pages: tuple[Pages, str]) -> None:
    handler, url = pages
    handler.pages = [[{"id": 1, "contact": {"mail": "a@x.com"}}, {"id": 2}]]
    src = fast(HttpSource(type="http", url=f"{url}/people", next_cursor_path="meta.next"))
    with pytest.raises(SourceError, match=r"missing column\(s\) 'contact.email'; available: 'id', 'contact.mail'"):
        src.relation(duckdb.connect(), ["id", "contact.email"])


def test_relation_page_that_breaks_mid_stream_is_the_sources_error_without_the_body(pages: tuple[Pages, str]) -> None:
    handler, url = pages
    handler.pages = [[{"id": i}] for i in range(4)]
    handler.broken_page = 2
    src = fast(HttpSource(type="http", url=f"{url}/people", next_cursor_path="meta.next"))
    with pytest.raises(SourceError, match=r"page 3: the answer is HTML") as err:
        scan(src, ["id"])
    assert "secret" not in str(err.value)


def test_relation_keeps_a_lone_surrogate_as_a_replacement_character(pages: tuple[Pages, str]) -> None:
    handler, url = pages
    handler.pages = [[{"id": "X\ud800", "email": "a\udfff@x.com"}, {"id": "Y", "email": "b@x.com"}]]
    src = fast(HttpSource(type="http", url=f"{url}/people", next_cursor_path="meta.next"))
    assert scan(src, ["id", "email"])[2] == [(0, "X\ufffd", "a\ufffd@x.com"), (1, "Y", "b@x.com")]


def test_relation_is_one_shot_and_a_second_scan_says_so(pages: tuple[Pages, str]) -> None:
    handler, url = pages
    handler.pages = [[{"id": 1}]]
    src = fast(HttpSource(type="http", url=f"{url}/people", next_cursor_path="meta.next"))
    rel = src.relation(duckdb.connect(), ["id"])
    with reading(src):
        assert rel.fetchall() == [(0, "1")]
    with pytest.raises(duckdb.InvalidInputException, match="already been consumed"), reading(src):
        rel.fetchall()
