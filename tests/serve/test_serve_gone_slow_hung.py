"""`oztune serve` against clients that leave or stall and a model that hangs: a client that disconnects before
its answer (499, its queued texts not run), a request body that never finishes (408 after --body-timeout-s),
a model call that never returns (504, /health 503, later requests 503 instead of waiting forever; a model
process is replaced). Each test failed before its fix."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from servehelp import GatedModel, save_tiny, serving, tiny_classifier

from oztune.serve.server import ServeLimits, create_app


def eventually(condition, timeout: float = 5) -> bool:
    """Whether ``condition()`` becomes true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def counted(url: str, status: int) -> int:
    m = re.search(rf'^oztune_requests_total{{status="{status}"}} (\d+)$', httpx.get(f"{url}/metrics").text, re.M)
    return int(m.group(1)) if m else 0


def raw_request(url: str, body: bytes, length: int | None = None) -> socket.socket:
    """A connection that has sent a POST /predict with ``body`` (of a declared ``length``, by default its own)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of the answer, read until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_a_client_that_disconnects_while_queued_is_counted_499_and_its_texts_are_not_run():
    # Before: counted as a 200 (uvicorn drops the answer to a closed connection without a word), and its texts
    # were run in the next batch all the same.
    model = GatedModel()
    app = create_app(model, ServeLimits(max_batch_size=8, max_wait_ms=0))
    with serving(app) as url, httpx.Client(base_url=url, timeout=20) as c:
        first = threading.Thread(target=c.post, args=("/predict",), kwargs={"json": {"texts": ["first"]}})
        first.start()
        assert model.entered.wait(10)  # the model is busy with the first request
        gone = raw_request(url, b'{"texts": ["gone", "also gone"]}')
        assert eventually(lambda: app.state.batcher.pending == 2), "the request was not queued"
        gone.close()
        seen = getattr(app.state.batcher._queue[0], "gone", None) or (lambda: True)  # (before the fix: no check)
        assert eventually(seen), "the server did not see the client leave"
        kept = threading.Thread(target=c.post, args=("/predict",), kwargs={"json": {"texts": ["kept"]}})
        kept.start()
        assert eventually(lambda: app.state.batcher.pending == 3)  # queued behind the abandoned request
        model.gate.set()
        first.join(20)
        kept.join(20)
        assert model.batches == [1, 1]  # "first", then "kept" alone: the abandoned texts never reach the model
        assert counted(url, 200) == 2 and counted(url, 499) == 1


def queue_texts(url: str) -> int:
    return int(re.search(r"^oztune_queue_texts (\d+)$", httpx.get(f"{url}/metrics").text, re.M).group(1))


def test_requests_of_clients_gone_do_not_fill_the_queue_for_live_ones():
    # Before: an abandoned request counted toward --max-queue until a worker took it, so while the model was
    # busy a queue full of them answered live clients 503 "the queue is full".
    model = GatedModel()
    app = create_app(model, ServeLimits(max_batch_size=8, max_wait_ms=0, max_queue=2))
    with serving(app) as url, ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(httpx.post, f"{url}/predict", json={"texts": ["first"]}, timeout=20)
            assert model.entered.wait(10)  # the model is busy with the first request
            gone = raw_request(url, b'{"texts": ["gone", "also gone"]}')
            assert eventually(lambda: app.state.batcher.pending == 2), "the request was not queued"  # queue full
            gone.close()
            assert eventually(app.state.batcher._queue[0].gone), "the server did not see the client leave"
            live = pool.submit(httpx.post, f"{url}/predict", json={"texts": ["live"]}, timeout=20)
            assert eventually(lambda: counted(url, 499) == 1 or live.done()), "the abandoned request was not dropped"
            assert not live.done(), live.result().text  # queued, not refused
            assert queue_texts(url) == 1  # "live" only
        finally:
            model.gate.set()  # (on a failure too: the server's shutdown would wait for the gate)
        assert first.result().status_code == 200 and live.result().status_code == 200
        assert model.batches == [1, 1]  # "first", then "live": the abandoned texts never reach the model
        assert (counted(url, 200), counted(url, 499), counted(url, 503)) == (2, 1, 0), "counted twice or not at all"
        assert queue_texts(url) == 0


def test_texts_of_clients_gone_do_not_count_as_waiting_in_the_queue():
    # Before: oztune_queue_texts counted an abandoned request's texts until a worker took it (or a full queue
    # dropped it), though they will never be run.
    model = GatedModel()
    app = create_app(model, ServeLimits(max_batch_size=8, max_wait_ms=0))  # (the queue far from full)
    with serving(app) as url, ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(httpx.post, f"{url}/predict", json={"texts": ["first"]}, timeout=20)
            assert model.entered.wait(10)  # the model is busy with the first request
            gone = raw_request(url, b'{"texts": ["gone", "also gone"]}')
            assert eventually(lambda: app.state.batcher.pending == 2), "the request was not queued"
            live = pool.submit(httpx.post, f"{url}/predict", json={"texts": ["live"]}, timeout=20)
            assert eventually(lambda: app.state.batcher.pending == 3), "the live request was not queued"
            assert queue_texts(url) == 3  # while their clients wait, all count
            gone.close()
            assert eventually(app.state.batcher._queue[0].gone), "the server did not see the client leave"
            assert queue_texts(url) == 1  # "live" only
        finally:
            model.gate.set()  # (on a failure too: the server's shutdown would wait for the gate)
        assert first.result().status_code == 200 and live.result().status_code == 200
        assert eventually(lambda: counted(url, 499) == 1), "the abandoned request was not counted 499"
        assert model.batches == [1, 1]
        assert queue_texts(url) == 0


def texts_classified(url: str) -> int:
    return int(re.search(r"^oztune_texts_total (\d+)$", httpx.get(f"{url}/metrics").text, re.M).group(1))


def test_texts_classified_for_a_client_that_left_before_its_answer_count_as_classified():
    # Before: oztune_texts_total ("Texts classified") counted the texts of 200 answers only, so texts the
    # model did classify, for a client that then left (499), were missing from it.
    model = GatedModel()
    app = create_app(model, ServeLimits(max_batch_size=8, max_wait_ms=0))  # (batch timeout 300 s: _running set)
    with serving(app) as url:
        try:
            gone = raw_request(url, b'{"texts": ["gone", "also gone"]}')
            assert model.entered.wait(10)  # its texts are in the model
            gone.close()
            assert eventually(app.state.batcher._running[0][1][0].gone), "the server did not see the client leave"
        finally:
            model.gate.set()
        assert eventually(lambda: counted(url, 499) == 1), "the request was not counted 499"
        assert texts_classified(url) == 2
        assert httpx.post(f"{url}/predict", json={"texts": ["after"]}, timeout=20).status_code == 200
        assert texts_classified(url) == 3
        assert model.batches == [2, 1]


@contextmanager
def logged_errors(name: str = "uvicorn.error"):
    """The messages of the errors logged to logger ``name`` meanwhile (uvicorn's do not propagate to pytest's;
    enter once uvicorn has configured its logging, which removes handlers)."""
    messages: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger(name).addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger(name).removeHandler(handler)


def test_a_client_that_pipelines_two_requests_and_disconnects_is_seen_gone():
    # HTTP/1.1 pipelining: uvicorn (httptools) starts the second request only once the first is answered, and
    # on a lost connection it flags only the newest request as disconnected, the second, which never starts.
    # Before: the first one's client was never seen gone, so its texts were run and it was counted a 200.
    model = GatedModel()
    app = create_app(model, ServeLimits(max_batch_size=8, max_wait_ms=0))
    with serving(app) as url, logged_errors() as errors, ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(httpx.post, f"{url}/predict", json={"texts": ["first"]}, timeout=20)
            assert model.entered.wait(10)  # the model is busy with the first request
            host, port = url.removeprefix("http://").split(":")
            client = socket.create_connection((host, int(port)), timeout=20)
            requests = [(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n").encode() + body
                        for body in (b'{"texts": ["one", "two"]}', b'{"texts": ["three"]}')]
            client.sendall(b"".join(requests))  # both at once, on one connection
            assert eventually(lambda: app.state.batcher.pending == 2), "the first pipelined request was not queued"
            client.close()
            assert eventually(app.state.batcher._queue[0].gone), "the server did not see the client leave"
        finally:
            model.gate.set()
        assert first.result().status_code == 200
        assert eventually(lambda: counted(url, 499) == 1), "the abandoned request was not counted 499"
        assert httpx.post(f"{url}/predict", json={"texts": ["after"]}, timeout=20).status_code == 200
        # Neither pipelined request reached the model; the second was never started, so it is not counted at all.
        assert model.batches == [1, 1]
        assert (counted(url, 200), counted(url, 499)) == (2, 1)
    # Before, also: "Exception in ASGI application", as uvloop refused to write the answer to the closed connection.
    assert errors == []


def test_a_client_that_disconnects_while_sending_its_body_is_counted_499_not_400():
    with serving(create_app(GatedModel(gated=False))) as url:
        raw_request(url, b'{"texts": [', length=100).close()
        assert eventually(lambda: counted(url, 499) == 1), "the disconnect was not counted as 499"
        assert counted(url, 400) == 0


@pytest.mark.parametrize("sent", [b"", b'{"texts": ["a'], ids=["no body", "part of the body"])
def test_a_body_that_does_not_arrive_in_time_gets_a_json_408_and_the_connection_is_closed(sent):
    # Before: the request (and its connection) waited for the rest of the body forever.
    limits = ServeLimits(body_timeout_s=0.3)
    with serving(create_app(GatedModel(gated=False), limits)) as url:
        slow = raw_request(url, sent, length=100)
        start = time.monotonic()
        # Meanwhile other clients are answered as usual.
        assert httpx.post(f"{url}/predict", json={"texts": ["a"]}, timeout=20).status_code == 200
        head, body = read_response(slow)  # returns once the server closes the connection
        waited = time.monotonic() - start
        assert head.startswith(b"HTTP/1.1 408 "), head
        assert b"content-type: application/json" in head.lower()
        assert "did not arrive within 0.3 s" in json.loads(body)["detail"]
        assert 0.25 < waited < 5
        assert counted(url, 408) == 1


def test_a_hung_model_call_gets_504_then_health_503_and_later_requests_503_until_it_returns():
    # Before: the first request waited forever, and so did every request after it; /health said ok.
    model = GatedModel()
    app = create_app(model, ServeLimits(max_wait_ms=0, batch_timeout_s=0.3))
    with serving(app) as url, httpx.Client(base_url=url, timeout=20) as c:
        r = c.post("/predict", json={"texts": ["hangs"]})
        assert r.status_code == 504 and "the model timed out" in r.json()["detail"], r.text
        h = c.get("/health")
        assert h.status_code == 503 and "over 0.3 s" in h.json()["detail"], h.text
        r = c.post("/predict", json={"texts": ["later"]})
        assert r.status_code == 503 and "not responding" in r.json()["detail"], r.text
        model.gate.set()  # the call returns after all: the server serves again
        assert eventually(lambda: c.get("/health").status_code == 200)
        r = c.post("/predict", json={"texts": ["after"]})
        assert r.status_code == 200 and r.json()["predictions"][0]["score"] == 5.0
        assert counted(url, 504) == 1 and counted(url, 503) == 1
        assert texts_classified(url) == 2  # "after", and "hangs": classified in the end, though answered 504
    assert model.batches == [1, 1]  # "later" was refused, not run


def test_a_request_queued_behind_a_hung_call_gets_503_when_the_call_times_out():
    """The request waiting in the queue when the only replica's call times out is answered 503 (the server is
    not responding: try later or elsewhere), not 500 (a failure of its own texts). It is seen queued before the
    timeout: one sent after it is refused on arrival (503 too, by another path), which would not test this."""
    model = GatedModel()
    app = create_app(model, ServeLimits(max_batch_size=1, max_wait_ms=0, batch_timeout_s=1.5))
    with serving(app) as url, ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(httpx.post, f"{url}/predict", json={"texts": ["a"]}, timeout=20)
            assert model.entered.wait(10)
            queued = pool.submit(httpx.post, f"{url}/predict", json={"texts": ["queued"]}, timeout=20)
            assert eventually(lambda: app.state.batcher.pending == 1), "not queued before the call timed out"
            assert first.result().status_code == 504
            r = queued.result()
            assert r.status_code == 503 and "not responding" in r.json()["detail"], r.text
        finally:
            model.gate.set()  # (on a failure too: the server's shutdown would wait for the hung call)
    assert model.batches == [1]


def test_with_one_replica_hung_the_others_keep_serving_and_health_says_so():
    hung, ok = GatedModel(), GatedModel()
    # The replica that works holds its first request until the other has one: a free replica takes whatever
    # is queued, so an ungated one could answer all four before the other's thread woke (3 runs in 60 under
    # load, once in CI). The timeout leaves it time for that under load.
    ok.gate = hung.entered
    app = create_app([hung, ok], ServeLimits(max_batch_size=1, max_wait_ms=0, batch_timeout_s=2.0))
    with serving(app) as url, httpx.Client(base_url=url, timeout=20) as c, ThreadPoolExecutor(4) as pool:
        try:
            answers = [pool.submit(c.post, "/predict", json={"texts": [f"t{i}"]}) for i in range(4)]
            assert hung.entered.wait(10)  # one request reached the replica that hangs (max_batch_size=1: one)
            assert sorted(f.result().status_code for f in answers) == [200, 200, 200, 504]
            h = c.get("/health")
            assert h.status_code == 503 and "over 2 s" in h.json()["detail"]
            assert c.post("/predict", json={"texts": ["more"]}).status_code == 200
        finally:
            hung.gate.set()  # (on a failure too: the server's shutdown would wait for the hung call)
        assert eventually(lambda: c.get("/health").status_code == 200)


def test_a_worker_process_that_hangs_is_killed_and_replaced(tmp_path):
    from oztune.serve.backends import WorkerProcess
    from oztune.serve.batching import ModelTimeout

    model_dir = save_tiny(tiny_classifier(), tmp_path / "model")
    worker = WorkerProcess(str(model_dir), threads=1, timeout=2.0)
    try:
        want = worker.predict(["good movie", "bad movie"])
        first = worker.pid
        os.kill(first, signal.SIGSTOP)  # hung, not dead
        start = time.monotonic()
        with pytest.raises(ModelTimeout, match="took over 2 s"):
            worker.predict(["good movie"])
        assert time.monotonic() - start < 60
        assert worker.pid != first and worker.restarts == 1
        assert worker.predict(["good movie", "bad movie"]) == want  # the new process serves
    finally:
        worker.close()


@pytest.mark.parametrize("option", ["--body-timeout-s", "--batch-timeout-s"])
def test_serve_cli_checks_the_timeouts(tmp_path, capsys, option):
    from oztune.cli import main

    assert main(["serve", "--model", str(tmp_path), option, "inf"]) == 2
    assert f"{option} inf: expected a number from 0 to 86,400" in capsys.readouterr().err
