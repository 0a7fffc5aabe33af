"""The /predict body check, without a server: text_pairs must match texts one for one."""

from __future__ import annotations

import pytest

from oztune.data.readers import read_examples
from oztune.errors import DataError
from oztune.serve.server import HTTPError, parse_predict_body


@pytest.mark.parametrize("body", [b'{"texts": ["a", "b"], "text_pairs": ["x"]}',  # fewer pairs than texts
                                  b'{"texts": ["a"], "text_pairs": ["x", "y"]}'])  # more
def test_text_pairs_of_another_count_than_texts_get_422(body):
    with pytest.raises(HTTPError, match="text_pairs: expected one per text") as e:
        parse_predict_body(body, max_texts=64)
    assert e.value.status == 422


def test_one_pair_per_text_is_accepted():
    assert parse_predict_body(b'{"texts": ["a", "b"], "text_pairs": ["x", "y"]}', 64) == (["a", "b"], ["x", "y"])


@pytest.mark.parametrize("model_pairs", [None, False])
def test_text_pairs_null_means_single_texts(model_pairs):
    """A client that always sends the field ("text_pairs": null, as json.dumps of None writes it) asks for
    single texts: taken, also by a model fine-tuned on single texts, not a 422."""
    assert parse_predict_body(b'{"texts": ["a"], "text_pairs": null}', 64, text_pairs=model_pairs) == (["a"], None)


@pytest.mark.parametrize("model_pairs,body,message", [
    (True, b'{"texts": ["a"]}', "texts: single texts, but the model was fine-tuned on text pairs"),
    (False, b'{"texts": ["a"], "text_pairs": ["x"]}', "texts: text pairs, but the model was fine-tuned on single texts"),
])
def test_texts_of_the_other_kind_than_the_model_s_get_422(model_pairs, body, message):
    with pytest.raises(HTTPError, match=message) as e:
        parse_predict_body(body, 64, text_pairs=model_pairs)
    assert e.value.status == 422 and "text_pairs" in str(e.value)
    parse_predict_body(body, 64)  # a model that does not say which it was fine-tuned on takes both


@pytest.mark.parametrize("text", ["\\ud800", "ab\\udfffc"])
def test_a_lone_surrogate_is_placed_as_the_data_files_place_it(tmp_path, text):
    """The server said "at character 0" (counted from 0) where a data file with the same text says
    "at character 1" (counted from 1, as every position oztune reports)."""
    (tmp_path / "t.jsonl").write_text('{"text": "%s", "label": "x"}\n' % text)
    with pytest.raises(DataError) as in_file:
        read_examples(tmp_path / "t.jsonl")
    with pytest.raises(HTTPError) as in_request:
        parse_predict_body(b'{"texts": ["%s"]}' % text.encode(), 64)
    where = in_file.value.args[0].rpartition("(")[2]  # "a lone surrogate, U+...., at character N)"
    assert where.startswith("a lone surrogate") and where in str(in_request.value)
