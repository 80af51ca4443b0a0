"""`nmt translate`: text in, one translation per input line out, in the input order."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nmt.alignment import EOS_LABEL, AttentionMap, AttentionOutput, describe_attention
from nmt.atomic import write_text_atomic
from nmt.batches import pad_source
from nmt.checkpoint import load_for_inference
from nmt.config import DecodeConfig
from nmt.data import clean_whitespace, decode_lines, read_lines
from nmt.devices import autocast, resolve_device, resolve_precision
from nmt.errors import ConfigError
from nmt.files import VocabInfo
from nmt.interfaces import StepDecoder
from nmt.models.attention import AttentionChoice
from nmt.normalize import Normalization
from nmt.search import Hypothesis, beam_search, greedy_search
from nmt.tokenizer import Tokenizer


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
) -> list[list[Hypothesis]]:
    """Translate token-id sequences (without EOS); returns the n-best list of each, in order.

    With `attention`, each hypothesis keeps the chosen cross-attention weights (on the CPU),
    one row per output token (EOS included) over its source tokens and the source EOS.
    """
    results: list[list[Hypothesis]] = [[] for _ in sources]
    batches = decode_batches([len(s) for s in sources], decode.batch_tokens)
    # One autocast region for every batch: the weights are cast to half precision once.
    with autocast(device, resolve_precision(decode.precision, device)):
        # disable=None: no bar when stderr is not a terminal (a log file, CI)
        for indices in tqdm(batches, desc="translating", unit="batch", disable=None if progress else True, file=sys.stderr):
            _translate_batch(model, sources, indices, decode, device, attention, results)
    return results


def _translate_batch(
    model: StepDecoder, sources: Sequence[Sequence[int]], indices: np.ndarray, decode: DecodeConfig, device: torch.device,
    attention: AttentionChoice | None, results: list[list[Hypothesis]],
) -> None:
    """Translate the sources at `indices` as one batch into `results`."""
    src = pad_source([sources[i] for i in indices]).to(device)
    if decode.beam == 1:
        hyps = [[h] for h in greedy_search(model, src, decode.max_len_a, decode.max_len_b, attention)]
    else:
        hyps = beam_search(
            model, src, decode.beam, decode.len_penalty, decode.max_len_a, decode.max_len_b, decode.nbest,
            attention,
        )
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


def translate_lines(
    model,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    decode: DecodeConfig,
    device: torch.device,
    normalize: Normalization | None = None,
    progress: bool = False,
    attention: AttentionChoice | None = None,
) -> Translations:
    """Translate text lines; `normalize` is what the model's source text went through in
    training (the checkpoint's record, `VocabInfo.source_normalization`; default NFC)."""
    normalize = normalize or Normalization()
    cleaned = [clean_whitespace(normalize(line)) for line in lines]
    non_empty = [i for i, line in enumerate(cleaned) if line]
    encoded = tokenizer.encode_src([cleaned[i] for i in non_empty])
    truncated = [non_empty[k] + 1 for k, ids in enumerate(encoded) if len(ids) > decode.max_input_tokens]
    encoded = [ids[: decode.max_input_tokens] for ids in encoded]
    hyps = translate_ids(model, encoded, decode, device, progress, attention)
    hypotheses: list[list[Hypothesis]] = [[] for _ in lines]
    texts: list[list[str]] = [[""] for _ in lines]
    maps: list[AttentionMap | None] = [None for _ in lines]
    for i, ids, nbest in zip(non_empty, encoded, hyps):
        hypotheses[i] = nbest
        texts[i] = tokenizer.decode_tgt([h.tokens for h in nbest])
        if attention is not None:
            best = nbest[0]
            maps[i] = AttentionMap(
                line=i + 1,
                source=tokenizer.src_pieces(ids) + [EOS_LABEL],
                output=tokenizer.tgt_pieces(best.tokens) + [EOS_LABEL],
                weights=best.attention.numpy(),
            )
    return Translations(hypotheses, texts, truncated, maps if attention is not None else None)


def format_output(translations: Translations, nbest: int) -> str:
    if nbest == 1:
        return "".join(texts[0] + "\n" for texts in translations.texts)
    out = []
    for i, (hyps, texts) in enumerate(zip(translations.hypotheses, translations.texts)):
        if not hyps:
            out.append(f"{i} ||| ||| 0.0000\n")
        for hyp, text in zip(hyps, texts):
            out.append(f"{i} ||| {text} ||| {hyp.score:.4f}\n")
    return "".join(out)


def translate_file(
    save_dir: Path,
    input_path: Path | None,
    output_path: Path | None,
    decode_options: dict | None = None,
    checkpoint: str = "best",
    device: str = "auto",
    replace_invalid: bool = False,
    warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    quantize: bool = False,
    attention: AttentionOutput | None = None,
) -> int:
    """Translate a file (or stdin when None) into a file (or stdout); returns the line count.

    Decoding settings are the checkpoint's `decode` config with `decode_options` (beam, nbest,
    len_penalty, ...) replacing the values that are given; only the best translation is written
    unless `nbest` is given. `quantize` runs the Linear layers in int8 (CPU only). `attention`
    writes the cross-attention of each best translation: alignments, heat-maps, weights.
    """
    torch_device = resolve_device(device)
    if quantize and torch_device.type != "cpu":
        raise ConfigError("int8 quantization runs on the CPU only: add --device cpu")
    model, tokenizer, config = load_for_inference(save_dir, checkpoint, torch_device)
    if quantize:
        model = quantize_int8(model)
    options = {k: v for k, v in (decode_options or {}).items() if v is not None}
    decode = dataclasses.replace(config.decode, **{"nbest": 1, **options})
    decode.validate()
    normalization = VocabInfo.read(save_dir).source_normalization()
    if input_path is None:
        lines = _read_stdin(replace_invalid)
    else:
        lines = list(read_lines(Path(input_path), replace_invalid=replace_invalid))
    result = translate_lines(
        model, tokenizer, lines, decode, torch_device, normalization, progress=output_path is not None,
        attention=None if attention is None else attention.choice,
    )
    for lineno in result.truncated[:5]:
        warn(f"warning: line {lineno} has more than {decode.max_input_tokens} tokens and was truncated")
    if len(result.truncated) > 5:
        warn(f"warning: {len(result.truncated)} lines were truncated in all")
    text = format_output(result, decode.nbest)
    if output_path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text_atomic(Path(output_path), text)
    if attention is not None:
        title = f"model {save_dir}"
        from nmt.plots import write_attention  # matplotlib: only when pictures are asked for

        pictures, directory = write_attention(
            result.attention_maps, attention, title, describe_attention(config.model, attention.choice)
        )
        warn(f"attention: {pictures} heat-map(s) and alignments.txt in {directory}")
    return len(lines)


def _read_stdin(replace_invalid: bool) -> list[str]:
    return list(decode_lines(sys.stdin.buffer, "<stdin>", replace_invalid))
