"""`make gpu-check`: every GPU figure the READMEs report, from one unattended command.

Measuring is one prepared run that needs nothing from the network, keeps to a wall-clock budget
(so that a short stay on a GPU machine is enough), and rewrites `gpu-check.json` and `gpu-check.md`
after every stage, so that a run cut short keeps what it measured:

1. `prepare`: Multi30k de→en (joint 8k SentencePiece) from local files;
2. `transformer`: `recipes/multi30k/transformer-gpu.yaml` until dev BLEU 41 (`train.target_bleu`)
   or its budget: training seconds to quality, target tokens/s, peak memory, the share of time
   spent waiting for batches; then test_2016_flickr BLEU and chrF with beam 5 and the time to
   decode its 1,000 lines;
3. `rnn`: `recipes/multi30k/rnn-gpu.yaml` for its budget, the same figures;
4. `bench-train`: `nmt bench`'s training section for both recipes and Transformer-base (6+6,
   d_model 512, a 32k vocabulary) in bf16, with model FLOPs utilization;
5. `bench-decode`: `nmt bench`'s decoding section on the models of 2 and 3: the plain path, the
   incremental one, bf16 autocast and (Transformer) fixed-shape steps replayed as CUDA graphs
   (`decode.static_cache`), with the lines where they differ;
6. `compile`: the Transformer's training throughput with `train.compile` (torch.compile).

`python -m nmt.gpu_check bundle` (`make gpu-bundle`), run beforehand on a machine that reaches the
package registry, gathers into one folder the Multi30k files and the wheels of the packages this
run imports beyond torch's own (found by running it dry, on the CPU). `run --bundle DIR` installs
those the GPU machine lacks into the run's work folder and uses the machine's own CUDA PyTorch. So
this module imports only the standard library (and nmt's own paths) at its top: the rest comes
after the bundle.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nmt.corpora import LOCAL_MULTI30K, PROJECT_ROOT  # paths only, no third-party import: safe before the bundle

RECIPES = {
    "transformer": PROJECT_ROOT / "recipes/multi30k/transformer-gpu.yaml",
    "rnn": PROJECT_ROOT / "recipes/multi30k/rnn-gpu.yaml",
    "transformer-base": PROJECT_ROOT / "recipes/wmt14-en-de/transformer-base-gpu.yaml",
}
BASE_VOCAB = 32000
MULTI30K_FILES = [f"{split}.{lang}" for split in ("train", "val", "test_2016_flickr") for lang in ("de", "en")]
STAGES = ("prepare", "transformer", "rnn", "bench-train", "bench-decode", "compile")
# The test_2016_flickr BLEU each recipe is to reach (the Transformer's also the dev BLEU that ends
# its training, `--target-bleu`).
TRANSFORMER_BLEU, RNN_BLEU = 41.0, 35.0
# A dry run makes every model this small, so that the whole command runs in minutes on a CPU
# (7 on 2 cores), and logs often enough that its few updates are seen.
DRY_RUN = ["model.embed_dim=32", "model.ff_dim=64", "model.heads=2", "model.enc_layers=1",
           "model.dec_layers=1", "model.hidden_dim=32", "train.log_every=2"]
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64"]


@dataclass
class CheckConfig:
    out: Path = Path("gpu-check")  # gpu-check.json and gpu-check.md
    bundle: Path | None = None  # from `bundle`: wheels/ and multi30k/
    data: Path | None = None  # Multi30k files; default: the bundle's, else ../shared/data/multi30k
    work_dir: Path | None = None  # keeps data and models; default: a temporary folder
    device: str = "cuda"
    dry_run: bool = False  # on the CPU, tiny models and budgets: checks that the command works
    stages: tuple[str, ...] = STAGES
    total_minutes: float = 9.0  # the whole run, wall clock; a stage still running then is cut short
    transformer_minutes: float = 2.5  # training budget of stage 2
    rnn_minutes: float = 1.5  # training budget of stage 3
    target_bleu: float = TRANSFORMER_BLEU  # dev BLEU that ends stage 2's training
    valid_every: int = 200  # updates between validations (the resolution of the time to quality)
    vocab_size: int = 8000
    bench_steps: int = 40
    repeats: int = 3
    record_imports: Path | None = None  # write the distributions this run imported (for `bundle`)

    def __post_init__(self) -> None:
        if self.dry_run:
            self.device = "cpu"
            # Enough for a few logged updates after the set-up, which the budget counts, on busy cores.
            self.transformer_minutes = min(self.transformer_minutes, 0.1)
            self.rnn_minutes = min(self.rnn_minutes, 0.1)
            self.valid_every = min(self.valid_every, 5)
            self.bench_steps, self.repeats = min(self.bench_steps, 2), 1


class OutOfTime(BaseException):
    """The run's wall-clock budget is spent. Not an Exception, so that no `except Exception` on
    the way (a fallback, a retry) takes it for a failure of its own and carries on."""

    reason = "the run's time limit was reached"


def skipped(reason: str) -> dict:
    """The record of a stage that never ran."""
    return {"status": f"skipped: {reason}"}


class Stopped(OutOfTime):
    """SIGTERM or SIGINT (a machine taken back, Ctrl-C): the run ends as when its time is spent,
    keeping what it measured, then exits with the signal's status."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.reason = f"stopped by {signal.Signals(signum).name}"


