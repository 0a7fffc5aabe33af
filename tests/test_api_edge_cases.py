"""The public Python API as a library user calls it (an audit): each test failed on the code before its fix.

Each test names what goes wrong in its docstring.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import synthetic_sentiment, tiny_hf_model, write_tiny_tokenizer
from oztune import Classifier, HeadConfig, OztuneError
from oztune.compress import DistillConfig, PruneConfig, QuantConfig, TrainConfig, distill, prune_, quantize_
from oztune.data.dataset import encode_data
from oztune.models.hub import load_classifier
from oztune.train.loop import fit

TEXTS = ["good movie and the plot", "bad", "the film was very dull and awful"]
USER_ERRORS = (ValueError, TypeError, OztuneError)  # what a clear refusal may be (not ZeroDivisionError, IndexError ...)


@pytest.fixture(scope="module")
def clf_dir(one_thread, tmp_path_factory):
    """A tiny random HF BertForSequenceClassification (3 labels) with a tokenizer."""
    d = tmp_path_factory.mktemp("audit-s10") / "clf"
    tiny_hf_model("bert", num_labels=3).save_pretrained(d)
    write_tiny_tokenizer(d, 64)
    return d


@pytest.fixture
def clf(clf_dir):
    return Classifier.from_pretrained(clf_dir)


@pytest.fixture
def train_data(clf):
    rows = synthetic_sentiment(24, seed=3)
    return encode_data(clf.encoder, [t for t, _ in rows], None, [int(lab == "pos") for _, lab in rows])


# --- Classifier.logits / predict ------------------------------------------------------------------------------

def test_logits_of_a_lone_string_is_one_row(clf):
    """predict("text") is one example, but logits("text") returns one row per character (10 rows here)."""
    assert clf.logits("good movie").shape == (1, 3)


def test_logits_refuses_text_pairs_of_another_length(clf):
    """predict() refuses 2 texts with 1 pair; logits() silently zips them and returns 1 row for 2 texts."""
    with pytest.raises(ValueError, match="text_pairs"):
        clf.logits(["good movie", "bad film"], ["the plot"])


def test_logits_of_no_texts_has_one_column_per_label(clf):
    """The docstring promises (N, num_labels); no texts gives shape (0, 0), not (0, 3)."""
    assert clf.logits([]).shape == (0, 3)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_a_batch_size_below_one_is_refused_by_name(clf_dir, batch_size):
    """batch_size=-1: predict() silently returns [] for 3 texts; batch_size=0: 'range() arg 3 must not be zero'."""
    with pytest.raises(USER_ERRORS, match="batch"):
        Classifier.from_pretrained(clf_dir, batch_size=batch_size).predict(TEXTS)


def test_a_text_that_is_not_a_string_gets_a_clear_error(clf):
    """predict(["good", None]) raises tokenizers' 'TextEncodeInput must be Union[TextInputSequence, ...]'."""
    with pytest.raises(USER_ERRORS, match=r"None|str"):
        clf.predict(["good movie", None])


@pytest.mark.parametrize("method", ["predict", "logits"])
@pytest.mark.parametrize("texts, pairs, message", [
    ([""], None, "text 0 is empty"),
    (["good movie", " \t\n"], None, "text 1 is empty"),
    ("   ", None, "text 0 is empty"),
    (["good movie", "bad film"], ["the plot", ""], "text pair 1 is empty"),
])
def test_an_empty_text_is_refused_as_the_command_line_and_the_server_refuse_it(clf, method, texts, pairs, message):
    """predict([""]) and predict(["   "]) returned a prediction; the CLI, the data files and the server refuse an
    empty (or whitespace-only) text, and the README says texts are handled alike everywhere."""
    with pytest.raises(ValueError, match=message):
        getattr(clf, method)(texts, pairs)


@pytest.mark.parametrize("max_length", [0, -3])
def test_a_max_length_below_one_is_refused(clf_dir, max_length):
    """max_length=0 is silently ignored (the model's window is used); -3 raises OverflowError from tokenizers."""
    with pytest.raises(USER_ERRORS, match="max_length"):
        Classifier.from_pretrained(clf_dir, max_length=max_length)


