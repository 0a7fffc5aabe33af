"""Load test of ``oztune serve``: N concurrent clients over loopback, against the offline speed of the same model.

For each backend: start ``oztune serve`` on a free loopback port, warm it up, then let ``--concurrency``
clients send SST-2 dev sentences (``--texts-per-request`` each) over keep-alive connections until
``--requests`` requests are done or ``--max-seconds`` have passed. Reports throughput, p50/p95/p99
latency, errors and the mean batch size (from /metrics). After the server stops, the same model is
run offline (in a fresh process, best of three passes) on the same sentences in batches of 64, in arrival order and sorted by
length (as ``oztune predict`` does), and served throughput is given as a share of both (with
``--compile``, offline compiled too, as served). A second table says where the cores went during the timed
load: CPU ms per request of the server's HTTP process, of its model processes, and of the clients.

The clients are one asyncio task each on raw HTTP/1.1 keep-alive connections (prepared request
bytes, minimal response parsing), to take as little CPU as possible from the server: client and
server share the machine's cores, so the served figures include the clients' cost.

    python bench/load.py --model /work/models/sst2-int8                 # 10,000 requests x 32 clients, torch + onnx
    python bench/load.py --model /work/models/sst2-int8 --quick         # 300 requests x 8 clients, under a minute
Prints a markdown table and writes bench/results/load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from peers import QUANTIZE, need_model

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"errors": 0, "served_over_offline": 0.8, "p99_ms": 100.0}


def sentences(path: Path) -> list[str]:
    from oztune.data.readers import read_examples

    return [e.text for e in read_examples(path)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, backend: str, port: int, a) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "oztune", "serve", "--model", model, "--backend", backend, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch-size", str(a.max_batch_size),
           "--max-wait-ms", str(a.max_wait_ms),
           "--threads", str(a.threads), "--log-level", "warning"] + (["--no-worker-process"] if a.no_worker_process else [])
    if a.forward_batch_size is not None:
        cmd += ["--forward-batch-size", str(a.forward_batch_size)]
    if a.workers is not None:
        cmd += ["--workers", str(a.workers)]
    if a.compile and backend == "torch":
        cmd.append("--compile")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL)


async def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            writer.close()
            if head.startswith(b"HTTP/1.1 200"):
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the server did not become healthy in time")


def request_bytes(texts: list[str], path: str = "/predict") -> bytes:
    body = json.dumps({"texts": texts}).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def exchange(reader, writer, request: bytes) -> tuple[int, bytes]:
    """Send one request on a keep-alive connection; (status, body)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    if not length:
        raise ValueError("response without Content-Length")
    return int(head[9:12]), await reader.readexactly(int(length.group(1)))


async def load(port: int, requests: list[bytes], total: int, concurrency: int, max_seconds: float) -> dict:
    """``concurrency`` clients send ``total`` requests (cycling through ``requests``) or stop at ``max_seconds``."""
    latencies: list[float] = []
    errors: Counter = Counter()
    issued = 0
    start = time.perf_counter()
    stop_at = start + max_seconds

    async def client() -> None:
        nonlocal issued
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while issued < total and time.perf_counter() < stop_at:
            request = requests[issued % len(requests)]
            issued += 1
            t0 = time.perf_counter()
            try:
                status, body = await exchange(reader, writer, request)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                errors[type(e).__name__] += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            latencies.append(time.perf_counter() - t0)
            if status != 200 or not body.startswith(b'{"predictions":['):
                errors[f"HTTP {status}"] += 1
        writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests": issued, "errors": sum(errors.values()), "error_kinds": dict(errors), "seconds": seconds,
            "requests_per_s": len(latencies) / seconds,
            **{f"p{q}_ms": float(np.percentile(ms, q)) if len(ms) else None for q in (50, 95, 99)},
            "max_ms": float(ms.max()) if len(ms) else None}


