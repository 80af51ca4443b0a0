"""`nmt prepare`: parallel text -> cleaned, split, SentencePiece-encoded, binarized data dir."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import itertools
import os
import shutil
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nmt import __version__
from nmt.atomic import check_replaceable, is_gzip_name, process_running, replace_dir, temporary_beside
from nmt.corpora import find_corpus
from nmt.data import (
    CleanConfig,
    CleanStats,
    PairCleaner,
    clean_whitespace,
    find_side_file,
    load_hf_corpus,
    pair_hash,
    read_parallel_files,
    read_tsv,
)
from nmt.errors import CheckpointError, DataError
from nmt.files import SPM_JOINT, SPM_SRC, SPM_TGT, Manifest, VocabInfo, Vocabulary, text_files
from nmt.normalize import is_cjk
from nmt.paths import followed_link
from nmt.shards import chunked, encode_to_token_files, token_dtype, worker_count, write_token_file
from nmt.tokenizer import (
    CLS,
    UNK,
    Tokenizer,
    check_sentencepiece_settings,
    file_sha256,
    has_reserved_symbols,
    load_sentencepiece,
    train_sentencepiece,
)

ENCODE_CHUNK_PAIRS = 20_000  # pairs per encoding task
PARALLEL_ENCODE_PAIRS = 200_000  # smaller corpora are encoded in this process: workers take time to start


@dataclass
class PrepareConfig:
    out_dir: Path
    src_lang: str
    tgt_lang: str
    # Exactly one input: file prefixes (`PREFIX.LANG[.gz]`), a TSV file, or a `datasets` corpus.
    train_prefix: str | None = None
    valid_prefix: str | None = None
    test_prefix: str | None = None
    tsv: Path | None = None
    tsv_langs: tuple[str, str] | None = None  # language of each TSV column, in order
    hf_name: str | None = None
    hf_config: str | None = None
    hf_revision: str | None = None
    corpus: str | None = None  # a name from nmt.corpora.CORPORA
    corpus_dir: Path | None = None  # read `corpus` from these local files instead of the Hub
    # More training pairs (`PREFIX.LANG` files), each source after the reserved [CLS] symbol: tagged
    # back-translation (Caswell et al., 2019), synthetic sources the model can tell from real ones.
    # Never carved into valid or test.
    tagged_train_prefix: str | None = None
    # Splits carved out of the training corpus when the input has none (fixed seed).
    valid_size: int = 1000
    test_size: int = 1000
    seed: int = 1
    # Carve by this language's sentences: all pairs that share one (several translations of it)
    # go to the same split, so that no sentence of valid/test in this language is in train.
    split_by: str | None = None
    clean: CleanConfig = field(default_factory=CleanConfig)
    # SentencePiece
    vocab_size: int = 8000
    spm_type: str = "unigram"
    joint_vocab: bool = True
    character_coverage: float | None = None  # None: 0.9995 for Chinese, Japanese, Korean, else 1.0
    # Sentences SentencePiece trains on, sampled at random. Its trainer holds them all and is
    # prepare's largest memory cost: with 800k sentences of 130 characters, prepare peaks at
    # 2.7 GB. More adds little to vocabularies of up to tens of thousands of pieces.
    spm_max_sentences: int = 800_000
    # Use these SentencePiece models instead of training them: a model file (joint), or a checkpoint
    # directory's, separate ones if it has them.
    spm_model: Path | None = None
    workers: int = 0  # encoding processes; 0: one per core
    overwrite: bool = False


def prepare(config: PrepareConfig, progress: bool = False) -> Manifest:
    """Build the data dir; returns its manifest (which includes the cleaning summary).

    The training pairs stream through: read and clean one at a time into work files, find
    duplicates and held-out pairs from 64-bit hashes, train SentencePiece on a sample, encode
    in worker processes into token files. Memory holds a few bytes per pair, not the corpus.
    """
    started = time.time()
    out_dir = Path(config.out_dir)
    if config.src_lang == config.tgt_lang:
        raise DataError("source and target languages must differ")
    check_sentencepiece_settings(config.spm_type, config.character_coverage, config.spm_max_sentences, config.vocab_size)
    if config.spm_model is not None:
        source, target = given_sentencepiece_models(Path(config.spm_model))
        if source == target and not config.joint_vocab:
            raise DataError("--spm-model gives one model for both languages; it cannot go with --separate-vocab")
        config.joint_vocab = source == target  # a checkpoint's separate models stay separate
        if not config.joint_vocab:
            check_given_sides(Path(config.spm_model), config.src_lang, config.tgt_lang)
    check_split_settings(config)
    if config.split_by is not None and config.split_by not in (config.src_lang, config.tgt_lang):
        raise DataError(f"--split-by must be the source or target language ({config.src_lang} or {config.tgt_lang})")
    return build_data_dir(out_dir, config.overwrite, lambda tmp_dir: _build_data_dir(tmp_dir, config, progress), started,
                          input_paths(config))


def check_split_settings(config: PrepareConfig) -> None:
    """The sizes and seed of the held-out splits carved out of the training pairs."""
    if config.valid_size < 1 or config.test_size < 1:
        raise DataError("--valid-size and --test-size must be at least 1")
    if config.seed < 0:
        raise DataError(f"--seed must be 0 or more (got {config.seed})")


def input_paths(config: PrepareConfig) -> list[Path]:
    """The files and folders prepare reads."""
    prefixes = (config.train_prefix, config.valid_prefix, config.test_prefix, config.tagged_train_prefix)
    given = (config.tsv, config.corpus_dir, config.hf_name if config.hf_name and Path(config.hf_name).exists() else None)
    return [*prefix_files(prefixes, (config.src_lang, config.tgt_lang)), *(Path(p) for p in given if p)]


def prefix_files(prefixes: Iterable[str | None], langs: Iterable[str]) -> list[Path]:
    """The files `PREFIX.LANG` that file prefixes stand for (a folder named PREFIX beside them is
    no input)."""
    return [Path(f"{prefix}.{lang}") for prefix in prefixes if prefix for lang in langs]


def build_data_dir(out_dir: Path, overwrite: bool, build: Callable[[Path], Manifest], started: float,
                   inputs: Sequence[Path]) -> Manifest:
    """Run `build(tmp_dir)` in a temporary directory beside `out_dir`, write its manifest there
    and put it in place of `out_dir`: an interrupted build leaves nothing that is read as data.
    `inputs`: what the build reads, which may not lie in `out_dir`."""
    out_dir = followed_link(out_dir)
    _tidy_leftovers(out_dir)
    _check_out_dir(out_dir, overwrite, inputs)
    made = [p for p in out_dir.absolute().parents if not p.exists()]  # the folders above out_dir it makes
    tmp_dir = temporary_beside(out_dir)
    try:
        _make_tmp_dir(out_dir, tmp_dir)  # fails now, not after the work, if out_dir cannot be written
        manifest = build(tmp_dir)
        manifest.seconds = round(time.time() - started, 1)
        manifest.write(tmp_dir)
        replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        for folder in made:  # deepest first: a failed run leaves no empty folders of its making
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return manifest


def _check_out_dir(out_dir: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    """Refuse an `out_dir` whose replacing would lose anything but an earlier data dir: the
    user's corpus, a model, the working directory."""
    out = out_dir.resolve()
    if out in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise DataError(f"output directory {out_dir} is the current directory or holds it: name a new directory")
    for given in inputs:  # a file prefix `out` names the files out.LANG, beside the folder out/
        if out in given.resolve().parents or (given.is_dir() and given.resolve() == out):
            raise DataError(f"{given} is inside the output directory {out_dir}, which prepare replaces: "
                            "move it or name another --out")
    check_replaceable(out_dir, overwrite, Manifest.NAME, "a data dir", DataError, recognise=Manifest.written_by_nmt)


