"""Parallel text: reading (files, TSV, Hugging Face `datasets`), cleaning, and the prepared splits
of a data dir. Imports no torch: prepare runs without it."""

from __future__ import annotations

import csv
import gzip
import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nmt.atomic import is_gzip_name
from nmt.errors import DataError, first_line
from nmt.normalize import is_cjk, language_normalization
from nmt.shards import TokenArray

# ---------------------------------------------------------------------------------------------
# Reading


def open_binary(path: Path):
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a file")
    if not path.exists():  # not is_file(): a pipe (<(...), a FIFO) reads as well
        raise DataError(f"file not found: {path}")
    try:
        return gzip.open(path, "rb") if is_gzip_name(path) else open(path, "rb")
    except OSError as e:  # permission denied, say
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def decode_lines(binary_lines: Iterable[bytes], name: str, replace_invalid: bool = False,
                 refuse_nul: bool = False, refuse_cr_lines: bool = False) -> Iterator[str]:
    """Decode UTF-8 lines, naming the file and line of invalid bytes, and strip the line ending.

    Only `\\n` ends a line: a stray `\\r` or Unicode line separator inside a sentence must not
    split it, or the two sides of a corpus drift apart.
    """
    errors = "replace" if replace_invalid else "strict"
    lineno = 0
    try:
        for lineno, raw in enumerate(binary_lines, 1):
            if refuse_nul and b"\0" in raw:  # UTF-16 read as UTF-8 has them everywhere
                raise DataError(f"{name}:{lineno}: a NUL byte (a UTF-16 or binary file? nmt reads UTF-8; "
                                "nmt translate --replace-invalid takes such bytes as they are)")
            if refuse_cr_lines and lineno == 1 and raw.endswith(b"\r") and b"\r" in raw[:-1]:  # no LF at all
                raise DataError(f"{name}: its lines end in CR alone (an old Mac file?); nmt reads LF or CRLF line ends")
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise DataError(f"{name}:{lineno}: invalid UTF-8 (byte {e.start}: {e.reason})") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark, not text
            if line.endswith("\n"):
                line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
            yield line
    except (OSError, EOFError) as e:  # e.g. a truncated .gz file
        raise DataError(f"{name}: cannot read after line {lineno} ({e})") from None


