"""Multilingual data: several directions in one data dir, each source starting with the tag of
its target language (`<2fr>`), one joint SentencePiece model trained on a sample balanced
across languages, and the temperature-based sampling of directions that training uses.

A direction's share of a sample is p_i ∝ (n_i / N)^(1/T): T = 1 keeps the natural proportions,
a larger T moves them towards uniform, so that a small language is not drowned by a large one.
Imports no torch: prepare runs without it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nmt import __version__
from nmt.config import LANG_TEMPERATURES
from nmt.data import PairCleaner, find_side_file, pair_hash, read_parallel_files
from nmt.errors import ConfigError, DataError
from nmt.files import SPM_JOINT, Manifest, pack_pieces
from nmt.normalize import language_normalization
from nmt.prepare import (
    CleanedCorpus,
    PrepareConfig,
    Stages,
    _describe_input,
    _references,
    build_data_dir,
    check_split_settings,
    clean_and_split,
    copy_sentencepiece,
    directory_files,
    encode_training_pairs,
    given_sentencepiece,
    input_paths,
    prefix_files,
    sentencepiece_coverage,
    vocabulary_record,
    worker_count_for,
    write_eval_split,
)
from nmt.shards import TokenArray, concatenate_token_files, token_dtype
from nmt.tokenizer import (
    EOS,
    UNK,
    Tokenizer,
    check_sentencepiece_settings,
    language_tag,
    load_sentencepiece,
    train_sentencepiece,
)

DEFAULT_TEMPERATURE = 1.5  # fairseq's default for multilingual sampling
# A piece belongs to a target language's vocabulary once it is at least this share of the
# language's training target pieces (and used at all): a few stray words of another language in
# the targets (8 of 482,409 German pieces in Multi30k are "▁the") do not make it the language's.
TARGET_PIECE_MIN_SHARE = 2e-5


LANGUAGE_CODE = re.compile(r"[A-Za-z0-9_]+")  # part of file names (PREFIX.zh_TW) and tags (<2zh_TW>)


def parse_directions(text: str | list[str]) -> list[str]:
    """"de-en,en-de" (or a list of such) -> ["de-en", "en-de"], checked."""
    items = text.split(",") if isinstance(text, str) else [x for part in text for x in part.split(",")]
    directions = []
    for item in (x.strip() for x in items):
        if not item:
            continue
        parts = item.split("-")
        if len(parts) != 2 or not all(LANGUAGE_CODE.fullmatch(part) for part in parts):
            raise DataError(f"direction {item!r} is not SRC-TGT, e.g. de-en (language codes of letters, digits and _, "
                            "as zh_TW)")
        if parts[0] == parts[1]:
            raise DataError(f"direction {item!r}: source and target languages must differ")
        if item in directions:
            raise DataError(f"direction {item} is given twice")
        directions.append(item)
    return directions


def direction_languages(direction: str) -> tuple[str, str]:
    src, tgt = direction.split("-")
    return src, tgt


def temperature_weights(sizes: dict[str, int], temperature: float) -> dict[str, float]:
    """Each entry's share of a sample: (n_i / N)^(1/T), normalized to sum to 1."""
    if temperature <= 0:
        raise DataError("the language sampling temperature must be positive")
    total = sum(sizes.values())
    raw = {key: (n / total) ** (1.0 / temperature) if n else 0.0 for key, n in sizes.items()}
    norm = sum(raw.values())
    return {key: value / norm for key, value in raw.items()}


def changed_weights(named: dict[str, float]) -> dict[str, float]:
    """The direction weights that change the sampling: a weight of 1 is no weight."""
    return {direction: weight for direction, weight in named.items() if weight != 1.0}


def direction_weights(named: dict[str, float], directions: list[str], data_dir: Path) -> list[float] | None:
    """The sampling weight of each direction from `train.direction_weights` (1 where not named;
    None where none changes the sampling); a named direction the data dir lacks is an error."""
    for direction in named:
        if direction not in directions:
            raise ConfigError(f"train.direction_weights names {direction}, which data dir {data_dir} does not have "
                              f"(it has {', '.join(directions)})")
    return [named.get(d, 1.0) for d in directions] if changed_weights(named) else None