def test_a_max_length_beyond_the_window_is_refused_naming_the_model(clf_dir):
    """max_length=65 on a model of 64 positions was cut to 64 without a word (finetune refused it, every other
    loader took it): the one rule of load_classifier, so the API, serve, quantize, prune, distill and compress
    say it alike. Up to the window is taken."""
    with pytest.raises(OztuneError, match=f"{clf_dir}: the model reads at most 64 tokens .* not the max length 65"):
        Classifier.from_pretrained(clf_dir, max_length=65)
    assert Classifier.from_pretrained(clf_dir, max_length=64).encoder.max_length == 64


# --- new heads: load_classifier / HeadConfig ------------------------------------------------------------------

def test_head_config_refuses_an_unknown_problem_type():
    """HeadConfig checks pooling and activation but takes problem_type="multilabel" (a typo of multi_label):
    SequenceClassifier.loss then silently trains it with MSE and scores() returns raw values."""
    with pytest.raises(ValueError, match="problem_type"):
        HeadConfig(problem_type="multilabel")


def test_load_classifier_refuses_an_unknown_problem_type_for_a_new_head(tiny_base):
    """load_classifier(base, problem_type="multilabel") builds the model; save_classifier later dies with
    KeyError: 'multilabel' (after the training run)."""
    with pytest.raises(USER_ERRORS, match="problem"):
        load_classifier(tiny_base, num_labels=3, problem_type="multilabel")


@pytest.mark.parametrize("num_labels", [0, -1])
def test_load_classifier_refuses_a_new_head_without_outputs(tiny_base, num_labels):
    """num_labels=0 silently becomes 2 outputs; -1 raises torch's 'negative dimension' RuntimeError."""
    with pytest.raises(USER_ERRORS, match="num_labels|label"):
        load_classifier(tiny_base, num_labels=num_labels)


# --- TrainConfig / fit ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(batch_size=0), dict(batch_size=-4), dict(grad_accum=0)])
def test_fit_refuses_batch_settings_below_one(clf, train_data, kw):
    """batch_size=0 and grad_accum=0 raise ZeroDivisionError; batch_size=-4 returns at once having trained nothing."""
    with pytest.raises(USER_ERRORS, match="batch|accum"):
        fit(clf.model, train_data, TrainConfig(epochs=1, progress=False, precision="fp32", **kw))


def test_fit_refuses_an_unknown_precision(clf, train_data):
    """The CLI refuses --precision fp16; TrainConfig(precision="fp16") (or "float32") silently trains in bf16."""
    with pytest.raises(USER_ERRORS, match="precision"):
        fit(clf.model, train_data, TrainConfig(epochs=1, batch_size=8, progress=False, precision="fp16"))


