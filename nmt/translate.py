"""`nmt translate`: text in, one translation per input line out, in the input order."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from nmt.alignment import EOS_LABEL, AttentionMap, AttentionOutput, check_attention_dir, describe_attention
from nmt.atomic import open_text_atomic
from nmt.batches import pad_source
from nmt.checkpoint import load_for_inference, model_dir_contents, read_config
from nmt.config import DecodeConfig, ModelConfig
from nmt.data import clean_whitespace, decode_lines, read_lines
from nmt.devices import autocast, resolve_device, resolve_precision
from nmt.ensemble import Ensemble, shared_vocabulary
from nmt.errors import ConfigError, DataError
from nmt.files import ExportRecord, VocabInfo
from nmt.interfaces import StepDecoder
from nmt.models.attention import AttentionChoice
from nmt.normalize import Normalization
from nmt.paths import check_output_apart, make_folder, same_place
from nmt.search import (
    NEW_WORD,
    Hypothesis,
    Sampling,
    StepRules,
    beam_search,
    greedy_search,
    output_limits,
    sample_search,
)
from nmt.static_decoding import with_fixed_shapes
from nmt.tokenizer import EOS, PAD, UNK, Tokenizer


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose Linear layers hold int8 weights and quantize their inputs on the
    fly (dynamic quantization): faster CPU inference, at a small cost in accuracy."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise ConfigError(f"int8 quantization is not available in torch {torch.__version__}") from None
    # torch marks its eager-mode quantization API as deprecated; it is still the one that runs
    # int8 Linear layers on a CPU without more dependencies. Keep its notices off the user's screen.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def decode_batches(lengths: Sequence[int], batch_tokens: int) -> list[np.ndarray]:
    """Indices grouped longest first, each batch within `batch_tokens` padded source tokens."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches, start = [], 0
    for pos in range(len(order)):
        longest = int(lengths[order[start]]) + 1  # + EOS; the first of a batch is its longest
        if pos > start and (pos - start + 1) * longest > batch_tokens:
            batches.append(order[start:pos])
            start = pos
    if start < len(order):
        batches.append(order[start:])
    return batches


def translate_ids(
    model: StepDecoder,
    sources: Sequence[Sequence[int]],
    decode: DecodeConfig,
    device: torch.device,
    progress: bool = False,
    attention: AttentionChoice | None = None,
    prefixes: Sequence[Sequence[int]] | None = None,
    generator: torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
    word_starts: torch.Tensor | None = None,
) -> list[list[Hypothesis]]:
    """Translate token-id sequences (without EOS); returns the n-best list of each, in order.

    With `attention`, each hypothesis keeps the chosen cross-attention weights (on the CPU),
    one row per output token (EOS included) over its source tokens and the source EOS.
    `prefixes`: target tokens each output must start with (empty: none), and a final NEW_WORD
    where the next token must be one of `word_starts` ((V,) bool). Sampling draws from
    `generator` (default: a new one seeded with decode.seed). `allowed`: (V,) bool, the only
    tokens an output may hold (`StepRules.banning`).
    """
    results: list[list[Hypothesis]] = [[] for _ in sources]
    # Sampling repeats each sentence nbest times in its batch: the batch holds that many fewer.
    per_batch = max(1, decode.batch_tokens // decode.nbest) if decode.sampling else decode.batch_tokens
    batches = decode_batches([len(s) for s in sources], per_batch)
    if decode.sampling and generator is None:
        generator = sampling_generator(decode, device)
    banned = StepRules.banning(None if allowed is None else allowed.to(device))  # once, not per batch
    word_starts = None if word_starts is None else word_starts.to(device)
    # One autocast region for every batch: the weights are cast to half precision once.
    with autocast(device, resolve_precision(decode.precision, device)):
        # disable=None: no bar when stderr is not a terminal (a log file, CI)
        for indices in tqdm(batches, desc="translating", unit="batch", disable=None if progress else True, file=sys.stderr):
            batch_prefixes = None if prefixes is None else [prefixes[i] for i in indices]
            _translate_batch(model, sources, indices, decode, device, attention, results, batch_prefixes, generator,
                             StepRules(decode.no_repeat_ngram, banned=banned, word_starts=word_starts))
    return results


def sampling_generator(decode: DecodeConfig, device: torch.device) -> torch.Generator:
    # Modulo 2**32, as CTranslate2 takes it: a CPU generator would keep 32 bits of a larger seed
    # and a CUDA one all 64, so that one seed would draw differently on each.
    return torch.Generator(device).manual_seed(decode.seed % 2**32)


def _translate_batch(
    model: StepDecoder, sources: Sequence[Sequence[int]], indices: np.ndarray, decode: DecodeConfig, device: torch.device,
    attention: AttentionChoice | None, results: list[list[Hypothesis]], prefixes: list[Sequence[int]] | None,
    generator: torch.Generator | None, rules: StepRules,
) -> None:
    """Translate the sources at `indices` as one batch into `results`, under `rules` (their
    prefix: this batch's `prefixes`)."""
    src = pad_source([sources[i] for i in indices]).to(device)
    prefix = None
    if prefixes is not None and any(prefixes):
        prefix = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(list(p), dtype=torch.long) for p in prefixes], batch_first=True, padding_value=PAD
        ).to(device)  # (B, P), PAD (0) after each prefix
    rules = dataclasses.replace(rules, prefix=prefix)
    limits = (decode.max_len_a, decode.max_len_b)
    if decode.static_cache:
        model = with_fixed_shapes(model, int(output_limits(src, *limits, rules).max()))
    if decode.sampling:
        sampling = Sampling(decode.topk, decode.topp, decode.temperature, generator)
        hyps = sample_search(model, src, sampling, decode.nbest, *limits, attention, rules)
    elif decode.beam == 1:
        hyps = [[h] for h in greedy_search(model, src, *limits, attention, rules, len_penalty=decode.len_penalty)]
    else:
        hyps = beam_search(model, src, decode.beam, decode.len_penalty, *limits, decode.nbest, attention, rules)
    for i, nbest in zip(indices, hyps):
        if attention is not None:
            for h in nbest:  # the batch pads sources on the right: keep this one's columns
                h.attention = h.attention[:, : len(sources[i]) + 1].cpu()
        results[i] = nbest


