"""oztune.compress: bugs confirmed by running the code (an audit); each test failed on the code before its fix."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_hf_model, write_tiny_tokenizer
from oztune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--no-progress", "--precision", "fp32", "--epochs", "1", "--max-train-examples", "100", "--importance-batches", "2"]


def _hf_classifier_dir(path, safetensors: bool, bin_: bool):
    """A tiny HF BertForSequenceClassification (labels neg, pos) with its weights as model.safetensors and/or
    pytorch_model.bin, as hub snapshots hold them."""
    from safetensors.torch import save_file

    model = tiny_hf_model("bert", num_labels=2)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model.config.architectures = ["BertForSequenceClassification"]
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    if bin_:
        torch.save(sd, path / "pytorch_model.bin")
    write_tiny_tokenizer(path, 64)
    return path


def test_compress_weighs_the_fp32_baseline_of_a_pytorch_model_bin_input(sentiment_files, tmp_path):
    """report.py weights_mb globs only *.safetensors; for an input model stored as pytorch_model.bin (which
    load_classifier reads) the fp32 row says 0.0 MB, so the int8 variant looks bigger than the fp32 model."""
    train, dev = sentiment_files
    src = _hf_classifier_dir(tmp_path / "hf", safetensors=False, bin_=True)
    out = tmp_path / "out"
    assert main(["compress", "--model", str(src), "--train", str(train), "--eval", str(dev), "--output", str(out),
                 "--recipes", "int8", "--max-drop", "100", *FAST]) == 0
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["variants"]}
    assert rows["fp32"]["file_mb"] > 0, "fp32 baseline weighed as 0 MB"
    assert rows["fp32"]["file_mb"] > rows["int8"]["file_mb"]


def test_quantize_counts_the_source_weights_once_when_both_formats_are_there(tmp_path):
    """commands._weights_mb sums every .safetensors and .bin file: a directory holding model.safetensors and
    pytorch_model.bin (hub snapshots of fine-tuned models often do) reports twice its size as 'before'."""
    from oztune.compress.args import QuantizeArgs
    from oztune.compress.quantize_recipe import run_quantize

    src = _hf_classifier_dir(tmp_path / "hf", safetensors=True, bin_=True)
    run = run_quantize(QuantizeArgs(model=str(src), output=str(tmp_path / "q"), progress=False))
    loaded_mb = (src / "model.safetensors").stat().st_size / 1e6  # the file load_classifier reads
    assert run["file_mb_before"] == pytest.approx(loaded_mb)


def test_compress_sizes_with_the_same_variant_name_do_not_share_a_directory(tiny_finetuned, sentiment_files, tmp_path):
    """--sizes 0.5,0.495: both variants are named prune50 (round(100 * size)); the second overwrites the first's
    variants/prune50, the report lists two rows of one name with different shapes, and whichever 'prune50' is
    kept, the output holds the last one saved. Duplicate names should be refused or made distinct."""
    train, dev = sentiment_files
    out = tmp_path / "out"
    code = main(["compress", "--model", str(tiny_finetuned), "--train", str(train), "--eval", str(dev),
                 "--output", str(out), "--recipes", "prune", "--sizes", "0.5,0.495", "--max-drop", "100", *FAST])
    if code == 2:  # refused: acceptable
        return
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    names = [r["name"] for r in report["variants"]]
    assert len(names) == len(set(names)), f"two variants share a name: {names}"
    assert {p.name for p in (out / "variants").iterdir()} == set(names) - {"fp32"}


def test_compress_with_pruning_of_a_vocabulary_pruned_model(tiny_finetuned, sentiment_files, tmp_path, monkeypatch):
    """A model from compress's pruned recipes holds a pruned vocabulary (VocabEmbedding). Compressing it again
    with a pruning recipe runs the int8 variant and the whole distillation, then fails in prune_vocab_ with
    'already pruned or quantized; prune it before quantizing' (nothing was quantized). It should keep the
    vocabulary as it is (or refuse before any work)."""
    from oztune.compress import search
    from oztune.compress.vocab import prune_vocab_, tokens_seen, unk_id
    from oztune.data.load import Columns, encode_examples, read_labelled
    from oztune.models.hub import load_classifier, save_classifier

    train, dev = sentiment_files
    model, enc, meta = load_classifier(tiny_finetuned)
    data = encode_examples(read_labelled(str(train), Columns()), enc, {"neg": 0, "pos": 1}, "single_label", str(train))
    prune_vocab_(model, tokens_seen(data, model.cfg.vocab_size), unk_id(enc), enc.pad_id)
    src = save_classifier(model, enc, tmp_path / "vocab-pruned", meta["id2label"])

    distilled = []
    real = search.distill
    monkeypatch.setattr(search, "distill", lambda *a, **k: distilled.append(1) or real(*a, **k))
    out = tmp_path / "out"
    code = main(["compress", "--model", str(src), "--train", str(train), "--eval", str(dev), "--output", str(out),
                 "--recipes", "prune", "--sizes", "0.5", "--max-drop", "100", *FAST])
    if code == 2:
        assert not distilled, "refused only after the distillation had run"
        return
    assert code == 0
    assert {r["name"] for r in json.loads((out / "report.json").read_text())["variants"]} == {"fp32", "prune50"}


def test_report_md_claims_no_distillation_when_no_pruned_variant_was_made():
    """With --recipes int8 nothing is pruned or distilled, yet report.md says 'recovery: 2 epoch(s) of
    distillation from fp32 on N examples' and lists the (unused) sizes."""
    from oztune.compress.report import markdown

    rows = [{"name": n, "shape": "L2 H8 F128 V64", "score": s, "metric": "accuracy", "change": s - 90.0,
             "macro_f1": s, "file_mb": mb, "parameters": 0.02, "latency_p50_ms": 1.0, "latency_p95_ms": 2.0,
             "latency_texts": 100, "throughput": t, "speedup": t / 100} for n, s, mb, t in [("fp32", 90.0, 0.1, 100), ("int8", 89.5, 0.03, 150)]]
    settings = {"model": "m", "eval": "dev.tsv", "eval_examples": 100, "recipes": ["int8"], "sizes": [0.5, 0.33],
                "epochs": 2, "train_examples": 200, "threads": 1, "seconds": 3.0, "keep_variants": True}
    md = markdown(rows, "int8", 1.0, settings)
    assert "distillation" not in md, md


