"""The trade-off report: relative figures, the budget, the Pareto front, and the three files."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from oztune.compress.report import (_frontier, add_relative, round_robin, sorted_batches, time_batches,
                                   write_report)


def row(name: str, score: float, ms: float, mb: float, tput: float) -> dict:
    return {"name": name, "recipe": name.split("-")[0], "shape": "L6 H72 F9216", "score": score, "metric": "accuracy",
            "macro_f1": score - 0.1, "file_mb": mb, "parameters": 22.7, "latency_p50_ms": ms,
            "latency_p95_ms": ms * 1.4, "latency_texts": 256, "throughput": tput, "batch64_seconds": 872 / tput}


@pytest.fixture
def rows():
    rs = [row("fp32", 86.6, 6.0, 90.9, 300), row("int8", 86.4, 2.5, 23.0, 1100), row("prune50", 86.0, 3.5, 55.0, 600),
          row("prune50-int8", 85.8, 1.6, 14.0, 1900), row("prune33-int8", 84.9, 1.2, 12.0, 2500)]
    add_relative(rs, rs[0], max_drop=1.0)
    return rs


def test_relative_figures_and_budget(rows):
    by = {r["name"]: r for r in rows}
    assert by["fp32"]["change"] == 0 and by["fp32"]["speedup"] == 1 and by["fp32"]["within_budget"]
    assert by["prune50-int8"]["change"] == pytest.approx(-0.8) and by["prune50-int8"]["within_budget"]
    assert not by["prune33-int8"]["within_budget"]
    assert by["int8"]["speedup"] == pytest.approx(1100 / 300)
    assert by["int8"]["latency_speedup"] == pytest.approx(6.0 / 2.5)


def test_pareto_front_is_the_non_dominated_points():
    x = np.array([6.0, 2.5, 3.5, 1.6, 1.2])
    y = np.array([86.6, 86.4, 86.0, 85.8, 84.9])
    assert _frontier(x, y).tolist() == [4, 3, 1, 0]  # prune50 (slower and worse than int8) is dominated


def test_report_files(rows, tmp_path):
    write_report(tmp_path, rows, "prune50-int8", 1.0, {"model": "m", "eval": "dev.tsv", "eval_examples": 872,
                                                       "threads": 2, "seconds": 12.0})
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["chosen"] == "prune50-int8" and [v["name"] for v in data["variants"]] == [r["name"] for r in rows]
    md = (tmp_path / "report.md").read_text()
    assert "**prune50-int8** (kept)" in md and "| prune33-int8 |" in md and "-0.80" in md and "pareto.png" in md
    # accuracy's points are percent, said as before (pearson and micro-F1 x100: test_report_units)
    assert "budget: at most 1 point(s) of accuracy below fp32 (86.60)." in md and "- Scores in points (percent)." in md
    assert "| variant | layers heads FFN vocab | accuracy | change (pt) |" in md
    assert "**Kept: `prune50-int8`** (the fastest within the budget by batch-64 throughput): accuracy 85.80" in md
    png = (tmp_path / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_shows_sizes_under_a_megabyte_in_kb(rows, tmp_path):
    """One decimal in MB showed a 12.3 kB model as 0.0 MB; report.json keeps file_mb, a number of MB."""
    rows[3]["file_mb"] = 0.0123
    write_report(tmp_path, rows, "prune50-int8", 1.0, {"model": "m", "eval": "dev.tsv", "threads": 2})
    md = (tmp_path / "report.md").read_text()
    assert "(-0.80 pt), 12.3 kB," in md and "| 12.3 kB |" in md and "| 90.9 MB |" in md and "| file size |" in md
    assert json.loads((tmp_path / "report.json").read_text())["variants"][3]["file_mb"] == 0.0123


class Tok:
    """A stand-in encoder: one token per word."""

    def encode(self, texts, pairs=None):
        return [(t.split(), []) for t in texts]


def test_sorted_batches_group_by_length():
    texts = ["a b c", "a", "a b c d e", "a b", "a b c d"]
    batches = sorted_batches(Tok(), texts, batch_size=2)
    assert [b.tolist() for b in batches] == [[2, 4], [0, 3], [1]]


def test_timers_run_every_text():
    seen = []
    texts = [f"t{i}" for i in range(7)]
    seconds = time_batches(lambda t, p: seen.extend(t), texts, None, [np.array([0, 1, 2]), np.array([3, 4, 5, 6])])
    assert seconds >= 0 and sorted(seen) == sorted(texts[:3] + texts)  # the warm-up batch, then every batch once



def test_round_robin_times_every_model_in_turns_on_every_text():
    calls = []
    texts = [f"t{i}" for i in range(7)]
    batches = [np.array([0, 1, 2]), np.array([3, 4, 5, 6])]
    runs = [lambda t, p, k=k: calls.append((k, t[0])) for k in "ab"]
    (s_a, p50_a, p95_a), (s_b, p50_b, p95_b) = round_robin(runs, texts, None, batches, repeats=2, warmup=2, chunk=3)
    assert s_a > 0 and s_b > 0 and 0 <= p50_a <= p95_a and 0 <= p50_b <= p95_b
    passes, singles = calls[:2 * 2 * 3], calls[2 * 2 * 3:]  # 2 repeats x 2 models x (warm-up + 2 batches)
    assert [k for k, _ in passes] == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3  # each pass every model once
    turn = lambda k, ts: [(k, ts[0])] + [(k, t) for t in ts]  # noqa: E731  (an untimed call, then the chunk)
    assert singles == [("a", "t0"), ("b", "t0"),  # warm-up
                       *turn("a", ["t0", "t1", "t2"]), *turn("b", ["t0", "t1", "t2"]),
                       *turn("a", ["t3", "t4", "t5"]), *turn("b", ["t3", "t4", "t5"]), *turn("a", ["t6"]), *turn("b", ["t6"])]


def test_round_robin_does_not_time_the_call_after_the_other_models_turn():
    """The other model's threads may still spin when a turn starts: that call is not timed."""
    last = []

    def run(name):
        def f(t, p):
            if last and last[-1] != name:
                time.sleep(0.05)  # slowed by the model before
            last.append(name)
        return f

    texts = [f"t{i}" for i in range(8)]
    (_, _, p95_a), (_, _, p95_b) = round_robin([run("a"), run("b")], texts, None, [np.arange(8)], repeats=1, chunk=4)
    assert p95_a < 20 and p95_b < 20  # ms: no timed call was one after a switch