@dataclass
class Translations:
    hypotheses: list[list[Hypothesis]]  # n-best per input line (empty for empty lines)
    texts: list[list[str]]  # detokenized n-best per input line
    truncated: list[int]  # 1-based numbers of input lines cut to decode.max_input_tokens
    # with attention: the map of each line's best translation (None for empty lines)
    attention_maps: list[AttentionMap | None] | None = None
    # 1-based numbers of the lines whose prefix holds characters the target vocabulary lacks
    # (the output starts with ⁇ in their place)
    unknown_in_prefix: list[int] = field(default_factory=list)


def translate_lines(
    model,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    decode: DecodeConfig,
    device: torch.device,
    normalize: Normalization | None = None,
    progress: bool = False,
    attention: AttentionChoice | None = None,
    prefixes: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
    first_line: int = 1,
    normalize_target: Normalization | None = None,
    allowed: torch.Tensor | None = None,
) -> Translations:
    """Translate text lines; `normalize` is what the model's source text went through in
    training (the checkpoint's record, `VocabInfo.source_normalization`; default NFC).
    `prefixes`: per line, target text its translation must start with ("": none), normalized
    as the training targets were (`normalize_target`, `VocabInfo.target_normalization`).
    `first_line`: the number of lines[0] in its file, for warnings and attention maps. `allowed`:
    (V,) bool, the only tokens an output may hold; never the vocabulary's reserved symbols."""
    encoded = encode_lines(tokenizer, lines, decode, normalize, prefixes, normalize_target, first_line)
    hyps = translate_ids(model, encoded.sources, decode, device, progress, attention, encoded.prefixes, generator,
                         output_tokens(tokenizer, allowed), None if prefixes is None else word_start_mask(tokenizer))
    return collect_translations(tokenizer, len(lines), encoded, hyps, attention is not None, first_line, normalize_target)


def output_tokens(tokenizer: Tokenizer, allowed: torch.Tensor | None = None) -> torch.Tensor | None:
    """(V,) bool: the tokens a translation may hold, `allowed` (None: all) without the
    vocabulary's reserved symbols; None when nothing is left out."""
    if not tokenizer.reserved_target_ids:
        return allowed
    allowed = torch.ones(tokenizer.tgt_vocab_size, dtype=torch.bool) if allowed is None else allowed.clone()
    allowed[tokenizer.reserved_target_ids] = False
    return allowed


def word_start_mask(tokenizer: Tokenizer) -> torch.Tensor:
    """(V,) bool: the target tokens that may follow a prefix ending in a space (`NEW_WORD`)."""
    mask = torch.zeros(tokenizer.tgt_vocab_size, dtype=torch.bool)
    mask[tokenizer.word_start_target_ids] = True
    return mask


def decode_outputs(tokenizer: Tokenizer, outputs: list[list[int]], normalize_target: Normalization | None) -> list[str]:
    """Output texts as the training targets were written: SentencePiece folds some characters
    (NFKC turns Chinese full-width punctuation to ASCII); the target language's normalization
    puts them back as `nmt prepare` wrote the references."""
    texts = tokenizer.decode_tgt(outputs)
    return texts if normalize_target is None else [normalize_target(text) for text in texts]


