"""What the decoder looked at: cross-attention maps of translated lines, word-level merging, hard
alignments (`i-j` pairs) and the files `nmt translate --attention DIR` writes."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from nmt.config import ModelConfig
from nmt.errors import DataError
from nmt.models.attention import AttentionChoice

EOS_LABEL = "</s>"
WORD_START = "\u2581"  # SentencePiece's mark of a piece that begins a word


@dataclass
class AttentionMap:
    """Cross-attention of one translated line: row i is the distribution over the source with
    which output token i was produced."""

    line: int  # 1-based input line number
    source: list[str]  # source pieces (or words), EOS_LABEL last
    output: list[str]  # output pieces (or words), EOS_LABEL last
    weights: np.ndarray  # (len(output), len(source))


@dataclass
class AttentionOutput:
    """Where and what `nmt translate --attention` writes."""

    directory: Path
    choice: AttentionChoice = field(default_factory=AttentionChoice)
    pictures: int = 0  # heat-maps for the first N translated lines; 0: every line
    words: bool = False  # merge subword pieces into words
    json: bool = False  # also write the weights as JSON lines


ATTENTION_FILES = re.compile(r"alignments\.txt|attention\.jsonl|line-\d{6}\.png")  # what --attention writes


def check_attention_dir(directory: Path, translation: Path | None = None, inputs: Sequence[tuple[str, Path | None]] = ()) -> None:
    """Check that `directory`, for `nmt translate --attention`, is new or holds only what such a
    run writes (and `translation`, the -o file): the user's files are never written over, nor an
    input (`inputs`: (option, path)) that has the name of a file it writes."""
    if directory.exists() and not directory.is_dir():
        raise DataError(f"--attention {directory} is a file, not a folder")
    own = translation.resolve() if translation is not None else None
    if own is not None and own.parent == directory.resolve() and ATTENTION_FILES.fullmatch(own.name):
        raise DataError(f"-o {translation} is a file --attention writes: write the translation elsewhere")
    # What the run writes or removes, through links as its writes go: no input may be one of them.
    written = {os.path.realpath(p) for p in [directory / "alignments.txt", directory / "attention.jsonl",
                                              *(directory.glob("line-*.png") if directory.is_dir() else [])]}
    for option, path in inputs:
        if path is not None and os.path.realpath(path) in written:
            raise DataError(f"{option} {path} is a file --attention {directory} writes: give another folder")
    others = sorted(p.name for p in directory.iterdir()
                    if not (p.name.startswith(".") or ATTENTION_FILES.fullmatch(p.name) or p.resolve() == own)) \
        if directory.is_dir() else []  # hidden: .DS_Store, a killed run's temporary files
    if others:
        raise DataError(f"--attention {directory} holds files it does not write ({others[0]}, ...): give a new or empty folder")


def describe_attention(model: ModelConfig, choice: AttentionChoice) -> str:
    """Which weights a map shows, in words, e.g. 'transformer, decoder layer 6 of 6, mean of 8 heads';
    a ConfigError for a layer or head the model lacks."""
    if model.arch == "rnn":
        choice.check_exists(None, None)
        return f"rnn ({model.cell}), {model.attention} attention"
    choice.check_exists(model.dec_layers, model.heads)
    layer = choice.layer or model.dec_layers
    heads = f"mean of {model.heads} heads" if choice.head is None else f"head {choice.head} of {model.heads}"
    return f"transformer, decoder layer {layer} of {model.dec_layers}, {heads}"


# Scripts written without spaces between words (CJK punctuation, kana, Han, full-width forms):
# there, each piece counts as a word, since the word mark would join a whole sentence.
UNSPACED = re.compile("[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")


def word_groups(pieces: list[str]) -> list[list[int]]:
    """Indices of the pieces that make up each word: a word starts at a piece beginning with
    the word mark, and at each piece of an unspaced script; EOS_LABEL is a word of its own."""
    groups: list[list[int]] = []
    for i, piece in enumerate(pieces):
        previous = pieces[i - 1] if i else ""
        if (not groups or piece == EOS_LABEL or piece.startswith(WORD_START) or previous == EOS_LABEL
                or UNSPACED.search(piece) or UNSPACED.search(previous)):
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def _word(pieces: list[str], group: list[int]) -> str:
    text = "".join(pieces[i] for i in group).replace(WORD_START, "")
    return text or WORD_START


def merge_words(amap: AttentionMap) -> AttentionMap:
    """Word-level map: a source word gets the sum of its pieces' weights (the attention mass on
    the word); an output word the mean of its pieces' rows, so rows stay distributions."""
    src_groups, out_groups = word_groups(amap.source), word_groups(amap.output)
    columns = np.stack([amap.weights[:, g].sum(1) for g in src_groups], axis=1)  # (T, S_words)
    weights = np.stack([columns[g].mean(0) for g in out_groups], axis=0)  # (T_words, S_words)
    return replace(
        amap,
        source=[_word(amap.source, g) for g in src_groups],
        output=[_word(amap.output, g) for g in out_groups],
        weights=weights,
    )


def hard_alignments(amap: AttentionMap) -> list[tuple[int, int]]:
    """(source index, output index) for each output token: the source position it attended to
    most. The end-of-sentence tokens are left out on both sides."""
    pairs = []
    for j, row in enumerate(amap.weights):
        if amap.output[j] == EOS_LABEL:
            continue
        i = int(np.argmax(row))
        if amap.source[i] != EOS_LABEL:
            pairs.append((i, j))
    return sorted(pairs)


def format_alignments(pairs: list[tuple[int, int]]) -> str:
    """The usual `i-j` format (0-based source-output pairs, as fast_align and Moses write them)."""
    return " ".join(f"{i}-{j}" for i, j in pairs)