def test_an_interrupted_fit_leaves_the_embeddings_as_they_were(clf, train_data):
    """fit(freeze_embeddings=True) interrupted (Ctrl-C, an error) leaves the word embeddings frozen: the next
    fit(freeze_embeddings=False) then silently never trains them."""
    word = clf.model.backbone.embed.word.weight
    assert word.requires_grad

    def interrupt(step, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(clf.model, train_data, TrainConfig(epochs=1, batch_size=8, progress=False, precision="fp32",
                                               freeze_embeddings=True), on_step=interrupt)
    assert word.requires_grad


# --- compression on the wrong kind of model -------------------------------------------------------------------

@pytest.mark.parametrize("config", [PruneConfig(heads=0.3), PruneConfig(sparsity=0.5)], ids=["structured", "sparsity"])
def test_prune_of_an_int8_model_says_so(clf, train_data, config):
    """oztune prune refuses an int8 model by name; prune_ raises 'addcmul(): functions with out=... arguments
    don't support automatic differentiation' (structured) or 'torch.cat(): expected a non-empty list' (sparsity)."""
    model = quantize_(copy.deepcopy(clf.model))
    with pytest.raises(OztuneError, match="int8"):
        prune_(model, config, train_data)


def test_distill_into_an_int8_student_says_so(clf, train_data):
    """distill(teacher, int8 student) raises the addcmul autograd RuntimeError instead of naming the int8 student."""
    student = quantize_(copy.deepcopy(clf.model))
    with pytest.raises(OztuneError, match="int8"):
        distill(clf.model, student, train_data, TrainConfig(epochs=1, batch_size=8, progress=False, precision="fp32"))


@pytest.mark.parametrize("layer_map", [[0, 7], [1]], ids=["out-of-range", "too-short"])
def test_distill_checks_the_layer_map(clf, train_data, layer_map):
    """DistillConfig.layer_map is never checked against the models: an index past the teacher's 2 layers is an
    IndexError inside the first training step, and a map shorter than the student's layers trains silently (zip drops the unmatched layers, yet the loss still divides by every layer)."""
    student = copy.deepcopy(clf.model)
    with pytest.raises((ValueError, OztuneError), match="layer"):
        distill(clf.model, student, train_data, TrainConfig(epochs=1, batch_size=8, progress=False, precision="fp32"),
                DistillConfig(hidden_weight=1.0, layer_map=layer_map))


def test_quant_config_skip_given_one_string(clf):
    """QuantConfig(skip="head.*") splits the string into characters, skip=['h', 'e', 'a', 'd', '.', '*'];
    quantize_ then says "skip pattern 'h' matches no module"."""
    try:
        cfg = QuantConfig(skip="head.*")
    except (TypeError, ValueError, OztuneError) as e:
        assert "'h'" not in str(e)
        return
    assert cfg.skip == ["head.*"]
    quantize_(clf.model, cfg)
    assert type(clf.model.head.out) is torch.nn.Linear


def test_load_classifier_refuses_unknown_head_settings(tiny_base):
    with pytest.raises(ValueError, match="unknown setting"):
        load_classifier(tiny_base, num_labels=2, head={"pooling": "mean", "dropuot": 0.2})


@pytest.mark.parametrize("given, kind", [(None, "NoneType"), (b"good", "bytes"), ({"good": 1}, "dict"), (3, "int")])
def test_texts_that_are_not_a_string_or_a_list_of_them_are_named(clf, given, kind):
    # None was "'NoneType' object is not iterable", bytes "text 0 is 103 (int)", a dict predicted its keys
    for call in (clf.predict, clf.logits):
        with pytest.raises(TypeError, match=f"^texts: expected a string or a list of strings, got {kind}$"):
            call(given)
    if given is not None:  # (text_pairs=None: no pairs)
        with pytest.raises(TypeError, match=f"^text_pairs: expected a string or a list of strings, got {kind}$"):
            clf.predict(["a"], text_pairs=given)


@pytest.mark.parametrize("text_pairs", [None, False, True])
@pytest.mark.parametrize("method", ["predict", "logits"])
def test_a_tuple_element_is_not_taken_as_a_text_pair(clf, method, text_pairs):
    """predict([("good movie", "the plot")]) reached the tokenizer as a text pair, past the check of the model's
    kind of texts (a single-text model scored it; a pair model said "single texts, give text_pairs"), the check
    of empty texts and the guard against the tokenizer's overflow of long pairs."""
    c = Classifier(clf.model, clf.encoder, clf.id2label, text_pairs=text_pairs)
    call = getattr(c, method)
    for given in ([("good movie", "the plot")], [["good movie", "the plot"]], ["bad", ("good movie", "")]):
        i, kind = len(given) - 1, type(given[-1]).__name__
        with pytest.raises(TypeError, match=rf"^text {i} is a {kind}, .*predict\(texts, text_pairs\)"):
            call(given)
    with pytest.raises(TypeError, match=r"^text pair 1 is a tuple, .*predict\(texts, text_pairs\)"):
        call(["good movie", "bad"], ["the plot", ("a", "b")])
    with pytest.raises(TypeError, match=r"^text 1 is 3 \(int\): expected a string$"):
        call(["good movie", 3], ["the plot", "a"] if text_pairs else None)