@dataclass
class EncodedLines:
    """The lines of `translate_lines` with text in them, as token ids."""

    non_empty: list[int]  # indices of the lines with text after normalization
    sources: list[list[int]]  # their source ids (no EOS), cut to decode.max_input_tokens
    # their target prefixes' ids ([]: none), ending in NEW_WORD where the text ended in a space; None without prefixes
    prefixes: list[list[int]] | None
    truncated: list[int]  # 1-based numbers of the lines that were cut
    unknown_in_prefix: list[int] = field(default_factory=list)  # 1-based numbers of lines with UNK in the prefix


def encode_lines(
    tokenizer: Tokenizer, lines: Sequence[str], decode: DecodeConfig, normalize: Normalization | None = None,
    prefixes: Sequence[str] | None = None, normalize_target: Normalization | None = None, first_line: int = 1,
) -> EncodedLines:
    """Normalize, clean and encode the lines (and prefixes) as every engine's search takes them."""
    normalize = normalize or Normalization()
    cleaned = [clean_whitespace(normalize(line)) for line in lines]
    non_empty = [i for i, line in enumerate(cleaned) if line]
    encoded = tokenizer.encode_src([cleaned[i] for i in non_empty])
    # A line of characters the vocabulary drops (a zero-width space, say) is empty too.
    pieces = [k for k, ids in enumerate(encoded) if len(ids) > len(tokenizer.source_prefix)]
    non_empty, encoded = [non_empty[k] for k in pieces], [encoded[k] for k in pieces]
    truncated = [first_line + non_empty[k] for k, ids in enumerate(encoded) if len(ids) > decode.max_input_tokens]
    encoded = [ids[: decode.max_input_tokens] for ids in encoded]
    prefix_ids, unknown = None, []
    if prefixes is not None:
        normalize_target = normalize_target or Normalization()
        prefix_ids = tokenizer.encode_tgt([clean_whitespace(normalize_target(prefixes[i])) for i in non_empty])
        unknown = [first_line + i for i, ids in zip(non_empty, prefix_ids) if UNK in ids]
        if decode.prefix_only:  # the translation ends where its prefix does
            prefix_ids = [ids + [EOS] if ids else ids for ids in prefix_ids]
        else:  # SentencePiece drops a final space: a prefix that ends in one ends a word
            prefix_ids = [ids + [NEW_WORD] if ids and prefixes[i][-1:].isspace() else ids
                          for i, ids in zip(non_empty, prefix_ids)]
    return EncodedLines(non_empty, encoded, prefix_ids, truncated, unknown)


def lines_too_long(tokenizer: Tokenizer, lines: Sequence[str], decode: DecodeConfig, normalize: Normalization) -> list[int]:
    """1-based numbers of the lines that `encode_lines` cuts to decode.max_input_tokens."""
    return encode_lines(tokenizer, lines, decode, normalize).truncated


def collect_translations(
    tokenizer: Tokenizer, line_count: int, encoded: EncodedLines, hyps: list[list[Hypothesis]], attention: bool,
    first_line: int = 1, normalize_target: Normalization | None = None,
) -> Translations:
    """One entry per input line from the n-best lists of the non-empty ones (`hyps`, in the
    order of `encoded.non_empty`), written as the training targets were (`decode_outputs`); with
    `attention`, the map of each best translation over the input's own pieces (a multilingual
    model's language tag left out, so that alignments index the input)."""
    hypotheses: list[list[Hypothesis]] = [[] for _ in range(line_count)]
    texts: list[list[str]] = [[""] for _ in range(line_count)]
    maps: list[AttentionMap | None] = [None for _ in range(line_count)]
    for i, ids, nbest in zip(encoded.non_empty, encoded.sources, hyps):
        hypotheses[i] = nbest
        texts[i] = decode_outputs(tokenizer, [h.tokens for h in nbest], normalize_target)
        if attention:
            best = nbest[0]
            # A row per output token and one for the final EOS; an output cut at the length
            # limit without EOS (CTranslate2's) has no EOS row.
            eos_rows = best.attention.shape[0] - len(best.tokens)
            tag = len(tokenizer.source_prefix)
            maps[i] = AttentionMap(
                line=first_line + i,
                source=tokenizer.src_pieces(ids[tag:]) + [EOS_LABEL],
                output=tokenizer.tgt_pieces(best.tokens) + [EOS_LABEL] * eos_rows,
                weights=best.attention.numpy()[:, tag:],  # (T, S - tag)
            )
    return Translations(hypotheses, texts, encoded.truncated, maps if attention else None, encoded.unknown_in_prefix)


