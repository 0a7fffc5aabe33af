"""torchrun data parallelism: 2 processes x batch 16 on CPU (gloo) end where 1 process x batch 32 does.

Why they can match: under torchrun every rank builds the same global batches of batch_size x processes
(same shuffling and length bucketing as one process with the larger batch) and trains on its strided
slice; each rank weights its mean loss by its share of the global batch and gradients are summed, which
is the gradient of the mean over the global batch. Dropout is off (each rank draws its own masks).
What is left is float rounding: sums over 16 + 16 examples instead of 32, padding to each slice's longest
text instead of the batch's; AdamW then scales tiny gradient differences up. Observed: max |difference|
about 1e-5 after 14 steps at lr 3e-3, where training moved weights by up to about 0.04; tolerance 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_tiny_tokenizer
from oztune.cli import main

EXAMPLES = 193  # 6 global batches of 32 and one of a single example: rank 1's slice of it is empty


@pytest.fixture(scope="module")
def base_no_dropout(tmp_path_factory):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    d = tmp_path_factory.mktemp("base-no-dropout")
    T.BertModel(cfg).save_pretrained(d)
    write_tiny_tokenizer(d, 64)
    return d


def finetune_args(base, files, out, batch_size: int) -> list[str]:
    train, dev = files
    return ["finetune", "--train", str(train), "--eval", str(dev), "--model", str(base), "--output", str(out),
            "--epochs", "2", "--batch-size", str(batch_size), "--max-train-examples", str(EXAMPLES), "--lr", "3e-3",
            "--precision", "fp32", "--head-dropout", "0"]


@pytest.mark.parametrize("extra, steps", [([], [7, 14]),  # evaluations at epoch ends; and a weight average
                                          (["--ema-decay", "0.9", "--eval-every", "3"], [3, 6, 7, 9, 12, 14])])
def test_two_processes_of_16_match_one_process_of_32(base_no_dropout, sentiment_files, tmp_path, extra, steps):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(finetune_args(base_no_dropout, sentiment_files, one, 32) + extra) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "oztune", *finetune_args(base_no_dropout, sentiment_files, two, 16), *extra],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("fine-tuned") == 1 and r.stdout.count("oztune: fine-tuning") == 1, "only rank 0 reports"
    assert "2 processes x batch 16" in r.stdout

    base, a, b = load_file(base_no_dropout / "model.safetensors"), load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    moved = max((a["bert." + k] - v).abs().max().item() for k, v in base.items() if "bert." + k in a)
    assert moved > 5e-3, "training must move the weights for the comparison to mean anything"
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, f"2 x 16 differs from 1 x 32 by {worst:.2e}"

    run1, run2 = (json.loads((d / "run.json").read_text()) for d in (one, two))
    assert run2["processes"] == 2 and run1["processes"] == 1
    assert [h["step"] for h in run2["history"]] == [h["step"] for h in run1["history"]] == steps
    for h1, h2 in zip(run1["history"], run2["history"]):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-4)
        assert h2["accuracy"] == h1["accuracy"]


BROADCAST = textwrap.dedent("""
    import json
    import torch
    from oztune.train import distributed as D

    env = D.init_from_env()
    torch.manual_seed(env.rank)  # each rank its own weights
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    for t in model.state_dict().values():  # buffers too (a batch norm's weights start equal on every rank)
        if t.is_floating_point():
            t.normal_()
    before = D.gather_objects({k: v.clone() for k, v in model.state_dict().items()})
    D.broadcast_model(model)
    after = D.gather_objects(model.state_dict())
    if env.is_main:
        print(json.dumps({k: [not torch.equal(before[0][k], before[1][k]),
                              all(torch.equal(a[k], before[0][k]) for a in after)] for k in before[0]}))
    D.shutdown()
