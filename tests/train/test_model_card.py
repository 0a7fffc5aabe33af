"""The saved model's README.md says what was trained and which evaluation was kept."""

from __future__ import annotations

from oztune.train.finetune import FinetuneArgs, model_card


def card(history, best, eval_file="dev.tsv", class_weights=None):
    a = FinetuneArgs(train="train.tsv", eval=eval_file, output="runs/x", epochs=3, lr=1e-4)
    run = {"metrics": best, "history": history, "problem_type": "single_label", "train_examples": 100,
           "max_length": 128, "train_seconds": 1.0, "train_examples_per_s": 100.0, "class_weights": class_weights}
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
