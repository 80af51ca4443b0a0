"""RNN encoder-decoder with attention: a bidirectional encoder (tanh RNN, GRU or LSTM) and a
decoder that attends over the encoder states at every step, with optional input feeding
(Luong et al., 2015: the previous attentional vector is fed back as input)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from nmt.config import ModelConfig
from nmt.devices import cpu_multiplies_natively
from nmt.models.attention import AttentionChoice, rnn_attention
from nmt.models.dropout import Dropout
from nmt.tokenizer import PAD


@dataclass
class RNNMemory:
    states: torch.Tensor  # (B, S, D) encoder output, keys and values of the attention
    mask: torch.Tensor  # (B, S) True at real source tokens
    projected_keys: torch.Tensor  # (B, S, D) the attention's key projection, computed once

    def reorder(self, indices: torch.Tensor) -> RNNMemory:
        return RNNMemory(
            self.states.index_select(0, indices),
            self.mask.index_select(0, indices),
            self.projected_keys.index_select(0, indices),
        )


@dataclass
class RNNState:
    hidden: torch.Tensor  # (L, B, D) decoder hidden state per layer
    cell: torch.Tensor | None  # (L, B, D) LSTM cell state; None for RNN and GRU
    att_vec: torch.Tensor  # (B, D) last attentional vector, fed back when input feeding
    keep_attention: bool = False  # keep each step's attention weights in `attention`
    attention: torch.Tensor | None = None  # (B, S) the attention weights of the last step

    def reorder(self, indices: torch.Tensor) -> RNNState:
        return RNNState(
            self.hidden.index_select(1, indices),
            None if self.cell is None else self.cell.index_select(1, indices),
            self.att_vec.index_select(0, indices),
            self.keep_attention,
            None if self.attention is None else self.attention.index_select(0, indices),
        )


def _rnn_class(cell: str) -> type[nn.RNNBase]:
    return {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell]


HiddenState = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


def _run_recurrent(layer: nn.RNNBase, x: torch.Tensor | PackedSequence, hx: HiddenState = None):
    """`layer(x, hx)` as autocast runs it, except on a CPU without instructions for autocast's
    half-precision type: there oneDNN can't build a bf16 LSTM for most shapes ("could not create
    a primitive descriptor"), and emulated bf16 would be slower than fp32 anyway, so the
    recurrence runs in fp32 and returns fp32 states."""
    device = x.data.device if isinstance(x, PackedSequence) else x.device
    if (device.type != "cpu" or not torch.is_autocast_enabled("cpu")
            or cpu_multiplies_natively(torch.get_autocast_dtype("cpu"))):
        return layer(x, hx)
    if hx is not None:
        hx = tuple(h.float() for h in hx) if isinstance(hx, tuple) else hx.float()
    with torch.autocast("cpu", enabled=False):
        return layer(x.float(), hx)


class RNNSeq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int):
        super().__init__()
        E, D = cfg.embed_dim, cfg.hidden_dim
        self.hidden_dim = D
        self.dec_layers = cfg.dec_layers
        self.is_lstm = cfg.cell == "lstm"
        self.input_feeding = cfg.input_feeding
        rnn = _rnn_class(cfg.cell)
        self.src_embed = nn.Embedding(src_vocab_size, E, padding_idx=PAD)
        self.tgt_embed = self.src_embed if cfg.share_embeddings else nn.Embedding(tgt_vocab_size, E, padding_idx=PAD)
        self.dropout = Dropout(cfg.dropout)
        # Each direction has D/2 units, so encoder states have the decoder's size D.
        self.encoder = rnn(
            E, D // 2, num_layers=cfg.enc_layers, bidirectional=True, batch_first=True,
            dropout=cfg.dropout if cfg.enc_layers > 1 else 0.0,
        )
        self.bridge = nn.Linear(D, cfg.dec_layers * D)  # mean encoder state -> initial decoder state
        self.decoder = rnn(
            E + (D if cfg.input_feeding else 0), D, num_layers=cfg.dec_layers, batch_first=True,
            dropout=cfg.dropout if cfg.dec_layers > 1 else 0.0,
        )
        self.attention = rnn_attention(cfg.attention, D)
        self.combine = nn.Linear(2 * D, D)  # attentional vector = tanh(W [state; context])
        self.output = nn.Linear(D, tgt_vocab_size, bias=False)
        if cfg.tie_output:
            self.output.weight = self.tgt_embed.weight

    def encode(self, src: torch.Tensor) -> RNNMemory:
        # src: (B, S)
        mask = src != PAD  # (B, S)
        x = self.dropout(self.src_embed(src))  # (B, S, E)
        packed = pack_padded_sequence(x, mask.sum(1).cpu(), batch_first=True, enforce_sorted=False)
        states, _ = _run_recurrent(self.encoder, packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=src.shape[1])  # (B, S, D)
        return RNNMemory(states, mask, self.attention.project_keys(states))

    def init_state(self, memory: RNNMemory, attention: AttentionChoice | None = None) -> RNNState:
        """`attention`: keep the attention weights of each step (state.attention)."""
        if attention is not None:
            attention.check_exists(None, None)
        B = memory.states.shape[0]
        weights = memory.mask.to(memory.states.dtype)[:, :, None]  # (B, S, 1)
        mean = (memory.states * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)
        hidden = torch.tanh(self.bridge(mean)).view(B, self.dec_layers, self.hidden_dim)
        hidden = hidden.transpose(0, 1).contiguous()  # (L, B, D)
        cell = torch.zeros_like(hidden) if self.is_lstm else None  # same dtype as hidden
        return RNNState(hidden, cell, memory.states.new_zeros(B, self.hidden_dim), attention is not None)

    def _attentional(self, dec_out: torch.Tensor, memory: RNNMemory) -> tuple[torch.Tensor, torch.Tensor]:
        # dec_out: (B, T, D) -> attentional vectors (B, T, D), attention weights (B, T, S)
        context, weights = self.attention(dec_out, memory.states, memory.projected_keys, memory.mask)
        return torch.tanh(self.combine(torch.cat([dec_out, context], dim=-1))), weights

    def _step(self, embedded: torch.Tensor, memory: RNNMemory, state: RNNState) -> RNNState:
        # embedded: (B, E) previous target word
        x = torch.cat([embedded, state.att_vec], dim=-1) if self.input_feeding else embedded
        hx = (state.hidden, state.cell) if self.is_lstm else state.hidden
        # Under autocast the state may be bf16/fp16 while embeddings stay fp32: the recurrent
        # layer needs input and state in one dtype.
        dec_out, hx = _run_recurrent(self.decoder, x[:, None, :].to(state.hidden.dtype), hx)  # (B, 1, D)
        hidden, cell = hx if self.is_lstm else (hx, None)
        att_vec, weights = self._attentional(dec_out, memory)  # (B, 1, D), (B, 1, S)
        attention = weights[:, 0] if state.keep_attention else None
        return RNNState(hidden, cell, att_vec[:, 0], state.keep_attention, attention)

    def decode(self, tgt_in: torch.Tensor, memory: RNNMemory) -> torch.Tensor:
        """Teacher-forced decoder: (B, T) -> logits (B, T, V)."""
        state = self.init_state(memory)
        embedded = self.dropout(self.tgt_embed(tgt_in))  # (B, T, E)
        if self.input_feeding:  # each step needs the previous attentional vector: step by step
            att_vecs = []
            for t in range(tgt_in.shape[1]):
                state = self._step(embedded[:, t], memory, state)
                att_vecs.append(state.att_vec)
            att_vec = torch.stack(att_vecs, dim=1)  # (B, T, D)
        else:  # the recurrence runs over the whole target at once, attention after it
            hx = (state.hidden, state.cell) if self.is_lstm else state.hidden
            dec_out, _ = _run_recurrent(self.decoder, embedded.to(state.hidden.dtype), hx)  # (B, T, D)
            att_vec, _ = self._attentional(dec_out, memory)
        return self.output(self.dropout(att_vec))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt_in, self.encode(src))  # (B, T, V)

    def decode_step(
        self, prev_tokens: torch.Tensor, memory: RNNMemory, state: RNNState
    ) -> tuple[torch.Tensor, RNNState]:
        # prev_tokens: (B,) -> log-probs of the next token (B, V)
        state = self._step(self.dropout(self.tgt_embed(prev_tokens)), memory, state)
        logits = self.output(self.dropout(state.att_vec))  # (B, V)
        return F.log_softmax(logits.float(), dim=-1), state
