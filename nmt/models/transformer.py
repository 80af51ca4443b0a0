"""Transformer encoder-decoder (Vaswani et al., 2017) with sinusoidal positions, pre- or
post-norm, and cached keys/values for incremental decoding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nmt.config import ModelConfig
from nmt.models.attention import AttentionChoice, MultiHeadAttention
from nmt.models.dropout import Dropout
from nmt.tokenizer import PAD

KeysValues = tuple[torch.Tensor, torch.Tensor]  # (B, H, S, Dh) each


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)): (length, dim)."""
    position = torch.arange(length, dtype=torch.float64)[:, None]  # (L, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)  # (dim/2,)
    angle = position / torch.pow(10000.0, two_i / dim)  # (L, dim/2)
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return pe.float()


def training_flops(cfg: ModelConfig, tgt_vocab: int, src_lengths: np.ndarray, tgt_lengths: np.ndarray) -> int:
    """Matrix-product FLOPs of one training pass (forward, and backward at twice its cost) over
    sentences of these lengths (source with its EOS, target with BOS): the model FLOPs that MFU
    divides, padding left out. Attention counts every query-key pair computed, the masked
    future ones of the decoder too, as the kernels compute them."""
    d, ff = cfg.embed_dim, cfg.ff_dim
    s, t = np.asarray(src_lengths, dtype=np.int64), np.asarray(tgt_lengths, dtype=np.int64)
    # multiply-adds of one forward pass, per sentence
    encoder = cfg.enc_layers * (4 * d * d * s + 2 * d * ff * s + 2 * d * s * s)  # projections, feed-forward, Q·K and weights·V
    decoder = cfg.dec_layers * (
        6 * d * d * t + 2 * d * d * s + 2 * d * ff * t  # self Q/K/V/O and cross Q/O per target, cross K/V per source
        + 2 * d * t * t + 2 * d * t * s  # self- and cross-attention products
    )
    output = d * tgt_vocab * t
    return 6 * int((encoder + decoder + output).sum())  # 2 FLOPs a multiply-add, x3 with the backward pass


@dataclass
class TransformerMemory:
    states: torch.Tensor  # (B, S, D) encoder output
    mask: torch.Tensor  # (B, S) True at real source tokens
    cross_kv: list[KeysValues]  # per decoder layer: cross-attention keys/values of the source

    def reorder(self, indices: torch.Tensor) -> TransformerMemory:
        return TransformerMemory(
            self.states.index_select(0, indices),
            self.mask.index_select(0, indices),
            [(k.index_select(0, indices), v.index_select(0, indices)) for k, v in self.cross_kv],
        )


@dataclass
class TransformerState:
    self_kv: list[KeysValues]  # per decoder layer: self-attention keys/values of the steps so far
    step: int  # position of the next token
    attention_choice: AttentionChoice | None = None  # which cross-attention weights to keep
    attention: torch.Tensor | None = None  # (B, S) the kept weights of the last step

    def reorder(self, indices: torch.Tensor) -> TransformerState:
        return TransformerState(
            [(k.index_select(0, indices), v.index_select(0, indices)) for k, v in self.self_kv],
            self.step,
            self.attention_choice,
            None if self.attention is None else self.attention.index_select(0, indices),
        )


@dataclass
class StaticCache:
    """One decoder layer's self-attention keys and values for decoding with fixed shapes: the
    buffers hold every position up to the longest output, and one step writes its own in place."""

    keys: torch.Tensor  # (B, H, L, Dh)
    values: torch.Tensor  # (B, H, L, Dh)
    position: torch.Tensor  # (1,) long, on the device: the step's position
    visible: torch.Tensor  # (1, 1, 1, L) bool: the positions written so far, this one included


def chosen_weights(weights: torch.Tensor, choice: AttentionChoice) -> torch.Tensor:
    """One step's cross-attention weights (B, H, 1, S) as the choice asks: a head's, or their mean (B, S)."""
    weights = weights[:, :, 0]  # (B, H, S)
    return weights.mean(1) if choice.head is None else weights[:, choice.head - 1]