async def scrape_batches(port: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    _, body = await exchange(reader, writer, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    writer.close()
    text = body.decode()
    total = float(re.search(r"^oztune_batch_size_sum (\S+)", text, re.MULTILINE).group(1))
    count = float(re.search(r"^oztune_batch_size_count (\S+)", text, re.MULTILINE).group(1))
    return total / max(count, 1)


def run(coro):
    """asyncio.run on uvloop where it is installed (as the server uses it): the clients share the cores
    with the server, and every cycle they spend is one the server does not get."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def cpu_seconds(server: subprocess.Popen) -> dict:
    """CPU seconds (user + system) so far of the server's main process, its model processes, and this one."""
    import psutil

    def used(p) -> float:
        t = p.cpu_times()
        return t.user + t.system

    main = psutil.Process(server.pid)
    return {"server_front": used(main), "server_models": sum(used(c) for c in main.children(recursive=True)),
            "clients": used(psutil.Process())}


def serve_and_load(model: str, backend: str, texts: list[str], a) -> dict:
    port = free_port()
    proc = start_server(model, backend, port, a)
    try:
        run(wait_healthy(port, proc))
        groups = [texts[i:i + a.texts_per_request] for i in range(0, len(texts) - a.texts_per_request + 1,
                                                                   a.texts_per_request)]
        requests = [request_bytes(g) for g in groups]
        run(load(port, requests, 2 * a.concurrency, a.concurrency, 60))  # warm-up, not counted
        before = cpu_seconds(proc)
        result = run(load(port, requests, a.requests, a.concurrency, a.max_seconds))
        after = cpu_seconds(proc)
        # where the cores went, per request: HTTP front (and, onnx, the model threads), model processes, clients
        result["cpu_ms_per_request"] = {k: 1000 * (after[k] - before[k]) / result["requests"] for k in after}
        result["cores_busy"] = sum(after[k] - before[k] for k in after) / result["seconds"]
        result["mean_batch_size"] = run(scrape_batches(port))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    result["texts_per_s"] = result["requests_per_s"] * a.texts_per_request
    return result


def offline(model: str, backend: str, texts: list[str], threads: int, compile: bool = False, repeats: int = 3) -> dict:
    """Texts/s of the same model, batches of 64, in arrival order and length-sorted (best of ``repeats``).

    In a fresh process of its own: one backend's threads (or a compiled model's) in this process could
    slow the next one's timing (ONNX Runtime after compiled torch ran at half its speed here)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_offline, (model, backend, texts, threads, compile, repeats))


def _offline(model: str, backend: str, texts: list[str], threads: int, compile: bool, repeats: int) -> dict:
    from oztune.serve.backends import load_backend

    clf = load_backend(model, backend, threads, batch_size=64, compile=compile)
    clf.predict(texts[:64])  # warm-up
    arrival = sorted_ = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(texts), 64):
            clf.predict(texts[i:i + 64])
        arrival = max(arrival, len(texts) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        clf.predict(texts)  # sorted by length inside, as oztune predict does
        sorted_ = max(sorted_, len(texts) / (time.perf_counter() - t0))
    return {"offline_arrival_texts_per_s": arrival, "offline_sorted_texts_per_s": sorted_}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (an int8 model for the targets)")
    p.add_argument("--backends", default="torch,onnx")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=300, help="stop sending after this long")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--forward-batch-size", type=int, default=None,
                   help="server: texts per forward pass (0: whole batch; default: the server's, per backend)")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=0, help="server compute threads per replica (0: the server's default)")
    p.add_argument("--workers", type=int, default=None, help="server model replicas (default: the server's, per backend)")
    p.add_argument("--offline-texts", type=int, default=4096)
    p.add_argument("--compile", action="store_true",
                   help="server and offline: the torch model under torch.compile (offline eager too, for reference)")
    p.add_argument("--no-worker-process", action="store_true", help="server: run the torch model in a thread of the server process")
    p.add_argument("--data", default=str(ROOT / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--quick", action="store_true", help="300 requests x 8 clients, 256 offline texts")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    a = p.parse_args()
    need_model(a.model, QUANTIZE.format(a.model))
    if a.quick:
        a.requests, a.concurrency, a.offline_texts = 300, 8, 256
    from oztune.models.hub import read_config, resolve_model
    from oztune.serve.backends import default_threads
    from oztune.serve.export import export_onnx

    dev = sentences(Path(a.data))
    texts = (dev * (a.offline_texts // len(dev) + 1))[:a.offline_texts]
    quantized = bool(read_config(resolve_model(a.model)).get("oztune", {}).get("quantization"))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in a.backends.split(","):
            model = a.model
            if backend == "onnx" and not (Path(a.model) / "model.onnx").is_file():
                model = str(export_onnx(a.model, Path(tmp) / "onnx"))  # one export for server and offline
            print(f"{backend}: {a.requests:,} requests from {a.concurrency} clients ...", flush=True)
            threads = a.threads or default_threads()
            run = {"backend": backend, **serve_and_load(model, backend, dev, a), **offline(model, backend, texts, threads)}
            if a.compile and backend == "torch":  # the served model's own offline speed is the compiled one
                run["offline_eager"] = {k: run[k] for k in ("offline_arrival_texts_per_s", "offline_sorted_texts_per_s")}
                run.update(offline(model, backend, texts, threads, compile=True))
            for kind in ("arrival", "sorted"):
                run[f"served_over_offline_{kind}"] = run["texts_per_s"] / run[f"offline_{kind}_texts_per_s"]
            runs.append(run)
    report(runs, a, quantized)


def report(runs: list[dict], a, quantized: bool) -> None:
    from oztune.serve.backends import default_threads

    print(f"\n{a.model} ({'int8' if quantized else 'float'}), {a.concurrency} clients x {a.texts_per_request} text(s), "
          f"max batch {a.max_batch_size} (forward passes of "
          f"{'the server default' if a.forward_batch_size is None else a.forward_batch_size or a.max_batch_size}), "
          f"max wait {a.max_wait_ms} ms, server replicas x threads: {a.workers or 'default'} x {a.threads or 'default'}, "
          f"{os.cpu_count()} cores shared with the clients; offline: one model, {a.threads or default_threads()} threads\n")
    print("| backend | requests | errors | req/s | p50 ms | p95 ms | p99 ms | mean batch | offline texts/s "
          "(arrival / sorted) | served / offline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['backend']} | {r['requests']:,} | {r['errors']} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | "
              f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch_size']:.1f} | "
              f"{r['offline_arrival_texts_per_s']:.0f} / {r['offline_sorted_texts_per_s']:.0f} | "
              f"{r['served_over_offline_arrival']:.2f} / {r['served_over_offline_sorted']:.2f} |")
    print("\nwhere the cores went during the timed load (CPU ms per request):\n")
    print("| backend | server front (HTTP; onnx: and its model) | server model processes | clients | cores busy |")
    print("|---|---|---|---|---|")
    for r in runs:
        c = r["cpu_ms_per_request"]
        print(f"| {r['backend']} | {c['server_front']:.3f} | {c['server_models']:.3f} | {c['clients']:.3f} | "
              f"{r['cores_busy']:.2f} of {os.cpu_count()} |")
    if any("offline_eager" in r for r in runs):
        print("\noffline texts/s are the compiled model's (as served); eager: " + "; ".join(
            f"{r['backend']} {r['offline_eager']['offline_arrival_texts_per_s']:.0f} / "
            f"{r['offline_eager']['offline_sorted_texts_per_s']:.0f}" for r in runs if "offline_eager" in r))
    for r in runs:
        met = (r["errors"] <= TARGETS["errors"], r["served_over_offline_sorted"] >= TARGETS["served_over_offline"],
               r["p99_ms"] < TARGETS["p99_ms"])
        print(f"{r['backend']}: 0 errors {'ok' if met[0] else 'MISSED'}; served >= 80% of offline (sorted) "
              f"{'ok' if met[1] else 'MISSED'}; p99 < 100 ms {'ok' if met[2] else 'MISSED'}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(a).items() if k != "out"}
    out.write_text(json.dumps({"config": config, "quantized": quantized, "cores": os.cpu_count(), "targets": TARGETS,
                               "runs": runs}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
