"""Loading is strict and names keys; saving is atomic; .bin checkpoints load with weights_only."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from oztune.errors import ModelError
from oztune.models.hub import format_size, load_classifier, resolve_model, save_classifier


def test_missing_key_is_named(tiny_hf_dir):
    d, _ = tiny_hf_dir("bert")
    sd = load_file(d / "model.safetensors")
    del sd["bert.encoder.layer.1.output.dense.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ModelError, match=r"missing weight 'bert.encoder.layer.1.output.dense.weight'"):
        load_classifier(d)


def test_unexpected_key_is_named(tiny_hf_dir):
    d, _ = tiny_hf_dir("distilbert")
    sd = load_file(d / "model.safetensors")
    sd["distilbert.transformer.layer.0.surprise.weight"] = torch.zeros(2)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ModelError, match=r"unexpected weight\(s\) distilbert.transformer.layer.0.surprise.weight"):
        load_classifier(d)


def test_pytorch_model_bin_loads_like_safetensors(tiny_hf_dir):
    d, hf = tiny_hf_dir("roberta")
    a, _, _ = load_classifier(d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    b, _, _ = load_classifier(d)
    ids = torch.randint(4, 60, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)


def test_unsupported_family_is_named(tiny_hf_dir):
    d, _ = tiny_hf_dir("bert")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="model_type 'mamba' is not supported; supported: bert, roberta, xlm-roberta, camembert, distilbert, gpt2"):
        load_classifier(d)


def test_base_model_gets_a_new_head_of_the_asked_size(tiny_base):
    model, _, meta = load_classifier(tiny_base, num_labels=5, problem_type="multi_label")
    assert model.head.out.out_features == 5 and model.head_cfg.problem_type == "multi_label"
    assert meta["id2label"] == {}


def test_custom_head_saves_natively_and_reloads_identically(tiny_base, tmp_path):
    model, enc, _ = load_classifier(tiny_base, num_labels=3, head={"pooling": "mean", "hidden_sizes": [16], "activation": "gelu"})
    out = save_classifier(model, enc, tmp_path / "m", {0: "a", 1: "b", 2: "c"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["oztune"]["format"] == "native" and cfg["architectures"] == ["OztuneSequenceClassifier"]
    again, _, meta = load_classifier(out)
    ids = torch.randint(4, 60, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), again(ids, mask), rtol=0, atol=0)
    assert meta["id2label"] == {0: "a", 1: "b", 2: "c"}
    # transformers refuses the directory rather than loading the config and running random weights
    assert cfg["model_type"] == "oztune-bert"
    import transformers as T

    with pytest.raises(ValueError, match="oztune-bert"):
        T.AutoModelForSequenceClassification.from_pretrained(out)
    # and a standard head again (fine-tuned from it) is saved in HF's format with HF's model_type
    from oztune.models.hub import new_head_

    new_head_(again, 3, "single_label")
    hf = json.loads((save_classifier(again, enc, tmp_path / "hf", {0: "a", 1: "b", 2: "c"}) / "config.json").read_text())
    assert hf["model_type"] == "bert" and hf["oztune"]["format"] == "hf"


def test_save_replaces_existing_directory_only_when_complete(tiny_base, tmp_path, monkeypatch):
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    out = save_classifier(model, enc, tmp_path / "m", {0: "x", 1: "y"})
    before = (out / "model.safetensors").read_bytes()
    import oztune.models.hub as hub

    def broken(*a, **k):
        raise KeyboardInterrupt  # an interruption in the middle of writing the new directory

    monkeypatch.setattr(hub, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        save_classifier(model, enc, out, {0: "x", 1: "y"})
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_default_model_is_the_bundled_minilm():
    path = resolve_model(None)
    assert (path / "model.safetensors").is_file() and json.loads((path / "config.json").read_text())["hidden_size"] == 384


def test_unknown_name_and_file_instead_of_directory(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        resolve_model("nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ModelError, match="a model must be a directory"):
        resolve_model(f)


def test_hub_ids_with_and_without_owner_are_downloaded_and_paths_are_not(tmp_path, monkeypatch):
    # Before: a bare legacy id (bert-base-uncased, gpt2), which the hub and transformers accept, was refused
    # as "not a hub id" without trying.
    from oztune.models import hub

    asked = []
    monkeypatch.setattr(hub, "_download", lambda name: asked.append(name) or tmp_path)
    for name in ["bert-base-uncased", "gpt2", "google-bert/bert-base-uncased", "FacebookAI/roberta-base",
                 "owner_1/model.v2"]:
        assert resolve_model(name) == tmp_path
    assert asked == ["bert-base-uncased", "gpt2", "google-bert/bert-base-uncased", "FacebookAI/roberta-base",
                     "owner_1/model.v2"]
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # (a checkout where the README's main command ran holds runs/sst2/)
    for path in ["runs/a/b", "./missing", "../missing", "/no/such/dir", "runs/sst2/", ".hidden", "-x", "a b", "modèle"]:
        with pytest.raises(ModelError, match=r"no such directory, and not a hub id \(owner/name, or a name"):
            resolve_model(path)
    assert len(asked) == 5


def test_a_mistyped_path_in_a_local_directory_is_not_looked_for_on_the_hub(tmp_path, monkeypatch):
    """runs/nosuch (runs/ here) read "no such directory, and the hub download failed (LocalEntryNotFoundError ...)"
    after a network timeout: a typo in a path is said as one, and nothing is downloaded."""
    from oztune.models import hub

    asked = []
    monkeypatch.setattr(hub, "_download", lambda name: asked.append(name) or tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"^runs/nosuch: no such directory \(runs holds no 'nosuch'; "):
        resolve_model("runs/nosuch")
    assert resolve_model("google-bert/bert-base-uncased") == tmp_path and asked == ["google-bert/bert-base-uncased"]


def test_a_name_the_hub_does_not_give_says_so_in_one_line():
    with pytest.raises(ModelError, match=r"unknown model 'no-such-model-here': no such directory, and the hub "
                                         r"download failed \(\w+"):
        resolve_model("no-such-model-here")


def test_a_head_weight_missing_from_the_checkpoint_is_named(tiny_hf_dir):
    from safetensors.torch import load_file, save_file

    d, _ = tiny_hf_dir("bert")
    sd = load_file(d / "model.safetensors")
    del sd["classifier.bias"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"classification head does not match config.json: missing head\.out\.bias"):
        load_classifier(d)


def test_a_head_layer_without_its_weight_names_the_weight(tiny_hf_dir):
    from safetensors.torch import load_file, save_file

    d, _ = tiny_hf_dir("distilbert")
    sd = load_file(d / "model.safetensors")
    del sd["pre_classifier.weight"]  # its bias stays: not "unexpected pre_classifier.bias"
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"missing head\.hidden\.0\.weight"):
        load_classifier(d)


class NotATensor:
    """Anything but a tensor: unpickling it would run code of the file's choosing."""


