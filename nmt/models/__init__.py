"""Translation models. Every model has the same interface, which training and search use:

- `encode(src) -> memory`: src (B, S) token ids, padded with PAD;
- `init_state(memory, attention=None) -> state`: the decoder state before the first target token;
  with an `AttentionChoice`, each step also leaves its cross-attention weights in `state.attention` (B, S);
- `decode_step(prev_tokens, memory, state) -> (log_probs, state)`: prev_tokens (B,), log_probs (B, V);
- `decode(tgt_in, memory) -> logits`: the teacher-forced decoder, tgt_in (B, T), logits (B, T, V);
- `forward(src, tgt_in) -> logits`: `decode(tgt_in, encode(src))`.

Memory and state are explicit objects with `reorder(indices)`, which selects (and repeats)
batch rows, as beam search needs.
"""

from torch import nn

from nmt.config import ModelConfig
from nmt.errors import ConfigError
from nmt.models.rnn import RNNSeq2Seq
from nmt.models.transformer import Transformer


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> nn.Module:
    if cfg.share_embeddings and src_vocab_size != tgt_vocab_size:
        raise ConfigError("model.share_embeddings needs a joint vocabulary (nmt prepare --joint-vocab)")
    if cfg.arch == "transformer":
        return Transformer(cfg, src_vocab_size, tgt_vocab_size)
    if cfg.arch == "rnn":
        return RNNSeq2Seq(cfg, src_vocab_size, tgt_vocab_size)
    raise ConfigError(f"unknown model.arch {cfg.arch!r}")
