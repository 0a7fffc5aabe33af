"""finetune's options end to end: run.json, the saved weights, `oztune evaluate`.

The tests pin semantics checked by the audit (and the --label-names refusal it led to).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_sentiment, write_tsv


def finetune(tiny_base, tmp_path, name, **kw):
    from oztune.train.finetune import FinetuneArgs, finetune as run

    train = write_tsv(tmp_path / "train.tsv", synthetic_sentiment(48, 1))
    dev = write_tsv(tmp_path / "dev.tsv", synthetic_sentiment(16, 2))
    args = dict(train=str(train), output=str(tmp_path / name), model=str(tiny_base), epochs=2, batch_size=8,
                lr=3e-3, progress=False, precision="fp32", checkpoint_every=0)
    args.update(kw)
    record = run(FinetuneArgs(**args))
    return record, load_file(str(tmp_path / name / "model.safetensors")), dev


def test_seed_decides_the_weights_and_only_the_token_table_stays_frozen(one_thread, tiny_base, tmp_path):
    _, a, _ = finetune(tiny_base, tmp_path, "a", seed=3)
    _, b, _ = finetune(tiny_base, tmp_path, "b", seed=3)
    _, c, _ = finetune(tiny_base, tmp_path, "c", seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    base = load_file(str(tiny_base / "model.safetensors"))
    for k, v in base.items():  # the default --freeze-embeddings: the word table only
        assert torch.equal(v, a[f"bert.{k}"]) == (k == "embeddings.word_embeddings.weight"), k
    _, d, _ = finetune(tiny_base, tmp_path, "d", seed=3, freeze_embeddings=False)
    assert not torch.equal(base["embeddings.word_embeddings.weight"], d["bert.embeddings.word_embeddings.weight"])


def test_the_saved_model_is_the_kept_evaluation_with_ema_and_step_evaluations(one_thread, tiny_base, tmp_path):
    from oztune import Classifier

    record, _, dev = finetune(tiny_base, tmp_path, "m", eval=str(tmp_path / "dev.tsv"), freeze_embeddings=False,
                              ema_decay=0.5, eval_every=2, grad_accum=2)
    # 6 batches of 8, 2 per optimizer step: 3 steps an epoch; evaluations at step 2 (epoch 4/6 of the
    # batches), each epoch's end (steps 3 and 6) and step 4; step 6's is the epoch end's, not twice
    assert [(h["epoch"], h["step"]) for h in record["history"]] == [
        (pytest.approx(2 / 3), 2), (1, 3), (pytest.approx(4 / 3), 4), (2, 6)]
    got = Classifier.from_pretrained(tmp_path / "m").evaluate(str(dev))
    for k in ("accuracy", "macro_f1", "mcc"):
        assert got[k] == pytest.approx(record["metrics"][k], abs=1e-9)


def test_label_names_on_named_labels_are_refused(one_thread, tiny_base, tmp_path):
    """--label-names on a file whose labels are names (neg/pos, not 0/1) renamed the classes, so the very --eval
    file the run was scored on was refused afterwards by `oztune evaluate` ("label 'neg' is not one the model
    knows"): --label-names names integer class ids only (as its help says), and is refused otherwise."""
    from oztune.errors import OztuneError

    with pytest.raises(OztuneError, match="--label-names names integer class ids"):
        finetune(tiny_base, tmp_path, "n", eval=str(tmp_path / "dev.tsv"), label_names=["negative", "positive"])
    assert not (tmp_path / "n").exists()


def test_label_names_on_integer_labels_still_evaluate_the_integer_file(one_thread, tiny_base, tmp_path):
    from oztune import Classifier

    rows = [(t, "1" if y == "pos" else "0") for t, y in synthetic_sentiment(48, 1)]
    train = write_tsv(tmp_path / "train01.tsv", rows)
    record, _, _ = finetune(tiny_base, tmp_path, "i", train=str(train), eval=str(train),
                            label_names=["negative", "positive"])
    clf = Classifier.from_pretrained(tmp_path / "i")
    assert set(clf.id2label.values()) == {"negative", "positive"}
    assert clf.evaluate(str(train))["accuracy"] == pytest.approx(record["metrics"]["accuracy"], abs=1e-9)


def test_label_names_on_integers_that_are_not_class_ids_are_refused_naming_the_line(one_thread, tiny_base, tmp_path,
                                                                                     capsys):
    """Labels 1,2,3 with three names trained "1" as class 0 (the file's sorted labels), while `oztune evaluate`
    read the same file's "1" as class id 1: 0.98 when training, 0.00 after. --label-names names the class ids
    0..N-1, so another integer is refused before any training, naming the file and line."""
    from oztune.cli import main

    rows = [(t, str(1 + i % 3)) for i, (t, _) in enumerate(synthetic_sentiment(12, 1))]
    train = write_tsv(tmp_path / "train123.tsv", rows)
    out = tmp_path / "m"
    assert main(["finetune", "--train", str(train), "--output", str(out), "--model", str(tiny_base), "--epochs", "1",
                 "--no-progress", "--label-names", "billing,praise,tech"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--label-names names the class ids 0..2; {train} holds the label 3 (line 4): number the "
                        "labels from 0, or write the names in the file") and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_label_names_name_class_ids_even_where_the_file_lacks_one(one_thread, tiny_base, tmp_path, monkeypatch):
    """Labels 0 and 2 with three names trained "2" as class 1 (the second of the file's labels), so `oztune
    evaluate` (class id 2) scored the same file otherwise than training did: label k is class k."""
    from oztune import Classifier
    from oztune.train import finetune as ft

    rows = [(t, "2" if y == "pos" else "0") for t, y in synthetic_sentiment(48, 1)]
    train = write_tsv(tmp_path / "train02.tsv", rows)
    seen = []
    real_fit = ft.fit

    def fit(model, data, *a, **kw):
        seen.append(sorted(set(data.labels.tolist())))
        return real_fit(model, data, *a, **kw)

    monkeypatch.setattr(ft, "fit", fit)
    record, weights, _ = finetune(tiny_base, tmp_path, "m", train=str(train), eval=str(train),
                                  label_names=["neg", "meh", "pos"])
    assert seen == [[0, 2]]
    clf = Classifier.from_pretrained(tmp_path / "m")
    assert clf.id2label == {0: "neg", 1: "meh", 2: "pos"}
    assert clf.evaluate(str(train))["accuracy"] == pytest.approx(record["metrics"]["accuracy"], abs=1e-9)


@pytest.mark.parametrize("suffix", ["/.", "/./", "//"])
def test_the_default_checkpoint_dir_of_an_output_ending_in_a_dot_is_beside_it(tmp_path, monkeypatch, suffix):
    """--output runs/m/. (the same directory as runs/m) was refused: its default --checkpoint-dir was
    runs/m/..checkpoints, inside the output, and the error blamed a --checkpoint-dir never given."""
    from oztune.train.finetune import FinetuneArgs, check_args

    monkeypatch.chdir(tmp_path)
    train = write_tsv(tmp_path / "train.tsv", synthetic_sentiment(8, 1))
    a = FinetuneArgs(train=str(train), output="runs/m" + suffix, lr=1e-4)
    check_args(a)
    assert a.checkpoints_dir() == "runs/m.checkpoints"


def test_comma_separated_label_names_and_lora_targets_are_split_as_the_flags_split_them():
    from oztune.train.finetune import FinetuneArgs

    args = FinetuneArgs(label_names="neg, pos", lora_targets="qkv,o")
    assert args.label_names == ["neg", "pos"] and args.lora_targets == ["qkv", "o"]
    assert FinetuneArgs(label_names=["neg", "pos"]).label_names == ["neg", "pos"]
