"""Pictures: attention heat-maps of translated lines and training curves of one or more runs.

Figures are built with matplotlib's object API (no pyplot), so drawing needs no display and
leaves no global state behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import textwrap
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from nmt.alignment import AttentionMap, AttentionOutput, format_alignments, hard_alignments, merge_words
from nmt.atomic import write_text_atomic, written_atomic
from nmt.errors import DataError, first_line
from nmt.train_log import direction_keys, read_train_log, score_key

DPI = 100
CELL = 0.3  # inches per token in a heat-map: room for a 9-point label
LABEL_FONT = 9
CHAR_WIDTH = 0.075  # inches per character of a 9-point label, roughly
COLORBAR = 1.0  # inches right of the map: the colour bar and its ticks
MIN_WIDTH = 5.0  # inches: room for the title


DEFAULT_FONT = "DejaVu Sans"  # matplotlib's own


# A font claiming more code points than any real one has (Last Resort) draws only placeholders.
PLACEHOLDER_FONT_SIZE = 200_000


@functools.cache
def installed_font_characters() -> dict[str, frozenset[int]]:
    """The code points of each installed font, by family name (read once per process). Fonts
    installed after matplotlib built its font cache are added to it."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    manager = font_manager.fontManager
    known = {entry.fname for entry in manager.ttflist}
    for path in font_manager.findSystemFonts():
        if path not in known:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                manager.addfont(path)
    fonts: dict[str, frozenset[int]] = {}
    for entry in manager.ttflist:
        if entry.name not in fonts:
            try:
                characters = frozenset(FT2Font(entry.fname).get_charmap())
            except (OSError, RuntimeError):  # a font file matplotlib cannot read
                continue
            if len(characters) < PLACEHOLDER_FONT_SIZE:
                fonts[entry.name] = characters
    return fonts


def label_fonts(labels: Iterable[str]) -> list[str]:
    """matplotlib's default font, then installed fonts that have the labels' characters it lacks
    (Chinese, say): matplotlib takes each glyph from the first family in the list that has it."""
    fonts = installed_font_characters()
    missing = {ord(c) for label in labels for c in label if not c.isspace()} - fonts.get(DEFAULT_FONT, frozenset())
    families = [DEFAULT_FONT]
    for name, characters in sorted(fonts.items()):
        if missing & characters:
            families.append(name)
            missing -= characters
    return families


def heatmap_size(amap: AttentionMap) -> tuple[float, float, dict[str, float]]:
    """Figure width and height in inches, and the margins around the map, from the labels."""
    longest_source = max(len(label) for label in amap.source)
    longest_output = max(len(label) for label in amap.output)
    margins = {
        "left": 0.3 + CHAR_WIDTH * longest_output,
        "top": 1.0 + CHAR_WIDTH * longest_source,  # two title lines above the rotated labels
        "bottom": 0.3,
    }
    map_width, map_height = CELL * len(amap.source), CELL * len(amap.output)
    width = max(MIN_WIDTH, margins["left"] + map_width + COLORBAR)
    height = margins["top"] + map_height + margins["bottom"]
    return width, height, margins


