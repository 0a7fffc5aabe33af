"""The training loop in-process: resume after a crash, per-epoch records, embedding freezing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from oztune.data.load import Columns, encode_examples, label_setup, read_labelled
from oztune.models.hub import load_classifier
from oztune.train.loop import TrainConfig, fit, seed_everything


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def data(sentiment_files):
    train, dev = sentiment_files
    tr, ev = read_labelled(str(train), Columns())[:64], read_labelled(str(dev), Columns())[:32]
    problem, label2id = label_setup(tr, None)
    return tr, ev, problem, label2id


def new_model(tiny_base, data):
    tr, ev, problem, label2id = data
    seed_everything(0)
    model, enc, _ = load_classifier(tiny_base, num_labels=2, problem_type=problem)
    return model, encode_examples(tr, enc, label2id, problem, "train"), encode_examples(ev, enc, label2id, problem, "dev")


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 8, "lr": 3e-3, "precision": "fp32", "grad_accum": 2,
                          "progress": False, **kw})


def crash_at(step: int):
    def on_step(s, total):
        if s == step:
            raise Crash
    return on_step


@pytest.fixture(scope="module")
def uninterrupted(tiny_base, data):
    model, train, dev = new_model(tiny_base, data)
    return fit(model, train, config(), dev), model.state_dict()


# 4 steps per epoch (8 batches, 2 accumulated); the newest checkpoint is the step before the crash:
# mid-epoch 1, end of epoch 1 before its evaluation, mid-epoch 2 after it.
@pytest.mark.parametrize("crash_step", [3, 5, 7])
def test_resume_after_a_crash_matches_an_uninterrupted_run(uninterrupted, tiny_base, data, tmp_path, crash_step):
    want, want_sd = uninterrupted
    model, train, dev = new_model(tiny_base, data)
    with pytest.raises(Crash):
        fit(model, train, config(checkpoint_dir=str(tmp_path), checkpoint_every=1), dev, on_step=crash_at(crash_step))
    model, train, dev = new_model(tiny_base, data)  # a fresh process would start from the base model again
    got = fit(model, train, config(checkpoint_dir=str(tmp_path), checkpoint_every=1, resume=True), dev)

    assert all(torch.equal(want_sd[k], v) for k, v in model.state_dict().items())
    assert got.history == want.history and got.best == want.best
    assert [(r["step"], r["loss"], r["lr"]) for r in got.log] == [(r["step"], r["loss"], r["lr"]) for r in want.log]


class Stopped(BaseException):
    pass


# SIGTERM at step 2 (mid-epoch 1), at the epoch's last step 4 (held over its evaluation), at the last step 8
@pytest.mark.parametrize("term_step", [2, 4, 8])
def test_sigterm_writes_a_checkpoint_at_the_step_then_stops_and_the_run_resumes_exactly(
        uninterrupted, tiny_base, data, tmp_path, term_step):
    """A preempted run (SIGTERM) lost every step since its last scheduled checkpoint (here: none, every 1,000
    steps). It now writes one where the SIGTERM came, after the step, then stops as the SIGTERM's handler says;
    the resumed run ends with the uninterrupted run's weights, bit for bit."""
    import os
    import signal

    def stopped(signum, frame):
        raise Stopped

    def term_at(step):
        def on_step(s, total):
            if s == step:
                os.kill(os.getpid(), signal.SIGTERM)  # (handled between bytecodes: before fit goes on)
        return on_step

    want, want_sd = uninterrupted
    ck = config(checkpoint_dir=str(tmp_path), checkpoint_every=1000)
    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        model, train, dev = new_model(tiny_base, data)
        with pytest.raises(Stopped):
            fit(model, train, ck, dev, on_step=term_at(term_step))
        assert signal.getsignal(signal.SIGTERM) is stopped  # the caller's handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step-{term_step:08d}"]
    model, train, dev = new_model(tiny_base, data)
    got = fit(model, train, replace(ck, resume=True), dev)
    assert all(torch.equal(want_sd[k], v) for k, v in model.state_dict().items())
    assert got.history == want.history and got.best == want.best


def test_without_checkpoints_sigterm_stops_at_once(tiny_base, data, tmp_path):
    import os
    import signal

    steps = []

    def stopped(signum, frame):
        raise Stopped

    def on_step(s, total):
        steps.append(s)
        if s == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        model, train, _ = new_model(tiny_base, data)
        with pytest.raises(Stopped):
            fit(model, train, config(), on_step=on_step)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert steps == [1, 2]  # stopped inside step 2's callback, no step after it