def test_pareto_labels_do_not_overlap_when_variants_score_the_same(tmp_path, monkeypatch):
    """Four variants with the same score (a small eval set, or lossless compression): the greedy label placement
    puts fp32's label over prune50-int8's, though free places exist (above / below the markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from oztune.compress.report import pareto_png

    rows = [{"name": n, "score": 100.0, "latency_p50_ms": l, "file_mb": mb, "metric": "accuracy"}
            for n, l, mb in [("fp32", 0.49, 0.094), ("int8", 1.31, 0.032), ("prune50", 0.36, 0.051),
                             ("prune50-int8", 0.64, 0.018)]]
    kept, real_close = {}, plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.setdefault("fig", fig))
    pareto_png(rows, "prune50", 2.0, tmp_path / "pareto.png")
    fig = kept["fig"]
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text

    for t in fig.axes[0].texts:
        t.update_positions(renderer)
    # the texts' own boxes (an annotation's extent also spans its arrow, back to its marker)
    boxes = [(t.get_text().split("\n")[0], Text.get_window_extent(t, renderer)) for t in fig.axes[0].texts]
    overlapping = [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]
    real_close(fig)
    assert not overlapping, f"labels drawn over each other: {overlapping}"


@pytest.mark.parametrize("metric,title", [("pearson", "Pearson"), ("micro_f1", "Micro_f1"),
                                          ("accuracy", "Accuracy")])
def test_pareto_title_names_the_metric_plotted(tmp_path, monkeypatch, metric, title):
    """A regression model's plot (pearson on the y axis) was titled "Accuracy against latency"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from oztune.compress.report import pareto_png

    rows = [{"name": n, "score": s, "latency_p50_ms": l, "file_mb": 0.1, "metric": metric}
            for n, s, l in [("fp32", 83.2, 0.46), ("int8", 80.1, 0.30)]]
    kept, real_close = {}, plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.setdefault("fig", fig))
    pareto_png(rows, "int8", 5.0, tmp_path / "pareto.png")
    ax = kept["fig"].axes[0]
    real_close(kept["fig"])
    assert ax.get_title().splitlines()[0] == f"{title} against latency"
    assert ax.get_ylabel() == ("accuracy (%)" if metric == "accuracy" else f"{metric} x100")  # (no percentage)


def test_a_pareto_front_of_one_variant_is_drawn(tmp_path, monkeypatch):
    """When one variant is both the fastest and the most accurate, the front is that one point: a dotted line
    through one point draws nothing, so the legend named a front the plot did not show. The front's points are
    marked (a dot on each), the others not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from oztune.compress.report import pareto_png

    rows = [{"name": n, "score": s, "latency_p50_ms": l, "file_mb": 0.1, "metric": "accuracy"}
            for n, s, l in [("fp32", 86.8, 16.1), ("int8", 87.0, 17.2), ("prune33", 87.0, 5.6),
                            ("prune33-int8", 87.0, 8.2)]]
    kept, real_close = {}, plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.setdefault("fig", fig))
    pareto_png(rows, "prune33-int8", 1.0, tmp_path / "pareto.png")
    ax = kept["fig"].axes[0]
    real_close(kept["fig"])
    (front,) = [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
    assert front.get_xydata().tolist() == [[5.6, 87.0]]
    assert front.get_marker() not in (None, "", "None", " ") and front.get_markersize() > 0
    assert front.get_zorder() > max(c.get_zorder() for c in ax.collections)  # (over the bubbles, not under them)