def test_pytorch_model_bin_with_code_objects_is_refused(tiny_hf_dir):
    d, _ = tiny_hf_dir("bert")
    sd = load_file(d / "model.safetensors")
    torch.save({**sd, "extra": NotATensor()}, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"pytorch_model.bin: cannot be read as plain weights"):
        load_classifier(d)


def test_a_pretraining_checkpoint_loads_with_a_new_head(tmp_path):
    """BertForPreTraining holds masked-LM and next-sentence heads ("cls."): not the task head, ignored."""
    import transformers as T
    from conftest import write_tiny_tokenizer

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=64)
    T.BertForPreTraining(cfg).save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path, 64)
    model, _, meta = load_classifier(tmp_path, num_labels=2)
    assert not meta["trained"] and model.head_cfg.num_labels == 2


@pytest.mark.parametrize("num_labels, hf_problem, ours", [(1, None, "regression"), (3, None, "single_label"),
                                                          (3, "multi_label_classification", "multi_label")])
def test_problem_type_read_from_an_hf_config(tiny_hf_dir, num_labels, hf_problem, ours):
    d, _ = tiny_hf_dir("bert", num_labels=num_labels, problem_type=hf_problem)
    model, _, _ = load_classifier(d)
    assert model.head_cfg.problem_type == ours


@pytest.mark.parametrize("ours, hf_problem", [("single_label", "single_label_classification"),
                                              ("multi_label", "multi_label_classification"), ("regression", "regression")])
def test_saved_problem_type_is_the_one_transformers_reads(tiny_base, tmp_path, ours, hf_problem):
    import transformers as T

    model, enc, _ = load_classifier(tiny_base, num_labels=1 if ours == "regression" else 3, problem_type=ours)
    labels = {0: "value"} if ours == "regression" else {0: "a", 1: "b", 2: "c"}
    out = save_classifier(model, enc, tmp_path / "m", labels)
    assert json.loads((out / "config.json").read_text())["problem_type"] == hf_problem
    assert T.AutoConfig.from_pretrained(out).problem_type == hf_problem


