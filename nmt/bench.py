"""`nmt bench`: how fast training and decoding run on the device present, on Multi30k de→en.

Every figure is the median of `repeats` runs and comes with a plain baseline measured in the same
run, so that the ratio says what the toolkit's own paths gain:

- training: target and source+target tokens/s, peak memory, and model FLOPs utilization (the
  Transformer's matrix-product FLOPs on the real tokens, padding left out, ÷ the device's peak:
  the datasheet figure where the GPU is known, and always the matrix-product rate measured in
  the same run). Baseline: a plain
  PyTorch step (fp32, eager, unfused AdamW, torch's dropout mask and glibc's default reuse of
  freed memory on the CPU) on the same batches, all baselines before the first nmt step;
- time to quality: training seconds (validation left out) until the dev BLEU first reaches a
  threshold, with the recipe's settings;
- decoding test_2016_flickr from raw text (tokenization included), greedy and beam 5, with the
  model trained for time to quality. Baseline (timed once: it is slow and steady): rerunning the
  decoder over the whole prefix at every step, which must give the same output as incremental
  decoding. Beside them, a Transformer exported to CTranslate2 (`nmt export`), beam 5, computing
  in float32 and in int8, with its speed relative to nmt's own fp32 beam 5.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nmt import __version__
from nmt.atomic import write_text_atomic
from nmt.batches import make_batch, token_batches
from nmt.checkpoint import load_for_inference, read_config
from nmt.config import Config, DecodeConfig, load_config
from nmt.corpora import LOCAL_MULTI30K, PROJECT_ROOT
from nmt.data import ParallelSplit, read_lines
from nmt.devices import (
    cpu_multiplies_natively,
    gpu_has_bf16,
    grad_scaler,
    keep_freed_memory,
    resolve_device,
    resolve_precision,
)
from nmt.errors import ConfigError, DataError, NmtError
from nmt.evaluate import corpus_bleu
from nmt.files import TRANSLATION, Manifest, VocabInfo, text_files
from nmt.models import build_model
from nmt.models.dropout import use_torch_masks
from nmt.models.transformer import training_flops
from nmt.paths import check_output_apart, check_output_file
from nmt.prepare import PrepareConfig, prepare
from nmt.search import FullPrefixDecoding
from nmt.static_decoding import GRAPH_COUNTS, StaticStepModel
from nmt.tokenizer import Tokenizer
from nmt.train import compile_model, make_optimizer, train, training_update
from nmt.train_log import read_train_log
from nmt.translate import Translations, quantize_int8, translate_lines

SECTIONS = ("train", "ttq", "decode")

# Dense matrix-unit peaks from NVIDIA's datasheets (FLOP/s), by the name torch reports; the first
# key the name contains counts, so the NVL cards (lower clocks) come before their SXM namesakes.
# float32 is the plain FP32 rate: torch leaves TF32 off for matrix products by default.
DATASHEET_PEAKS = {
    "H200 NVL": {torch.bfloat16: 835.5e12, torch.float16: 835.5e12, torch.float32: 60e12},
    "H100 NVL": {torch.bfloat16: 835.5e12, torch.float16: 835.5e12, torch.float32: 60e12},
    "H200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12},
    "H100 80GB HBM3": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12},
    "H100 PCIe": {torch.bfloat16: 756.5e12, torch.float16: 756.5e12, torch.float32: 51.2e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
}


@dataclass
class BenchConfig:
    data: Path = LOCAL_MULTI30K  # Multi30k files: train.de.gz, val.*, test_2016_flickr.*
    out: Path = Path("bench.json")
    # Model configs by name; default: recipes/multi30k/{transformer,rnn}-{gpu,cpu}.yaml for the device.
    recipes: dict[str, Path] | None = None
    # Trained checkpoint dirs (by model name) to decode instead of the model trained for time to quality.
    checkpoints: dict[str, Path] = field(default_factory=dict)
    sections: tuple[str, ...] = SECTIONS
    device: str = "auto"
    steps: int = 0  # timed updates per repeat; 0: 40 on a GPU, 4 on a CPU
    repeats: int = 3
    vocab_size: int = 0  # joint SentencePiece vocabulary; 0: 8000 on a GPU, 5000 on a CPU (as the recipes)
    ttq_bleu: float = 0.0  # dev BLEU to reach; 0: 35 on a GPU, 20 on a CPU
    ttq_minutes: float = 0.0  # give up after this much training; 0: 10 on a GPU, 10 on a CPU
    ttq_valid_every: int = 100  # updates between validations while timing
    work_dir: Path | None = None  # keeps the prepared data and trained models; default: a temporary dir
    # Vocabulary of a model (by name) when it should differ from the data's: Transformer-base's
    # 32k over Multi30k's 8k tokens costs per token what it costs on WMT.
    model_vocab: dict[str, int] = field(default_factory=dict)
    half_precision_decoding: bool | None = None  # also decode with bf16 autocast; None: on a GPU
    ctranslate2: bool = True  # also decode (beam 5) with Transformers exported to CTranslate2, fp32 and int8
    # On a CPU, also time nmt's training step under bf16 autocast; None: where the CPU has bf16
    # matrix instructions (AVX512_BF16 or AMX).
    cpu_bf16_training: bool | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DATASHEET_PEAKS.items():
        if key in name:
            return peaks.get(dtype)
    return None


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of a large square matrix product on random data (median of repeats). A CPU
    without instructions for `dtype` emulates it at about 1 GFLOP/s: a smaller product gives
    that rate in seconds rather than minutes."""
    if device.type == "cuda":
        size, count = 8192, 20
    else:
        size, count = (2048 if cpu_multiplies_natively(dtype) else 512), 3
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up: library handles, kernel choice
    times = []
    for _ in range(max(repeats, 3)):
        _sync(device)
        start = time.perf_counter()
        for _ in range(count):
            a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 * count / statistics.median(times)