def normalized(name: str) -> str:
    """A distribution's name as PEP 503 compares them: PyYAML, pyyaml and py_yaml are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def install_bundle(bundle: Path, target: Path, log: Callable[[str], None]) -> list[str]:
    """Install the bundle's wheels whose distributions this Python lacks into the folder `target`
    (the run's work folder's), put first on the import path (this process's and its children's);
    returns their names."""
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    missing = [w for w in wheels if not is_installed(w.name.split("-")[0])]
    if not missing:
        return []
    target.mkdir(parents=True, exist_ok=True)
    log(f"installing {len(missing)} wheel(s) from {bundle} into {target}")
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
             "--disable-pip-version-check", "--target", str(target), *map(str, missing)],
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:  # a Python without pip
        log(f"pip could not install them ({e}); unpacking them instead (a compiled wheel pip refused "
            "as made for another Python will not import)")
        for wheel in missing:
            unpack_wheel(wheel, target)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    return [w.name.split("-")[0] for w in missing]


def unpack_wheel(wheel: Path, target: Path) -> None:
    """What `pip install --target` does with a wheel, without pip: its files, and those of its
    .data/purelib and .data/platlib, into `target` (scripts and headers are not needed here)."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    for data in target.glob("*.data"):
        for lib in ("purelib", "platlib"):
            if (data / lib).is_dir():
                shutil.copytree(data / lib, target, dirs_exist_ok=True)
        shutil.rmtree(data)


