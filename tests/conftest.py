"""Shared fixtures: tiny random Hugging Face models and tokenizers made on the spot (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# A model name that is no directory is tried on the hub (oztune.models.hub.resolve_model): never reach the
# network from a test, fail at once instead.
os.environ["HF_HUB_OFFLINE"] = "1"

SHARED_SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "dull", "movie", "film", "plot", "the", "a", "is",
         "was", "not", "very", "and", "but", "it"]


def write_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json with BERT-style special tokens and ``vocab_size`` entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])}
    words = WORDS + [f"w{i}" for i in range(vocab_size)]
    for w in words:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path / "tokenizer.json"))


def tiny_hf_model(family: str, num_labels: int = 3, problem_type: str | None = None, seed: int = 0):
    """A tiny random HF ``*ForSequenceClassification`` of one family."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(num_labels=num_labels, vocab_size=64)
    if problem_type:
        common["problem_type"] = problem_type
    if family == "bert":
        cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                           max_position_embeddings=64, **common)
        return T.BertForSequenceClassification(cfg).eval()
    if family in ("roberta", "xlm-roberta", "camembert"):  # (the last two: RoBERTa under other names)
        kind = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert"}[family]
        cfg = getattr(T, f"{kind}Config")(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=37, max_position_embeddings=70, pad_token_id=1,
                                          type_vocab_size=1, **common)
        return getattr(T, f"{kind}ForSequenceClassification")(cfg).eval()
    if family == "distilbert":
        cfg = T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64, **common)
        return T.DistilBertForSequenceClassification(cfg).eval()
    if family == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, **common)
        return T.GPT2ForSequenceClassification(cfg).eval()
    raise ValueError(family)


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """Factory: save a tiny random HF model of ``family`` (with a tokenizer) and return (dir, hf_model)."""

    def make(family: str, **kw):
        model = tiny_hf_model(family, **kw)
        d = tmp_path / f"hf-{family}"
        model.save_pretrained(d)
        write_tiny_tokenizer(d, 64)
        return d, model

    return make


@pytest.fixture
def sst2_dir():
    if not (SHARED_SST2 / "dev.tsv").is_file():
        pytest.skip("SST-2 not found beside the repository")
    return SHARED_SST2


POSITIVE = ["good", "great", "fine", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull"]


def synthetic_sentiment(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Short sentences whose label ("pos"/"neg") is decided by one sentiment word among fillers."""
    import random

    rng = random.Random(seed)
    fill = ["the", "movie", "film", "plot", "is", "was", "very", "and", "it", "a"]
    out = []
    for _ in range(n):
        pos = rng.random() < 0.5
        words = [rng.choice(fill) for _ in range(rng.randint(2, 8))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if pos else NEGATIVE))
        out.append((" ".join(words), "pos" if pos else "neg"))
    return out


def write_tsv(path: Path, rows: list[tuple[str, str]], header=("sentence", "label")) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random pre-trained BERT (no task head) with a tokenizer: a stand-in for a hub model."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("tiny-base")
    T.BertModel(cfg).save_pretrained(d)
    write_tiny_tokenizer(d, 64)
    return d


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sentiment")
    return write_tsv(d / "train.tsv", synthetic_sentiment(400, 1)), write_tsv(d / "dev.tsv", synthetic_sentiment(100, 2))


class QuietMachine:
    """Stands in for :class:`oztune.runtime.Contention`: nobody else took the cores (0.05 of one)."""

    def __init__(self, threads: int):
        self.threads, self.others, self.busy = threads, 0.05, False

    def start(self):
        return self

    def stop(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """compress and compare add a "machine busy" note to their output when other processes took the cores while
    they timed (a second test run beside this one does): every test reads their output as on a quiet machine.
    Tests of that note patch ``Contention`` again themselves."""
    for module in ("oztune.compress.report", "oztune.compress.compare"):
        monkeypatch.setattr(f"{module}.Contention", QuietMachine)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run on one thread: on a busy machine two threads wait on each other at every op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_finetuned(one_thread, tiny_base, sentiment_files, tmp_path_factory) -> Path:
    """The tiny BERT fine-tuned on the synthetic sentiment task (labels neg, pos) and saved: a model to compress."""
    from oztune.data.load import Columns, encode_examples, read_labelled
    from oztune.models.hub import load_classifier, save_classifier
    from oztune.train.loop import TrainConfig, fit

    train, _ = sentiment_files
    torch.manual_seed(0)  # the new head's weights: the same model whichever tests ran before
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    data = encode_examples(read_labelled(str(train), Columns()), enc, {"neg": 0, "pos": 1}, "single_label", str(train))
    fit(model, data, TrainConfig(epochs=3, batch_size=16, lr=3e-3, progress=False, precision="fp32"))
    return save_classifier(model, enc, tmp_path_factory.mktemp("ft") / "m", {0: "neg", 1: "pos"})


def padded_batch(pad_id: int, lengths=(9, 4, 1, 7), low: int = 4, high: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(low, high, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def killed_while_writing(script: str) -> int:
    """Run the Python ``script`` in a process of its own until it prints "writing", kill it there (SIGKILL, so
    nothing of its own cleans up) and return its process id."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "writing\n"
    finally:
        p.kill()
        p.wait()
    return p.pid
