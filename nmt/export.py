"""`nmt export --format ctranslate2`: a trained Transformer as a CTranslate2 model directory that
translates on its own, and the translator of `nmt translate --engine ctranslate2` that reads it.

    OUT/
      model.bin, config.json, *vocabulary.json   the CTranslate2 model (ctranslate2.Translator reads it)
      spm.*.model                                the SentencePiece model(s)
      nmt_export.json                            what else translating needs: languages, the
                                                 normalization of each side, decode defaults, the
                                                 model's description, the weights' origin

CTranslate2 runs the same network; where its search differs from this library's, and what that
changes, is told in `CTranslate2Translator`.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nmt.alignment import describe_attention
from nmt.atomic import check_replaceable, replace_dir, temporary_beside
from nmt.batches import pad_source
from nmt.checkpoint import load_for_inference, read_config, weights_dir
from nmt.config import DecodeConfig, ModelConfig
from nmt.devices import cpu_flags
from nmt.errors import CheckpointError, ConfigError, first_line
from nmt.files import CheckpointInfo, ExportRecord, VocabInfo
from nmt.models.attention import AttentionChoice
from nmt.models.transformer import Transformer, sinusoidal_positions
from nmt.normalize import Normalization
from nmt.paths import followed_link, nested
from nmt.search import NEW_WORD, Hypothesis, length_norm, max_lengths
from nmt.shards import worker_count
from nmt.tokenizer import BOS, EOS, PAD, UNK, Tokenizer, check_recorded_model
from nmt.translate import (
    ANY_LANGUAGE,
    LanguageChoice,
    Translations,
    collect_translations,
    decode_settings,
    encode_lines,
    lines_too_long,
    restricting_one_language,
    with_languages,
)

FORMATS = ("ctranslate2",)
QUANTIZATIONS = ("int8", "int8_float16", "float16")  # none: float32
MIN_POSITIONS = 1024
IMPOSSIBLE_SCORE = -1e9  # CTranslate2's hypotheses that could not end score about -1e10 / length
# Sentences per CTranslate2 batch. On a CPU each core runs a worker of its own (one thread
# each), decoding batches side by side: for beam search of small models this beat one worker
# with a thread per core by 1.7x on 2 cores (test_2016_flickr, int8, beam 5).
CT2_BATCH_SENTENCES = 32
# The largest magnitude of an exported int8 weight: 7 bits, not 8. On x86 CPUs without VNNI the
# int8 matrix products (oneDNN's, which CTranslate2 runs on AMD CPUs) multiply unsigned 8-bit
# activations (0..255) by the signed weights and add each pair of products in 16 bits:
# 2 * 255 * 127 overflows 32,767, 2 * 255 * 63 does not. A 2-layer test model (d_model 32) gave
# float32's greedy output on 270 of 300 lines with 8-bit weights where oneDNN used VNNI (AVX-512
# EPYC) and on 31 with oneDNN held to AVX2; with 7-bit weights on 255 in both (ONNX Runtime's
# `reduce_range` and NNCF's saturation fix make the same trade).
INT8_WEIGHT_RANGE = 63


# ---------------------------------------------------------------------------------------------
# Export


def export_model(
    model_dir: Path, out_dir: Path, format: str = "ctranslate2", quantization: str | None = None,
    checkpoint: str = "best", overwrite: bool = False,
) -> ExportRecord:
    """Write `out_dir`: the Transformer of checkpoint directory `model_dir` as a CTranslate2
    model, with what translating needs besides (see the module's docstring). The directory is
    written beside `out_dir` and renamed when complete; an existing one is replaced only with
    `overwrite`."""
    model_dir, out_dir = Path(model_dir), followed_link(Path(out_dir))
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    if quantization not in (None, *QUANTIZATIONS):
        raise ConfigError(f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    config = read_config(model_dir)
    if config.model.arch != "transformer":
        raise ConfigError(f"{model_dir} holds an {config.model.arch} model; CTranslate2 has no RNN decoder, "
                          "so only Transformers export (translate it with --engine nmt)")
    if config.model.enc_no_residual_layer:
        raise ConfigError(f"{model_dir}'s encoder layer {config.model.enc_no_residual_layer} has no residual connection "
                          "around its self-attention, which CTranslate2's Transformer has (translate it with --engine nmt)")
    _check_out_dir(model_dir, out_dir, overwrite)
    vocab_info = VocabInfo.read(model_dir)
    weights = weights_dir(model_dir, checkpoint)
    model, tokenizer, config = load_for_inference(model_dir, checkpoint, "cpu")
    positions = position_rows(config.decode)
    spec = transformer_spec(model, config.model, tokenizer, positions)
    record = ExportRecord(
        format=format,
        languages={"source": vocab_info.src_lang or "", "target": vocab_info.tgt_lang or ""},
        sentencepiece={"source": vocab_info.vocab.src_model, "target": vocab_info.vocab.tgt_model},
        sentencepiece_sha256={"source": vocab_info.vocab.src_sha256, "target": vocab_info.vocab.tgt_sha256},
        normalization=vocab_info.normalization,
        decode=dataclasses.asdict(config.decode),
        model=dataclasses.asdict(config.model),
        quantization=quantization,
        checkpoint=str(weights),
        checkpoint_asked=checkpoint,
        step=CheckpointInfo.read(weights).state.step,
        max_positions=positions,
        attention=describe_attention(config.model, AttentionChoice()),
        directions=list(vocab_info.directions),
        int8_weight_range=INT8_WEIGHT_RANGE,
    )
    _write_export(model_dir, out_dir, spec, record)
    return record


def position_rows(decode: DecodeConfig) -> int:
    """Rows of the exported position tables: room for the longest source the checkpoint's decode
    settings let through (max_input_tokens + EOS) and for the longest output they allow it."""
    longest_output = decoding_limits([[UNK] * decode.max_input_tokens], [[]], decode)[0]
    return max(MIN_POSITIONS, decode.max_input_tokens + 1, longest_output)


def _check_out_dir(model_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse an `out_dir` whose replacing would lose a model or anything but an earlier export."""
    if nested(out_dir, model_dir):
        raise ConfigError(f"{out_dir} is {model_dir}, inside it or holds it: export to another directory")
    check_replaceable(out_dir, overwrite, ExportRecord.NAME, "an export", ConfigError)


def _write_export(model_dir: Path, out_dir: Path, spec, record: ExportRecord) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(out_dir)
    try:
        tmp.mkdir()
        spec.validate()
        quantize_spec(spec, record.quantization, record.int8_weight_range)
        spec.save(str(tmp))
        for name in sorted(set(record.sentencepiece.values())) + ([VocabInfo.NAME] if record.directions else []):
            shutil.copyfile(model_dir / name, tmp / name)
        record.write(tmp)
        replace_dir(tmp, out_dir)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not write {out_dir}: {first_line(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantize_spec(spec, quantization: str | None, weight_range: int) -> None:
    """`spec.optimize(quantization)`, with int8 weights scaled to `weight_range` (see INT8_WEIGHT_RANGE)."""
    int8 = (quantization or "").startswith("int8")
    floats = {name: np.array(value.numpy(), dtype=np.float32) for name, value in spec.variables().items()} if int8 else {}
    spec.optimize(quantization=quantization)
    if int8:
        requantize_int8(spec, floats, weight_range)


def requantize_int8(spec, floats: dict[str, np.ndarray], weight_range: int) -> None:
    """Quantize again, from their float32 values `floats`, the weights that `spec.optimize` made
    int8 (scale 127 / max |row|), with `weight_range` in place of 127."""
    from ctranslate2.specs.model_spec import NumpyVariable, index_spec

    for name, value in spec.variables().items():
        scope, _, key = name.rpartition("/")
        layer = index_spec(spec, scope)
        if isinstance(value, str) or value.dtype != "int8" or not hasattr(layer, f"{key}_scale"):
            continue  # an alias of another variable, or not quantized
        weight = floats[name]  # (out, in)
        row_max = np.abs(weight).max(axis=1)
        row_max[row_max == 0] = weight_range  # an all-zero row: scale 1
        scale = (weight_range / row_max).astype(np.float32)  # (out,)
        setattr(layer, key, NumpyVariable(np.rint(weight * scale[:, None]).astype(np.int8)))
        setattr(layer, f"{key}_scale", NumpyVariable(scale.astype(getattr(layer, f"{key}_scale").dtype)))


def int8_sums_can_overflow() -> bool:
    """Whether this is an x86 CPU without VNNI instructions (read from /proc/cpuinfo; False where
    that can't be read): its int8 matrix products can overflow with 8-bit weights (see
    INT8_WEIGHT_RANGE)."""
    flags = cpu_flags()
    return "sse2" in flags and not {"avx512_vnni", "avx_vnni"} & flags


def transformer_spec(model: Transformer, cfg: ModelConfig, tokenizer: Tokenizer, positions: int):
    """The `ctranslate2.specs.TransformerSpec` of `model`: the same weights in CTranslate2's
    layout, with its SentencePiece vocabularies and special tokens. CTranslate2 returns the
    cross-attention of the last decoder layer, averaged over all its heads (alignment_heads=0),
    which is what `nmt translate --attention` shows by default."""
    from ctranslate2.specs import TransformerSpec

    spec = TransformerSpec.from_config((cfg.enc_layers, cfg.dec_layers), cfg.heads, pre_norm=cfg.norm == "pre",
                                       alignment_layer=-1, alignment_heads=0)
    # nmt's table interleaves sin and cos (PE[:, 0::2] = sin, PE[:, 1::2] = cos); CTranslate2's
    # built-in one concatenates them, so the table is written out.
    table = _array(sinusoidal_positions(positions, cfg.embed_dim))  # (positions, D)
    _set_encoder(spec.encoder, model, table)
    _set_decoder(spec.decoder, model, table)
    spec.register_source_vocabulary(_pieces(tokenizer.src))
    spec.register_target_vocabulary(_pieces(tokenizer.tgt))
    _set_special_tokens(spec.config, tokenizer)
    spec.config.layer_norm_epsilon = model.encoder_layers[0].norm1.eps
    return spec


def _array(tensor: torch.Tensor) -> np.ndarray:
    # A copy: quantizing the spec scales its arrays in place, and these would be the model's own.
    return tensor.detach().to("cpu", torch.float32).numpy().copy()


def _set_linear(spec, linear: torch.nn.Linear) -> None:
    spec.weight = _array(linear.weight)  # (out, in), as CTranslate2 stores it
    if linear.bias is not None:
        spec.bias = _array(linear.bias)


def _set_fused(spec, linears: Sequence[torch.nn.Linear]) -> None:
    """One projection whose output is the outputs of `linears` one after the other."""
    spec.weight = np.concatenate([_array(linear.weight) for linear in linears])  # (n·out, in)
    spec.bias = np.concatenate([_array(linear.bias) for linear in linears])


def _set_layer_norm(spec, norm: torch.nn.LayerNorm) -> None:
    spec.gamma = _array(norm.weight)
    spec.beta = _array(norm.bias)


def _set_self_attention(spec, attention, norm: torch.nn.LayerNorm) -> None:
    _set_fused(spec.linear[0], [attention.q_proj, attention.k_proj, attention.v_proj])
    _set_linear(spec.linear[1], attention.out_proj)
    _set_layer_norm(spec.layer_norm, norm)  # before the sublayer (pre-norm) or after its residual sum (post-norm)


def _set_cross_attention(spec, attention, norm: torch.nn.LayerNorm) -> None:
    _set_linear(spec.linear[0], attention.q_proj)
    _set_fused(spec.linear[1], [attention.k_proj, attention.v_proj])  # of the encoder output
    _set_linear(spec.linear[2], attention.out_proj)
    _set_layer_norm(spec.layer_norm, norm)


def _set_feed_forward(spec, ff, norm: torch.nn.LayerNorm) -> None:
    _set_linear(spec.linear_0, ff.fc1)
    _set_linear(spec.linear_1, ff.fc2)
    _set_layer_norm(spec.layer_norm, norm)


def _set_encoder(spec, model: Transformer, table: np.ndarray) -> None:
    spec.embeddings[0].weight = _array(model.src_embed.weight)  # scaled by sqrt(D): spec.scale_embeddings
    spec.position_encodings.encodings = table
    for layer_spec, layer in zip(spec.layer, model.encoder_layers):
        _set_self_attention(layer_spec.self_attention, layer.self_attn, layer.norm1)
        _set_feed_forward(layer_spec.ffn, layer.ff, layer.norm2)
    if isinstance(model.encoder_norm, torch.nn.LayerNorm):  # pre-norm's final norm
        _set_layer_norm(spec.layer_norm, model.encoder_norm)


def _set_decoder(spec, model: Transformer, table: np.ndarray) -> None:
    spec.embeddings.weight = _array(model.tgt_embed.weight)
    spec.position_encodings.encodings = table
    for layer_spec, layer in zip(spec.layer, model.decoder_layers):
        _set_self_attention(layer_spec.self_attention, layer.self_attn, layer.norm1)
        _set_cross_attention(layer_spec.attention, layer.cross_attn, layer.norm2)
        _set_feed_forward(layer_spec.ffn, layer.ff, layer.norm3)
    if isinstance(model.decoder_norm, torch.nn.LayerNorm):
        _set_layer_norm(spec.layer_norm, model.decoder_norm)
    # No bias; a tied output is the embedding matrix again, which saving stores once (an alias).
    spec.projection.weight = _array(model.output.weight)


def _pieces(processor) -> list[str]:
    """The vocabulary in id order: CTranslate2 looks tokens up by these strings."""
    return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def _set_special_tokens(config, tokenizer: Tokenizer) -> None:
    """nmt's sources end with EOS and have no BOS; outputs start from BOS. CTranslate2 has one
    name per special token for both vocabularies: the two must agree."""
    for name, token_id in (("<unk>", UNK), ("EOS", EOS)):
        if tokenizer.src.id_to_piece(token_id) != tokenizer.tgt.id_to_piece(token_id):
            raise ConfigError(f"the source and target vocabularies name {name} differently; CTranslate2 needs one name")
    config.unk_token = tokenizer.tgt.id_to_piece(UNK)
    config.bos_token = tokenizer.tgt.id_to_piece(BOS)
    config.eos_token = tokenizer.tgt.id_to_piece(EOS)
    config.decoder_start_token = config.bos_token
    config.add_source_bos = False
    config.add_source_eos = True  # so that the directory translates plain SentencePiece pieces


# ---------------------------------------------------------------------------------------------
# Translating with an export


def _one_choice(decode: DecodeConfig) -> bool:
    """Sampling from the most probable token alone: CTranslate2 runs it as greedy search, which
    gives one hypothesis, so the n samples asked for are that one n times (as nmt's sampling gives)."""
    return decode.sampling and decode.topk == 1


@dataclass
class CTranslate2Translator:
    """`nmt.translate.TextTranslator` on an export directory: the input is normalized, cleaned,
    encoded and cut as `nmt.translate.Translator` does it, and decoded by CTranslate2.

    How CTranslate2's search differs from nmt's, and what follows:

    - Length limit: nmt allows a·|src| + b tokens per sentence, EOS included, and forces EOS at
      the last one. CTranslate2 takes one max_decoding_length per call, so sentences are decoded
      in groups of one limit each, with a·|src| + b - 1 (it stops there without EOS). Greedy
      outputs are the same; an output cut at the limit lacks the forced EOS's log-probability
      in its score (and an EOS row in its attention map). Outputs are also cut at the export's
      position table (max_positions rows, room for the checkpoint's own limits).
    - Scores: CTranslate2 renormalizes the log-softmax over the tokens it allows (never PAD or
      BOS, no repeated n-gram) where nmt leaves the banned tokens' probability out of the sum,
      and it counts a forced prefix's tokens with log-probability 0 where nmt counts the model's.
      Greedy tokens are the same; scores are close (equal without banned mass or prefix). A
      whole translation given (decode.prefix_only) is scored by `score_batch` instead, as nmt does.
    - Beam search: CTranslate2 stops a sentence once it has beam_size finished hypotheses; nmt
      goes on while a live beam could still beat its worst finished one. Both take the 2K best
      continuations, normalize by length (EOS included) ** len_penalty and start from one beam,
      so they mostly agree; with a prefix or banned n-grams, the score differences above can
      also change which hypothesis wins.
    - A prefix that ends in a space: nmt then requires a new word, CTranslate2 may go on with
      the prefix's last word ("The cat " may become "The cats").
    - Sampling draws from CTranslate2's random generator, seeded with decode.seed when loaded:
      the same seed gives the same samples run after run, not nmt's samples.
    - Attention: only the last decoder layer's, averaged over its heads (the export's alignment
      heads); CTranslate2 leaves out the column of the source EOS, which is what the others leave
      of each row (a distribution).
    """

    translator: object  # ctranslate2.Translator
    tokenizer: Tokenizer
    decode: DecodeConfig
    normalization: Normalization  # of the source text, as in training
    target_normalization: Normalization  # of the training targets: applied to prefixes
    model_config: ModelConfig
    languages: tuple[str, str]
    max_positions: int  # rows of the position tables: longer outputs are cut there
    allowed_tokens: np.ndarray | None = None  # (V,) bool: with decode.restrict_vocab, the target language's pieces
    _warned_of_positions: bool = field(default=False, init=False, repr=False)

    def translate(self, lines: Sequence[str], prefixes: Sequence[str] | None = None, attention: AttentionChoice | None = None,
                  first_line: int = 1, progress: bool = False, decode: DecodeConfig | None = None) -> Translations:
        """One entry per line, as `nmt.translate.Translator.translate`; `decode` replaces
        `self.decode` for this call."""
        decode = decode or self.decode
        self._check(decode, attention)
        encoded = encode_lines(self.tokenizer, lines, decode, self.normalization, prefixes, self.target_normalization,
                               first_line)
        prefix_ids = encoded.prefixes or [[] for _ in encoded.sources]
        hyps = self._search(encoded.sources, prefix_ids, decode, attention is not None, progress)
        return collect_translations(self.tokenizer, len(lines), encoded, hyps, attention is not None, first_line,
                                    self.target_normalization)

    def describe_attention(self, choice: AttentionChoice) -> str:
        return describe_attention(self.model_config, AttentionChoice()) + " (CTranslate2)"

    def too_long(self, lines: Sequence[str]) -> list[int]:
        return lines_too_long(self.tokenizer, lines, self.decode, self.normalization)

    def for_languages(self, vocab_info: VocabInfo, model_dir: Path, choice: LanguageChoice) -> CTranslate2Translator:
        return with_languages(self, vocab_info, model_dir, choice)

    def _check(self, decode: DecodeConfig, attention: AttentionChoice | None) -> None:
        if decode.max_input_tokens + 1 > self.max_positions:
            raise ConfigError(f"decode.max_input_tokens is {decode.max_input_tokens}, but the export has positions for "
                              f"{self.max_positions - 1} source tokens; export with a larger decode.max_input_tokens")
        layers = self.model_config.dec_layers
        if attention is not None and decode.prefix_only:
            raise ConfigError("--engine ctranslate2 scores a whole translation (--prefix-only) without its attention: "
                              "leave out --attention, or use --engine nmt")
        if attention is not None and (attention.head is not None or attention.layer not in (None, layers)):
            raise ConfigError(f"--engine ctranslate2 gives the attention of the last decoder layer ({layers}), mean over "
                              "heads, only: leave out --attention-layer and --attention-head, or use --engine nmt")

    def _search(self, sources: list[list[int]], prefixes: list[list[int]], decode: DecodeConfig, attention: bool,
                progress: bool) -> list[list[Hypothesis]]:
        """The n-best list of each source, in order: one CTranslate2 call per length limit, all
        submitted at once so that its workers (one per core) decode several groups together."""
        limits = decoding_limits(sources, prefixes, decode)
        # CTranslate2 cannot require the token after a prefix to begin a word: its prefix ends with its last token.
        prefixes = [[i for i in ids if i != NEW_WORD] for ids in prefixes]
        results: list[list[Hypothesis]] = [[] for _ in sources]
        if decode.prefix_only:  # a whole translation given: scored, not searched
            forced = [i for i, prefix in enumerate(prefixes) if prefix]
            for i, hyp in zip(forced, self._score([sources[i] for i in forced], [prefixes[i] for i in forced], decode)):
                results[i] = [hyp]
                limits[i] = 0
        if max(limits, default=0) - 1 > self.max_positions and not self._warned_of_positions:
            self._warned_of_positions = True
            print(f"warning: the export has positions for outputs of {self.max_positions} tokens; longer ones are cut "
                  "there (export with larger decode.max_len_a/max_len_b for more)", file=sys.stderr)
        groups: dict[int, list[int]] = {}
        for i, limit in enumerate(limits):
            if limit:
                groups.setdefault(limit, []).append(i)
        options = self._options(decode, attention)
        # CTranslate2 normalizes beam search scores only: greedy ones are divided here, as nmt's are.
        greedy_penalty = decode.len_penalty if decode.beam == 1 and not decode.sampling else 0.0
        pending = []
        for limit, indices in sorted(groups.items()):
            if limit <= 1:  # room for EOS alone: nmt's output is empty, and CTranslate2 needs a length
                for i in indices:
                    results[i] = [Hypothesis([], 0.0, torch.zeros(0, len(sources[i]) + 1))]
                continue
            batch = self._translate_batch([sources[i] for i in indices], [prefixes[i] for i in indices],
                                          min(limit - 1, self.max_positions), options)
            pending.append((indices, batch))
        for indices, batch in tqdm(pending, desc="translating", unit="group", disable=None if progress else True,
                                   file=sys.stderr):
            for i, future in zip(indices, batch):
                result = self._result(future)
                # Where fewer hypotheses than asked for can end (a prefix that fills the length
                # limit), CTranslate2 pads the list with ones of score -inf / length: not outputs.
                found = [k for k in range(len(result.hypotheses)) if k == 0 or result.scores[k] > IMPOSSIBLE_SCORE]
                results[i] = [self._hypothesis(result, k, attention, greedy_penalty) for k in found]
        if _one_choice(decode):  # every sample is the same
            results = [found * decode.nbest if len(found) == 1 else found for found in results]
        return results

    def _score(self, sources: list[list[int]], targets: list[list[int]], decode: DecodeConfig) -> list[Hypothesis]:
        """Forced translations (EOS last) scored as nmt's search scores them: the log-probability,
        over length (EOS included) ** len_penalty (but sampling's)."""
        if not sources:
            return []
        results = self.translator.score_batch([self.tokenizer.src_pieces(ids) for ids in sources],
                                              [self.tokenizer.tgt_pieces(ids[:-1]) for ids in targets])
        len_penalty = 0.0 if decode.sampling else decode.len_penalty
        return [Hypothesis(ids[:-1], float(sum(result.log_probs)) / length_norm(len(ids), len_penalty))
                for ids, result in zip(targets, results)]

    def _options(self, decode: DecodeConfig, attention: bool) -> dict:
        """`translate_batch` options of the decode settings (but the length limit)."""
        vocabulary = self.tokenizer.tgt_vocab_size
        greedy = decode.sampling or decode.beam == 1
        return dict(
            **self._batching(decode), asynchronous=True,
            beam_size=1 if decode.sampling else decode.beam, num_hypotheses=1 if _one_choice(decode) else decode.nbest,
            # CTranslate2 normalizes beam search scores; greedy ones are divided in _search, sampling's stay log-probs
            length_penalty=0.0 if greedy else decode.len_penalty,
            no_repeat_ngram_size=decode.no_repeat_ngram,
            suppress_sequences=self._suppressed_pieces,
            max_input_length=0, min_decoding_length=0,  # inputs are cut already; an empty output is allowed
            return_end_token=True, return_scores=True, return_attention=attention,
            sampling_topk=(decode.topk if decode.topk < vocabulary else 0) if decode.sampling else 1,
            sampling_topp=decode.topp if decode.sampling else 1.0,
            sampling_temperature=decode.temperature if decode.sampling else 1.0,
        )

    @functools.cached_property
    def _suppressed_pieces(self) -> list[list[str]]:
        """The pieces the output never holds, each as a one-piece sequence: PAD, BOS, the reserved
        symbols, and with decode.restrict_vocab those outside the target language's (built once
        per translator)."""
        banned = [PAD, BOS, *self.tokenizer.reserved_target_ids]
        if self.allowed_tokens is not None:
            banned += np.flatnonzero(~self.allowed_tokens).tolist()
        return [[self.tokenizer.tgt.id_to_piece(i)] for i in dict.fromkeys(banned)]  # each once, in order

    def _batching(self, decode: DecodeConfig) -> dict:
        """A GPU takes batches of decode.batch_tokens; CPU workers share batches of a few sentences."""
        if self.translator.device == "cuda":
            return dict(max_batch_size=decode.batch_tokens, batch_type="tokens")
        return dict(max_batch_size=CT2_BATCH_SENTENCES, batch_type="examples")

    def _translate_batch(self, sources: list[list[int]], prefixes: list[list[int]], max_length: int, options: dict):
        """Submitted to CTranslate2's workers: one future per source (`_result` waits for it)."""
        source_pieces = [self.tokenizer.src_pieces(ids) for ids in sources]
        target_prefix = [self.tokenizer.tgt_pieces(ids) or None for ids in prefixes] if any(prefixes) else None
        try:
            return self.translator.translate_batch(source_pieces, target_prefix, max_decoding_length=max_length, **options)
        except (ValueError, RuntimeError) as e:  # an option CTranslate2 refuses, e.g. topp with topk 0 on a GPU
            raise ConfigError(f"CTranslate2: {first_line(e)}") from None

    @staticmethod
    def _result(future):
        try:
            return future.result()
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"CTranslate2: {first_line(e)}") from None

    def _hypothesis(self, result, k: int, attention: bool, len_penalty: float = 0.0) -> Hypothesis:
        pieces = result.hypotheses[k]  # with the final EOS (return_end_token)
        ends = bool(pieces) and pieces[-1] == self.tokenizer.tgt.id_to_piece(EOS)
        tokens = [self.tokenizer.tgt.piece_to_id(piece) for piece in (pieces[:-1] if ends else pieces)]
        weights = None
        if attention:
            rows = np.asarray(result.attention[k], dtype=np.float32).reshape(len(pieces), -1)  # (T, S)
            weights = torch.from_numpy(with_eos_column(rows))  # (T, S+1)
        return Hypothesis(tokens, float(result.scores[k]) / length_norm(len(pieces), len_penalty), weights)


def decoding_limits(sources: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]], decode: DecodeConfig) -> list[int]:
    """nmt's longest output per sentence, EOS included: a·|src| + b as the search computes it
    (`nmt.search.output_limits`), and room for a forced prefix and EOS; a prefix's final NEW_WORD
    counts, as there, for the word that must begin after it."""
    if not sources:
        return []
    limits = max_lengths(pad_source(sources), decode.max_len_a, decode.max_len_b).tolist()
    return [max(limit, len(prefix) + 1) for limit, prefix in zip(limits, prefixes)]