def git_commit() -> str | None:
    """The tree's commit, with "+changes" when files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if status.stdout.strip() else "")


def gpu_driver() -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


class Run:
    """One gpu-check run: its settings, places, deadline and the report it rewrites after each stage."""

    def __init__(self, cc: CheckConfig, work: Path, corpus: Path, log: Callable[[str], None], started: float):
        from nmt.devices import resolve_device

        self.cc, self.work, self.corpus, self.log = cc, work, corpus, log
        self.device = resolve_device(cc.device)
        self.started = started  # when the alarm was set: the installation and torch's import count too
        self.data_dir = work / "data"
        self.report: dict = {"environment": {}, "settings": {}, "stages": {}}
        self.record: dict = {}  # the running stage's record, which the bench stages fill as they go

    def seconds_left(self) -> float:
        return self.cc.total_minutes * 60 - (time.monotonic() - self.started)

    def config_path(self, name: str, extra: tuple[str, ...] = ()) -> Path:
        """The recipe `name` with the run's device (and, dry, tiny sizes), written for this run."""
        from nmt.config import load_config, save_config

        overrides = [f"train.device={self.cc.device}", "train.tensorboard=false", *(DRY_RUN if self.cc.dry_run else []), *extra]
        config = load_config(RECIPES[name.removesuffix("-compiled")], overrides)
        path = self.work / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_config(config, path)
        return path

    def save(self) -> None:
        write_report(self.cc.out, self.report)

    def stage(self, name: str, measure: Callable[[], dict]) -> None:
        """Run one stage and write the report, whatever the stage's outcome."""
        self.log(f"== gpu-check stage {name} ({self.seconds_left():.0f} s left)")
        started = time.monotonic()
        record: dict = {"status": "running"}
        self.report["stages"][name] = self.record = record  # a stage may fill it as it goes
        cut: OutOfTime | None = None
        try:
            record.update(measure())
            record["status"] = "done"
        except OutOfTime as e:
            cut = e
            record["status"] = f"cut short: {e.reason}"
        except Exception as e:  # a failed stage is reported, and the next one still runs
            text = str(e).strip().splitlines()
            record["status"] = f"failed: {type(e).__name__}: {text[0] if text else ''}"
            # The whole story, for a failure on a machine that is gone by the time it is read.
            record["traceback"] = traceback.format_exc().splitlines()[-60:]
            self.log(f"stage {name} {record['status']}\n" + "\n".join(record["traceback"]))
        record["seconds"] = round(time.monotonic() - started, 1)
        self.save()
        if cut is not None:
            raise cut

    def log_and_save(self, message: str) -> None:
        """The bench's log: each row it logs is on disk too, for a run killed outright."""
        self.log(message)
        self.save()

    # The stages.

    def prepare(self) -> dict:
        from nmt.prepare import PrepareConfig, prepare

        manifest = prepare(PrepareConfig(
            out_dir=self.data_dir, src_lang="de", tgt_lang="en", train_prefix=str(self.corpus / "train"),
            valid_prefix=str(self.corpus / "val"), test_prefix=str(self.corpus / "test_2016_flickr"),
            vocab_size=self.cc.vocab_size, overwrite=True,
        ))
        return {"prepare_seconds": manifest.seconds, "counts": manifest.counts}

    def train_and_score(self, name: str, minutes: float, threshold: float, stop: bool) -> dict:
        from nmt.bench import bench_time_to_quality, peak_memory_mb, reset_peak_memory
        from nmt.config import load_config
        from nmt.train import stopping_signal
        from nmt.train_log import read_train_log

        # Leave a minute of the run for decoding the test set.
        minutes = max(min(minutes, (self.seconds_left() - 60) / 60), 0.02)
        save_dir = self.work / f"model-{name}"
        reset_peak_memory(self.device)
        record = bench_time_to_quality(
            name, load_config(self.config_path(name)), self.data_dir, save_dir, threshold, minutes,
            self.cc.valid_every, self.log, stop_at_threshold=stop,
        )
        train_records, _ = read_train_log(save_dir)
        steady = train_records[1:] or train_records  # the first interval holds the warm-up
        record.update(
            budget_minutes=round(minutes, 2),
            tgt_tokens_per_s=_median(r["tgt_tokens_per_s"] for r in steady),
            tokens_per_s=_median(r["tokens_per_s"] for r in steady),
            batch_wait_fraction=_median(r.get("batch_wait_fraction") for r in steady),
            peak_memory_mb=round(peak_memory_mb(self.device)) if self.device.type == "cuda" else None,
        )
        self.record.update(record)  # on disk before decoding: a failure or a cut there keeps the training figures
        self.save()
        signalled = stopping_signal(record["stop_reason"])
        if signalled:  # training stopped at the signal (its figures kept above): so does the run
            raise Stopped(signalled)
        self.record.update(self.score_test(save_dir))
        return self.record

    def score_test(self, save_dir: Path) -> dict:
        """test_2016_flickr with beam 5: BLEU, chrF and the decoding time (median of repeats)."""
        import dataclasses

        from nmt.bench import time_translation
        from nmt.checkpoint import load_for_inference
        from nmt.data import read_lines
        from nmt.evaluate import score_texts
        from nmt.files import VocabInfo, text_files

        model, tokenizer, config = load_for_inference(save_dir, "best", self.device)
        source, reference = text_files(self.data_dir, "test")
        lines, references = list(read_lines(source)), list(read_lines(reference))
        decode = dataclasses.replace(config.decode, beam=5, nbest=1, sampling=False)
        normalization = VocabInfo.read(save_dir).source_normalization()
        times, translations = time_translation(
            model, tokenizer, lines, decode, self.device, normalization, self.cc.repeats
        )
        bleu, chrf = score_texts([t[0] for t in translations.texts], references, ("bleu", "chrf"))
        return {
            "test_sentences": len(lines), "test_bleu": round(bleu.score, 2), "test_chrf": round(chrf.score, 2),
            "bleu_signature": bleu.signature, "chrf_signature": chrf.signature,
            "beam5_seconds": round(statistics.median(times), 3), "beam5_seconds_all_repeats": times,
        }

    def bench(self, sections: tuple[str, ...], recipes: dict[str, Path], **options) -> dict:
        from nmt.bench import BenchConfig, format_report, run_bench

        name = "-".join(sections)
        # The bench fills the stage's record as it measures: a stage cut short keeps its rows.
        report: dict = {}
        self.record["report"] = report
        try:
            # No CTranslate2 rows: its wheel (about 43 MB) would take the bundle past what the GPU
            # machine can be sent; `nmt bench` gives them where ctranslate2 is installed.
            run_bench(BenchConfig(
                data=self.corpus, out=self.work / f"bench-{name}.json", recipes=recipes, sections=sections,
                device=self.cc.device, steps=self.cc.bench_steps, repeats=self.cc.repeats, vocab_size=self.cc.vocab_size,
                work_dir=self.work, ctranslate2=False, **options,
            ), log=self.log_and_save, report=report)
        finally:
            if "matmul" in report:  # its header is in: the rows so far make a table
                self.record["table"] = format_report(report)
        return {}

    def bench_train(self) -> dict:
        names = ("transformer", "rnn", "transformer-base")
        return self.bench(("train",), {n: self.config_path(n) for n in names}, model_vocab={"transformer-base": BASE_VOCAB})

    def bench_decode(self) -> dict:
        names = [n for n in ("transformer", "rnn") if (self.work / f"model-{n}" / "best").is_dir()]
        if not names:
            raise RuntimeError("no trained model to decode: stages transformer and rnn did not finish")
        return self.bench(
            ("decode",), {n: self.config_path(n) for n in names},
            checkpoints={n: self.work / f"model-{n}" for n in names},
            half_precision_decoding=True if self.cc.dry_run else None,  # None: on GPUs with bf16
        )

    def compile(self) -> dict:
        recipes = {"transformer-compiled": self.config_path("transformer-compiled", ("train.compile=true",))}
        return self.bench(("train",), recipes)

    def run(self) -> dict:
        measures = {
            "prepare": self.prepare,
            "transformer": lambda: self.train_and_score("transformer", self.cc.transformer_minutes, self.cc.target_bleu, True),
            "rnn": lambda: self.train_and_score("rnn", self.cc.rnn_minutes, RNN_BLEU, False),
            "bench-train": self.bench_train,
            "bench-decode": self.bench_decode,
            "compile": self.compile,
        }
        for name in self.cc.stages:
            if self.seconds_left() <= 0:
                self.report["stages"][name] = skipped(OutOfTime.reason)
                self.save()
                continue
            self.stage(name, measures[name])
        return self.report


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def environment(device, bundle: Path | None) -> dict:
    import torch

    from nmt import __version__

    made = json.loads((bundle / "bundle.json").read_text()) if bundle and (bundle / "bundle.json").is_file() else {}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU",
        "driver": gpu_driver() if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "nmt": __version__,
        # A copy of the tree without .git: the commit the bundle was made at, said so.
        "commit": git_commit() or (f"{made['commit']} (the bundle's)" if made.get("commit") else None),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


