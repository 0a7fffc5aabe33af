"""The ``export`` and ``serve`` commands."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from oztune.cli import command
from oztune.errors import OztuneError, check_at_least_1, missing_package

# torch.onnx's TorchScript exporter (export.py traces with dynamo=False) supports opsets up to 20 in
# torch 2.13 (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET); oztune's graph needs 17 or later.
MIN_OPSET, MAX_OPSET = 17, 20


@dataclass
class ExportArgs:
    """Export a saved model to ONNX, with its tokenizer and label map beside it; or compile it ahead of time.

    Args:
        model: model directory (from oztune finetune, quantize, prune, distill or compress).
        output: directory to write (model.onnx, tokenizer files, config.json); replaced as a whole.
        format: onnx (for onnxruntime), or aoti: a copy of the model directory with its inference graphs
            compiled for this machine and torch version (aoti/*.pt2), which oztune then runs compiled
            without compiling at start.
        int8: quantize a float model with oztune's int8 scheme (as oztune quantize does) before exporting;
            a quantized model always exports as int8.
        opset: ONNX opset version, for --format onnx only (17 to 20; not for --format aoti).
    """

    model: str = ""
    output: str = ""
    format: str = "onnx"
    int8: bool = False
    opset: int = 17


@command("export", ExportArgs, "export a saved model to ONNX (fp32 or int8) or as ahead-of-time compiled graphs (aoti)",
         needs=("oztune.serve.export",))
def export_cmd(a: ExportArgs) -> int:
    if not a.model or not a.output:
        raise OztuneError("--model and --output are required")
    if a.format not in ("onnx", "aoti"):
        raise OztuneError(f"--format {a.format!r}: expected onnx or aoti")
    if a.format == "aoti":
        if a.int8:
            raise OztuneError("--int8 is for --format onnx; for aoti, quantize first (oztune quantize) and export that")
        if a.opset != ExportArgs.opset:  # (not ignored: a bad value looked accepted)
            raise OztuneError(f"--opset {a.opset}: an ONNX option, for --format onnx (aoti compiles no ONNX graph)")
        from oztune.serve.export import export_aoti

        t0 = time.perf_counter()
        out = export_aoti(a.model, a.output)
        print(f"compiled {a.model} ahead of time into {out}/aoti in {time.perf_counter() - t0:.0f} s; "
              f"oztune evaluate/predict/serve --model {out} run it compiled from the start")
        return 0
    if not MIN_OPSET <= a.opset <= MAX_OPSET:
        raise OztuneError(f"--opset {a.opset}: expected {MIN_OPSET} to {MAX_OPSET} (torch's TorchScript ONNX exporter "
                          f"supports up to {MAX_OPSET})")
    from oztune.models.hub import format_size
    from oztune.serve.export import export_onnx

    out = export_onnx(a.model, a.output, int8=a.int8, opset=a.opset)
    int8 = json.loads((out / "config.json").read_text())["oztune"]["onnx"]["int8"]
    size = format_size((out / "model.onnx").stat().st_size / 1e6)
    print(f"exported {a.model} to {out}/model.onnx ({'int8' if int8 else 'fp32'}, {size}); "
          f"serve it with: oztune serve --model {out} --backend onnx")
    return 0


@dataclass
class ServeArgs:
    """Serve a model over HTTP: POST /predict, GET /health, GET /metrics, with dynamic batching.

    Args:
        model: model directory, or for --backend onnx an oztune export directory (a model directory is
            exported to a temporary directory at start, int8 if the model is quantized).
        host: address to listen on.
        port: port to listen on.
        backend: "torch" (the model as saved) or "onnx" (onnxruntime).
        max_batch_size: most texts per batch (texts of concurrent requests collected together).
        forward_batch_size: most texts per forward pass: a batch is sorted by length and run in passes of
            this many texts, which cuts padding (0: the whole batch in one pass). Default: the whole batch
            for torch, whose model skips padding itself (oztune.models.packing); 8 for onnx.
        max_wait_ms: longest wait for a batch to fill, counted from the oldest waiting request (a batch also
            closes once as many texts are queued as the replica's previous batch held).
        max_queue: most texts waiting for a batch; requests beyond it get 503 (at least
            --max-texts-per-request).
        max_texts_per_request: most texts in one request; more get 413.
        max_body_bytes: largest request body in bytes; larger get 413.
        max_length: longest tokenized text; longer texts are truncated (default: the length the model was
            fine-tuned with).
        threads: compute threads per model replica (0: the cores this process may use, shared out among
            the replicas; at most 1,024).
        workers: model replicas, each fed its own batches from the one queue (0: one per core up to 4, with
            one thread each; torch in the server process, --no-worker-process, always has one). On 2 cores
            two single-thread replicas served more requests than one on two threads, for both backends
            (BENCHMARKS.md); a lone request then runs on one thread (--workers 1 for the lowest latency
            at low load; at most 256).
        compile: torch backend: run the model under torch.compile (compiled at start, 20-65 s for MiniLM on
            2 cores; padded batches packed as eager packs them): lone requests run faster (batch 1 in
            bench/compiled.py: 2.4x eager on 2 threads) and so do batches (see BENCHMARKS.md).
        worker_process: run the torch model in a process of its own, so that PyTorch's hold on the GIL
            does not stall the HTTP event loop (--no-worker-process: a thread of the server process).
        graceful_timeout_s: on SIGTERM, how long in-flight requests may still take; those still unanswered then get 503.
        body_timeout_s: longest time for a request's body to arrive, from its headers; slower requests get 408
            and their connection is closed (0: no limit).
        batch_timeout_s: longest model call on one batch (set it above the slowest batch the model may take);
            past it the batch's requests get 504 and /health 503, a model process is killed and replaced,
            a model in a thread (onnx, --no-worker-process) stays stuck until its call returns, and while
            every replica is stuck, other requests get 503 (0: no limit).
        log_level: uvicorn log level (critical, error, warning, info, debug, trace).
    """

    model: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "torch"
    max_batch_size: int = 64
    forward_batch_size: int | None = None
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_texts_per_request: int = 64
    max_body_bytes: int = 1_000_000
    max_length: int | None = None
    threads: int = 0
    workers: int = 0
    compile: bool = False
    worker_process: bool = True
    graceful_timeout_s: float = 30.0
    body_timeout_s: float = 30.0
    batch_timeout_s: float = 300.0
    log_level: str = "info"


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
# a day: thread waits need finite times
MAX_FLOATS = {"max_wait_ms": 86_400_000, "graceful_timeout_s": 86_400, "body_timeout_s": 86_400,
              "batch_timeout_s": 86_400}
# Each replica is a process (torch) or a thread pool: a huge count started processes without end, and torch and
# onnxruntime take no thread count beyond a C int (tracebacks); these are far beyond any machine's use.
MAX_COUNTS = {"threads": 1024, "workers": 256}


def _check(a: ServeArgs) -> None:
    if not a.model:
        raise OztuneError("--model is required")
    if a.backend not in ("torch", "onnx"):
        raise OztuneError(f"--backend {a.backend!r}: expected torch or onnx")
    if not a.host:  # the socket would listen on every interface, shown as http://:PORT
        raise OztuneError("--host '': expected an address to listen on (127.0.0.1: this machine only; "
                          "0.0.0.0: every interface)")
    if not 0 <= a.port <= 65535:
        raise OztuneError(f"--port {a.port}: expected 0 to 65535")
    for name in ("max_batch_size", "max_queue", "max_texts_per_request", "max_body_bytes", "max_length"):
        check_at_least_1(f"--{name.replace('_', '-')}", getattr(a, name))
    if (a.forward_batch_size or 0) < 0:
        raise OztuneError(f"--forward-batch-size {a.forward_batch_size}: expected 0 or more")
    for name, most in MAX_COUNTS.items():
        if not 0 <= getattr(a, name) <= most:
            raise OztuneError(f"--{name} {getattr(a, name)}: expected 0 to {most:,}")
    for name, most in MAX_FLOATS.items():
        if not (math.isfinite(getattr(a, name)) and 0 <= getattr(a, name) <= most):  # not inf, not nan
            raise OztuneError(f"--{name.replace('_', '-')} {getattr(a, name)}: expected a number from 0 to {most:,}")
    if a.max_queue < a.max_texts_per_request:
        n = a.max_texts_per_request
        raise OztuneError(f"--max-queue {a.max_queue}: expected at least --max-texts-per-request ({n}): "
                          f"a request of {n} texts could never be queued")
    if a.log_level not in LOG_LEVELS:
        raise OztuneError(f"--log-level {a.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")


def replicas(a: ServeArgs, processes: bool) -> tuple[int, int]:
    """(model replicas, threads each). Torch replicas run in worker processes of their own; ONNX replicas
    are threads sharing one session (onnxruntime releases the GIL); a torch model in the server process
    gets a single replica (PyTorch holds the GIL)."""
    from oztune.serve.backends import default_threads

    cores = default_threads()
    if not (processes or a.backend == "onnx"):
        workers = 1
    else:
        workers = a.workers or min(cores, 4)
    return workers, a.threads or max(1, cores // workers)


def forward_batch(a: ServeArgs) -> int:
    """Texts per forward pass: --forward-batch-size, by default the whole batch for torch (packed, see
    oztune.models.packing: padding costs it nothing in the linear layers) and 8 for onnx (which pads)."""
    if a.forward_batch_size is None:
        return a.max_batch_size if a.backend == "torch" else 8
    return a.forward_batch_size or a.max_batch_size


@contextmanager
def _sigterm_exits():
    """SIGTERM raises SystemExit(143) in the block (in the main thread), so that a server stopped while it
    starts cleans up (a temporary ONNX export, worker processes) instead of dying on the spot; once serving,
    :func:`run_server` handles SIGTERM itself.

    Raised inside a C extension (safetensors, say), the SystemExit can come out as another error: after a
    SIGTERM, any error of the block is the stop it asked for (the clean-up has run as the error unwound).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopped = []

    def exit_(signum, frame):
        stopped.append(signum)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    except Exception:
        if stopped:
            raise SystemExit(128 + stopped[0]) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


@command("serve", ServeArgs, "serve a model over HTTP with dynamic batching (FastAPI + uvicorn)",
         needs=("oztune.serve.backends",))  # (not the server: FastAPI is optional, and said so when missing)
def serve_cmd(a: ServeArgs) -> int:
    _check(a)
    with _sigterm_exits():
        return _serve(a)


def _serve(a: ServeArgs) -> int:
    """Load the model, listen and serve until SIGINT/SIGTERM."""
    from oztune.serve.backends import WorkerProcess, load_backend

    try:  # (the serve extra: without it a ModuleNotFoundError's traceback, uvicorn's only once the model loaded)
        import uvicorn  # noqa: F401

        from oztune.serve.server import ServeLimits, listen_socket, run_server
    except ModuleNotFoundError as e:
        if (e.name or "oztune").startswith("oztune"):
            raise
        raise missing_package(e, "serve", "the server is a FastAPI app run by uvicorn") from None

    sock = listen_socket(a.host, a.port)  # fail before loading the model when the port is taken
    processes = a.backend == "torch" and a.worker_process
    workers, threads = replicas(a, processes)
    args = (a.model, a.backend, threads, forward_batch(a), a.max_length, a.compile)
    try:  # replicas in processes load (and compile) side by side
        clfs = (WorkerProcess.start_many(workers, *args, timeout=a.batch_timeout_s or None) if processes
                else [load_backend(*args)])
    except BaseException:
        sock.close()
        raise
    predicts = [c.predict for c in clfs] if processes else [clfs[0].predict] * workers
    limits = ServeLimits(a.max_batch_size, a.max_wait_ms, a.max_queue, a.max_texts_per_request, a.max_body_bytes,
                         a.graceful_timeout_s, a.body_timeout_s, a.batch_timeout_s)
    import gc

    gc.freeze()  # loaded once, kept for good: full collections need not walk it (a p99 spike otherwise)
    sock.listen(2048)  # from here on connections wait for the server instead of being refused
    print(f"serving {a.model} ({a.backend}, {workers} model replica{'s' if workers > 1 else ''} x {threads} "
          f"thread{'s' if threads > 1 else ''}) on http://{a.host}:{sock.getsockname()[1]}  "
          "(POST /predict, GET /health, GET /metrics)", flush=True)
    try:
        run_server(predicts, sock, limits, {"model": a.model, "backend": a.backend, "workers": workers}, a.log_level,
                   clfs[0].text_pairs)
    finally:
        for clf in clfs:
            if isinstance(clf, WorkerProcess):
                clf.close()
    print("stopped after finishing the requests in flight", flush=True)
    return 0