class FeedForward(nn.Module):
    def __init__(self, dim: int, ff_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, ff_dim)
        self.fc2 = nn.Linear(ff_dim, dim)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_residual: bool = True):
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.attn_residual = attn_residual  # False: the self-attention's output replaces x
        self.self_attn = MultiHeadAttention(cfg.embed_dim, cfg.heads, cfg.attn_dropout)
        self.ff = FeedForward(cfg.embed_dim, cfg.ff_dim, cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.embed_dim)
        self.norm2 = nn.LayerNorm(cfg.embed_dim)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: (B, S, D); mask: (B, 1, 1, S)
        residual = x if self.attn_residual else 0.0
        if self.pre_norm:
            x = residual + self.dropout(self.self_attn(self.norm1(x), mask))
            return x + self.dropout(self.ff(self.norm2(x)))
        x = self.norm1(residual + self.dropout(self.self_attn(x, mask)))
        return self.norm2(x + self.dropout(self.ff(x)))


def encoder_layers(cfg: ModelConfig) -> nn.ModuleList:
    return nn.ModuleList(EncoderLayer(cfg, attn_residual=i != cfg.enc_no_residual_layer)
                         for i in range(1, cfg.enc_layers + 1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.self_attn = MultiHeadAttention(cfg.embed_dim, cfg.heads, cfg.attn_dropout)
        self.cross_attn = MultiHeadAttention(cfg.embed_dim, cfg.heads, cfg.attn_dropout)
        self.ff = FeedForward(cfg.embed_dim, cfg.ff_dim, cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.embed_dim)
        self.norm2 = nn.LayerNorm(cfg.embed_dim)
        self.norm3 = nn.LayerNorm(cfg.embed_dim)
        self.dropout = Dropout(cfg.dropout)

    def _sublayer(self, x: torch.Tensor, norm: nn.LayerNorm, fn) -> tuple[torch.Tensor, object]:
        out, extra = fn(norm(x) if self.pre_norm else x)
        x = x + self.dropout(out)
        return (x if self.pre_norm else norm(x)), extra

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        memory_kv: KeysValues,  # (B, H, S, Dh) each
        memory_mask: torch.Tensor,  # (B, 1, 1, S)
        past_kv: KeysValues | None = None,  # (B, H, t, Dh): earlier steps when decoding incrementally
        cross_weights: bool = False,  # also return the cross-attention weights (B, H, T, S)
        static_cache: StaticCache | None = None,  # fixed-shape buffers instead of past_kv (one step)
    ) -> tuple[torch.Tensor, KeysValues, torch.Tensor | None]:
        def self_attention(h):
            k, v = self.self_attn.keys_values(h)  # (B, H, T, Dh)
            if static_cache is not None:  # write this step's keys and values in place, attend to those so far
                static_cache.keys.index_copy_(2, static_cache.position, k)
                static_cache.values.index_copy_(2, static_cache.position, v)
                return self.self_attn.attend(h, static_cache.keys, static_cache.values, mask=static_cache.visible), None
            if past_kv is not None:
                k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
            # Teacher forcing sees the whole target at once and needs the causal mask; a single
            # incremental step may see every cached position.
            return self.self_attn.attend(h, k, v, causal=past_kv is None), (k, v)

        def cross_attention(h):
            if cross_weights:
                return self.cross_attn.attend_with_weights(h, *memory_kv, mask=memory_mask)
            return self.cross_attn.attend(h, *memory_kv, mask=memory_mask), None

        x, kv = self._sublayer(x, self.norm1, self_attention)
        x, weights = self._sublayer(x, self.norm2, cross_attention)
        x, _ = self._sublayer(x, self.norm3, lambda h: (self.ff(h), None))
        return x, kv, weights


class ScaledEmbedding:
    """Token embeddings scaled by sqrt(D) plus sinusoidal positions, then dropout. Needs `dim`,
    `embed_dropout` and a `positions` buffer (made by `_add_positions`)."""

    dim: int
    positions: torch.Tensor
    embed_dropout: Dropout

    def _add_positions(self) -> None:
        self.register_buffer("positions", sinusoidal_positions(1024, self.dim), persistent=False)
        self.outgrown_positions: list[torch.Tensor] = []

    def _embed_positions(self, length: int) -> None:
        """Room in the position table for `length` positions."""
        if length > self.positions.shape[0]:
            # A CUDA graph captured before (static_decoding) reads the old table's memory at every
            # replay: it must stay allocated. Its rows are the first rows of the new one.
            self.outgrown_positions.append(self.positions)
            self.positions = sinusoidal_positions(2 * length, self.dim).to(self.positions.device)

    def _embed(self, table: nn.Embedding, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        T = tokens.shape[1]
        self._embed_positions(offset + T)
        x = table(tokens) * math.sqrt(self.dim) + self.positions[offset : offset + T]  # (B, T, D)
        return self.embed_dropout(x)


def init_transformer_weights(model: nn.Module, embeddings: list[nn.Embedding]) -> None:
    """Xavier-uniform Linear weights, zero biases; embeddings N(0, 1/D) with a zero PAD row."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for embed in embeddings:
        nn.init.normal_(embed.weight, mean=0.0, std=embed.weight.shape[1] ** -0.5)
        if embed.padding_idx is not None:
            nn.init.zeros_(embed.weight[embed.padding_idx])


class Transformer(ScaledEmbedding, nn.Module):
    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int):
        super().__init__()
        self.dim = cfg.embed_dim
        self.heads = cfg.heads
        self.src_embed = nn.Embedding(src_vocab_size, cfg.embed_dim, padding_idx=PAD)
        self.tgt_embed = self.src_embed if cfg.share_embeddings else nn.Embedding(tgt_vocab_size, cfg.embed_dim, padding_idx=PAD)
        self.embed_dropout = Dropout(cfg.dropout)
        self.encoder_layers = encoder_layers(cfg)
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        # Pre-norm leaves the residual stream unnormalized: normalize once at the end.
        self.encoder_norm = nn.LayerNorm(cfg.embed_dim) if cfg.norm == "pre" else nn.Identity()
        self.decoder_norm = nn.LayerNorm(cfg.embed_dim) if cfg.norm == "pre" else nn.Identity()
        self.output = nn.Linear(cfg.embed_dim, tgt_vocab_size, bias=False)
        self._add_positions()
        init_transformer_weights(self, [self.src_embed, self.tgt_embed])
        if cfg.tie_output:
            self.output.weight = self.tgt_embed.weight

    def encode(self, src: torch.Tensor) -> TransformerMemory:
        # src: (B, S)
        mask = src != PAD  # (B, S)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(self.src_embed, src)
        for layer in self.encoder_layers:
            x = layer(x, attn_mask)
        x = self.encoder_norm(x)
        cross_kv = [layer.cross_attn.keys_values(x) for layer in self.decoder_layers]
        return TransformerMemory(x, mask, cross_kv)

    def decode(self, tgt_in: torch.Tensor, memory: TransformerMemory) -> torch.Tensor:
        """Teacher-forced decoder over the whole target prefix: (B, T) -> logits (B, T, V)."""
        x = self._embed(self.tgt_embed, tgt_in)
        memory_mask = memory.mask[:, None, None, :]
        for layer, kv in zip(self.decoder_layers, memory.cross_kv):
            x, _, _ = layer(x, kv, memory_mask)
        return self.output(self.decoder_norm(x))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt_in, self.encode(src))  # (B, T, V)

    def init_state(self, memory: TransformerMemory, attention: AttentionChoice | None = None) -> TransformerState:
        """`attention`: keep these cross-attention weights at each step (state.attention)."""
        attention = self.resolve_attention(attention)
        B = memory.states.shape[0]
        # The dtype of the keys the decoder's projections make (bf16 under bf16 autocast, where the
        # encoder output is fp32), so that the growing cache is not promoted to fp32 at every step.
        empty = memory.cross_kv[0][0].new_zeros(B, self.heads, 0, self.dim // self.heads)  # (B, H, 0, Dh)
        return TransformerState([(empty, empty) for _ in self.decoder_layers], step=0, attention_choice=attention)

    def decode_step(
        self, prev_tokens: torch.Tensor, memory: TransformerMemory, state: TransformerState
    ) -> tuple[torch.Tensor, TransformerState]:
        # prev_tokens: (B,) -> log-probs of the next token (B, V)
        x = self._embed(self.tgt_embed, prev_tokens[:, None], offset=state.step)  # (B, 1, D)
        memory_mask = memory.mask[:, None, None, :]
        choice = state.attention_choice
        new_kv, attention = [], None
        for number, (layer, kv, past) in enumerate(zip(self.decoder_layers, memory.cross_kv, state.self_kv), 1):
            keep = choice is not None and number == choice.layer
            x, step_kv, weights = layer(x, kv, memory_mask, past_kv=past, cross_weights=keep)
            if keep:
                attention = chosen_weights(weights, choice)
            new_kv.append(step_kv)
        logits = self.output(self.decoder_norm(x[:, 0]))  # (B, V)
        return F.log_softmax(logits.float(), dim=-1), TransformerState(new_kv, state.step + 1, choice, attention)

    @staticmethod
    def static_memory(memory: TransformerMemory, rows: int, source_length: int) -> TransformerMemory:
        """Fixed-shape memory for `rows` sources of up to `source_length` tokens, which
        `load_static_memory` fills: what static_step reads (the mask and the cross-attention
        keys/values; no encoder states)."""
        k = memory.cross_kv[0][0]  # (B, H, S, Dh)
        shape = (rows, k.shape[1], source_length, k.shape[3])  # (C, H, S, Dh)
        return TransformerMemory(memory.states[:0], torch.ones(rows, source_length, dtype=torch.bool, device=k.device),
                                 [(k.new_zeros(shape), k.new_zeros(shape)) for _ in memory.cross_kv])

    @staticmethod
    def load_static_memory(buffers: TransformerMemory, memory: TransformerMemory) -> None:
        """Copy `memory` into the first rows and columns of `buffers` (from `static_memory`), the
        columns past its source masked."""
        rows, columns = memory.mask.shape
        buffers.mask[:rows].fill_(False)
        buffers.mask[:rows, :columns].copy_(memory.mask)
        for (k, v), (new_k, new_v) in zip(buffers.cross_kv, memory.cross_kv):
            k[:rows, :, :columns].copy_(new_k)
            v[:rows, :, :columns].copy_(new_v)

    def static_buffers(self, rows: int, length: int, memory: TransformerMemory) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zeroed self-attention buffers for `rows` outputs of up to `length` tokens, one pair per
        layer, of the type of `memory`'s keys (autocast's, where it runs)."""
        like = memory.cross_kv[0][0]
        self._embed_positions(length)
        shape = (rows, self.heads, length, self.dim // self.heads)  # (B, H, L, Dh)
        return [(like.new_zeros(shape), like.new_zeros(shape)) for _ in self.decoder_layers]

    def static_step(
        self, prev_tokens: torch.Tensor, memory: TransformerMemory, buffers: list[tuple[torch.Tensor, torch.Tensor]],
        position: torch.Tensor, attention: AttentionChoice | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`decode_step` with fixed shapes: the step's keys and values go into `buffers` (from
        `static_buffers`) at `position`, a (1,) device tensor, so that every step runs the same
        kernels on the same tensors, with nothing read back (a CUDA graph can replay it).
        `attention`: a resolved choice (see init_state). Returns log-probs (B, V) and the kept
        cross-attention weights (B, S) or None."""
        x = self.tgt_embed(prev_tokens[:, None]) * math.sqrt(self.dim) + self.positions.index_select(0, position)  # (B, 1, D)
        x = self.embed_dropout(x)
        length = buffers[0][0].shape[2]
        visible = (torch.arange(length, device=position.device) <= position)[None, None, None, :]  # (1, 1, 1, L)
        memory_mask = memory.mask[:, None, None, :]
        kept = None
        for number, (layer, kv, (keys, values)) in enumerate(zip(self.decoder_layers, memory.cross_kv, buffers), 1):
            keep = attention is not None and number == attention.layer
            x, _, weights = layer(x, kv, memory_mask, cross_weights=keep,
                                  static_cache=StaticCache(keys, values, position, visible))
            if keep:
                kept = chosen_weights(weights, attention)
        logits = self.output(self.decoder_norm(x[:, 0]))  # (B, V)
        return F.log_softmax(logits.float(), dim=-1), kept

    def resolve_attention(self, attention: AttentionChoice | None) -> AttentionChoice | None:
        """The choice with its layer filled in (default: the last); a ConfigError if it does not exist."""
        if attention is None:
            return None
        layers = len(self.decoder_layers)
        attention.check_exists(layers, self.heads)
        return AttentionChoice(attention.layer or layers, attention.head)