def test_run_json_is_strict_json_when_a_metric_is_not_a_number(tmp_path):
    # a run whose weights went to nan records nan metrics: run.json says null (NaN is not JSON: jq, JS refuse it)
    from conftest import write_tiny_tokenizer

    from oztune.config import HeadConfig, ModelConfig
    from oztune.data.tokenize import TextEncoder
    from oztune.models.transformer import SequenceClassifier

    d = tmp_path / "tok"
    d.mkdir()
    write_tiny_tokenizer(d, 64)
    model = SequenceClassifier(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                           intermediate_size=48, max_positions=64), HeadConfig(num_labels=2))
    run = {"metrics": {"accuracy": 0.5, "train_loss": float("nan")}, "history": [{"mse": float("inf")}]}
    out = save_classifier(model, TextEncoder.from_dir(d, 16), tmp_path / "m", {0: "a", 1: "b"}, run=run)
    text = (out / "run.json").read_text()

    def refuse(name):
        raise ValueError(name)

    saved = json.loads(text, parse_constant=refuse)
    assert saved["metrics"] == {"accuracy": 0.5, "train_loss": None} and saved["history"] == [{"mse": None}]


@pytest.mark.parametrize("mb,shown", [(0, "0 B"), (0.000512, "512 B"), (0.0123456, "12.3 kB"), (0.09, "90 kB"),
                                      (0.9997, "1 MB"), (85.24, "85.2 MB"), (1234.5, "1.23 GB"), (4.2e6, "4.2 TB")])
def test_sizes_are_shown_with_three_significant_digits_in_a_unit_that_fits(mb, shown):
    assert format_size(mb) == shown


def test_saved_tokenizer_truncates_in_transformers_where_the_model_was_fine_tuned(tiny_hf_dir, tmp_path):
    """tokenizer_config.json kept the source's model_max_length (512 for MiniLM; here 64, or none at all) while
    the model was fine-tuned and predicts at its own max_length: transformers' AutoTokenizer(truncation=True) +
    AutoModelForSequenceClassification scored a longer text otherwise than oztune."""
    import transformers as T

    from oztune import Classifier

    d, _ = tiny_hf_dir("bert")
    source_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64,
                  "clean_up_tokenization_spaces": False, "unk_token": "[UNK]"}
    (d / "tokenizer_config.json").write_text(json.dumps(source_cfg))
    clf = Classifier.from_pretrained(d, max_length=12)
    out = save_classifier(clf.model, clf.encoder, tmp_path / "m", clf.id2label)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved == {**source_cfg, "model_max_length": 12}
    text = " ".join(["good movie and the plot"] * 8)  # 40 words: over 12 tokens, under the 64 positions
    tok = T.AutoTokenizer.from_pretrained(out)
    assert tok.model_max_length == 12
    enc = tok(text, truncation=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 12
    with torch.no_grad():
        hf_logits = T.AutoModelForSequenceClassification.from_pretrained(out).eval()(**enc).logits.numpy()
    ours = Classifier.from_pretrained(out).logits([text])
    assert abs(hf_logits - ours).max() < 1e-5
    (d / "tokenizer_config.json").unlink()  # none in the source: made, with the key
    out = save_classifier(clf.model, clf.encoder, tmp_path / "m2", clf.id2label)
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 12}
    assert T.AutoTokenizer.from_pretrained(out).model_max_length == 12


@pytest.mark.parametrize("family, field", [("bert", "classifier_dropout"), ("roberta", "classifier_dropout"),
                                           ("xlm-roberta", "classifier_dropout"), ("camembert", "classifier_dropout"),
                                           ("distilbert", "seq_classif_dropout"), ("gpt2", None)])
def test_head_dropout_is_saved_in_the_field_transformers_reads(tiny_hf_dir, tmp_path, family, field):
    """--head-dropout 0.3 (HeadConfig dropout) was not written to config.json: transformers trained the saved
    model's head on with its own (0.1). GPT-2's head (``score``) has no dropout: nothing to write."""
    import transformers as T

    from oztune.models.hub import new_head_

    d, _ = tiny_hf_dir(family)
    model, enc, _ = load_classifier(d)
    new_head_(model, 3, "single_label", {"dropout": 0.3})
    out = save_classifier(model, enc, tmp_path / "m", {0: "a", 1: "b", 2: "c"})
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")  # the HF-loadable head
    hf = T.AutoModelForSequenceClassification.from_pretrained(out)
    dropouts = {m.p for name, m in hf.named_modules() if isinstance(m, torch.nn.Dropout)
                and (name.startswith("classifier") or name == "dropout")}
    if field is None:
        assert not {"classifier_dropout", "seq_classif_dropout"} & set(config) and not dropouts
    else:
        assert config[field] == 0.3
        assert dropouts == {0.3}
    assert load_classifier(out)[0].head_cfg.dropout == 0.3


