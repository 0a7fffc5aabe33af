"""One text, one encoding: finetune --max-length N, quantize and export keep N, and the Classifier (torch),
an ONNX export (OnnxClassifier) and the server's backends (load_backend) feed the model the same ids, mask
and type ids, for single texts, pairs, texts past max_length and texts that normalise to nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from oztune.api import Classifier
from oztune.cli import main
from oztune.data.tokenize import pad_batch

MAX_LENGTH = 10  # neither finetune's default (128) nor the tiny model's window (64)
LONG = " ".join(["good", "movie"] * 40)
TEXTS = ["the movie is good", "", "\u0301", "\u200b", "\u200b \u0301", "naïve café 😀 ＦＵＬＬ", LONG, "bad " + LONG]
PAIRS = ["a", "plot", LONG, "", "\u200b", "dull", LONG, "x"]


@pytest.fixture(scope="module")
def models(one_thread, tiny_base, sentiment_files, tmp_path_factory):
    train, _ = sentiment_files
    d = tmp_path_factory.mktemp("paths")
    ft, q = d / "ft", d / "q"
    assert main(["finetune", "--model", str(tiny_base), "--train", str(train), "--output", str(ft), "--epochs", "1",
                 "--max-train-examples", "64", "--max-length", str(MAX_LENGTH), "--no-progress"]) == 0
    assert main(["quantize", "--model", str(ft), "--output", str(q), "--no-progress"]) == 0
    for src in (ft, q):
        assert main(["export", "--model", str(src), "--output", str(d / f"{src.name}-onnx")]) == 0
    for name in ("ft", "q", "ft-onnx", "q-onnx"):  # fed pairs too, which a model fine-tuned on single texts refuses:
        config = json.loads((d / name / "config.json").read_text())  # these compare encodings, so they run as
        config["oztune"].pop("text_pairs", None)  # a model saved before oztune recorded it, which takes both
        (d / name / "config.json").write_text(json.dumps(config))
    return d


def _feeds(clf, texts, pairs):
    """What onnxruntime was given, batch by batch."""
    got, run = [], clf.session.run
    clf.session.run = lambda out, feed: (got.append(feed), run(out, feed))[1]
    try:
        clf.logits(texts, pairs)
    finally:
        clf.session.run = run
    return got


@pytest.mark.parametrize("name", ["ft", "q", "ft-onnx", "q-onnx"])
def test_max_length_is_recorded_through_quantize_and_export(models, name):
    cfg = json.loads((models / name / "config.json").read_text())
    tok = json.loads((models / name / "tokenizer.json").read_text())
    assert cfg["oztune"]["max_length"] == MAX_LENGTH
    assert tok["truncation"]["max_length"] == MAX_LENGTH


@pytest.mark.parametrize("src", ["ft", "q"])
def test_classifier_onnx_and_server_backends_encode_alike(models, src):
    from oztune.serve.backends import OnnxClassifier, load_backend

    torch_clf = Classifier.from_pretrained(models / src)
    onnx_clf = OnnxClassifier(models / f"{src}-onnx")
    served = [load_backend(str(models / src), "torch", threads=1), load_backend(str(models / src), "onnx", threads=1),
              load_backend(str(models / f"{src}-onnx"), "onnx", threads=1)]
    for clf in (torch_clf, onnx_clf, *served):
        assert clf.encoder.max_length == MAX_LENGTH, type(clf).__name__
    for pairs in (None, PAIRS):
        want = torch_clf.encoder.encode(TEXTS, pairs)
        assert max(len(ids) for ids, _ in want) == MAX_LENGTH  # the long texts are cut at MAX_LENGTH
        assert want[1] == ([2, 3], [0, 0]) or pairs is not None  # an empty text: [CLS] [SEP], attended
        for clf in (onnx_clf, *served):
            assert clf.encoder.encode(TEXTS, pairs) == want
        # the texts the Python API scores (an empty text, or second text, is refused there; encoded above)
        kept = [i for i, t in enumerate(TEXTS) if t.strip() and (pairs is None or pairs[i].strip())]
        texts, kept_pairs = [TEXTS[i] for i in kept], None if pairs is None else [pairs[i] for i in kept]
        want = [want[i] for i in kept]
        # one batch, longest first: the tensors onnxruntime gets are the padded encodings, type ids included
        onnx_clf.batch_size = len(texts)
        (feed,) = _feeds(onnx_clf, texts, kept_pairs)
        order = np.argsort(-np.array([len(ids) for ids, _ in want]), kind="stable")
        padded = pad_batch([want[i] for i in order], torch_clf.encoder.pad_id)
        assert set(feed) == {"input_ids", "attention_mask", "token_type_ids"}
        for k, v in feed.items():
            np.testing.assert_array_equal(v, padded[k].numpy(), err_msg=k)
        ref = torch_clf.predict(texts, kept_pairs, all_scores=True)
        for clf in (onnx_clf, *served):
            got = clf.predict(texts, kept_pairs, all_scores=True)
            assert [r["label"] for r in got] == [r["label"] for r in ref]
            if src == "ft" or clf in served[:1]:  # fp32 (int8: onnxruntime's integer matmul rounds otherwise)
                for a, b in zip(got, ref):
                    assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