class Stages:
    """Wall time of each stage of prepare."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.time()

    def done(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(now - self.started, 1)
        self.started = now


@dataclass
class CleanedCorpus:
    """One language pair read and cleaned: its pairs in the work files `work/train.{src,tgt}`,
    which of them are training pairs (`keep`: not duplicates, not held out), and the held-out
    splits as written for translation and scoring (`eval_raw`) and as the model sees them."""

    work: Path
    keep: np.ndarray
    eval_raw: dict[str, list[tuple[str, str]]]
    eval_clean: dict[str, list[tuple[str, str]]]
    stats: CleanStats
    overlap: int  # training pairs dropped because valid or test holds them
    cleaner: PairCleaner
    tagged_from: int  # the work pairs from this one on are --tagged-train's (len(keep): none)

    def training_pairs(self) -> Iterator[tuple[str, str]]:
        return _work_pairs(self.work, self.keep)

    def tagged_pairs(self) -> int:
        return int(self.keep[self.tagged_from :].sum())

    def cleaning(self) -> dict:
        return {**self.stats.as_dict(), "overlap_with_valid_test": self.overlap}


def _build_data_dir(directory: Path, config: PrepareConfig, progress: bool) -> Manifest:
    stages = Stages()
    work = directory / "work"  # cleaned training text, removed before the data dir is complete
    work.mkdir()
    corpus = clean_and_split(config, work, progress, stages)

    src_model, tgt_model = _train_sentencepiece(directory, work, corpus.keep, config)
    tokenizer = Tokenizer(src_model, tgt_model)
    dtype = token_dtype(max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size))
    stages.done("sentencepiece")

    counts = {"train": encode_training_pairs(corpus, [src_model, tgt_model], directory, "train", dtype, config, progress)}
    shutil.rmtree(work)
    stages.done("encode")

    for split in ("valid", "test"):
        counts[split], unk_rate = write_eval_split(directory, split, corpus.eval_clean[split], corpus.eval_raw[split], tokenizer, dtype)
        if split == "valid":
            valid_unk = unk_rate
    stages.done("valid_test")
    return Manifest(
        src_lang=config.src_lang, tgt_lang=config.tgt_lang, vocab=vocabulary_record(src_model, tgt_model, tokenizer, config, (config.src_lang, config.tgt_lang)),
        counts=counts, normalization={"src": corpus.cleaner.normalize[0].as_dict(), "tgt": corpus.cleaner.normalize[1].as_dict()},
        filters=asdict(config.clean), cleaning=corpus.cleaning(), input=_describe_input(config), valid_unk_percent=valid_unk,
        token_dtype=dtype.name, stage_seconds=stages.seconds, encode_workers=worker_count_for(counts["train"]["pairs"], config),
        split_seed=config.seed, split_by=config.split_by, nmt_version=__version__, **directory_files(directory),
    )


def directory_files(directory: Path) -> dict:
    """The manifest's list of the data dir's files and their size."""
    files = sorted(p.name for p in directory.iterdir())
    return {"files": files, "disk_bytes": sum((directory / name).stat().st_size for name in files)}


def vocabulary_record(src_model: Path, tgt_model: Path, tokenizer: Tokenizer, config: PrepareConfig, langs: tuple[str, ...]) -> Vocabulary:
    """The manifest's vocabulary: how prepare trained it, or (--spm-model) only where it came from."""
    files = dict(src_model=src_model.name, tgt_model=tgt_model.name, src_size=tokenizer.src_vocab_size,
                 tgt_size=tokenizer.tgt_vocab_size, src_sha256=file_sha256(src_model), tgt_sha256=file_sha256(tgt_model),
                 joint=config.joint_vocab)
    if config.spm_model is not None:
        return Vocabulary(**files, type=None, given_model=str(config.spm_model))
    return Vocabulary(
        **files, type=config.spm_type, requested_size=config.vocab_size,
        character_coverage=sentencepiece_coverage(config.character_coverage, langs)["character_coverage"],
        sample_sentences=config.spm_max_sentences,
    )


