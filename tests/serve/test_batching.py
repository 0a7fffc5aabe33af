"""The micro-batcher on a gated stub model: batches capped at max_batch_size, requests with and without text
pairs run as separate calls, and a request after the batcher has closed answered 503, not 500."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from servehelp import GatedModel, serving

from oztune.serve.batching import MicroBatcher, ModelTimeout, Stalled
from oztune.serve.server import create_app


class PairedModel(GatedModel):
    """The gated stub, recording the pairs of each call and scoring a text by its length plus its pair's."""

    def __init__(self):
        super().__init__()
        self.pairs: list[list[str] | None] = []

    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        self.pairs.append(pairs)
        super().__call__(texts, pairs)  # records the batch size, waits for the gate
        return [{"label": "len", "score": float(len(t) + len(p))} for t, p in zip(texts, pairs or [""] * len(texts))]


def queued_behind_a_busy_worker(model: GatedModel, requests: list[tuple[list[str], list[str] | None]],
                                **kw) -> list[list[dict]]:
    """Submit one request ("first") and, while ``model`` holds it at the gate, queue ``requests``; then open
    the gate. Returns the predictions of each of ``requests``."""

    async def run() -> list[list[dict]]:
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(model, max_wait_ms=0, **kw)
        batcher.start(loop)
        try:
            first = batcher.submit(["first"])
            assert await loop.run_in_executor(None, model.entered.wait, 10)
            futures = [batcher.submit(texts, pairs) for texts, pairs in requests]
            assert batcher.pending == sum(len(texts) for texts, _ in requests)  # all queued, none taken yet
            model.gate.set()
            return (await asyncio.wait_for(asyncio.gather(first, *futures), 20))[1:]
        finally:
            model.gate.set()
            await loop.run_in_executor(None, batcher.close, 10)

    return asyncio.run(run())


def test_queued_requests_are_run_in_batches_of_at_most_max_batch_size():
    model = GatedModel()
    texts = ["x" * (i + 1) for i in range(10)]  # the stub scores each text by its length
    got = queued_behind_a_busy_worker(model, [([t], None) for t in texts], max_batch_size=4)
    assert got == [[{"label": "len", "score": len(t)}] for t in texts]
    assert model.batches[0] == 1 and all(n <= 4 for n in model.batches[1:]), model.batches
    assert model.batches == [1, 4, 4, 2]


def test_requests_with_and_without_text_pairs_are_separate_model_calls():
    model = PairedModel()
    got = queued_behind_a_busy_worker(model, [(["abc"], None), (["de", "f"], ["ghij", "k"])], max_batch_size=64)
    assert got == [[{"label": "len", "score": 3}], [{"label": "len", "score": 6}, {"label": "len", "score": 2}]]
    assert model.pairs[0] is None and model.batches[0] == 1  # the first request, alone
    calls = sorted(zip(model.batches[1:], model.pairs[1:]), key=lambda c: c[1] is not None)
    assert calls == [(1, None), (2, ["ghij", "k"])]


def test_a_request_after_the_batcher_has_closed_gets_503_saying_the_server_is_shutting_down():
    app = create_app(GatedModel(gated=False))
    with serving(app) as url, httpx.Client(base_url=url, timeout=20) as c:
        assert c.post("/predict", json={"texts": ["a"]}).status_code == 200
        app.state.batcher.close(10)  # as on shutdown, after uvicorn let the requests in flight finish
        r = c.post("/predict", json={"texts": ["b"]})
        assert r.status_code == 503, r.text
        assert "shutting down" in r.json()["detail"]
        assert 'oztune_requests_total{status="503"} 1' in c.get("/metrics").text


def recording_model():
    """A model that answers every text with label x and records each call's texts: (calls, model)."""
    calls: list[list[str]] = []

    def model(texts, pairs=None):
        calls.append(list(texts))
        return [{"label": "x", "score": 1.0} for _ in texts]

    return calls, model


def test_a_batch_is_ready_once_as_many_texts_are_queued_as_the_workers_last_batch_held():
    """The clients a batch answered send again: once as many texts are back as that batch held, waiting out
    max_wait_ms only left the replica idle (about a tenth of the cores at 32 clients). Fewer still wait."""
    calls, model = recording_model()

    async def run():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(model, max_batch_size=64, max_wait_ms=1)
        batcher.start(loop)
        try:
            await asyncio.wait_for(asyncio.gather(batcher.submit(["a", "b"]), batcher.submit(["c"])), 10)
            assert calls == [["a", "b", "c"]]  # (closed by max_wait: 1 ms)
            batcher.max_wait = 600  # from here on only the rule under test closes a batch within the test's time
            first = batcher.submit(["d", "e"])
            await asyncio.sleep(0.3)
            assert not first.done() and len(calls) == 1  # 2 texts of 3: the batch waits for more
            await asyncio.wait_for(asyncio.gather(first, batcher.submit(["f"])), 10)  # 3 of 3: it runs at once
            assert calls == [["a", "b", "c"], ["d", "e", "f"]]
        finally:
            batcher.max_wait = 0
            await loop.run_in_executor(None, batcher.close, 10)

    asyncio.run(run())


