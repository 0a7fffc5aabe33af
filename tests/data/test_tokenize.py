"""Texts and text pairs to input ids, attention mask and token type ids, padded per batch."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from oztune.data.tokenize import TextEncoder, pad_batch

from conftest import write_tiny_tokenizer


def encoder(tmp_path, max_length: int = 16) -> TextEncoder:
    write_tiny_tokenizer(tmp_path, 64)
    return TextEncoder(Tokenizer.from_file(str(tmp_path / "tokenizer.json")), pad_id=0, max_length=max_length)


def test_pairs_get_segment_ids_and_padding_gets_mask_zero(tmp_path):
    enc = encoder(tmp_path)
    vocab = enc.tokenizer.get_vocab()
    got = enc(["good movie", "bad"], ["the plot", "dull"])
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    g, m, t, p, b, d = (vocab[w] for w in ("good", "movie", "the", "plot", "bad", "dull"))
    assert got["input_ids"].tolist() == [[cls, g, m, sep, t, p, sep], [cls, b, sep, d, sep, 0, 0]]
    assert got["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]]
    assert got["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]


def test_truncation_keeps_max_length_with_the_special_tokens(tmp_path):
    enc = encoder(tmp_path, max_length=5)
    got = enc(["good great fine nice bad awful poor"], ["the plot is dull"])
    ids = got["input_ids"][0].tolist()
    assert len(ids) == 5 and ids[0] == enc.tokenizer.token_to_id("[CLS]") and ids[-1] == enc.tokenizer.token_to_id("[SEP]")
    assert got["token_type_ids"][0].tolist()[-1] == 1  # both texts keep a part ("longest first")


def test_pad_batch_pads_right_with_the_pad_id():
    got = pad_batch([([5, 6, 7], [0, 0, 1]), ([8], [0])], pad_id=9)
    assert got["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert got["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert got["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(v.dtype == torch.int64 for v in got.values())


def test_a_max_length_below_the_special_tokens_is_refused(tmp_path):
    """Below the special tokens' count tokenizers stops truncating at all (texts came out whole)."""
    from conftest import write_tiny_tokenizer
    from oztune.data.tokenize import TextEncoder
    from oztune.errors import OztuneError

    write_tiny_tokenizer(tmp_path, 64)
    with pytest.raises(OztuneError, match="max length 2 is too short: this tokenizer adds 2 special token"):
        TextEncoder.from_dir(tmp_path, 2)
    enc = TextEncoder.from_dir(tmp_path, 3)
    assert all(len(ids) <= 3 for ids, _ in enc.encode(["a b c d e f g", "a"]))
    with pytest.raises(OztuneError, match="too short for text pairs"):
        enc.encode(["a b"], ["c d"])
    enc.set_max_length(5)
    assert all(len(ids) <= 5 for ids, _ in enc.encode(["a b c d e f g"], ["a b c d"]))


def test_an_empty_text_of_a_tokenizer_without_special_tokens_is_one_pad_token():
    """GPT-2-like tokenizers add no special token: an empty text would be a row of no tokens (attention over
    nothing: nan); it is one pad token the mask keeps."""
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"<pad>": 0, "<unk>": 1, "good": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    enc = TextEncoder(tok, pad_id=0, max_length=8)
    assert enc.encode(["", "good"]) == [([0], [0]), ([2], [0])]
    b = enc([""])
    assert b["input_ids"].shape == (1, 1) and b["attention_mask"].tolist() == [[1]]
