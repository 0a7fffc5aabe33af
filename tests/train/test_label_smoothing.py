"""--label-smoothing: the smoothed losses, fit training on them (with class weights and R-Drop too), and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from oztune.cli import main
from oztune.data.dataset import EncodedData
from oztune.data.load import Columns, encode_examples, label_setup, read_labelled
from oztune.models.hub import load_classifier
from oztune.train.loop import TrainConfig, default_loss, fit, seed_everything

Z = torch.tensor([[0.3, -1.0, 2.0], [2.0, 0.5, -0.5], [-0.2, 0.1, 0.0], [1.5, 1.5, -3.0]])


@pytest.fixture(scope="module")
def data(sentiment_files):
    tr = read_labelled(str(sentiment_files[0]), Columns())[:48]
    problem, label2id = label_setup(tr, None)
    return tr, problem, label2id


def new_model(tiny_base, data):
    tr, problem, label2id = data
    seed_everything(0)
    model, enc, _ = load_classifier(tiny_base, num_labels=2, problem_type=problem)
    return model, encode_examples(tr, enc, label2id, problem, "train")


def test_single_label_smoothing_is_the_textbook_target(tiny_base):
    """Target (1 - e) on the gold class plus e / L on every class: -sum_c target_c log p_c, per example."""
    model, _, _ = load_classifier(tiny_base, num_labels=3, problem_type="single_label")
    y, e, w = torch.tensor([2, 0, 1, 1]), 0.2, torch.tensor([0.5, 1.0, 3.0])
    target = (1 - e) * F.one_hot(y, 3) + e / 3
    per_example = -(target * Z.log_softmax(-1)).sum(-1)
    assert model.loss(Z, y, label_smoothing=e).item() == pytest.approx(per_example.mean().item(), rel=1e-6)
    assert model.loss(Z, y, w, e).item() == pytest.approx((w[y] * per_example).mean().item(), rel=1e-6)
    assert model.loss(Z, y, label_smoothing=0.0).item() == pytest.approx(F.cross_entropy(Z, y).item(), rel=1e-6)


def test_multi_label_smoothing_pulls_each_target_toward_a_half(tiny_base):
    model, _, _ = load_classifier(tiny_base, num_labels=3, problem_type="multi_label")
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    e, w = 0.1, torch.tensor([2.0, 1.0, 0.5])
    t = y * 0.9 + 0.05  # 1 -> 0.95, 0 -> 0.05
    manual = -(w * t * F.logsigmoid(Z) + (1 - t) * F.logsigmoid(-Z)).mean()
    assert model.loss(Z, y, w, e).item() == pytest.approx(manual.item(), rel=1e-6)


def test_regression_and_out_of_range_values_are_refused(tiny_base):
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"TrainConfig.label_smoothing must be in \[0, 1\)"):
            TrainConfig(label_smoothing=bad)
    model, _, _ = load_classifier(tiny_base, num_labels=1, problem_type="regression")
    with pytest.raises(ValueError, match="regression head"):
        model.loss(Z[:, :1], torch.zeros(4), label_smoothing=0.1)
    train = EncodedData([([5, 6, 7], [0, 0, 0])] * 4, torch.tensor([0.5, 1.0, 1.5, 2.0]), 0)
    with pytest.raises(ValueError, match="regression head has no labels to smooth"):
        fit(model, train, TrainConfig(label_smoothing=0.1, epochs=1, batch_size=2, progress=False))


@pytest.mark.parametrize("extra", [{}, {"class_weights": [1.0, 3.0]}, {"rdrop": 0.5}])
def test_fit_trains_on_the_smoothed_loss(tiny_base, data, extra):
    """Every loss fit computes is smoothed by the configured amount (alone, with class weights, under R-Drop),
    and the steps differ from unsmoothed ones."""
    cfg = dict(epochs=1, batch_size=8, lr=3e-3, precision="fp32", progress=False, **extra)
    logs, seen = [], []
    for e in (0.0, 0.3):
        model, train = new_model(tiny_base, data)
        loss = model.loss
        model.loss = lambda *a, **k: (seen.append(a[3] if len(a) > 3 else k.get("label_smoothing", 0.0)),
                                      loss(*a, **k))[1]
        seen.clear()
        logs.append([row["loss"] for row in fit(model, train, TrainConfig(label_smoothing=e, **cfg)).log])
        assert seen and set(seen) == {e}, seen
    assert logs[1] != pytest.approx(logs[0], rel=1e-3)


def test_fit_refuses_label_smoothing_with_a_loss_of_its_own(tiny_base, data):
    model, train = new_model(tiny_base, data)
    with pytest.raises(ValueError, match="label_smoothing smooths the default loss"):
        fit(model, train, TrainConfig(label_smoothing=0.1, epochs=1, batch_size=8, progress=False),
            loss_fn=lambda m, b: default_loss(m, b))


def test_cli_label_smoothing(tiny_base, sentiment_files, tmp_path, capsys):
    out = tmp_path / "m"
    args = ["finetune", "--train", str(sentiment_files[0]), "--output", str(out), "--model", str(tiny_base),
            "--epochs", "1", "--batch-size", "16", "--no-progress", "--max-train-examples", "48"]
    assert main([*args, "--label-smoothing", "0.1"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["args"]["label_smoothing"] == 0.1 and "label smoothing 0.1" in (out / "README.md").read_text()
    capsys.readouterr()
    reg = tmp_path / "reg.jsonl"
    reg.write_text("".join(json.dumps({"text": f"text {i}", "label": i / 3}) + "\n" for i in range(8)))
    for argv, words in [([*args, "--label-smoothing", "1"], "--label-smoothing must be in [0, 1), not 1.0"),
                        ([*args[:2], str(reg), *args[3:], "--label-smoothing", "0.1"],
                         f"--label-smoothing smooths class labels, but {reg} holds regression targets")]:
        never = tmp_path / "never"
        assert main([*[never.__fspath__() if x == str(out) else x for x in argv]]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not never.exists()