def test_a_run_that_diverges_stops_at_the_first_non_finite_loss(tiny_base, data, sentiment_files, tmp_path, capsys):
    """finetune --lr 1e30 trained on through NaN losses and saved a NaN model (exit 0; predict then printed
    "score": NaN, which is not JSON): the first step whose loss is not finite stops the run, before its update."""
    from oztune.cli import main
    from oztune.errors import OztuneError

    model, train, _ = new_model(tiny_base, data)
    steps = []
    with pytest.raises(OztuneError, match=r"^training diverged: the loss of step (\d+) is nan \(learning rate "):
        fit(model, train, config(lr=1e30, max_grad_norm=0.0), on_step=lambda s, total: steps.append(s))
    assert steps and len(steps) < 8  # stopped within the run, not at its end
    train_file, dev = sentiment_files
    out = tmp_path / "m"
    capsys.readouterr()
    assert main(["finetune", "--train", str(train_file), "--model", str(tiny_base), "--output", str(out), "--lr",
                 "1e30", "--max-train-examples", "64", "--no-progress", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and err.count("\n") == 1 and not out.exists(), err


def test_epoch_records_average_their_own_steps(uninterrupted):
    result, _ = uninterrupted
    steps = len(result.log) // 2
    for e, entry in enumerate(result.history):
        losses = [r["loss"] for r in result.log[e * steps:(e + 1) * steps]]
        assert entry["train_loss"] == pytest.approx(sum(losses) / len(losses))


def test_freezing_embeddings_is_undone_and_frozen_weights_stay_frozen(tiny_base, data):
    model, train, _ = new_model(tiny_base, data)
    word = model.backbone.embed.word.weight
    before = word.detach().clone()
    fit(model, train, config(epochs=1, freeze_embeddings=True))
    assert torch.equal(word, before) and word.requires_grad
    word.requires_grad_(False)  # frozen by the caller (LoRA): fit must not unfreeze it
    fit(model, train, config(epochs=1, freeze_embeddings=False))
    assert torch.equal(word, before) and not word.requires_grad


@pytest.mark.parametrize("max_norm", [0.01, 100.0, 0.0])  # clipping hard, not at all, off
@pytest.mark.parametrize("fused", [True, False])
def test_clipped_step_equals_clip_grad_norm_then_step(max_norm, fused):
    """A fused AdamW clips inside its kernel (grad_scale); the weights are those of clip_grad_norm_ + step."""
    from oztune.train.loop import clipped_step

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))

    want, got = make(), make()
    opt_want = torch.optim.AdamW(want.parameters(), lr=1e-2, fused=fused)
    opt_got = torch.optim.AdamW(got.parameters(), lr=1e-2, fused=fused)
    for _ in range(3):
        x = torch.randn(4, 8)
        for m in (want, got):
            m(x).square().sum().backward()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(list(want.parameters()), max_norm)
        opt_want.step()
        clipped_step(opt_got, list(got.parameters()), max_norm)
        opt_want.zero_grad()
        opt_got.zero_grad()
        assert getattr(opt_got, "grad_scale", None) is None  # never left behind for the next step
    for a, b in zip(want.parameters(), got.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    moved = max((a - make_p).abs().max().item() for a, make_p in zip(got.parameters(), make().parameters()))
    assert moved > 1e-3  # the steps did something


def test_layer_lr_decay_gives_each_depth_its_learning_rate(tiny_base, data):
    from oztune.train.loop import make_optimizer, param_groups

    model, _, _ = new_model(tiny_base, data)
    L = len(model.backbone.layers)
    plain = param_groups(model, 0.01)  # off: the two usual groups, decay first
    assert [g["weight_decay"] for g in plain] == [0.01, 0.0] and all(g["lr_scale"] == 1 for g in plain)
    opt, sched = make_optimizer(model, config(lr=1e-3, layer_lr_decay=0.5, warmup_ratio=0.0), total_steps=10)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    want = {"backbone.embed.position.weight": 1e-3 * 0.5 ** (L + 1),
            "backbone.layers.0.attn.qkv.weight": 1e-3 * 0.5 ** L,
            f"backbone.layers.{L - 1}.ffn.down.bias": 1e-3 * 0.5}
    want.update({n: 1e-3 for n in named if n.startswith("head.")})
    for name, lr in want.items():
        assert lr_of[id(named[name])] == pytest.approx(lr), name
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())
    for _ in range(5):  # the schedule scales every group alike: the ratios stay
        opt.step()
        sched.step()
    factor = 5 / 9  # step 5 of 10, one warm-up step: (10 - 5) / (10 - 1) of the way down the linear decay
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, lr in want.items():
        assert lrs[id(named[name])] == pytest.approx(lr * factor), name


def test_a_logged_step_has_its_micro_batches_mean_loss_and_the_rate_it_used(tiny_base, data, monkeypatch):
    model, train, dev = new_model(tiny_base, data)
    losses = []
    real = type(model).loss

    def recording(self, logits, labels):
        out = real(self, logits, labels)
        losses.append(out.item())
        return out

    monkeypatch.setattr(type(model), "loss", recording)
    result = fit(model, train, config(epochs=1, warmup_ratio=0.0))  # 8 batches, 2 per step
    steps = [row for row in result.log if "loss" in row]
    assert len(steps) == 4 and len(losses) == 8
    for k, row in enumerate(steps):
        assert row["loss"] == pytest.approx((losses[2 * k] + losses[2 * k + 1]) / 2, rel=1e-5)
    # one warm-up step (at the peak), then linear decay over the other 3: the rates the steps used, not
    # the next step's (which ended the log at 0)
    assert [row["lr"] for row in steps] == pytest.approx([3e-3, 3e-3, 2e-3, 1e-3])


