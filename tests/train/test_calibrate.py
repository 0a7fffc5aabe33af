"""Temperature scaling: the fit, the folding into the output layer (fp32 and int8), and ``oztune calibrate``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from oztune.cli import main
from oztune.train.calibrate import T_RANGE, fit_temperature, fit_temperatures, nll, scale_output_


def test_nll_is_torch_cross_entropy_of_the_scaled_logits():
    rng = np.random.default_rng(0)
    logits, gold = rng.normal(0, 4, (50, 3)).astype(np.float32), rng.integers(0, 3, 50)
    want = torch.nn.functional.cross_entropy(torch.tensor(logits, dtype=torch.float64) / 1.7, torch.tensor(gold))
    assert nll(logits, gold, 1.7) == pytest.approx(float(want), rel=1e-12)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_the_temperature_the_labels_were_drawn_at(true_t):
    """Gold labels drawn from softmax(z), the model's logits z * true_t: the fit finds true_t (within sampling
    noise), and it is the minimum of the loss."""
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (4000, 3))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    gold = np.array([rng.choice(3, p=row) for row in p])
    logits = (z * true_t).astype(np.float32)
    t = fit_temperature(logits, gold)
    assert t == pytest.approx(true_t, rel=0.08)
    assert nll(logits, gold, t) <= min(nll(logits, gold, t * 1.02), nll(logits, gold, t / 1.02))


def test_fit_recovers_a_multi_label_temperature():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2, (3000, 3))
    gold = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(np.float32)  # each label drawn from sigmoid(z)
    want = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(z * 2 / 1.5), torch.tensor(gold).double())
    assert nll(z * 2, gold, 1.5, "multi_label") == pytest.approx(float(want), rel=1e-12)
    assert fit_temperature((z * 2).astype(np.float32), gold, "multi_label") == pytest.approx(2.0, rel=0.08)


def test_fit_stops_at_the_end_of_the_range_for_separable_data():
    logits = np.array([[0.1, -0.1], [-0.1, 0.1]] * 10)  # (small: the loss still falls at the range's end)
    assert fit_temperature(logits, np.array([0, 1] * 10)) == pytest.approx(T_RANGE[0], rel=1e-6)  # sharper is better
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((0, 2)), np.zeros(0))


def _batch(enc):
    return enc(["good movie", "the plot was very dull and the film was bad", "fine"])


@pytest.mark.parametrize("int8", [False, True])
def test_scaling_the_output_layer_scales_the_logits(tiny_finetuned, int8):
    from oztune.compress.quantize import QuantConfig, quantize_
    from oztune.models.hub import load_classifier

    model, enc, _ = load_classifier(tiny_finetuned)
    model.eval()
    if int8:
        quantize_(model, QuantConfig())
    with torch.no_grad():
        before = model(**_batch(enc))
        scale_output_(model, 0.4)
        after = model(**_batch(enc))
        torch.testing.assert_close(after, before * 0.4, atol=1e-5, rtol=1e-5)
        scale_output_(model, np.array([0.5, 3.0]))  # one factor per output: each column its own
        torch.testing.assert_close(model(**_batch(enc)), after * torch.tensor([0.5, 3.0]), atol=1e-5, rtol=1e-5)
    for bad in (0.0, np.array([1.0, -1.0]), np.array([1.0, 2.0, 3.0])):
        with pytest.raises(ValueError):
            scale_output_(model, bad)


def test_calibrate_command_writes_a_model_whose_scores_moved_and_labels_did_not(tiny_finetuned, sentiment_files,
                                                                               tmp_path, capsys):
    import transformers

    from oztune import Classifier

    dev = str(sentiment_files[1])
    out = tmp_path / "cal"
    assert main(["calibrate", "--model", str(tiny_finetuned), "--data", dev, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    t = run["temperature"]
    assert f"temperature {t:.4f}" in printed and "log_loss" in printed and "ece" in printed
    assert T_RANGE[0] < t < T_RANGE[1] and abs(t - 1) > 1e-3
    src, cal = Classifier.from_pretrained(tiny_finetuned), Classifier.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(cal.model(**_batch(cal.encoder)), src.model(**_batch(src.encoder)) / t,
                                   atol=1e-5, rtol=1e-4)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()  # the scaled head loads in HF
        torch.testing.assert_close(hf(**_batch(cal.encoder)).logits, cal.model(**_batch(cal.encoder)),
                                   atol=1e-5, rtol=1e-5)
    before, after = src.evaluate(dev), cal.evaluate(dev)
    assert after["accuracy"] == before["accuracy"] and after["log_loss"] < before["log_loss"]  # fitted on it
    assert run["metrics"]["log_loss"] == pytest.approx(after["log_loss"], rel=1e-4)
    assert run["metrics_before"]["log_loss"] == pytest.approx(before["log_loss"], rel=1e-4)
    assert "temperature" in (out / "README.md").read_text()
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"  # the diagram, before and after
    assert main(["calibrate", "--model", str(tiny_finetuned), "--data", dev, "--output", str(out)]) == 0  # replaced


def test_calibrate_keeps_an_int8_model_int8(tiny_finetuned, sentiment_files, tmp_path):
    from oztune import Classifier
    from oztune.compress.quantize import Int8Linear

    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_finetuned), "--output", str(q)]) == 0
    out = tmp_path / "q-cal"
    assert main(["calibrate", "--model", str(q), "--data", str(sentiment_files[1]), "--output", str(out)]) == 0
    t = json.loads((out / "run.json").read_text())["temperature"]
    src, cal = Classifier.from_pretrained(q), Classifier.from_pretrained(out)
    assert isinstance(cal.model.head.out, Int8Linear)
    texts = ["good movie", "a dull bad film", "fine"]
    np.testing.assert_allclose(cal.logits(texts), src.logits(texts) / t, atol=1e-5, rtol=1e-4)


def test_calibrate_refuses_what_it_cannot_calibrate_in_one_line(tiny_hf_dir, tiny_finetuned, sentiment_files,
                                                                tmp_path, capsys):
    reg, _ = tiny_hf_dir("bert", num_labels=1, problem_type="regression")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "good", "label": 1.0}\n{"text": "bad film", "label": 0.0}\n')
    capsys.readouterr()
    for argv, words in [(["--model", str(reg), "--data", str(data)], "a regression model; temperature scaling"),
                        (["--model", str(tiny_finetuned)], "--data is required"),
                        (["--model", str(tiny_finetuned), "--data", str(sentiment_files[1]), "--batch-size", "0"],
                         "--batch-size")]:
        out = tmp_path / "never"
        assert main(["calibrate", *argv, "--output", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_calibrate_a_multi_label_model_keeps_its_labels(tiny_hf_dir, tmp_path, capsys):
    """One temperature, and one per label (--per-label): each logit divided by its label's, the labels the same,
    and the per-label fit's loss no higher than the one temperature's (which is one of its choices)."""
    from oztune import Classifier

    model, _ = tiny_hf_dir("bert", num_labels=2, problem_type="multi_label_classification")
    rng = np.random.default_rng(0)
    words = ["good", "plot", "film", "a", "the", "dull"]
    rows = [{"text": " ".join(rng.choice(words, 4)), "labels": [n for n in ("LABEL_0", "LABEL_1") if rng.random() < .5]}
            for _ in range(60)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = Classifier.from_pretrained(model)
    texts = [r["text"] for r in rows]
    runs = {}
    for per_label in (False, True):
        out = tmp_path / f"cal-{per_label}"
        assert main(["calibrate", "--model", str(model), "--data", str(data), "--output", str(out),
                     *(["--per-label"] if per_label else [])]) == 0
        printed = capsys.readouterr().out
        run = runs[per_label] = json.loads((out / "run.json").read_text())
        assert "micro_f1" in printed and run["metric"] == "micro_f1"
        assert run["metrics"]["log_loss"] <= run["metrics_before"]["log_loss"] + 1e-9
        cal = Classifier.from_pretrained(out)
        t = np.array(list(run["temperatures"].values())) if per_label else run["temperature"]
        if per_label:
            assert list(run["temperatures"]) == ["LABEL_0", "LABEL_1"] and run["temperature"] is None
            assert all(f"{n} {v:.4f}" in printed for n, v in run["temperatures"].items())
        np.testing.assert_allclose(cal.logits(texts), src.logits(texts) / t, atol=1e-5, rtol=1e-4)
        assert [p["label"] for p in cal.predict(texts)] == [p["label"] for p in src.predict(texts)]
    assert runs[True]["metrics"]["log_loss"] <= runs[False]["metrics"]["log_loss"] + 1e-7


def test_fit_temperatures_recovers_each_labels_own():
    """Label 0's logits twice too sharp, label 1's half as sharp as the probabilities they were drawn from."""
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, (4000, 2))
    gold = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(np.float32)
    fitted = fit_temperatures((z * [2.0, 0.5]).astype(np.float32), gold)
    assert fitted.shape == (2,)
    np.testing.assert_allclose(fitted, [2.0, 0.5], rtol=0.08)
    assert fitted[0] == pytest.approx(fit_temperature((z[:, [0]] * 2).astype(np.float32), gold[:, [0]], "multi_label"))


def test_per_label_is_refused_for_a_single_label_model(tiny_finetuned, sentiment_files, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["calibrate", "--model", str(tiny_finetuned), "--data", str(sentiment_files[1]), "--output", str(out),
                 "--per-label"]) == 2
    err = capsys.readouterr().err
    assert "--per-label" in err and "single-label" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
