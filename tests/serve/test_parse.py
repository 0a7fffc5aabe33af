"""The /predict body check, without a server: text_pairs must match texts one for one."""

from __future__ import annotations

import pytest

from oztune.serve.server import HTTPError, parse_predict_body


@pytest.mark.parametrize("body", [b'{"texts": ["a", "b"], "text_pairs": ["x"]}',  # fewer pairs than texts
                                  b'{"texts": ["a"], "text_pairs": ["x", "y"]}'])  # more
def test_text_pairs_of_another_count_than_texts_get_422(body):
    with pytest.raises(HTTPError, match="text_pairs: expected one per text") as e:
        parse_predict_body(body, max_texts=64)
    assert e.value.status == 422


def test_one_pair_per_text_is_accepted():
    assert parse_predict_body(b'{"texts": ["a", "b"], "text_pairs": ["x", "y"]}', 64) == (["a", "b"], ["x", "y"])
