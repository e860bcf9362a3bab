"""A small transformer encoder over token ids, built from plain nn.Linear layers.

Pruning targets and curvature need plain Linear layers, so attention is spelled out as
separate ``attn.q``, ``attn.k``, ``attn.v``, ``attn.o`` projections around
``scaled_dot_product_attention`` (not nn.MultiheadAttention, whose packed in-projection is
one parameter). The feed-forward is an nn.Sequential ``ffn.fc1 -> GELU -> Dropout ->
ffn.fc2`` so export cleanup can drop its dead hidden units.

Conventions: inputs are batch-first token ids (B, T) int64 and an optional attention mask
(B, T) of 0/1 or bool (1/True = a real token, 0/False = padding; default all real).
Padding never influences the outputs: padded keys are masked out of attention, positions
count real tokens only (so left or right padding gives the same positions), and pooling
averages real tokens only. A row with no real token pools to zeros (no NaN).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import ModelError, SettingError


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o Linear projections (dim -> dim)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        """x (B, T, D); attend (B, 1, 1, T) bool, True = key may be attended. -> (B, T, D)."""

        def split(t: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, D/H)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=attend, dropout_p=p
        )
        return self.o(out.transpose(1, 2).flatten(2))


class EncoderBlock(nn.Module):
    """Attention + feed-forward, each with a residual and LayerNorm (pre- or post-norm)."""

    def __init__(self, dim: int, heads: int, ffn: int, norm_first: bool, dropout: float):
        super().__init__()
        self.norm_first = norm_first
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.ffn = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(dim, ffn), act=nn.GELU(), drop=nn.Dropout(dropout),
                fc2=nn.Linear(ffn, dim),
            )
        )  # fmt: skip
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        """x (B, T, D); attend (B, 1, 1, T) bool. -> (B, T, D)."""
        if self.norm_first:
            x = x + self.drop(self.attn(self.norm1(x), attend))
            return x + self.drop(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, attend)))
        return self.norm2(x + self.drop(self.ffn(x)))


class TokenEncoder(nn.Module):
    """Transformer encoder classifier/embedder over token ids (see the module docstring).

    Parameters: ``tok_embed`` (vocab, dim), ``pos_embed`` (max_len, dim), ``blocks.i.*``,
    ``norm`` (final LayerNorm) and, when classes > 0, ``head`` (classes, dim).
    """

    def __init__(
        self,
        vocab: int = 1000,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        ffn: int = 256,
        max_len: int = 128,
        classes: int = 0,
        norm_first: bool = True,
        dropout: float = 0.0,
        pad_id: int = 0,
    ):
        super().__init__()
        self.vocab, self.dim, self.max_len, self.pad_id = vocab, dim, max_len, pad_id
        self.classes, self.norm_first = classes, norm_first
        self.tok_embed = nn.Embedding(vocab, dim, padding_idx=pad_id)
        self.pos_embed = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, heads, ffn, norm_first, dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes) if classes > 0 else None
        with torch.no_grad():  # small embeddings, as in BERT/GPT; the pad row stays zero
            nn.init.normal_(self.tok_embed.weight, std=0.02)
            self.tok_embed.weight[pad_id].zero_()
            nn.init.normal_(self.pos_embed.weight, std=0.02)

    def _check(self, input_ids: Tensor, mask: Tensor) -> None:
        if input_ids.dim() != 2 or tuple(mask.shape) != tuple(input_ids.shape):
            raise ModelError(
                f"TokenEncoder takes input_ids (B, T) and attention_mask of the same shape; "
                f"got {tuple(input_ids.shape)} and {tuple(mask.shape)}"
            )
        if input_ids.shape[1] > self.max_len:
            raise ModelError(
                f"sequence length {input_ids.shape[1]} exceeds max_len {self.max_len}; "
                "truncate the input or build the model with a larger max_len"
            )

    def forward(
        self, input_ids: Tensor | dict[str, Tensor], attention_mask: Tensor | None = None
    ) -> Tensor:
        """input_ids (B, T) int64 (or a dict with keys input_ids/attention_mask); attention_mask
        (B, T) 0/1 or bool, 1 = real token. -> logits (B, classes), or the mean of the real
        tokens' final hidden states (B, dim) when classes == 0."""
        if isinstance(input_ids, dict):  # a dict batch passed positionally (Task.forward)
            input_ids, attention_mask = input_ids["input_ids"], input_ids.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self._check(input_ids, attention_mask)
        real = attention_mask.bool()
        # a row without real tokens attends everywhere instead of nowhere (softmax over an
        # empty set is NaN); real rows are untouched and pooling drops such a row anyway
        attend = real | ~real.any(dim=1, keepdim=True)
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        h = self.tok_embed(input_ids) + self.pos_embed(positions)
        attend = attend[:, None, None, :]
        for block in self.blocks:
            h = block(h, attend)
        h = self.norm(h)
        weight = real.to(h.dtype).unsqueeze(-1)
        pooled = (h * weight).sum(1) / weight.sum(1).clamp(min=1.0)
        return pooled if self.head is None else self.head(pooled)

    def example_inputs(
        self, batch: int = 2, seq: int = 16, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """A valid input dict: ``input_ids`` (batch, seq) int64 with ids != pad_id on real
        tokens and pad_id on padding, ``attention_mask`` (batch, seq) int64 0/1.

        Row r keeps its first ``seq - r * seq // batch`` tokens (row 0 unpadded, later rows
        padded at the end, every row at least one real token), so export verification sees
        several amounts of padding. Pass it as ``model(**inputs)``.
        """
        if batch < 1 or not 1 <= seq <= self.max_len:
            raise SettingError(
                f"example_inputs batch {batch!r} must be >= 1 and seq {seq!r} in 1..{self.max_len}"
            )
        if self.vocab < 2:
            raise SettingError(f"vocab {self.vocab} leaves no token id besides pad_id")
        ids = torch.randint(0, self.vocab - 1, (batch, seq), generator=generator)
        ids = ids + (ids >= self.pad_id).long()  # skip pad_id
        lengths = torch.tensor([max(1, seq - r * seq // batch) for r in range(batch)])
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, self.pad_id))
        return {"input_ids": ids, "attention_mask": mask}


def _positive(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingError(f"{what} {value!r} must be an integer >= {minimum}")
    return value


def encoder(
    vocab: int = 1000,
    dim: int = 64,
    heads: int = 4,
    layers: int = 2,
    ffn: int = 256,
    max_len: int = 128,
    classes: int = 0,
    norm_first: bool = True,
    dropout: float = 0.0,
    pad_id: int = 0,
) -> TokenEncoder:
    """A TokenEncoder (arch spec ``prunekit.models:encoder?dim=64&layers=2``).

    vocab: token ids 0..vocab-1; dim: model width (a multiple of heads); ffn: feed-forward
    width; max_len: longest sequence; classes: logits (B, classes), 0 = pooled (B, dim);
    norm_first: pre-norm (True) or post-norm blocks; pad_id: the padding token id (its
    embedding is zero). Inputs: input_ids (B, T) int64, attention_mask (B, T) 0/1 or bool.
    """
    vocab, dim = _positive(vocab, "vocab", 2), _positive(dim, "dim")
    heads, layers = _positive(heads, "heads"), _positive(layers, "layers", 0)
    ffn, max_len = _positive(ffn, "ffn"), _positive(max_len, "max_len")
    classes = _positive(classes, "classes", 0)
    if dim % heads:
        raise SettingError(f"dim {dim} must be a multiple of heads {heads}")
    if not isinstance(norm_first, bool):
        raise SettingError(f"norm_first {norm_first!r} must be true or false")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise SettingError(f"dropout {dropout!r} must be a number in [0, 1)")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab:
        raise SettingError(f"pad_id {pad_id!r} must be a token id in 0..{vocab - 1}")
    return TokenEncoder(vocab, dim, heads, layers, ffn, max_len, classes, norm_first,
                        float(dropout), pad_id)  # fmt: skip