@dataclass(frozen=True)
class Target:
    """A figure's target: at least (`sign` "≥") or at most ("≤") `bound`; `dev_bleu`: reached
    on the way to that dev BLEU (the stage's `dev_bleu_threshold`) or more."""

    sign: str
    bound: float
    dev_bleu: float = 0.0

    def met(self, value: float, figures: dict) -> bool:
        within = value >= self.bound if self.sign == "≥" else value <= self.bound
        return within and figures.get("dev_bleu_threshold", 0.0) >= self.dev_bleu

    def text(self) -> str:
        return f"{self.sign} {self.bound:,}" + (f" (to {self.dev_bleu:g})" if self.dev_bleu else "")


# Each figure of the report: (stage, key path, label, target or None). A label may name the
# stage's figures ({dev_bleu_threshold}).
FIGURES = [
    ("transformer", ("tgt_tokens_per_s",), "Transformer training, target tokens/s", Target("≥", 360_000)),
    ("transformer", ("train_seconds",), "Transformer training seconds to dev BLEU {dev_bleu_threshold:g}",
     Target("≤", 60, dev_bleu=TRANSFORMER_BLEU)),
    ("transformer", ("best_dev_bleu",), "Transformer best dev BLEU (greedy)", None),
    ("transformer", ("test_bleu",), "Transformer test_2016_flickr BLEU, beam 5", Target("≥", TRANSFORMER_BLEU)),
    ("transformer", ("test_chrf",), "Transformer test_2016_flickr chrF2, beam 5", None),
    ("transformer", ("beam5_seconds",), "Transformer beam-5 decoding of 1,000 lines, s", Target("≤", 0.5)),
    ("transformer", ("peak_memory_mb",), "Transformer training peak GPU memory, MB", None),
    ("transformer", ("batch_wait_fraction",), "Transformer share of time waiting for batches", None),
    ("rnn", ("tgt_tokens_per_s",), "RNN training, target tokens/s", Target("≥", 50_000)),
    ("rnn", ("test_bleu",), "RNN test_2016_flickr BLEU, beam 5", Target("≥", RNN_BLEU)),
    ("rnn", ("beam5_seconds",), "RNN beam-5 decoding of 1,000 lines, s", Target("≤", 1.0)),
    ("rnn", ("batch_wait_fraction",), "RNN share of time waiting for batches", None),
]