def with_eos_column(weights: np.ndarray) -> np.ndarray:
    """(T, S) -> (T, S+1): CTranslate2 leaves out the column of the source EOS it appends itself;
    each row is a softmax (averaged over heads), so that column is what the others leave."""
    eos = np.clip(1.0 - weights.sum(axis=1, keepdims=True), 0.0, 1.0)  # (T, 1)
    return np.concatenate([weights, eos], axis=1)


def ctranslate2_device(device: str) -> tuple[str, int]:
    """("cpu" or "cuda", GPU index) for "auto" (a GPU when CTranslate2 sees one), "cpu", "cuda" or "cuda:N"."""
    import ctranslate2

    gpus = ctranslate2.get_cuda_device_count()
    if device == "auto":
        return ("cuda", 0) if gpus > 0 else ("cpu", 0)
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return "cpu", 0
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    number = int(index or 0)
    if number >= gpus:
        raise ConfigError(f"device {device!r} was asked for, but CTranslate2 sees {gpus} GPUs")
    return "cuda", number


def compute_type(precision: str, quantize: bool, device: str) -> str:
    """CTranslate2's compute type: int8 weights with `quantize` (on a GPU, with float16
    arithmetic around them), bf16/fp16 from decode.precision, else the exported weights' type."""
    half = {"bf16": "bfloat16", "fp16": "float16"}.get(precision)
    if quantize:
        if half is None and device == "cuda":
            half = "float16"
        return "int8" if half is None else f"int8_{half}"
    return half or "default"


