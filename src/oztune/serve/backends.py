"""What the server runs: ``predict(texts, pairs) -> [{"label", "score"}, ...]`` on torch or onnxruntime.

The torch backend is :class:`oztune.Classifier`. :class:`OnnxClassifier` runs an ``oztune export``
directory with the same tokenizer, batching and output format.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from oztune.api import Classifier, Predictor
from oztune.config import ModelConfig, check_count
from oztune.data.dataset import EncodedData, inference_batches
from oztune.data.tokenize import TextEncoder, pad_batch
from oztune.errors import ModelError, OztuneError, missing_package
from oztune.runtime import usable_cpus
from oztune.models.hub import (ONNX_FILE, is_onnx_export, read_config, recorded_text_pairs, resolve_model,
                               tokenizer_length)
from oztune.serve.batching import ModelTimeout
from oztune.serve.export import export_onnx

BACKENDS = ("torch", "onnx")


def _onnxruntime():
    """The onnxruntime module (an optional package, of the serve extra), else a one-line OztuneError saying how to
    install it."""
    try:
        import onnxruntime
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("onnxruntime"):
            raise
        raise missing_package(e, "serve", "an ONNX export runs on ONNX Runtime") from None
    return onnxruntime


def default_threads() -> int:
    """Cores this process may use."""
    return len(usable_cpus())


class OnnxClassifier(Predictor):
    """An ONNX export run by onnxruntime on CPU, with ``logits``, ``predict`` and ``evaluate`` as
    :class:`oztune.Classifier` has them (the same tokenizer, batching and output format).

    Args:
        path: directory written by ``oztune export`` (model.onnx, tokenizer, config.json).
        threads: onnxruntime intra-op threads.
        batch_size: texts per run.
        max_length: tokenizer truncation length, at most the model's window; None: the model's own, as
            fine-tuned (recorded by the export).
        spin: let onnxruntime's threads spin, waiting for work, after each run (its default: the next run starts
            sooner, but those threads keep cores busy a while: a PyTorch model run right after one ran at half
            speed, at batch 1).
    """

    def __init__(self, path: str | Path, threads: int = 1, batch_size: int = 64, max_length: int | None = None,
                 spin: bool = True):
        ort = _onnxruntime()
        path = Path(path)
        hf = read_config(path)
        oz = hf.get("oztune", {})
        if not (path / ONNX_FILE).is_file() or "onnx" not in oz:
            missing = f"no {ONNX_FILE}" if not (path / ONNX_FILE).is_file() else "its config.json has no oztune export section"
            raise ModelError(f"{path}: not an oztune ONNX export ({missing}); "
                             "make one with: oztune export --model DIR --output DIR")
        cfg = ModelConfig.from_dict(oz["model"])
        self.problem_type = oz["head"]["problem_type"]
        self.text_pairs = recorded_text_pairs(oz, path)  # (exported from a model saved before it was recorded: None)
        self.id2label = {int(k): str(v) for k, v in hf.get("id2label", {}).items()}
        self.encoder = TextEncoder.from_dir(path, tokenizer_length(oz, cfg, max_length, path),
                                            pad_token_id=hf.get("pad_token_id"))
        self.batch_size = check_count("batch_size", batch_size)
        opts = ort.SessionOptions()
        self.threads = threads
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path / ONNX_FILE), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def encoded_logits(self, data: EncodedData) -> np.ndarray:
        """Raw outputs (N, num_labels) in input order, computed in length-sorted batches."""
        out = None
        for idx in inference_batches(data.lengths, self.batch_size):
            b = pad_batch([data.encoded[i] for i in idx], self.encoder.pad_id)
            logits = self.session.run(None, {k: b[k].numpy() for k in self.inputs})[0]  # (B, L)
            if out is None:
                out = np.zeros((len(data), logits.shape[-1]), dtype=np.float32)
            out[idx] = logits
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def open_predictor(model: str, batch_size: int = 64, spin: bool = True) -> Predictor:
    """What ``oztune evaluate`` and ``predict`` run: an ONNX export on onnxruntime (every core; ``spin``: see
    :class:`OnnxClassifier`), anything else as :meth:`oztune.Classifier.from_pretrained` loads it."""
    path = resolve_model(model)
    if is_onnx_export(path):
        return OnnxClassifier(path, default_threads(), batch_size, spin=spin)
    return Classifier.from_pretrained(path, batch_size=batch_size)


def load_backend(model: str, backend: str = "torch", threads: int = 0, batch_size: int = 64,
                 max_length: int | None = None, compile: bool = False) -> Classifier | OnnxClassifier:
    """The classifier that serves ``model`` on ``backend``.

    For ``onnx``, ``model`` is an ``oztune export`` directory, or a model directory that is exported
    to a temporary directory first (int8 when the model is quantized, see :mod:`oztune.serve.export`).

    Args:
        model: model or export directory.
        backend: "torch" or "onnx".
        threads: compute threads (0: every core this process may use).
        batch_size: texts per forward pass.
        max_length: tokenizer truncation length (None: the model's own, as fine-tuned).
        compile: torch only: run the model compiled (:mod:`oztune.models.compiled`), compiled here before
            it is returned (20-65 s for MiniLM on 2 cores, less once inductor's disk cache holds it).
    """
    if backend not in BACKENDS:
        raise OztuneError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    threads = threads or default_threads()
    path = resolve_model(model)
    is_export = is_onnx_export(path)
    if backend == "torch":
        if is_export:
            raise ModelError(f"{path}: an ONNX export; serve it with --backend onnx, or give the model directory")
        torch.set_num_threads(threads)
        clf = Classifier.from_pretrained(path, batch_size=batch_size, max_length=max_length, compile=compile)
        if compile:  # the graphs for one text and for batches (of distinct sizes, texts and tokens: see
            # torch.compile's "duck sizing", which gives equal sizes one symbol until a recompile); pairs for a
            # model fine-tuned on them (it refuses single texts)
            for texts in (["a first text to compile the model with"],
                          ["a second text", "and a third, longer one, so that the batch has padding", "a fourth"]):
                clf.predict(texts, texts[::-1] if clf.text_pairs else None)
        return clf
    if compile:
        raise OztuneError("--compile is for --backend torch (ONNX Runtime optimizes its own graph)")
    _onnxruntime()  # (missing: said before a model directory is exported)
    if not is_export:
        tmp = tempfile.TemporaryDirectory(prefix="oztune-onnx-")
        print(f"exporting {path} to ONNX in {tmp.name}", flush=True)
        try:
            clf = OnnxClassifier(export_onnx(path, Path(tmp.name) / "model"), threads, batch_size, max_length)
        except BaseException:  # an export error, or SystemExit on SIGTERM (see oztune serve): remove it now
            tmp.cleanup()
            raise
        clf.tmp = tmp  # removed with the classifier
        return clf
    return OnnxClassifier(path, threads, batch_size, max_length)


class WorkerProcess:
    """A backend run in a process of its own, with the same ``predict`` as the backend.

    PyTorch holds the GIL while it dispatches each operator, so an eager model running in the batch
    worker thread keeps the HTTP event loop from answering and queueing requests (ONNX Runtime releases
    the GIL and does not need this). In its own process the model has its own interpreter: in
    bench/load.py the torch backend served about twice the requests per second this way. Texts and
    predictions cross a pipe (a few hundred microseconds per batch). The worker ignores SIGINT and
    SIGTERM: the server finishes the requests in flight, then closes the pipe, and the worker exits.
    If the worker dies (killed for memory, a crash), the next batch starts a new one and is run again
    there, once; if it hangs (no answer within ``timeout``), it is killed and replaced, and the batch fails
    with :class:`ModelTimeout` (not run again: it might hang again). ``restarts`` counts both.

    Args: those of :func:`load_backend`, and
        timeout: longest wait for the answer to one batch, in seconds (None: no limit).

    Once ready, ``text_pairs`` is the loaded model's (whether it was fine-tuned on text pairs; None: not recorded).
    """

    def __init__(self, model: str, backend: str = "torch", threads: int = 0, batch_size: int = 64,
                 max_length: int | None = None, compile: bool = False, wait: bool = True,
                 timeout: float | None = None):
        self._args = (model, backend, threads, batch_size, max_length, compile)
        self.timeout = timeout
        self.restarts = 0
        self.text_pairs: bool | None = None
        self._spawn()
        if wait:
            self.wait_ready()

    @classmethod
    def start_many(cls, n: int, *args, timeout: float | None = None) -> list["WorkerProcess"]:
        """``n`` worker processes loading (and compiling) side by side; returns once all are ready."""
        workers = []
        try:
            for _ in range(n):
                workers.append(cls(*args, wait=False, timeout=timeout))
            for w in workers:
                w.wait_ready()
        except BaseException:
            for w in workers:
                w.close()
            raise
        return workers

    def _start(self) -> None:
        self._spawn()
        self.wait_ready()

    def _spawn(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked OpenMP or tokenizer threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_worker, args=(child, *self._args), name="oztune-model", daemon=True)
        self._proc.start()
        child.close()

    def wait_ready(self) -> None:
        """Wait until the worker has loaded the model; raise its error if it could not."""
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            kind, payload = "error", f"OztuneError: {self._args[0]}: the model process exited while loading"
        if kind == "error":
            self.close()
            raise (ModelError if payload.startswith("ModelError") else OztuneError)(payload.split(": ", 1)[-1])
        self.text_pairs = payload

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def predict(self, texts: list[str], text_pairs: list[str] | None = None, all_scores: bool = False) -> list[dict]:
        """Predictions from the worker process (called from one thread at a time: the batch worker)."""
        for attempt in range(2):
            try:
                self._conn.send((texts, text_pairs, all_scores))
                if self.timeout and not self._conn.poll(self.timeout):  # (True at EOF too: recv raises then)
                    self._replace_hung()
                    raise ModelTimeout(f"the model timed out: the model process took over {self.timeout:g} s "
                                       "on this batch")
                ok, payload = self._conn.recv()
                break
            except (EOFError, OSError):  # the worker is gone
                if attempt:
                    raise RuntimeError("the model process died twice on this batch") from None
                print(f"oztune: the model process (pid {self._proc.pid}, exit code {self._proc.exitcode}) is gone; "
                      "starting a new one", file=sys.stderr, flush=True)
                self.close()
                self.restarts += 1
                self._start()
        if not ok:
            raise RuntimeError(payload)
        return payload

    def _replace_hung(self) -> None:
        """Kill the worker, stuck in a call (a process, unlike a thread, can be stopped), and start another."""
        print(f"oztune: the model process (pid {self._proc.pid}) has not answered a batch in {self.timeout:g} s; "
              "killing it and starting a new one", file=sys.stderr, flush=True)
        self._proc.kill()
        self._proc.join(10)
        self._conn.close()
        self.restarts += 1
        self._start()

    def close(self, timeout: float = 10.0) -> None:
        """Let the worker exit and wait for it."""
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass
        self._conn.close()
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout)


def _serve_worker(conn, model: str, backend: str, threads: int, batch_size: int, max_length: int,
                  compile: bool = False) -> None:
    """The model process: load, say so (with whether the model takes text pairs), then answer
    (texts, pairs, all_scores) until None or EOF."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        clf = load_backend(model, backend, threads, batch_size, max_length, compile)
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    import gc

    gc.freeze()  # the loaded model and libraries are never garbage: keep the collector from walking them
    conn.send(("ready", clf.text_pairs))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        try:
            conn.send((True, clf.predict(*msg)))
        except Exception as e:  # the server answers 500 for this batch
            conn.send((False, f"{type(e).__name__}: {e}"))