def test_every_workers_ready_point_wakes_the_waiting_workers():
    """Each worker's batch is ready at its own previous batch's size: reaching any of them wakes the waiting
    workers (only the least did: a worker with the larger one slept to max_wait_ms, as before the rule)."""
    loop = asyncio.new_event_loop()
    try:
        batcher = MicroBatcher([lambda t, p=None: [], lambda t, p=None: []], max_batch_size=64, max_wait_ms=5)
        batcher._loop = loop  # (submit only: no worker runs, the wake-ups are counted)
        batcher._ready = [3, 2]
        woken = []
        notify_all = batcher._cond.notify_all
        batcher._cond.notify_all = lambda: (woken.append(batcher.pending), notify_all())
        for text in "abcd":
            batcher.submit([text])
        assert woken == [2, 3]
    finally:
        loop.close()


def test_a_full_batch_runs_at_once_after_a_batch_of_one_request_over_max_batch_size():
    """A request of more texts than max_batch_size runs alone; the worker's next batch is still ready at
    max_batch_size texts (not at that oversized batch's size), and the request that fills it wakes the worker."""
    calls, model = recording_model()

    async def run():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(model, max_batch_size=4, max_wait_ms=0)
        batcher.start(loop)
        try:
            await asyncio.wait_for(batcher.submit(list("abcdef")), 10)  # 6 texts > 4: run alone
            assert calls == [list("abcdef")]
            batcher.max_wait = 600  # from here on only a full batch closes a batch within the test's time
            futures = [batcher.submit([t]) for t in "ghi"]
            await asyncio.sleep(0.3)
            assert len(calls) == 1 and not any(f.done() for f in futures)  # 3 texts of 4: the batch waits
            futures.append(batcher.submit(["j"]))  # 4 of 4: it runs at once
            await asyncio.wait_for(asyncio.gather(*futures), 10)
            assert calls == [list("abcdef"), list("ghij")]
        finally:
            batcher.max_wait = 0
            with batcher._cond:
                batcher._cond.notify_all()
            await loop.run_in_executor(None, batcher.close, 10)

    asyncio.run(run())


def test_one_dead_worker_of_several_is_a_problem(monkeypatch):
    """With replicas, a single worker thread that died leaves the batcher short of a replica: alive() is False
    and problem() says so, although the other workers still run."""

    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's traceback: expected here
    loop = asyncio.new_event_loop()
    batcher = MicroBatcher([lambda t, p=None: [], lambda t, p=None: []])
    take = batcher._take

    def broken_for_worker_1(worker):
        if worker == 1:
            raise RuntimeError("a bug in the batcher")
        return take(worker)

    batcher._take = broken_for_worker_1
    try:
        batcher.start(loop)
        deadline = time.monotonic() + 10
        while batcher._threads[1].is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not batcher._threads[1].is_alive() and batcher._threads[0].is_alive()
        assert not batcher.alive()
        assert batcher.problem() == "a batch worker thread has stopped"
    finally:
        batcher.close(10)
        loop.close()


def hanging_model():
    """A model whose calls hang until the event is set (at most 20 s): (event, model)."""
    gate = threading.Event()

    def hangs(texts, pairs=None):
        gate.wait(20)
        return [{"label": "x", "score": 1.0} for _ in texts]

    return gate, hangs


def test_a_hung_call_times_out_soon_after_a_short_batch_timeout():
    """The deadline check runs every batch_timeout / 4 (at least once a second): a call hung past a 0.2 s
    timeout is answered well before a second is up (a check once a second would answer at 1 s at best)."""

    gate, hangs = hanging_model()

    async def run():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(hangs, max_wait_ms=0, batch_timeout_s=0.2)
        batcher.start(loop)
        try:
            start = time.monotonic()
            with pytest.raises(ModelTimeout):
                await asyncio.wait_for(batcher.submit(["a"]), 10)
            assert 0.2 <= time.monotonic() - start < 0.95  # (a check once a second: 1 s at best)
        finally:
            gate.set()
            await loop.run_in_executor(None, batcher.close, 10)

    asyncio.run(run())


