"""Inference on the real tokens of a padded batch only, attention in groups of similar length.

Linear layers, layer norms, activations and residuals treat each token on its own, so at inference they
can run on the (N, C) rows of the N real tokens instead of (B, T, C) with padding. Batches of texts of
mixed lengths (a server's, an unsorted file's) carry a third to a half of padding. Only attention needs
a padded layout: its input projection is scattered into one, and its output gathered back, per group of
rows of similar length, each padded only to its own longest row, because attention costs B * T^2.

The row order of the packed tokens is group by group (rows by length), then position; every map to and
from the (B, T) layout is kept here, so nothing else depends on the order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Inference on batches with at least this share of padding tokens is packed; below it, gathering and
# scattering cost more than they save (length-sorted batches of 64 SST-2 sentences carry ~7%).
PACK_MIN_PADDING = 0.1
# The cost of one more attention group, in padded (row x position^2) units of attention work (a dozen
# operators per group and layer). On batches of 18 and of 64 unsorted SST-2 sentences (int8 MiniLM,
# 2 threads) 2,000 did as well as 7,000 and better than 20,000 or a single group.
GROUP_COST = 2000


@dataclass
class Group:
    """Rows of the batch whose attention runs together, padded to ``T`` positions.

    Args:
        rows: (Bg,) batch rows.
        T: positions kept (the longest row's last real position + 1).
        start, stop: their tokens' slice of the packed rows.
        index: (Ng,) position of each of those tokens in the (Bg * T) padded layout.
        mask: the attention mask of these rows cut to T positions; None when none of them is padded.
    """

    rows: torch.Tensor
    T: int
    start: int
    stop: int
    index: torch.Tensor
    mask: torch.Tensor | None

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Packed rows (N, K) -> this group's (Bg, T, K), zeros at padding."""
        return _scatter(x[self.start:self.stop], self.index, len(self.rows), self.T)

    def pack(self, y: torch.Tensor) -> torch.Tensor:
        """(Bg, T, ...) -> (Ng, ...): the group's real tokens, in packed order."""
        return y.flatten(0, 1)[self.index]


class Packing:
    """Where the real tokens of a padded (B, T) batch are, and the attention groups.

    Args:
        attention_mask: (B, T), 1 for real tokens.
        mask: the transformer's attention mask for the batch: (B, 1, 1, T) or causal (B, 1, T, T).
        query: (B,) the pooled position of each row, or None; ``query_rows`` holds their packed rows.
    """

    def __init__(self, attention_mask: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None):
        self.B, self.T = B, T = attention_mask.shape
        device = attention_mask.device
        real = attention_mask.bool()
        self.groups: list[Group] = []
        b_parts, t_parts, start = [], [], 0
        for rows, Tg in length_groups(attention_mask):
            i, t = real[rows, :Tg].nonzero(as_tuple=True)  # (Ng,) each, row-major
            full = bool(real[rows, :Tg].all())
            gmask = None if full else mask[rows][..., :Tg, :Tg]  # (padding (b, 1, 1, Tg) or causal (b, 1, Tg, Tg))
            self.groups.append(Group(rows, Tg, start, start + len(i), i * Tg + t, gmask))
            b_parts.append(rows[i])
            t_parts.append(t)
            start += len(i)
        self.b, self.t = torch.cat(b_parts), torch.cat(t_parts)  # (N,): batch row and position of each packed row
        self.flat = self.b * T + self.t
        self.group_order = torch.cat([g.rows for g in self.groups])  # (B,) batch rows, group by group
        identity = bool((self.group_order == torch.arange(B, device=device)).all())
        self.unsort = None if identity else torch.argsort(self.group_order)
        self.query_rows = None if query is None else _packed_rows(self.flat, B, T, query)  # (B,), -1: padding

    @classmethod
    def one_group(cls, mask: torch.Tensor, b: torch.Tensor, t: torch.Tensor,
                  query_rows: torch.Tensor | None = None) -> "Packing":
        """All rows in one attention group, in batch order, from the coordinates of the real tokens.

        Unlike the constructor this takes no data-dependent step (no ``nonzero``, no sizes read from the
        data), so a compiled graph can build it from tensors computed outside; see :func:`token_index`.

        Args:
            mask: the transformer's attention mask for the batch, (B, 1, 1, T) or causal (B, 1, T, T).
            b, t, query_rows: :func:`token_index`: (N,) batch row and position of each real token, row-major,
                and the (B,) packed row of each row's pooled position, or None.
        """
        self = cls.__new__(cls)
        self.B, self.T = B, T = mask.shape[0], mask.shape[-1]
        self.b, self.t = b, t
        self.flat = b * T + t
        rows = torch.arange(B, device=b.device)
        self.groups = [Group(rows, T, 0, b.shape[0], self.flat, mask)]
        self.group_order, self.unsort, self.query_rows = rows, None, query_rows
        return self

    @staticmethod
    def worth_it(attention_mask: torch.Tensor | None) -> bool:
        """Whether a batch has enough padding for packing to pay, at inference (no autograd, no tracing)."""
        if attention_mask is None or torch.is_grad_enabled() or torch.jit.is_tracing() \
                or torch.compiler.is_compiling():
            return False
        n = attention_mask.numel()  # (padding / n, not 1 - real / n: 1 - 0.9 is under 0.1)
        return (n - float(attention_mask.sum())) / n >= PACK_MIN_PADDING

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...): the real tokens' entries."""
        return x[self.b, self.t]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros at padding."""
        return _scatter(x, self.flat, self.B, self.T)

    def batch_order(self, y: torch.Tensor) -> torch.Tensor:
        """(B, ...) rows in group order -> in batch order."""
        return y if self.unsort is None else y[self.unsort]


def token_index(attention_mask: torch.Tensor, query: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(b, t, query_rows) for :meth:`Packing.one_group`: each real token's batch row and position, and the
    packed row of each (B,) ``query`` position; None when a query position is padding (no packed row)."""
    b, t = attention_mask.nonzero(as_tuple=True)  # (N,) each, row-major
    if query is None:
        return b, t, None
    B, T = attention_mask.shape
    query_rows = _packed_rows(b * T + t, B, T, query)
    return None if bool((query_rows < 0).any()) else (b, t, query_rows)


