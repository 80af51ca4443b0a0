"""SentencePiece models for the source and target sides (one shared model when joint)."""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import itertools
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from nmt.errors import DataError

# Fixed special ids, the same in every model this toolkit trains.
PAD, UNK, BOS, EOS = 0, 1, 2, 3
# Reserved for masked-LM pretraining (`nmt pretrain`), so that one vocabulary serves pretraining
# and translation. They are user-defined symbols: "[MASK]" written in text encodes to MASK, which
# `nmt fill-mask` wants and nothing else does (see `encode_text`).
MASK, CLS, SEP = 4, 5, 6
RESERVED_SYMBOLS = ("[MASK]", "[CLS]", "[SEP]")
FIRST_REGULAR_ID = 7  # ids below are special: never masked, never drawn as random replacements


LANGUAGE_TAG = re.compile(r"<2[^<>\s]+>")  # the pieces language_tag makes
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # and line or paragraph separators


def language_tag(lang: str) -> str:
    """The token a multilingual model's source starts with to ask for `lang`: "<2fr>". Reserved
    in the SentencePiece model (a user-defined symbol, after [MASK], [CLS] and [SEP])."""
    return f"<2{lang}>"


def reserved_ids(processor: spm.SentencePieceProcessor) -> frozenset[int]:
    """The ids of a model's reserved symbols ([MASK], [CLS], [SEP], language tags), which are
    never part of a translation. (Models trained before they were reserved have none.)"""
    if not has_reserved_symbols(processor):
        return frozenset()
    tags = itertools.takewhile(lambda i: LANGUAGE_TAG.fullmatch(processor.id_to_piece(i)),
                               range(FIRST_REGULAR_ID, processor.get_piece_size()))  # right after [SEP]
    return frozenset([MASK, CLS, SEP, *tags])


def encode_text(processor: spm.SentencePieceProcessor, lines: list[str], reserved: frozenset[int]) -> list[list[int]]:
    """`lines` encoded with none of the `reserved` ids: a reserved symbol spelled in the text
    ("<2de>", "[MASK]") becomes the pieces of its characters, so that no text can choose the
    output language or stand for a mask."""
    encoded = processor.encode(lines)
    if not reserved:
        return encoded
    return [ids if reserved.isdisjoint(ids) else _spelled(processor, ids, reserved) for ids in encoded]


def _spelled(processor: spm.SentencePieceProcessor, ids: list[int], reserved: frozenset[int]) -> list[int]:
    return [piece for i in ids
            for piece in ([p for c in processor.id_to_piece(i) for p in _character(processor, c)] if i in reserved else [i])]


def _character(processor: spm.SentencePieceProcessor, character: str) -> list[int]:
    """The piece of one character, or where the vocabulary lacks it, its UTF-8 bytes' pieces, as
    SentencePiece's byte fallback spells it (a vocabulary without them: <unk>, as anywhere)."""
    piece = processor.piece_to_id(character)
    if piece != processor.unk_id():
        return [piece]
    byte_pieces = [processor.piece_to_id(f"<0x{byte:02X}>") for byte in character.encode()]
    return [piece] if processor.unk_id() in byte_pieces else byte_pieces


# SentencePiece's model depends on the number of threads it trains with (its statistics are
# summed per thread): a fixed number gives every machine the same vocabulary, the one the
# recipes' figures were measured with on 2 cores.
SENTENCEPIECE_THREADS = 2
MIN_SENTENCEPIECE_SAMPLE = 100  # SentencePiece's trainer samples more than this many sentences
MIN_CHARACTER_COVERAGE = 0.98  # the least SentencePiece's trainer takes


def train_sentencepiece(
    sentences: Iterable[str],
    model_prefix: Path,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    max_sentences: int = 1_000_000,
    seed_sentencepieces: int | None = None,
    byte_fallback: bool = False,
    extra_symbols: tuple[str, ...] = (),
) -> Path:
    """Train a SentencePiece model on `sentences`; returns the `.model` path.

    `vocab_size` is a soft limit, so that a small corpus gets a smaller vocabulary instead of
    an error. `extra_symbols` (language tags) are reserved after the pretraining symbols.
    """
    check_sentencepiece_settings(model_type, character_coverage, max_sentences, vocab_size)
    model = io.BytesIO()  # written here rather than to model_prefix, whose path the model would record
    options = dict(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        pad_id=PAD,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        user_defined_symbols=[*RESERVED_SYMBOLS, *extra_symbols],
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,
        num_threads=SENTENCEPIECE_THREADS,
        minloglevel=2,
    )
    if seed_sentencepieces is not None:
        options["seed_sentencepiece_size"] = seed_sentencepieces
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as e:
        needed = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if needed:
            spelled = " and the 256 byte pieces of byte fallback" if byte_fallback else ""
            raise DataError(f"a vocabulary of {needed[1]} pieces is smaller than the {needed[2]} the text needs (its "
                            f"characters at character coverage {character_coverage}{spelled}): raise --vocab-size") from None
        raise DataError(f"SentencePiece training failed: {e}") from None
    path = Path(f"{model_prefix}.model")
    path.write_bytes(model.getvalue())  # the same bytes for the same input, wherever it is trained
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    Path(f"{model_prefix}.vocab").write_text(  # SentencePiece's own listing: piece, tab, score
        "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in range(processor.get_piece_size())),
        encoding="utf-8")
    return path