def worker_count_for(pairs: int, config: PrepareConfig) -> int:
    """Encoding processes: one per core for large corpora; small ones are encoded in this one."""
    return worker_count(config.workers) if pairs >= PARALLEL_ENCODE_PAIRS else 1


def encode_training_pairs(
    corpus: CleanedCorpus, models: list[Path], directory: Path, stem: str, dtype: np.dtype, config: PrepareConfig,
    progress: bool, prefixes: list[list[int]] | None = None,
) -> dict:
    """The corpus's training pairs as the token files STEM.src and STEM.tgt; returns their counts.
    `prefixes`: ids that start every pair's sides (a language tag); without them, --tagged-train's
    sources start with [CLS]."""
    train_count, tagged = int(corpus.keep.sum()), corpus.tagged_pairs()
    prefixed_from = 0 if prefixes or not tagged else train_count - tagged
    prefixes = prefixes or ([[CLS], []] if tagged else None)
    with tqdm(total=train_count, desc="encoding", unit=" pairs", unit_scale=True, file=sys.stderr,
              disable=None if progress else True, mininterval=1.0) as bar:
        src_counts, tgt_counts = encode_to_token_files(
            chunked(corpus.training_pairs(), ENCODE_CHUNK_PAIRS), models, directory, [f"{stem}.src", f"{stem}.tgt"],
            dtype, worker_count_for(train_count, config), on_chunk=bar.update, prefixes=prefixes, prefixed_from=prefixed_from,
        )
    counts = {"pairs": train_count, "src_tokens": src_counts["tokens"], "tgt_tokens": tgt_counts["tokens"]}
    return {**counts, "tagged_pairs": tagged} if tagged else counts


