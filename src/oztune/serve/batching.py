"""Dynamic micro-batching: concurrent requests share one model call, in one or more worker threads.

The event loop calls :meth:`MicroBatcher.submit` and awaits the future it returns. A worker thread (one per model
replica) takes the queued requests, waiting at most ``max_wait_ms`` after the oldest one arrived for the batch to fill
up to ``max_batch_size`` texts, or until as many texts are queued as its previous batch held (the clients it answered
have come back: waiting longer would only leave the replica idle), runs ``predict`` once on all their texts
(tokenization included, so the event loop only parses and answers HTTP; the backends sort the batch by length and
run it in forward passes of ``--forward-batch-size`` texts), and resolves every future of the batch
with one call into the loop. Under load the wait costs nothing: requests that arrive while a batch runs have already waited
longer than ``max_wait_ms`` and go into the next batch at once.

A model call that hangs (a deadlock, a stuck device; not a crash, which fails its batch) is caught by a check in the
event loop, every quarter of ``batch_timeout_s`` and at least once a second: the requests of a batch past
``batch_timeout_s`` get :class:`ModelTimeout`, and while every replica is stuck so, queued and new requests get
:class:`Stalled` instead of waiting forever. A thread cannot be stopped, so a replica in a thread (the onnx backend,
or torch with ``--no-worker-process``) stays stuck until its call returns, if ever, and :meth:`MicroBatcher.problem`
says so (/health: 503, for a supervisor to restart the server); a replica in a worker process
(:class:`oztune.serve.backends.WorkerProcess`, torch's default) kills and replaces its process instead.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Predict = Callable[[list[str], "list[str] | None"], list[dict]]

_DROP_PERIOD = 0.01  # seconds: how often a full queue may be checked for requests nobody waits for


class QueueFull(Exception):
    """The queue holds ``max_queue`` texts already (HTTP 503)."""


class Closed(Exception):
    """The batcher is shutting down and takes no new requests (HTTP 503)."""


class ModelTimeout(Exception):
    """The model call of this request's batch ran past the batch timeout (HTTP 504)."""


