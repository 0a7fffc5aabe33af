"""ONNX export: fp32 parity with oztune on every family, pruned and quantized models; int8 agreement; CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from servehelp import random_texts, save_tiny, tiny_classifier

from oztune import Classifier
from oztune.cli import main
from oztune.compress.quantize import QuantConfig, quantization_record, quantize_
from oztune.errors import ModelError
from oztune.serve.backends import OnnxClassifier
from oztune.serve.export import export_onnx

LONG = "the movie was not very good " * 40  # longer than the 62-token window: truncated


def max_logit_diff(model_dir, export_dir, texts, pairs=None) -> float:
    ref = Classifier.from_pretrained(model_dir).logits(texts, pairs)
    return float(np.abs(OnnxClassifier(export_dir).logits(texts, pairs) - ref).max())


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2"])
def test_fp32_logits_match_oztune_for_every_family(family, tiny_hf_dir, tmp_path):
    model_dir, _ = tiny_hf_dir(family)
    out = export_onnx(model_dir, tmp_path / "onnx")
    assert {"model.onnx", "tokenizer.json", "config.json"} <= {p.name for p in out.iterdir()}
    texts = random_texts(40) + [LONG, "a"]
    assert max_logit_diff(model_dir, out, texts) < 1e-4
    if family == "bert":  # token types of the second text
        assert max_logit_diff(model_dir, out, texts, list(reversed(texts))) < 1e-4


def test_fp32_parity_on_a_pruned_model_with_uneven_layers(tmp_path):
    model = tiny_classifier(layer_heads=[3, 0], layer_ffn=[11, 0])  # layer 1 lost every head and its FFN
    model_dir = save_tiny(model, tmp_path / "pruned")
    assert json.loads((model_dir / "config.json").read_text())["oztune"]["format"] == "native"
    out = export_onnx(model_dir, tmp_path / "onnx")
    assert max_logit_diff(model_dir, out, random_texts(40) + [LONG]) < 1e-4


def test_unstructured_pruned_model_exports_fp32_and_int8(tmp_path):
    """Sparse layers (saved as bitmask + values) export as the dense Linear they compute: same logits."""
    from oztune.compress.sparse import magnitude_prune_, to_sparse_

    model = tiny_classifier()
    magnitude_prune_(model, 0.6)
    assert to_sparse_(model)
    model_dir = save_tiny(model, tmp_path / "sparse")
    out = export_onnx(model_dir, tmp_path / "onnx")
    assert max_logit_diff(model_dir, out, random_texts(40) + [LONG]) < 1e-4
    assert int8_initializers(export_onnx(model_dir, tmp_path / "onnx8", int8=True)) > 0


@pytest.mark.parametrize("window", [3, 5])
def test_a_model_whose_window_is_shorter_than_the_example_batch_exports(window, tmp_path):
    """The traced example batch fits the position window (it was 8 tokens long: an IndexError)."""
    model_dir = save_tiny(tiny_classifier(max_positions=window), tmp_path / "short")
    out = export_onnx(model_dir, tmp_path / "onnx")
    assert max_logit_diff(model_dir, out, random_texts(40) + [LONG, "a"]) < 1e-4  # truncated to the window


def test_a_model_whose_window_holds_one_token_is_refused_by_name(tmp_path):
    """One token leaves no room for the padded example batch the export traces: a ModelError names the model and
    its window (a tokenizer adding no special tokens can load it)."""
    from oztune.serve.export import export_aoti

    model_dir = save_tiny(tiny_classifier(max_positions=1), tmp_path / "one")
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    (model_dir / "tokenizer.json").write_text(json.dumps({**tokenizer, "post_processor": None}))
    for export in (export_onnx, export_aoti):
        with pytest.raises(ModelError, match=f"{model_dir}: its position window holds 1 token.*at least 2"):
            export(model_dir, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_evaluate_and_predict_run_an_onnx_export_like_the_model(tmp_path, capsys):
    """``oztune evaluate`` and ``predict`` take an export directory: onnxruntime runs it, same answers."""
    model_dir = save_tiny(tiny_classifier(), tmp_path / "model")
    out = export_onnx(model_dir, tmp_path / "onnx")
    texts = random_texts(30)
    labels = [p["label"] for p in Classifier.from_pretrained(model_dir).predict(texts)]
    labels[:5] = [{"neg": "pos", "neutral": "neg", "pos": "neutral"}[x] for x in labels[:5]]  # 5 wrong
    data = tmp_path / "data.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    results = []
    for d in (model_dir, out):
        assert main(["evaluate", "--model", str(d), "--data", str(data), "--json", "--per-label"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["accuracy"] == results[1]["accuracy"] == 25 / 30
    assert results[0]["confusion_matrix"] == results[1]["confusion_matrix"]
    assert results[0]["log_loss"] == pytest.approx(results[1]["log_loss"], rel=1e-4)  # the same scores' calibration
    assert results[0]["ece"] == pytest.approx(results[1]["ece"], abs=1e-4)
    assert main(["predict", "--model", str(out), *texts[:3], "--all-scores"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ref = Classifier.from_pretrained(model_dir).predict(texts[:3], all_scores=True)
    assert [r["label"] for r in rows] == [r["label"] for r in ref]
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in ref], abs=1e-5)


def int8_initializers(export_dir) -> int:
    """The 8-bit weight tables of an export: int8 embeddings, and the Linear weights, written as uint8 + 128."""
    graph = onnx.load(str(export_dir / "model.onnx")).graph
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return sum(t.data_type in eight_bit and len(t.dims) == 2 for t in graph.initializer)


@pytest.mark.parametrize("floor", [False, True], ids=["symmetric", "from_floor"])
def test_the_int8_linear_exports_exact_at_the_largest_codes(tmp_path, floor):
    """Codes of 127 (uint8 255) against weights of +-127: onnxruntime's u8 x s8 kernel sums pairs of such products
    in int16 on CPUs without VNNI and saturates (255 * 127 * 64 came out as 1,048,544, not 2,072,640, on an AVX2
    EPYC); the export's u8 x u8 product is exact on every CPU. Every MatMulInteger takes uint8 weights."""
    import onnxruntime as ort
    import torch

    from oztune.compress.quantize import Int8Linear
    from oztune.serve.export import OnnxInt8Linear

    linear = torch.nn.Linear(64, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([torch.ones(64), -torch.ones(64)]))
        linear.bias.zero_()
    layer = OnnxInt8Linear(Int8Linear.from_linear(linear))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer  # (its weights become the graph's initializers, as in an export)

        def forward(self, x):
            return self.layer(x, x.amax(-1, keepdim=True), -0.17) if floor else self.layer(x)

    x = torch.ones(300, 64)  # every code the largest: 127 (symmetric), 255 (from the floor -0.17)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation warnings, as export_onnx hides them
        torch.onnx.export(Net(), (x,), str(tmp_path / "m.onnx"), input_names=["x"], dynamic_axes={"x": {0: "n"}},
                          opset_version=17, dynamo=False)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    weights = {t.name: t.data_type for t in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert matmuls and all(weights[n.input[1]] == onnx.TensorProto.UINT8 for n in matmuls)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, np.tile([64.0, -64.0], (300, 1)), rtol=1e-5)


