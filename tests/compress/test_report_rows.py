"""A measured row's scales, and how the Pareto front breaks ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oztune.compress import report
from oztune.config import HeadConfig


class Enc:
    """A stand-in encoder: one token per word; ``singles``: the texts it encoded one at a time."""

    def __init__(self):
        self.singles = set()

    def encode(self, texts, pairs=None):
        return [(t.split(), []) for t in texts]

    def __call__(self, texts, pairs=None):
        if len(texts) == 1:
            self.singles.add(texts[0])
        ids = torch.ones(len(texts), 4, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


class Model(torch.nn.Module):
    head_cfg = HeadConfig(num_labels=2)

    def forward(self, ids, mask, tt):
        return torch.zeros(len(ids), 2)


def test_measured_macro_f1_is_in_points_like_the_score(monkeypatch, tmp_path):
    metrics = {"accuracy": 0.875, "macro_f1": 0.8125}
    monkeypatch.setattr(report, "evaluate", lambda model, data: dict(metrics))
    texts = ["a b", "c", "d e f"]
    row = report.measure(Model(), Enc(), None, texts, None, tmp_path, 1_000_000, repeats=1)
    assert row["score"] == pytest.approx(87.5) and row["metric"] == "accuracy"
    assert row["macro_f1"] == pytest.approx(81.25)  # points (percent), as the report's column prints it
    assert row["metrics"] == metrics and row["parameters"] == 1.0
    monkeypatch.setattr(report, "evaluate", lambda model, data: {"accuracy": 0.5})
    assert report.measure(Model(), Enc(), None, texts, None, tmp_path, 1, repeats=1)["macro_f1"] is None


def test_batch_1_latency_is_timed_on_a_sample_of_at_most_latency_texts(monkeypatch, tmp_path):
    monkeypatch.setattr(report, "evaluate", lambda model, data: {"accuracy": 0.5})
    monkeypatch.setattr(report, "LATENCY_TEXTS", 3)
    texts, enc = [f"text {i}" for i in range(10)], Enc()
    row = report.measure(Model(), enc, None, texts, None, tmp_path, 1, repeats=1)
    assert row["latency_texts"] == 3 and enc.singles == {"text 0", "text 3", "text 6"}
    assert row["throughput"] == pytest.approx(10 / row["batch64_seconds"])  # batch 64: every text


def test_pareto_front_ties_keep_the_better_point():
    # equal latency: only the higher score is on the front (the lower one is dominated)
    assert report._frontier(np.array([3.0, 2.0, 2.0]), np.array([90.0, 80.0, 85.0])).tolist() == [2, 0]
    # equal score: only the faster point
    assert report._frontier(np.array([3.0, 2.0]), np.array([85.0, 85.0])).tolist() == [1]


def test_a_variant_above_fp32_is_within_the_budget():
    """--max-drop bounds a loss: a variant 3 points above fp32 is within a budget of 1 point."""
    rows = [{"score": 80.0, "throughput": 100, "latency_p50_ms": 10}, {"score": 83.0, "throughput": 200, "latency_p50_ms": 5}]
    report.add_relative(rows, rows[0], 1.0)
    assert rows[1]["within_budget"] and rows[1]["change"] == pytest.approx(3.0)


def test_round_robin_takes_the_fastest_pass_and_the_true_p50_and_p95(monkeypatch):
    """Batch 64: the fastest of the passes; batch 1: the 50th and 95th percentiles of the timed calls (text i
    takes i + 1 ms on a fake clock; each turn's first call is untimed)."""
    passes = iter([5.0, 2.0, 3.0])
    monkeypatch.setattr(report, "time_batches", lambda run, texts, pairs, batches: next(passes))
    clock = [0.0]
    monkeypatch.setattr(report.time, "perf_counter", lambda: clock[0])

    def run(texts, pairs=None):
        clock[0] += (int(texts[0][1:]) + 1) / 1000

    texts = [f"t{i}" for i in range(100)]
    ((seconds, p50, p95),) = report.round_robin([run], texts, None, [np.arange(100)], repeats=3, warmup=1, chunk=100)
    ms = np.arange(1, 101)
    assert seconds == 2.0
    assert p50 == pytest.approx(float(np.percentile(ms, 50))) and p95 == pytest.approx(float(np.percentile(ms, 95)))


def test_the_plot_draws_the_budget_line_at_fp32_less_max_drop(monkeypatch, tmp_path):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [{"name": "fp32", "score": 90.0, "throughput": 100, "file_mb": 90.0, "latency_p50_ms": 10.0,
             "metric": "accuracy"},
            {"name": "int8", "score": 89.5, "throughput": 400, "file_mb": 23.0, "latency_p50_ms": 3.0,
             "metric": "accuracy"}]
    report.pareto_png(rows, "int8", 2.0, tmp_path / "p.png")
    lines = [line.get_ydata()[0] for line in figures[0].axes[0].get_lines() if line.get_label().startswith("budget")]
    assert lines == [88.0]
