"""The micro-batcher on a gated stub model: batches capped at max_batch_size, requests with and without text
pairs run as separate calls, and a request after the batcher has closed answered 503, not 500."""

from __future__ import annotations

import asyncio

import httpx
from servehelp import GatedModel, serving

from oztune.serve.batching import MicroBatcher
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


def test_a_batch_is_ready_once_as_many_texts_are_queued_as_the_workers_last_batch_held():
    """The clients a batch answered send again: once as many texts are back as that batch held, waiting out
    max_wait_ms only left the replica idle (about a tenth of the cores at 32 clients). Fewer still wait."""
    calls: list[list[str]] = []

    def model(texts, pairs=None):
        calls.append(list(texts))
        return [{"label": "x", "score": 1.0} for _ in texts]

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
