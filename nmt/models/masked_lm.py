"""A masked language model (BERT; Devlin et al., 2019) made of the Transformer's encoder, for
pretraining on monolingual text (`nmt pretrain`).

Its shared parts carry the Transformer's parameter names (`src_embed`, `encoder_layers`,
`encoder_norm`), so that their weights initialise a translation model by name
(`nmt train --init`). Languages get no embedding of their own: the joint SentencePiece
vocabulary already tells them apart by their pieces, and the translation model has no language
input to match one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmt.config import ModelConfig
from nmt.models.dropout import Dropout
from nmt.models.transformer import ScaledEmbedding, encoder_layers, init_transformer_weights
from nmt.tokenizer import PAD


class MaskedLM(ScaledEmbedding, nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, next_sentence: bool = False):
        super().__init__()
        self.dim = cfg.embed_dim
        self.src_embed = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=PAD)
        # Sentence A / sentence B, added to the input for next-sentence prediction only.
        self.segment_embed = nn.Embedding(2, cfg.embed_dim) if next_sentence else None
        self.embed_dropout = Dropout(cfg.dropout)
        self.encoder_layers = encoder_layers(cfg)
        self.encoder_norm = nn.LayerNorm(cfg.embed_dim) if cfg.norm == "pre" else nn.Identity()
        # BERT's prediction head: a transform, then the embedding matrix (tied) plus a bias.
        self.mlm_transform = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.GELU(), nn.LayerNorm(cfg.embed_dim))
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.nsp_head = (
            nn.Sequential(nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.Tanh(), nn.Linear(cfg.embed_dim, 2))
            if next_sentence else None
        )
        self._add_positions()
        init_transformer_weights(self, [self.src_embed])

    @property
    def next_sentence(self) -> bool:
        return self.nsp_head is not None

    def encode(self, tokens: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        # tokens, segments: (B, S) -> hidden states (B, S, D)
        x = self._embed(self.src_embed, tokens)
        if self.segment_embed is not None and segments is not None:
            x = x + self.segment_embed(segments)
        attn_mask = (tokens != PAD)[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.encoder_layers:
            x = layer(x, attn_mask)
        return self.encoder_norm(x)

    def forward(
        self, tokens: torch.Tensor, segments: torch.Tensor | None = None, predict: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the tokens at the flat positions `predict` (N,) of the (B, S) batch, row-major
        (every position when `predict` is None: (B*S, V)); and next-sentence logits from [CLS]
        (B, 2), or None without that head."""
        hidden = self.encode(tokens, segments)  # (B, S, D)
        flat = hidden.reshape(-1, self.dim)  # (B*S, D)
        # Only the chosen positions go through the output layer: 15% of the work of all of them.
        # Positions, not a mask: a mask's selection waits for the GPU to learn its size.
        chosen = flat.index_select(0, predict) if predict is not None else flat  # (N, D)
        logits = F.linear(self.mlm_transform(chosen), self.src_embed.weight, self.mlm_bias)  # (N, V)
        nsp_logits = None
        if self.nsp_head is not None:
            nsp_logits = self.nsp_head(hidden[:, 0])  # (B, 2): position 0 holds [CLS]
        return logits, nsp_logits


def translation_weight_source(name: str, decoder: bool) -> str | None:
    """The masked-LM tensor that initialises the translation model's tensor `name`, or None.

    The encoder maps by name. The decoder (with `decoder`) takes the embeddings, and in each
    layer the self-attention, feed-forward and their norms of the encoder layer of the same
    number; its cross-attention (and the norm before it) has no counterpart and starts fresh.
    """
    first, _, rest = name.partition(".")
    if first in ("src_embed", "encoder_layers", "encoder_norm"):
        return name
    if not decoder:
        return None
    if first in ("tgt_embed", "output"):  # the masked LM's output layer is its embedding matrix
        return "src_embed.weight"
    if first == "decoder_norm":
        return f"encoder_norm.{rest}"
    if first == "decoder_layers":
        number, _, tail = rest.partition(".")
        part, _, leaf = tail.partition(".")
        counterpart = {"self_attn": "self_attn", "ff": "ff", "norm1": "norm1", "norm3": "norm2"}.get(part)
        if counterpart is not None:
            return f"encoder_layers.{number}.{counterpart}.{leaf}"
    return None
