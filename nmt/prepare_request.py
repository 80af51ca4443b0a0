"""What `nmt prepare` is asked for, in one request: a parallel corpus (`nmt.prepare`), several
directions for one multilingual model (`nmt.multilingual`) or monolingual text for pretraining
(`nmt.monolingual`). `prepare_data` checks that the options fit together, picks the way and
returns the data dir's manifest; `summary` and `prepare_warnings` say what it made."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path

from nmt.data import CleanConfig
from nmt.errors import DataError
from nmt.files import Manifest
from nmt.monolingual import MONOLINGUAL, MonoPrepareConfig, prepare_mono
from nmt.multilingual import DEFAULT_TEMPERATURE, MultilingualConfig, parse_directions, prepare_multilingual
from nmt.normalize import UNICODE_FORMS
from nmt.prepare import PrepareConfig, prepare
from nmt.tokenizer import language_tag

BILINGUAL_LANGUAGE_CODE = re.compile(r"[A-Za-z0-9_-]+")  # a file name's suffix; zh-TW too, outside --directions


@dataclass
class PrepareRequest:
    """Every option of `nmt prepare`, by its name there (`--tsv-langs` is `tsv_langs`), its lists
    already split: a parallel corpus (`src`, `tgt` and one input), several `directions` (their
    inputs one for all or one per direction), or `mono` text files."""

    out: Path
    src: str | None = None
    tgt: str | None = None
    mono: list[Path] = field(default_factory=list)
    mono_langs: list[str] | None = None
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    tsv: list[Path] = field(default_factory=list)
    tsv_langs: list[tuple[str, ...]] = field(default_factory=list)  # the columns of one TSV, or of each
    hf: str | None = None
    hf_config: str | None = None
    hf_revision: str | None = None
    corpus: list[str] = field(default_factory=list)
    tagged_train: str | None = None
    directions: str | list[str] | None = None  # "de-en,en-de" or a list of such
    zero_shot: str | list[str] = ""
    lang_temperature: float | None = None  # None: DEFAULT_TEMPERATURE (with directions only)
    data_dir: Path | None = None
    valid_size: int = 1000
    test_size: int = 1000
    seed: int = 1
    split_by: str | None = None
    normalize: str = "NFC"
    max_words: int = 250
    max_ratio: float = 3.0
    dedup: bool = True
    vocab_size: int = 8000
    spm_type: str = "unigram"
    joint_vocab: bool = True
    character_coverage: float | None = None
    chinese_script: str = "simplified"
    spm_sample: int = 800_000
    spm_model: Path | None = None
    workers: int = 0
    overwrite: bool = False


def prepare_data(request: PrepareRequest, progress: bool = False) -> Manifest:
    """Build the data dir the request describes; a one-line `DataError` for options that do not
    fit together (the options monolingual text leaves unused are `MONO_OPTIONS`' complement: the
    command line refuses those itself, since only it knows which were given)."""
    if request.spm_sample < 1 or request.workers < 0:
        raise DataError("--spm-sample must be at least 1 and --workers at least 0")
    if request.normalize.upper() not in map(str.upper, UNICODE_FORMS):
        raise DataError(f"--normalize must be one of {', '.join(UNICODE_FORMS)} (got {request.normalize!r})")
    for option, codes in (("--src", [request.src]), ("--tgt", [request.tgt]), ("--mono-langs", request.mono_langs or []),
                          ("--tsv-langs", [code for langs in request.tsv_langs for code in langs])):
        for code in codes:
            if code is not None and not BILINGUAL_LANGUAGE_CODE.fullmatch(code):
                raise DataError(f"{option}: {code!r} is not a language code (letters, digits, _ and -, as de or zh-TW)")
    if request.mono:
        return prepare_mono(_mono_config(**{name: getattr(request, name) for name in MONO_OPTIONS}), progress=progress)
    _check_parallel_options(request)
    if request.directions is not None:
        return prepare_multilingual(_multilingual_config(request), progress=progress)
    if request.zero_shot or request.lang_temperature is not None:
        raise DataError("--zero-shot and --lang-temperature go with --directions")
    return prepare(_parallel_config(request), progress=progress)


def _mono_config(out: Path, mono: list[Path], mono_langs: list[str] | None, valid_size: int, seed: int, normalize: str,
                 chinese_script: str, vocab_size: int, spm_type: str, character_coverage: float | None, spm_sample: int,
                 spm_model: Path | None, workers: int, overwrite: bool) -> MonoPrepareConfig:
    """Monolingual text: its parameters are the options it takes."""
    return MonoPrepareConfig(
        out_dir=out, files=list(mono), langs=mono_langs, valid_sentences=valid_size, seed=seed,
        clean=CleanConfig(normalization=normalize, chinese_script=chinese_script), vocab_size=vocab_size,
        spm_type=spm_type, character_coverage=character_coverage, spm_max_sentences=spm_sample,
        spm_model=spm_model, workers=workers, overwrite=overwrite,
    )


MONO_OPTIONS = tuple(inspect.signature(_mono_config).parameters)  # the request's fields monolingual text uses


def _check_parallel_options(request: PrepareRequest) -> None:
    for option, value, needed, given in (("--mono-langs", request.mono_langs, "--mono", request.mono),
                                         ("--tsv-langs", request.tsv_langs, "--tsv", request.tsv),
                                         ("--hf-config", request.hf_config, "--hf", request.hf),
                                         ("--hf-revision", request.hf_revision, "--hf", request.hf)):
        if value and not given:
            raise DataError(f"{option} goes with {needed}")
    if any(len(langs) < 2 for langs in request.tsv_langs):
        raise DataError("--tsv-langs needs one language per column, e.g. en,es")
    if len(request.tsv_langs) > 1 and len(request.tsv) < 2:
        raise DataError("several --tsv-langs name the columns of several --tsv inputs (with --directions), one each")
    if request.directions is None and (request.src is None or request.tgt is None):
        raise DataError("--src and --tgt name the languages of a parallel corpus (or give --directions, or --mono FILE)")
    inputs = (request.tsv, request.corpus, request.train, request.valid, request.test)
    if request.directions is None and any(len(x) > 1 for x in inputs):
        raise DataError("several --train, --valid, --test, --tsv or --corpus inputs go with --directions, one per direction")
    if request.directions is not None and (request.src or request.tgt):
        raise DataError("--directions names the languages; leave out --src and --tgt")
    if request.directions is not None and request.tagged_train is not None:
        raise DataError("--tagged-train goes with one language pair (--src and --tgt), not --directions")


def _parallel_config(request: PrepareRequest) -> PrepareConfig:
    """The bilingual settings (for directions: those every direction shares, with the first of
    each input)."""
    one_tsv = len(request.tsv_langs) == 1 and len(request.tsv) < 2
    return PrepareConfig(
        out_dir=request.out, src_lang=request.src or "", tgt_lang=request.tgt or "",
        train_prefix=_first(request.train), valid_prefix=_first(request.valid), test_prefix=_first(request.test),
        tsv=_first(request.tsv), tsv_langs=request.tsv_langs[0] if one_tsv else None, hf_name=request.hf,
        hf_config=request.hf_config, hf_revision=request.hf_revision, corpus=_first(request.corpus),
        corpus_dir=request.data_dir, tagged_train_prefix=request.tagged_train, valid_size=request.valid_size, test_size=request.test_size, seed=request.seed,
        split_by=request.split_by,
        clean=CleanConfig(normalization=request.normalize, chinese_script=request.chinese_script,
                          max_words=request.max_words, max_ratio=request.max_ratio, dedup=request.dedup),
        vocab_size=request.vocab_size, spm_type=request.spm_type, joint_vocab=request.joint_vocab,
        character_coverage=request.character_coverage, spm_max_sentences=request.spm_sample,
        spm_model=request.spm_model, workers=request.workers, overwrite=request.overwrite,
    )


def _first(values: list):
    return values[0] if values else None


def _multilingual_config(request: PrepareRequest) -> MultilingualConfig:
    return MultilingualConfig(
        _parallel_config(request), parse_directions(request.directions or ""), parse_directions(request.zero_shot),
        DEFAULT_TEMPERATURE if request.lang_temperature is None else request.lang_temperature,
        list(request.tsv), list(request.corpus), list(request.train), list(request.valid), list(request.test),
        list(request.tsv_langs) if len(request.tsv) > 1 else [],
    )


def summary(out: Path, manifest: Manifest) -> str:
    """What `nmt prepare` prints when it is done: where, how long, how much of each split, and
    the vocabulary."""
    stages = ", ".join(f"{name} {seconds} s" for name, seconds in manifest.stage_seconds.items())
    if manifest.kind == MONOLINGUAL:
        return _mono_summary(out, manifest, stages)
    if manifest.multilingual:
        return _multilingual_summary(out, manifest, stages)
    return _parallel_summary(out, manifest, stages)


def prepare_warnings(manifest: Manifest) -> list[str]:
    """What the user should know about the data dir: a language seen only in zero-shot
    directions has none of its text in the SentencePiece sample."""
    sample = manifest.input.get("spm_sample") or {}
    unsampled = [lang for lang in manifest.languages if sample and lang not in sample]
    if not unsampled:
        return []
    return [f"{', '.join(unsampled)} only in --zero-shot directions: none of their text is in the SentencePiece "
            "sample, so their words may split into many pieces or <unk>"]


def _parallel_summary(out: Path, manifest: Manifest, stages: str) -> str:
    vocab, unk = manifest.vocab, manifest.valid_unk_percent
    lines = [
        f"prepared {out} ({manifest.src_lang} -> {manifest.tgt_lang}) in {manifest.seconds} s ({stages}); "
        f"{manifest.disk_bytes / 1e6:.1f} MB on disk",
        "cleaning: {pairs_read} pairs read; changed: {normalized} by normalization, "
        "{whitespace_fixed} by whitespace; dropped: {empty} empty, {too_long} too long, {ratio} by length "
        "ratio, {duplicates} duplicates, {overlap_with_valid_test} also in valid/test".format(**manifest.cleaning),
    ]
    lines += [f"{split:>5}: {counts['pairs']:>8} pairs, {counts['src_tokens']:>9} source tokens, "
              f"{counts['tgt_tokens']:>9} target tokens" + (f" ({counts['tagged_pairs']} pairs tagged)" if "tagged_pairs" in counts else "")
              for split, counts in manifest.counts.items()]
    lines.append(f"vocab: {'joint' if vocab.joint else 'separate'} {vocab.type or 'given'}, {vocab.src_size} source / "
                 f"{vocab.tgt_size} target pieces; <unk> in valid: {unk['src']}% source, {unk['tgt']}% target tokens")
    return "\n".join(lines)


def _multilingual_summary(out: Path, manifest: Manifest, stages: str) -> str:
    zero_shot = f"; zero-shot {', '.join(manifest.zero_shot)}" if manifest.zero_shot else ""
    lines = [f"prepared {out} (multilingual: {', '.join(manifest.directions)}{zero_shot}) in {manifest.seconds} s "
             f"({stages}); {manifest.disk_bytes / 1e6:.1f} MB on disk"]
    for direction, counts in manifest.direction_counts.items():
        cleaning = manifest.direction_cleaning.get(direction)
        dropped = "" if cleaning is None else (
            "; read {pairs_read}, dropped {empty} empty, {too_long} too long, {ratio} by ratio, {duplicates} duplicates, "
            "{overlap_with_valid_test} in valid/test, {sharing_held_out_sentence} sharing a sentence with a held-out set".format(**cleaning))
        lines.append(f"{direction:>7}: " + ", ".join(f"{counts[s]['pairs']} {s}" for s in ("train", "valid", "test") if s in counts)
                     + dropped)
    vocab, unk = manifest.vocab, manifest.valid_unk_percent
    sample = manifest.input.get("spm_sample") or {}
    lines.append(f"vocab: joint {vocab.type or 'given'}, {vocab.src_size} pieces with the tags "
                 + " ".join(language_tag(lang) for lang in manifest.languages)
                 + ("; SentencePiece sample: " + ", ".join(f"{lang} {n}" for lang, n in sample.items()) if sample else "")
                 + f"; <unk> in valid (the direction with most): {unk['src']}% source, {unk['tgt']}% target tokens")
    return "\n".join(lines)


def _mono_summary(out: Path, manifest: Manifest, stages: str) -> str:
    lines = [f"prepared {out} (monolingual, {manifest.src_lang}) in {manifest.seconds} s ({stages}); "
             f"{manifest.disk_bytes / 1e6:.1f} MB on disk"]
    lines += [f"{split:>5}: {counts['sentences']:>8} sentences, {counts['tokens']:>9} tokens, "
              f"{counts['documents']:>6} documents" for split, counts in manifest.counts.items()]
    lines.append(f"vocab: joint {manifest.vocab.type or 'given'}, {manifest.vocab.src_size} pieces")
    return "\n".join(lines)
