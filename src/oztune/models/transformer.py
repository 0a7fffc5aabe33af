"""One readable transformer for every supported family, plus the task head on top.

BERT, RoBERTa, DistilBERT (post-norm encoders) and GPT-2 (pre-norm causal decoder) differ only in
data held by :class:`~oztune.config.ModelConfig`. Attention goes through
``torch.nn.functional.scaled_dot_product_attention`` on GPUs and, where measured faster, as explicit
matmul-softmax-matmul on CPUs (``EXPLICIT_ATTENTION_ON_CPU``). Shapes: B batch, T tokens, C hidden width,
H heads, D head width, F feed-forward width.

Parameter names are oztune's own (``layers.0.attn.qkv.weight``); :mod:`oztune.models.families`
maps them to and from each family's Hugging Face names. Linear layers are called through
:func:`oztune.models.kernels.linear` (oneDNN's kernel at CPU inference on a model whose weights are final).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oztune.config import HeadConfig, ModelConfig
from oztune.models.kernels import linear, thaw_
from oztune.models.packing import Packing


def activation_fn(name: str):
    """The activation function called ``name`` (see ``oztune.config.ACTIVATIONS``)."""
    return {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "tanh": torch.tanh,
        "silu": F.silu,
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "none": lambda x: x,
    }[name]


# Attention at inference on CPU: the explicit form instead of SDPA (measured, see Attention._explicit).
EXPLICIT_ATTENTION_ON_CPU = True


class Dropout(nn.Module):
    """Dropout with a cheaper mask on CPU: four 16-bit draws from one int64 of random bits.

    ``torch.nn.Dropout`` draws through ``bernoulli_``, which took 12% of a CPU training step in an early
    profile; with this mask the draws and the comparison are about 3% of it (``random_`` and ``ge`` in
    bench/profile_step.py's table). The drop probability is rounded to 1/65536.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        dropped = round(self.p * 65536)  # of 65,536 levels of a random int16
        if dropped >= 65536:  # p within 2^-17 of 1: nothing is kept
            return torch.zeros_like(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        threshold = -32768 + dropped
        keep = bits.view(torch.int16)[:n].view(x.shape) >= threshold
        return x * (keep.to(x.dtype) * (65536 / (65536 - dropped)))


class Embeddings(nn.Module):
    """Token + position (+ token type) embeddings, then LayerNorm for post-norm families."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.norm = None if cfg.pre_norm else nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)
        self.position_offset = cfg.position_offset

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, C); or packed (N,) ids with their (N,) positions -> (N, C)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.word(input_ids) + self.position(positions + self.position_offset)  # (B, T, C)
        if self.token_type is not None:
            # One row (RoBERTa): every text reads it, whatever type ids the tokenizer gives the second text of
            # a pair, as in transformers, whose RoBERTa tokenizers return none (ids of 1 overran the table).
            if token_type_ids is None or self.token_type.num_embeddings == 1:
                x = x + self.token_type.weight[0]
            else:
                x = x + self.token_type(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection; ``num_heads`` may be pruned per layer."""

    def __init__(self, cfg: ModelConfig, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, cfg.head_dim
        inner = num_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * inner)
        self.o = nn.Linear(inner, cfg.hidden_size)
        self.dropout = Dropout(cfg.attention_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                query: torch.Tensor | None = None, packing: Packing | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with ``query`` (B,) positions, only those rows: (B, 1, C).

        With ``packing``, ``x`` is the (N, C) rows of the real tokens and so is the result (without ``query``).
        """
        if self.num_heads == 0:  # every head pruned: only the output bias is left
            if packing is None:
                shape = (x.shape[0], x.shape[1] if query is None else 1)  # (B, Tq)
            else:
                shape = (x.shape[0],) if query is None else (packing.B, 1)  # (N,) or (B, 1)
            return self.o.bias.expand(*shape, -1) if self.o.bias is not None else x.new_zeros(*shape, x.shape[-1])
        if packing is not None:
            return linear(self.o, self._packed(linear(self.qkv, x), causal, query, packing))
        B, T, _ = x.shape
        y = self._attend(linear(self.qkv, x), mask, causal, query)  # (B, H, Tq, D)
        return linear(self.o, y.transpose(1, 2).reshape(B, y.shape[2], -1))  # (B, Tq, C)

    def _attend(self, qkv: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                query: torch.Tensor | None) -> torch.Tensor:
        """(B, T, 3C) projections -> (B, H, Tq, D) attention outputs."""
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D)
        if query is not None:
            q, mask, causal = query_rows(q, mask, causal, query)  # q (B, H, 1, D), mask (B, 1, 1, T)
        if (self.training and torch.is_grad_enabled()) or (EXPLICIT_ATTENTION_ON_CPU and q.device.type == "cpu"):
            return self._explicit(q, k, v, mask, causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)

    def _packed(self, qkv: torch.Tensor, causal: bool, query: torch.Tensor | None, packing: Packing) -> torch.Tensor:
        """Packed (N, 3C) projections -> (N, C) attention outputs, or (B, 1, C) with ``query``; group by group."""
        out = []
        for g in packing.groups:
            y = self._attend(g.unpack(qkv), g.mask, causal, None if query is None else query[g.rows])
            y = y.transpose(1, 2)  # (Bg, Tq, H, D)
            out.append(g.pack(y).flatten(1) if query is None else y.flatten(2))  # (Ng, C) or (Bg, 1, C)
        y = out[0] if len(out) == 1 else torch.cat(out)
        return y if query is None else packing.batch_order(y)

    def _explicit(self, q, k, v, mask, causal):
        """Attention as matmul-softmax-matmul: for training anywhere, and on CPU for inference too.

        On CPU, SDPA's fused (flash) kernel has a slow backward pass in bf16 (about 10x the explicit form
        at SST-2 lengths) and with dropout falls back to this math anyway; at inference, with head size 32
        and tens of tokens, this form took 0.55-0.75x its time (B 1-64, T 12-66, 2 threads), which was a
        fifth of the int8 model's time at batch 64. On GPUs SDPA's kernels win: they are used there.
        """
        T = q.shape[-2]
        s = torch.matmul(q, k.transpose(-1, -2)).mul_(self.head_dim ** -0.5)  # (B, H, T, T)
        if mask is None and causal:
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            s = s.masked_fill_(~mask, float("-inf"))
        p = self.dropout(s.softmax(-1))
        return p @ v  # (B, H, T, D)


def query_rows(q: torch.Tensor, mask: torch.Tensor | None, causal: bool, query: torch.Tensor):
    """The query of one position per row, and the key mask that row sees (causal folded in)."""
    B, _, T, _ = q.shape
    rows = torch.arange(B, device=q.device)
    q = q[rows, :, query].unsqueeze(2)  # (B, H, 1, D)
    if mask is not None and mask.shape[-2] > 1:  # a causal (B, 1, T, T) mask: that row of it
        mask = mask[rows, :, query].unsqueeze(2)  # (B, 1, 1, T)
    if causal:
        seen = (torch.arange(T, device=q.device) <= query[:, None])[:, None, None, :]  # (B, 1, 1, T)
        mask = seen if mask is None else mask & seen
    return q, mask, False


def query_outputs(x: torch.Tensor, query: torch.Tensor, packing: Packing | None) -> torch.Tensor:
    """The rows of ``x`` at the (B,) ``query`` positions: (B, 1, C), from (B, T, C) or packed (N, C)
    (a Packing built with this ``query`` knows their packed rows)."""
    if packing is not None:
        return x[packing.query_rows].unsqueeze(1)
    return x[torch.arange(x.shape[0], device=x.device), query].unsqueeze(1)


class FeedForward(nn.Module):
    """Two linears with an activation between; ``width`` may be pruned per layer."""

    def __init__(self, cfg: ModelConfig, width: int):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, width)
        self.down = nn.Linear(width, cfg.hidden_size)
        self.activation, self.act = cfg.activation, activation_fn(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.down, self.act(linear(self.up, x)))  # (B, T, F) -> (B, T, C)


class Block(nn.Module):
    """Attention then feed-forward, each with a residual connection; post- or pre-norm."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn = Attention(cfg, cfg.layer_heads[layer])
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg, cfg.layer_ffn[layer])
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)
        self.pre_norm, self.causal = cfg.pre_norm, cfg.causal

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, query: torch.Tensor | None = None,
                packing: Packing | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with ``query`` (B,) positions, only those rows' outputs: (B, 1, C).

        With ``packing``, ``x`` is the (N, C) rows of the real tokens and so is the result (without ``query``).
        """
        res = x if query is None else query_outputs(x, query, packing)  # (B, 1, C) with a query
        if self.pre_norm:
            x = res + self.dropout(self.attn(self.attn_norm(x), mask, self.causal, query, packing))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(res + self.dropout(self.attn(x, mask, self.causal, query, packing)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class Transformer(nn.Module):
    """The backbone: embeddings, blocks, and a final LayerNorm for pre-norm families."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_norm else None

    def attention_mask(self, attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
        """Boolean SDPA mask, True where attention is allowed; None when nothing is padded."""
        if attention_mask is None or (not torch.compiler.is_compiling() and bool(attention_mask.all())):
            return None  # (compiled, a data-dependent branch would split the graph: the mask stays)
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        if self.cfg.causal:
            causal = torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()
            keep = keep & causal  # (B, 1, T, T)
            # A query before its row's first real token (a left-padded batch) sees no key at all: SDPA gives
            # NaN there, which a masked mean still turns into NaN. Such a query sees itself (oztune pads on
            # the right, where this never happens: every query sees position 0).
            pos = torch.arange(T, device=keep.device)  # (not torch.eye: ONNX Runtime has no bool EyeLike)
            keep = keep | (~keep.any(-1, keepdim=True) & (pos[:, None] == pos))
        return keep

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, query: torch.Tensor | None = None,
                pack: bool = True, token_index: tuple | None = None) -> torch.Tensor:
        """Last hidden state (B, T, C) for token ids (B, T).

        With ``query`` (B,), the position of the one token per row whose output is wanted (the first
        for cls pooling, the last real one for last-token pooling), the last layer computes only those
        rows (its keys and values still see every token) and the result is (B, 1, C): the same numbers
        as the full pass at a quarter of the last layer's matmuls.

        At inference (and unless ``pack`` is False: hooks on the layers see (B, T, C) then), a batch with
        enough padding runs its row-wise layers on the real tokens only and attention in groups of
        similar length (:mod:`oztune.models.packing`); the result is the same, zeros at padded positions.
        ``token_index`` (from :func:`oztune.models.packing.token_index`) packs any batch, in one attention
        group: the form a compiled graph can run (:mod:`oztune.models.compiled`).
        """
        mask = self.attention_mask(attention_mask, input_ids.shape[1])
        packing = None
        if token_index is not None and mask is not None:
            packing = Packing.one_group(mask, *token_index)
        elif pack and mask is not None and Packing.worth_it(attention_mask):
            packing = Packing(attention_mask, mask, query)
            if query is not None and bool((packing.query_rows < 0).any()):
                packing = None  # a pooled position is padding (cls pooling of a left-padded row): keep that row
        if packing is not None:
            tt = None if token_type_ids is None else packing.pack(token_type_ids)
            x = self.embed(packing.pack(input_ids), tt, packing.t)  # (N, C)
        else:
            x = self.embed(input_ids, token_type_ids)  # (B, T, C)
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            x = block(x, mask, query if i == last else None, packing)
        if query is not None and last < 0:
            x = query_outputs(x, query, packing)  # (B, 1, C)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return packing.unpack(x) if packing is not None and query is None else x


