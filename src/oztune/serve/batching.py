"""Dynamic micro-batching: concurrent requests share one model call in one worker thread.

The event loop calls :meth:`MicroBatcher.submit` and awaits the future it returns. The worker thread
takes the queued requests, waiting at most ``max_wait_ms`` after the oldest one arrived for the batch
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


class MicroBatcher:
    """Collects texts of concurrent requests into batches for ``predict``, run in one worker thread.

    Args:
        predict: ``predict(texts, pairs) -> one prediction per text``; called from the worker thread.
        max_batch_size: most texts per call of ``predict`` (one request with more is run alone).
        max_wait_ms: longest wait, counted from the oldest queued request, for a batch to fill.
        max_queue: most texts waiting; :meth:`submit` raises :class:`QueueFull` beyond it.
        on_batch: called as ``on_batch(texts, seconds)`` after each batch (metrics), in the worker thread.
    """

    def __init__(self, predict: Predict, max_batch_size: int = 64, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, on_batch: Callable[[int, float], None] | None = None):
        self.predict, self.max_batch_size, self.max_queue = predict, max_batch_size, max_queue
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch
        self.pending = 0  # texts queued, not yet taken by the worker
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the worker; futures are resolved in ``loop`` (the server's event loop)."""
        self._loop = loop
        self._thread = threading.Thread(target=self._work, name="oztune-batcher", daemon=True)
        self._thread.start()

    def submit(self, texts: list[str], pairs: list[str] | None = None) -> asyncio.Future:
        """Queue one request; the future resolves to its predictions. Call from the event loop."""
        future = self._loop.create_future()
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if self.pending + len(texts) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.pending} of {self.max_queue} texts waiting)")
            self._queue.append(_Request(texts, pairs, future, time.monotonic()))
            self.pending += len(texts)
            # Wake the worker only when it may be waiting for this: a first request, or a full batch.
            if len(self._queue) == 1 or self.pending >= self.max_batch_size:
                self._cond.notify()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the worker finish the queued ones, and wait for it."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _take(self) -> list[_Request] | None:
        """Block until a batch is ready and take it; None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0].arrived + self.max_wait
            while self.pending < self.max_batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [self._queue.popleft()]
            n = len(batch[0].texts)
            while self._queue and n + len(self._queue[0].texts) <= self.max_batch_size:
                n += len(self._queue[0].texts)
                batch.append(self._queue.popleft())
            self.pending -= n
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            start = time.perf_counter()
            results: list = []
            # Requests with and without text pairs cannot share a tokenizer call.
            for with_pairs in (False, True):
                group = [r for r in batch if (r.pairs is not None) == with_pairs]
                if group:
                    results += zip(group, self._run(group))
            if self.on_batch is not None:
                self.on_batch(sum(len(r.texts) for r in batch), time.perf_counter() - start)
            self._loop.call_soon_threadsafe(_resolve, results)

    def _run(self, group: list[_Request]) -> list:
        """Predictions per request of the group, or the exception for each when ``predict`` fails."""
        texts = [t for r in group for t in r.texts]
        pairs = [p for r in group for p in r.pairs] if group[0].pairs is not None else None
        try:
            preds = self.predict(texts, pairs)
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