def write_eval_split(
    directory: Path, stem: str, clean: list[tuple[str, str]], raw: list[tuple[str, str]], tokenizer: Tokenizer,
    dtype: np.dtype,
) -> tuple[dict, dict]:
    """A held-out split as token files (STEM.src, STEM.tgt) and as text to translate and score
    (STEM.src.txt, STEM.tgt.txt); returns its counts and the share of <unk> tokens per side."""
    src_ids = tokenizer.encode_src([s for s, _ in clean])
    tgt_ids = tokenizer.encode_tgt([t for _, t in clean])
    write_token_file(directory, f"{stem}.src", src_ids, dtype)
    write_token_file(directory, f"{stem}.tgt", tgt_ids, dtype)
    counts = {"pairs": len(clean), "src_tokens": sum(map(len, src_ids)), "tgt_tokens": sum(map(len, tgt_ids))}
    # how much of the text the vocabulary cannot spell
    unk_rate = {side: round(100.0 * sum(seq.count(UNK) for seq in ids) / max(sum(map(len, ids)), 1), 3)
                for side, ids in (("src", src_ids), ("tgt", tgt_ids))}
    for path, texts in zip(text_files(directory, stem), ([s for s, _ in raw], [t for _, t in raw])):
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(clean_whitespace(text) + "\n" for text in texts)
    return counts, unk_rate


def clean_and_split(config: PrepareConfig, work: Path, progress: bool, stages: Stages | None = None) -> CleanedCorpus:
    """Read `config`'s input into the work files `work/train.{src,tgt}` (cleaned), find the
    duplicates and hold out valid and test (given, or carved out of train)."""
    # A local folder read with `datasets` becomes Arrow files in its cache: here, in the work folder.
    train_pairs, given_eval, expected_pairs = _read_inputs(config, progress, work / "datasets-cache")
    if len(given_eval) == 1 and config.split_by is not None:  # a dataset's lone split: both carved by group
        given_eval = {}
    if given_eval and config.split_by is not None:
        raise DataError("--split-by applies when valid and test are carved out of the training data, not given")
    cleaner = PairCleaner(config.clean, config.src_lang, config.tgt_lang)
    group_side = None if config.split_by is None else (config.src_lang, config.tgt_lang).index(config.split_by)
    tagged = () if config.tagged_train_prefix is None else read_parallel_files(
        find_side_file(config.tagged_train_prefix, config.src_lang), find_side_file(config.tagged_train_prefix, config.tgt_lang))
    hashes, groups, tagged_from = _clean_to_work_files(train_pairs, cleaner, work, group_side, expected_pairs, progress, tagged)
    stats = cleaner.stats
    if stages:
        stages.done("read_clean")
    keep = _first_of_duplicates(hashes, config.clean.dedup, stats)
    for split, pairs in given_eval.items():
        if not pairs:
            raise DataError(f"the given {split} set has no lines")
    if given_eval:
        eval_raw, eval_clean, overlap = _hold_out_given(given_eval, cleaner, hashes, keep)
        for split in {"valid", "test"} - set(given_eval):  # a dataset with one held-out split: the other carved
            sizes = {"valid_size": config.valid_size if split == "valid" else 0,
                     "test_size": config.test_size if split == "test" else 0}
            before = int(keep.sum())
            eval_raw[split] = eval_clean[split] = _carve_out(dataclasses.replace(config, **sizes), work, keep, None, hashes,
                                                             tagged_from)[split]
            overlap += before - int(keep.sum()) - len(eval_clean[split])  # copies of them (--no-dedup)
    else:
        before = int(keep.sum())
        eval_raw = eval_clean = _carve_out(config, work, keep, groups, hashes, tagged_from)
        overlap = before - int(keep.sum()) - sum(map(len, eval_clean.values()))  # copies of them (--no-dedup)
    if not keep.any():
        raise DataError("no training pairs left once valid/test pairs are removed")
    if stages:
        stages.done("dedup_split")
    return CleanedCorpus(work, keep, eval_raw, eval_clean, stats, overlap, cleaner, tagged_from)


