"""Distillation on a tiny model: the losses, a student that learns from its teacher, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from oztune.cli import main
from oztune.compress.distillation import DistillConfig, default_layer_map, distill, soft_loss, student_from_layers
from oztune.data.load import Columns, encode_examples, read_labelled
from oztune.models.hub import load_classifier, save_classifier
from oztune.train.loop import TrainConfig, evaluate, predict_logits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tiny_finetuned):
    """A tiny classifier trained on the synthetic sentiment task (accuracy near 1)."""
    return tiny_finetuned


def encoded(path, enc):
    return encode_examples(read_labelled(str(path), Columns()), enc, {"neg": 0, "pos": 1}, "single_label", str(path))


def test_soft_loss_is_zero_only_when_outputs_agree():
    t = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    assert soft_loss(t, t, "single_label", 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_loss(t.flip(-1), t, "single_label", 2.0).item() > 0.1
    assert soft_loss(t, t, "regression", 1.0).item() == 0
    ml = soft_loss(t, t, "multi_label", 1.0).item()  # BCE to soft targets: its minimum is the targets' entropy
    assert soft_loss(-t, t, "multi_label", 1.0).item() > ml


def test_default_layer_map_spreads_to_the_last_layer():
    assert default_layer_map(3, 6) == [1, 3, 5] and default_layer_map(2, 2) == [0, 1] and default_layer_map(1, 4) == [3]


@pytest.mark.parametrize("hidden_weight", [0.0, 1.0])
def test_a_one_layer_student_learns_from_the_teacher(teacher_dir, sentiment_files, hidden_weight):
    train, dev = sentiment_files
    teacher, enc, _ = load_classifier(teacher_dir)
    train_data, dev_data = encoded(train, enc).subset(range(160)), encoded(dev, enc)
    assert evaluate(teacher, dev_data)["accuracy"] >= 0.9
    student, kept = student_from_layers(teacher, 1)
    assert kept == [0] and student.cfg.num_layers == 1 and teacher.cfg.num_layers == 2
    torch.manual_seed(0)
    torch.nn.init.normal_(student.head.out.weight, std=0.5)  # start the student off wrong
    assert evaluate(student, dev_data)["accuracy"] < 0.8
    cfg = TrainConfig(epochs=3, batch_size=16, lr=5e-3, progress=False, precision="fp32")
    result = distill(teacher, student, train_data, cfg,
                     DistillConfig(temperature=2.0, alpha=0.7, hidden_weight=hidden_weight, layer_map=kept), dev_data)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.best["accuracy"] >= 0.9
    agree = (predict_logits(student, dev_data).argmax(1) == predict_logits(teacher, dev_data).argmax(1)).mean()
    assert agree >= 0.9


def test_distill_rejects_a_student_with_other_outputs(teacher_dir, tiny_base, sentiment_files):
    from oztune.errors import OztuneError

    teacher, enc, _ = load_classifier(teacher_dir)
    other, _, _ = load_classifier(tiny_base, num_labels=3)
    with pytest.raises(OztuneError, match="outputs"):
        distill(teacher, other, encoded(sentiment_files[0], enc), TrainConfig(epochs=1, progress=False))


def test_distill_cli_student_layers(teacher_dir, sentiment_files, tmp_path, capsys):
    train, dev = sentiment_files
    out = tmp_path / "student"
    code = main(["distill", "--teacher", str(teacher_dir), "--train", str(train), "--eval", str(dev),
                 "--output", str(out),
                 "--student-layers", "1", "--epochs", "1", "--lr", "3e-3", "--temperature", "3", "--alpha", "0.8",
                 "--max-train-examples", "100", "--no-progress", "--precision", "fp32"])
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["oztune"]["model"]["num_layers"] == 1
    run = json.loads((out / "run.json").read_text())
    assert run["train_examples"] == 100 and run["args"]["temperature"] == 3
    card = (out / "README.md").read_text()
    assert card.startswith("# distilled student") and f"| accuracy | {run['teacher_metrics']['accuracy']:.4f} |" in card
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(dev), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(run["metrics"]["accuracy"])


def test_distill_cli_from_a_pruned_student(teacher_dir, sentiment_files, tmp_path):
    from oztune.compress.prune import PruneConfig, prune_

    train, dev = sentiment_files
    teacher, enc, meta = load_classifier(teacher_dir)
    prune_(teacher, PruneConfig(heads=0.5, ffn=0.5), encoded(train, enc))
    pruned = save_classifier(teacher, enc, tmp_path / "pruned", meta["id2label"])
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher_dir), "--student", str(pruned), "--train", str(train),
                 "--eval", str(dev), "--output", str(out), "--epochs", "1", "--lr", "3e-3", "--no-progress",
                 "--precision", "fp32"]) == 0
    run = json.loads((out / "run.json").read_text())
    # half of the 2 x 4 heads, ranked across layers (near-ties in a tiny random model may go either way)
    assert sum(run["student"]["heads"]) == 4 and run["metrics"]["accuracy"] >= 0.8


def test_distill_refuses_a_student_with_another_vocabulary(teacher_dir, sentiment_files, tmp_path, capsys):
    import shutil

    student = tmp_path / "student-in"
    shutil.copytree(teacher_dir, student)
    tok = json.loads((student / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["brandnewword"] = vocab.pop("good")  # another word at an id: the teacher's ids no longer mean the same
    (student / "tokenizer.json").write_text(json.dumps(tok))
    train, dev = sentiment_files
    assert main(["distill", "--teacher", str(teacher_dir), "--student", str(student), "--train", str(train),
                 "--eval", str(dev), "--output", str(tmp_path / "out"), "--epochs", "1", "--no-progress"]) == 2
    assert "its tokenizer's vocabulary differs from the teacher's" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--student-layers", "3"], "--student-layers must be between 1 and 2"),
    ([], "give exactly one of --student DIR or --student-layers N"),
    (["--student-layers", "1", "--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--student-layers", "1", "--temperature", "0"], "--temperature must be a positive, finite number"),
])
def test_distill_bad_options_exit_2(teacher_dir, sentiment_files, tmp_path, args, message, capsys):
    train, dev = sentiment_files
    code = main(["distill", "--teacher", str(teacher_dir), "--train", str(train), "--eval", str(dev),
                 "--output", str(tmp_path / "s"), "--no-progress", "--precision", "fp32", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_distill_eval_file_with_unknown_labels_exits_2(teacher_dir, sentiment_files, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood movie\tpos\nmeh\tneutral\n")
    code = main(["distill", "--teacher", str(teacher_dir), "--train", str(sentiment_files[0]), "--eval", str(bad),
                 "--output", str(tmp_path / "s"), "--student-layers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "neutral" in err and str(bad) in err


def test_soft_loss_values():
    s, t = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.3, -2.0]]), torch.tensor([[1.0, 0.0, 0.5], [-1.0, 2.0, 0.0]])
    T = 2.0
    p_t, log_p_s = (t / T).softmax(-1), (s / T).log_softmax(-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()  # KL(teacher || student) per example, averaged
    assert soft_loss(s, t, "single_label", T).item() == pytest.approx((T * T * kl).item(), rel=1e-5)
    q = (t / T).sigmoid()
    bce = -(q * (s / T).sigmoid().log() + (1 - q) * (1 - (s / T).sigmoid()).log()).mean()
    assert soft_loss(s, t, "multi_label", T).item() == pytest.approx((T * T * bce).item(), rel=1e-5)
    assert soft_loss(s, t, "regression", T).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)


def _student_and_teacher(tiny_base):
    from oztune.models.transformer import Dropout

    torch.manual_seed(0)
    teacher, enc, _ = load_classifier(tiny_base, num_labels=2)
    student, _, _ = load_classifier(tiny_base, num_labels=2)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for m in (*teacher.modules(), *student.modules()):
        if isinstance(m, Dropout):
            m.p = 0.0
    return teacher.eval(), student.eval(), enc


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])  # (0.5: the default of distill, prune and compress)
def test_distill_loss_mixes_soft_and_hard_by_alpha(tiny_base, alpha):
    import torch.nn.functional as F

    from oztune.compress.distillation import distill_loss_fn

    teacher, student, enc = _student_and_teacher(tiny_base)
    batch = enc(["good movie", "the plot was dull and bad", "fine"])
    batch["labels"] = torch.tensor([1, 0, 1])
    with torch.no_grad():
        batch["teacher_logits"] = teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        logits = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        got = distill_loss_fn(None, DistillConfig(temperature=3.0, alpha=alpha))(student, batch)
    want = alpha * soft_loss(logits, batch["teacher_logits"], "single_label", 3.0) + (1 - alpha) * F.cross_entropy(
        logits, batch["labels"])
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_hidden_state_loss_is_a_masked_mean_over_real_tokens(tiny_base):
    from oztune.compress.distillation import distill_loss_fn

    teacher, student, enc = _student_and_teacher(tiny_base)
    batch = enc(["good movie", "the plot was dull and bad but the film is not awful"])
    batch["labels"] = torch.tensor([1, 0])

    def states(model):
        out = []
        hooks = [b.register_forward_hook(lambda m, a, o: out.append(o)) for b in model.backbone.layers]
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], all_tokens=True)
        for h in hooks:
            h.remove()
        return logits, out

    with torch.no_grad():
        s_logits, s_states = states(student)
        t_logits, t_states = states(teacher)
        got = distill_loss_fn(teacher, DistillConfig(alpha=1.0, hidden_weight=2.0, layer_map=[0, 1]))(student, batch)
    real = batch["attention_mask"].bool()  # (B, T)
    assert not real.all()  # the short text is padded
    hidden = sum(((s - t)[real] ** 2).mean() for s, t in zip(s_states, t_states)) / len(s_states)
    want = soft_loss(s_logits, t_logits, "single_label", 2.0) + 2.0 * hidden
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_a_layer_dropped_student_loads_in_transformers_with_the_same_logits(tiny_hf_dir, tmp_path):
    """Dropping whole layers leaves a standard checkpoint of the family (fewer layers): HF loads it as it is."""
    import transformers as T

    from conftest import padded_batch

    d, _ = tiny_hf_dir("bert")
    teacher, enc, meta = load_classifier(d)
    student, kept = student_from_layers(teacher, 1)
    out = save_classifier(student, enc, tmp_path / "student", meta["id2label"])
    hf = T.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.num_hidden_layers == 1 and len(kept) == 1
    ids, mask = padded_batch(0)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits, student.eval()(ids, mask),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows, cols", [(-1, 0), (+1, 0), (0, 1)])  # a row too few or too many, a column too many
def test_distill_refuses_teacher_logits_not_one_row_per_example(teacher_dir, sentiment_files, rows, cols):
    teacher, enc, _ = load_classifier(teacher_dir)
    train = encoded(sentiment_files[0], enc).subset(range(16))
    student, _ = student_from_layers(teacher, 1)
    logits = torch.from_numpy(predict_logits(teacher, train))
    wrong = torch.zeros(len(train) + rows, logits.shape[1] + cols)
    with pytest.raises(ValueError, match=rf"teacher_logits has shape \({len(train) + rows}, {2 + cols}\): expected "
                                         rf"\({len(train)}, 2\)"):
        distill(teacher, student, train, TrainConfig(epochs=1, batch_size=4, progress=False), teacher_logits=wrong)