def test_the_latency_sample_is_spread_over_the_file_and_the_same_every_time():
    from oztune.compress.report import LATENCY_TEXTS, latency_sample

    picked = latency_sample(872)
    assert len(picked) == LATENCY_TEXTS == 256 and picked == latency_sample(872)
    assert picked[0] == 0 and all(0 < b - a <= 4 for a, b in zip(picked, picked[1:])) and picked[-1] >= 872 - 4
    assert latency_sample(100) == list(range(100))  # no more texts than the cap: every one
    assert latency_sample(10, 3) == [0, 3, 6] and latency_sample(10, 1) == [0]


def test_round_robin_times_batch_1_on_the_sample_alone_and_batch_64_on_every_text():
    calls = []
    texts = [f"t{i}" for i in range(7)]
    batches = [np.array([0, 1, 2]), np.array([3, 4, 5, 6])]
    runs = [lambda t, p, k=k: calls.append((k, list(t))) for k in "ab"]
    round_robin(runs, texts, None, batches, repeats=1, warmup=2, chunk=2, latency=[1, 4, 6])
    passes, singles = calls[:2 * 3], calls[2 * 3:]  # 1 repeat x 2 models x (warm-up + 2 batches)
    assert sorted(t for k, ts in passes[1:3] for t in ts) == texts  # throughput: every text
    turn = lambda k, ts: [(k, [ts[0]])] + [(k, [t]) for t in ts]  # noqa: E731  (an untimed call, then the chunk)
    assert singles == [("a", ["t1"]), ("b", ["t1"]),  # warm-up, on the sample too
                       *turn("a", ["t1", "t4"]), *turn("b", ["t1", "t4"]), *turn("a", ["t6"]), *turn("b", ["t6"])]


def test_the_signed_change_is_not_headed_drop(rows, tmp_path):
    """The column holds score minus the baseline's (-0.80: 0.8 points worse; +0.11 would be better), yet was
    headed "drop (pt)": a positive "drop" reads as a loss. Header and JSON key say "change"; signs are kept."""
    rows[1]["score"] = 86.71  # int8 better than fp32 by 0.11
    add_relative(rows, rows[0], max_drop=1.0)
    write_report(tmp_path, rows, "prune50-int8", 1.0, {"model": "m", "eval": "dev.tsv", "eval_examples": 872,
                                                       "threads": 2, "seconds": 12.0})
    md = (tmp_path / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| variant |"))
    assert "drop" not in header and "| change (pt) |" in header
    assert "| **prune50-int8** (kept) | L6 H72 F9216 | 85.80 | -0.80 |" in md and "| int8 | L6 H72 F9216 | 86.71 | +0.11 |" in md
    variants = json.loads((tmp_path / "report.json").read_text())["variants"]
    assert "drop" not in variants[1] and variants[1]["change"] == pytest.approx(0.11)