""")


def test_broadcast_model_gives_every_rank_rank_0s_parameters_and_buffers(tmp_path):
    script = tmp_path / "broadcast.py"
    script.write_text(BROADCAST)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])  # per tensor: [differed before, rank 0's after]
    assert all(differed for k, (differed, _) in result.items() if k != "1.num_batches_tracked")
    assert {k: same for k, (_, same) in result.items()} == dict.fromkeys(result, True)


TEARDOWN = textwrap.dedent("""
    import json
    import os
    import sys
    import torch
    from oztune.train import distributed as D

    env = D.init_from_env()
    model = torch.nn.Linear(4, 3)
    model(torch.ones(2, 4)).sum().backward()
    torch.optim.AdamW(model.parameters()).step()  # as in training: imports torch._dynamo after the group is joined
    import torch._dynamo  # noqa: F401  (whichever step or module imports it)
    D.barrier()
    D.shutdown()
    threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    with open(os.path.join(sys.argv[1], f"rank{env.rank}.json"), "w") as f:
        json.dump(sorted(t for t in threads if "gloo" in t), f)
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through Linux's /proc")
def test_shutdown_stops_the_groups_threads(tmp_path):
    """Left running into interpreter shutdown, gloo's threads now and then abort a rank at exit ("terminate
    called without an active exception"); torch.distributed.nn.functional, imported after the group was
    joined, kept the group (and its threads) alive past destroy_process_group."""
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    left = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert left == {0: [], 1: []}, f"gloo threads still running after shutdown: {left}"


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "oztune", *args], capture_output=True, text=True, timeout=600)


def _one_then_two_processes(tmp_path, args) -> tuple[Path, Path, dict, dict]:
    """``args(out, 32)`` in one process, then ``args(out, 16)`` under torchrun in two, beside the ``teacher``
    directory: only rank 0 reports and saves. Returns the two output directories and their run records."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(one, 32)) == 0
    r = _torchrun(args(two, 16))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("saved to") == 1, "only rank 0 reports"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "teacher", "two"], "a rank's save left something"
    run1, run2 = (json.loads((d / "run.json").read_text()) for d in (one, two))
    return one, two, run1, run2


def test_distill_in_two_processes_saves_once_and_matches_one_process(base_no_dropout, sentiment_files, tmp_path):
    """`torchrun ... oztune distill` trains each rank's share of the batches; rank 0 alone saves and reports."""
    train, dev = sentiment_files
    teacher = tmp_path / "teacher"
    assert main(finetune_args(base_no_dropout, sentiment_files, teacher, 32)) == 0

    def distill(out, batch_size: int) -> list[str]:
        return ["distill", "--teacher", str(teacher), "--train", str(train), "--eval", str(dev), "--output", str(out),
                "--student-layers", "1", "--epochs", "1", "--batch-size", str(batch_size), "--max-train-examples",
                str(EXAMPLES), "--lr", "3e-3", "--precision", "fp32", "--no-progress"]

    one, two, run1, run2 = _one_then_two_processes(tmp_path, distill)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, f"2 x 16 differs from 1 x 32 by {worst:.2e}"
    assert run2["history"][-1]["train_loss"] == pytest.approx(run1["history"][-1]["train_loss"], rel=1e-4)