def test_resuming_into_another_training_set_is_refused(tiny_base, data, tmp_path):
    from oztune.errors import OztuneError

    model, train, _ = new_model(tiny_base, data)
    with pytest.raises(Crash):
        fit(model, train, config(checkpoint_dir=str(tmp_path), checkpoint_every=1), on_step=crash_at(2))
    model, train, _ = new_model(tiny_base, data)
    other = train.subset(list(range(63, -1, -1)))  # the same examples in another order: other data
    with pytest.raises(OztuneError, match="other settings: data"):
        fit(model, other, config(checkpoint_dir=str(tmp_path), checkpoint_every=1, resume=True))
    with pytest.raises(OztuneError, match="lr 0.003 \\(now 0.001\\)"):
        fit(model, train, config(checkpoint_dir=str(tmp_path), checkpoint_every=1, resume=True, lr=1e-3))


def test_resuming_from_another_pre_trained_model_of_the_same_shape_is_refused(tiny_base, data, tmp_path, capsys):
    """finetune --resume --model B took a checkpoint of a run from --model A of the same architecture: training
    went on from A's weights while run.json and the model card named B. The pre-trained weights are now part of
    what must match; the new task head is not (a caller may initialise it otherwise: the checkpoint replaces it)."""
    from oztune.errors import OztuneError

    ck = config(checkpoint_dir=str(tmp_path), checkpoint_every=1)
    model, train, _ = new_model(tiny_base, data)
    with pytest.raises(Crash):
        fit(model, train, ck, on_step=crash_at(2))
    model, train, _ = new_model(tiny_base, data)
    with torch.no_grad():
        model.backbone.embed.word.weight[5, 0] += 1  # another pre-trained model, of the same shape
    with pytest.raises(OztuneError, match="other settings: base_weights"):
        fit(model, train, replace(ck, resume=True))
    model, train, _ = new_model(tiny_base, data)
    for p in model.head.parameters():
        torch.nn.init.normal_(p)
    fit(model, train, replace(ck, resume=True))
    assert "resuming from" in capsys.readouterr().err


def test_the_resume_message_says_where_the_checkpoint_stands(tiny_base, data, tmp_path, capsys):
    """A checkpoint written at an epoch's end resumes at the next epoch's first batch: the message said "epoch 3"
    for the last checkpoint of a 2-epoch run; it says "after epoch 2" (inside an epoch: "in epoch N")."""
    ck = config(checkpoint_dir=str(tmp_path), checkpoint_every=3)  # 64 examples, 8 a batch, 2 accumulated: 4 steps
    model, train, _ = new_model(tiny_base, data)
    with pytest.raises(Crash):
        fit(model, train, ck, on_step=crash_at(4))  # a checkpoint at step 3, inside epoch 1
    model, train, _ = new_model(tiny_base, data)
    fit(model, train, replace(ck, resume=True, checkpoint_every=4))  # then at epoch ends: steps 4 and 8
    err = capsys.readouterr().err
    assert "(in epoch 1, step 3)" in err, err
    model, train, _ = new_model(tiny_base, data)
    fit(model, train, replace(ck, resume=True))  # fit leaves its checkpoints (finetune deletes them): the last
    err = capsys.readouterr().err
    assert "(after epoch 2, step 8)" in err and "epoch 3" not in err, err


