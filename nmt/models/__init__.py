"""Translation models. Every model has the interface `nmt.interfaces.TranslationModel`, which
training and search use: `encode(src) -> memory`, `init_state(memory, attention=None)`,
`decode_step(prev_tokens, memory, state) -> (log_probs, state)`, `decode(tgt_in, memory)` and
`forward(src, tgt_in)`; memory and state are explicit objects with `reorder(indices)`.
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