@pytest.mark.parametrize("structured", [False, True])
def test_prune_in_two_processes_trains_data_parallel_and_saves_once(base_no_dropout, sentiment_files, tmp_path,
                                                                    structured):
    """`torchrun ... oztune prune`: every rank trains its share of each batch (the recovery's steps are one
    process's with the global batch); rank 0 alone evaluates, saves and reports. Both ranks used to save the same
    directory at once and print the report twice; --structured ranks cut the same parts (rank 0's ranking)."""
    train, dev = sentiment_files
    teacher = tmp_path / "teacher"
    assert main(finetune_args(base_no_dropout, sentiment_files, teacher, 32)) == 0

    def prune(out, batch_size: int) -> list[str]:
        return ["prune", "--model", str(teacher), "--train", str(train), "--eval", str(dev), "--output", str(out),
                "--epochs", "1", "--batch-size", str(batch_size), "--max-train-examples", str(EXAMPLES), "--lr", "3e-3",
                "--precision", "fp32", "--no-progress", "--sparsity", "0.5",
                *(["--structured", "--importance-batches", "2"] if structured else [])]

    _, _, run1, run2 = _one_then_two_processes(tmp_path, prune)
    assert [h["step"] for h in run2["history"]] == [h["step"] for h in run1["history"]] == [7]  # global batches of 32
    assert run2["parameters"] == run1["parameters"] and run2["sparsity"] == pytest.approx(run1["sparsity"], abs=0.01)
    if not structured:  # (--structured ranks its parts on batches of --batch-size, 16 here and 32 there: which
        # heads go may differ, how many may not)
        assert run2["shape"] == run1["shape"]
        assert run2["history"][-1]["train_loss"] == pytest.approx(run1["history"][-1]["train_loss"], rel=1e-3)


def test_compress_in_two_processes_trains_data_parallel_and_rank_0_alone_measures_and_saves(base_no_dropout,
                                                                                           sentiment_files, tmp_path):
    """`torchrun ... oztune compress`: the recoveries train data-parallel; rank 0 alone measures the variants,
    chooses and writes. Every rank used to measure (each timing disturbed by the other), choose (not always the
    same variant) and write the same output directory."""
    train, dev = sentiment_files
    teacher = tmp_path / "teacher"
    assert main(finetune_args(base_no_dropout, sentiment_files, teacher, 32)) == 0
    out = tmp_path / "out"
    r = _torchrun(["compress", "--model", str(teacher), "--train", str(train), "--eval", str(dev), "--output", str(out),
                   "--recipes", "prune", "--sizes", "0.5", "--epochs", "1", "--batch-size", "16", "--importance-batches",
                   "2", "--max-train-examples", str(EXAMPLES), "--precision", "fp32", "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    measured, kept = [n for n in lines if n.startswith("fp32: ")], [n for n in lines if n.startswith("kept ")]
    assert len(measured) == 1 and len(kept) == 1, "only rank 0 measures and reports"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "teacher"], "a rank's save left something"
    report = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["fp32", "prune50"]
    recovery = report["variants"][1]["recovery"]["history"]
    assert [h["step"] for h in recovery] == [7], "one step per global batch of 2 x 16"


def test_quantize_with_qat_in_two_processes_trains_data_parallel_and_saves_once(base_no_dropout, sentiment_files,
                                                                              tmp_path):
    """`torchrun ... oztune quantize --qat-train`: the quantization-aware fine-tuning trains data-parallel (2 x 16
    ends where 1 x 32 does); rank 0 alone evaluates, saves and reports. Both ranks used to save the same directory
    at once and print the report twice."""
    train, dev = sentiment_files
    teacher = tmp_path / "teacher"
    assert main(finetune_args(base_no_dropout, sentiment_files, teacher, 32)) == 0

    def quantize(out, batch_size: int) -> list[str]:
        return ["quantize", "--model", str(teacher), "--qat-train", str(train), "--eval", str(dev), "--output", str(out),
                "--batch-size", str(batch_size), "--max-train-examples", str(EXAMPLES), "--qat-lr", "3e-3",
                "--no-progress"]

    one, two, run1, run2 = _one_then_two_processes(tmp_path, quantize)
    assert [h["step"] for h in run2["qat"]["history"]] == [h["step"] for h in run1["qat"]["history"]] == [7]
    assert run2["qat"]["history"][-1]["train_loss"] == pytest.approx(run1["qat"]["history"][-1]["train_loss"], rel=1e-3)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    scales = [k for k in a if k.endswith("weight_scale")]
    assert scales and max((a[k] - b[k]).abs().max().item() for k in scales) < 1e-4