def format_output(translations: Translations, scored: bool, first_index: int = 0) -> str:
    """One line per input line; `scored` (an n-best list asked for, even of 1): 'i ||| text |||
    score' lines (i from 0)."""
    if not scored:
        return "".join(texts[0] + "\n" for texts in translations.texts)
    out = []
    for i, (hyps, texts) in enumerate(zip(translations.hypotheses, translations.texts), first_index):
        if not hyps:
            out.append(f"{i} |||  ||| 0.0000\n")  # an empty text between the two separators
        for hyp, text in zip(hyps, texts):
            out.append(f"{i} ||| {text} ||| {hyp.score:.4f}\n")
    return "".join(out)


@dataclass
class Translator:
    """What translating needs once loaded: a model (or ensemble), its tokenizer and decoding
    settings, the source normalization, and the random numbers of sampling."""

    model: StepDecoder
    tokenizer: Tokenizer
    decode: DecodeConfig
    device: torch.device
    normalization: Normalization  # of the source text, as in training
    target_normalization: Normalization  # of the training targets: applied to prefixes
    model_config: ModelConfig  # the first model's (attention descriptions)
    languages: tuple[str, str]  # (source, target) as the data dir named them
    generator: torch.Generator | None = None
    allowed_tokens: np.ndarray | None = None  # (V,) bool: with decode.restrict_vocab, the target language's pieces

    def translate(self, lines: Sequence[str], prefixes: Sequence[str] | None = None, attention: AttentionChoice | None = None,
                  first_line: int = 1, progress: bool = False, decode: DecodeConfig | None = None) -> Translations:
        """`decode`: settings for this call instead of `self.decode` (a server's per-request n-best)."""
        allowed = None if self.allowed_tokens is None else torch.from_numpy(self.allowed_tokens)
        return translate_lines(self.model, self.tokenizer, lines, decode or self.decode, self.device, self.normalization,
                               progress, attention, prefixes, self.generator, first_line, self.target_normalization,
                               allowed)

    def describe_attention(self, choice: AttentionChoice) -> str:
        return describe_attention(self.model_config, choice)

    def too_long(self, lines: Sequence[str]) -> list[int]:
        return lines_too_long(self.tokenizer, lines, self.decode, self.normalization)

    def for_languages(self, vocab_info: VocabInfo, model_dir: Path, choice: LanguageChoice) -> Translator:
        return with_languages(self, vocab_info, model_dir, choice)


class TextTranslator(Protocol):
    """What `nmt translate` and `nmt serve` translate with: this library's search (`Translator`)
    or an exported model in another engine (`nmt.export.CTranslate2Translator`)."""

    decode: DecodeConfig
    languages: tuple[str, str]

    def translate(self, lines: Sequence[str], prefixes: Sequence[str] | None = None, attention: AttentionChoice | None = None,
                  first_line: int = 1, progress: bool = False, decode: DecodeConfig | None = None) -> Translations:
        """One entry per line, in order; `attention` asks for the best translations' maps (an
        engine without them raises ConfigError)."""

    def describe_attention(self, choice: AttentionChoice) -> str:
        """Which weights the attention maps show, in words."""

    def too_long(self, lines: Sequence[str]) -> list[int]:
        """1-based numbers of the lines with more pieces than the model takes
        (decode.max_input_tokens): `translate` would cut them. Found before translating."""


SAMPLING_OPTIONS = tuple(f.name for f in dataclasses.fields(DecodeConfig) if f.metadata.get("sampling_only"))
SEARCH_OPTIONS = tuple(f.name for f in dataclasses.fields(DecodeConfig) if f.metadata.get("search_only"))


def decode_settings(saved: DecodeConfig, decode_options: dict | None) -> DecodeConfig:
    """A checkpoint's decode config with the `decode_options` that are given (not None) in
    place of its values, checked; one output per line unless `nbest` is given."""
    options = {k: v for k, v in (decode_options or {}).items() if v is not None}
    decode = dataclasses.replace(saved, **{"nbest": 1, **options})
    decode.validate()
    if not decode.sampling and any(name in options for name in SAMPLING_OPTIONS):
        raise ConfigError(f"{', '.join(name for name in SAMPLING_OPTIONS if name in options)}: only with sampling (--sampling)")
    if decode.sampling and any(name in options for name in SEARCH_OPTIONS):
        given = ", ".join(name for name in SEARCH_OPTIONS if name in options)
        if options.get("sampling"):
            raise ConfigError(f"{given}: not with sampling (it draws each output; --nbest N draws N)")
        raise ConfigError(f"{given}: for beam search, but the model samples (decode.sampling in its config); "
                          "nmt translate --no-sampling searches instead")
    return decode


@dataclass(frozen=True)
class LanguageChoice:
    """What a multilingual model is asked for: the target language (required) and, optionally,
    the source language (whose normalization the input gets)."""

    tgt: str | None = None
    src: str | None = None


ANY_LANGUAGE = LanguageChoice()  # a bilingual model's own pair