def reset_peak_memory(device: torch.device) -> None:
    """Start `peak_memory_mb`'s count again, so that a row's peak is its own, not the largest of
    the rows before it: the GPU allocator's; on Linux the process's peak resident set (VmHWM),
    which then starts from what is resident now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """The peak since `reset_peak_memory`: GPU memory allocated, or the process's resident set
    (the peak of the whole run where the system has no VmHWM to reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        found = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        if found:
            return int(found.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_training(
    name: str,
    config: Config,
    split: ParallelSplit,
    vocab_sizes: tuple[int, int],
    device: torch.device,
    plain: bool,
    steps: int,
    repeats: int,
) -> dict:
    """Time `steps` updates on fixed real batches, `repeats` times, after one counted warm-up pass."""
    tc = config.train
    dtype = torch.float32 if plain else resolve_precision(tc.precision, device)
    torch.manual_seed(tc.seed)
    model = build_model(config.model, *vocab_sizes).to(device).train()
    if plain:
        use_torch_masks(model)
    if device.type == "cpu" and not plain:
        keep_freed_memory()  # as `nmt train` does on the CPU
    optimizer = make_optimizer(model, tc, fused=not plain)
    step_model = compile_model(model) if tc.compile and not plain else model
    scaler = grad_scaler(model, device, dtype)
    batches = token_batches(split.src.lengths, split.tgt.lengths, tc.batch_tokens, seed=tc.seed)[:steps]
    pin = device.type == "cuda" and not plain
    tgt_tokens = sum(len(b) + int(split.tgt.lengths[b].sum()) for b in batches)  # + EOS per sentence
    src_tokens = sum(len(b) + int(split.src.lengths[b].sum()) for b in batches)

    # On a GPU the trainer builds batches in a background thread while the updates run, so the
    # updates alone are timed there; on a CPU it builds each in turn, and so does the bench.
    ready = [make_batch(split, indices, pin).to(device) for indices in batches] if device.type == "cuda" else None

    def run_pass(forward_model: torch.nn.Module) -> None:
        for batch in ready or (make_batch(split, indices, pin).to(device) for indices in batches):
            training_update(forward_model, optimizer, scaler, [batch], tc, tc.lr * 0.1, device, dtype)

    reset_peak_memory(device)
    run_pass(model)  # warm-up
    flops = None  # model FLOPs of a pass, on the real tokens: for the Transformer only
    if config.model.arch == "transformer":
        sentences = np.concatenate(batches)
        flops = training_flops(config.model, vocab_sizes[1], split.src.lengths[sentences] + 1, split.tgt.lengths[sentences] + 1)
    if step_model is not model:
        _sync(device)
        compile_started = time.perf_counter()
        run_pass(step_model)  # compiles
        _sync(device)
        compile_seconds = time.perf_counter() - compile_started
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run_pass(step_model)
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "model": name,
        "path": "plain" if plain else "nmt",
        "dtype": str(dtype).replace("torch.", ""),
        "compiled": step_model is not model,
        "compile_and_first_pass_seconds": compile_seconds if step_model is not model else None,
        "updates": len(batches),
        "tgt_tokens_per_s": tgt_tokens / seconds,
        "tokens_per_s": (tgt_tokens + src_tokens) / seconds,
        "seconds_per_update": seconds / len(batches),
        "flops_per_s": flops / seconds if flops else None,
        "peak_memory_mb": peak_memory_mb(device),
        "seconds_all_repeats": times,
    }


def bench_time_to_quality(
    name: str, config: Config, data_dir: Path, save_dir: Path, threshold: float, minutes: float, valid_every: int,
    log: Callable[[str], None], stop_at_threshold: bool = True,
) -> dict:
    """Train with the recipe's settings for at most `minutes` (stopping once the dev BLEU reaches
    `threshold`, unless told not to) and report when it first did."""
    config = copy.deepcopy(config)
    config.data_dir, config.save_dir = str(data_dir), str(save_dir)
    tc = config.train
    tc.target_bleu = threshold if stop_at_threshold else 0.0
    tc.max_minutes, tc.valid_every = minutes, valid_every
    tc.max_epochs, tc.max_steps, tc.patience, tc.valid_max_sentences = 0, 0, 0, 0
    result = train(config, overwrite=True, progress=False, log=log)
    _, valid = read_train_log(save_dir)
    reached = next((r for r in valid if r["bleu"] >= threshold), None)
    return {
        "model": name,
        "dev_bleu_threshold": threshold,
        "reached": reached is not None,
        "train_seconds": reached["train_seconds"] if reached else None,
        "wall_seconds": reached["seconds"] if reached else None,
        "updates": reached["step"] if reached else None,
        "best_dev_bleu": result.best_score,
        "trained_seconds": result.seconds,
        "stop_reason": result.stop_reason,
        "curve": [{k: r[k] for k in ("step", "bleu", "train_seconds")} for r in valid],
    }


def time_translation(
    decoder, tokenizer: Tokenizer, lines: list[str], decode: DecodeConfig, device: torch.device, normalization,
    repeats: int,
) -> tuple[list[float], Translations]:
    """Seconds of each of `repeats` translations of `lines` (after a warm-up on 50 of them, or on
    all of them with fixed-shape steps, whose buffers and CUDA graphs are made per batch shape on
    first use), and the output."""
    warm_up = lines if decode.static_cache else lines[:50]
    translate_lines(decoder, tokenizer, warm_up, decode, device, normalization)
    times, translations = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        translations = translate_lines(decoder, tokenizer, lines, decode, device, normalization)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, translations


def bench_decoding(
    name: str, save_dir: Path, lines: list[str], references: list[str], device: torch.device, repeats: int,
    with_int8: bool, with_half: bool = False, ctranslate2_dir: Path | None = None, records: list[dict] | None = None,
) -> list[dict]:
    """Greedy and beam 5 with the plain path, the incremental one, (`with_int8`) int8 Linear
    layers or (`with_half`) bf16 autocast, and for Transformers the fixed-shape steps of
    `decode.static_cache` (CUDA graphs on a GPU); each record counts the lines that differ from
    the plain path's output, and the others also those that differ from the incremental fp32 one. With
    `ctranslate2_dir`, a Transformer is also exported there and decoded by CTranslate2 (beam 5).
    The records are appended to `records` as each is measured (a run cut short keeps them), and
    returned."""
    model, tokenizer, config = load_for_inference(save_dir, "best", device)
    normalization = VocabInfo.read(save_dir).source_normalization()
    paths = [("plain", FullPrefixDecoding(model), "fp32", False), ("nmt", model, "fp32", False)]
    if with_int8:
        paths.append(("nmt-int8", quantize_int8(model), "fp32", False))
    if with_half:
        paths.append(("nmt-bf16", model, "bf16", False))
    if isinstance(model, StaticStepModel):  # fixed-shape steps (CUDA graphs on a GPU), as translate decides
        paths += [("nmt-static", model, "fp32", True)] + ([("nmt-static-bf16", model, "bf16", True)] if with_half else [])
    records = [] if records is None else records
    first, texts_of = len(records), {}
    for beam in (1, 5):
        for path_name, decoder, precision, static in paths:
            decode = dataclasses.replace(config.decode, beam=beam, nbest=1, precision=precision, sampling=False,
                                         static_cache=static)
            # The plain baseline is slow and steady: one run of it is enough for the ratio.
            counts_before = dict(GRAPH_COUNTS)
            times, translations = time_translation(
                decoder, tokenizer, lines, decode, device, normalization, 1 if path_name == "plain" else repeats
            )
            record = _decoding_record(name, path_name, precision, beam, lines, references, times, translations, texts_of)
            if static:  # whether the steps were replayed graphs or ran eagerly (a failed capture)
                record["cuda_graphs"] = {key: GRAPH_COUNTS[key] - counts_before.get(key, 0) for key in GRAPH_COUNTS}
            if precision != "fp32" or static:
                record["lines_differing_from_fp32"] = _differing(texts_of[path_name, beam], texts_of["nmt", beam])
            records.append(record)
    if ctranslate2_dir is not None and config.model.arch == "transformer":
        records += bench_ctranslate2(name, save_dir, ctranslate2_dir, lines, references, device, repeats, records, texts_of)
    return records[first:]


def bench_ctranslate2(
    name: str, save_dir: Path, export_dir: Path, lines: list[str], references: list[str], device: torch.device,
    repeats: int, records: list[dict], texts_of: dict,
) -> list[dict]:
    """Beam 5 with the model exported to CTranslate2, with float32 weights and with int8 ones
    (`--quantization int8`), each with its ratio to the nmt fp32 beam-5 row and the lines that
    differ from it."""
    from nmt.export import export_model, load_ctranslate2_translator

    int8_dir = export_dir.with_name(f"{export_dir.name}-int8")
    export_model(save_dir, export_dir, overwrite=True)
    export_model(save_dir, int8_dir, quantization="int8", overwrite=True)
    nmt_row = next(r for r in records if r["model"] == name and r["path"] == "nmt" and r["beam"] == 5)
    ct2_device = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
    rows = []
    for path_name, directory, precision, quantize in (("ct2", export_dir, "fp32", False),
                                                       ("ct2-int8", int8_dir, "int8", True)):
        translator = load_ctranslate2_translator(directory, {"beam": 5, "precision": "fp32", "sampling": False},
                                                 ct2_device, quantize)
        translator.translate(lines[:50])  # warm-up
        times, translations = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            translations = translator.translate(lines)  # CTranslate2 returns when its work is done
            times.append(time.perf_counter() - start)
        record = _decoding_record(name, path_name, precision, 5, lines, references, times, translations, texts_of)
        record["speed_vs_nmt_fp32"] = nmt_row["seconds"] / record["seconds"]
        record["lines_differing_from_nmt_fp32"] = _differing(texts_of[path_name, 5], texts_of["nmt", 5])
        rows.append(record)
    return rows


def _differing(texts: list[str], others: list[str]) -> int:
    return sum(a != b for a, b in zip(texts, others))


def _decoding_record(
    name: str, path_name: str, precision: str, beam: int, lines: list[str], references: list[str], times: list[float],
    translations: Translations, texts_of: dict,
) -> dict:
    """The figures of one decoding path; keeps its output in `texts_of[path_name, beam]`."""
    texts = [nbest[0] for nbest in translations.texts]
    texts_of[path_name, beam] = texts
    tokens = sum(len(h[0].tokens) + 1 for h in translations.hypotheses if h)
    seconds = statistics.median(times)
    return {
        "model": name,
        "path": path_name,
        "precision": precision,
        "beam": beam,
        "sentences": len(lines),
        "seconds": seconds,
        "sentences_per_s": len(lines) / seconds,
        "tokens_per_s": tokens / seconds,
        "bleu": corpus_bleu(texts, references),
        "lines_differing_from_plain": _differing(texts, texts_of["plain", beam]),
        "repeats": len(times),
        "seconds_all_repeats": times,
    }


@dataclass
class BenchPlan:
    """The settings of one bench run, with the device's defaults filled in."""

    device: torch.device
    steps: int
    threshold: float  # dev BLEU for time to quality
    minutes: float
    vocab_size: int
    recipes: dict[str, Path]
    configs: dict[str, Config]
    cpu_bf16_training: bool  # also time nmt's step in bf16 on the CPU


def plan_bench(bc: BenchConfig) -> BenchPlan:
    """Fill in `bc`'s device defaults and load its configs; unknown sections and missing Multi30k
    files are errors before anything runs."""
    device = resolve_device(bc.device)
    gpu = device.type == "cuda"
    unknown = set(bc.sections) - set(SECTIONS)
    if not bc.sections:  # it would prepare the data and measure nothing
        raise ConfigError(f"no bench section given; choose from {', '.join(SECTIONS)}")
    if unknown:
        raise ConfigError(f"unknown bench section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    for name, value in (("--ttq-minutes", bc.ttq_minutes), ("--ttq-bleu", bc.ttq_bleu)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name} must be 0 (the default) or more (got {value})")
    check_output_file(bc.out)
    for split in ("train", "val", "test_2016_flickr"):
        for lang in ("de", "en"):
            if not (bc.data / f"{split}.{lang}.gz").exists() and not (bc.data / f"{split}.{lang}").exists():
                raise DataError(f"Multi30k file {bc.data / f'{split}.{lang}.gz'} not found (pass --data)")
    kind = "gpu" if gpu else "cpu"
    recipes = bc.recipes or {name: PROJECT_ROOT / f"recipes/multi30k/{name}-{kind}.yaml" for name in ("transformer", "rnn")}
    # Not over a recipe, nor into a model it decodes or the corpus it prepares.
    check_output_apart(bc.out, list(recipes.values()), [*bc.checkpoints.values(), bc.data])
    unknown = set(bc.checkpoints) - set(recipes)
    if unknown:
        raise ConfigError(f"--checkpoint {', '.join(sorted(unknown))}: no recipe of that name ({', '.join(recipes)})")
    for name, save_dir in bc.checkpoints.items():  # it decodes German test sentences into English
        info = VocabInfo.read(save_dir)
        if info.task != TRANSLATION or info.multilingual or (info.src_lang, info.tgt_lang) != ("de", "en"):
            what = "a pretrained masked LM" if info.task != TRANSLATION else \
                f"a {'multilingual ' if info.multilingual else ''}{info.src_lang}→{info.tgt_lang} model"
            raise ConfigError(f"--checkpoint {name}={save_dir} is {what}; nmt bench decodes Multi30k de→en")
    configs = {}
    for name, path in recipes.items():
        configs[name] = load_config(path)
        configs[name].train.device = bc.device
    return BenchPlan(
        device=device, steps=bc.steps or (40 if gpu else 4), threshold=bc.ttq_bleu or (35.0 if gpu else 20.0),
        minutes=bc.ttq_minutes or 10.0, vocab_size=bc.vocab_size or (8000 if gpu else 5000),
        recipes=recipes, configs=configs,
        cpu_bf16_training=not gpu and (cpu_multiplies_natively(torch.bfloat16) if bc.cpu_bf16_training is None
                                       else bc.cpu_bf16_training),
    )


def run_bench(bc: BenchConfig, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
              report: dict | None = None) -> dict:
    """Run the benchmark's sections and write the report to `bc.out`. `report`, when given, is
    filled in place record by record, so that a caller whose time runs out keeps what was measured."""
    plan = plan_bench(bc)
    report = {} if report is None else report
    temporary = tempfile.TemporaryDirectory(prefix="nmt-bench-") if bc.work_dir is None else None
    work_dir = Path(temporary.name) if temporary else Path(bc.work_dir)
    try:
        data_dir = work_dir / "data"
        prepare_bench_data(bc.data, data_dir, plan.vocab_size, log)
        report.update(report_header(bc, plan))
        report["matmul"] = matmul_rates(plan, bc.repeats, log)
        if "train" in bc.sections:
            training_section(bc, plan, data_dir, report["matmul"], log, report["train"])
        if "ttq" in bc.sections or "decode" in bc.sections:
            quality_and_decoding_sections(bc, plan, data_dir, work_dir, log, report["time_to_quality"], report["decode"])
    except BaseException:  # Ctrl-C or a failure: the rows measured so far are written all the same
        if "matmul" in report:
            report["interrupted"] = True
            with contextlib.suppress(OSError):
                write_text_atomic(bc.out, json.dumps(report, indent=2) + "\n")
        raise
    finally:
        if temporary:
            temporary.cleanup()
    try:
        write_text_atomic(bc.out, json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise DataError(f"cannot write {bc.out}: {e.strerror or e}") from None
    return report


def prepare_bench_data(multi30k: Path, data_dir: Path, vocab_size: int, log: Callable[[str], None]) -> None:
    """Multi30k de→en with a joint vocabulary in `data_dir`, unless it is there already (prepared
    from the same files with the same vocabulary size: else it is prepared again)."""
    if (data_dir / Manifest.NAME).exists():
        manifest = Manifest.read(data_dir)
        if manifest.vocab.requested_size == vocab_size and manifest.input.get("train") == str(multi30k / "train"):
            return
    log(f"preparing Multi30k de-en ({vocab_size} joint vocabulary) in {data_dir}")
    prepare(PrepareConfig(
        out_dir=data_dir, src_lang="de", tgt_lang="en", train_prefix=str(multi30k / "train"),
        valid_prefix=str(multi30k / "val"), test_prefix=str(multi30k / "test_2016_flickr"),
        vocab_size=vocab_size, overwrite=True,
    ))


def report_header(bc: BenchConfig, plan: BenchPlan) -> dict:
    """The report's versions, device and settings, with its sections still empty."""
    return {
        "nmt_version": __version__,
        "torch": torch.__version__,
        "device": device_description(plan.device),
        "cuda": torch.version.cuda if plan.device.type == "cuda" else None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {
            "steps": plan.steps, "repeats": bc.repeats, "vocab_size": plan.vocab_size, "ttq_dev_bleu": plan.threshold,
            "ttq_minutes": plan.minutes, "ttq_valid_every": bc.ttq_valid_every, "sections": list(bc.sections),
        },
        "recipes": {name: str(path) for name, path in plan.recipes.items()},
        "configs": {name: dataclasses.asdict(cfg) for name, cfg in plan.configs.items()},
        "matmul": {},
        "train": [],
        "time_to_quality": [],
        "decode": [],
    }


def matmul_rates(plan: BenchPlan, repeats: int, log: Callable[[str], None]) -> dict:
    """Measured and datasheet matrix-product rates for fp32 and each config's precision."""
    dtypes = {torch.float32} | {resolve_precision(cfg.train.precision, plan.device) for cfg in plan.configs.values()}
    if plan.cpu_bf16_training:
        dtypes.add(torch.bfloat16)
    rates = {}
    for dtype in sorted(dtypes, key=str):
        label = str(dtype).replace("torch.", "")
        log(f"measuring the {label} matrix-product rate")
        rates[label] = {
            "measured_flops_per_s": measure_matmul_rate(plan.device, dtype, repeats),
            "datasheet_flops_per_s": datasheet_peak(plan.device, dtype),
        }
    return rates


def training_section(bc: BenchConfig, plan: BenchPlan, data_dir: Path, matmul: dict, log: Callable[[str], None],
                     records: list[dict]) -> None:
    """Training throughput of each config, the plain PyTorch step and nmt's, with their MFU,
    appended to `records` one by one."""
    train_split = ParallelSplit.load(data_dir, "train")
    vocab = Manifest.read(data_dir).vocab
    tokenizer = Tokenizer(data_dir / vocab.src_model, data_dir / vocab.tgt_model)
    # Every plain baseline first: nmt's CPU step changes how the process reuses freed memory.
    passes = [(True, None), (False, None)] + ([(False, "bf16")] if plan.cpu_bf16_training else [])
    for plain, precision in passes:
        for name, cfg in plan.configs.items():
            sizes = (bc.model_vocab[name],) * 2 if name in bc.model_vocab else (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
            if precision:
                cfg = copy.deepcopy(cfg)
                cfg.train.precision = precision
            log(f"training throughput: {name}, {'plain PyTorch' if plain else 'nmt'} step{f' in {precision}' if precision else ''}, "
                f"{plan.steps} updates x {bc.repeats}")
            record = bench_training(name, cfg, train_split, sizes, plan.device, plain, plan.steps, bc.repeats)
            rates = matmul[record["dtype"]]
            if record["flops_per_s"]:
                record["mfu_of_measured_matmul"] = record["flops_per_s"] / rates["measured_flops_per_s"]
                if rates["datasheet_flops_per_s"]:
                    record["mfu"] = record["flops_per_s"] / rates["datasheet_flops_per_s"]
            if precision:
                fp32 = next(r for r in records if r["model"] == name and r["path"] == "nmt")
                record["speed_vs_nmt_fp32"] = record["tgt_tokens_per_s"] / fp32["tgt_tokens_per_s"]
            records.append(record)
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()


def quality_and_decoding_sections(
    bc: BenchConfig, plan: BenchPlan, data_dir: Path, work_dir: Path, log: Callable[[str], None],
    timed: list[dict], decoding: list[dict],
) -> None:
    """Time to quality (training each model that no `--checkpoint` names) and the decoding of
    test_2016_flickr with it, appended to `timed` and `decoding` model by model; the
    time-to-quality records get the model's beam-5 test BLEU."""
    source, reference = text_files(data_dir, "test")
    lines, references = list(read_lines(source)), list(read_lines(reference))
    gpu = plan.device.type == "cuda"
    for name, cfg in plan.configs.items():
        save_dir = bc.checkpoints.get(name) or work_dir / f"model-{name}"
        record = None
        if name not in bc.checkpoints and ("ttq" in bc.sections or not trained_before(save_dir, cfg, data_dir)):
            log(f"time to dev BLEU {plan.threshold}: {name} (at most {plan.minutes} minutes)")
            record = bench_time_to_quality(name, cfg, data_dir, save_dir, plan.threshold, plan.minutes, bc.ttq_valid_every, log)
            timed.append(record)
        if "decode" not in bc.sections:
            continue
        log(f"decoding test_2016_flickr: {name}")
        bf16 = gpu_has_bf16(plan.device)
        decoded = bench_decoding(
            name, save_dir, lines, references, plan.device, bc.repeats, with_int8=not gpu,
            with_half=bf16 if bc.half_precision_decoding is None else bc.half_precision_decoding,
            ctranslate2_dir=work_dir / f"export-{name}" if bc.ctranslate2 else None, records=decoding,
        )
        if record is not None:
            record["test_bleu_beam5"] = next(r for r in decoded if r["path"] == "nmt" and r["beam"] == 5)["bleu"]


def trained_before(save_dir: Path, config: Config, data_dir: Path) -> bool:
    """Whether the work dir's model of an earlier run can be decoded again: trained as `config`
    builds its model, on the vocabulary of `data_dir` (else a changed recipe or data would be
    measured with a stale model)."""
    if not (save_dir / "best").is_dir():
        return False
    try:
        saved, vocab = read_config(save_dir).model, VocabInfo.read(save_dir).vocab
    except NmtError:  # a damaged or half-written model: trained again
        return False
    data = Manifest.read(data_dir).vocab
    return saved == config.model and (vocab.src_sha256, vocab.tgt_sha256) == (data.src_sha256, data.tgt_sha256)


def format_report(report: dict) -> str:
    out = [f"nmt {report['nmt_version']}, torch {report['torch']}, {report['device']}"]
    names = [r["model"] for section in ("train", "time_to_quality", "decode") for r in report[section]]
    w = max([12, *(len(n) + 1 for n in names)])  # the model column
    for label, rates in report["matmul"].items():
        sheet = rates["datasheet_flops_per_s"]
        out.append(
            f"matmul {label}: {rates['measured_flops_per_s'] / 1e12:.3f} TFLOP/s measured"
            + (f", {sheet / 1e12:.1f} datasheet" if sheet else "")
        )
    if report["train"]:
        out += ["", "training (median of repeats)",
                f"{'model':<{w}}{'path':<7}{'dtype':<10}{'tgt tok/s':>11}{'tok/s':>11}{'vs plain':>9}{'TFLOP/s':>9}{'MFU':>7}{'peak MB':>9}"]
        plain = {r["model"]: r for r in report["train"] if r["path"] == "plain"}
        for r in report["train"]:
            mfu = r.get("mfu", r.get("mfu_of_measured_matmul"))
            flops = f"{r['flops_per_s'] / 1e12:>9.3f}{mfu:>7.1%}" if r["flops_per_s"] else f"{'-':>9}{'-':>7}"
            out.append(
                f"{r['model']:<{w}}{r['path']:<7}{r['dtype']:<10}{r['tgt_tokens_per_s']:>11,.0f}{r['tokens_per_s']:>11,.0f}"
                f"{r['tgt_tokens_per_s'] / plain[r['model']]['tgt_tokens_per_s']:>8.2f}x{flops}{r['peak_memory_mb']:>9,.0f}"
            )
        for r in report["train"]:
            if "speed_vs_nmt_fp32" in r:
                out.append(f"{r['model']} nmt step in {r['dtype']}: {r['speed_vs_nmt_fp32']:.2f}x the speed of nmt's fp32 step")
        if not any("mfu" in r for r in report["train"]):
            out.append("MFU: of the matrix-product rate measured above (no datasheet peak for this device)")
    if report["time_to_quality"]:
        out += ["", "time to quality (training seconds, validation left out)"]
        for r in report["time_to_quality"]:
            if r["reached"]:
                text = f"dev BLEU {r['dev_bleu_threshold']} after {r['train_seconds']:.0f} s ({r['updates']} updates)"
            else:
                text = f"dev BLEU {r['dev_bleu_threshold']} not reached in {r['trained_seconds']:.0f} s (best {r['best_dev_bleu']:.2f})"
            if "test_bleu_beam5" in r:
                text += f"; test BLEU (beam 5) {r['test_bleu_beam5']:.2f}"
            out.append(f"{r['model']:<{w}}{text}")
    if report["decode"]:
        out += ["", f"decoding test_2016_flickr ({report['decode'][0]['sentences']:,} sentences from raw text; median of repeats)",
                f"{'model':<{w}}{'path':<16}{'beam':>5}{'seconds':>9}{'sent/s':>9}{'tok/s':>9}{'vs plain':>9}{'BLEU':>7}{'differ':>7}"]
        plain = {(r["model"], r["beam"]): r for r in report["decode"] if r["path"] == "plain"}
        for r in report["decode"]:
            base = plain[(r["model"], r["beam"])]
            out.append(
                f"{r['model']:<{w}}{r['path']:<16}{r['beam']:>5}{r['seconds']:>9.2f}{r['sentences_per_s']:>9.1f}"
                f"{r['tokens_per_s']:>9,.0f}{base['seconds'] / r['seconds']:>8.2f}x{r['bleu']:>7.2f}{r['lines_differing_from_plain']:>7}"
            )
        for r in report["decode"]:
            if "speed_vs_nmt_fp32" in r:
                out.append(f"{r['model']} {r['path']} ({r['precision']}) beam {r['beam']}: {r['speed_vs_nmt_fp32']:.2f}x the "
                           f"speed of nmt fp32; {r['lines_differing_from_nmt_fp32']} of {r['sentences']} lines differ from it")
        for r in report["decode"]:
            if "lines_differing_from_fp32" in r:
                out.append(f"{r['model']} {r['path']} beam {r['beam']}: {r['lines_differing_from_fp32']} of "
                           f"{r['sentences']} lines differ from fp32")
        for r in report["decode"]:
            if "cuda_graphs" in r:  # a failed capture decodes eagerly: seen here, not only in the JSON
                counts = r["cuda_graphs"]
                out.append(f"{r['model']} {r['path']} beam {r['beam']}: {counts.get('replayed_steps', 0):,} steps replayed "
                           f"as CUDA graphs, {counts.get('eager_steps', 0):,} eager; {counts.get('captured', 0)} graphs "
                           f"captured, {counts.get('failed', 0)} captures failed")
    return "\n".join(out)
