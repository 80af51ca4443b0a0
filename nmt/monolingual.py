"""`nmt prepare --mono`: a monolingual data dir for `nmt pretrain`, through the same streaming
path as parallel data: each file's language normalization (Chinese folding included), one joint
SentencePiece model with prepare's settings (CJK coverage, byte fallback, the reserved [MASK],
[CLS] and [SEP]), memory-mapped token files written by worker processes, and a manifest.

    DATA_DIR/train.text.tokens.npy, train.text.offsets.npy   sentences, as prepare writes them
    DATA_DIR/train.documents.npy                             (N,) document number of each sentence
    DATA_DIR/valid.text.*, valid.documents.npy               held-out sentences (whole documents)
    DATA_DIR/spm.joint.model, manifest.json                  kind "monolingual"

Text: one sentence per line, a blank line between documents; each file starts a new document.
"""

from __future__ import annotations

import sys
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nmt import __version__
from nmt.data import CleanConfig, clean_whitespace, read_lines
from nmt.errors import DataError
from nmt.files import SPM_JOINT, Manifest, Vocabulary, monolingual_files
from nmt.normalize import Normalization, base_language, language_normalization
from nmt.prepare import (
    ENCODE_CHUNK_PAIRS,
    PARALLEL_ENCODE_PAIRS,
    Stages,
    build_data_dir,
    copy_sentencepiece,
    given_sentencepiece,
    sentencepiece_coverage,
)
from nmt.shards import chunked, encode_to_token_files, token_dtype, worker_count
from nmt.tokenizer import check_sentencepiece_settings, file_sha256, load_sentencepiece, train_sentencepiece

MONOLINGUAL = "monolingual"  # Manifest.kind of such a data dir
LANGUAGE_UNKNOWN = "und"  # a file whose name says no language: Unicode normalization only


@dataclass
class MonoPrepareConfig:
    out_dir: Path
    files: list[Path]
    langs: list[str] | None = None  # the language of each file; default: its name's suffix (text.de, text.de.gz)
    valid_sentences: int = 1000  # held out: whole documents when there are 20 or more, else the last lines of each
    seed: int = 1
    clean: CleanConfig = field(default_factory=CleanConfig)  # its normalization and chinese_script apply
    vocab_size: int = 8000
    spm_type: str = "unigram"
    character_coverage: float | None = None
    spm_max_sentences: int = 800_000
    spm_model: Path | None = None  # use this SentencePiece model instead of training one
    workers: int = 0
    overwrite: bool = False


def file_language(path: Path) -> str:
    """The language a file's name gives: `news.de`, `news.de.gz`, `mono.zh-TW.txt`, `mono.zh_TW`
    -> de, de, zh-TW, zh_TW."""
    parts = [p for p in Path(path).name.split(".")[1:] if p not in ("gz", "txt")]
    lang = parts[-1] if parts else ""
    known = 2 <= len(base_language(lang)) <= 3 and lang.replace("-", "").replace("_", "").isalpha()
    return lang if known else LANGUAGE_UNKNOWN


def prepare_mono(config: MonoPrepareConfig, progress: bool = False) -> Manifest:
    """Build a monolingual data dir; returns its manifest."""
    started = time.time()
    if not config.files:
        raise DataError("no monolingual text given: pass --mono FILE (one or more)")
    for path in config.files:
        if not Path(path).is_file():
            raise DataError(f"text file not found: {path}")
    if config.langs is not None and len(config.langs) != len(config.files):
        raise DataError(f"{len(config.files)} --mono files but {len(config.langs)} languages")
    check_sentencepiece_settings(config.spm_type, config.character_coverage, config.spm_max_sentences, config.vocab_size)
    if config.valid_sentences < 1 or config.seed < 0:
        raise DataError("--valid-size must be at least 1 and --seed 0 or more")
    if config.spm_model is not None:
        config.spm_model = given_sentencepiece(Path(config.spm_model))
    return build_data_dir(
        Path(config.out_dir), config.overwrite, lambda tmp_dir: _build_mono_dir(tmp_dir, config, progress), started,
        [Path(p) for p in config.files],
    )


def _languages(config: MonoPrepareConfig) -> list[str]:
    return list(config.langs) if config.langs is not None else [file_language(p) for p in config.files]


def normalization(lang: str, clean: CleanConfig) -> Normalization:
    """What prepare applies to text in `lang` (a file of unknown language: the Unicode form)."""
    return language_normalization("" if lang == LANGUAGE_UNKNOWN else lang, clean.normalization, clean.chinese_script)


def read_documents(paths: list[Path], langs: list[str], clean: CleanConfig) -> Iterator[tuple[int, str]]:
    """(document number, sentence) for each non-empty line, normalized for its file's language;
    a blank line or a new file starts a new document."""
    document = 0
    for path, lang in zip(paths, langs):
        normalize = normalization(lang, clean)
        started = False
        for line in read_lines(Path(path), corpus=True):
            text = clean_whitespace(normalize(line))
            if text:
                yield document, text
                started = True
            elif started:
                document, started = document + 1, False
        if started:
            document += 1