def text_lines(text: str) -> list[str]:
    """The lines of one string by `decode_lines`' rule: `\n` ends a line, a `\r` before it goes."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def read_lines(path: Path, replace_invalid: bool = False, corpus: bool = False) -> Iterator[str]:
    """Yield the lines of a UTF-8 text file (plain or .gz) without their line ending. A
    `corpus` is a regular file (prepare may read it more than once, which a pipe does not
    allow). A NUL byte is an error (UTF-16 read as UTF-8 has them everywhere) unless invalid
    bytes are to be replaced, in a corpus always."""
    if corpus and Path(path).exists() and not Path(path).is_file():
        raise DataError(f"{path} is not a regular file: give a corpus as a file, not a pipe")
    with open_binary(path) as f:
        yield from decode_lines(f, str(path), replace_invalid, refuse_nul=corpus or not replace_invalid,
                                refuse_cr_lines=corpus)


def read_parallel_files(src_path: Path, tgt_path: Path) -> Iterator[tuple[str, str]]:
    """Yield aligned (source, target) lines; a different number of lines is an error."""
    src_lines, tgt_lines = read_lines(src_path, corpus=True), read_lines(tgt_path, corpus=True)
    count = 0
    for src in src_lines:
        tgt = next(tgt_lines, None)
        if tgt is None:
            rest = sum(1 for _ in src_lines)
            raise DataError(
                f"line counts differ: {src_path} has {count + 1 + rest} lines, {tgt_path} has {count}"
            )
        count += 1
        yield src, tgt
    rest = sum(1 for _ in tgt_lines)
    if rest:
        raise DataError(f"line counts differ: {src_path} has {count} lines, {tgt_path} has {count + rest}")


def read_tsv(path: Path, src_column: int, tgt_column: int, columns: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield (source, target) from a tab-separated file; every row must have the same fields
    (`columns` of them, when given)."""
    expected = columns
    for lineno, line in enumerate(read_lines(path, corpus=True), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if expected is None:
            expected = len(fields)
            if expected <= max(src_column, tgt_column):
                raise DataError(
                    f"{path}:{lineno}: {expected} tab-separated fields, but column "
                    f"{max(src_column, tgt_column) + 1} was asked for"
                )
        elif len(fields) != expected:
            named = " (the languages --tsv-langs names)" if columns else ""
            raise DataError(f"{path}:{lineno}: {len(fields)} tab-separated fields, expected {expected}{named}")
        yield fields[src_column], fields[tgt_column]


def find_side_file(prefix: str | Path, lang: str) -> Path:
    """`data/train` + `de` -> `data/train.de` or `data/train.de.gz`, whichever exists."""
    for candidate in (Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")):
        if candidate.is_file():
            return candidate
    raise DataError(f"file not found: {prefix}.{lang} (or {prefix}.{lang}.gz)")


HF_SPLIT_NAMES = {
    "train": ("train",),
    "valid": ("validation", "valid", "dev", "val"),
    "test": ("test",),
}


def load_hf_corpus(
    name: str, config: str | None, src_lang: str, tgt_lang: str, revision: str | None = None,
    data_dir: str | None = None, cache_dir: Path | None = None,
) -> dict[str, Iterable[tuple[str, str]]]:
    """Load a parallel corpus with Hugging Face `datasets`: a Hub id or a local folder/file.

    Returns the pairs of each split found (train, valid, test): valid and test as lists, train
    as an iterator over the memory-mapped Arrow table, read in blocks, so that a large corpus is
    never held as Python strings. Handles the usual column layouts: a `translation` dict, or one
    column per language.
    """
    import datasets  # slow to import; only prepare needs it

    # Its readers log a file they cannot read before raising: the error says it, in one line.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    kwargs = {k: v for k, v in (("revision", revision), ("data_dir", data_dir), ("cache_dir", cache_dir and str(cache_dir))) if v}
    kwargs.update(_csv_options(Path(name)))
    try:
        try:
            loaded = datasets.load_dataset(name, config, **kwargs)
        except RuntimeError as e:
            if "scripts are no longer supported" not in str(e) or revision:
                raise
            # Script-based Hub repos: their automatic parquet export holds the same data.
            loaded = datasets.load_dataset(
                name, revision="refs/convert/parquet", data_dir=config or None
            )
    except FileNotFoundError as e:
        raise DataError(f"dataset {name!r} not found ({first_line(e)})") from None
    except (ValueError, ConnectionError, OSError, RuntimeError, datasets.exceptions.DatasetGenerationError) as e:
        cause = e.__cause__ if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ else e
        raise DataError(f"cannot load dataset {name!r}: {first_line(cause)}") from None
    splits: dict[str, list[tuple[str, str]]] = {}
    for split, names in HF_SPLIT_NAMES.items():
        found = next((n for n in names if n in loaded), None)
        if found is not None:
            pairs = _hf_pairs(loaded[found], src_lang, tgt_lang, f"{name}:{found}")
            splits[split] = pairs if split == "train" else list(pairs)
    if "train" not in splits:
        raise DataError(f"dataset {name!r} has no train split (splits: {', '.join(loaded)})")
    return splits


def _hf_pairs(table, src_lang: str, tgt_lang: str, where: str) -> Iterator[tuple[str, str]]:
    """The pairs of a `datasets` table. Checks the columns at once, then reads lazily, in blocks."""
    columns = table.column_names
    if "translation" not in columns and not (src_lang in columns and tgt_lang in columns):
        raise DataError(
            f"{where}: no 'translation' column and no {src_lang!r}/{tgt_lang!r} columns "
            f"(columns: {', '.join(columns)})"
        )
    return _hf_rows(table, src_lang, tgt_lang, where)


def _hf_rows(table, src_lang: str, tgt_lang: str, where: str) -> Iterator[tuple[str, str]]:
    for block in table.iter(batch_size=10_000):
        if "translation" in block:
            for row in block["translation"]:
                if src_lang not in row or tgt_lang not in row:
                    raise DataError(f"{where}: translation has no {src_lang!r}/{tgt_lang!r} (has {list(row)})")
                yield _text(row[src_lang], where), _text(row[tgt_lang], where)
        else:
            for src, tgt in zip(block[src_lang], block[tgt_lang]):
                yield _text(src, where), _text(tgt, where)


DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")


def _csv_options(path: Path) -> dict:
    """How `datasets` is to read a local folder of CSV or TSV files (compressed or not): "NA",
    "null" and "nan" are sentences there, not missing values, and a TSV field is taken as it is
    (a quote in a sentence is no CSV quoting; tab-separated corpora are written without any)."""
    if not path.is_dir():
        return {}
    kinds = set()
    for file in path.rglob("*"):
        suffixes = file.suffixes[-2:] if file.suffix in COMPRESSED else file.suffixes[-1:]
        if suffixes and suffixes[0] in DATA_SUFFIXES:
            kinds.add(suffixes[0])
    if not kinds or not kinds <= {".csv", ".tsv"}:
        return {}
    return {"keep_default_na": False, "na_filter": False, **({"quoting": csv.QUOTE_NONE} if kinds == {".tsv"} else {})}


def _text(value, where: str) -> str:
    """A sentence of a `datasets` row: a string, or a missing value ("": dropped as empty)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: a value that is not text ({value!r})")
    return value


# ---------------------------------------------------------------------------------------------
# Cleaning


MAX_CHARACTERS_PER_WORD = 20  # a side longer than this × max_words is a run without spaces, not a sentence


@dataclass
class CleanConfig:
    normalization: str = "NFC"  # Unicode normal form, or "none"
    chinese_script: str = "simplified"  # Chinese sides: "simplified" (OpenCC) or "none"
    # Lengths count whitespace-separated words, and characters for languages written without
    # spaces (Chinese, Japanese, Korean).
    max_words: int = 250  # pairs with a longer side, or one of over 20 × max_words characters, are dropped
    max_ratio: float = 3.0  # pairs whose longer side has more than this × the length of the other
    dedup: bool = True

    def __post_init__(self):
        # NaN would pass every pair (no comparison holds) and make manifest.json no strict JSON.
        if not (self.max_words >= 1 and 1 <= self.max_ratio < math.inf):
            raise DataError(f"--max-words must be at least 1 and --max-ratio a number of at least 1 "
                            f"(got {self.max_words} and {self.max_ratio})")


@dataclass
class CleanStats:
    pairs_read: int = 0
    normalized: int = 0  # pairs changed by Unicode normalization
    whitespace_fixed: int = 0  # pairs changed by stripping/collapsing whitespace
    empty: int = 0
    too_long: int = 0
    ratio: int = 0
    duplicates: int = 0
    kept: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# Control characters (category Cc) that str.split() keeps, and U+FEFF (a byte-order mark or
# zero-width no-break space) become spaces: none of them is text.
_NOT_TEXT = str.maketrans({c: " " for c in [*range(0x20), *range(0x7F, 0xA0), 0xFEFF]})


def clean_whitespace(text: str) -> str:
    # str.split() splits on \r, \t, \x1c-\x1f, U+2028 and the other separators.
    return " ".join(text.translate(_NOT_TEXT).split())


class PairCleaner:
    """Normalizes and filters pairs one at a time, counting what each step changed or dropped.

    Duplicates are not its business: prepare finds them from `pair_hash` once all pairs are read.
    """

    def __init__(self, config: CleanConfig, src_lang: str = "", tgt_lang: str = ""):
        self.config = config
        self.stats = CleanStats()
        self.normalize = tuple(
            language_normalization(lang, config.normalization, config.chinese_script) for lang in (src_lang, tgt_lang)
        )
        self.count_characters = (is_cjk(src_lang), is_cjk(tgt_lang))

    def normalize_pair(self, src: str, tgt: str) -> tuple[str, str]:
        return clean_whitespace(self.normalize[0](src)), clean_whitespace(self.normalize[1](tgt))

    def __call__(self, src: str, tgt: str) -> tuple[str, str] | None:
        stats, config = self.stats, self.config
        stats.pairs_read += 1
        norm_src, norm_tgt = self.normalize[0](src), self.normalize[1](tgt)
        stats.normalized += (norm_src, norm_tgt) != (src, tgt)
        src, tgt = clean_whitespace(norm_src), clean_whitespace(norm_tgt)
        stats.whitespace_fixed += (src, tgt) != (norm_src, norm_tgt)
        if not src or not tgt:
            stats.empty += 1
            return None
        src_length, tgt_length = (
            len(text) - text.count(" ") if characters else text.count(" ") + 1
            for text, characters in zip((src, tgt), self.count_characters)
        )
        longest = max(src_length, tgt_length)
        if longest > config.max_words or max(len(src), len(tgt)) > MAX_CHARACTERS_PER_WORD * config.max_words:
            stats.too_long += 1
            return None
        if longest > config.max_ratio * min(src_length, tgt_length):
            stats.ratio += 1
            return None
        return src, tgt


def pair_hash(src: str, tgt: str) -> int:
    """A 64-bit hash of a cleaned pair, the same in every process and run: duplicates share it."""
    digest = hashlib.blake2b(src.encode("utf-8") + b"\t" + tgt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# ---------------------------------------------------------------------------------------------
# Prepared splits


@dataclass
class ParallelSplit:
    src: TokenArray
    tgt: TokenArray

    @classmethod
    def load(cls, data_dir: Path, split: str, vocab_sizes: tuple[int, int] | None = None) -> ParallelSplit:
        """`vocab_sizes`: (source, target) pieces; ids outside them are refused."""
        src_size, tgt_size = vocab_sizes or (None, None)
        pair = cls(TokenArray(data_dir, f"{split}.src", src_size), TokenArray(data_dir, f"{split}.tgt", tgt_size))
        if len(pair.src) != len(pair.tgt):
            raise DataError(f"{data_dir}: {split} source and target counts differ; run nmt prepare again")
        return pair

    def __len__(self) -> int:
        return len(self.src)

    def release_pages(self) -> None:
        self.src.release_pages()
        self.tgt.release_pages()