def _eight_bit_weights(record: ExportRecord, quantize: bool) -> bool:
    """Whether CTranslate2 will compute in int8 with weights of 8 bits: quantized when loading
    (`quantize` on weights stored in float), or stored so by an export before 7-bit ones."""
    stored_int8 = (record.quantization or "").startswith("int8")
    return (quantize and not stored_int8) or (stored_int8 and record.int8_weight_range > INT8_WEIGHT_RANGE)


def load_ctranslate2_translator(export_dir: Path, decode_options: dict | None = None, device: str = "auto",
                                quantize: bool = False, threads: int = 0,
                                languages: LanguageChoice = ANY_LANGUAGE, checkpoint: str | None = None) -> CTranslate2Translator:
    """A translator on a directory of `nmt export --format ctranslate2`. Decode settings: the
    checkpoint's with `decode_options` in place, as `nmt.translate.load_translator`; `quantize`
    runs int8 weights. CPU workers: `threads`, or (0) one per core the process may use, each
    with one thread (one worker when sampling, whose draws then follow decode.seed). `languages`:
    checked against the export's pair; `checkpoint`, if given, against the weights exported."""
    import ctranslate2

    export_dir = Path(export_dir)
    record = ExportRecord.read(export_dir)
    exported = Path(record.checkpoint).name
    if checkpoint is not None and checkpoint not in (exported, record.checkpoint_asked):
        raise ConfigError(f"{export_dir} holds the weights of {exported}/ only (not {checkpoint}): "
                          f"export the checkpoint directory with --checkpoint {checkpoint}")
    if not record.directions:
        for side, asked in (("source", languages.src), ("target", languages.tgt)):
            if asked and record.languages[side] and asked != record.languages[side]:
                raise ConfigError(f"{export_dir} translates {record.languages['source']} -> {record.languages['target']} "
                                  f"only (not {side} {asked})")
    config = record.config()
    for side, sha256 in record.sentencepiece_sha256.items():  # a missing one: the Tokenizer's error below
        if (export_dir / record.sentencepiece[side]).is_file():
            check_recorded_model(export_dir / record.sentencepiece[side], sha256, "the export was made with",
                                 ExportRecord.NAME, CheckpointError)
    tokenizer = Tokenizer(export_dir / record.sentencepiece["source"], export_dir / record.sentencepiece["target"])
    decode = decode_settings(config.decode, decode_options)
    kind, index = ctranslate2_device(device)
    if kind == "cpu" and _eight_bit_weights(record, quantize) and int8_sums_can_overflow():
        print("warning: int8 computation with 8-bit weights can overflow on a CPU without VNNI and change "
              "translations; export with --quantization int8 (7-bit weights) and translate that export",
              file=sys.stderr)
    cores = worker_count(threads)
    # Workers draw from their own random streams, in whatever order they take batches: sampling
    # repeats itself only with one worker, which then gets every core.
    workers = 1 if kind != "cpu" or decode.sampling else cores
    try:
        translator = ctranslate2.Translator(str(export_dir), device=kind, device_index=index,
                                            compute_type=compute_type(decode.precision, quantize, kind),
                                            inter_threads=workers, intra_threads=(cores // workers) if kind == "cpu" else 0)
    except ValueError as e:  # a compute type the device lacks
        raise ConfigError(f"CTranslate2: {first_line(e)}") from None
    except RuntimeError as e:
        raise CheckpointError(f"{export_dir}: CTranslate2 could not load the model ({first_line(e)})") from None
    if decode.sampling:
        ctranslate2.set_random_seed(decode.seed % 2**32)  # an unsigned 32-bit seed
    loaded = CTranslate2Translator(translator, tokenizer, decode, record.source_normalization(),
                                   record.target_normalization(), config.model,
                                   (record.languages["source"], record.languages["target"]), record.max_positions)
    if record.directions:  # multilingual: the tag and normalization of the chosen languages
        return loaded.for_languages(VocabInfo.read(export_dir), export_dir, languages)
    if decode.restrict_vocab:
        raise restricting_one_language(export_dir)
    return loaded