def hold_out(documents: np.ndarray, count: int, seed: int) -> np.ndarray:
    """(N,) True at the sentences held out for validation (about `count`). Whole documents, drawn
    at random among those that fit, when at least two of them make up half the count or more (so
    that next-sentence prediction has pairs of documents); otherwise the last lines of long
    documents (each its share of the count, at least 2, at most half of it), drawn at random
    until the count is reached, so that each language's long texts give theirs."""
    count = max(1, min(count, len(documents) // 10))
    rng = np.random.default_rng(seed)
    _, starts, sizes = np.unique(documents, return_index=True, return_counts=True)
    held = np.zeros(len(documents), dtype=bool)
    taken, room = [], count
    for d in rng.permutation(len(sizes)).tolist():
        if sizes[d] <= room:  # a document larger than what is left would overshoot the count
            taken.append(d)
            room -= int(sizes[d])
    if sizes.max() < 4 and not taken:  # short documents, none small enough: the shortest
        taken = [int(np.argmin(sizes))]
    if (len(taken) >= 2 and count - room >= count / 2) or sizes.max() < 4:
        for d in taken:
            held[starts[d] : starts[d] + sizes[d]] = True
        return held
    share = np.round(sizes * count / len(documents)).astype(np.int64)
    tails = np.where(sizes >= 4, np.clip(share, 2, sizes // 2), 0)
    total = 0
    for d in rng.permutation(len(sizes)).tolist():
        if total >= count:
            break
        held[starts[d] + sizes[d] - tails[d] : starts[d] + sizes[d]] = True
        total += int(tails[d])
    return held


def _build_mono_dir(directory: Path, config: MonoPrepareConfig, progress: bool) -> Manifest:
    stages, langs = Stages(), _languages(config)
    work = directory / "work.txt"  # the normalized sentences, removed before the data dir is complete
    documents = array("I")
    with open(work, "w", encoding="utf-8", newline="\n") as f:
        for document, text in tqdm(read_documents(config.files, langs, config.clean), desc="reading", unit=" lines",
                                   unit_scale=True, file=sys.stderr, disable=None if progress else True, mininterval=1.0):
            f.write(text + "\n")
            documents.append(document)
    documents = np.frombuffer(documents, dtype=np.uint32)
    if len(documents) < 10:
        raise DataError(f"only {len(documents)} sentences in {', '.join(map(str, config.files))}: too few to pretrain on")
    held = hold_out(documents, config.valid_sentences, config.seed)
    stages.done("read_clean")

    model = _sentencepiece(directory, work, config, langs)
    processor = load_sentencepiece(model)
    dtype = token_dtype(processor.get_piece_size())
    stages.done("sentencepiece")

    counts = {}
    workers = worker_count(config.workers) if (~held).sum() >= PARALLEL_ENCODE_PAIRS else 1
    for split, rows in (("train", ~held), ("valid", held)):
        text, documents_path = monolingual_files(directory, split)
        with open(work, encoding="utf-8", newline="\n") as f:
            selected = ((line[:-1],) for line, keep in zip(f, rows) if keep)
            (written,) = encode_to_token_files(chunked(selected, ENCODE_CHUNK_PAIRS), [model], directory,
                                               [text], dtype, workers if split == "train" else 1)
        np.save(documents_path, documents[rows])
        counts[split] = {"sentences": written["sequences"], "tokens": written["tokens"],
                         "documents": len(np.unique(documents[rows]))}
    work.unlink()
    stages.done("encode")
    return _manifest(directory, config, langs, model, processor.get_piece_size(), counts, dtype, stages, workers)


def _sentencepiece(directory: Path, work: Path, config: MonoPrepareConfig, langs: list[str]) -> Path:
    """The given model, or one trained on a random sample of the sentences."""
    if config.spm_model is not None:
        return copy_sentencepiece(Path(config.spm_model), directory / f"{SPM_JOINT}.model")
    with open(work, encoding="utf-8", newline="\n") as f:
        total = sum(1 for _ in f)
    rng = np.random.default_rng(config.seed)
    chosen = np.zeros(total, dtype=bool)
    chosen[rng.choice(total, size=min(total, config.spm_max_sentences), replace=False)] = True
    with open(work, encoding="utf-8", newline="\n") as f:
        return train_sentencepiece(
            (line[:-1] for line, keep in zip(f, chosen) if keep), directory / SPM_JOINT, config.vocab_size,
            model_type=config.spm_type, max_sentences=config.spm_max_sentences,
            **sentencepiece_coverage(config.character_coverage, tuple(langs)),
        )


def _manifest(
    directory: Path, config: MonoPrepareConfig, langs: list[str], model: Path, size: int, counts: dict,
    dtype: np.dtype, stages: Stages, workers: int,
) -> Manifest:
    sha = file_sha256(model)
    if config.spm_model is not None:  # its training is not known here
        vocab = Vocabulary(model.name, model.name, size, size, sha, sha, joint=True, type=None,
                           given_model=str(config.spm_model))
    else:
        vocab = Vocabulary(
            model.name, model.name, size, size, sha, sha, joint=True, type=config.spm_type,
            requested_size=config.vocab_size, sample_sentences=config.spm_max_sentences,
            character_coverage=sentencepiece_coverage(config.character_coverage, tuple(langs))["character_coverage"],
        )
    first = normalization(langs[0], config.clean).as_dict()
    languages = "+".join(dict.fromkeys(langs))
    files = sorted(p.name for p in directory.iterdir())
    return Manifest(
        src_lang=languages, tgt_lang=languages, vocab=vocab, counts=counts, kind=MONOLINGUAL,
        normalization={"src": first, "tgt": first},
        filters={"normalization": config.clean.normalization, "chinese_script": config.clean.chinese_script},
        input={"mono": [str(p) for p in config.files], "langs": langs}, token_dtype=dtype.name, files=files,
        disk_bytes=sum((directory / name).stat().st_size for name in files), stage_seconds=stages.seconds,
        encode_workers=workers, split_seed=config.seed, nmt_version=__version__,
    )