def length_groups(attention_mask: torch.Tensor, group_cost: float = GROUP_COST) -> list[tuple[torch.Tensor, int]]:
    """A padded batch cut into groups of rows of similar length (see :func:`_group_bounds`), as ``(rows, T)``
    with ``T`` the group's last real position + 1: :class:`Packing`'s attention groups, and the batches
    compiled inference runs one by one (its graph packs one attention group)."""
    B, T = attention_mask.shape
    ends = (attention_mask.bool() * torch.arange(1, T + 1, device=attention_mask.device)).amax(1)  # (B,)
    order = torch.argsort(ends, stable=True)
    return [(order[lo:hi], int(ends[order[hi - 1]])) for lo, hi in _group_bounds(ends[order].tolist(), group_cost)]


def _packed_rows(flat: torch.Tensor, B: int, T: int, positions: torch.Tensor) -> torch.Tensor:
    """(B,) positions, one per batch row -> their packed rows, given each packed row's (N,) ``flat`` index
    into the (B * T) layout; -1 where that position is padding."""
    row_of = torch.full((B * T,), -1, dtype=torch.long, device=flat.device)
    row_of[flat] = torch.arange(len(flat), device=flat.device)
    return row_of[torch.arange(B, device=flat.device) * T + positions]


def _scatter(x: torch.Tensor, index: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Rows (n, K) put at ``index`` of a zero (B * T, K) layout, returned as (B, T, K)."""
    return x.new_zeros(B * T, x.shape[-1]).index_copy_(0, index, x).view(B, T, -1)


def _group_bounds(ends: list[int], group_cost: float = GROUP_COST) -> list[tuple[int, int]]:
    """Cut rows sorted by length into consecutive groups minimising attention work plus ``group_cost`` each.

    Work of a group: rows x (its longest length)^2. Cuts only where the length changes; an exact
    dynamic programme over the distinct lengths (a few dozen at most).
    """
    n = len(ends)
    cuts = [i for i in range(1, n) if ends[i] != ends[i - 1]] + [n]  # group ends worth considering
    if len(cuts) == 1:
        return [(0, n)]
    stop = np.array(cuts)
    sq = np.array([ends[c - 1] for c in cuts], dtype=np.float64) ** 2  # longest length^2 of a group ending there
    best = np.empty(len(cuts))
    prev = np.empty(len(cuts), dtype=np.int64)
    for j in range(len(cuts)):
        starts = np.concatenate(([0], stop[:j]))  # a group ending at cuts[j] starts at 0 or after an earlier cut
        before = np.concatenate(([0.0], best[:j]))
        cost = before + group_cost + (stop[j] - starts) * sq[j]
        k = int(cost.argmin())
        best[j], prev[j] = cost[k], k - 1  # k - 1: index of the previous group's end, -1 for none
    bounds, j = [], len(cuts) - 1
    while j >= 0:
        lo = int(stop[prev[j]]) if prev[j] >= 0 else 0
        bounds.append((lo, int(stop[j])))
        j = prev[j]
    return bounds[::-1]