class Stalled(Exception):
    """Every model replica is stuck in a call past the batch timeout (HTTP 503)."""


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
        max_wait_ms: longest wait, counted from the oldest queued request, for a batch to fill (it closes
            sooner once as many texts are queued as the worker's previous batch held).
        max_queue: most texts waiting; :meth:`submit` raises :class:`QueueFull` beyond it.
        on_batch: called as ``on_batch(texts, seconds, classified)`` after each batch (metrics), in the worker
            thread: ``classified`` of its ``texts`` got predictions (the others were in a model call that failed).
        batch_timeout_s: longest model call per batch before its requests get :class:`ModelTimeout` (0: none).
    """

    def __init__(self, predict: Predict | list[Predict], max_batch_size: int = 64, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, on_batch: Callable[[int, float, int], None] | None = None,
                 batch_timeout_s: float = 0):
        self.predicts = list(predict) if isinstance(predict, (list, tuple)) else [predict]
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch
        self.batch_timeout = batch_timeout_s
        self.pending = 0  # texts queued, not yet taken by a worker
        self._idle = 0  # workers waiting for a batch
        # Texts at which each worker's next batch is ready before max_wait: its previous batch's (clients that
        # get their answers and send again are back in full then).
        self._ready = [max_batch_size] * len(self.predicts)
        self._running: list[tuple[float, list[_Request]] | None] = [None] * len(self.predicts)  # (deadline, batch)
        self._hung: set[int] = set()  # workers in a call past its deadline
        self._queue: deque[_Request] = deque()
        self._dropped_at = float("-inf")  # when the queue was last rid of abandoned requests (time.monotonic())
        self._cond = threading.Condition()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the workers; futures are resolved in ``loop`` (the server's event loop)."""
        self._loop = loop
        self._threads = [threading.Thread(target=self._work, args=(i, p), name=f"oztune-batcher-{i}", daemon=True)
                         for i, p in enumerate(self.predicts)]
        for t in self._threads:
            t.start()
        if self.batch_timeout:
            loop.call_later(self._check_period(), self._check_deadlines)

    def submit(self, texts: list[str], pairs: list[str] | None = None,
               gone: Callable[[], bool] | None = None) -> asyncio.Future:
        """Queue one request; the future resolves to its predictions. Call from the event loop.

        Args:
            texts: the texts to classify.
            pairs: their text pairs, or None.
            gone: whether the client has disconnected; checked as the request is taken for a batch, and a
                request whose client is gone is skipped and its future cancelled. Also checked when a request
                finds the queue full: the requests of clients gone are dropped first and do not count.
        """
        future = self._loop.create_future()
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if self._hung and len(self._hung) == len(self.predicts):
                raise Stalled(self._stalled_message())
            if self.pending + len(texts) > self.max_queue:
                self._drop_abandoned()
                if self.pending + len(texts) > self.max_queue:
                    raise QueueFull(f"the queue is full ({self.pending} of {self.max_queue} texts waiting)")
            self._queue.append(_Request(texts, pairs, future, time.monotonic(), gone))
            self.pending += len(texts)
            # Wake the worker only when it may be waiting for this: a first request, or a full batch; and every
            # worker when as many texts are queued as a worker's previous batch held (it is that one's batch).
            if len(self._queue) == 1 or self.pending >= self.max_batch_size:
                self._cond.notify()
            elif any(self.pending >= ready > self.pending - len(texts) for ready in self._ready):
                self._cond.notify_all()
        return future

    def _drop_abandoned(self) -> None:
        """Take out of the queue the requests nobody waits for any more (client gone, or future cancelled), so
        that they do not fill it for live ones; their futures are cancelled (the server counts them 499).
        Call with the lock held, from the event loop.

        Nothing tells the server when a client leaves (it reads a flag: ``gone``), so this checks every queued
        request: only when the queue is full, and at most once per ``_DROP_PERIOD`` (under overload, each
        request that finds the queue full would check it all again).
        """
        now = time.monotonic()
        if now < self._dropped_at + _DROP_PERIOD:
            return
        self._dropped_at = now
        kept: deque[_Request] = deque()
        for r in self._queue:
            if _abandoned(r):
                self.pending -= len(r.texts)
                r.future.cancel()
            else:
                kept.append(r)
        self._queue = kept

    def waiting(self) -> int:
        """Texts queued for clients still waiting: :attr:`pending` less the texts of requests nobody waits for
        any more, which will not be run (they stay in ``pending``, counting toward ``max_queue``, until a worker
        or a full queue takes them out). For /metrics; checks every queued request, so not for the request path.
        Call from the event loop."""
        with self._cond:
            return sum(len(r.texts) for r in self._queue if not _abandoned(r))

    def alive(self) -> bool:
        """True while every worker thread runs (or before start, or once closed)."""
        return self._closed or all(t.is_alive() for t in self._threads)

    def problem(self) -> str | None:
        """Why the batcher cannot serve every request (a worker thread stopped or stuck in a call), or None."""
        if not self.alive():
            return "a batch worker thread has stopped"
        if self._hung:
            return (f"{len(self._hung)} of {len(self.predicts)} model replicas have been in one call for over "
                    f"{self.batch_timeout:g} s")
        return None

    def _check_period(self) -> float:
        return min(1.0, self.batch_timeout / 4)

    def _stalled_message(self) -> str:
        return (f"the model is not responding: every replica has been in one call for over "
                f"{self.batch_timeout:g} s")

    def _check_deadlines(self) -> None:
        """Fail the requests of batches past their deadline, and the queued ones once every worker is stuck;
        runs in the event loop, every period until closed.

        Checked here rather than by a timer per batch: the workers' hot path only stores the deadline.
        """
        if self._closed:
            return
        now, failed = time.monotonic(), []
        with self._cond:
            for i, running in enumerate(self._running):
                if running is not None and running[0] <= now and i not in self._hung:
                    self._hung.add(i)
                    error = ModelTimeout(f"the model timed out: its call on this batch has run for over "
                                         f"{self.batch_timeout:g} s")
                    failed += [(r, error) for r in running[1]]
            if len(self._hung) == len(self.predicts) and self._queue:  # no worker will take them
                failed += [(r, Stalled(self._stalled_message())) for r in self._queue]
                self._queue.clear()
                self.pending = 0
        if failed:
            stalled = sum(isinstance(e, Stalled) for _, e in failed)
            said = [f"{len(failed) - stalled} request(s) of the hung call(s) get 504"] if len(failed) > stalled else []
            if stalled:
                said.append(f"{stalled} queued request(s) get 503 (no replica is left to take them)")
            print(f"oztune: {self.problem()}; {', '.join(said)}", file=sys.stderr, flush=True)
        _resolve(failed)
        self._loop.call_later(self._check_period(), self._check_deadlines)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the workers finish the queued ones, and wait for them."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _take(self, worker: int) -> list[_Request] | None:
        """Block until a batch is ready and take it; None once closed and drained.

        With several workers, the queued texts are shared out among the idle ones (each takes at most its
        share), so that replicas run side by side instead of one taking every request in turn.

        Args:
            worker: the index of the calling worker (its previous batch, if any, is done).
        """
        with self._cond:
            self._running[worker] = None
            self._hung.discard(worker)  # (stuck past its deadline, and back after all)
            self._idle += 1
            try:
                while True:  # until a batch of requests still waited for is taken
                    while True:  # checked again after every wait: another worker may have taken the queue
                        while not self._queue:
                            if self._closed:
                                return None
                            self._cond.wait()
                        left = self._queue[0].arrived + self.max_wait - time.monotonic()
                        if self.pending >= min(self.max_batch_size, self._ready[worker]) or self._closed or left <= 0:
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
                        self._ready[worker] = n
                        if self.batch_timeout:
                            self._running[worker] = (time.monotonic() + self.batch_timeout, batch)
                        return batch
            finally:
                self._idle -= 1

    def _work(self, worker: int, predict: Predict) -> None:
        while (batch := self._take(worker)) is not None:
            start = time.perf_counter()
            results: list = []
            # Requests with and without text pairs cannot share a tokenizer call.
            for with_pairs in (False, True):
                group = [r for r in batch if (r.pairs is not None) == with_pairs]
                if group:
                    results += zip(group, self._run(predict, group))
            if self.on_batch is not None:
                classified = sum(len(r.texts) for r, result in results if not isinstance(result, Exception))
                self.on_batch(sum(len(r.texts) for r in batch), time.perf_counter() - start, classified)
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


def _abandoned(request: _Request) -> bool:
    """Whether nobody waits for the request's answer any more: its client is gone, or its future was cancelled
    (uvicorn's graceful shutdown ran out of time and the request has been answered)."""
    return request.future.done() or (request.gone is not None and request.gone())


def _resolve(results: list[tuple[_Request, object]]) -> None:
    """Hand each request its predictions (or exception); runs in the event loop."""
    for request, result in results:
        if request.future.done():  # the client went away
            continue
        if isinstance(result, Exception):
            request.future.set_exception(result)
        else:
            request.future.set_result(result)