def _clean_to_work_files(
    pairs: Iterable[tuple[str, str]], cleaner: PairCleaner, work: Path, group_side: int | None,
    expected_pairs: int | None, progress: bool, tagged: Iterable[tuple[str, str]] = (),
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Write the pairs `cleaner` keeps to `work/train.{src,tgt}`, then the `tagged` ones; returns
    the hash of each written pair, with `group_side` the hash of its sentence on that side, and
    the number of pairs written before the tagged ones."""
    work.mkdir(parents=True, exist_ok=True)
    hash_list, group_list = array("Q"), array("Q")
    with open(work / "train.src", "w", encoding="utf-8", newline="\n") as src_file, \
            open(work / "train.tgt", "w", encoding="utf-8", newline="\n") as tgt_file:
        def write(pairs: Iterable[tuple[str, str]], total: int | None) -> None:
            for src, tgt in tqdm(pairs, desc="reading", unit=" pairs", unit_scale=True, file=sys.stderr,
                                 total=total, disable=None if progress else True, mininterval=1.0):
                pair = cleaner(src, tgt)
                if pair is not None:
                    src_file.write(pair[0] + "\n")
                    tgt_file.write(pair[1] + "\n")
                    hash_list.append(pair_hash(*pair))
                    if group_side is not None:
                        group_list.append(pair_hash(pair[group_side], ""))

        write(pairs, expected_pairs)
        tagged_from = len(hash_list)
        write(tagged, None)
    groups = np.frombuffer(group_list, dtype=np.uint64) if group_side is not None else None
    return np.frombuffer(hash_list, dtype=np.uint64), groups, tagged_from


def _first_of_duplicates(hashes: np.ndarray, dedup: bool, stats: CleanStats) -> np.ndarray:
    """Which work pairs to keep: all, or with `dedup` the first of each set of duplicates
    (counted in `stats`). No pair left is an error."""
    keep = np.ones(len(hashes), dtype=bool)
    if dedup and len(hashes):
        _, first = np.unique(hashes, return_index=True)
        keep[:] = False
        keep[first] = True
        stats.duplicates = len(hashes) - len(first)
    if not keep.any():
        raise DataError(f"no sentence pairs left after cleaning ({_dropped_summary(stats.as_dict())})")
    stats.kept = int(keep.sum())
    return keep


def _hold_out_given(
    given_eval: dict[str, list[tuple[str, str]]], cleaner: PairCleaner, hashes: np.ndarray, keep: np.ndarray
) -> tuple[dict, dict, int]:
    """The given valid/test pairs, raw (as references) and normalized; training pairs equal to
    one of them are dropped from `keep` (in place) and counted."""
    eval_raw, eval_clean = {}, {}
    for split, pairs in given_eval.items():
        eval_clean[split] = [cleaner.normalize_pair(*pair) for pair in pairs]
        eval_raw[split] = _references(pairs, eval_clean[split], cleaner)
    held_out = np.array([pair_hash(*p) for pairs in eval_clean.values() for p in pairs], dtype=np.uint64)
    in_held_out = keep & np.isin(hashes, held_out)
    keep &= ~in_held_out
    return eval_raw, eval_clean, int(in_held_out.sum())


def _carve_out(config: PrepareConfig, work: Path, keep: np.ndarray, groups: np.ndarray | None,
               hashes: np.ndarray, tagged_from: int) -> dict[str, list[tuple[str, str]]]:
    """Valid and test pairs drawn at random from the kept work pairs before the tagged ones (whole
    groups with --split-by), and dropped from `keep` in place with every copy of them (kept
    without dedup, or tagged)."""
    candidates = np.flatnonzero(keep[:tagged_from])
    _, first = np.unique(hashes[candidates], return_index=True)
    candidates = candidates[np.sort(first)]  # one of each pair: without dedup, copies stay in train
    needed = config.valid_size + config.test_size
    if len(candidates) <= needed:
        raise DataError(
            f"only {len(candidates)} pairs after cleaning: too few to hold out {config.valid_size} "
            f"valid and {config.test_size} test pairs; lower --valid-size/--test-size"
        )
    rng = np.random.default_rng(config.seed)
    if groups is None:
        picked = candidates[rng.permutation(len(candidates))[:needed]]
        held = {"test": np.sort(picked[: config.test_size]), "valid": np.sort(picked[config.test_size :])}
    else:
        held = _carve_groups(candidates, groups[candidates], config, rng)
        picked = np.concatenate([held["test"], held["valid"]])
    keep &= ~np.isin(hashes, hashes[picked])
    positions = np.sort(picked)
    found = dict(zip(positions.tolist(), _work_pairs(work, _mask(positions[-1] + 1, positions)))) if len(positions) else {}
    return {split: [found[i] for i in held[split].tolist()] for split in ("valid", "test")}


def _carve_groups(candidates: np.ndarray, groups: np.ndarray, config: PrepareConfig, rng) -> dict[str, np.ndarray]:
    """Test, then valid: whole groups (pairs sharing a sentence) in random order until each has
    at least its size."""
    unique, inverse = np.unique(groups, return_inverse=True)
    order = rng.permutation(len(unique))
    cumulative = np.cumsum(np.bincount(inverse, minlength=len(unique))[order])
    test_groups = int(np.searchsorted(cumulative, config.test_size)) + 1
    valid_end = int(np.searchsorted(cumulative, cumulative[test_groups - 1] + config.valid_size)) + 1
    if valid_end >= len(unique):
        raise DataError(f"too few distinct {config.split_by} sentences to hold out {config.valid_size} valid "
                        f"and {config.test_size} test pairs; lower --valid-size/--test-size")
    rank = np.empty(len(unique), dtype=np.int64)
    rank[order] = np.arange(len(unique))
    pair_rank = rank[inverse]
    return {
        "test": np.sort(candidates[pair_rank < test_groups]),
        "valid": np.sort(candidates[(pair_rank >= test_groups) & (pair_rank < valid_end)]),
    }


def _references(raw: list[tuple[str, str]], clean: list[tuple[str, str]], cleaner: PairCleaner) -> list[tuple[str, str]]:
    """The held-out pairs as written for translation and scoring: as given, but a target side in
    the target's normalization, as the model writes it: its Unicode form (a reference with its
    accents decomposed, NFD, would match no NFC output) and, for Chinese, the script, the width
    and the punctuation."""
    target = cleaner.normalize[1]
    if target.chinese_script == "simplified" or target.fold_width or target.cjk_punctuation:
        return [(r[0], c[1]) for r, c in zip(raw, clean)]
    return [(src, target(tgt)) for src, tgt in raw]


def _work_lines(work: Path) -> Iterator[tuple[str, str]]:
    with open(work / "train.src", encoding="utf-8", newline="\n") as src_file, \
            open(work / "train.tgt", encoding="utf-8", newline="\n") as tgt_file:
        for src, tgt in zip(src_file, tgt_file):
            yield src[:-1], tgt[:-1]


def _work_pairs(work: Path, selected: np.ndarray) -> Iterator[tuple[str, str]]:
    """The pairs of the work files where `selected` is True (reading stops where it ends)."""
    return itertools.compress(_work_lines(work), selected)


def _mask(length: int, positions: np.ndarray) -> np.ndarray:
    mask = np.zeros(int(length), dtype=bool)
    mask[positions] = True
    return mask


def _train_sentencepiece(directory: Path, work: Path, keep: np.ndarray, config: PrepareConfig) -> tuple[Path, Path]:
    """SentencePiece on a random sample of the training pairs: about `spm_max_sentences`
    sentences for the joint model (half from each side), or that many per side."""
    if config.spm_model is not None:
        source, target = given_sentencepiece_models(Path(config.spm_model))
        if config.joint_vocab:
            return (copy_sentencepiece(source, directory / f"{SPM_JOINT}.model"),) * 2
        return copy_sentencepiece(source, directory / f"{SPM_SRC}.model"), copy_sentencepiece(target, directory / f"{SPM_TGT}.model")
    kept = np.flatnonzero(keep)
    per_model = config.spm_max_sentences // 2 if config.joint_vocab else config.spm_max_sentences
    rng = np.random.default_rng(config.seed)
    mask = _mask(len(keep), rng.choice(kept, size=min(len(kept), max(per_model, 1)), replace=False))

    def sample(sides: tuple[int, ...]) -> Iterator[str]:
        for pair in _work_pairs(work, mask):
            for side in sides:
                yield pair[side]

    spm_args = dict(
        vocab_size=config.vocab_size,
        model_type=config.spm_type,
        max_sentences=config.spm_max_sentences,
    )
    if config.joint_vocab:
        langs = (config.src_lang, config.tgt_lang)
        model = train_sentencepiece(sample((0, 1)), directory / SPM_JOINT, **spm_args, **sentencepiece_coverage(config.character_coverage, langs))
        return model, model
    return (
        train_sentencepiece(sample((0,)), directory / SPM_SRC, **spm_args, **sentencepiece_coverage(config.character_coverage, (config.src_lang,))),
        train_sentencepiece(sample((1,)), directory / SPM_TGT, **spm_args, **sentencepiece_coverage(config.character_coverage, (config.tgt_lang,))),
    )


def sentencepiece_coverage(character_coverage: float | None, langs: tuple[str, ...]) -> dict:
    """Scripts of thousands of characters: cover 99.95% of the text with characters of their own
    and spell the rarest in bytes (byte fallback), so that no character becomes <unk>."""
    cjk = any(is_cjk(lang) for lang in langs)
    coverage = character_coverage if character_coverage is not None else (0.9995 if cjk else 1.0)
    return {"character_coverage": coverage, "byte_fallback": cjk}


def given_sentencepiece(path: Path) -> Path:
    """`--spm-model` for a data dir with one model for all its languages (monolingual,
    multilingual): a SentencePiece model file, or a checkpoint directory with a joint vocabulary."""
    source, target = given_sentencepiece_models(path)
    if source != target:
        raise DataError(f"{path} has separate source and target vocabularies; this data dir takes one model for all its languages")
    return source


def given_sentencepiece_models(path: Path) -> tuple[Path, Path]:
    """`--spm-model`: a SentencePiece model file for both languages, or a checkpoint directory's
    source and target models (the same file when its vocabulary is joint)."""
    if path.is_dir():
        try:
            vocab = VocabInfo.read(path).vocab
        except CheckpointError:
            raise DataError(f"{path} is a directory but not a checkpoint directory with a vocab.json") from None
        models = (path / vocab.src_model, path / vocab.tgt_model)
    else:
        models = (path, path)
    for model in models:
        if not model.is_file():
            raise DataError(f"SentencePiece model not found: {model}")
    return models


def check_given_sides(model_dir: Path, src_lang: str, tgt_lang: str) -> None:
    """A checkpoint's separate models serve its own sides: its source model for the source."""
    info = VocabInfo.read(model_dir)
    if src_lang == info.tgt_lang or tgt_lang == info.src_lang:
        raise DataError(f"{model_dir} has a source vocabulary for {info.src_lang} and a target one for {info.tgt_lang}, "
                        f"but this data is {src_lang}->{tgt_lang}")


