"""Serving/export audit (session 10): each test fails on the code it was written against, for the reason named."""

from __future__ import annotations

import pytest

from oztune.cli import main
from oztune.errors import ModelError, OztuneError
from oztune.serve.backends import load_backend
from oztune.serve.export import export_onnx


def test_onnx_export_refuses_a_checkpoint_without_a_task_head(tiny_base, tmp_path):
    """A pre-trained checkpoint with no classification head (a BertModel) is refused by
    Classifier.from_pretrained ("not a fine-tuned classifier"), but export_onnx loaded it with a freshly,
    randomly initialised head and wrote a model.onnx that then predicts label "0"/"1" at random."""
    with pytest.raises(OztuneError):
        export_onnx(tiny_base, tmp_path / "onnx")
    assert not (tmp_path / "onnx" / "model.onnx").exists()


def test_export_cli_refuses_a_checkpoint_without_a_task_head(tiny_base, tmp_path, capsys):
    assert main(["export", "--model", str(tiny_base), "--output", str(tmp_path / "onnx")]) == 2
    assert not (tmp_path / "onnx").exists()


def test_onnx_backend_refuses_a_checkpoint_without_a_task_head_as_the_torch_backend_does(tiny_base):
    """oztune serve --backend torch refuses an untrained checkpoint; --backend onnx exported it to a temporary
    directory and served a random head."""
    with pytest.raises(ModelError):
        load_backend(str(tiny_base), "torch", threads=1)
    with pytest.raises(OztuneError):
        load_backend(str(tiny_base), "onnx", threads=1)
