"""`nmt prepare`: parallel text -> cleaned, split, SentencePiece-encoded, binarized data dir."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nmt import __version__
from nmt.atomic import replace_dir
from nmt.data import (
    CleanConfig,
    clean_pairs,
    clean_whitespace,
    find_side_file,
    load_hf_corpus,
    normalize_text,
    read_parallel_files,
    read_tsv,
    token_dtype,
    write_token_file,
)
from nmt.corpora import find_corpus
from nmt.errors import DataError
from nmt.tokenizer import Tokenizer, file_sha256, train_sentencepiece

DATA_FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")


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
    # Splits carved out of the training corpus when the input has none (fixed seed).
    valid_size: int = 1000
    test_size: int = 1000
    seed: int = 1
    clean: CleanConfig = field(default_factory=CleanConfig)
    # SentencePiece
    vocab_size: int = 8000
    spm_type: str = "unigram"
    joint_vocab: bool = True
    character_coverage: float = 1.0
    spm_max_sentences: int = 1_000_000
    overwrite: bool = False


def prepare(config: PrepareConfig) -> dict:
    """Build the data dir; returns its manifest (which includes the cleaning summary)."""
    started = time.time()
    out_dir = Path(config.out_dir)
    if config.src_lang == config.tgt_lang:
        raise DataError("source and target languages must differ")
    if out_dir.exists() and any(out_dir.iterdir()) and not config.overwrite:
        raise DataError(f"output directory {out_dir} already exists and is not empty; pass --overwrite")

    shutil.rmtree(_make_tmp_dir(out_dir))  # fail now, not after the work, if out_dir cannot be written
    train_pairs, given_eval = _read_inputs(config)
    train, stats = clean_pairs(train_pairs, config.clean)
    if not train:
        raise DataError(f"no sentence pairs left after cleaning ({_dropped_summary(stats.as_dict())})")

    eval_raw: dict[str, list[tuple[str, str]]] = {}
    eval_clean: dict[str, list[tuple[str, str]]] = {}
    if given_eval:
        for split, pairs in given_eval.items():
            eval_raw[split] = pairs
            eval_clean[split] = [
                tuple(clean_whitespace(normalize_text(s, config.clean.normalization)) for s in pair)
                for pair in pairs
            ]
        held_out = {pair for pairs in eval_clean.values() for pair in pairs}
        before = len(train)
        train = [pair for pair in train if pair not in held_out]
        overlap = before - len(train)
    else:
        overlap = 0
        needed = config.valid_size + config.test_size
        if len(train) <= needed:
            raise DataError(
                f"only {len(train)} pairs after cleaning: too few to hold out {config.valid_size} "
                f"valid and {config.test_size} test pairs; lower --valid-size/--test-size"
            )
        order = list(range(len(train)))
        random.Random(config.seed).shuffle(order)
        test_ids = set(order[: config.test_size])
        valid_ids = set(order[config.test_size : needed])
        for split, ids in (("valid", valid_ids), ("test", test_ids)):
            picked = [train[i] for i in sorted(ids)]
            eval_raw[split] = eval_clean[split] = picked
        train = [pair for i, pair in enumerate(train) if i not in test_ids and i not in valid_ids]
    if not train:
        raise DataError("no training pairs left once valid/test pairs are removed")

    tmp_dir = _make_tmp_dir(out_dir)
    try:
        manifest = _write_data_dir(tmp_dir, config, train, eval_raw, eval_clean)
        manifest["cleaning"] = {**stats.as_dict(), "overlap_with_valid_test": overlap}
        manifest["seconds"] = round(time.time() - started, 1)
        (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return manifest


def _make_tmp_dir(out_dir: Path) -> Path:
    """An empty directory beside `out_dir`, where the data dir is built before it is renamed."""
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
    except OSError as e:
        raise DataError(f"cannot write the output directory {out_dir}: {e.strerror or e}") from None
    return tmp_dir


def _read_inputs(config: PrepareConfig):
    """Returns (train pairs iterable, {split: pairs} for the splits the input provides)."""
    chosen = [x is not None for x in (config.train_prefix, config.tsv, config.hf_name, config.corpus)]
    if sum(chosen) != 1:
        raise DataError("give exactly one input: --train PREFIX, --tsv FILE, --hf NAME or --corpus NAME")
    if config.corpus_dir is not None and config.corpus is None:
        raise DataError("--data-dir goes with --corpus")
    src, tgt = config.src_lang, config.tgt_lang
    given: dict[str, list[tuple[str, str]]] = {}
    if config.train_prefix is not None:
        src_file, tgt_file = find_side_file(config.train_prefix, src), find_side_file(config.train_prefix, tgt)
        for split, prefix in (("valid", config.valid_prefix), ("test", config.test_prefix)):
            if prefix is not None:
                given[split] = list(read_parallel_files(find_side_file(prefix, src), find_side_file(prefix, tgt)))
        if given and len(given) != 2:
            raise DataError("give both --valid and --test, or neither (then they are carved out of train)")
        return read_parallel_files(src_file, tgt_file), given
    if config.tsv is not None:
        if config.valid_prefix or config.test_prefix:
            raise DataError("--valid/--test go with --train; a TSV corpus is split with --valid-size/--test-size")
        langs = list(config.tsv_langs or (src, tgt))
        for lang in (src, tgt):
            if lang not in langs:
                raise DataError(f"language {lang!r} is not one of the TSV columns ({', '.join(langs)})")
        return read_tsv(Path(config.tsv), langs.index(src), langs.index(tgt)), given
    if config.corpus is not None:
        corpus = find_corpus(config.corpus, src, tgt)
        if config.corpus_dir is not None:
            splits = load_hf_corpus(str(config.corpus_dir), None, src, tgt)
        else:
            splits = load_hf_corpus(corpus.hub_id, corpus.config, src, tgt, corpus.revision, corpus.data_dir)
    else:
        splits = load_hf_corpus(config.hf_name, config.hf_config, src, tgt, config.hf_revision)
    given = {k: v for k, v in splits.items() if k != "train"}
    if given and len(given) != 2:
        given = {}  # only one held-out split: carve both from train for a consistent layout
    return splits["train"], given


def _write_data_dir(directory: Path, config: PrepareConfig, train, eval_raw, eval_clean) -> dict:
    spm_args = dict(
        vocab_size=config.vocab_size,
        model_type=config.spm_type,
        character_coverage=config.character_coverage,
        max_sentences=config.spm_max_sentences,
    )
    if config.joint_vocab:
        src_model = tgt_model = train_sentencepiece(
            (s for pair in train for s in pair), directory / "spm.joint", **spm_args
        )
    else:
        src_model = train_sentencepiece((s for s, _ in train), directory / "spm.src", **spm_args)
        tgt_model = train_sentencepiece((t for _, t in train), directory / "spm.tgt", **spm_args)
    tokenizer = Tokenizer(src_model, tgt_model)
    dtype = token_dtype(max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size))

    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        pairs = train if split == "train" else eval_clean[split]
        src_ids = tokenizer.encode_src([s for s, _ in pairs])
        tgt_ids = tokenizer.encode_tgt([t for _, t in pairs])
        write_token_file(directory, f"{split}.src", src_ids, dtype)
        write_token_file(directory, f"{split}.tgt", tgt_ids, dtype)
        counts[split] = {
            "pairs": len(pairs),
            "src_tokens": sum(map(len, src_ids)),
            "tgt_tokens": sum(map(len, tgt_ids)),
        }
        if split != "train":  # references for BLEU, and sources to translate
            raw = eval_raw[split]
            for side, texts in (("src", [s for s, _ in raw]), ("tgt", [t for _, t in raw])):
                with open(directory / f"{split}.{side}.txt", "w", encoding="utf-8", newline="\n") as f:
                    f.writelines(clean_whitespace(text) + "\n" for text in texts)

    return {
        "format_version": DATA_FORMAT_VERSION,
        "nmt_version": __version__,
        "src_lang": config.src_lang,
        "tgt_lang": config.tgt_lang,
        "input": _describe_input(config),
        "counts": counts,
        "filters": asdict(config.clean),
        "vocab": {
            "joint": config.joint_vocab,
            "type": config.spm_type,
            "requested_size": config.vocab_size,
            "character_coverage": config.character_coverage,
            "src_model": src_model.name,
            "tgt_model": tgt_model.name,
            "src_size": tokenizer.src_vocab_size,
            "tgt_size": tokenizer.tgt_vocab_size,
            "src_sha256": file_sha256(src_model),
            "tgt_sha256": file_sha256(tgt_model),
        },
        "token_dtype": dtype.name,
        "files": sorted(p.name for p in directory.iterdir()),
        "split_seed": config.seed,
    }


def _describe_input(config: PrepareConfig) -> dict:
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