def copy_sentencepiece(model: Path, target: Path) -> Path:
    """An existing model (say, the one `nmt pretrain` trained) copied to `target` in a data dir."""
    if not has_reserved_symbols(load_sentencepiece(model)):
        raise DataError(f"{model} does not reserve [MASK], [CLS] and [SEP] at ids 4-6; train it with this version")
    shutil.copyfile(model, target)
    return target


def _tidy_leftovers(out_dir: Path) -> None:
    """Tidy what a prepare that was killed (its process is gone) left beside `out_dir`: its
    unfinished directory is removed, never read as data, and a previous data dir it had moved
    aside to replace is put back."""
    if not out_dir.parent.is_dir():
        return
    for pattern in (f".{glob.escape(out_dir.name)}.tmp-*", f".{glob.escape(out_dir.name)}.old-*"):
        for stale in out_dir.parent.glob(pattern):
            pid = stale.name.rpartition("-")[2]
            if not pid.isdigit() or process_running(int(pid)):
                continue
            if pattern.endswith("old-*") and not out_dir.exists():
                os.replace(stale, out_dir)
            else:
                shutil.rmtree(stale, ignore_errors=True)


def _make_tmp_dir(out_dir: Path, tmp_dir: Path) -> None:
    """`tmp_dir`, an empty directory beside `out_dir`, where the data dir is built before it is renamed."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
    except OSError as e:
        raise DataError(f"cannot write the output directory {out_dir}: {e.strerror or e}") from None


def count_lines(path: Path) -> int | None:
    """Lines of an uncompressed file (a few seconds per GB); None for a .gz file."""
    if is_gzip_name(path):
        return None
    lines = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            lines += block.count(b"\n")
    return lines


def _read_inputs(config: PrepareConfig, progress: bool = False, local_cache: Path | None = None):
    """Returns (train pairs iterable, {split: pairs} for the splits the input provides, the
    number of training pairs when it is cheap to know for the progress bar, else None).
    `local_cache`: where `datasets` keeps what it reads from a local folder (a Hub dataset's
    download goes to its own cache, for the next run)."""
    chosen = [x is not None for x in (config.train_prefix, config.tsv, config.hf_name, config.corpus)]
    if sum(chosen) != 1:
        raise DataError("give exactly one input: --train PREFIX, --tsv FILE, --hf NAME or --corpus NAME")
    if config.corpus_dir is not None and config.corpus is None:
        raise DataError("--data-dir goes with --corpus")
    if config.corpus_dir is not None and not Path(config.corpus_dir).is_dir():  # else read as a Hub id, with retries
        raise DataError(f"--data-dir {config.corpus_dir}: folder not found")
    src, tgt = config.src_lang, config.tgt_lang
    given: dict[str, list[tuple[str, str]]] = {}
    if config.train_prefix is not None:
        src_file, tgt_file = find_side_file(config.train_prefix, src), find_side_file(config.train_prefix, tgt)
        for split, prefix in (("valid", config.valid_prefix), ("test", config.test_prefix)):
            if prefix is not None:
                given[split] = list(read_parallel_files(find_side_file(prefix, src), find_side_file(prefix, tgt)))
        if given and len(given) != 2:
            raise DataError("give both --valid and --test, or neither (then they are carved out of train)")
        shown = progress and sys.stderr.isatty()  # a progress bar with an ETA: worth a count
        return read_parallel_files(src_file, tgt_file), given, count_lines(src_file) if shown else None
    if config.tsv is not None:
        if config.valid_prefix or config.test_prefix:
            raise DataError("--valid/--test go with --train; a TSV corpus is split with --valid-size/--test-size")
        langs = list(config.tsv_langs or (src, tgt))
        for lang in (src, tgt):
            if lang not in langs:
                raise DataError(f"language {lang!r} is not one of the TSV columns ({', '.join(langs)})")
        columns = len(config.tsv_langs) if config.tsv_langs else None
        return read_tsv(Path(config.tsv), langs.index(src), langs.index(tgt), columns), given, None
    if config.corpus is not None:
        corpus = find_corpus(config.corpus, src, tgt)
        if config.corpus_dir is not None:
            # A copy of the Hub repository holds a folder per config (or parquet export): this corpus's.
            local = next((Path(config.corpus_dir) / sub for sub in (corpus.data_dir, corpus.config)
                          if sub and (Path(config.corpus_dir) / sub).is_dir()), Path(config.corpus_dir))
            splits = load_hf_corpus(str(local), None, src, tgt, cache_dir=local_cache)
        else:
            splits = load_hf_corpus(corpus.hub_id, corpus.config, src, tgt, corpus.revision, corpus.data_dir)
    else:
        local = Path(config.hf_name).exists()
        splits = load_hf_corpus(config.hf_name, config.hf_config, src, tgt, config.hf_revision,
                                cache_dir=local_cache if local else None)
    if config.valid_prefix or config.test_prefix:
        raise DataError("--valid/--test go with --train; --corpus and --hf bring their own splits (one they lack is carved "
                        "out with --valid-size/--test-size)")
    return splits["train"], {k: v for k, v in splits.items() if k != "train"}, None  # the missing one is carved


def _describe_input(config: PrepareConfig) -> dict:
    if config.tagged_train_prefix is not None:
        return {**_describe_input(dataclasses.replace(config, tagged_train_prefix=None)), "tagged_train": config.tagged_train_prefix}
    if config.train_prefix is not None:
        return {"train": config.train_prefix, "valid": config.valid_prefix, "test": config.test_prefix}
    if config.tsv is not None:
        return {"tsv": str(config.tsv), "columns": list(config.tsv_langs or (config.src_lang, config.tgt_lang))}
    if config.corpus is not None:
        return {"corpus": config.corpus, "local_files": str(config.corpus_dir) if config.corpus_dir else None}
    return {"datasets": config.hf_name, "config": config.hf_config, "revision": config.hf_revision}


def _dropped_summary(stats: dict) -> str:
    reasons = ("empty", "too_long", "ratio", "duplicates")
    return f"read {stats['pairs_read']}; dropped " + ", ".join(f"{stats[r]} {r.replace('_', ' ')}" for r in reasons)
