"""Encoded examples and length-bucketed batches.

Texts are tokenized once. Training batches come from shuffled "mega-batches" of ``bucket`` x batch size
examples sorted by length, so each batch holds examples of similar length and little padding, while
the order of batches stays random. Inference sorts all examples by length and restores the order after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from oztune.data.tokenize import TextEncoder, pad_batch


@dataclass
class EncodedData:
    """Token ids of every example and, when known, the label tensor.

    Args:
        encoded: per example (ids, type_ids), unpadded.
        labels: (N,) long for single-label, (N, L) float for multi-label, (N,) float for regression; or None.
        pad_id: pad token id.
    """

    encoded: list[tuple[list[int], list[int]]]
    labels: torch.Tensor | None
    pad_id: int

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids, _ in self.encoded), dtype=np.int64, count=len(self.encoded))

    def subset(self, idx) -> "EncodedData":
        return EncodedData([self.encoded[i] for i in idx], None if self.labels is None else self.labels[idx], self.pad_id)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        """Padded tensors for the examples ``idx``, with ``labels`` when known."""
        b = pad_batch([self.encoded[i] for i in idx], self.pad_id)
        if self.labels is not None:
            b["labels"] = self.labels[torch.as_tensor(np.asarray(idx))]
        return b


def encode_data(encoder: TextEncoder, texts: list[str], pairs: list[str] | None, labels: list | None,
                problem_type: str = "single_label") -> EncodedData:
    """Tokenize texts (and pairs) and pack already-encoded labels into a tensor."""
    lab = None
    if labels is not None:
        dtype = torch.long if problem_type == "single_label" else torch.float32
        lab = torch.tensor(labels, dtype=dtype)
    return EncodedData(encoder.encode(texts, pairs), lab, encoder.pad_id)


def train_batches(n_or_lengths: np.ndarray, batch_size: int, seed: int, bucket: int = 50,
                  shard: tuple[int, int] = (0, 1)) -> list[np.ndarray]:
    """One epoch of length-bucketed batches of example indices, shuffled with ``seed``.

    Args:
        n_or_lengths: token length of each example.
        batch_size: examples per batch.
        seed: shuffling seed (use a different one per epoch).
        bucket: mega-batch size in batches; 1 turns bucketing off.
        shard: (rank, world size): each rank takes every world-th batch (distributed training).
    """
    lengths = np.asarray(n_or_lengths)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(lengths))
    out = []
    mega = batch_size * max(1, bucket)
    for s in range(0, len(perm), mega):
        chunk = perm[s:s + mega]
        if bucket > 1:
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        out.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(out))
    batches = [out[i] for i in order]
    rank, world = shard
    if world > 1:
        batches = batches[: len(batches) // world * world][rank::world]
    return batches


def inference_batches(lengths: np.ndarray, batch_size: int, sort: bool = True) -> Iterator[np.ndarray]:
    """Batches of indices, longest first when ``sort`` (the caller scatters results back by index)."""
    order = np.argsort(-np.asarray(lengths), kind="stable") if sort else np.arange(len(lengths))
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]
