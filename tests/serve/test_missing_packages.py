"""A missing optional package (the serve extra's fastapi, uvicorn, onnxruntime) is one line naming it and the pip
extra that installs it, exit 2, as --tensorboard without tensorboard is; it was a ModuleNotFoundError traceback."""

from __future__ import annotations

import json
import sys

import pytest
from servehelp import save_tiny, tiny_classifier

from oztune.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tiny_classifier(), tmp_path_factory.mktemp("tiny") / "model")


def _one_clean_line(capsys, package: str) -> str:
    """Standard output, once standard error is checked to be one line naming ``package`` and the extra."""
    out, err = capsys.readouterr()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"needs the {package} package" in err and "oztune[serve]" in err and '".[serve]"' in err, err
    return out


@pytest.mark.parametrize("package", ["fastapi", "uvicorn"])
def test_serve_without_the_serve_extra_says_what_to_install(monkeypatch, capsys, model_dir, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails: ModuleNotFoundError, as when not installed
    monkeypatch.delitem(sys.modules, "oztune.serve.server", raising=False)  # imported afresh
    assert main(["serve", "--model", str(model_dir), "--port", "0"]) == 2
    _one_clean_line(capsys, package)


def test_evaluate_of_an_onnx_export_without_onnxruntime_says_what_to_install(monkeypatch, capsys, tmp_path):
    export = tmp_path / "export"  # what is_onnx_export takes for one: onnxruntime is imported before it is read
    export.mkdir()
    (export / "model.onnx").write_bytes(b"")
    (export / "config.json").write_text(json.dumps({"oztune": {"onnx": {"int8": False}}}))
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\ngood movie\tpos\n")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["evaluate", "--model", str(export), "--data", str(data)]) == 2
    _one_clean_line(capsys, "onnxruntime")


def test_serving_a_model_on_onnx_without_onnxruntime_says_so_before_exporting_it(monkeypatch, capsys, model_dir):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["serve", "--model", str(model_dir), "--port", "0", "--backend", "onnx"]) == 2
    assert "exporting" not in _one_clean_line(capsys, "onnxruntime")
