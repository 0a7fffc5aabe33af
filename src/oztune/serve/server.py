"""The HTTP service: FastAPI routes, request limits, and uvicorn with graceful shutdown.

``POST /predict`` takes ``{"texts": [...], "text_pairs": [...]?}`` and answers
``{"predictions": [{"label": ..., "score": ...}, ...]}``; ``GET``/``HEAD /health``; ``GET``/``HEAD /metrics``
(Prometheus); each with a trailing slash too; no /docs, /redoc or /openapi.json.
The request path is kept cheap: the body is read with a size limit and checked by hand (no pydantic
model, no response model), and the work is queued to the batch worker (see :mod:`.batching`).

Status codes: 422 for a body that is not JSON or has wrong types, an empty text or a text that is not valid Unicode
(with a message saying which field), or whose texts are of the other kind (text pairs or single texts) than the
model was fine-tuned on, 413 for more texts than ``max_texts_per_request`` (or than
``max_queue``) or a body over ``max_body_bytes`` (and its connection is closed: the rest of a body refused
unread is not read as the next request, nor is that request taken for the body that a client with
``Expect: 100-continue`` then does not send), 408 for a body not all there ``body_timeout_s`` after its
headers (its connection closed too), 503 when the queue is full or the server is shutting down, 500 when
the model fails, 504 when its call on a batch runs past ``batch_timeout_s`` (then 503 for other requests
while every replica is stuck so; see :mod:`.batching`: a replica in a thread cannot be stopped, and /health
says 503 until its call returns). A client that closes its connection before its answer is counted as 499
(nginx's "client closed request"; nothing is sent), and its texts are not run if they are still queued, nor
count toward ``max_queue`` once the queue is full; a request it pipelined behind that one (HTTP/1.1) is never
started by uvicorn, so neither run nor counted.
Over-long texts are truncated by the tokenizer. On SIGTERM uvicorn stops accepting connections, lets
in-flight requests finish (up to ``graceful_timeout_s``; those still unanswered then get 503 and are not
run), then the batch worker finishes its batch and stops.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response

from oztune.data.readers import is_blank, surrogate_at
from oztune.errors import DataError, OztuneError, check_text_pairs
from oztune.serve.batching import Closed, MicroBatcher, ModelTimeout, Predict, QueueFull, Stalled
from oztune.serve.metrics import Metrics


@dataclass
class ServeLimits:
    """Batching and request limits.

    Args:
        max_batch_size: most texts per batch, i.e. per call of ``predict``.
        max_wait_ms: longest wait for a batch to fill, from the oldest queued request.
        max_queue: most texts waiting for a batch before requests get 503.
        max_texts_per_request: most texts in one request (more, or more than ``max_queue``: 413).
        max_body_bytes: largest request body (more: 413).
        graceful_timeout_s: on shutdown, how long in-flight requests may still take; those still
            unanswered then get 503.
        body_timeout_s: longest time for a request's body to arrive, from its headers (more: 408, and the
            connection is closed); 0: no limit.
        batch_timeout_s: longest model call per batch: past it the batch's requests get 504, /health 503,
            and while every replica is stuck so, other requests 503 (see :mod:`.batching`); 0: no limit.
    """

    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_texts_per_request: int = 64
    max_body_bytes: int = 1_000_000
    graceful_timeout_s: float = 30.0
    body_timeout_s: float = 30.0
    batch_timeout_s: float = 300.0


class HTTPError(Exception):
    """An error answer: status code and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _dumps(payload: dict) -> bytes:
    """``payload`` as compact JSON; ValueError for a nan or an infinity (Python's ``NaN``/``Infinity`` are not
    JSON: a client's parser would fail on the whole answer)."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def _json(status: int, payload: dict) -> Response:
    return Response(_dumps(payload), status, media_type="application/json")


async def _read_body(scope: dict, receive, limit: int) -> bytes:
    """The request body of an ASGI request, or 413 as soon as it is known to exceed ``limit`` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise HTTPError(413, f"request body of {int(value):,} bytes exceeds the limit of {limit:,} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(499, "the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body exceeds the limit of {limit:,} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class BodyDeadlines:
    """Deadlines for reading request bodies, checked by one periodic task instead of a timer per request.

    A client that sends headers and then too little body held its request and connection forever. A timer
    per request cost 1.7 us (``loop.call_at``) to 3.9 us (``asyncio.timeout``, Python 3.11+ only) in a
    micro-benchmark, an entry in a dict 0.7 us, against ~70 us of the server's time per request; the price is
    that a body may take up to one check period (at most 1 s) longer than ``timeout``.

    Args:
        timeout: seconds a request's body may take to arrive, from its headers (0: no limit).
    """

    def __init__(self, timeout: float):
        self.timeout, self.period = timeout, min(1.0, timeout / 4)
        self.reading: dict[asyncio.Task, float] = {}  # request task: its deadline (time.monotonic())
        self.expired: set[asyncio.Task] = set()  # cancelled by run(), not by uvicorn

    async def read(self, scope: dict, receive, limit: int) -> bytes:
        """:func:`_read_body` within the deadline, else HTTPError 408."""
        if not self.timeout:
            return await _read_body(scope, receive, limit)
        task = asyncio.current_task()
        self.reading[task] = time.monotonic() + self.timeout
        try:
            return await _read_body(scope, receive, limit)
        except asyncio.CancelledError:
            if task not in self.expired:
                raise
            self.expired.discard(task)
            if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled here
                task.uncancel()
            raise HTTPError(408, f"the request body did not arrive within {self.timeout:g} s") from None
        finally:
            del self.reading[task]

    async def run(self) -> None:
        """Every period, cancel the reads past their deadline; until cancelled."""
        while self.timeout:
            await asyncio.sleep(self.period)
            now = time.monotonic()
            for task in [t for t, deadline in self.reading.items() if deadline <= now]:
                self.reading[task] = float("inf")  # cancelled once
                self.expired.add(task)
                task.cancel()


def _client_gone(receive) -> Callable[[], bool] | None:
    """A check of whether the request's client has disconnected, or None where the ASGI server offers none.

    uvicorn's ``receive`` is a method of its request cycle, whose ``disconnected`` flag the connection sets when
    it is lost; reading the flag costs next to nothing. The ASGI way, a task per request awaiting
    ``http.disconnect`` beside the answer, took the /predict handler from 11.9 to 18.4 us per request (of ~70 us
    the server spends per request in all, with a stub model).

    But uvicorn (httptools) sets the flag of the connection's newest request only: with HTTP/1.1 pipelining
    that is a request queued behind the one in progress (it starts once that one is answered, so never
    on a lost connection), and the one in progress was never seen gone. So the connection's transport is asked
    too, and the request flagged, which also makes uvicorn send it nothing (a write to a closed uvloop
    transport raises).
    """
    cycle = getattr(receive, "__self__", None)
    if not hasattr(cycle, "disconnected"):
        return None
    transport = getattr(cycle, "transport", None)
    if transport is None:
        return lambda: cycle.disconnected

    def gone() -> bool:
        if not cycle.disconnected and transport.is_closing():
            cycle.disconnected = True
        return cycle.disconnected

    return gone


def _model_error(e: Exception) -> HTTPError:
    """The answer to a request whose batch failed: 504 past the batch timeout, 503 while every model replica is
    stuck so, else 500."""
    if isinstance(e, ModelTimeout):
        return HTTPError(504, str(e))
    if isinstance(e, Stalled):
        return HTTPError(503, str(e))
    return HTTPError(500, f"prediction failed: {type(e).__name__}: {e}")


async def _answer(future: asyncio.Future, gone: Callable[[], bool] | None) -> list[dict]:
    """The batcher's answer to a request; HTTPError 499 if its client disconnected first, else as
    :func:`_model_error` if its batch failed.

    uvicorn drops an answer to a closed connection without a word: without this check it counted as a 200.

    Args:
        future: from :meth:`MicroBatcher.submit` (cancelled by the batcher when the client is gone).
        gone: from :func:`_client_gone`.
    """
    try:
        predictions = await future
    except asyncio.CancelledError:
        if gone is None or not gone():
            raise  # the task itself was cancelled (see handle_predict)
    except Exception as e:  # the model failed on this batch, or hung
        if gone is None or not gone():
            raise _model_error(e) from None
    if gone is not None and gone():  # (also when it left after the answer came: that is not sent either)
        raise HTTPError(499, "the client disconnected before its answer")
    return predictions


# A body left unread (408; 413, but for too many texts): its rest may still come, or never come (a client that sent
# Expect: 100-continue sends its next request instead). These answers let the client go; neither is read as a request.
CLOSES_CONNECTION = (408, 413)


class PredictFastPath:
    """ASGI middleware that answers ``POST /predict`` (and ``/predict/``) itself, before FastAPI's routing.

    The route's work is small (parse JSON, queue, answer), so the framework around it was a large share of
    the serving process's time: routing, a ``Request`` object, a ``Response`` object. Answering from the
    raw ASGI messages took the process's CPU per request from ~0.2 ms to ~0.1 ms (bench/load.py), which under
    load is CPU the model gets. Every other path goes to the application; the FastAPI route for
    /predict stays for the other methods' 405 (``allow: POST``) and does the same. Being the outermost layer,
    it also takes a path's trailing slash off for every route (``/predict/``, ``/health/``: the route itself).
    """

    def __init__(self, app, handle):
        self.app, self.handle = app, handle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if len(path) > 1 and path[-1] == "/":  # every route answers with a trailing slash too, as itself (no 307)
            path = path[:-1]
            scope = {**scope, "path": path}
        if path != "/predict" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        status, body = await self.handle(scope, receive)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status in CLOSES_CONNECTION:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _string_list(body: dict, field: str) -> list[str]:
    """``body[field]`` as a list of strings, else 422: a JSON array of non-empty strings that are valid Unicode (a
    ``"\\ud800"`` escape decodes to a lone surrogate, which the tokenizer refuses for the whole batch)."""
    value = body[field]
    if not isinstance(value, list):
        raise HTTPError(422, f"{field}: expected a list of strings, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise HTTPError(422, f"{field}[{i}]: expected a string, got {type(v).__name__}")
        if is_blank(v):  # (the rule of files, the command line and the Python API)
            raise HTTPError(422, f"{field}[{i}]: empty text (a text needs more than whitespace to be scored)")
        if not v.isascii():
            try:
                v.encode()
            except UnicodeEncodeError as e:
                raise HTTPError(422, f"{field}[{i}]: not valid Unicode ({surrogate_at(v, e.start)})") from None
    return value


def parse_predict_body(raw: bytes, max_texts: int, text_pairs: bool | None = None) -> tuple[list[str], list[str] | None]:
    """(texts, text_pairs or None) from a /predict body; HTTPError 422 or 413 when it is not acceptable, 422 too
    for text pairs when ``text_pairs`` is False (the model was fine-tuned on single texts) and for single texts
    when it is True (None: the model does not say, both are taken)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(422, f"request body is not valid JSON ({e})") from None
    except RecursionError:  # the decoder recurses once per nested array or object
        raise HTTPError(422, "request body is JSON nested too deeply") from None
    if not isinstance(body, dict) or "texts" not in body:
        raise HTTPError(422, 'expected a JSON object with "texts": a list of strings')
    unknown = sorted(set(body) - {"texts", "text_pairs"})
    if unknown:
        raise HTTPError(422, f"unknown field(s) {', '.join(unknown)}; expected texts and optionally text_pairs")
    texts = _string_list(body, "texts")
    if not texts:
        raise HTTPError(422, "texts: expected at least one text")
    if len(texts) > max_texts:
        raise HTTPError(413, f"texts: {len(texts)} texts exceed the limit of {max_texts} per request")
    pairs = None
    if body.get("text_pairs") is not None:
        pairs = _string_list(body, "text_pairs")
        if len(pairs) != len(texts):
            raise HTTPError(422, f"text_pairs: expected one per text ({len(texts)}), got {len(pairs)}")
    try:
        check_text_pairs(text_pairs, pairs is not None, "texts", "call")
    except DataError as e:
        raise HTTPError(422, str(e)) from None
    return texts, pairs


def create_app(predict: Predict | list[Predict], limits: ServeLimits | None = None,
               info: dict | None = None, text_pairs: bool | None = None) -> FastAPI:
    """The FastAPI application serving ``predict`` through a micro-batcher.

    Args:
        predict: ``predict(texts, pairs) -> [{"label", "score"}, ...]``, e.g. ``Classifier.predict``; or a list
            of them (model replicas, each fed batches by a worker thread of its own).
        limits: batching and request limits.
        info: extra fields for GET /health (model path, backend); it also says ``text_pairs``.
        text_pairs: whether the model was fine-tuned on text pairs: requests of the other kind get 422 (None:
            not recorded, both kinds are run).
    """
    limits = limits or ServeLimits()
    metrics = Metrics()
    # A request with more texts than the queue holds could never be queued: 413, not 503 again and again.
    max_texts = min(limits.max_texts_per_request, limits.max_queue)
    batcher = MicroBatcher(predict, limits.max_batch_size, limits.max_wait_ms, limits.max_queue, metrics.on_batch,
                           limits.batch_timeout_s)
    deadlines = BodyDeadlines(limits.body_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start(asyncio.get_running_loop())
        checks = asyncio.create_task(deadlines.run())
        yield
        checks.cancel()
        await asyncio.get_running_loop().run_in_executor(None, batcher.close, limits.graceful_timeout_s)

    # Each route is served with a trailing slash too, as the same route (PredictFastPath takes the slash off): no
    # redirect (Starlette's 307 made a client resend its request, or, not following redirects, take the 307 for the answer).
    # No /docs, /redoc or /openapi.json: the schema FastAPI generates from these handlers, which read raw bytes
    # and build their own answers, said none of the error answers, an empty schema for each answer, and
    # application/json for /metrics; the contract is in the module's and the README's words.
    app = FastAPI(title="oztune", lifespan=lifespan, redirect_slashes=False, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher, app.state.metrics = batcher, metrics

    @app.post("/predict")
    async def predict_route(request: Request) -> Response:
        """Labels and scores for each text: ``{"predictions": [{"label": ..., "score": ...}, ...]}``."""
        status, body = await handle_predict(request.scope, request.receive)  # (PredictFastPath answers first)
        return Response(body, status, {"connection": "close"} if status in CLOSES_CONNECTION else None,
                        "application/json")

    async def handle_predict(scope: dict, receive) -> tuple[int, bytes]:
        start = time.perf_counter()
        try:
            texts, pairs = parse_predict_body(await deadlines.read(scope, receive, limits.max_body_bytes), max_texts,
                                              text_pairs)
            gone = _client_gone(receive)
            try:
                future = batcher.submit(texts, pairs, gone)
            except (QueueFull, Closed, Stalled) as e:
                raise HTTPError(503, str(e)) from None
            predictions = await _answer(future, gone)
            try:
                status, body = 200, _dumps({"predictions": predictions})
            except ValueError:  # a nan or infinite score
                raise HTTPError(500, "the model's output is not a finite number (weights gone to nan?)") from None
        except HTTPError as e:
            status, body = e.status, _dumps({"detail": str(e)})
        except asyncio.CancelledError:
            # Only uvicorn cancels this task: its graceful shutdown ran out of time (graceful_timeout_s) with
            # the request still queued, in the model or sending its body. Refuse it as shutting down (the
            # batch worker skips it), instead of letting the cancellation out: uvicorn would log a traceback
            # per request and answer a plain-text 500.
            status, body = 503, _dumps({"detail": "the server is shutting down (its graceful timeout ran out "
                                                  "before this request's turn)"})
        except Exception as e:  # a bug: still a JSON answer, and counted
            status, body = 500, _dumps({"detail": f"internal error: {type(e).__name__}: {e}"})
        metrics.on_request(status, time.perf_counter() - start)  # (texts classified: counted by the batch workers)
        return status, body

    app.add_middleware(PredictFastPath, handle=handle_predict)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        """200 while the server takes requests (HEAD too, as health checkers send); 503 once a batch worker
        thread has stopped (a bug: its share of the requests would wait forever) or while a model call has
        run past the batch timeout, so that a supervisor restarts the server."""
        problem = batcher.problem()
        if problem:
            return _json(503, {"status": "unhealthy", "detail": problem})
        return _json(200, {"status": "ok", **(info or {}), "text_pairs": text_pairs})

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics_route() -> Response:
        """Counters and histograms in the Prometheus text format (HEAD: the same headers; uvicorn sends no body)."""
        return Response(metrics.render(batcher.waiting()), media_type="text/plain; version=0.0.4")

    return app


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (port 0: a free one); OztuneError when that is not possible."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OztuneError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def run_server(predict: Predict | list[Predict], sock: socket.socket, limits: ServeLimits | None = None, info: dict | None = None,
               log_level: str = "info", text_pairs: bool | None = None) -> None:
    """Serve on ``sock`` until SIGINT/SIGTERM, then stop accepting, finish the requests in flight, and return
    (``text_pairs``: whether the model was fine-tuned on text pairs, see :func:`create_app`)."""
    import uvicorn

    limits = limits or ServeLimits()
    config = uvicorn.Config(create_app(predict, limits, info, text_pairs), log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=limits.graceful_timeout_s)
    # uvicorn re-raises the stopping signal after its graceful shutdown; let that be a normal return.
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
