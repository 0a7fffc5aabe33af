"""Session 11 audit of chains of compression steps and their less-travelled options (quantize, prune, export,
ahead-of-time packages): each test failed on the code before its fix."""

from __future__ import annotations

import json

import pytest
import torch

from oztune.api import Classifier
from oztune.cli import main
from oztune.models import aot


@pytest.mark.parametrize("meta", ['{"torch": ', "", "[1, 2]", '"x"', "null", "MISSING_MAX_TOKENS"])
def test_an_unreadable_aoti_meta_json_runs_eager_with_a_warning_not_a_traceback(tiny_hf_dir, tmp_path, capsys, meta):
    # a cut-short or hand-edited aoti/meta.json crashed from_pretrained, predict, evaluate and serve with a
    # JSONDecodeError / AttributeError / KeyError traceback, where a broken .pt2 package runs eager with a warning
    src = tiny_hf_dir("bert")[0]
    folder = src / aot.AOT_DIR
    folder.mkdir()
    if meta == "MISSING_MAX_TOKENS":
        meta = json.dumps({**aot.machine(), "query_rows": True, "weights_sha256": aot.weights_digest(src)})
    (folder / aot.META).write_text(meta)
    with pytest.warns(UserWarning, match="meta.json: unreadable"):
        clf = Classifier.from_pretrained(src)
    plain = Classifier.from_pretrained(src, aot=False)
    texts = ["good film", "w1 w2 w3 bad"]
    assert [p["label"] for p in clf.predict(texts)] == [p["label"] for p in plain.predict(texts)]
    with pytest.warns(UserWarning, match="meta.json: unreadable"):
        assert main(["predict", "--model", str(src), "good film"]) == 0
    assert '"label"' in capsys.readouterr().out