def bench_figures(report: dict) -> list[tuple[str, object, str, bool | None]]:
    """(label, value, target, met) rows from the bench stages' reports."""
    rows = []
    for stage in ("bench-train", "compile"):
        for r in report["stages"].get(stage, {}).get("report", {}).get("train", []):
            if r["path"] != "nmt":
                continue
            rows.append((f"bench {r['model']} training ({r['dtype']}), target tokens/s", round(r["tgt_tokens_per_s"]), "", None))
            if r["model"] == "transformer-base" and r.get("mfu") is not None:
                rows.append(("Transformer-base bf16 MFU (of datasheet peak)", round(r["mfu"], 4), "≥ 40%", r["mfu"] >= 0.40))
    for r in report["stages"].get("bench-decode", {}).get("report", {}).get("decode", []):
        label = f"bench {r['model']} {r['path']} beam {r['beam']}"
        rows.append((f"{label}: seconds / BLEU", f"{r['seconds']:.3f} / {r['bleu']:.2f}", "", None))
        if r["path"] == "nmt":
            rows.append((f"{label}: lines differing from the plain path", r["lines_differing_from_plain"], "0",
                         r["lines_differing_from_plain"] == 0))
        if "lines_differing_from_fp32" in r:
            same = 1 - r["lines_differing_from_fp32"] / max(r["sentences"], 1)
            rows.append((f"{label}: lines equal to fp32", f"{same:.1%}", "≥ 99%", same >= 0.99))
    return rows


