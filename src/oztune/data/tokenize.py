"""Text -> ``input_ids``, ``attention_mask`` (and ``token_type_ids``) with the `tokenizers` library.

The checkpoint's ``tokenizer.json`` is used as it is; a BERT-style ``vocab.txt`` or a GPT-2 style
``vocab.json`` + ``merges.txt`` is turned into one. Texts are encoded once without padding; batches are
padded to their own longest sequence by :func:`pad_batch` (dynamic padding). A text's surrounding whitespace
is dropped before encoding, as the file readers drop it, so the API, ``predict`` and the server encode a
text as training did.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from oztune.errors import ModelError, OztuneError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt")


class TextEncoder:
    """Wraps a `tokenizers.Tokenizer`: truncation on, padding off; remembers where it came from.

    Args:
        tokenizer: the fast tokenizer.
        pad_id: id used to pad batches.
        max_length: longest encoding, special tokens included.
        source: directory it was loaded from (its files are copied on save).
    """

    def __init__(self, tokenizer: Tokenizer, pad_id: int, max_length: int, source: Path | None = None):
        self.tokenizer, self.pad_id, self.source = tokenizer, pad_id, source
        tokenizer.no_padding()
        self.set_max_length(max_length)

    def special_tokens(self, pair: bool = False) -> int:
        """How many special tokens the tokenizer adds around one text (or a pair)."""
        post = self.tokenizer.post_processor
        return post.num_special_tokens_to_add(pair) if post is not None else 0

    def set_max_length(self, max_length: int) -> None:
        least = self.special_tokens() + 1
        if max_length < least:  # below it, tokenizers silently stops truncating at all
            raise OztuneError(f"max length {max_length} is too short: this tokenizer adds {least - 1} special "
                              f"token(s) to each text, so the least is {least}")
        self.max_length = max_length
        self.tokenizer.enable_truncation(max_length, strategy="longest_first")

    @classmethod
    def from_dir(cls, path: str | Path, max_length: int, pad_token_id: int | None = None) -> "TextEncoder":
        """Load the tokenizer of a Hugging Face-format model directory."""
        path = Path(path)
        try:
            tok = _load_tokenizer(path)
        except ModelError:
            raise
        except Exception as e:  # tokenizers raises plain Exceptions for a corrupt file
            raise ModelError(f"{path}: its tokenizer files cannot be read ({str(e).splitlines()[0] if str(e) else e!r})") from None
        pad_id = _find_pad_id(tok, path, pad_token_id)
        return cls(tok, pad_id, max_length, source=path)

    def id_count(self) -> int:
        """How many token ids the tokenizer may produce (one past the largest), added tokens included."""
        added = max(self.tokenizer.get_added_tokens_decoder(), default=-1) + 1  # (get_vocab: 40 ms, this: µs)
        return max(self.tokenizer.get_vocab_size(with_added_tokens=True), added)

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> list[tuple[list[int], list[int]]]:
        """Encode texts (and optional second texts) to (ids, type_ids), truncated, unpadded.

        A text that encodes to no token at all (an empty text, where the tokenizer adds no special tokens,
        as GPT-2's does not) is one pad token, attended to: a model needs a position to read, and a batch of
        such texts would have no length. Surrounding whitespace is dropped, as the file readers drop it (for a
        byte-level BPE tokenizer " good" and "good" are other tokens): every path encodes a text alike.
        """
        texts = [t.strip() if isinstance(t, str) else t for t in texts]
        if pairs is not None:
            pairs = [t.strip() if isinstance(t, str) else t for t in pairs]
        inputs = list(zip(texts, pairs)) if pairs is not None else texts
        if pairs is not None and self.max_length < self.special_tokens(pair=True) + 2:
            raise OztuneError(f"max length {self.max_length} is too short for text pairs: this tokenizer adds "
                              f"{self.special_tokens(pair=True)} special tokens to a pair, and each text needs one "
                              f"token, so the least is {self.special_tokens(pair=True) + 2}")
        try:
            if pairs is not None and any(min(len(a), len(b)) > self.max_length for a, b in inputs
                                         if isinstance(a, str) and isinstance(b, str)):
                return self._encode_long_pairs(inputs)
            encoded = self.tokenizer.encode_batch(inputs)
        except Exception:  # tokenizers' own message names no text: say which one is not a string
            for name, seq in (("text", texts), ("text pair", pairs or [])):
                bad = next((i for i, t in enumerate(seq) if not isinstance(t, str)), None)
                if bad is not None:
                    raise TypeError(f"{name} {bad} is {seq[bad]!r} ({type(seq[bad]).__name__}): "
                                    "expected a string") from None
            raise
        return [(e.ids, e.type_ids) if e.ids else ([self.pad_id], [0]) for e in encoded]

    def _encode_long_pairs(self, inputs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """Pairs encoded as tokenizers would ("longest_first"), without its overflow: where both texts are
        longer than max_length, tokenizers cuts each into max_length-sized pieces and combines every piece
        of one with every piece of the other (memory quadratic in the texts' length: two 10,000-word texts
        took more than 20 GB). Here each text is encoded alone, cut, and the post-processor's template put
        around the two."""
        plain, layout = self._untruncated
        budget = self.max_length - self.special_tokens(pair=True)
        out = []
        for a, b in inputs:
            ea, eb = plain.encode(a, add_special_tokens=False), plain.encode(b, add_special_tokens=False)
            if not ea.ids or not eb.ids or len(ea.ids) + len(eb.ids) <= budget:
                e = self.tokenizer.encode(a, b)  # short enough: no overflow to fear
                out.append((e.ids, e.type_ids) if e.ids else ([self.pad_id], [0]))
                continue
            n1, n2 = _longest_first(len(ea.ids), len(eb.ids), budget)
            ids, types = [], []
            for kind, value, type_id in layout:
                part = [value] if kind == "special" else (ea.ids[:n1] if value == 0 else eb.ids[:n2])
                ids += part
                types += [type_id] * len(part)
            out.append((ids, types))
        return out

    @functools.cached_property
    def _untruncated(self) -> tuple[Tokenizer, list[tuple[str, int, int]]]:
        """A copy of the tokenizer without truncation or padding, and its pair layout (:meth:`_pair_template`);
        made once (only truncation changes on the original, through :meth:`set_max_length`)."""
        plain = Tokenizer.from_str(self.tokenizer.to_str())
        plain.no_truncation()
        plain.no_padding()
        return plain, self._pair_template(plain)

    def _pair_template(self, plain: Tokenizer) -> list[tuple[str, int, int]]:
        """The post-processor's layout of a pair: ("special", id, type_id) and ("text", 0 or 1, type_id)."""
        probe = next(e for e in (plain.encode(t, add_special_tokens=False) for t in ("a", "x", "0", ".", "[UNK]", "<unk>"))
                     if len(e.ids) == 1)
        pe = plain.post_process(probe, probe, add_special_tokens=True)
        layout: list[tuple[str, int, int]] = []
        texts = 0
        for i, special in enumerate(pe.special_tokens_mask):  # the probe is one token: one per text
            layout.append(("special", pe.ids[i], pe.type_ids[i]) if special else ("text", texts, pe.type_ids[i]))
            texts += not special
        if texts != 2:
            raise OztuneError("this tokenizer's post-processor does not put both texts of a pair in its output")
        return layout

    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Encode and pad one batch: ``input_ids``, ``attention_mask``, ``token_type_ids`` (B, T)."""
        return pad_batch(self.encode(texts, pairs), self.pad_id)

    def save(self, out: Path) -> None:
        """Write the tokenizer files into ``out``: copies of the source's, and this tokenizer as tokenizer.json
        (truncation at :attr:`max_length`, no padding, whatever the source's file said). tokenizer_config.json's
        ``model_max_length`` is :attr:`max_length` (made if absent; its other keys as the source's): the length
        the model was fine-tuned and predicts at, where transformers' ``truncation=True`` cuts a text (the
        source's, 512 for MiniLM, gave other scores than oztune's for a longer text)."""
        if self.source is not None:
            for name in TOKENIZER_FILES:
                if name != "tokenizer.json" and (self.source / name).is_file() and not (out / name).exists():
                    shutil.copyfile(self.source / name, out / name)
        self.tokenizer.save(str(out / "tokenizer.json"))
        f = out / "tokenizer_config.json"
        try:
            cfg = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        except ValueError:  # (not JSON: left as the source's, which transformers refuses anyway)
            return
        if isinstance(cfg, dict):
            cfg["model_max_length"] = self.max_length
            f.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def pad_batch(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (ids, type_ids) to the longest one: tensors (B, T)."""
    B, T = len(encoded), max(len(ids) for ids, _ in encoded)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    types = np.zeros((B, T), dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for i, (ids, tt) in enumerate(encoded):
        n = len(ids)
        input_ids[i, :n], types[i, :n], mask[i, :n] = ids, tt, 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
            "token_type_ids": torch.from_numpy(types)}


def _longest_first(n1: int, n2: int, budget: int) -> tuple[int, int]:
    """Lengths the two texts of a pair keep under tokenizers' "longest_first" truncation (its algorithm:
    the shorter text is kept whole if it can be, else each keeps half, the longer one the odd token)."""
    swap = n1 > n2
    if swap:
        n1, n2 = n2, n1
    n2 = n1 if n1 > budget else max(n1, budget - n1)
    if n1 + n2 > budget:
        n1 = budget // 2
        n2 = n1 + budget % 2
    return (n2, n1) if swap else (n1, n2)


def _load_tokenizer(path: Path) -> Tokenizer:
    """The checkpoint's tokenizer: tokenizer.json, else a WordPiece vocab.txt (BERT), else a byte-level BPE
    vocab.json + merges.txt (GPT-2's; or RoBERTa's, whose <s> and </s> go around each text)."""
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    if (path / "vocab.txt").is_file():
        from tokenizers.implementations import BertWordPieceTokenizer

        cfg = _tokenizer_config(path)
        return BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=cfg.get("do_lower_case", True),
                                      strip_accents=cfg.get("strip_accents"))._tokenizer
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        from tokenizers.implementations import ByteLevelBPETokenizer

        prefix = _tokenizer_config(path).get("add_prefix_space") is True  # as transformers reads it (default off)
        tok = ByteLevelBPETokenizer(str(path / "vocab.json"), str(path / "merges.txt"), add_prefix_space=prefix)._tokenizer
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        if bos is not None and eos is not None and _model_type(path) != "gpt2":  # RoBERTa's vocabulary
            from tokenizers.processors import RobertaProcessing

            tok.post_processor = RobertaProcessing(("</s>", eos), ("<s>", bos), add_prefix_space=prefix)
        return tok
    raise ModelError(f"{path}: no tokenizer (expected tokenizer.json, vocab.txt, or vocab.json + merges.txt)")


def _model_type(path: Path) -> str | None:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def _tokenizer_config(path: Path) -> dict:
    f = path / "tokenizer_config.json"
    try:
        cfg = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except (ValueError, OSError) as e:
        raise ModelError(f"{f}: not valid JSON ({e})") from None
    return cfg if isinstance(cfg, dict) else {}


def _find_pad_id(tok: Tokenizer, path: Path, pad_token_id: int | None) -> int:
    """The model's pad id if it has one, else the tokenizer's pad token, else 0."""
    if pad_token_id is not None:
        return pad_token_id
    for name in ("[PAD]", "<pad>", "<|endoftext|>"):
        if tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    return 0