@dataclass
class LanguageSettings:
    """How one model translates a language choice: the source tag (None: a bilingual model),
    each side's normalization and the (source, target) names."""

    tag: str | None
    source_normalization: Normalization
    target_normalization: Normalization
    languages: tuple[str, str]
    allowed_tokens: np.ndarray | None = None  # with decode.restrict_vocab: the target language's pieces


def restricting_one_language(model_dir: Path) -> ConfigError:
    return ConfigError(f"{model_dir} translates into one language: restricting its output to that "
                       "language's pieces (decode.restrict_vocab) is for multilingual models")


def as_spelled(lang: str | None, languages) -> str | None:
    """`lang` as the model spells it, where it differs only in case and `-`/`_` from one of
    `languages` (zh-tw for zh_TW); else as given."""
    def key(code: str) -> str:
        return code.strip().lower().replace("-", "_")

    same = [known for known in languages if known and lang and key(known) == key(lang)]
    return same[0] if len(same) == 1 and lang not in languages else lang


def language_settings(vocab_info: VocabInfo, model_dir: Path, choice: LanguageChoice,
                      restrict_vocab: bool = False) -> LanguageSettings:
    """Check `choice` against what the model translates; a one-line error names the languages it
    knows. `restrict_vocab`: also the target language's pieces (decode.restrict_vocab)."""
    if restrict_vocab and not vocab_info.multilingual:
        raise restricting_one_language(model_dir)
    languages = vocab_info.languages if vocab_info.multilingual else (vocab_info.src_lang, vocab_info.tgt_lang)
    choice = LanguageChoice(as_spelled(choice.tgt, languages), as_spelled(choice.src, languages))
    if not vocab_info.multilingual:
        if choice.tgt and vocab_info.tgt_lang and choice.tgt != vocab_info.tgt_lang:
            raise ConfigError(f"{model_dir} translates into {vocab_info.tgt_lang} only (not {choice.tgt})")
        if choice.src and vocab_info.src_lang and choice.src != vocab_info.src_lang:
            raise ConfigError(f"{model_dir} translates from {vocab_info.src_lang} only (not {choice.src})")
        return LanguageSettings(None, vocab_info.source_normalization(), vocab_info.target_normalization(),
                                (vocab_info.src_lang or "", vocab_info.tgt_lang or ""))
    known = ", ".join(sorted(vocab_info.languages))
    if not choice.tgt:
        raise ConfigError(f"{model_dir} is a multilingual model: choose the target language with --tgt-lang ({known})")
    for lang in (choice.tgt, choice.src):
        if lang and lang not in vocab_info.languages:
            raise ConfigError(f"{model_dir} does not know the language {lang!r}; it knows {known}")
    if choice.src == choice.tgt:
        raise ConfigError(f"--src-lang and --tgt-lang are both {choice.tgt}: nothing to translate")
    if choice.src:
        source = vocab_info.language_normalization(choice.src)
    else:  # the input's language is not given: the normalization every language shares
        records = {json.dumps(record, sort_keys=True) for record in vocab_info.languages.values()}
        if len(records) > 1:
            raise ConfigError(f"{model_dir} normalizes its languages differently: name the input's with --src-lang ({known})")
        source = vocab_info.language_normalization(next(iter(vocab_info.languages)))
    allowed = target_language_pieces(vocab_info, model_dir, choice.tgt) if restrict_vocab else None
    return LanguageSettings(choice.tgt, source, vocab_info.language_normalization(choice.tgt),
                            (choice.src or "", choice.tgt), allowed)


def check_language_choices(model_dirs: Sequence[Path], pivot_dirs: Sequence[Path] | None,
                           directions: list[tuple[str, str]], pivot: str | None, decode_options: dict | None) -> None:
    """Each (source, target) direction against each model that would translate it (both legs
    through a pivot), before anything is translated: a run of many directions does not stop
    halfway."""
    restrict = decode_settings(read_config(Path(model_dirs[0])).decode, decode_options).restrict_vocab
    infos = {Path(d): VocabInfo.read(Path(d)) for d in [*model_dirs, *(pivot_dirs or [])]}  # each read once
    for src, tgt in directions:
        legs = [(model_dirs, src, tgt)] if pivot is None else [(model_dirs, src, pivot), (pivot_dirs or model_dirs, pivot, tgt)]
        for dirs, leg_src, leg_tgt in legs:
            for model_dir in map(Path, dirs):
                language_settings(infos[model_dir], model_dir, LanguageChoice(leg_tgt, leg_src), restrict)


def target_language_pieces(vocab_info: VocabInfo, model_dir: Path, lang: str) -> np.ndarray:
    """(V,) bool: the pieces of `lang`'s training targets; a one-line error when not recorded."""
    mask = vocab_info.target_piece_mask(lang)
    if mask is None:
        reason = ("was trained before models recorded their languages' pieces" if not vocab_info.target_pieces
                  else f"never translated into {lang} in training")
        raise ConfigError(f"{model_dir} {reason}: decode.restrict_vocab (--restrict-vocab) cannot be used with it")
    return mask