def format_markdown(report: dict) -> str:
    env = report["environment"]
    out = [
        "# gpu-check", "",
        f"{env.get('device')}, driver {env.get('driver')}, CUDA {env.get('cuda')}, torch {env.get('torch')}, "
        f"Python {env.get('python')}; commit {env.get('commit')}; {env.get('date')}"
        + ("; **dry run** (CPU, tiny models: not results)" if report["settings"].get("dry_run") else ""),
        "", "| stage | status | seconds |", "|---|---|---|",
    ]
    for name, stage in report["stages"].items():
        out.append(f"| {name} | {stage['status']} | {stage.get('seconds', '')} |")
    out += ["", "| figure | measured | target | met |", "|---|---|---|---|"]
    rows = []
    for stage, keys, label, target in FIGURES:
        figures = value = report["stages"].get(stage, {})
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        shown_label = label.format(**figures) if value is not None else label.replace(" {dev_bleu_threshold:g}", "")
        rows.append((shown_label, value, target.text() if target else "",
                     None if value is None or target is None else target.met(value, figures)))
    rows += bench_figures(report)
    for label, value, target, met in rows:
        shown = "not reached or not measured" if value is None else (f"{value:,}" if isinstance(value, int) else str(value))
        out.append(f"| {label} | {shown} | {target} | {'' if met is None else ('yes' if met else 'no')} |")
    for name, stage in report["stages"].items():
        if stage.get("table"):
            out += ["", f"`nmt bench` ({name}):", "", "```", stage["table"], "```"]
    return "\n".join(out) + "\n"


