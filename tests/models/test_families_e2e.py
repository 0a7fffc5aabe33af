"""End-to-end checks of the non-BERT families (RoBERTa, DistilBERT, GPT-2) as a user meets them: tiny random
checkpoints saved by transformers, with the tokenizers those families really use (byte-level BPE)."""

from __future__ import annotations

import json

import numpy as np
import torch

from conftest import synthetic_sentiment, tiny_hf_model, write_tiny_tokenizer

TEXTS = ["the movie is good", "bad plot and it was very dull", "a", "nice film"]
PAIRS = ["it was fine", "the film", "nice", "poor plot"]


def _hf_logits(hf, encoded) -> np.ndarray:
    """transformers' logits of each encoding on its own (no padding), given input ids only, as its RoBERTa,
    DistilBERT and GPT-2 tokenizers give them (no token_type_ids)."""
    with torch.no_grad():
        return np.concatenate([hf(input_ids=torch.tensor([ids])).logits.numpy() for ids, _ in encoded])


def test_roberta_text_pairs_with_a_tokenizer_that_types_the_second_text(tmp_path, one_thread):
    """A RoBERTa checkpoint has one token-type row; a tokenizer whose pair template marks the second text with
    type 1 (a WordPiece one, as this suite's own tiny models use, or a BERT tokenizer shipped with a RoBERTa
    model) made every text pair an IndexError traceback. transformers' RoBERTa reads row 0 for every token."""
    from oztune.api import Classifier

    hf = tiny_hf_model("roberta", num_labels=2)
    hf.save_pretrained(tmp_path / "m")
    write_tiny_tokenizer(tmp_path / "m", 64)
    clf = Classifier.from_pretrained(tmp_path / "m")
    encoded = clf.encoder.encode(TEXTS, PAIRS)
    assert any(1 in tt for _, tt in encoded)  # the premise of the test: the second text has type 1
    np.testing.assert_allclose(clf.logits(TEXTS, PAIRS), _hf_logits(hf, encoded), atol=1e-5, rtol=1e-5)


def test_roberta_text_pairs_typed_by_the_tokenizer_export_to_onnx(tmp_path, one_thread):
    """The same checkpoint through ``oztune export``'s ONNX graph: the logits of torch fp32 within 1e-4."""
    import onnxruntime  # noqa: F401  (a dev dependency: missing, the test fails)
    from oztune.api import Classifier
    from oztune.serve.backends import OnnxClassifier
    from oztune.serve.export import export_onnx

    hf = tiny_hf_model("roberta", num_labels=2)
    hf.save_pretrained(tmp_path / "m")
    write_tiny_tokenizer(tmp_path / "m", 64)
    clf = Classifier.from_pretrained(tmp_path / "m")
    export_onnx(tmp_path / "m", tmp_path / "onnx")
    onnx = OnnxClassifier(tmp_path / "onnx")
    np.testing.assert_allclose(onnx.logits(TEXTS, PAIRS), clf.logits(TEXTS, PAIRS), atol=1e-4, rtol=1e-4)


def test_distill_into_a_student_with_a_shorter_position_window_truncates(tmp_path, one_thread, capsys):
    """``oztune distill --student DIR`` encoded the training texts at the teacher's length; a student with
    fewer position embeddings (a smaller checkpoint of the same vocabulary) then failed with an IndexError
    traceback on the first long text. Texts are cut to the student's window, as everywhere else."""
    import transformers as T

    from conftest import write_tsv
    from oztune.cli import main
    from oztune.models.hub import load_classifier

    labels = dict(num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    common = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=37, pad_token_id=1,
                  type_vocab_size=1, **labels)
    for name, positions, layers in (("teacher", 70, 2), ("student", 12, 1)):
        torch.manual_seed(0)
        cfg = T.RobertaConfig(max_position_embeddings=positions, num_hidden_layers=layers, **common)
        T.RobertaForSequenceClassification(cfg).save_pretrained(tmp_path / name)
        write_tiny_tokenizer(tmp_path / name, 64)
    rows = [(" ".join(["good"] * 30), "pos"), (" ".join(["bad"] * 30), "neg")] * 4 + synthetic_sentiment(8)
    train = write_tsv(tmp_path / "train.tsv", rows)
    code = main(["distill", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
                 "--train", str(train), "--eval", str(train), "--output", str(tmp_path / "out"), "--epochs", "1",
                 "--batch-size", "4", "--no-progress", "--precision", "fp32"])
    assert code == 0, capsys.readouterr().err
    _, enc, _ = load_classifier(tmp_path / "out")
    assert enc.max_length == 10  # 12 positions, RoBERTa's count from pad_token_id + 1 = 2
    assert main(["predict", "--model", str(tmp_path / "out"), " ".join(["good"] * 30)]) == 0


def test_gpt2_with_a_pad_token_added_to_the_tokenizer_but_not_to_the_model_is_one_clear_error(tmp_path, capsys):
    """GPT-2 has no pad token; adding one to the tokenizer without resizing the model's embeddings (a common
    slip) gave a pad id past the embedding table: finetune and predict died with an IndexError traceback
    (exit 1). Now one line naming the directory and the pad id, exit 2."""
    import transformers as T
    from tokenizers import AddedToken, Tokenizer

    from conftest import write_tsv
    from oztune.cli import main

    torch.manual_seed(0)
    T.GPT2Model(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)).save_pretrained(tmp_path / "m")
    write_tiny_tokenizer(tmp_path / "m", 64)
    tok = Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<pad>", special=True)])  # id 64, as tokenizer.add_special_tokens gives it
    tok.save(str(tmp_path / "m" / "tokenizer.json"))
    cfg = tmp_path / "m" / "config.json"
    c = json.loads(cfg.read_text())
    c["pad_token_id"] = 64  # the pad id written to the config, as tokenizer.pad_token_id would be
    cfg.write_text(json.dumps(c))
    train = write_tsv(tmp_path / "train.tsv", synthetic_sentiment(8))
    code = main(["finetune", "--model", str(tmp_path / "m"), "--train", str(train), "--output", str(tmp_path / "out"),
                 "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "pad token id 64" in err and "Traceback" not in err