def pooled_positions(attention_mask: torch.Tensor | None, how: str, B: int, T: int,
                     device: torch.device) -> torch.Tensor:
    """(B,) position of the token cls or last-token pooling reads: the first, or the last real one.

    The last real token is the rightmost position the mask keeps, so left-padded rows (as a decoder's
    tokenizer may pad) read their last token too, as HF's ``GPT2ForSequenceClassification`` does; a row
    with no real token reads position 0.
    """
    if how == "cls":
        return torch.zeros(B, dtype=torch.long, device=device)
    if attention_mask is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=device)
    pos = torch.arange(1, T + 1, device=attention_mask.device)  # (T,) 1-based: a kept position beats none
    return (attention_mask.long() * pos).argmax(-1)  # (B,) the rightmost kept position


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """Pool (B, T, C) hidden states to (B, C): first token, masked mean, or last real token."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        if attention_mask is None:
            return hidden.mean(1)
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    last = pooled_positions(attention_mask, how, hidden.shape[0], hidden.shape[1], hidden.device)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class TaskHead(nn.Module):
    """Pooling, optional hidden layers (dropout -> linear -> activation), then dropout -> output linear."""

    def __init__(self, cfg: HeadConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        widths = [hidden_size, *cfg.hidden_sizes]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.out = nn.Linear(widths[-1], cfg.num_labels, bias=cfg.out_bias)
        self.dropout = Dropout(cfg.dropout)
        self.act = activation_fn(cfg.activation)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        x = pool(hidden, attention_mask, self.cfg.pooling)  # (B, C)
        for layer in self.hidden:
            x = self.act(linear(layer, self.dropout(x)))
        return linear(self.out, self.dropout(x))  # (B, num_labels)


class SequenceClassifier(nn.Module):
    """Backbone + task head; ``loss`` picks cross-entropy, BCE or MSE from the problem type.

    Args:
        cfg: backbone configuration.
        head: task head configuration.
    """

    def __init__(self, cfg: ModelConfig, head: HeadConfig):
        super().__init__()
        self.cfg, self.head_cfg = cfg, head
        self.backbone = Transformer(cfg)
        self.head = TaskHead(head, cfg.hidden_size)

    def train(self, mode: bool = True) -> "SequenceClassifier":
        if mode:  # the weights may change from here: no packed copies of them (oztune.models.kernels)
            thaw_(self)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # int8 layers (oztune.compress.quantize) refuse .half()/.to(torch.bfloat16): asked here first, so that
        # a refused conversion leaves the whole model as it was rather than converted up to the first int8 layer
        int8 = next((m for m in self.modules() if hasattr(m, "check_apply")), None) if recurse else None
        if int8 is not None:
            int8.check_apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, all_tokens: bool = False,
                token_index: tuple | None = None) -> torch.Tensor:
        """Logits (B, num_labels).

        Args:
            all_tokens: compute every token's output in the last layer too (hooks that read whole
                layer outputs need it); by default cls and last-token pooling compute only the pooled row.
            token_index: run packed in one attention group (see :meth:`Transformer.forward`); its query
                rows must be those of :meth:`pooled_positions` for this model's pooling.
        """
        how = self.head_cfg.pooling
        if all_tokens or how == "mean":
            hidden = self.backbone(input_ids, attention_mask, token_type_ids, pack=not all_tokens,
                                   token_index=token_index)  # (B, T, C)
            return self.head(hidden, attention_mask)
        query = self.pooled_positions(input_ids, attention_mask)  # (B,)
        hidden = self.backbone(input_ids, attention_mask, token_type_ids, query=query,
                               token_index=token_index)  # (B, 1, C)
        return self.head(hidden, None)

    def pooled_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B,) position of the token the head reads per row; None for mean pooling (it reads them all)."""
        how = self.head_cfg.pooling
        return None if how == "mean" else pooled_positions(attention_mask, how, *input_ids.shape, input_ids.device)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """The loss of the problem type: cross-entropy, BCE-with-logits or MSE.

        ``weights`` (L,): single-label, each example's loss times its class's weight; multi-label, each label's
        weight of its positive examples (BCE's ``pos_weight``). Either way the mean divides by the number of
        examples (not by their weights, as ``cross_entropy(weight=...)`` would): a step's loss is then the
        same however its examples are split into micro-batches (``--grad-accum``) or processes.
        ``label_smoothing`` e in [0, 1): single-label, the target puts 1 - e on the gold class and spreads e evenly
        over all L classes (``cross_entropy``'s); multi-label, each yes/no target is pulled toward 1/2: y (1 - e)
        + e / 2. Regression has no labels to smooth (0 only).
        """
        logits = logits.float()
        kind = self.head_cfg.problem_type
        if kind == "single_label":
            if weights is not None:
                return (F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
                        * weights[labels]).mean()
            return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        if kind == "multi_label":
            target = labels.float() * (1 - label_smoothing) + label_smoothing / 2
            return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weights)
        if label_smoothing:
            raise ValueError("label smoothing is for classification heads; a regression head has no labels to smooth")
        return F.mse_loss(logits.squeeze(-1), labels.float())

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities (softmax or sigmoid) or, for regression, the raw value."""
        return scores(logits, self.head_cfg.problem_type)


def scores(logits: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Probabilities of ``problem_type``'s logits (softmax or sigmoid) or, for regression, the raw value."""
    if problem_type == "single_label":
        return logits.float().softmax(-1)
    if problem_type == "multi_label":
        return logits.float().sigmoid()
    return logits.float()


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT-style initialisation for freshly created layers (heads, untrained models)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