def with_languages(translator, vocab_info: VocabInfo, model_dir: Path, choice: LanguageChoice):
    """`translator` (the same loaded model; a dataclass with a tokenizer, normalizations and
    languages) asked for another direction of a multilingual model."""
    settings = language_settings(vocab_info, model_dir, choice, translator.decode.restrict_vocab)
    tokenizer = translator.tokenizer.for_target(settings.tag) if settings.tag else translator.tokenizer
    return dataclasses.replace(translator, tokenizer=tokenizer, normalization=settings.source_normalization,
                               target_normalization=settings.target_normalization, languages=settings.languages,
                               allowed_tokens=settings.allowed_tokens)


def load_translator(
    model_dirs: Sequence[Path], decode_options: dict | None = None, checkpoint: str = "best", device: str = "auto",
    quantize: bool = False, languages: LanguageChoice = ANY_LANGUAGE,
) -> Translator:
    """Load one model, or an ensemble of several sharing one vocabulary, for translation.

    Decoding settings are the first checkpoint's `decode` config with `decode_options` (beam,
    nbest, sampling, ...) replacing the values that are given; only the best translation is
    written unless `nbest` is given. `quantize` runs the Linear layers in int8 (CPU only).
    `languages`: the target language of a multilingual model (see `language_settings`).
    """
    torch_device = resolve_device(device)
    if quantize and torch_device.type != "cpu":
        raise ConfigError("int8 quantization runs on the CPU only: add --device cpu")
    vocab_info = shared_vocabulary(model_dirs)  # first: no model is loaded for nothing
    models, tokenizer, config = [], None, None
    for model_dir in model_dirs:
        model, model_tokenizer, model_config = load_for_inference(model_dir, checkpoint, torch_device)
        models.append(model)
        tokenizer, config = tokenizer or model_tokenizer, config or model_config
    decode = decode_settings(config.decode, decode_options)
    if quantize:  # int8 products take fp32 activations: no half-precision autocast around them
        if resolve_precision(decode.precision, torch_device) != torch.float32:
            raise ConfigError(f"int8 decoding computes in fp32, not {decode.precision}: leave out --precision "
                              f"{decode.precision} (or decode.precision in the model's config.yaml) or --int8")
        models = [quantize_int8(model) for model in models]
    model = models[0] if len(models) == 1 else Ensemble(models)
    generator = sampling_generator(decode, torch_device) if decode.sampling else None
    translator = Translator(model, tokenizer, decode, torch_device, vocab_info.source_normalization(),
                            vocab_info.target_normalization(), config.model, (vocab_info.src_lang or "", vocab_info.tgt_lang or ""),
                            generator)
    return with_languages(translator, vocab_info, Path(model_dirs[0]), languages)


@dataclass
class PivotTranslator:
    """Translation through a pivot language: `first` translates into it (best translation
    only), `second` from it into the target; prefixes, n-best lists and attention belong to the
    second step."""

    first: TextTranslator
    second: TextTranslator

    @property
    def decode(self) -> DecodeConfig:
        return self.second.decode

    @property
    def languages(self) -> tuple[str, str]:
        return self.first.languages[0], self.second.languages[1]

    def translate(self, lines: Sequence[str], prefixes: Sequence[str] | None = None, attention: AttentionChoice | None = None,
                  first_line: int = 1, progress: bool = False, decode: DecodeConfig | None = None) -> Translations:
        one_best = dataclasses.replace(self.first.decode, nbest=1)
        middle = self.first.translate(lines, first_line=first_line, progress=progress, decode=one_best)
        result = self.second.translate([texts[0] for texts in middle.texts], prefixes, attention, first_line, progress, decode)
        result.truncated = sorted(set(middle.truncated) | set(result.truncated))
        return result

    def describe_attention(self, choice: AttentionChoice) -> str:
        return self.second.describe_attention(choice) + f", translating from the pivot ({self.first.languages[1]})"

    def too_long(self, lines: Sequence[str]) -> list[int]:
        """The lines too long for the first step (the second step's input is known only after it)."""
        return self.first.too_long(lines)


ENGINES = ("nmt", "ctranslate2")


