"""Serving edge cases found by an audit (session 9): empty texts on a tokenizer without special tokens, and a
model directory with another tool's model.onnx beside it. Each test failed before its fix."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from servehelp import serving

from oztune import Classifier
from oztune.serve.backends import OnnxClassifier
from oztune.serve.export import export_onnx
from oztune.serve.server import ServeLimits, create_app


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 classifier with a byte-level BPE tokenizer (vocab.json + merges.txt): no special tokens,
    so an empty text encodes to zero tokens, as with the real GPT-2 tokenizer."""
    import transformers as T
    from tokenizers.implementations import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("gpt2") / "model"
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, num_labels=3, vocab_size=300)
    T.GPT2ForSequenceClassification(cfg).eval().save_pretrained(d)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(["good movie bad film"] * 10, vocab_size=280, min_frequency=1, show_progress=False)
    tok.save_model(str(d))
    return d


def _gpt2(gpt2_dir, tmp_path, backend):
    torch.set_num_threads(1)
    if backend == "torch":
        return Classifier.from_pretrained(gpt2_dir, batch_size=8)
    return OnnxClassifier(export_onnx(gpt2_dir, tmp_path / "onnx"), batch_size=8)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_an_empty_text_is_not_a_500(gpt2_dir, tmp_path, backend):
    with serving(create_app(_gpt2(gpt2_dir, tmp_path, backend).predict)) as url:
        r = httpx.post(f"{url}/predict", json={"texts": [""]}, timeout=20)
    assert r.status_code != 500, r.text  # 200 with a prediction, or 422 saying the text is empty


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_empty_texts_do_not_fail_another_clients_request_batched_with_them(gpt2_dir, tmp_path, backend):
    app = create_app(_gpt2(gpt2_dir, tmp_path, backend).predict, ServeLimits(max_wait_ms=500))  # one batch
    with serving(app) as url, httpx.Client(base_url=url, timeout=20) as c:
        with ThreadPoolExecutor(2) as ex:
            other = ex.submit(c.post, "/predict", json={"texts": ["good movie"]})
            ex.submit(c.post, "/predict", json={"texts": [""] * 8})
            other = other.result()
        assert other.status_code == 200, f"another client's empty texts failed this request: {other.text}"


def test_a_model_directory_with_a_stray_model_onnx_is_not_taken_for_an_oztune_export(tmp_path):
    """A fine-tuned model with some other model.onnx beside it (a hand-made torch.onnx.export, an optimum
    export): is_onnx_export says "export" from the file name alone, then OnnxClassifier refuses it with
    "not an ONNX export (no model.onnx)" although model.onnx is right there."""
    from servehelp import save_tiny, tiny_classifier

    from oztune.serve.backends import open_predictor

    d = save_tiny(tiny_classifier(), tmp_path / "model")
    (d / "model.onnx").write_bytes(b"not oztune's")
    clf = open_predictor(str(d))
    assert isinstance(clf, Classifier)


def test_an_empty_text_reads_one_attended_token(gpt2_dir):
    from oztune.models.hub import load_classifier

    _, enc, _ = load_classifier(gpt2_dir)
    (ids, types), (ids2, _) = enc.encode(["", "good movie"])
    assert ids == [enc.pad_id] and types == [0] and len(ids2) > 0
    batch = enc(["", "good movie"])
    assert batch["attention_mask"][0].tolist()[:1] == [1]