def test_the_requests_failed_as_stalled_leave_the_queue_empty_for_later_ones(capsys):
    """The queued requests answered Stalled when the only replica hangs no longer count toward max_queue: once
    the call returns, a new request is taken, not refused as if the queue were still full. The log says which
    requests got what (it said "their requests get 504" of the queued ones too, which get 503)."""

    gate, hangs = hanging_model()

    async def run():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(hangs, max_batch_size=1, max_wait_ms=0, max_queue=1, batch_timeout_s=0.2)
        batcher.start(loop)
        try:
            first = batcher.submit(["a"])
            while batcher.pending:  # the worker takes it, and hangs
                await asyncio.sleep(0.01)
            queued = batcher.submit(["b"])
            with pytest.raises(ModelTimeout):
                await asyncio.wait_for(first, 10)
            with pytest.raises(Stalled):
                await asyncio.wait_for(queued, 10)
            assert batcher.pending == 0
            gate.set()  # the call returns: the replica serves again
            while batcher.problem() is not None:
                await asyncio.sleep(0.01)
            assert await asyncio.wait_for(batcher.submit(["c"]), 10) == [{"label": "x", "score": 1.0}]
        finally:
            gate.set()
            await loop.run_in_executor(None, batcher.close, 10)

    asyncio.run(run())
    assert ("oztune: 1 of 1 model replicas have been in one call for over 0.2 s; 1 request(s) of the hung call(s) "
            "get 504, 1 queued request(s) get 503 (no replica is left to take them)") in capsys.readouterr().err


async def idle_replicas(models: list, **kw) -> MicroBatcher:
    """A batcher over ``models`` (replicas), started in the running loop, once every worker waits for work."""
    batcher = MicroBatcher(models, **kw)
    batcher.start(asyncio.get_running_loop())
    deadline = time.monotonic() + 10
    while batcher._idle < len(models) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return batcher


def test_idle_replicas_share_out_an_odd_queue_rounding_up():
    """Five texts for two idle replicas: the first takes its share rounded up (3), leaving 2 for the other."""

    a, b = GatedModel(), GatedModel()

    async def run():
        loop = asyncio.get_running_loop()
        batcher = await idle_replicas([a, b], max_batch_size=5, max_wait_ms=600_000)
        try:
            deadline = time.monotonic() + 10
            futures = [batcher.submit([t]) for t in "abcde"]  # a full batch: the first worker free takes its share
            while not (a.entered.is_set() or b.entered.is_set()) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            first, other = (a, b) if a.entered.is_set() else (b, a)
            assert first.batches == [3] and batcher.pending == 2 and not other.entered.is_set()
        finally:
            a.gate.set()
            b.gate.set()
            batcher.max_wait = 0
            with batcher._cond:
                batcher._cond.notify_all()
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        await loop.run_in_executor(None, batcher.close, 10)
        assert sum(a.batches + b.batches) == 5  # every text run once

    asyncio.run(run())


def test_what_one_replica_leaves_of_the_queue_wakes_another_idle_one():
    """Two requests for two idle replicas: the one woken takes its share, one request, and wakes the other for
    the rest (which otherwise waited, with nothing more arriving, until the busy replica was free again)."""

    a, b = GatedModel(), GatedModel()

    async def run():
        loop = asyncio.get_running_loop()
        batcher = await idle_replicas([a, b], max_batch_size=64, max_wait_ms=0)
        try:
            with batcher._cond:  # both queued before either worker looks
                futures = [batcher.submit(["x"]), batcher.submit(["y"])]
            assert await loop.run_in_executor(None, a.entered.wait, 10)
            assert await loop.run_in_executor(None, b.entered.wait, 10)
            assert a.batches == [1] and b.batches == [1]  # side by side
        finally:
            a.gate.set()
            b.gate.set()
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        await loop.run_in_executor(None, batcher.close, 10)

    asyncio.run(run())


def test_each_request_of_a_batch_gets_the_predictions_of_its_own_texts():
    model = GatedModel()
    requests = [(["a", "bb"], None), (["ccc", "dddd", "eeeee"], None), (["ffffff"], None)]
    got = queued_behind_a_busy_worker(model, requests)
    assert model.batches == [1, 6]  # the three requests in one call
    assert got == [[{"label": "len", "score": len(t)} for t in texts] for texts, _ in requests]


