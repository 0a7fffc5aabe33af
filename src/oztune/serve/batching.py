"""Dynamic micro-batching: concurrent requests share one model call, in one or more worker threads.

The event loop calls :meth:`MicroBatcher.submit` and awaits the future it returns. A worker thread
(one per model replica) takes the queued requests, waiting at most ``max_wait_ms`` after the oldest one arrived for the batch
to fill up to ``max_batch_size`` texts, runs ``predict`` once on all their texts (tokenization
included, so the event loop only parses and answers HTTP; the backends sort the batch by length and
run it in forward passes of ``--forward-batch-size`` texts), and resolves every future of the batch
with one call into the loop. Under load the wait costs nothing: requests that arrive while a batch runs have already waited
longer than ``max_wait_ms`` and go into the next batch at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Predict = Callable[[list[str], "list[str] | None"], list[dict]]


class QueueFull(Exception):
    """The queue holds ``max_queue`` texts already (HTTP 503)."""


class Closed(Exception):
    """The batcher is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class _Request:
    texts: list[str]
    pairs: list[str] | None
    future: asyncio.Future
    arrived: float  # time.monotonic()
    gone: Callable[[], bool] | None  # whether the client has disconnected


class MicroBatcher:
    """Collects texts of concurrent requests into batches for ``predict``, run in worker threads.

    Args:
        predict: ``predict(texts, pairs) -> one prediction per text``, or a list of such functions (model
            replicas): one worker thread each, taking batches from the same queue.
        max_batch_size: most texts per call of ``predict`` (one request with more is run alone).
        max_wait_ms: longest wait, counted from the oldest queued request, for a batch to fill.
        max_queue: most texts waiting; :meth:`submit` raises :class:`QueueFull` beyond it.
        on_batch: called as ``on_batch(texts, seconds)`` after each batch (metrics), in the worker thread.
    """

    def __init__(self, predict: Predict | list[Predict], max_batch_size: int = 64, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, on_batch: Callable[[int, float], None] | None = None):
        self.predicts = list(predict) if isinstance(predict, (list, tuple)) else [predict]
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch
        self.pending = 0  # texts queued, not yet taken by a worker
        self._idle = 0  # workers waiting for a batch
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the workers; futures are resolved in ``loop`` (the server's event loop)."""
        self._loop = loop
        self._threads = [threading.Thread(target=self._work, args=(p,), name=f"oztune-batcher-{i}", daemon=True)
                         for i, p in enumerate(self.predicts)]
        for t in self._threads:
            t.start()

    def submit(self, texts: list[str], pairs: list[str] | None = None,
               gone: Callable[[], bool] | None = None) -> asyncio.Future:
        """Queue one request; the future resolves to its predictions. Call from the event loop.

        Args:
            texts: the texts to classify.
            pairs: their text pairs, or None.
            gone: whether the client has disconnected; checked as the request is taken for a batch, and a
                request whose client is gone is skipped and its future cancelled.
        """
        future = self._loop.create_future()
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if self.pending + len(texts) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.pending} of {self.max_queue} texts waiting)")
            self._queue.append(_Request(texts, pairs, future, time.monotonic(), gone))
            self.pending += len(texts)
            # Wake the worker only when it may be waiting for this: a first request, or a full batch.
            if len(self._queue) == 1 or self.pending >= self.max_batch_size:
                self._cond.notify()
        return future

    def alive(self) -> bool:
        """True while every worker thread runs (or before start, or once closed)."""
        return self._closed or all(t.is_alive() for t in self._threads)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the workers finish the queued ones, and wait for them."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _take(self) -> list[_Request] | None:
        """Block until a batch is ready and take it; None once closed and drained.

        With several workers, the queued texts are shared out among the idle ones (each takes at most its
        share), so that replicas run side by side instead of one taking every request in turn.
        """
        with self._cond:
            self._idle += 1
            try:
                while True:  # until a batch of requests still waited for is taken
                    while True:  # checked again after every wait: another worker may have taken the queue
                        while not self._queue:
                            if self._closed:
                                return None
                            self._cond.wait()
                        left = self._queue[0].arrived + self.max_wait - time.monotonic()
                        if self.pending >= self.max_batch_size or self._closed or left <= 0:
                            break
                        self._cond.wait(left)
                    share = min(self.max_batch_size, -(-self.pending // self._idle))  # ceil(pending / idle workers)
                    batch, n = [], 0
                    while self._queue and (not batch or n + len(self._queue[0].texts) <= share):
                        r = self._queue.popleft()
                        self.pending -= len(r.texts)
                        # A future already done was cancelled: uvicorn's graceful shutdown ran out of time and
                        # the request has been answered; running it would only delay the shutdown further.
                        if r.future.done():
                            continue
                        if r.gone is not None and r.gone():  # nobody waits for the answer: run the others
                            self._loop.call_soon_threadsafe(r.future.cancel)  # (the server counts it, 499)
                            continue
                        batch.append(r)
                        n += len(r.texts)
                    if self._queue:
                        self._cond.notify()  # the rest is another idle worker's
                    if batch:
                        return batch
            finally:
                self._idle -= 1

    def _work(self, predict: Predict) -> None:
        while (batch := self._take()) is not None:
            start = time.perf_counter()
            results: list = []
            # Requests with and without text pairs cannot share a tokenizer call.
            for with_pairs in (False, True):
                group = [r for r in batch if (r.pairs is not None) == with_pairs]
                if group:
                    results += zip(group, self._run(predict, group))
            if self.on_batch is not None:
                self.on_batch(sum(len(r.texts) for r in batch), time.perf_counter() - start)
            try:
                self._loop.call_soon_threadsafe(_resolve, results)
            except RuntimeError:  # the event loop is closed: the server stopped while this batch ran, after its
                return  # graceful timeout, and the batch's requests have been answered 503; nothing waits here

    @staticmethod
    def _run(predict: Predict, group: list[_Request]) -> list:
        """Predictions per request of the group, or the exception for each when ``predict`` fails."""
        texts = [t for r in group for t in r.texts]
        pairs = [p for r in group for p in r.pairs] if group[0].pairs is not None else None
        try:
            preds = predict(texts, pairs)
        except Exception as e:  # the model failed: every request of the batch gets the error
            return [e] * len(group)
        out, i = [], 0
        for r in group:
            out.append(preds[i:i + len(r.texts)])
            i += len(r.texts)
        return out


def _resolve(results: list[tuple[_Request, object]]) -> None:
    """Hand each request its predictions (or exception); runs in the event loop."""
    for request, result in results:
        if request.future.done():  # the client went away
            continue
        if isinstance(result, Exception):
            request.future.set_exception(result)
        else:
            request.future.set_result(result)
