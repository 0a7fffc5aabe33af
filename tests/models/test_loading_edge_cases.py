"""Loading Hugging Face checkpoints: config options, activations, bad files, tokenizers (an audit, session 9; each
failed before its fix)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import padded_batch, write_tiny_tokenizer

from oztune.errors import ModelError
from oztune.models.hub import load_classifier, save_classifier


def _boost(model):
    """Weights large enough that a wrong computation shows in the logits (random init is std 0.02)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _gpt2(**kw):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64, num_labels=3,
                       pad_token_id=0, **kw)
    return _boost(T.GPT2ForSequenceClassification(cfg))


def _bert(**kw):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       max_position_embeddings=64, vocab_size=64, num_labels=3, **kw)
    return _boost(T.BertForSequenceClassification(cfg))


def _save(hf, d):
    hf.save_pretrained(d)
    write_tiny_tokenizer(d, 64)
    return d


@pytest.mark.parametrize("make", [
    pytest.param(lambda: _gpt2(scale_attn_by_inverse_layer_idx=True), id="gpt2-scale_attn_by_inverse_layer_idx"),
    pytest.param(lambda: _gpt2(scale_attn_weights=False), id="gpt2-scale_attn_weights-false"),
    pytest.param(lambda: _bert(is_decoder=True), id="bert-is_decoder"),
])
def test_config_option_is_honoured_or_refused(tmp_path, make):
    """A config option that changes HF's logits must change oztune's too, or loading must refuse it."""
    hf = make()
    d = _save(hf, tmp_path / "m")
    try:
        model, _, _ = load_classifier(d)
    except ModelError:
        return  # refusing clearly is acceptable
    ids, mask = padded_batch(hf.config.pad_token_id or 0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("act", ["swish", "quick_gelu", "gelu_fast", "relu", "gelu_new"])
def test_hf_activations_compute_as_in_transformers(tmp_path, act):
    hf = _bert(hidden_act=act)
    model, _, _ = load_classifier(_save(hf, tmp_path / "m"))
    ids, mask = padded_batch(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)


def test_an_activation_oztune_does_not_compute_is_refused_by_name(tmp_path):
    d = _save(_bert(), tmp_path / "m")
    _edit_config(d, lambda c: {**c, "hidden_act": "mish"})
    with pytest.raises(ModelError, match="hidden_act 'mish'"):
        load_classifier(d)


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(fn(cfg)))


@pytest.mark.parametrize("edit", [
    pytest.param(lambda c: {k: v for k, v in c.items() if k != "vocab_size"}, id="no-vocab_size"),
    pytest.param(lambda c: {k: v for k, v in c.items() if k != "num_hidden_layers"}, id="no-num_hidden_layers"),
    pytest.param(lambda c: [c], id="not-an-object"),
    pytest.param(lambda c: {**c, "hidden_size": 64}, id="hidden_size-disagrees-with-weights"),
])
def test_bad_config_is_a_model_error(tiny_hf_dir, edit):
    d, _ = tiny_hf_dir("bert")
    _edit_config(d, edit)
    with pytest.raises(ModelError):
        load_classifier(d)