@pytest.mark.parametrize("opset", [17, 20])  # ReduceMax's axes: an attribute up to 17, an input from 18
def test_int8_export_computes_like_oztunes_int8_model(tmp_path, opset):
    model_dir = save_tiny(tiny_classifier(), tmp_path / "model")
    out = export_onnx(model_dir, tmp_path / "int8", int8=True, opset=opset)
    assert json.loads((out / "config.json").read_text())["oztune"]["onnx"]["int8"] is True
    # qkv, o, up, down in 2 layers + the output layer + the token and position embedding tables
    assert int8_initializers(out) == 2 * 4 + 1 + 2
    model = Classifier.from_pretrained(model_dir)
    texts = random_texts(400, seed=1) + [LONG]
    fp32 = model.logits(texts)
    quantize_(model.model, QuantConfig())
    ref = model.logits(texts)
    got = OnnxClassifier(out).logits(texts)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    # much closer to oztune's int8 model than either is to the float one
    assert np.abs(got - ref).mean() < 0.05 * np.abs(fp32 - ref).mean()


def test_quantized_pruned_model_exports_with_matching_labels(tmp_path):
    model = quantize_(tiny_classifier(layer_heads=[3, 0], layer_ffn=[11, 0]), QuantConfig(skip=["head.*"]))
    record = quantization_record(QuantConfig(skip=["head.*"]))
    model_dir = save_tiny(model, tmp_path / "q", quantization=record)
    clf = Classifier.from_pretrained(model_dir)
    out = export_onnx(model_dir, tmp_path / "onnx")  # int8 without asking: the model is
    assert json.loads((out / "config.json").read_text())["oztune"]["onnx"]["quantization"] == record
    # layer 0's qkv, o, up, down (layer 1 is pruned away, the head skipped) + 2 embedding tables
    assert int8_initializers(out) == 4 + 2
    texts = random_texts(400, seed=2)
    got, ref = OnnxClassifier(out).logits(texts), clf.logits(texts)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99


