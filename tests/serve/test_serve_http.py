"""The server's HTTP manners, over raw and httpx connections: a refused body closes its connection (413), a
trailing slash is the same route, HEAD is answered like GET, no auto-generated API docs. Each test failed
before its fix."""

from __future__ import annotations

import socket

import httpx
import pytest
from servehelp import GatedModel, serving

from oztune.serve.server import ServeLimits, create_app


@pytest.fixture(scope="module")
def url():
    with serving(create_app(GatedModel(gated=False), ServeLimits(max_texts_per_request=4, max_body_bytes=2000))) as u:
        yield u


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def read_until_closed(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of the answer, read until the server closes the connection: socket.timeout if it has not
    within 2 s (uvicorn closes an idle kept-alive connection after 5 s), ConnectionResetError if it resets it."""
    sock.settimeout(2)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_a_413_for_a_body_declared_too_large_closes_the_connection_of_a_client_that_waits_for_100_continue(url):
    # Before: the connection stayed open, so the client's next request on it, sent instead of the refused body,
    # was read as that body and never answered.
    with connect(url) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        head, body = read_until_closed(sock)
    assert head.startswith(b"HTTP/1.1 413 "), head  # (no "100 Continue" before it: the body is not wanted)
    assert b"\r\nconnection: close" in head.lower()
    assert b"exceeds the limit of 2,000 bytes" in body


def _chunked(body: bytes) -> bytes:
    chunks = [body[i:i + 500] for i in range(0, len(body), 500)]
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


@pytest.mark.parametrize("framing, body", [
    ("content-length", b'{"texts": ["' + b"a" * 3000 + b'"]}'),  # refused from its Content-Length, unread
    ("chunked", b'{"texts": ["' + b"a" * 3000 + b'"]}'),  # refused while read, past 2,000 bytes
    ("content-length", b'{"texts": ["a", "b", "c", "d", "e"]}'),  # read whole, too many texts
], ids=["declared too large", "read too large", "too many texts"])
def test_a_413_on_a_body_that_was_sent_closes_the_connection_cleanly(url, framing, body):
    with connect(url) as sock:
        length = b"Content-Length: %d" % len(body) if framing == "content-length" else b"Transfer-Encoding: chunked"
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + length + b"\r\n\r\n"
                     + (body if framing == "content-length" else _chunked(body)))
        head, _ = read_until_closed(sock)
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert b"\r\nconnection: close" in head.lower()
    # The server goes on serving, and its client (httpx) gets the 413 and then a new connection.
    with httpx.Client(base_url=url, timeout=20) as c:
        assert c.post("/predict", json={"texts": ["a"] * 5}).status_code == 413
        assert c.post("/predict", content=b'{"texts": ["' + b"a" * 100_000 + b'"]}').status_code == 413
        assert c.post("/predict", json={"texts": ["ok"]}).status_code == 200


def test_a_trailing_slash_is_the_same_route_not_a_redirect(url):
    # Before: a 307 to the path without the slash, which a client that does not follow redirects took for the
    # answer, and one that does sent its request twice.
    with httpx.Client(base_url=url, timeout=20) as c:
        r = c.post("/predict/", json={"texts": ["abc", "de"]})
        assert r.status_code == 200, r.headers
        assert r.json() == {"predictions": [{"label": "len", "score": 3.0}, {"label": "len", "score": 2.0}]}
        assert c.post("/predict/", json={"texts": ["a"] * 5}).status_code == 413  # the same limits
        r = c.get("/health/")
        assert r.status_code == 200 and r.json()["status"] == "ok", r.headers
        r = c.get("/metrics/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.headers
        assert 'oztune_requests_total{status="200"}' in r.text  # the POST to /predict/ was counted
        assert c.get("/predict/").status_code == 405  # as GET /predict
        assert c.get("/nothing/").status_code == 404


@pytest.mark.parametrize("path", ["/health", "/metrics", "/health/", "/metrics/"])
def test_head_is_answered_like_get_without_a_body(url, path):
    # Before: HEAD /metrics (and /metrics/) got 405, as FastAPI's GET routes do not take HEAD.
    with httpx.Client(base_url=url, timeout=20) as c:
        got, head = c.get(path), c.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"])
def test_no_auto_generated_api_docs(url, path):
    # Before: 200. FastAPI's schema, generated from handlers that read raw bytes and build their own answers,
    # listed no error answer, an empty schema for every answer and application/json for /metrics (text/plain),
    # and /docs and /redoc load their scripts from a CDN.
    assert httpx.get(f"{url}{path}", timeout=20).status_code == 404