def load_text_translator(
    model_dirs: Sequence[Path], decode_options: dict | None = None, checkpoint: str | None = None, device: str = "auto",
    quantize: bool = False, engine: str = "nmt", languages: LanguageChoice = ANY_LANGUAGE,
    pivot: str | None = None, pivot_dirs: Sequence[Path] | None = None,
) -> TextTranslator:
    """`load_translator` for engine "nmt" (checkpoint directories); for "ctranslate2", one
    directory written by `nmt export --format ctranslate2`. `checkpoint`: best (default) or last
    of a checkpoint directory; an export holds the weights it was made from. `pivot`: translate into this
    language first, with the same models, then into the target with `pivot_dirs` (default: the
    same models again)."""
    if pivot is not None:
        if not pivot.strip():
            raise ConfigError("--pivot names no language")
        if pivot in (languages.src, languages.tgt):
            raise ConfigError(f"--pivot {pivot} is the source or target language itself")
        if not pivot_dirs and engine == "nmt" and not VocabInfo.read(Path(model_dirs[0])).multilingual:
            raise ConfigError(f"{model_dirs[0]} translates one language pair: --pivot needs a multilingual model, "
                              "or --pivot-model DIR for the second step")
        first = load_text_translator(model_dirs, decode_options, checkpoint, device, quantize, engine,
                                     LanguageChoice(pivot, languages.src))
        second = load_text_translator(pivot_dirs or model_dirs, decode_options, checkpoint, device, quantize, engine,
                                      LanguageChoice(languages.tgt, pivot))
        return PivotTranslator(first, second)
    if pivot_dirs:
        raise ConfigError("--pivot-model goes with --pivot LANG")
    if engine == "nmt":
        for model_dir in model_dirs:
            if ExportRecord.exists(model_dir):
                raise ConfigError(f"{model_dir} is a CTranslate2 export: translate it with --engine ctranslate2")
        return load_translator(model_dirs, decode_options, checkpoint or "best", device, quantize, languages)
    if engine == "ctranslate2":
        from nmt.export import load_ctranslate2_translator  # ctranslate2: only when asked for

        if len(model_dirs) != 1:
            raise ConfigError("--engine ctranslate2 takes one export directory (no ensembles)")
        return load_ctranslate2_translator(Path(model_dirs[0]), decode_options, device, quantize, languages=languages,
                                           checkpoint=checkpoint)
    raise ConfigError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")


def translate_file(
    model_dirs: Path | Sequence[Path],
    input_path: Path | None,
    output_path: Path | None,
    decode_options: dict | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    replace_invalid: bool = False,
    warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    quantize: bool = False,
    attention: AttentionOutput | None = None,
    prefix_path: Path | None = None,
    stream: bool = False,
    engine: str = "nmt",
    languages: LanguageChoice = ANY_LANGUAGE,
    pivot: str | None = None,
    pivot_dirs: Sequence[Path] | None = None,
) -> int:
    """Translate a file (or stdin when None) into a file (or stdout); returns the line count.

    The input is read, sorted and translated `decode.chunk_lines` lines at a time, and each
    chunk's output written when it is done, so memory does not grow with the file; with
    `stream`, each line is translated and written (flushed) as soon as it is read. An output
    file appears complete when the run ends (it is written beside it under a temporary name).
    `prefix_path`: one target prefix per input line. `attention` writes the cross-attention of
    each best translation: alignments, heat-maps, weights. `engine`: "nmt" translates checkpoint
    directories, "ctranslate2" a directory of `nmt export` (see `load_text_translator`, also for
    `languages`, `pivot` and `pivot_dirs`). See `load_translator` for the rest.
    """
    model_dirs = [Path(model_dirs)] if isinstance(model_dirs, (str, Path)) else [Path(d) for d in model_dirs]
    output_path = None if output_path is None or str(output_path) == "-" else Path(output_path)
    input_path = None if input_path is None or str(input_path) == "-" else Path(input_path)
    attention_dir = None if attention is None else Path(attention.directory)
    if attention_dir is not None:
        check_attention_dir(attention_dir, output_path,
                            [("-i", input_path), ("--prefix", None if prefix_path is None else Path(prefix_path))])
    if output_path is not None:
        if not str(output_path) or output_path.is_dir():
            raise DataError(f"cannot write {output_path or '-o'}: give a file name, not a folder")
        folder = Path(os.path.realpath(output_path)).parent  # a link's: where its file is written
        if not folder.is_dir() and not (attention_dir is not None and same_place(folder, attention_dir)):
            raise DataError(f"cannot write {output_path}: the folder {folder} does not exist")
        # stdin read from a file (`< FILE`) is that file's input as much as -i FILE
        stdin = Path("/dev/stdin") if input_path is None else None
        model_contents = [path for model_dir in [*model_dirs, *(pivot_dirs or [])] for path in model_dir_contents(model_dir)]
        check_output_apart(output_path, [input_path or stdin, prefix_path], model_contents)
    elif Path("/dev/stdout").is_file():  # redirected into a file (`>> FILE`): the input would grow as it is read
        check_output_apart(Path("/dev/stdout"), [input_path or Path("/dev/stdin"), prefix_path], [])
    translator = load_text_translator(model_dirs, decode_options, checkpoint, device, quantize, engine, languages, pivot,
                                      pivot_dirs)
    # A layer or head the model lacks is refused here, before anything is written.
    described = None if attention is None else translator.describe_attention(attention.choice)
    if attention_dir is not None:  # made once nothing is left to refuse
        make_folder(attention_dir, "--attention")
    lines = _read_stdin(replace_invalid) if input_path is None else read_lines(Path(input_path), replace_invalid=replace_invalid)
    prefixes = None if prefix_path is None else read_lines(Path(prefix_path), replace_invalid)
    chunk_lines = 1 if stream else translator.decode.chunk_lines
    scored = (decode_options or {}).get("nbest") is not None
    chunks = _chunks(lines, prefixes, chunk_lines, "stdin" if input_path is None else str(input_path), str(prefix_path))
    maps: list[AttentionMap | None] = []
    count, truncated, unknown = 0, 0, 0
    with _output(output_path) as out:
        bar = tqdm(desc="translating", unit="line", disable=None if output_path is not None else True, file=sys.stderr)
        for chunk, chunk_prefixes in chunks:
            result = translator.translate(chunk, chunk_prefixes, None if attention is None else attention.choice, count + 1)
            for lineno in result.truncated:
                if truncated < 5:
                    warn(f"warning: line {lineno} has more than {translator.decode.max_input_tokens} tokens and was truncated")
                truncated += 1
            for lineno in result.unknown_in_prefix:
                if unknown < 5:
                    warn(f"warning: line {lineno}: its prefix holds characters the target vocabulary lacks; "
                         "the output has ⁇ in their place")
                unknown += 1
            out.write(format_output(result, scored, count))
            out.flush()
            maps.extend(result.attention_maps or [])
            count += len(chunk)
            bar.update(len(chunk))
        bar.close()
    if truncated > 5:
        warn(f"warning: {truncated} lines were truncated in all")
    if unknown > 5:
        warn(f"warning: {unknown} prefixes held characters the target vocabulary lacks")
    if attention is not None:
        _write_attention(maps, attention, model_dirs, described, warn)
    return count