def test_a_quantized_model_exports_its_own_int8_scheme_with_or_without_int8(tmp_path):
    """int8=True on a model quantized already leaves it as it is (the head it skipped stays float), and the
    config says int8 either way."""
    model = quantize_(tiny_classifier(), QuantConfig(skip=["head.*"]))
    record = quantization_record(QuantConfig(skip=["head.*"]))
    model_dir = save_tiny(model, tmp_path / "q", quantization=record)
    for int8 in (False, True):
        out = export_onnx(model_dir, tmp_path / f"onnx-{int8}", int8=int8)
        onnx_info = json.loads((out / "config.json").read_text())["oztune"]["onnx"]
        assert onnx_info["int8"] is True and onnx_info["quantization"] == record
        assert int8_initializers(out) == 2 * 4 + 2  # qkv, o, up, down in 2 layers + 2 embedding tables; head float


def test_export_cli_and_its_errors(tmp_path, capsys):
    model_dir = save_tiny(tiny_classifier(), tmp_path / "model")
    out = tmp_path / "exported"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--int8"]) == 0
    size = (out / "model.onnx").stat().st_size / 1e3
    assert f"(int8, {size:.3g} kB)" in capsys.readouterr().out  # a tiny model's size (one decimal in MiB: 0.0)
    preds = OnnxClassifier(out).predict(["good movie", LONG])
    assert len(preds) == 2 and all(p["label"] in {"neg", "neutral", "pos"} and 1 / 3 <= p["score"] <= 1 for p in preds)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    for args, message in [(["--format", "tflite"], "expected onnx or aoti"),
                          (["--output", str(model_dir / "onnx")], "is inside the input"),
                          (["--model", str(out)], "already an ONNX export"),
                          (["--model", str(tmp_path / "missing")], "unknown model"),
                          (["--opset", "30"], "--opset 30: expected 17 to 20"), (["--opset", "16"], "17 to 20")]:
        argv = ["export", "--model", str(model_dir), "--output", str(tmp_path / "x"), *args]
        assert main(argv) == 2, args
        assert message in capsys.readouterr().err