def draw(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices into range(size): whole random permutations, then part of one (each
    index at most once more than any other)."""
    if size == 0 or count == 0:
        return np.zeros(0, dtype=np.int64)
    passes = [rng.permutation(size) for _ in range(-(-count // size))]
    return np.concatenate(passes)[:count]


def epoch_pairs(sizes: list[int], temperature: float, rng: np.random.Generator,
                weights: list[float] | None = None) -> np.ndarray:
    """The training pairs of one epoch of a multilingual data dir whose train split holds the
    directions' pairs one after the other (`sizes`): as many pairs as there are, each direction's
    share set by the temperature and multiplied by its weight (`weights`, 1 each by default); a
    direction above its size repeats pairs, one below it takes a random part. Returns indices
    into train."""
    shares = list(temperature_weights({str(i): n for i, n in enumerate(sizes)}, temperature).values())
    if weights:
        weighted = [share * weight for share, weight in zip(shares, weights)]
        weight_sum = sum(weighted)
        shares = [w / weight_sum for w in weighted]
    total, offsets = sum(sizes), np.concatenate([[0], np.cumsum(sizes)])
    picked = [offsets[i] + draw(round(total * share), n, rng) for i, (share, n) in enumerate(zip(shares, sizes))]
    return np.concatenate(picked).astype(np.int64)


def target_pieces(tgt: TokenArray, directions: list[str], sizes: list[int], vocab_size: int,
                  min_share: float = TARGET_PIECE_MIN_SHARE) -> dict[str, str]:
    """Per target language, the pieces that make up at least `min_share` of its training
    targets' pieces (and EOS), packed for vocab.json. `tgt` holds the directions' pairs one after
    the other."""
    counts: dict[str, np.ndarray] = {}
    start = 0
    for direction, size in zip(directions, sizes):
        lang = direction_languages(direction)[1]
        tokens = tgt.tokens[int(tgt.offsets[start]) : int(tgt.offsets[start + size])]
        found = counts.setdefault(lang, np.zeros(vocab_size, dtype=np.int64))
        for block in range(0, len(tokens), 1 << 22):  # a block at a time: memory-mapped tokens stay on disk
            found += np.bincount(tokens[block : block + (1 << 22)], minlength=vocab_size)[:vocab_size]
        start += size
    masks = {}
    for lang, found in counts.items():
        mask = found >= max(1, math.ceil(min_share * found.sum()))
        mask[EOS] = True
        masks[lang] = pack_pieces(mask)
    return masks


@dataclass
class MultilingualConfig:
    """`nmt prepare --directions`: `prepare` gives the output, cleaning and vocabulary. Inputs
    come one for every direction or one per direction, in order: training file prefixes
    (`PREFIX.LANG`), TSV files (their columns named by --tsv-langs: one for one TSV, one per TSV
    for several, or none, when each TSV's columns are in its direction's order) or corpora; valid
    and test prefixes one for all or one per direction, the zero-shot ones after the trained ones."""

    prepare: PrepareConfig
    directions: list[str]
    zero_shot: list[str] = field(default_factory=list)  # directions with valid/test sets only
    lang_temperature: float = DEFAULT_TEMPERATURE
    tsvs: list[Path] = field(default_factory=list)
    corpora: list[str] = field(default_factory=list)
    trains: list[str] = field(default_factory=list)
    valids: list[str] = field(default_factory=list)
    tests: list[str] = field(default_factory=list)
    tsv_langs: list[tuple[str, ...]] = field(default_factory=list)  # the columns of each TSV (several TSVs)


def prepare_multilingual(config: MultilingualConfig, progress: bool = False) -> Manifest:
    started = time.time()
    config = with_prefixes(config)
    check_config(config)
    base = config.prepare
    if base.spm_model is not None:
        base.spm_model = given_sentencepiece(Path(base.spm_model))
    languages = {lang for d in config.directions + config.zero_shot for lang in direction_languages(d)}
    inputs = [*input_paths(base), *map(Path, config.tsvs),
              *prefix_files([*config.trains, *config.valids, *config.tests], sorted(languages))]
    return build_data_dir(Path(base.out_dir), base.overwrite, lambda tmp: _build(tmp, config, progress), started, inputs)


def with_prefixes(config: MultilingualConfig) -> MultilingualConfig:
    """The prepare config's single file prefixes as one-item lists, when no lists are given."""
    base = config.prepare
    return dataclasses.replace(
        config, trains=config.trains or ([base.train_prefix] if base.train_prefix else []),
        valids=config.valids or ([base.valid_prefix] if base.valid_prefix else []),
        tests=config.tests or ([base.test_prefix] if base.test_prefix else []),
        tsvs=config.tsvs or ([base.tsv] if base.tsv else []), corpora=config.corpora or ([base.corpus] if base.corpus else []),
    )


def check_config(config: MultilingualConfig) -> None:
    base = config.prepare
    if not config.directions:
        raise DataError("--directions names at least one direction, e.g. de-en,en-de")
    trained, held_out = len(config.directions), len(config.directions) + len(config.zero_shot)
    for name, given, per_direction in (("--train", config.trains, trained), ("--tsv", config.tsvs, trained),
                                       ("--corpus", config.corpora, trained), ("--valid", config.valids, held_out),
                                       ("--test", config.tests, held_out)):
        if len(given) not in (0, 1, per_direction):
            what = f"{trained} directions" + (f" and {len(config.zero_shot)} zero-shot ones" if per_direction > trained else "")
            raise DataError(f"{len(given)} {name} inputs for {what}: give one for all, or one per direction")
    if len(config.tsvs) > 1 and (base.tsv_langs or len(config.tsv_langs) not in (0, len(config.tsvs))):
        raise DataError(f"{len(config.tsv_langs) or 1} --tsv-langs for {len(config.tsvs)} --tsv inputs: name each TSV's "
                        "columns (one --tsv-langs per --tsv, in order), or none when each has its direction's order")
    if len(config.tsvs) == 1 and trained > 1 and not base.tsv_langs:
        raise DataError("one --tsv for several directions: name its columns' languages with --tsv-langs, e.g. de,en")
    if not base.joint_vocab:
        raise DataError("a multilingual data dir has one joint vocabulary (no --separate-vocab)")
    check_sentencepiece_settings(base.spm_type, base.character_coverage, base.spm_max_sentences, base.vocab_size)
    overlap = set(config.zero_shot) & set(config.directions)
    if overlap:
        raise DataError(f"{', '.join(sorted(overlap))}: a zero-shot direction is one not trained on")
    if config.zero_shot and config.tsvs:
        raise DataError("--zero-shot directions are read from --valid and --test file prefixes, which do not go with "
                        "--tsv inputs (use --train prefixes, or --corpus or --hf)")
    if config.zero_shot and not (config.valids and config.tests):
        raise DataError("--zero-shot directions are read from the --valid and --test file prefixes")
    if (config.corpora or base.hf_name) and (config.valids or config.tests) and (
            not config.zero_shot or held_out > 1 and held_out in (len(config.valids), len(config.tests))):
        raise DataError("with --corpus or --hf the trained directions' valid and test sets are the corpus's: --valid and "
                        "--test give the --zero-shot directions' (one prefix each)")
    check_split_settings(base)
    if base.split_by is not None:
        missing = [d for d in config.directions if base.split_by not in direction_languages(d)]
        if missing:
            raise DataError(f"--split-by {base.split_by}: not a language of {', '.join(missing)}")
    low, high = LANG_TEMPERATURES
    if not low <= config.lang_temperature <= high:  # NaN too
        raise DataError(f"--lang-temperature must be between {low:g} and {high:g} (got {config.lang_temperature})")


def _pick(values: list, index: int):
    """One input for all (a list of one), or each its own; None when there is none."""
    if not values:
        return None
    return values[0] if len(values) == 1 else values[index]


def direction_config(config: MultilingualConfig, index: int) -> PrepareConfig:
    """The bilingual prepare settings that read direction `index`."""
    src, tgt = direction_languages(config.directions[index])
    changes: dict = {"src_lang": src, "tgt_lang": tgt, "train_prefix": _pick(config.trains, index),
                     "valid_prefix": _pick(config.valids, index), "test_prefix": _pick(config.tests, index),
                     "tsv": _pick(config.tsvs, index), "corpus": _pick(config.corpora, index)}
    if changes["corpus"] is not None or config.prepare.hf_name:  # its own splits; the prefixes are the zero-shot ones'
        changes["valid_prefix"] = changes["test_prefix"] = None
    if len(config.tsvs) > 1:  # one TSV per direction: its columns named, or in the direction's order
        changes["tsv_langs"] = _pick(config.tsv_langs, index)
    return dataclasses.replace(config.prepare, **changes)


def _build(directory: Path, config: MultilingualConfig, progress: bool) -> Manifest:
    """Read and clean each direction, keep held-out sentences out of every direction's
    training pairs, train the joint SentencePiece model with the tags, then encode."""
    stages = Stages()
    work = directory / "work"
    corpora = {d: clean_and_split(direction_config(config, i), work / d, progress) for i, d in enumerate(config.directions)}
    held_out = {d: (c.eval_clean, c.eval_raw) for d, c in corpora.items()}
    held_out.update({d: _zero_shot_splits(d, config, len(config.directions) + k) for k, d in enumerate(config.zero_shot)})
    lost = hold_out_everywhere(corpora, {d: clean for d, (clean, _) in held_out.items()})
    stages.done("read_clean_split")
    languages = sorted({lang for d in config.directions + config.zero_shot for lang in direction_languages(d)})
    model, sample_counts = _sentencepiece(directory, corpora, languages, config)
    tokenizer = Tokenizer(model, model)
    dtype = token_dtype(tokenizer.src_vocab_size)
    stages.done("sentencepiece")
    direction_counts, train_counts = _encode_training(directory, corpora, tokenizer, dtype, config, progress)
    stages.done("encode")
    unk = _write_held_out(directory, held_out, tokenizer, dtype, direction_counts)
    shutil.rmtree(work)
    stages.done("valid_test")
    cleaning = {d: {**c.cleaning(), "sharing_held_out_sentence": lost[d]} for d, c in corpora.items()}
    return _manifest(directory, config, corpora, languages, tokenizer, direction_counts, train_counts, cleaning, unk,
                     sample_counts, stages, dtype)


def _encode_training(directory: Path, corpora: dict[str, CleanedCorpus], tokenizer: Tokenizer, dtype, config: MultilingualConfig,
                     progress: bool) -> tuple[dict, dict]:
    """Each direction's training pairs, its target's tag before every source, one direction
    after another into train.src/train.tgt; returns the per-direction counts and the totals."""
    direction_counts: dict[str, dict] = {}
    model = tokenizer.src_model_path
    for d, corpus in corpora.items():
        tag = [tokenizer.tag_id(direction_languages(d)[1])]
        counts = encode_training_pairs(corpus, [model, model], directory, f"train.{d}", dtype, config.prepare, progress, [tag, []])
        direction_counts[d] = {"train": counts}
    train_counts = {
        "pairs": sum(c["train"]["pairs"] for c in direction_counts.values()),
        "src_tokens": concatenate_token_files(directory, [f"train.{d}.src" for d in config.directions], "train.src")["tokens"],
        "tgt_tokens": concatenate_token_files(directory, [f"train.{d}.tgt" for d in config.directions], "train.tgt")["tokens"],
    }
    return direction_counts, train_counts


def _write_held_out(directory: Path, held_out: dict, tokenizer: Tokenizer, dtype, direction_counts: dict) -> dict:
    """valid.DIRECTION and test.DIRECTION of every direction, zero-shot ones too (their counts
    go into `direction_counts`); returns the worst direction's share of <unk> in valid."""
    unk = {"src": 0.0, "tgt": 0.0}
    for d, (clean, raw) in held_out.items():
        tagged = tokenizer.for_target(direction_languages(d)[1])
        for split in ("valid", "test"):
            counts, unk_rate = write_eval_split(directory, f"{split}.{d}", clean[split], raw[split], tagged, dtype)
            direction_counts.setdefault(d, {})[split] = counts
            if split == "valid":
                unk = {side: max(unk[side], unk_rate[side]) for side in unk}
    return unk


def _manifest(directory: Path, config: MultilingualConfig, corpora: dict[str, CleanedCorpus], languages: list[str],
              tokenizer: Tokenizer, direction_counts: dict, train_counts: dict, cleaning: dict, unk: dict,
              sample_counts: dict, stages: Stages, dtype) -> Manifest:
    base = config.prepare
    totals = {"train": train_counts}
    for split in ("valid", "test"):
        totals[split] = {key: sum(direction_counts[d][split][key] for d in config.directions)
                         for key in ("pairs", "src_tokens", "tgt_tokens")}
    first = corpora[config.directions[0]].cleaner  # bilingual readers' normalization record
    model = tokenizer.src_model_path
    return Manifest(
        src_lang="+".join(sorted({direction_languages(d)[0] for d in config.directions})),
        tgt_lang="+".join(sorted({direction_languages(d)[1] for d in config.directions})),
        vocab=vocabulary_record(model, model, tokenizer, base, tuple(languages)), counts=totals,
        normalization={"src": first.normalize[0].as_dict(), "tgt": first.normalize[1].as_dict()},
        filters=dataclasses.asdict(base.clean),
        cleaning={key: sum(c[key] for c in cleaning.values()) for key in next(iter(cleaning.values()))},
        input={**_describe_input(direction_config(config, 0)), "trains": config.trains, "valids": config.valids,
               "tests": config.tests, "tsvs": [str(p) for p in config.tsvs], "corpora": list(config.corpora),
               "spm_sample": sample_counts},
        valid_unk_percent=unk, token_dtype=dtype.name, stage_seconds=stages.seconds,
        encode_workers=max(worker_count_for(direction_counts[d]["train"]["pairs"], base) for d in config.directions),
        split_seed=base.seed, split_by=base.split_by, nmt_version=__version__, directions=list(config.directions),
        zero_shot=list(config.zero_shot),
        languages={lang: language_normalization(lang, base.clean.normalization, base.clean.chinese_script).as_dict()
                   for lang in languages},
        direction_counts=direction_counts, direction_cleaning=cleaning, lang_temperature=config.lang_temperature,
        **directory_files(directory),
    )


def hold_out_everywhere(corpora: dict[str, CleanedCorpus], held_out: dict[str, dict[str, list[tuple[str, str]]]]) -> dict[str, int]:
    """Keep every sentence of a held-out set (of any direction, zero-shot ones too) out of every
    direction's training pairs on its language's side: directions share languages, and one
    carved out of train for one direction would otherwise be trained on in another. Returns the
    training pairs each direction loses."""
    held: dict[str, set[int]] = {}
    for d, splits in held_out.items():
        for side, lang in enumerate(direction_languages(d)):
            held.setdefault(lang, set()).update(pair_hash(pair[side], "") for pairs in splits.values() for pair in pairs)
    lost = {}
    for d, corpus in corpora.items():
        src, tgt = direction_languages(d)
        positions = np.flatnonzero(corpus.keep)
        hits = [k for k, (s, t) in enumerate(corpus.training_pairs())
                if pair_hash(s, "") in held.get(src, ()) or pair_hash(t, "") in held.get(tgt, ())]
        corpus.keep[positions[hits]] = False
        lost[d] = len(hits)
        if not corpus.keep.any():
            raise DataError(f"{d}: no training pairs left once the held-out sentences of every direction are removed")
    return lost


def _zero_shot_splits(direction: str, config: MultilingualConfig, index: int) -> tuple[dict, dict]:
    """(clean, raw) valid and test pairs of a direction read from its --valid/--test prefixes."""
    src, tgt = direction_languages(direction)
    cleaner = PairCleaner(config.prepare.clean, src, tgt)
    clean, raw = {}, {}
    for split, prefix in (("valid", _pick(config.valids, index)), ("test", _pick(config.tests, index))):
        pairs = list(read_parallel_files(find_side_file(prefix, src), find_side_file(prefix, tgt)))
        if not pairs:
            raise DataError(f"the given {split} set of {direction} ({prefix}.{src}, .{tgt}) has no lines")
        clean[split] = [cleaner.normalize_pair(*pair) for pair in pairs]
        raw[split] = _references(pairs, clean[split], cleaner)
    return clean, raw


def _sentencepiece(directory: Path, corpora: dict[str, CleanedCorpus], languages: list[str], config: MultilingualConfig) -> tuple[Path, dict]:
    """The joint model, trained on a sample balanced across languages with the language tags
    reserved (or the given one, which must reserve them); returns it and the sample's count of
    sentences per language."""
    base = config.prepare
    tags = tuple(language_tag(lang) for lang in languages)
    if base.spm_model is not None:
        model = copy_sentencepiece(Path(base.spm_model), directory / f"{SPM_JOINT}.model")
        missing = [t for t in tags if load_sentencepiece(model).piece_to_id(t) == UNK]
        if missing:
            raise DataError(f"{base.spm_model} does not reserve the language tags {', '.join(missing)}")
        return model, {}
    sample, counts = balanced_sample(corpora, base.spm_max_sentences, config.lang_temperature, base.seed)
    model = train_sentencepiece(
        sample, directory / SPM_JOINT, vocab_size=base.vocab_size, model_type=base.spm_type,
        max_sentences=base.spm_max_sentences, extra_symbols=tags,
        **sentencepiece_coverage(base.character_coverage, tuple(languages)),
    )
    return model, counts


def balanced_sample(corpora: dict[str, CleanedCorpus], max_sentences: int, temperature: float, seed: int) -> tuple[Iterator[str], dict[str, int]]:
    """Training sentences of every language for SentencePiece: each language's distinct
    sentences (English of de-en and of en-de counted once), drawn in the shares of
    `temperature_weights`, about min(max_sentences, all distinct sentences) in all. Returns the
    sentences (an iterator over the work files) and how many each language has in the sample."""
    # Where each language's sentences are: (direction, side) pairs.
    places: dict[str, list[tuple[str, int]]] = {}
    for d in corpora:
        for side, lang in enumerate(direction_languages(d)):
            places.setdefault(lang, []).append((d, side))
    picks: dict[tuple[str, int], np.ndarray] = {}  # (direction, side) -> times each training pair's sentence is taken
    distinct: dict[str, tuple[list[tuple[str, int]], np.ndarray, np.ndarray]] = {}  # lang -> (places, place, pair) per sentence
    for lang, where in places.items():
        hashes = [np.array([pair_hash(pair[side], "") for pair in corpora[d].training_pairs()], dtype=np.uint64)
                  for d, side in where]
        for place, h in zip(where, hashes):
            picks[place] = np.zeros(len(h), dtype=np.int32)
        _, first = np.unique(np.concatenate(hashes), return_index=True)  # each sentence's first copy
        first.sort()
        starts = np.cumsum([0] + [len(h) for h in hashes])
        place_of = np.searchsorted(starts, first, side="right") - 1
        distinct[lang] = (where, place_of, first - starts[place_of])
    sizes = {lang: len(entry[1]) for lang, entry in distinct.items()}
    total = min(max_sentences, sum(sizes.values()))
    weights = temperature_weights(sizes, temperature)
    rng = np.random.default_rng(seed)
    counts = {}
    for lang in sorted(distinct):
        where, place_of, pair_of = distinct[lang]
        chosen = draw(round(total * weights[lang]), sizes[lang], rng)
        counts[lang] = len(chosen)
        for p, place in enumerate(where):
            mine = chosen[place_of[chosen] == p]
            np.add.at(picks[place], pair_of[mine], 1)

    def sentences() -> Iterator[str]:
        for (d, side), times in picks.items():
            for pair, n in zip(corpora[d].training_pairs(), times.tolist()):
                for _ in range(n):
                    yield pair[side]

    return sentences(), counts
