"""Attention: the RNN decoder's single-head scorers and the Transformer's multi-head attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nmt.errors import ConfigError


@dataclass(frozen=True)
class AttentionChoice:
    """Which cross-attention weights decoding keeps, one row over the source per output token.

    For a Transformer: decoder `layer` (1-based; None: the last) and `head` (1-based; None: the
    mean over heads). An RNN decoder has a single attention and takes neither.
    """

    layer: int | None = None
    head: int | None = None

    def check_exists(self, layers: int | None, heads: int | None) -> None:
        """A ConfigError for a layer or head that a decoder of `layers` layers of `heads` heads
        lacks (None, None: an RNN decoder, which has a single attention)."""
        if layers is None and (self.layer is not None or self.head is not None):
            raise ConfigError("an RNN decoder has a single attention: there is no layer or head to choose")
        if self.layer is not None and not 1 <= self.layer <= layers:
            raise ConfigError(f"attention layer {self.layer} does not exist: the decoder has {layers} layers")
        if self.head is not None and not 1 <= self.head <= heads:
            raise ConfigError(f"attention head {self.head} does not exist: each layer has {heads} heads")


class RNNAttention(nn.Module):
    """Attention of decoder states over encoder states.

    Subclasses define how keys are prepared once per source (`project_keys`) and how a query
    scores them (`score`). Scores of padded source positions are masked before the softmax.
    """

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return keys

    def score(self, query: torch.Tensor, projected_keys: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        query: torch.Tensor,  # (B, T, D) decoder states
        keys: torch.Tensor,  # (B, S, D) encoder states, also the values
        projected_keys: torch.Tensor,  # project_keys(keys)
        mask: torch.Tensor,  # (B, S) True at real source tokens
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(query, projected_keys)  # (B, T, S)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(keys.dtype)  # (B, T, S)
        context = torch.bmm(weights, keys)  # (B, T, D)
        return context, weights


class AdditiveAttention(RNNAttention):
    """Bahdanau et al. (2015): score(q, k) = v^T tanh(W_q q + W_k k)."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_proj = nn.Linear(dim, dim, bias=False)
        self.key_proj = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, 1, bias=False)

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return self.key_proj(keys)  # (B, S, D)

    def score(self, query: torch.Tensor, projected_keys: torch.Tensor) -> torch.Tensor:
        q = self.query_proj(query)  # (B, T, D)
        hidden = torch.tanh(q[:, :, None, :] + projected_keys[:, None, :, :])  # (B, T, S, D)
        return self.v(hidden).squeeze(-1)  # (B, T, S)


class DotAttention(RNNAttention):
    """Luong et al. (2015) "dot": score(q, k) = q^T k."""

    def score(self, query: torch.Tensor, projected_keys: torch.Tensor) -> torch.Tensor:
        return torch.bmm(query, projected_keys.transpose(1, 2))  # (B, T, S)


class GeneralAttention(DotAttention):
    """Luong et al. (2015) "general": score(q, k) = q^T W k (W k computed once per source)."""

    def __init__(self, dim: int):
        super().__init__()
        self.key_proj = nn.Linear(dim, dim, bias=False)

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return self.key_proj(keys)


def rnn_attention(kind: str, dim: int) -> RNNAttention:
    if kind == "additive":
        return AdditiveAttention(dim)
    if kind == "dot":
        return DotAttention()
    if kind == "general":
        return GeneralAttention(dim)
    raise ValueError(f"unknown attention {kind!r}")


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention over precomputed or cached keys and values."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))  # (B, H, S, Dh) each

    def attend(
        self,
        x: torch.Tensor,  # (B, T, D) queries
        k: torch.Tensor,  # (B, H, S, Dh)
        v: torch.Tensor,  # (B, H, S, Dh)
        mask: torch.Tensor | None = None,  # (B, 1, 1, S) or (B, 1, T, S) bool, True = attend
        causal: bool = False,
    ) -> torch.Tensor:
        B, T, D = x.shape
        q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))

    def attend_with_weights(
        self,
        x: torch.Tensor,  # (B, T, D) queries
        k: torch.Tensor,  # (B, H, S, Dh)
        v: torch.Tensor,  # (B, H, S, Dh)
        mask: torch.Tensor,  # (B, 1, 1, S) bool, True = attend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`attend` spelt out, for when the attention weights are wanted too: (B, T, D), (B, H, T, S)."""
        B, T, D = x.shape
        q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, S)
        weights = torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=-1)  # (B, H, T, S)
        used = F.dropout(weights, self.dropout, self.training).to(v.dtype)
        out = used @ v  # (B, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D)), weights

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """Self-attention of `x` over itself."""
        k, v = self.keys_values(x)
        return self.attend(x, k, v, mask, causal)