def test_opset_help_says_it_is_for_onnx_only(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--opset OPSET ONNX opset version, for --format onnx only (17 to 20; not for --format aoti)" in text


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_config_names_the_inputs_the_graph_takes(family, tiny_hf_dir, tmp_path):
    """config.json's onnx.inputs is what a client feeds: RoBERTa's one token-type row ignores the ids, so its
    graph has no token_type_ids input (the config named one, and onnxruntime refuses an unknown input)."""
    import onnxruntime as ort

    out = export_onnx(tiny_hf_dir(family)[0], tmp_path / "onnx")
    graph_inputs = [i.name for i in ort.InferenceSession(str(out / "model.onnx")).get_inputs()]
    assert json.loads((out / "config.json").read_text())["oztune"]["onnx"]["inputs"] == graph_inputs


def test_loading_an_onnx_export_with_pytorch_says_what_it_is(tmp_path, capsys):
    """An export holds model.onnx and no PyTorch weights: Classifier.from_pretrained and the commands that
    load a model with PyTorch said only "no weights (expected model.safetensors or pytorch_model.bin)"."""
    from oztune.errors import ModelError

    out = export_onnx(save_tiny(tiny_classifier(), tmp_path / "model"), tmp_path / "onnx")
    with pytest.raises(ModelError, match="an ONNX export"):
        Classifier.from_pretrained(out)
    assert main(["quantize", "--model", str(out), "--output", str(tmp_path / "q")]) == 2
    assert "an ONNX export" in capsys.readouterr().err


def test_a_model_directory_with_a_stray_model_onnx_still_exports(tmp_path):
    """Another tool's model.onnx beside a model's weights does not make the directory an oztune export (as
    is_onnx_export has it): export refused it with "already an ONNX export; give the model directory"."""
    model_dir = save_tiny(tiny_classifier(), tmp_path / "model")
    (model_dir / "model.onnx").write_bytes(b"not oztune's")
    out = export_onnx(model_dir, tmp_path / "onnx")
    assert max_logit_diff(model_dir, out, random_texts(10)) < 1e-4


GPT2_LIKE = dict(family="gpt2", pre_norm=True, causal=True, type_vocab_size=0, activation="gelu_tanh")


@pytest.mark.parametrize("cfg,head", [({}, dict(pooling="mean", hidden_sizes=[16, 8])),
                                      ({}, dict(pooling="last", problem_type="regression", num_labels=1)),
                                      (GPT2_LIKE, dict(pooling="last", out_bias=False))])
def test_fp32_predictions_match_for_every_pooling_and_head_at_batch_sizes_64_and_1(cfg, head, tmp_path):
    """Pooling mean (with hidden head layers) and last (a regression's raw value; a causal decoder's last
    real token, also for left-padded rows fed to the graph directly) predict as the torch model does."""
    import onnxruntime as ort
    import torch

    from oztune.config import HeadConfig, ModelConfig
    from oztune.models.transformer import SequenceClassifier, init_weights

    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(**{**dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                                     intermediate_size=37, max_positions=64), **cfg}),
                               HeadConfig(**{"num_labels": 3, **head}))
    init_weights(model, std=0.2)
    model_dir = save_tiny(model.eval(), tmp_path / "model")
    out = export_onnx(model_dir, tmp_path / "onnx")
    clf, onnx_clf = Classifier.from_pretrained(model_dir), OnnxClassifier(out)
    texts = random_texts(20, seed=6) + [LONG, "a"]
    for batch_size in (64, 1):
        clf.batch_size = onnx_clf.batch_size = batch_size
        every = head.get("problem_type") != "regression"  # (a regression model has no labels' scores: refused)
        want, got = clf.predict(texts, all_scores=every), onnx_clf.predict(texts, all_scores=every)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-5)
    ids = torch.randint(4, 64, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4], mask[1, :8], mask[2, 6:] = 0, 0, 0  # left-padded (one with a single token), right-padded
    session = ort.InferenceSession(str(out / "model.onnx"))
    feeds = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    got = session.run(None, {i.name: feeds[i.name].numpy() for i in session.get_inputs()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(ids * mask, mask).numpy(), atol=1e-5)


def _edited(model_dir, onnx_file: bool, section: bool, fmt: str | None):
    """``model_dir`` as an export or not: a model.onnx, config.json's export section and its oztune.format."""
    config = json.loads((model_dir / "config.json").read_text())
    config["oztune"].pop("onnx", None)
    config["oztune"].update({"onnx": {"file": "model.onnx"}} if section else {})
    config["oztune"].update(format=fmt) if fmt else config["oztune"].pop("format", None)
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "model.onnx").unlink(missing_ok=True)
    if onnx_file:
        (model_dir / "model.onnx").write_bytes(b"an export's graph")
    return model_dir


@pytest.mark.parametrize("onnx_file,section,fmt", [
    (False, False, "onnx"),  # hub said "an ONNX export", serve's test "not one" (predict, serve: refused by hub)
    (True, True, None),      # serve's test said "an export", hub loaded the weights beside it
    (True, True, "onnx"),    # an export
    (True, False, "hf"),     # another tool's model.onnx beside the weights
])
def test_loading_and_serving_agree_on_what_an_onnx_export_is(onnx_file, section, fmt, tmp_path):
    """One test decides (hub's load_classifier read oztune.format, the serving side model.onnx and the export's
    section): PyTorch refuses exactly the directories the serving side runs as exports."""
    from oztune.models import hub
    from oztune.serve import export

    d = _edited(save_tiny(tiny_classifier(), tmp_path / "model"), onnx_file, section, fmt)
    try:
        hub.load_classifier(d)
        refused = False
    except ModelError as e:
        refused = "an ONNX export" in str(e)
    assert refused == export.is_onnx_export(d) == (onnx_file and section)
    assert export.is_onnx_export is hub.is_onnx_export and export.ONNX_FILE == hub.ONNX_FILE