def _saved_hf(tmp_path, kind: str, name: str, **config):
    """A tiny random transformers ``{kind}ForSequenceClassification`` (or base ``{kind}Model``) with ``config``,
    saved by its save_pretrained (no oztune record) with a tokenizer; (dir, the HF head's dropout p or None)."""
    import transformers as T

    from conftest import write_tiny_tokenizer

    sizes = (dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37) if kind == "DistilBert" else
             dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
    cfg = getattr(T, f"{kind}Config")(vocab_size=64, max_position_embeddings=64, **sizes, **config)
    torch.manual_seed(0)
    hf = getattr(T, f"{kind}{name}")(cfg)
    d = tmp_path / f"{kind}-{name}-{len(list(tmp_path.iterdir()))}"
    hf.save_pretrained(d)
    write_tiny_tokenizer(d, 64)
    head = getattr(hf, "dropout", None)  # (a base model has none)
    return d, (head.p if head is not None else None)


@pytest.mark.parametrize("kind, config, p", [
    ("Bert", {"classifier_dropout": 0.3}, 0.3),
    ("Bert", {"classifier_dropout": None, "hidden_dropout_prob": 0.2}, 0.2),  # null: hidden_dropout_prob's
    ("DistilBert", {"seq_classif_dropout": 0.25}, 0.25),
    ("DistilBert", {}, 0.2),  # (DistilBertConfig's default)
])
def test_head_dropout_is_read_from_a_transformers_checkpoint(tmp_path, kind, config, p):
    """A checkpoint saved by transformers (no oztune record) got oztune's head dropout 0.1 whatever its
    config.json said (classifier_dropout 0.3, DistilBERT's seq_classif_dropout): fine-tuning it in oztune
    differed from fine-tuning it in transformers. Its head now drops what transformers' does; a dropout the
    caller gives (finetune --head-dropout) still wins, on a trained head and on a new one."""
    from oztune.models.hub import new_head_

    d, hf_p = _saved_hf(tmp_path, kind, "ForSequenceClassification", **config)
    assert hf_p == p  # (what transformers builds from it)
    model, _, meta = load_classifier(d)
    assert meta["trained"] and model.head_cfg.dropout == p and model.head.dropout.p == p
    assert load_classifier(d, head={"dropout": 0.05})[0].head.dropout.p == 0.05
    new_head_(model, 4, "single_label")  # (finetune on other labels: a new head, the checkpoint's dropout)
    assert model.head.dropout.p == p
    new_head_(model, 4, "single_label", {"dropout": 0.05})
    assert model.head.dropout.p == 0.05
    base, _ = _saved_hf(tmp_path, kind, "Model", **config)  # no head: a new one, as transformers would make it
    model, _, meta = load_classifier(base, num_labels=3)
    assert not meta["trained"] and model.head.dropout.p == p
    assert load_classifier(base, num_labels=3, head={"dropout": 0.0})[0].head.dropout.p == 0.0


def test_a_head_dropout_transformers_could_not_use_is_refused_by_name(tmp_path):
    d, _ = _saved_hf(tmp_path, "Bert", "ForSequenceClassification", classifier_dropout=0.3)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "classifier_dropout": "high"}))
    with pytest.raises(ModelError, match=r"config\.json: classifier_dropout 'high' is not a dropout probability"):
        load_classifier(d)


@pytest.mark.parametrize("id2label", [{0: "a", 1: "b"}, {0: "a", 1: "b", 2: "c", 3: "d"}, {1: "a", 2: "b", 3: "c"},
                                      {"0": "a", "1": "b", "2": "c"}])
def test_label_names_that_are_not_one_per_output_are_refused_by_save_and_classifier(tiny_base, tmp_path, id2label):
    from oztune.api import Classifier

    model, enc, _ = load_classifier(tiny_base, num_labels=3)
    with pytest.raises(ValueError, match=rf"id2label has {len(id2label)} name\(s\).* head has 3 output\(s\)"):
        save_classifier(model, enc, tmp_path / "m", id2label)
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match=rf"id2label has {len(id2label)} name\(s\).* head has 3 output\(s\)"):
        Classifier(model, enc, id2label)


def test_a_regression_head_takes_one_name_and_a_base_model_none(tiny_base, tmp_path):
    from oztune.api import Classifier

    model, enc, _ = load_classifier(tiny_base, num_labels=1, problem_type="regression")
    save_classifier(model, enc, tmp_path / "r", {0: "value"})
    assert Classifier(model, enc, {0: "value"}).predict("a text")[0]["label"] is None
    with pytest.raises(ValueError, match="id2label has 2 name"):
        save_classifier(model, enc, tmp_path / "r2", {0: "value", 1: "other"})
    base, enc, meta = load_classifier(tiny_base)  # no trained head: saved without names, as before
    assert meta["id2label"] == {}
    save_classifier(base, enc, tmp_path / "base", meta["id2label"])
