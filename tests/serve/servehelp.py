"""Helpers for the serving tests: tiny oztune models, a server in a thread, a controllable stub model."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from conftest import write_tiny_tokenizer

from oztune.config import HeadConfig, ModelConfig
from oztune.data.tokenize import TextEncoder
from oztune.models.hub import save_classifier
from oztune.models.transformer import SequenceClassifier, init_weights

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "dull", "movie", "film", "plot", "the", "a", "is"]


def tiny_classifier(seed: int = 0, **cfg) -> SequenceClassifier:
    """A random tiny BERT-like classifier whose logits spread widely (so labels are not coin flips)."""
    torch.manual_seed(seed)
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, max_positions=64)
    model = SequenceClassifier(ModelConfig(**{**base, **cfg}), HeadConfig(num_labels=3))
    init_weights(model, std=0.2)
    with torch.no_grad():
        model.head.out.weight.mul_(20)
    return model.eval()


def save_tiny(model: SequenceClassifier, path: Path, quantization: dict | None = None,
              text_pairs: bool | None = None) -> Path:
    """Save ``model`` with a word-level tokenizer and labels neg/neutral/pos (a regression head: "value";
    ``text_pairs``: recorded as fine-tuned on text pairs or on single texts; None: not recorded)."""
    tok = path.with_name(path.name + "-tokenizer")  # beside it: save_classifier replaces only model directories
    tok.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(tok, 64)
    enc = TextEncoder.from_dir(tok, 62)
    names = {0: "value"} if model.head_cfg.problem_type == "regression" else {0: "neg", 1: "neutral", 2: "pos"}
    return save_classifier(model, enc, path, names, quantization=quantization, text_pairs=text_pairs)


def random_texts(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))) for _ in range(n)]


def free_socket() -> socket.socket:
    """A listening-ready socket bound to a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serving(app):
    """Run ``app`` with uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


class GatedModel:
    """A stub ``predict`` that records batch sizes and blocks until ``gate`` is set (when it is used).

    Args:
        gated: block each call until :attr:`gate` is set.
    """

    def __init__(self, gated: bool = True):
        self.gate, self.entered = threading.Event(), threading.Event()
        self.batches: list[int] = []
        if not gated:
            self.gate.set()

    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        self.batches.append(len(texts))
        self.entered.set()
        assert self.gate.wait(20), "test gate never opened"
        return [{"label": "len", "score": float(len(t))} for t in texts]