def _chunks(
    lines: Iterable[str], prefixes: Iterable[str] | None, size: int, name: str, prefix_name: str
) -> Iterator[tuple[list[str], list[str] | None]]:
    """The input in lists of `size` lines, each with its prefixes (None without a prefix file)."""
    lines = iter(lines)
    prefixes = None if prefixes is None else iter(prefixes)
    done = 0
    while chunk := list(itertools.islice(lines, size)):
        chunk_prefixes = None
        if prefixes is not None:
            chunk_prefixes = list(itertools.islice(prefixes, len(chunk)))
            if len(chunk_prefixes) < len(chunk):
                raise DataError(
                    f"{prefix_name} has {done + len(chunk_prefixes)} lines but {name} has more; give one prefix per "
                    "input line (an empty line for none)"
                )
        done += len(chunk)
        yield chunk, chunk_prefixes
    if prefixes is not None and next(prefixes, None) is not None:
        raise DataError(f"{prefix_name} has more lines than {name} ({done}); give one prefix per input line")


class _Stdout:
    """sys.stdout as `_output` gives files."""

    def write(self, text: str) -> None:
        try:
            sys.stdout.write(text)
        except BrokenPipeError:
            raise
        except OSError as e:  # a full disk behind a redirection, say
            raise DataError(f"cannot write the output: {e.strerror or e}") from None

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise DataError(f"cannot write the output: {e.strerror or e}") from None


def _output(output_path: Path | None):
    if output_path is None:
        if sys.stdout is None:
            raise DataError("the standard output is closed: give -o FILE")
        return contextlib.nullcontext(_Stdout())
    return _output_file(Path(output_path))


@contextlib.contextmanager
def _output_file(path: Path):
    """`path` written under a temporary name and renamed when complete; write errors in one line."""
    try:
        with open_text_atomic(path) as f:
            yield f
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None


def _write_attention(maps, attention: AttentionOutput, model_dirs: list[Path], described: str, warn) -> None:
    """`described`: which weights the maps show, in words (`TextTranslator.describe_attention`)."""
    from nmt.plots import write_attention  # matplotlib: only when pictures are asked for

    title = "model " + " + ".join(str(d) for d in model_dirs)
    pictures, directory = write_attention(maps, attention, title, described)
    warn(f"attention: {pictures} heat-map(s) and alignments.txt in {directory}")


def _read_stdin(replace_invalid: bool) -> Iterator[str]:
    if sys.stdin is None:
        raise DataError("the standard input is closed: give -i FILE")
    return decode_lines(sys.stdin.buffer, "<stdin>", replace_invalid, refuse_nul=not replace_invalid)