def test_one_hung_replica_of_two_leaves_the_queue_to_the_other():
    """Queued requests are failed as Stalled only once every replica is stuck: with one of two past its deadline
    (set by hand here, not waited for), the request queued behind the busy other replica stays queued and is
    run when that replica is free."""

    a, b = GatedModel(), GatedModel()

    async def run():
        loop = asyncio.get_running_loop()
        batcher = await idle_replicas([a, b], max_batch_size=1, max_wait_ms=0, batch_timeout_s=100)
        try:
            futures = [batcher.submit(["x"]), batcher.submit(["y"])]
            assert await loop.run_in_executor(None, a.entered.wait, 10)
            assert await loop.run_in_executor(None, b.entered.wait, 10)
            queued = batcher.submit(["zzz"])
            assert batcher.pending == 1  # both replicas busy
            with batcher._cond:
                hung = batcher._running[0][1]
                batcher._running[0] = (0.0, hung)  # replica 0 is past its deadline
            batcher._check_deadlines()
            with pytest.raises(ModelTimeout):
                await hung[0].future
            assert not queued.done() and batcher.pending == 1
            assert batcher.problem() == "1 of 2 model replicas have been in one call for over 100 s"
            b.gate.set()  # replica 1 returns and takes the queued request
            assert await asyncio.wait_for(queued, 10) == [{"label": "len", "score": 3.0}]
        finally:
            a.gate.set()
            b.gate.set()
        await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
        await loop.run_in_executor(None, batcher.close, 10)

    asyncio.run(run())


def test_on_batch_counts_the_texts_of_a_batch_and_those_classified():
    """on_batch (the server's metrics) gets the batch's texts, not its requests, and as classified only the
    texts of the call that succeeded: here the text-pair call fails and the plain one does not."""
    model = GatedModel()
    seen = []

    def no_pairs(texts, pairs=None):
        if pairs is not None:
            raise RuntimeError("pairs are not supported")
        return model(texts)

    async def run():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(no_pairs, max_wait_ms=0, on_batch=lambda n, s, c: seen.append((n, c)))
        batcher.start(loop)
        try:
            first = batcher.submit(["first"])
            assert await loop.run_in_executor(None, model.entered.wait, 10)
            plain, paired = batcher.submit(["a", "bb"]), batcher.submit(["c", "d", "e"], ["p", "q", "r"])
            model.gate.set()
            await asyncio.wait_for(asyncio.gather(first, plain), 10)
            with pytest.raises(RuntimeError, match="pairs are not supported"):
                await asyncio.wait_for(paired, 10)
        finally:
            model.gate.set()
            await loop.run_in_executor(None, batcher.close, 10)

    asyncio.run(run())
    assert model.batches == [1, 2] and seen == [(1, 1), (5, 2)]


def test_a_tuple_of_predict_functions_is_one_replica_each():
    batcher = MicroBatcher((lambda t, p=None: [], lambda t, p=None: []))
    assert len(batcher.predicts) == 2 and all(callable(p) for p in batcher.predicts)


def test_a_request_that_carries_the_queue_past_a_ready_point_wakes_the_workers():
    """A worker's batch is ready at 3 texts: a request of two texts taking the queue from 2 to 4 passes that
    point without landing on it, and must still wake the waiting workers."""
    loop = asyncio.new_event_loop()
    try:
        batcher = MicroBatcher([lambda t, p=None: []], max_batch_size=64, max_wait_ms=5)
        batcher._loop = loop  # (submit only: no worker runs, the wake-ups are counted)
        batcher._ready = [3]
        woken = []
        notify_all = batcher._cond.notify_all
        batcher._cond.notify_all = lambda: (woken.append(batcher.pending), notify_all())
        batcher.submit(["a", "b"])  # the first request: wakes a worker by notify, not notify_all
        batcher.submit(["c", "d"])
        assert woken == [4]
    finally:
        loop.close()


def test_a_hung_call_is_reported_on_stderr(capsys):
    """A supervisor or an operator reading the server's log sees why requests failed."""
    gate, hangs = hanging_model()

    async def run():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(hangs, max_wait_ms=0, batch_timeout_s=0.2)
        batcher.start(loop)
        try:
            with pytest.raises(ModelTimeout):
                await asyncio.wait_for(batcher.submit(["a"]), 10)
        finally:
            gate.set()
            await loop.run_in_executor(None, batcher.close, 10)

    asyncio.run(run())
    assert "oztune: 1 of 1 model replicas have been in one call for over 0.2 s" in capsys.readouterr().err


def test_abandoned_requests_are_dropped_only_once_the_queue_is_full():
    """Checking every queued request is for a full queue only: filled exactly to max_queue, the queue keeps
    the request of a client gone (a worker skips it); one text more drops it and takes the new request."""
    loop = asyncio.new_event_loop()
    try:
        batcher = MicroBatcher([lambda t, p=None: []], max_queue=2)
        batcher._loop = loop  # (submit only: no worker runs)
        abandoned = batcher.submit(["a"], gone=lambda: True)
        batcher.submit(["b"])
        assert batcher.pending == 2 and not abandoned.cancelled()
        batcher.submit(["c"])
        assert batcher.pending == 2 and abandoned.cancelled()
    finally:
        loop.close()