@pytest.mark.parametrize("name,text", [("tokenizer.json", "{"), ("tokenizer_config.json", "{oops")])
def test_corrupt_tokenizer_files_are_a_model_error(tiny_hf_dir, name, text):
    d, _ = tiny_hf_dir("bert")
    if name == "tokenizer_config.json":  # read on the vocab.txt path
        (d / "tokenizer.json").unlink()
        (d / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\ngood\n")
    (d / name).write_text(text)
    with pytest.raises(ModelError):
        load_classifier(d)


def test_saved_config_dtype_matches_saved_weights(tmp_path):
    """An fp16 checkpoint is fine-tuned in fp32 and saved in fp32; config.json must not keep saying
    float16, or transformers (dtype="auto" by default) reloads it in half precision."""
    import transformers as T
    from safetensors.torch import load_file

    hf = _bert()
    d = tmp_path / "m"
    hf.half().save_pretrained(d)
    write_tiny_tokenizer(d, 64)
    model, enc, meta = load_classifier(d)
    out = save_classifier(model, enc, tmp_path / "out", meta["id2label"])
    saved = {str(t.dtype).removeprefix("torch.") for t in load_file(out / "model.safetensors").values()}
    cfg = json.loads((out / "config.json").read_text())
    declared = cfg.get("dtype") or cfg.get("torch_dtype")
    assert declared in (None, *saved), f"config.json says {declared}, weights are {saved}"
    assert T.AutoModelForSequenceClassification.from_pretrained(out).dtype == torch.float32


def test_roberta_vocab_json_merges_gets_roberta_special_tokens(tmp_path):
    """A RoBERTa directory with only vocab.json + merges.txt (slow tokenizer) encodes as RobertaTokenizer:
    <s> ... </s> (the head pools <s>), and no token type 1 (RoBERTa has type_vocab_size 1)."""
    import transformers as T

    from oztune.data.tokenize import TextEncoder

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in "abcdefghijklmnopqrstuvwxyzĠ":
        vocab[ch] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    ref = T.RobertaTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    enc = TextEncoder.from_dir(tmp_path, 32, pad_token_id=1)
    assert enc.encode(["good food"])[0][0] == ref("good food")["input_ids"]
    ids, types = enc.encode(["good"], ["food"])[0]
    assert ids == ref("good", "food")["input_ids"] and set(types) == {0}


def test_vocab_txt_strip_accents_from_tokenizer_config(tmp_path):
    import transformers as T

    from oztune.data.tokenize import TextEncoder

    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\ncafé\ncafe\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "strip_accents": False}))
    ref = T.BertTokenizerFast(str(tmp_path / "vocab.txt"), do_lower_case=True, strip_accents=False)
    assert TextEncoder.from_dir(tmp_path, 16).encode(["café"])[0][0] == ref("café")["input_ids"]


@pytest.mark.parametrize("field", ["vocab_size", "max_position_embeddings", "type_vocab_size"])
def test_a_size_that_is_not_a_number_is_a_model_error(tiny_hf_dir, field):
    d, _ = tiny_hf_dir("bert")
    _edit_config(d, lambda c: {**c, field: "x"})
    with pytest.raises(ModelError, match="config.json: a field has a value oztune cannot use"):
        load_classifier(d)


@pytest.mark.parametrize("field, value", [("layer_norm_eps", "1e-12"), ("hidden_dropout_prob", "0.1"),
                                          ("pad_token_id", "x"), ("num_attention_heads", 4.0)])
def test_a_setting_of_the_wrong_type_is_a_model_error(tiny_hf_dir, field, value):
    d, _ = tiny_hf_dir("bert")
    _edit_config(d, lambda c: {**c, field: value})
    with pytest.raises(ModelError, match="config.json: a field has a value oztune cannot use"):
        load_classifier(d)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2"])
def test_a_tokenizer_with_more_ids_than_the_token_embedding_is_refused_at_load_time(tiny_hf_dir, family, capsys):
    # tokens added to the tokenizer without resizing the model's embeddings: a text holding one was an
    # IndexError traceback at predict time ("index out of range in self")
    from tokenizers import Tokenizer

    from oztune.cli import main

    d, _ = tiny_hf_dir(family)
    load_classifier(d)  # the family's own tiny model (vocabulary 64, its tokenizer 64 ids) loads
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_tokens(["brandnewword"])  # id 64
    tok.save(str(d / "tokenizer.json"))
    with pytest.raises(ModelError) as e:
        load_classifier(d)
    assert str(e.value) == (f"{d}: its tokenizer has 65 token ids but the model's token embedding has 64 rows "
                            "(tokens added to the tokenizer without resizing the model's embeddings?)")
    capsys.readouterr()
    assert main(["predict", "--model", str(d), "a brandnewword"]) == 2
    assert capsys.readouterr().err == f"oztune predict: error: {e.value}\n"