def check_sentencepiece_settings(model_type: str, character_coverage: float | None, max_sentences: int,
                                 vocab_size: int) -> None:
    """What SentencePiece would refuse only after the corpus is read, refused before."""
    if vocab_size <= FIRST_REGULAR_ID:
        raise DataError(f"--vocab-size must be more than {FIRST_REGULAR_ID}, the special and reserved pieces (got {vocab_size})")
    if model_type not in ("unigram", "bpe"):
        raise DataError(f"SentencePiece model type must be unigram or bpe (got {model_type!r})")
    if character_coverage is not None and not MIN_CHARACTER_COVERAGE <= character_coverage <= 1.0:
        raise DataError(f"--character-coverage must be between {MIN_CHARACTER_COVERAGE} and 1 (got {character_coverage})")
    if max_sentences <= MIN_SENTENCEPIECE_SAMPLE:
        raise DataError(f"--spm-sample must be more than {MIN_SENTENCEPIECE_SAMPLE} sentences (got {max_sentences})")


def has_reserved_symbols(processor: spm.SentencePieceProcessor) -> bool:
    """Whether the model reserves [MASK], [CLS] and [SEP] at their fixed ids (models trained
    before these were reserved do not)."""
    return all(processor.piece_to_id(piece) == i for piece, i in zip(RESERVED_SYMBOLS, (MASK, CLS, SEP)))


def check_recorded_model(path: Path, sha256: str, made_with: str, record: str, error: type[Exception] = DataError,
                         remedy: str = "") -> None:
    """A SentencePiece model must be the one `record` holds the checksum of: another one (copied
    over it) would give ids past its vocabulary, or other words for the same ids."""
    if not Path(path).is_file():
        raise error(f"{path} is missing{remedy}")
    if file_sha256(path) != sha256:
        raise error(f"{path} is not the SentencePiece model {made_with} (its checksum differs from {record}'s){remedy}")


def check_prepared_model(path: Path, sha256: str) -> None:
    """A data dir's SentencePiece model must be the one its token files were made with."""
    check_recorded_model(path, sha256, "the data dir was prepared with", "manifest.json", remedy="; run nmt prepare again")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """Encodes source text and decodes target ids with the data dir's SentencePiece models.
    `source_prefix`: ids every encoded source starts with (a multilingual model's language tag)."""

    def __init__(self, src_model: Path, tgt_model: Path, source_prefix: tuple[int, ...] = ()):
        self.src_model_path = Path(src_model)
        self.tgt_model_path = Path(tgt_model)
        self.src = load_sentencepiece(self.src_model_path)
        self.tgt = self.src if self.tgt_model_path == self.src_model_path else load_sentencepiece(self.tgt_model_path)
        self.source_prefix = list(source_prefix)

    def tag_id(self, lang: str) -> int:
        """The id of `lang`'s tag; a DataError if the model does not reserve it."""
        tag = language_tag(lang)
        tag_id = self.src.piece_to_id(tag)
        if tag_id == UNK or self.src.id_to_piece(tag_id) != tag:
            raise DataError(f"the SentencePiece model {self.src_model_path} has no {tag} token")
        return tag_id

    def for_target(self, lang: str) -> Tokenizer:
        """This tokenizer with `lang`'s tag before every source (shares the loaded models)."""
        tagged = copy.copy(self)
        tagged.source_prefix = [self.tag_id(lang)]
        return tagged

    @functools.cached_property
    def reserved_source(self) -> frozenset[int]:
        return reserved_ids(self.src)

    @functools.cached_property
    def reserved_target(self) -> frozenset[int]:
        return reserved_ids(self.tgt)

    @functools.cached_property
    def reserved_target_ids(self) -> list[int]:
        """The target model's reserved symbols, in id order (see `reserved_ids`)."""
        return sorted(self.reserved_target)

    @functools.cached_property
    def word_start_target_ids(self) -> list[int]:
        """The target pieces that begin a word ("▁the", not "s"), and EOS."""
        return [i for i in range(self.tgt_vocab_size) if self.tgt.id_to_piece(i).startswith("▁")] + [EOS]

    @property
    def joint(self) -> bool:
        return self.src is self.tgt

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    def encode_src(self, lines: list[str]) -> list[list[int]]:
        encoded = encode_text(self.src, lines, self.reserved_source)
        return [self.source_prefix + ids for ids in encoded] if self.source_prefix else encoded

    def encode_tgt(self, lines: list[str]) -> list[list[int]]:
        return encode_text(self.tgt, lines, self.reserved_target)

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        # Byte-fallback pieces (<0x0A>, <0x00>) can spell a line break, which would split an output
        # line, or another control character, which no reader of the text expects (NUL, tab).
        return [CONTROL_CHARACTERS.sub(" ", text) for text in self.tgt.decode(ids)]

    def src_pieces(self, ids: list[int]) -> list[str]:
        return [self.src.id_to_piece(i) for i in ids]

    def tgt_pieces(self, ids: list[int]) -> list[str]:
        return [self.tgt.id_to_piece(i) for i in ids]


def load_sentencepiece(path: Path) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SentencePiece model not found: {path}")
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(path))
    except (OSError, RuntimeError):
        raise DataError(f"not a SentencePiece model: {path}") from None
    return processor
