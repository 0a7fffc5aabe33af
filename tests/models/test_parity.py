"""oztune's loader on tiny random HF models gives HF's logits; the bundled MiniLM matches HF BertModel."""

from __future__ import annotations

import pytest
import torch

from conftest import padded_batch

from oztune.models.hub import load_classifier, resolve_model

FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "xlm-roberta", "camembert"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_on_padded_batch(tiny_hf_dir, family):
    d, hf = tiny_hf_dir(family)
    model, _, meta = load_classifier(d)
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    ids, mask = padded_batch(pad)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = model(ids, mask)
    assert out.shape == ref.shape == (4, 3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert sorted(meta["id2label"]) == [0, 1, 2]


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_unpadded_batch_matches_too(tiny_hf_dir, family):
    d, hf = tiny_hf_dir(family)
    model, _, _ = load_classifier(d)
    ids, mask = padded_batch(0, lengths=(6, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)


def test_bundled_minilm_last_hidden_state_matches_hf():
    import transformers
    path = resolve_model(None)
    model, enc, _ = load_classifier(path)
    hf = transformers.BertModel.from_pretrained(path).eval()
    batch = enc(["a charming and often affecting journey .", "bleak", "it is not a good film , but the cast is fine"])
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        out = model.backbone(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    m = batch["attention_mask"].bool()
    torch.testing.assert_close(out[m], ref[m], atol=1e-5, rtol=1e-5)


def test_a_saved_gpt2_without_a_pad_token_runs_batches_in_transformers(tmp_path):
    """GPT-2 has no pad token: the id oztune padded with is written to config.json, which HF's
    GPT2ForSequenceClassification needs to find each row's last token in a batch of several."""
    import json

    import transformers as T
    from conftest import tiny_hf_model, write_tiny_tokenizer

    from oztune.models.hub import save_classifier

    hf = tiny_hf_model("gpt2")
    hf.config.pad_token_id = None
    src = tmp_path / "src"
    hf.save_pretrained(src)
    write_tiny_tokenizer(src, 64)
    model, enc, meta = load_classifier(src)
    out = save_classifier(model, enc, tmp_path / "out", meta["id2label"])
    pad = json.loads((out / "config.json").read_text())["pad_token_id"]
    assert pad == enc.pad_id
    again = T.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids, mask = padded_batch(pad)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, model(ids, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_with_sharp_attention(tmp_path, family):
    """Random tiny models attend almost uniformly, which hides attention-only mistakes (a query/key swap):
    weights 10x larger make the attention sharp and the logits spread."""
    from conftest import tiny_hf_model, write_tiny_tokenizer

    hf = tiny_hf_model(family)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 2 and "embed" not in name and not name.startswith(("wte", "wpe")):
                p.mul_(10.0)
    hf.save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path, 64)
    model, _, _ = load_classifier(tmp_path)
    ids, mask = padded_batch(hf.config.pad_token_id if hf.config.pad_token_id is not None else 0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = model(ids, mask)
    assert ref.std() > 0.1  # spread, not all near zero
    torch.testing.assert_close(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


def test_gpt2_left_padded_batch_reads_each_rows_last_token_like_hf(tiny_hf_dir):
    """Last-token pooling reads the rightmost real token, wherever the padding is (HF finds it the same way)."""
    d, hf = tiny_hf_dir("gpt2")
    model, _, _ = load_classifier(d)
    ids, mask = padded_batch(hf.config.pad_token_id)
    ids, mask = ids.flip(1), mask.flip(1)  # padding on the left
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = model(ids, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["xlm-roberta", "camembert"])
def test_roberta_under_another_name_saves_back_as_itself(tiny_hf_dir, tmp_path, family):
    """XLM-RoBERTa and CamemBERT are RoBERTa's network under their own model_type: a fine-tuned one saves back
    as its own class, which transformers loads to the same logits (and structured pruning keeps its layer count
    field right)."""
    import json

    import transformers as T

    from oztune.compress.prune import drop_layers_
    from oztune.models.hub import save_classifier

    d, hf = tiny_hf_dir(family)
    model, enc, meta = load_classifier(d)
    drop_layers_(model, [1])
    out = save_classifier(model, enc, tmp_path / "out", meta["id2label"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [type(hf).__name__]
    assert config["num_hidden_layers"] == 1
    again = T.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(again) is type(hf)
    ids, mask = padded_batch(hf.config.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, model(ids, mask),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sinusoidal", [True, False], ids=["sinusoidal", "learned"])
def test_distilbert_position_table_loads_trains_and_saves_as_hfs(tmp_path, sinusoidal):
    """A DistilBERT with ``sinusoidal_pos_embds`` (sin/cos at HF's fresh initialization): its position table is
    the checkpoint's, as transformers loads it, and trains exactly when transformers' does (older versions set
    requires_grad False on the table they computed; 5.x trains it: the installed one is the reference), and
    saving keeps the field, so that transformers rebuilds the same model from oztune's directory."""
    import json

    import transformers as T

    from conftest import write_tiny_tokenizer

    from oztune.models.hub import save_classifier

    torch.manual_seed(0)
    cfg = T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64,
                             sinusoidal_pos_embds=sinusoidal, num_labels=3, vocab_size=64)
    T.DistilBertForSequenceClassification(cfg).save_pretrained(tmp_path / "hf")
    write_tiny_tokenizer(tmp_path / "hf", 64)
    hf = T.DistilBertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    table = hf.distilbert.embeddings.position_embeddings.weight
    model, enc, meta = load_classifier(tmp_path / "hf")
    assert torch.equal(model.backbone.embed.position.weight, table)
    assert model.backbone.embed.position.weight.requires_grad == table.requires_grad
    out = save_classifier(model, enc, tmp_path / "out", meta["id2label"])
    assert json.loads((out / "config.json").read_text()).get("sinusoidal_pos_embds", False) is sinusoidal
    again = T.DistilBertForSequenceClassification.from_pretrained(out).eval()
    assert again.distilbert.embeddings.position_embeddings.weight.requires_grad == table.requires_grad
    ids, mask = padded_batch(0)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, hf(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=1e-5)
