"""oztune's encodings against Hugging Face transformers' (AutoTokenizer, truncation=True, max_length=N)."""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import pytest

SST2 = Path(__file__).parents[2] / "data" / "sst2"


def _bundled():
    from oztune.models.hub import resolve_model

    try:
        return resolve_model(None)
    except Exception:
        pytest.skip("the bundled all-MiniLM-L6-v2 is not installed")


def _sentences(n: int) -> list[str]:
    if not (SST2 / "dev.tsv").is_file():
        pytest.skip("SST-2 is not at data/sst2")
    with open(SST2 / "dev.tsv", encoding="utf-8") as f:
        return [r[0] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:n + 1]


def test_a_pair_of_two_long_texts_is_encoded_in_bounded_memory():
    """Two 3,000-word texts: tokenizers' longest_first cut each into max_length pieces and combined every
    piece of one with every piece of the other (quadratic: two 10,000-word texts, one /predict request
    under the 1 MB body limit, took the model process past 20 GB). Run under a 3 GB address-space cap."""
    path = _bundled()
    code = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from oztune.data.tokenize import TextEncoder
enc = TextEncoder.from_dir({str(path)!r}, 8)
a = " ".join("good%d" % i for i in range(3000))
b = " ".join("film%d" % i for i in range(3000))
ids, types = enc.encode([a], [b])[0]
assert len(ids) == 8 and types == [0, 0, 0, 0, 1, 1, 1, 1], (ids, types)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("max_length", [64, 17, 6])
def test_long_pairs_match_transformers_longest_first(max_length):
    import transformers
    from oztune.data.tokenize import TextEncoder

    path = _bundled()
    rows = _sentences(300)
    rng = random.Random(0)
    a = [" ".join(rng.sample(rows, rng.randint(1, 12))) for _ in range(100)] + ["", "word " * 300, "x"]
    b = [" ".join(rng.sample(rows, rng.randint(1, 12))) for _ in range(100)] + ["word " * 300, "film " * 299, ""]
    hf = transformers.AutoTokenizer.from_pretrained(str(path))(a, b, truncation=True, max_length=max_length)
    got = TextEncoder.from_dir(path, max_length).encode(a, b)
    assert [ids for ids, _ in got] == hf["input_ids"]
    assert [t for _, t in got] == hf["token_type_ids"]


def test_vocab_json_merges_txt_honour_add_prefix_space_of_tokenizer_config(tmp_path):
    """A RoBERTa-style vocab.json + merges.txt whose tokenizer_config.json says add_prefix_space: true:
    transformers encodes "a" as "Ġa"; oztune ignored the setting and encoded "a"."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from oztune.data.tokenize import TextEncoder

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.train_from_iterator(["the movie was good", "a bad film"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.model.save(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_prefix_space": True}))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    ids, _ = TextEncoder.from_dir(tmp_path, 16).encode(["a"])[0]
    assert ids == [vocab["<s>"], vocab["\u0120a"], vocab["</s>"]]


def test_surrounding_whitespace_is_dropped_on_every_path_as_the_file_readers_drop_it(tmp_path):
    """The file readers strip each text; the API, the server and `predict -` did not: for a byte-level BPE
    model (GPT-2 style, no prefix space) " good" and "good" got other ids than the model was trained with."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from oztune.data.tokenize import TextEncoder

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the movie was good", "a bad film"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    enc = TextEncoder.from_dir(tmp_path, 16)
    assert enc.encode([" good\n", "\tgood "]) == enc.encode(["good", "good"])
    assert enc.encode(["good film"], [" bad "]) == enc.encode(["good film"], ["bad"])