def run_check(cc: CheckConfig, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Install what the bundle brings, then run the stages within `cc.total_minutes`."""
    unknown = set(cc.stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"error: unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    corpus = cc.data or (cc.bundle / "multi30k" if cc.bundle and (cc.bundle / "multi30k").is_dir() else LOCAL_MULTI30K)
    for name in MULTI30K_FILES:
        if not (corpus / f"{name}.gz").is_file() and not (corpus / name).is_file():
            raise SystemExit(f"error: Multi30k file {corpus / name}.gz not found (pass --data or --bundle)")
    temporary = tempfile.TemporaryDirectory(prefix="nmt-gpu-check-") if cc.work_dir is None else None
    work = Path(temporary.name) if temporary else Path(cc.work_dir)
    if cc.dry_run:
        corpus = sample_corpus(corpus, work / "corpus-sample")
    handlers: dict = {}
    run: Run | None = None
    stopped: Stopped | None = None
    try:
        for signum, handler in ((signal.SIGALRM, _out_of_time), (signal.SIGTERM, _stopped), (signal.SIGINT, _stopped)):
            handlers[signum] = signal.signal(signum, handler)
        started = time.monotonic()
        signal.alarm(max(int(cc.total_minutes * 60), 1))  # the installation counts too
        # Before torch is imported: torch looks for numpy once, at its import.
        installed = install_reporting_errors(cc.bundle, work / "site-packages", log)
        run = Run(cc, work, corpus, log, started)
        run.report["environment"] = {**environment(run.device, cc.bundle), **installed}
        run.report["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cc).items()}
        run.save()  # a report from the start, whatever happens next
        run.run()
    except OutOfTime as e:
        for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal does not cut the report short
            signal.signal(signum, signal.SIG_IGN)
        signal.alarm(0)
        stopped = e if isinstance(e, Stopped) else None
        if run is not None:
            for name in cc.stages:
                run.report["stages"].setdefault(name, skipped(e.reason))
            run.save()
    finally:
        signal.alarm(0)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if cc.record_imports:
            cc.record_imports.write_text("\n".join(imported_distributions()) + "\n")
        if temporary:
            temporary.cleanup()
    if stopped is not None:
        log(f"gpu-check {stopped.reason}; what it measured is in {cc.out}")
        raise SystemExit(128 + stopped.signum)
    if run is None:  # out of time before the run began (installing the bundle took it all): nothing ran
        report = {"environment": {}, "settings": {}, "stages": {n: skipped(OutOfTime.reason) for n in cc.stages}}
        write_report(cc.out, report)
        return report
    return run.report


def write_report(out: Path, report: dict) -> None:
    """gpu-check.json and gpu-check.md in `out`, each replaced whole."""
    from nmt.atomic import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "gpu-check.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "gpu-check.md", format_markdown(report))


def install_reporting_errors(bundle: Path | None, target: Path, log: Callable[[str], None]) -> dict:
    """Install the bundle's wheels; returns the report's lines on it. A failure is reported, and
    the stages that need a missing package then fail one by one, saying so."""
    from nmt.errors import first_line

    try:
        return {"installed_from_bundle": install_bundle(bundle, target, log) if bundle else []}
    except Exception as e:
        log(f"installing the bundle failed: {first_line(e)}")
        return {"installed_from_bundle": [], "install_error": f"{type(e).__name__}: {first_line(e)}"}


def sample_corpus(corpus: Path, out: Path, train_lines: int = 3000, held_out_lines: int = 100) -> Path:
    """The first lines of each Multi30k file, for a dry run that decodes in seconds."""
    import gzip
    import itertools

    out.mkdir(parents=True, exist_ok=True)
    for name in MULTI30K_FILES:
        path = corpus / f"{name}.gz"
        count = train_lines if name.startswith("train") else held_out_lines
        with (gzip.open(path, "rt", encoding="utf-8") if path.is_file() else open(corpus / name, encoding="utf-8")) as f:
            (out / name).write_text("".join(itertools.islice(f, count)), encoding="utf-8")
    return out


def _out_of_time(signum, frame) -> None:
    # Again in 15 s, should this one be lost: an error raised while it unwinds (a CUDA graph's
    # capture ended halfway) replaces it, and a fallback may catch that one. The run's end disarms it.
    signal.alarm(15)
    raise OutOfTime


def _stopped(signum, frame) -> None:
    raise Stopped(signum)


def imported_distributions() -> list[str]:
    """The distributions whose modules this process imported, the project's own left out."""
    owners = importlib.metadata.packages_distributions()
    names = {d for module in list(sys.modules) for d in owners.get(module.split(".")[0], [])}
    return sorted(normalized(n) for n in names if normalized(n) != "nmt-toolkit")


def requirement_closure(name: str) -> set[str]:
    """`name` and every distribution it requires (extras left out), as installed here."""
    seen, todo = set(), [normalized(name)]
    while todo:
        current = todo.pop()
        if current in seen or not is_installed(current):
            continue
        seen.add(current)
        for requirement in importlib.metadata.requires(current) or []:
            if "extra ==" not in requirement.replace('"', "").replace("'", ""):
                todo.append(normalized(re.match(r"[A-Za-z0-9._-]+", requirement).group(0)))
    return seen


@dataclass
class BundleConfig:
    out: Path = Path("gpu-bundle")
    data: Path = LOCAL_MULTI30K
    python_version: str = "3.12"  # of the GPU machine
    platforms: list[str] = field(default_factory=lambda: list(WHEEL_PLATFORMS))


def make_bundle(bc: BundleConfig, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """The Multi30k files and the wheels gpu-check needs beyond torch's, in one folder: built
    beside `bc.out` and put in its place when complete, so that an earlier bundle stays whole
    until then (and a folder that is not a bundle is never replaced)."""
    from nmt.atomic import check_replaceable, replace_dir

    for name in MULTI30K_FILES:
        if not (bc.data / f"{name}.gz").is_file():
            raise SystemExit(f"error: Multi30k file {bc.data / name}.gz not found (pass --data)")
    try:
        check_replaceable(bc.out, True, "bundle.json", "a gpu-check bundle", holds_folders=True)
    except OSError:
        raise SystemExit(f"error: {bc.out} holds files but is not a gpu-check bundle (no bundle.json); "
                         "give another --out or empty it") from None
    bc.out.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{bc.out.name}.new-", dir=bc.out.parent))
    try:
        info = _fill_bundle(bc, new, log)
        replace_dir(new, bc.out)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    log(f"{bc.out}: {info['megabytes']} MB")
    return info


def _fill_bundle(bc: BundleConfig, out: Path, log: Callable[[str], None]) -> dict:
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    (out / "multi30k").mkdir()
    for name in MULTI30K_FILES:
        shutil.copy2(bc.data / f"{name}.gz", out / "multi30k" / f"{name}.gz")
    with tempfile.TemporaryDirectory(prefix="nmt-gpu-bundle-") as tmp:
        log("a dry run of gpu-check (CPU) finds the packages it imports")
        record = Path(tmp) / "imports.txt"
        subprocess.run(
            [sys.executable, "-m", "nmt.gpu_check", "run", "--dry-run", "--data", str(out / "multi30k"),
             "--out", str(Path(tmp) / "out"), "--record-imports", str(record)],
            check=True, cwd=PROJECT_ROOT,
        )
        # Distributions vendored inside another (setuptools carries some) are seen in the dry run's
        # import path only: what is not installed here is left out.
        needed = {n for n in record.read_text().split() if is_installed(n)} - requirement_closure("torch")
    pinned = sorted(f"{name}=={importlib.metadata.version(name)}" for name in needed)
    log(f"downloading wheels for Python {bc.python_version}: {' '.join(pinned)}")
    platforms = [arg for p in bc.platforms for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
         bc.python_version, "--implementation", "cp", *platforms, "-d", str(wheels), *pinned],
        check=True,
    )
    files = sorted(p for p in out.rglob("*") if p.is_file())
    info = {
        "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python_version": bc.python_version, "packages": pinned,
        "megabytes": round(sum(p.stat().st_size for p in files) / 1e6, 1),
    }
    (out / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def parse_args(argv: list[str]) -> CheckConfig | BundleConfig:
    parser = argparse.ArgumentParser(prog="python -m nmt.gpu_check", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="Measure on this machine's GPU (or check the command with --dry-run).")
    defaults = CheckConfig()
    run.add_argument("--out", type=Path, default=defaults.out, help="Folder for gpu-check.json and gpu-check.md.")
    run.add_argument("--bundle", type=Path, help="Folder made by `bundle`: wheels to install, Multi30k files.")
    run.add_argument("--data", type=Path, help="Multi30k files (default: the bundle's, else ../shared/data/multi30k).")
    run.add_argument("--work-dir", type=Path, help="Keep the data dir and models here.")
    run.add_argument("--device", default=defaults.device)
    run.add_argument("--dry-run", action="store_true", help="CPU, tiny models and budgets.")
    run.add_argument("--stages", default=",".join(STAGES), help="Comma-separated, from: " + ", ".join(STAGES) + ".")
    for name in ("total_minutes", "transformer_minutes", "rnn_minutes", "target_bleu"):
        run.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    for name in ("valid_every", "vocab_size", "bench_steps", "repeats"):
        run.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    run.add_argument("--record-imports", type=Path, help=argparse.SUPPRESS)
    bundle = commands.add_parser("bundle", help="Gather the Multi30k files and the wheels gpu-check needs.")
    bundle.add_argument("--out", type=Path, default=BundleConfig.out)
    bundle.add_argument("--data", type=Path, default=BundleConfig.data)
    bundle.add_argument("--python-version", default=BundleConfig.python_version, help="The GPU machine's Python.")
    args = vars(parser.parse_args(argv))
    if args.pop("command") == "bundle":
        return BundleConfig(**args)
    args["stages"] = tuple(s.strip() for s in args["stages"].split(",") if s.strip())
    return CheckConfig(**args)


def main(argv: list[str] | None = None) -> None:
    from nmt.errors import DataError, NmtError

    config = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if isinstance(config, BundleConfig):
            make_bundle(config)
            return
        if config.out.exists() and not config.out.is_dir():
            raise DataError(f"--out {config.out} is a file, not a folder")
        report = run_check(config)
    except (NmtError, OSError) as e:
        sys.exit(f"error: {e if isinstance(e, NmtError) else f'{e.strerror or e}'}")
    print(format_markdown(report))
    print(f"written to {config.out / 'gpu-check.json'} and {config.out / 'gpu-check.md'}")


if __name__ == "__main__":
    main()