def scripted_evaluations(monkeypatch, accuracies):
    """Make fit's evaluations return ``accuracies`` in turn; returns the (step, weights) seen at each one."""
    import oztune.train.loop as loop

    seen = []

    def fake(model, data, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        got = accuracies[len(seen) - 1]
        return dict(got) if isinstance(got, dict) else {"accuracy": got}

    monkeypatch.setattr(loop, "evaluate", fake)
    return seen


def test_early_stopping_stops_after_patience_evaluations_and_keeps_the_best_weights(tiny_base, data, monkeypatch):
    seen = scripted_evaluations(monkeypatch, [0.5, 0.7, 0.6, 0.7, 0.9, 0.9])
    model, train, dev = new_model(tiny_base, data)
    result = fit(model, train, config(epochs=6, patience=2), dev)
    # epoch 2 is the best; epochs 3 and 4 do not beat it (a tie is no improvement): stop before epoch 5
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4] and len(seen) == 4
    assert result.best["accuracy"] == 0.7 and result.best["epoch"] == 2 and result.best["step"] == 8
    assert len(result.log) == 16  # 4 epochs of 4 steps
    assert all(torch.equal(v, seen[1][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, seen[3][k]) for k, v in model.state_dict().items())


def test_evaluating_every_n_steps_inside_epochs(tiny_base, data, monkeypatch):
    seen = scripted_evaluations(monkeypatch, [0.5, 0.8, 0.6, 0.7, 0.6])
    model, train, dev = new_model(tiny_base, data)
    result = fit(model, train, config(epochs=2, eval_every=3), dev)  # 4 steps per epoch
    # step 3 (epoch 0.75), the end of epoch 1 (step 4), step 6 (epoch 1.5), the end of epoch 2 (step 8)
    assert [(h["epoch"], h["step"]) for h in result.history] == [(0.75, 3), (1, 4), (1.5, 6), (2, 8)]
    for h in result.history:  # the epoch's mean training loss up to the evaluation
        e0 = int(h["epoch"] - 1e-9)
        losses = [r["loss"] for r in result.log if e0 < r["epoch"] <= h["epoch"]]
        assert len(losses) == h["step"] - 4 * e0
        assert h["train_loss"] == pytest.approx(sum(losses) / len(losses))
    assert result.best["step"] == 4 and len(seen) == 4  # the best evaluation's weights are the ones kept
    assert all(torch.equal(v, seen[1][k]) for k, v in model.state_dict().items())


def test_patience_counts_evaluations_inside_an_epoch_too(tiny_base, data, monkeypatch):
    scripted_evaluations(monkeypatch, [0.9, 0.5, 0.5, 0.5])
    model, train, dev = new_model(tiny_base, data)
    result = fit(model, train, config(epochs=2, eval_every=1, patience=2), dev)
    assert [h["step"] for h in result.history] == [1, 2, 3] and len(result.log) == 3  # stopped at step 3
    assert result.best["step"] == 1


# Patience runs out at an epoch's end (step 16, after epoch 4) or inside one (step 3, evaluating every step).
@pytest.mark.parametrize("accuracies,kw,last", [([0.5, 0.7, 0.6, 0.7, 0.9, 0.9], {"epochs": 6}, 16),
                                                ([0.9, 0.5, 0.5, 0.5], {"epochs": 2, "eval_every": 1}, 3)])
def test_sigterm_as_patience_runs_out_checkpoints_the_finished_run_and_the_resume_trains_no_more(
        tiny_base, data, tmp_path, monkeypatch, accuracies, kw, last):
    """A SIGTERM held over the step at which early stopping came stopped the run with no checkpoint (the model
    is not saved either): every step since the last scheduled one was lost, and the resumed run trained them
    again. It now writes a checkpoint there, as at the last step of a run that did not stop early, then stops;
    the resumed run trains no more and ends as the run that was not interrupted."""
    import os
    import signal

    def stopped(signum, frame):
        raise Stopped

    def term_at(s, total):
        if s == last:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = config(patience=2, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=1000, **kw)
    scripted_evaluations(monkeypatch, accuracies)
    model, train, dev = new_model(tiny_base, data)
    want = fit(model, train, replace(cfg, checkpoint_dir=str(tmp_path / "other")), dev)
    want_sd = model.state_dict()
    assert want.log[-1]["step"] == last  # (patience ran out there)

    scripted_evaluations(monkeypatch, accuracies)
    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        model, train, dev = new_model(tiny_base, data)
        with pytest.raises(Stopped):
            fit(model, train, cfg, dev, on_step=term_at)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in (tmp_path / "ck").glob("*")) == [f"step-{last:08d}"]

    seen = scripted_evaluations(monkeypatch, [])  # (an evaluation would fail: there is none to make)
    model, train, dev = new_model(tiny_base, data)
    steps = []
    got = fit(model, train, replace(cfg, resume=True), dev, on_step=lambda s, total: steps.append(s))
    assert steps == [] and seen == []  # nothing trained or evaluated again
    assert got.history == want.history and got.best == want.best
    assert [(r["step"], r["loss"], r["lr"]) for r in got.log] == [(r["step"], r["loss"], r["lr"]) for r in want.log]
    assert all(torch.equal(want_sd[k], v) for k, v in model.state_dict().items())


def test_resume_with_evaluations_inside_epochs_matches_an_uninterrupted_run(tiny_base, data, tmp_path):
    model, train, dev = new_model(tiny_base, data)
    want = fit(model, train, config(eval_every=3), dev)
    want_sd = model.state_dict()
    model, train, dev = new_model(tiny_base, data)
    with pytest.raises(Crash):  # after the evaluations at steps 3 and 4, before the one at step 6
        fit(model, train, config(eval_every=3, checkpoint_dir=str(tmp_path), checkpoint_every=1), dev,
            on_step=crash_at(6))
    model, train, dev = new_model(tiny_base, data)
    got = fit(model, train, config(eval_every=3, checkpoint_dir=str(tmp_path), checkpoint_every=1, resume=True), dev)
    assert len(want.history) == 4 and got.history == want.history and got.best == want.best
    assert all(torch.equal(want_sd[k], v) for k, v in model.state_dict().items())


