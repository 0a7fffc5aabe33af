"""--class-weights balanced: the weights, the weighted losses, and fit using them (and refusing a resume without them)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from oztune.cli import main
from oztune.data.load import Columns, encode_examples, label_setup, read_labelled
from oztune.models.hub import load_classifier
from oztune.train.loop import TrainConfig, balanced_class_weights, default_loss, fit, seed_everything, weighted_loss


def test_balanced_weights_single_and_multi_label():
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 0])  # 7, 2, 1 of 10
    assert balanced_class_weights(labels, "single_label") == pytest.approx([10 / 21, 10 / 6, 10 / 3])
    multi = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 0, 1], [1, 0, 1]], dtype=torch.float32)
    # label 0: 2 on, 2 off -> 1; label 1 never on -> 1; label 2 always on -> 1
    assert balanced_class_weights(multi, "multi_label") == [1.0, 1.0, 1.0]
    multi[1:, 0] = 0  # label 0: 1 on, 3 off
    assert balanced_class_weights(multi, "multi_label")[0] == 3.0
    with pytest.raises(ValueError):
        balanced_class_weights(torch.zeros(3), "regression")


@pytest.fixture(scope="module")
def data(sentiment_files):
    tr = read_labelled(str(sentiment_files[0]), Columns())[:64]
    problem, label2id = label_setup(tr, None)
    return tr, problem, label2id


def new_model(tiny_base, data, problem_type=None):
    tr, problem, label2id = data
    seed_everything(0)
    model, enc, _ = load_classifier(tiny_base, num_labels=2, problem_type=problem)
    return model, encode_examples(tr, enc, label2id, problem, "train")


def test_weighted_losses_weigh_each_example_by_its_label(tiny_base, data):
    model, train = new_model(tiny_base, data)
    batch = train.batch(list(range(12)))
    w = [0.5, 4.0]
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        got = weighted_loss(w)(model, batch)
    per_example = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
    wy = torch.tensor(w)[batch["labels"]]
    assert got.item() == pytest.approx((wy * per_example).mean().item(), rel=1e-5)  # over examples, not weights
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    z = torch.tensor([[0.3, -1.0], [2.0, 0.5], [-0.2, 0.1]])
    model.head_cfg.problem_type = "multi_label"
    manual = -(torch.tensor(w) * y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)).mean()
    assert model.loss(z, y, torch.tensor(w)).item() == pytest.approx(manual.item(), rel=1e-5)


def test_fit_trains_on_the_weighted_loss(tiny_base, data, tmp_path):
    cfg = dict(epochs=1, batch_size=8, lr=3e-3, precision="fp32", progress=False)
    results = []
    for weights in (None, [1.0, 1.0], [0.2, 5.0]):
        model, train = new_model(tiny_base, data)
        results.append(fit(model, train, TrainConfig(class_weights=weights, **cfg)).log)
    plain, ones, skewed = ([row["loss"] for row in log] for log in results)
    assert ones == pytest.approx(plain, rel=1e-6)  # equal weights: the plain mean
    assert skewed != pytest.approx(plain, rel=1e-2)  # other weights: another loss, other steps
    model, train = new_model(tiny_base, data)
    with pytest.raises(ValueError, match="own loss_fn"):
        fit(model, train, TrainConfig(class_weights=[1.0, 2.0], **cfg), loss_fn=lambda m, b: default_loss(m, b))


def test_cli_class_weights_balanced(tiny_base, sentiment_files, tmp_path):
    from oztune.errors import OztuneError  # noqa: F401  (the CLI turns it into exit code 2)

    train = tmp_path / "imbalanced.tsv"
    lines = sentiment_files[0].read_text().splitlines()
    neg = [x for x in lines[1:] if x.endswith("\t0") or x.endswith("\tneg")]
    pos = [x for x in lines[1:] if x not in neg]
    train.write_text("\n".join([lines[0], *neg[:60], *pos[:15]]) + "\n")
    out = tmp_path / "m"
    args = ["finetune", "--train", str(train), "--output", str(out), "--model", str(tiny_base), "--epochs", "1",
            "--batch-size", "16", "--no-progress"]
    assert main([*args, "--class-weights", "balanced"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["class_weights"] == pytest.approx([75 / 120, 75 / 30], rel=1e-5)
    assert main([*args, "--class-weights", "inverse"]) == 2


def test_resuming_with_other_class_weights_is_refused(tiny_base, data, tmp_path):
    from oztune.errors import OztuneError

    class Crash(Exception):
        pass

    def crash(step, total):
        if step == 2:
            raise Crash

    cfg = dict(epochs=1, batch_size=8, lr=3e-3, precision="fp32", progress=False, checkpoint_dir=str(tmp_path),
               checkpoint_every=1)
    model, train = new_model(tiny_base, data)
    with pytest.raises(Crash):
        fit(model, train, TrainConfig(class_weights=[1.0, 2.0], **cfg), on_step=crash)
    model, train = new_model(tiny_base, data)
    with pytest.raises(OztuneError, match="class_weights"):
        fit(model, train, TrainConfig(resume=True, **cfg))


def test_class_weights_with_grad_accum_weigh_the_whole_step(tiny_base, sentiment_files, monkeypatch):
    """Two accumulated micro-batches of 8 give the gradient of the step's 16 examples (review, session 9)."""
    import copy

    import oztune.train.loop as loop
    from oztune.models.transformer import Dropout

    tr = read_labelled(str(sentiment_files[0]), Columns())[:64]
    problem, label2id = label_setup(tr, None)
    loop.seed_everything(0)
    model, enc, _ = load_classifier(tiny_base, num_labels=2, problem_type=problem)
    train = encode_examples(tr, enc, label2id, problem, "train")
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = 0.0
    start, w, batches, grads, real = copy.deepcopy(model), [1.0, 5.0], [], [], loop.weighted_loss
    monkeypatch.setattr(loop, "weighted_loss", lambda *a: (lambda m, b: (batches.append(b), real(*a)(m, b))[1]))
    monkeypatch.setattr(loop, "clipped_step", lambda opt, ps, mx: (grads.append(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}), opt.step()))
    loop.fit(model, train, loop.TrainConfig(epochs=1, batch_size=8, grad_accum=2, precision="fp32",
                                            max_grad_norm=0.0, progress=False, class_weights=w))
    start.train()
    logits = torch.cat([start(b["input_ids"], b["attention_mask"], b.get("token_type_ids")) for b in batches[:2]])
    labels = torch.cat([b["labels"] for b in batches[:2]])
    wy = torch.tensor(w)[labels]
    assert wy[:8].sum() != wy[8:].sum()  # the two micro-batches weigh differently
    (wy * F.cross_entropy(logits.float(), labels, reduction="none")).mean().backward()
    for n, p in start.named_parameters():  # the step's 16 weighted losses' mean, as 1 batch of 16 or 2 procs x 8
        if p.grad is not None:
            torch.testing.assert_close(grads[0][n], p.grad, atol=1e-6, rtol=1e-4)