def draw_attention(amap: AttentionMap, path: Path, title: str, description: str) -> Path:
    """A heat-map PNG: source along the top, output down the side, one cell per weight."""
    width, height, margins = heatmap_size(amap)
    map_width, map_height = CELL * len(amap.source), CELL * len(amap.output)
    fig = Figure(figsize=(width, height), dpi=DPI)
    left, bottom = margins["left"] / width, margins["bottom"] / height
    ax = fig.add_axes((left, bottom, map_width / width, map_height / height))
    image = ax.imshow(amap.weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fonts = label_fonts([*amap.source, *amap.output, title, description])
    ax.set_xticks(np.arange(len(amap.source)), amap.source, rotation=90, fontsize=LABEL_FONT, fontfamily=fonts)
    ax.set_yticks(np.arange(len(amap.output)), amap.output, fontsize=LABEL_FONT, fontfamily=fonts)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    colorbar_axes = fig.add_axes(
        ((margins["left"] + map_width + 0.15) / width, bottom, 0.15 / width, map_height / height)
    )
    fig.colorbar(image, cax=colorbar_axes)
    colorbar_axes.tick_params(labelsize=LABEL_FONT)
    chars = max(20, int(width / (CHAR_WIDTH * 1.2)))
    fig.text(
        0.5, 1 - 0.1 / height, textwrap.shorten(title, chars) + "\n" + textwrap.shorten(description, chars),
        ha="center", va="top", fontsize=10, fontfamily=fonts,
    )
    with warnings.catch_warnings(), written_atomic(path) as tmp:  # characters no installed font has are drawn as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(tmp, dpi=DPI, format="png")
    return path


SCORE_NAMES = {"bleu": "BLEU", "accuracy": "masked accuracy"}  # for logs written before records named their score


def score_name(record: dict) -> str:
    key = score_key(record)
    return record.get("metric_name") or SCORE_NAMES.get(key, key)


def direction_scores(valid: list[dict]) -> dict[str, list[float]]:
    """A multilingual run's dev score per direction (the `bleu_de-en` entries of its records)."""
    directions = direction_keys(valid[0]) if valid else {}
    return {d: [r.get(key, float("nan")) for r in valid] for d, key in directions.items()}


def plot_training(run_dirs: list[Path], out: Path) -> Path:
    """Loss, dev score (BLEU; masked accuracy for `nmt pretrain` runs) and learning rate against
    steps, one colour per run, into a PNG; a multilingual run adds each direction's dev BLEU
    (thin lines, one style each)."""
    fig = training_figure(run_dirs)
    out = Path(out)
    if out.is_dir():  # a folder to put it in
        out = out / "training-curves.png"
    elif not out.suffix:  # as matplotlib names it
        out = out.with_suffix(".png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with written_atomic(out) as tmp:  # a failed write (a full disk) keeps the earlier picture
            fig.savefig(tmp, dpi=DPI, format=out.suffix[1:].lower())
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror or e}") from None
    except ValueError as e:  # a suffix matplotlib has no format for
        raise DataError(f"cannot write {out}: {first_line(e)}") from None
    return out


DIRECTION_STYLES = (":", "-.", (0, (5, 2)), (0, (1, 3)), (0, (3, 1, 1, 1)), (0, (8, 3)))


def training_figure(run_dirs: list[Path]) -> Figure:
    runs = []
    for run_dir in run_dirs:
        train, valid = read_train_log(Path(run_dir))
        if not train and not valid:
            raise DataError(f"{run_dir} has no training records yet")
        runs.append((Path(run_dir), train, valid))
    names = [path.name for path, _, _ in runs]
    if len(set(names)) < len(names):  # same folder names: tell them apart by the full path
        names = [str(path) for path, _, _ in runs]

    fig = Figure(figsize=(15, 4.5), dpi=DPI)
    loss_ax, bleu_ax, lr_ax = fig.subplots(1, 3)
    score_names: list[str] = []
    for index, (name, (_, train, valid)) in enumerate(zip(names, runs)):
        colour = f"C{index % 10}"
        if train:
            steps = [r["step"] for r in train]
            losses = [math.nan if r["loss"] is None else r["loss"] for r in train]  # None: every update skipped
            loss_ax.plot(steps, losses, color=colour, label=f"{name} train")
            lr_ax.plot(steps, [r["lr"] for r in train], color=colour, label=name)
        if valid:
            steps = [r["step"] for r in valid]
            loss_ax.plot(steps, [r["loss"] for r in valid], color=colour, linestyle="--", marker="o",
                         markersize=3, label=f"{name} dev")
            scores = [r.get(score_key(valid[0]), float("nan")) for r in valid]
            score_names.append(score_name(valid[0]))
            bleu_ax.plot(steps, scores, color=colour, marker="o", markersize=3, label=f"{name} ({score_names[-1]})")
            for k, (direction, scores) in enumerate(direction_scores(valid).items()):
                bleu_ax.plot(steps, scores, color=colour, linewidth=0.9, marker=".", markersize=3, label=f"{name} {direction}",
                             linestyle=DIRECTION_STYLES[k % len(DIRECTION_STYLES)], alpha=0.8)
    for ax, title, ylabel in (
        (loss_ax, "loss per target token", "loss (train: label-smoothed)"),
        (bleu_ax, "dev score", " / ".join(dict.fromkeys(score_names)) or "score"),
        (lr_ax, "learning rate", "lr"),
    ):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in (loss_ax, bleu_ax):
        if ax.get_legend_handles_labels()[0]:  # a run not yet validated has no dev curve to name
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_attention(
    maps: list[AttentionMap | None], output: AttentionOutput, title: str, description: str
) -> tuple[int, Path]:
    """Write alignments.txt (one line per input line), attention.jsonl with --json, and a
    heat-map PNG for the first `output.pictures` translated lines (all when 0).

    Returns the number of pictures and the folder.
    """
    directory = Path(output.directory)
    directory.mkdir(parents=True, exist_ok=True)
    if output.words:
        maps = [None if m is None else merge_words(m) for m in maps]
    write_text_atomic(
        directory / "alignments.txt",
        "".join(("" if m is None else format_alignments(hard_alignments(m))) + "\n" for m in maps),
    )
    if output.json:
        records = (
            json.dumps({
                "line": m.line, "attention": description, "source": m.source, "output": m.output,
                "weights": np.round(m.weights.astype(np.float64), 5).tolist(),
            }, ensure_ascii=False)
            + "\n"
            for m in maps if m is not None
        )
        write_text_atomic(directory / "attention.jsonl", "".join(records))
    else:  # an earlier run's weights would disagree with these alignments
        (directory / "attention.jsonl").unlink(missing_ok=True)
    drawn = [m for m in maps if m is not None]
    if output.pictures:
        drawn = drawn[: output.pictures]
    for old in directory.glob("line-*.png"):  # first: a run stopped while drawing leaves no earlier run's map
        old.unlink()
    for m in drawn:
        draw_attention(m, directory / f"line-{m.line:06d}.png", f"line {m.line} · {title}", description)
    return len(drawn), directory
