"""The ONNX backend on a multi-label model: sigmoid scores per label, as oztune.Classifier gives them."""

from __future__ import annotations

import pytest
import torch
from servehelp import random_texts, save_tiny

from oztune import Classifier
from oztune.config import HeadConfig, ModelConfig
from oztune.models.transformer import SequenceClassifier, init_weights
from oztune.serve.backends import OnnxClassifier
from oztune.serve.export import export_onnx


def test_onnx_multi_label_scores_are_sigmoids_matching_the_torch_model(tmp_path, one_thread):
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                           intermediate_size=37, max_positions=64),
                               HeadConfig(num_labels=3, problem_type="multi_label"))
    init_weights(model, std=0.2)
    model_dir = save_tiny(model.eval(), tmp_path / "model")
    clf, onnx = Classifier.from_pretrained(model_dir), OnnxClassifier(export_onnx(model_dir, tmp_path / "onnx"))
    assert onnx.problem_type == "multi_label"
    texts = random_texts(12, seed=4)
    want, got = clf.predict(texts, all_scores=True), onnx.predict(texts, all_scores=True)
    scores = [s for p in got for s in p["scores"].values()]
    assert all(0 < s < 1 for s in scores) and min(scores) < 0.5 < max(scores)  # probabilities, labels on and off
    for g, w in zip(got, want):
        assert g["label"] == w["label"]
        assert g["scores"] == pytest.approx(w["scores"], abs=1e-5)