def test_balanced_weights_count_a_label_missing_from_the_data():
    # labels 0 and 1 only, of 3: each present class weighs N / (3 x count), the absent one 1
    assert balanced_class_weights(torch.tensor([0, 0, 0, 1]), "single_label", num_labels=3) == \
        pytest.approx([4 / 9, 4 / 3, 1.0])


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0]])
def test_fit_refuses_class_weights_not_one_per_label(tiny_base, data, weights):
    model, train = new_model(tiny_base, data)  # 2 labels
    with pytest.raises(ValueError, match=rf"class_weights has {len(weights)} weight\(s\) but the model's head has 2"):
        fit(model, train, TrainConfig(class_weights=weights, epochs=1, batch_size=8, progress=False))


def test_negative_class_weights_and_weights_for_regression_are_refused(tiny_base):
    with pytest.raises(ValueError, match="TrainConfig.class_weights must be 0 or more each"):
        TrainConfig(class_weights=[1.0, -1.0])
    model, _, _ = load_classifier(tiny_base, num_labels=1, problem_type="regression")
    from oztune.data.dataset import EncodedData

    train = EncodedData([([5, 6, 7], [0, 0, 0])] * 4, torch.tensor([0.5, 1.0, 1.5, 2.0]), 0)
    with pytest.raises(ValueError, match="regression head has none"):
        fit(model, train, TrainConfig(class_weights=[1.0], epochs=1, batch_size=2, progress=False))


def test_balanced_weights_give_a_label_absent_from_the_data_a_weight():
    """A label of the head that the sample lacks (the last of three) still gets a weight: one per output."""
    assert balanced_class_weights(torch.tensor([0, 0, 1]), "single_label", 3) == pytest.approx([0.5, 1.0, 1.0])


def test_balanced_multi_label_weights_are_negatives_over_positives():
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert balanced_class_weights(labels, "multi_label") == pytest.approx([3.0, 1.0])