def scalars(log_dir) -> dict:
    """{tag: [(step, value), ...]} of the TensorBoard events in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_every_step_and_evaluation(tiny_base, data, tmp_path):
    import tensorboard  # noqa: F401  (a dev dependency: missing, the test fails)
    model, train, dev = new_model(tiny_base, data)
    result = fit(model, train, config(eval_every=3, tensorboard=str(tmp_path / "tb")), dev)
    got = scalars(tmp_path / "tb")
    for key in ("loss", "lr", "examples_per_s"):
        assert got[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in result.log]
    for metric in ("accuracy", "macro_f1", "mcc"):
        assert got[f"eval/{metric}"] == [(h["step"], pytest.approx(h[metric], rel=1e-6)) for h in result.history]
    assert "eval/epoch" not in got and "eval/train_loss" not in got


def test_a_resumed_run_replaces_the_tensorboard_events_after_its_checkpoint(tiny_base, data, tmp_path):
    import tensorboard  # noqa: F401  (a dev dependency: missing, the test fails)
    model, train, dev = new_model(tiny_base, data)
    want = fit(model, train, config(), dev)
    tb, ck = str(tmp_path / "tb"), str(tmp_path / "ck")
    model, train, dev = new_model(tiny_base, data)
    with pytest.raises(Crash):  # steps 1-5 logged, the newest checkpoint at step 4
        fit(model, train, config(checkpoint_dir=ck, checkpoint_every=2, tensorboard=tb), dev, on_step=crash_at(6))
    model, train, dev = new_model(tiny_base, data)
    fit(model, train, config(checkpoint_dir=ck, checkpoint_every=2, resume=True, tensorboard=tb), dev)
    assert scalars(tb)["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in want.log]


def test_tensorboard_without_the_package_is_one_clear_error(monkeypatch):
    import importlib.util

    from oztune.errors import OztuneError
    from oztune.train import tensorboard

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(OztuneError, match="needs the tensorboard package: pip install tensorboard"):
        tensorboard.Board("unused")


def manual_ema(snapshots: list[dict], start: dict, decay: float) -> list[dict]:
    """The moving average after each step, from the weights after each step (fp64 reference)."""
    avg = {k: v.double() for k, v in start.items()}
    out = []
    for step, weights in enumerate(snapshots):
        d = min(decay, (1 + step) / (10 + step))
        avg = {k: d * avg[k] + (1 - d) * weights[k].double() for k in avg}
        out.append(avg)
    return out


def test_weight_ema_evaluates_and_keeps_the_average_without_changing_training(tiny_base, data, monkeypatch):
    model, train, dev = new_model(tiny_base, data)
    plain = fit(model, train, config(), dev)
    model, train, dev = new_model(tiny_base, data)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    after_step = []

    def record(step, total):
        after_step.append({n: p.detach().clone() for n, p in model.named_parameters() if n in names})

    seen = scripted_evaluations(monkeypatch, [0.5, 0.8, 0.6, 0.7])
    result = fit(model, train, config(eval_every=3, ema_decay=0.9), dev, on_step=record)
    # the average does not feed back: the same losses as without it
    assert [r["loss"] for r in result.log] == pytest.approx([r["loss"] for r in plain.log], rel=1e-6)
    want = manual_ema(after_step, start, 0.9)
    for evaluated, step in zip(seen, [3, 4, 6, 8]):  # each evaluation saw the average of its step
        for n in names:
            torch.testing.assert_close(evaluated[n].double(), want[step - 1][n], atol=1e-6, rtol=1e-5)
    assert result.best["step"] == 4  # ... and the kept weights are the average at the best evaluation
    for n, p in model.named_parameters():
        if n in names:
            torch.testing.assert_close(p.double(), want[3][n], atol=1e-6, rtol=1e-5)
    moved = max((want[3][n] - after_step[3][n].double()).abs().max().item() for n in names)
    assert moved > 1e-4  # the average is not just the step's weights


def test_weight_ema_without_evaluation_data_ends_on_the_average(tiny_base, data):
    model, train, _ = new_model(tiny_base, data)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    after_step = []
    fit(model, train, config(epochs=1, ema_decay=0.5), on_step=lambda s, t: after_step.append(
        {n: p.detach().clone() for n, p in model.named_parameters() if n in names}))
    want = manual_ema(after_step, start, 0.5)[-1]
    for n, p in model.named_parameters():
        if n in names:
            torch.testing.assert_close(p.double(), want[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("decay", [-0.5, 1.0, 1.5, float("nan")])
def test_a_weight_ema_decay_outside_0_1_is_refused(decay):
    """Only finetune's CLI checked it: in Python a negative decay extrapolated past the weights (lerp by 1 - d > 1),
    nan made every weight nan, and the saved model was that average, with no error."""
    with pytest.raises(ValueError, match=r"TrainConfig.ema_decay must be in \[0, 1\)"):
        TrainConfig(ema_decay=decay)


def test_resume_with_weight_ema_matches_an_uninterrupted_run(tiny_base, data, tmp_path):
    model, train, _ = new_model(tiny_base, data)  # no evaluation: the result is the average at the end
    fit(model, train, config(ema_decay=0.9))
    want_sd = model.state_dict()
    model, train, _ = new_model(tiny_base, data)
    with pytest.raises(Crash):
        fit(model, train, config(ema_decay=0.9, checkpoint_dir=str(tmp_path), checkpoint_every=1), on_step=crash_at(6))
    model, train, _ = new_model(tiny_base, data)
    fit(model, train, config(ema_decay=0.9, checkpoint_dir=str(tmp_path), checkpoint_every=1, resume=True))
    assert all(torch.equal(want_sd[k], v) for k, v in model.state_dict().items())


def test_accumulated_gradients_are_those_of_the_mean_loss_over_the_micro_batches(tiny_base, data, monkeypatch):
    import copy

    import oztune.train.loop as loop
    from oztune.models.transformer import Dropout

    model, train, _ = new_model(tiny_base, data)
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = 0.0
    start = copy.deepcopy(model)
    batches, grads = [], []

    def recording_loss(m, batch):
        batches.append(batch)
        return loop.default_loss(m, batch)

    def recording_step(opt, params, max_norm):
        if not grads:
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()

    monkeypatch.setattr(loop, "clipped_step", recording_step)
    fit(model, train, config(epochs=1, grad_accum=2, max_grad_norm=0.0), loss_fn=recording_loss)
    start.train()
    mean = (loop.default_loss(start, batches[0]) + loop.default_loss(start, batches[1])) / 2
    mean.backward()
    want = {n: p.grad for n, p in start.named_parameters() if p.grad is not None}
    assert want.keys() == grads[0].keys() and len(want) > 10
    for n, g in want.items():
        torch.testing.assert_close(grads[0][n], g, atol=1e-6, rtol=1e-4)


def test_weight_decay_skips_biases_and_norms_only(tiny_base, data):
    from oztune.train.loop import param_groups

    model, _, _ = new_model(tiny_base, data)
    for decay in (1.0, 0.8):
        groups = param_groups(model, 0.01, decay)
        of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
        for name, p in model.named_parameters():
            if p.requires_grad:
                no_decay = name.endswith(".bias") or "norm" in name
                assert of[id(p)] == (0.0 if no_decay else 0.01), name
        assert sum(1 for g in groups if g["weight_decay"] == 0.01) >= 1


@pytest.mark.parametrize("problem, scores, best", [
    ("multi_label", [{"micro_f1": 0.5, "subset_accuracy": 0.9}, {"micro_f1": 0.8, "subset_accuracy": 0.1},
                     {"micro_f1": 0.6, "subset_accuracy": 0.95}], 2),
    ("regression", [{"pearson": 0.2, "mse": 0.1}, {"pearson": 0.1, "mse": 0.01}, {"pearson": 0.9, "mse": 5.0}], 3),
])
def test_each_problem_type_keeps_the_epoch_of_its_main_metric(tiny_base, data, monkeypatch, problem, scores, best):
    import torch.nn.functional as F

    scripted_evaluations(monkeypatch, scores)
    model, train, dev = new_model(tiny_base, data)
    model.head_cfg.problem_type = problem  # only the choice of metric is under test: train with cross-entropy

    def ce(m, b):
        return F.cross_entropy(m(b["input_ids"], b["attention_mask"], b.get("token_type_ids")), b["labels"])

    result = fit(model, train, config(epochs=3), dev, loss_fn=ce)
    assert result.best["epoch"] == best  # micro-F1 for multi-label, Pearson for regression


def test_a_lower_is_better_main_metric_keeps_its_smallest_value(tiny_base, data, monkeypatch):
    scripted_evaluations(monkeypatch, [{"accuracy": 0.5, "mse": 0.3}, {"accuracy": 0.4, "mse": 0.1},
                                       {"accuracy": 0.9, "mse": 0.2}])
    model, train, dev = new_model(tiny_base, data)
    assert fit(model, train, config(epochs=3), dev, main_metric="mse").best["epoch"] == 2


# Found by an audit of resumed runs and accumulation (session 9): each failed before its fix.

def resumed(tiny_base, data, ck, every, crash, tb=None):
    model, train, dev = new_model(tiny_base, data)
    with pytest.raises(Crash):
        fit(model, train, config(checkpoint_dir=ck, checkpoint_every=every, tensorboard=tb), dev, on_step=crash)
    model, train, dev = new_model(tiny_base, data)
    return fit(model, train, config(checkpoint_dir=ck, checkpoint_every=every, resume=True, tensorboard=tb), dev)


def test_an_epoch_end_evaluation_is_logged_once_after_a_resume(tiny_base, data, tmp_path):
    # 4 steps an epoch; the checkpoint of step 4 (an epoch's last) is written after that epoch's evaluation
    got = resumed(tiny_base, data, str(tmp_path / "ck"), 4, crash_at(5), str(tmp_path / "tb"))
    assert [s for s, _ in scalars(tmp_path / "tb")["eval/accuracy"]] == [h["step"] for h in got.history] == [4, 8]


def test_resume_without_a_checkpoint_drops_the_earlier_tensorboard_events(tiny_base, data, tmp_path):
    got = resumed(tiny_base, data, str(tmp_path / "ck"), 100, crash_at(6), str(tmp_path / "tb"))
    assert [s for s, _ in scalars(tmp_path / "tb")["train/loss"]] == [r["step"] for r in got.log]


def test_elapsed_seconds_and_examples_keep_counting_across_a_resume(tiny_base, data, tmp_path):
    import time

    def slow(s, total):
        time.sleep(0.2)
        crash_at(6)(s, total)

    got = resumed(tiny_base, data, str(tmp_path / "ck"), 1, slow)
    elapsed = [r["elapsed_s"] for r in got.log]
    assert elapsed == sorted(elapsed) and got.seconds >= elapsed[-1] >= 5 * 0.2, elapsed
    assert got.examples_per_s == pytest.approx(2 * 64 / got.seconds, rel=1e-6)  # 2 epochs of 64 examples


def test_a_short_last_accumulation_step_has_the_gradient_of_its_mean_loss(tiny_base, data, monkeypatch):
    import copy

    import oztune.train.loop as loop
    from oztune.models.transformer import Dropout

    model, train, _ = new_model(tiny_base, data)
    train = train.subset(list(range(56)))  # 7 batches of 8, 2 accumulated: the 4th step has 1 batch
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = 0.0
    batches, grads, before_last = [], [], []
    monkeypatch.setattr(loop, "clipped_step", lambda opt, ps, mx: (grads.append(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}), opt.step()))
    fit(model, train, config(epochs=1, max_grad_norm=0.0),
        loss_fn=lambda m, b: (batches.append(b), loop.default_loss(m, b))[1],
        on_step=lambda s, t: s == 3 and before_last.append(copy.deepcopy(model)))
    ref = before_last[0].train()
    loop.default_loss(ref, batches[6]).backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert len(grads) == 4 and want.keys() == grads[3].keys()
    for n, g in want.items():
        torch.testing.assert_close(grads[3][n], g, atol=1e-6, rtol=1e-4)


def test_resuming_with_other_evaluation_settings_is_refused(tiny_base, data, tmp_path):
    """The best evaluation so far was chosen with these settings and on these examples."""
    from oztune.errors import OztuneError

    model, train, dev = new_model(tiny_base, data)
    with pytest.raises(Crash):
        fit(model, train, config(checkpoint_dir=str(tmp_path), checkpoint_every=1, eval_every=2), dev,
            on_step=crash_at(3))
    model, train, dev = new_model(tiny_base, data)
    with pytest.raises(OztuneError, match="eval_every 2 \\(now 1\\)"):
        fit(model, train, config(checkpoint_dir=str(tmp_path), checkpoint_every=1, eval_every=1, resume=True), dev)
    with pytest.raises(OztuneError, match="patience 0 \\(now 3\\)"):
        fit(model, train, config(checkpoint_dir=str(tmp_path), checkpoint_every=1, eval_every=2, patience=3,
                                 resume=True), dev)
    with pytest.raises(OztuneError, match="eval_data"):
        fit(model, train, config(checkpoint_dir=str(tmp_path), checkpoint_every=1, eval_every=2, resume=True),
            dev.subset(list(range(16))))


@pytest.mark.parametrize("name", ["patience", "eval_every", "checkpoint_every"])
def test_a_negative_patience_eval_every_or_checkpoint_every_is_refused(name):
    """Only finetune's CLI checked them: in Python patience -1 stopped the run after its first epoch without
    evaluating it (0 bad evaluations >= -1), eval_every -3 evaluated every 3 steps, and checkpoint_every -1
    wrote no checkpoint, each with no error."""
    with pytest.raises(ValueError, match=rf"TrainConfig.{name} must be 0 or more, not -1"):
        TrainConfig(**{name: -1})


@pytest.mark.parametrize("field, value", [("layer_lr_decay", 0.0), ("layer_lr_decay", -0.5), ("layer_lr_decay", 1.5),
                                          ("warmup_ratio", -0.1), ("warmup_ratio", 2.0), ("weight_decay", -0.01),
                                          ("max_grad_norm", -1.0), ("max_grad_norm", float("nan")), ("bucket", 0),
                                          ("keep_checkpoints", 0), ("rdrop", -1.0), ("ema_decay", 1.0)])
def test_train_config_refuses_what_the_cli_refuses_naming_the_field(field, value, sentiment_files, tmp_path, capsys):
    from oztune.cli import main

    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be "):
        TrainConfig(**{field: value})
    if field != "bucket":  # (the CLI has no --bucket) the option of the same name, by the same rule
        option = f"--{field.replace('_', '-')}"
        assert main(["finetune", "--train", str(sentiment_files[0]), "--output", str(tmp_path / "o"), option,
                     str(value)]) == 2
        assert f"{option} must be " in capsys.readouterr().err


def test_train_config_keeps_its_edge_values_and_no_clipping():
    for kw in ({"layer_lr_decay": 1.0}, {"layer_lr_decay": 0.1}, {"warmup_ratio": 0.0}, {"weight_decay": 0.0},
               {"max_grad_norm": 0.0}, {"max_grad_norm": None}, {"bucket": 1}, {"keep_checkpoints": 1}):
        TrainConfig(**kw)


def test_fit_refuses_empty_or_unlabelled_training_data_unless_its_loss_needs_no_labels(tiny_base, data):
    from oztune.data.dataset import EncodedData
    from oztune.train.loop import default_loss

    model, train, _ = new_model(tiny_base, data)
    with pytest.raises(ValueError, match="training data holds no examples"):
        fit(model, train.subset([]), config())
    unlabelled = EncodedData(train.encoded, None, train.pad_id)
    with pytest.raises(ValueError, match="training data has no labels"):
        fit(model, unlabelled, config())
    with pytest.raises(ValueError, match="training data has no labels"):
        fit(model, unlabelled, config(class_weights=[1.0, 1.0]))

    def no_labels(m, batch):  # e.g. distillation from the teacher's logits alone
        labelled = {**batch, "labels": torch.zeros(len(batch["input_ids"]), dtype=torch.long)}
        return default_loss(m, labelled)

    result = fit(model, unlabelled, config(epochs=1), loss_fn=no_labels)
    assert result.log and all(row["loss"] == row["loss"] for row in result.log)  # trained, finite


def test_weight_ema_warms_up_and_applied_puts_the_training_weights_back():
    """The average's first step moves most of the way (decay min(d, 1/10) early on: an average of the random
    start would lag for thousands of steps), and ``applied()`` restores the training weights after."""
    from oztune.train.ema import WeightEMA

    p = torch.nn.Parameter(torch.zeros(1))
    ema = WeightEMA([p], 0.999)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update(0)
    assert ema.shadow[0].item() == pytest.approx(0.9)
    with ema.applied():
        assert p.item() == pytest.approx(0.9)
    assert p.item() == 1.0


def test_the_schedule_warms_up_linearly_then_decays_to_zero():
    from oztune.train.loop import make_optimizer

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    opt, sched = make_optimizer(Wrapper(), TrainConfig(lr=1.0, warmup_ratio=0.25), 8)
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_predict_logits_runs_in_eval_mode_in_input_order_and_restores_the_mode(tiny_base, data):
    """Dropout off while predicting (a training-mode model gives the eval-mode logits), the logits of each example
    in input order (they are computed in length-sorted batches), and the model's mode as it was."""
    from oztune.train.loop import predict_logits

    model, _, dev = new_model(tiny_base, data)
    assert len(set(dev.lengths.tolist())) > 1  # the length sort does reorder
    model.eval()
    want = np.concatenate([model(**{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).detach()
                           .numpy() for b in (dev.batch([j]) for j in range(len(dev)))])
    np.testing.assert_allclose(predict_logits(model, dev, batch_size=4), want, rtol=1e-4, atol=1e-5)
    assert not model.training
    model.train()
    for _ in range(2):  # the same logits every time, with dropout on they would differ
        np.testing.assert_allclose(predict_logits(model, dev, batch_size=4), want, rtol=1e-4, atol=1e-5)
        assert model.training  # put back


def test_train_loss_as_main_metric_keeps_its_smallest_epoch(tiny_base, data, monkeypatch):
    scripted_evaluations(monkeypatch, [0.5, 0.5, 0.5])  # accuracy does not decide
    model, train, dev = new_model(tiny_base, data)
    result = fit(model, train, config(epochs=3), dev, main_metric="train_loss")
    losses = [h["train_loss"] for h in result.history]
    assert np.argmin(losses) != np.argmax(losses)
    assert result.best["epoch"] == int(np.argmin(losses)) + 1 and result.best["train_loss"] == min(losses)


def test_a_short_last_accumulation_step_counts_in_the_total_steps_and_the_schedule(tiny_base, data):
    model, train, _ = new_model(tiny_base, data)
    train = train.subset(list(range(56)))  # 7 batches of 8, 2 accumulated: 4 steps, the last of 1 batch
    totals = []
    result = fit(model, train, config(epochs=1, warmup_ratio=0.0), on_step=lambda s, t: totals.append(t))
    assert totals == [4] * 4 and len(result.log) == 4
    # one warm-up step, then linear decay over the other 3: the last step still trains (not at rate 0)
    assert [row["lr"] for row in result.log] == pytest.approx([3e-3, 3e-3, 2e-3, 1e-3])


def test_fit_seeds_dropout_itself(tiny_base, data):
    """Two runs with the same seed are the same run whatever the global random state was before."""
    model, train, _ = new_model(tiny_base, data)
    want = fit(model, train, config(epochs=1)).log
    model, train, _ = new_model(tiny_base, data)
    torch.rand(1000)  # the global generator moved on (another model built, data augmented, ...)
    got = fit(model, train, config(epochs=1)).log
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


def test_each_epoch_shuffles_the_training_data_anew(tiny_base, data):
    from oztune.train.loop import default_loss

    model, train, _ = new_model(tiny_base, data)
    seen = []

    def recording(m, b):
        seen.append(b["labels"].tolist() + b["input_ids"].sum(1).tolist())
        return default_loss(m, b)

    fit(model, train, config(epochs=2), loss_fn=recording)  # 8 batches an epoch
    assert len(seen) == 16 and seen[:8] != seen[8:]
    assert sorted(map(sorted, seen[:8])) != sorted(map(sorted, seen[8:]))  # other batches, not just another order


def test_an_improvement_restarts_the_patience_count(tiny_base, data, monkeypatch):
    scripted_evaluations(monkeypatch, [0.5, 0.4, 0.6, 0.5, 0.7])
    model, train, dev = new_model(tiny_base, data)
    result = fit(model, train, config(epochs=5, patience=2), dev)
    # never 2 evaluations in a row without improvement: all 5 epochs run
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5] and result.best["epoch"] == 5


def test_fit_returns_the_model_in_eval_mode(tiny_base, data, monkeypatch):
    model, train, dev = new_model(tiny_base, data)
    fit(model, train, config(epochs=1))
    assert not model.training
    scripted_evaluations(monkeypatch, [0.5])
    fit(model, train, config(epochs=1), dev)
    assert not model.training


def test_without_evaluation_data_best_is_the_last_epoch_record(tiny_base, data):
    model, train, _ = new_model(tiny_base, data)
    result = fit(model, train, config(epochs=2))
    assert len(result.history) == 2 and result.best == result.history[-1]
    assert result.best["epoch"] == 2 and result.best["step"] == 8 and np.isfinite(result.best["train_loss"])


def test_an_epoch_end_that_falls_on_eval_every_is_evaluated_once(tiny_base, data, monkeypatch):
    seen = scripted_evaluations(monkeypatch, [0.5, 0.6, 0.7, 0.8, 0.9])
    model, train, dev = new_model(tiny_base, data)
    result = fit(model, train, config(epochs=1, eval_every=2), dev)  # 4 steps: step 2, then the epoch's end
    assert [(h["epoch"], h["step"]) for h in result.history] == [(0.5, 2), (1, 4)] and len(seen) == 2
