"""Vocabulary pruning: keep the token-embedding rows of the tokens seen in training.

The token table is half of MiniLM's weights; ids are remapped inside the model, so the tokenizer stays
as it is and a token never seen in training reads [UNK]'s row.
"""

from __future__ import annotations

import torch
from torch import nn

from oztune.data.dataset import EncodedData
from oztune.errors import OztuneError
from oztune.models.transformer import SequenceClassifier


class VocabEmbedding(nn.Module):
    """A token embedding keeping only some rows: ids map through ``remap`` (tokenizer id -> row), the rest to [UNK].

    The tokenizer is unchanged; ``remap`` (int32, one entry per tokenizer id) is saved with the weights.

    Args:
        vocab_size: ids the tokenizer produces.
        rows: rows kept.
        dim: embedding width.
    """

    def __init__(self, vocab_size: int, rows: int, dim: int):
        super().__init__()
        self.register_buffer("remap", torch.zeros(vocab_size, dtype=torch.int32))
        self.table = nn.Embedding(rows, dim)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(self.remap[ids].long())  # (..., dim)


def tokens_seen(data: EncodedData, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool: which token ids occur in ``data``."""
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    for ids, _ in data.encoded:
        seen[ids] = True
    return seen


def prune_vocab_(model: SequenceClassifier, keep: torch.Tensor, unk_id: int, pad_id: int) -> SequenceClassifier:
    """Keep the token-embedding rows where ``keep`` is True (plus [UNK] and padding); other ids read [UNK]'s row.

    With ``keep`` the tokens of the training data, the table shrinks about 3x on SST-2; a text with a
    token never seen in training reads [UNK] for it (on SST-2 dev: -0.1 to -0.2 points for the fp32 model).
    The model's pad id becomes the encoder's: a GPT-2 config without one gave the model eos (maybe not even
    one of the tokenizer's ids) where the encoder pads with its pad token, whose row an empty text reads.

    Args:
        model: the classifier, changed in place.
        keep: (vocab_size,) bool, tokenizer ids to keep.
        unk_id: the tokenizer's unknown-token id.
        pad_id: the id the encoder pads with (``TextEncoder.pad_id``).
    """
    word = model.backbone.embed.word
    if not isinstance(word, nn.Embedding):
        raise OztuneError("the vocabulary is already pruned or quantized; prune it before quantizing")
    keep = keep.clone()
    keep[[unk_id, pad_id]] = True
    model.cfg.pad_token_id = pad_id
    kept = torch.nonzero(keep).squeeze(1)  # (rows,)
    new = VocabEmbedding(word.num_embeddings, len(kept), word.embedding_dim)
    with torch.no_grad():
        new.table.weight.copy_(word.weight[kept])
        new.remap.fill_(int((kept < unk_id).sum()))  # the row of [UNK]
        new.remap[kept] = torch.arange(len(kept), dtype=torch.int32)
    model.backbone.embed.word = new
    return model


def unk_id(encoder) -> int | None:
    """The tokenizer's unknown-token id, or None (byte-level BPE has none: no vocabulary pruning then)."""
    token = getattr(encoder.tokenizer.model, "unk_token", None)
    return encoder.tokenizer.token_to_id(token) if token else None