def test_a_tokenizer_with_fewer_ids_than_the_token_embedding_loads(tmp_path):
    # (real checkpoints round their table up, e.g. to a multiple of 8: the spare rows are never read)
    d = tmp_path / "m"
    _bert().save_pretrained(d)
    write_tiny_tokenizer(d, 40)
    load_classifier(d)


def test_a_regression_head_of_several_outputs_is_refused_by_name(tiny_hf_dir):
    # oztune's regression predicts one value per text; HF's several would reach evaluate as 3N values for N scores
    d, _ = tiny_hf_dir("bert", num_labels=3, problem_type="regression")
    with pytest.raises(ModelError, match=r"config.json: .*a regression head has one output \(num_labels 1\), not 3"):
        load_classifier(d)


@pytest.mark.parametrize("family, nulls, says", [
    ("roberta", ("pad_token_id",), "pad_token_id is null; a roberta model numbers its positions from pad_token_id + 1: "
                                   "expected an integer"),
    ("gpt2", ("pad_token_id", "eos_token_id"), "pad_token_id and eos_token_id are both null; GPT-2 pads batches with "
                                               "one of them: expected an integer")])
def test_a_null_token_id_the_family_needs_is_named(tiny_hf_dir, capsys, family, nulls, says):
    # it was "unsupported operand type(s) for +: 'NoneType' and 'int'" (RoBERTa), "pad_token_id must be a int,
    # not None" (GPT-2 whose eos is null too)
    _check_token_id_message(tiny_hf_dir, capsys, family, {k: None for k in nulls}, says)


def test_a_gpt2_list_of_eos_ids_without_a_pad_id_names_eos_token_id(tiny_hf_dir, capsys):
    # transformers takes a list of eos ids; the pad id falls back to eos, and the message named pad_token_id
    # ("pad_token_id must be a int, not [0, 5]"), a field the file does not have
    _check_token_id_message(tiny_hf_dir, capsys, "gpt2", {"pad_token_id": None, "eos_token_id": [0, 5]},
                            "pad_token_id is not set and eos_token_id, which GPT-2 pads batches with then, is [0, 5]: "
                            "expected an integer pad_token_id")


def _check_token_id_message(tiny_hf_dir, capsys, family, edits, says):
    from oztune.cli import main

    d, _ = tiny_hf_dir(family)
    _edit_config(d, lambda c: {**c, **edits})
    with pytest.raises(ModelError, match=re.escape(f"{d / 'config.json'}: {says}")):
        load_classifier(d)
    capsys.readouterr()
    assert main(["predict", "--model", str(d), "a text"]) == 2
    err = capsys.readouterr().err
    assert says in err and str(d) in err and err.count("\n") == 1


def test_a_head_dropout_of_one_is_refused():
    from oztune.models.families import FAMILIES, ConfigError, hf_head_dropout

    assert hf_head_dropout(FAMILIES["bert"], {"classifier_dropout": 0.5}) == 0.5
    with pytest.raises(ConfigError, match=r"classifier_dropout 1\.0 is not a dropout probability"):
        hf_head_dropout(FAMILIES["bert"], {"classifier_dropout": 1.0})


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_a_null_pad_token_id_pads_with_id_0(tiny_hf_dir, family):
    """A config.json with "pad_token_id": null (transformers writes one for a config given none): BERT and
    DistilBERT read it as 0, their padding id, not None."""
    from oztune.models.families import FAMILIES

    d, _ = tiny_hf_dir(family)
    hf = json.loads((d / "config.json").read_text())
    hf["pad_token_id"] = None
    assert FAMILIES[family].config(hf, family).pad_token_id == 0
