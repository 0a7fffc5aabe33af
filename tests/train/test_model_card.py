"""The saved model's README.md says what was trained and which evaluation was kept."""

from __future__ import annotations

import pytest
import torch

from oztune.train.finetune import FinetuneArgs, model_card


def card(history, best, eval_file="dev.tsv", class_weights=None, precision="auto", ran="fp32", **args):
    a = FinetuneArgs(train="train.tsv", eval=eval_file, output="runs/x", epochs=3, lr=1e-4, precision=precision, **args)
    run = {"metrics": best, "history": history, "problem_type": "single_label", "train_examples": 100,
           "max_length": 128, "train_seconds": 1.0, "train_examples_per_s": 100.0, "class_weights": class_weights,
           "precision": ran}
    return model_card(a, run, {0: "neg", 1: "pos"})


def test_a_full_run_names_the_kept_epoch():
    history = [{"epoch": e, "step": 4 * e, "accuracy": acc} for e, acc in ((1, 0.8), (2, 0.9), (3, 0.85))]
    text = card(history, history[1])
    assert "- Training: 3 epoch(s), batch 32" in text and "stopped early" not in text
    assert "## Evaluation on `dev.tsv` (kept: the best evaluation, epoch 2)" in text
    assert "| accuracy | 0.9000 |" in text


def test_an_early_stop_inside_an_epoch_says_so():
    history = [{"epoch": 0.5, "step": 2, "accuracy": 0.9}, {"epoch": 1, "step": 4, "accuracy": 0.8},
               {"epoch": 1.5, "step": 6, "accuracy": 0.7}]
    text = card(history, history[0], class_weights=[0.6, 3.0])
    assert "- Training: 1.5 of 3 epoch(s) (stopped early)" in text and "class weights 0.6, 3" in text
    assert "(kept: the best evaluation, at step 2, epoch 0.50)" in text


def test_without_an_eval_file_the_card_says_what_it_shows():
    history = [{"epoch": e, "step": 4 * e, "train_loss": 0.5} for e in (1, 2, 3)]
    text = card(history, history[-1], eval_file=None)
    assert "## Evaluation (no --eval file: the training loss)" in text and "kept" not in text


def test_an_early_stop_at_a_fraction_of_an_epoch_is_rounded():
    history = [{"epoch": 8 / 15, "step": 8, "accuracy": 0.9}]
    assert "- Training: 0.53 of 3 epoch(s) (stopped early)" in card(history, history[0])


@pytest.mark.parametrize("asked,ran,says", [("auto", "bf16 autocast", "precision bf16 autocast (auto), seed"),
                                            ("auto", "fp32", "precision fp32 (auto), seed"),
                                            ("bf16", "bf16 autocast", "precision bf16 autocast, seed"),
                                            ("fp32", "fp32", "precision fp32, seed")])
def test_the_card_says_the_precision_that_ran_not_auto(asked, ran, says):
    history = [{"epoch": 3, "step": 12, "accuracy": 0.9}]
    assert says in card(history, history[0], precision=asked, ran=ran)


@pytest.mark.parametrize("precision,bf16,ran", [("auto", True, "bf16 autocast"), ("auto", False, "fp32"),
                                                ("fp32", True, "fp32"), ("bf16", False, "bf16 autocast")])
def test_fit_records_the_precision_that_ran(precision, bf16, ran, monkeypatch):
    from oztune.config import HeadConfig, ModelConfig
    from oztune.data.dataset import EncodedData
    from oztune.models.transformer import SequenceClassifier
    from oztune.train import loop

    monkeypatch.setattr(loop, "bf16_supported", lambda: bf16)  # (what auto asks of this CPU)
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                                           max_positions=16),
                               HeadConfig(num_labels=2, problem_type="single_label"))
    data = EncodedData([([1, 2, 3], [0, 0, 0]), ([4, 5], [0, 0])], torch.tensor([0, 1]), 0)
    result = loop.fit(model, data, loop.TrainConfig(epochs=1, batch_size=2, progress=False, precision=precision))
    assert result.precision == ran


def test_lora_updates_and_a_weight_average_are_named():
    history = [{"epoch": e, "step": 4 * e, "accuracy": 0.8} for e in (1, 2, 3)]
    text = card(history, history[-1], lora_rank=8, lora_targets=["qkv", "o"], ema_decay=0.999)
    assert "LoRA rank 8 on qkv, o (alpha 16, merged into the weights)" in text
    assert "the kept weights are a moving average (decay 0.999)" in text
    plain = card(history, history[-1])
    assert "LoRA" not in plain and "moving average" not in plain
