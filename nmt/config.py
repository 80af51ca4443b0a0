"""Typed configuration: dataclasses loaded from YAML, with `section.key=value` overrides.

Unknown keys and values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nmt.atomic import write_text_atomic
from nmt.errors import ConfigError


@dataclass
class ModelConfig:
    arch: str = "transformer"  # "transformer" or "rnn"
    embed_dim: int = 256  # Transformer: d_model. RNN: word embedding size.
    enc_layers: int = 3
    dec_layers: int = 3
    dropout: float = 0.1
    share_embeddings: bool = False  # one matrix for source and target embeddings (joint vocab only)
    tie_output: bool = True  # output projection uses the decoder's embedding matrix
    # Transformer
    heads: int = 4
    ff_dim: int = 1024
    norm: str = "pre"  # "pre" (LayerNorm before each sublayer) or "post" (original paper)
    attn_dropout: float = 0.0
    # This encoder layer (1-based) adds no residual connection around its self-attention, so the
    # encoder's output keeps less of each source position's own token (and language): proposed for
    # zero-shot directions of multilingual models (Liu et al., 2021); 0: every layer has it.
    enc_no_residual_layer: int = 0
    # RNN-attention
    cell: str = "lstm"  # "rnn" (tanh), "gru" or "lstm"
    hidden_dim: int = 512  # encoder output size (both directions together) and decoder state size
    attention: str = "additive"  # "additive" (Bahdanau), "dot" or "general" (Luong)
    input_feeding: bool = True

    def validate(self) -> None:
        _choice("model.arch", self.arch, ("transformer", "rnn"))
        _choice("model.norm", self.norm, ("pre", "post"))
        _choice("model.cell", self.cell, ("rnn", "gru", "lstm"))
        _choice("model.attention", self.attention, ("additive", "dot", "general"))
        for name in ("embed_dim", "enc_layers", "dec_layers", "heads", "ff_dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1)")
        if self.arch == "transformer" and self.embed_dim % self.heads:
            raise ConfigError("model.embed_dim must be divisible by model.heads")
        if not 0 <= self.enc_no_residual_layer <= self.enc_layers:
            raise ConfigError(f"model.enc_no_residual_layer must be between 0 (none) and model.enc_layers ({self.enc_layers})")
        if self.arch != "transformer" and self.enc_no_residual_layer:
            raise ConfigError("model.enc_no_residual_layer is for Transformers only")
        if self.arch == "rnn":
            if self.hidden_dim % 2:
                raise ConfigError("model.hidden_dim must be even (the encoder is bidirectional)")
            if self.tie_output and self.embed_dim != self.hidden_dim:
                raise ConfigError(
                    "model.tie_output needs model.embed_dim == model.hidden_dim for the RNN; "
                    "set model.tie_output=false"
                )


# The settings of how translation alone trains (nmt train): nmt pretrain refuses them set. (Those
# of its validation, which a config shared by both commands may hold, it leaves.)
TRANSLATION_ONLY = {"translation_only": True}


@dataclass
class TrainConfig:
    batch_tokens: int = 4096  # padded tokens per batch: sentences × longest side
    accum_steps: int = 1  # batches whose gradients add up to one update
    lr: float = 5e-4  # peak learning rate, reached after warmup_steps
    warmup_steps: int = 4000
    # After the warmup: "inverse_sqrt" (lr·sqrt(warmup/step), open-ended), or "linear" or "cosine"
    # decay that reaches min_lr at max_steps (a budget in updates is then required).
    lr_schedule: str = "inverse_sqrt"
    min_lr: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # 0 turns clipping off
    label_smoothing: float = 0.1
    word_dropout: float = field(default=0.0, metadata=TRANSLATION_ONLY)  # share of the source tokens replaced by <unk>
    # A multilingual data dir: each direction's share of an epoch ∝ size^(1/T); 0: the data dir's
    # temperature (nmt prepare --lang-temperature)
    lang_temperature: float = field(default=0.0, metadata=TRANSLATION_ONLY)
    # A multilingual data dir: each direction's share multiplied by its weight here (1 if not
    # named) before the shares are normalized, e.g. {en-cs: 2.0} to train one direction more.
    direction_weights: dict[str, float] = field(default_factory=dict, metadata=TRANSLATION_ONLY)
    max_steps: int = 0  # 0: no limit
    max_epochs: int = 0  # 0: no limit
    max_minutes: float = 0.0  # wall-clock training budget; 0: no limit
    valid_every: int = 1000  # updates between validations
    valid_max_sentences: int = 0  # dev sentences decoded for BLEU; 0: all
    valid_beam: int = 1
    patience: int = 0  # validations without a better dev BLEU before stopping; 0: off
    target_bleu: float = 0.0  # stop once the dev BLEU reaches this; 0: off
    max_skipped_updates: int = 20  # stop after this many updates in a row skipped (non-finite loss, out of memory); 0: never
    log_every: int = 100
    # Besides best/ and last/: keep the weights of the last N validations and of the N best
    # (checkpoints/step-NNNNNNN/), for `nmt average`; 0: none.
    keep_last: int = 0
    keep_best: int = 0
    # An exponential moving average of the weights, moved 1 - ema_decay of the way to the trained
    # ones after each update: validation, best/, last/ and the kept checkpoints hold it; 0: off.
    ema_decay: float = 0.0
    tensorboard: bool = True  # also log to save_dir/tensorboard when the tensorboard package is installed
    seed: int = 1
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # "auto" (bf16 on GPUs that have it, else fp16; fp32 on CPU), "bf16", "fp16", "fp32"
    threads: int = 0  # CPU threads for torch; 0: torch's default
    compile: bool = False  # torch.compile the training forward pass (falls back to eager if it fails)
    # Start from a pretrained masked LM (a checkpoint dir of `nmt pretrain`): its encoder, and
    # with init_decoder its embeddings, self-attention and feed-forward weights in the decoder.
    # Or fine-tune a translation model (a checkpoint dir of `nmt train`): every weight of its
    # best/, with a fresh optimizer and schedule from update 0.
    init: str = field(default="", metadata=TRANSLATION_ONLY)
    init_decoder: bool = field(default=True, metadata=TRANSLATION_ONLY)
    freeze_init_steps: int = field(default=0, metadata=TRANSLATION_ONLY)  # the loaded weights stay fixed for this many updates

    def validate(self) -> None:
        _choice("train.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        _choice("train.lr_schedule", self.lr_schedule, ("inverse_sqrt", "linear", "cosine"))
        if self.lr_schedule != "inverse_sqrt" and self.max_steps <= self.warmup_steps:
            raise ConfigError(f"train.lr_schedule {self.lr_schedule} decays to train.min_lr at train.max_steps, "
                              "which must be set above train.warmup_steps")
        for name in ("warmup_steps", "min_lr", "weight_decay", "clip_norm", "max_steps", "max_epochs", "max_minutes",
                     "valid_max_sentences", "patience", "target_bleu", "max_skipped_updates", "keep_last", "keep_best",
                     "threads", "freeze_init_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be 0 or more (got {getattr(self, name)!r})")
        for name in ("batch_tokens", "accum_steps", "valid_every", "log_every", "valid_beam"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1")
        _in_range("train.valid_beam", self.valid_beam, 1, MAX_BEAM)  # as decode.beam
        _in_range("train.threads", self.threads, 0, MAX_THREADS)  # torch's thread pool fails far beyond
        if self.lr <= 0:
            raise ConfigError("train.lr must be positive")
        if self.min_lr > self.lr:  # the schedule would rise after its warmup instead of decaying
            raise ConfigError(f"train.min_lr must be at most train.lr (got {self.min_lr:g} and {self.lr:g})")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"train.seed must be in [0, 2**32) (got {self.seed})")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1) (got {self.betas!r})")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("train.label_smoothing must be in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("train.ema_decay must be in [0, 1) (0: off)")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ConfigError("train.word_dropout must be in [0, 1)")
        if self.lang_temperature:  # 0: the data dir's
            _in_range("train.lang_temperature", self.lang_temperature, *LANG_TEMPERATURES)
        for direction, weight in self.direction_weights.items():
            if not weight > 0 or not math.isfinite(weight):
                raise ConfigError(f"train.direction_weights.{direction} must be a positive number (got {weight!r})")


# The decode settings that only sampling uses, and those of beam search that sampling does not:
# `nmt translate` refuses them given with the other kind of decoding.
SAMPLING_ONLY = {"sampling_only": True}
SEARCH_ONLY = {"search_only": True}


@dataclass
class DecodeConfig:
    beam: int = field(default=5, metadata=SEARCH_ONLY)
    len_penalty: float = field(default=1.0, metadata=SEARCH_ONLY)  # hypothesis score = log-prob / length**len_penalty
    max_len_a: float = 1.5  # longest output = a * source length + b
    max_len_b: int = 10
    nbest: int = 1
    batch_tokens: int = 6000  # source tokens per decoding batch
    max_input_tokens: int = 1024  # longer inputs are truncated with a warning
    # Arithmetic of the search: "fp32", or "bf16"/"fp16" autocast (matrix products in half
    # precision, normalizations and the output's log-softmax in fp32); for GPUs.
    precision: str = "fp32"
    no_repeat_ngram: int = 0  # no n-gram of this size occurs twice in an output; 0: off
    # A multilingual model: output only the pieces its training targets in the target language
    # use, so that a zero-shot direction cannot drift into another language's words.
    restrict_vocab: bool = False
    # Transformers: decode on fixed-shape buffers (keys/values written in place), each step a
    # replayed CUDA graph on a GPU; the same output as without. Other models ignore it (an
    # ensemble's Transformers take it).
    static_cache: bool = False
    # A given prefix is the whole translation (EOS is forced after it): its score and attention.
    prefix_only: bool = False
    # Sampling instead of beam search: each token drawn from the model's distribution at
    # 1/temperature, cut to the topk most probable (0: all) and to the smallest set reaching
    # topp; nbest gives that many samples per line. The same seed draws the same samples.
    sampling: bool = False
    topk: int = field(default=0, metadata=SAMPLING_ONLY)
    topp: float = field(default=1.0, metadata=SAMPLING_ONLY)
    temperature: float = field(default=1.0, metadata=SAMPLING_ONLY)
    seed: int = field(default=1, metadata=SAMPLING_ONLY)
    chunk_lines: int = 10000  # a file is read, sorted and translated this many lines at a time

    def validate(self) -> None:
        """Also the values of `nmt translate`'s options, which come here without `_coerce`."""
        _choice("decode.precision", self.precision, ("fp32", "bf16", "fp16"))
        _in_range("decode.beam", self.beam, 1, MAX_BEAM)
        if self.nbest < 1 or (not self.sampling and self.nbest > self.beam):
            raise ConfigError("decode.nbest must be between 1 and decode.beam (any number of samples with decode.sampling)")
        _in_range("decode.nbest", self.nbest, 1, MAX_BEAM)
        for name in ("batch_tokens", "max_input_tokens", "chunk_lines"):
            _in_range(f"decode.{name}", getattr(self, name), 1, 2**31)
        for name in ("no_repeat_ngram", "topk"):  # 0: off
            _in_range(f"decode.{name}", getattr(self, name), 0, 2**31)
        _in_range("decode.len_penalty", self.len_penalty, -MAX_LEN_PENALTY, MAX_LEN_PENALTY)
        _in_range("decode.max_len_a", self.max_len_a, 0, MAX_LEN_A)
        _in_range("decode.max_len_b", self.max_len_b, 0, MAX_LEN_B)
        if not 0.0 < self.topp <= 1.0:
            raise ConfigError(f"decode.topp must be in (0, 1] (got {self.topp!r})")
        # Beyond these, log-probabilities over the temperature leave float32's range.
        _in_range("decode.temperature", self.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
        _in_range("decode.seed", self.seed, -(2**63), 2**64 - 1)  # taken modulo 2**32 (`sampling_generator`)


@dataclass
class PretrainConfig:
    """Masked-LM pretraining (`nmt pretrain`); translation training ignores this section."""

    mask_prob: float = 0.15  # share of the (non-special) tokens chosen for prediction
    mask_token_prob: float = 0.8  # of the chosen: replaced by [MASK] ...
    random_token_prob: float = 0.1  # ... by a random token; the rest stay as they are
    next_sentence: bool = False  # also predict whether sentence B follows sentence A
    valid_sentences: int = 1000  # held out for masked accuracy and perplexity
    max_tokens: int = 256  # longer sentences are cut to this many pieces

    def validate(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError("pretrain.mask_prob must be in (0, 1)")
        if not (0.0 <= self.mask_token_prob and 0.0 <= self.random_token_prob
                and self.mask_token_prob + self.random_token_prob <= 1.0):
            raise ConfigError("pretrain.mask_token_prob and pretrain.random_token_prob must be at least 0 and add up to at most 1")
        if self.valid_sentences < 1 or self.max_tokens < 2:
            raise ConfigError("pretrain.valid_sentences must be at least 1 and pretrain.max_tokens at least 2")


@dataclass
class Config:
    data_dir: str = ""  # output of `nmt prepare`
    save_dir: str = ""  # checkpoint directory
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        self.decode.validate()
        self.pretrain.validate()


# Upper limits of decoding settings: far beyond any use, and within what the search's tensors hold.
MAX_BEAM = 1000
MAX_THREADS = 1024
MAX_LEN_A, MAX_LEN_B = 1000.0, 100_000
MAX_LEN_PENALTY = 100.0
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3
# Language sampling temperatures: beyond them, size^(1/T) leaves float64's range.
LANG_TEMPERATURES = (0.01, 1000.0)


def _in_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:  # NaN is never in range
        raise ConfigError(f"{key} must be between {low} and {high} (got {value!r})")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)} (got {value!r})")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's type hint; ints (and 3e-4 written without a dot) are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list (got {value!r})")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        key_hint, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (got {value!r})")
        return {_coerce(f"{key}: the key {k!r}", k, key_hint): _coerce(f"{key}.{k}", v, item) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (got {value!r})")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer (got {value!r})")
        if not -(2**63) <= value < 2**64:
            raise ConfigError(f"{key} is too large (got {value})")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number (got {value!r})")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number (got {value!r})")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (got {value!r})")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}'")
    values = {}
    for name in known:
        if name not in data:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _from_dict(hint, {} if data[name] is None else data[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(f"{prefix}{name}", data[name], hint)
    return cls(**values)


def config_from_dict(data: dict) -> Config:
    config = _from_dict(Config, data)
    config.validate()
    return config


def saved_config_from_dict(data: dict) -> Config:
    """The config a checkpoint was trained with: what rebuilding and decoding need is checked
    (model, decode); its training settings were checked by the version that trained it, whose
    ranges may differ from this one's."""
    config = _from_dict(Config, data)
    config.model.validate()
    config.decode.validate()
    return config


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to a config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or a section left empty in the YAML file (`train:`)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the last would win unseen)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, which the base class expands
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (line {key_node.start_mark.line + 1})", key_node.start_mark)
            keys.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a safe loader
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a YAML file (not UTF-8 text)") from None
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping")
    return config_from_dict(apply_overrides(data, overrides or []))


def save_config(config: Config, path: Path) -> None:
    write_text_atomic(Path(path), yaml.safe_dump(config_to_dict(config), sort_keys=False))
