import json
import re
import subprocess
import sys
import time
import zipfile

import pytest
from conftest import write_multi30k_toy

from nmt import gpu_check
from nmt.gpu_check import STAGES, CheckConfig, install_bundle, parse_args, requirement_closure, run_check


@pytest.fixture
def multi30k_toy(tmp_path):
    """A toy corpus under Multi30k's de/en file names."""
    return write_multi30k_toy(tmp_path / "m30k")


@pytest.mark.slow
def test_dry_run_measures_every_stage_and_writes_the_report(multi30k_toy, tmp_path):
    stages = tuple(s for s in STAGES if s != "compile")  # compiling takes most of a minute on 2 cores
    config = CheckConfig(out=tmp_path / "out", data=multi30k_toy, dry_run=True, vocab_size=40, stages=stages)
    report = run_check(config, log=lambda message: None)
    assert json.loads((tmp_path / "out" / "gpu-check.json").read_text()) == json.loads(json.dumps(report))
    assert {name: s["status"] for name, s in report["stages"].items()} == {name: "done" for name in stages}
    env = report["environment"]
    assert env["torch"] and env["device"] and env["python"] and report["settings"]["dry_run"]

    for name in ("transformer", "rnn"):
        stage = report["stages"][name]
        assert stage["tgt_tokens_per_s"] > 0 and 0 <= stage["batch_wait_fraction"] < 1
        assert stage["test_sentences"] == 20 and stage["beam5_seconds"] > 0
        assert "tok:13a" in stage["bleu_signature"] and stage["curve"]
    models = {r["model"] for r in report["stages"]["bench-train"]["report"]["train"]}
    assert models == {"transformer", "rnn", "transformer-base"}
    decode = {(r["model"], r["path"], r["beam"]): r for r in report["stages"]["bench-decode"]["report"]["decode"]}
    for model in ("transformer", "rnn"):
        for beam in (1, 5):
            assert decode[model, "nmt", beam]["lines_differing_from_plain"] == 0
            assert 0 <= decode[model, "nmt-bf16", beam]["lines_differing_from_fp32"] <= 20

    table = (tmp_path / "out" / "gpu-check.md").read_text()
    assert "dry run" in table and "| transformer | done |" in table
    assert "Transformer-base" not in table or "MFU" in table
    assert "| Transformer training, target tokens/s |" in table and "lines differing from the plain path | 0 | 0 | yes |" in table


@pytest.mark.slow
def test_a_run_cut_short_keeps_what_it_measured(multi30k_toy, tmp_path, monkeypatch):
    config = CheckConfig(out=tmp_path / "out", data=multi30k_toy, dry_run=True, vocab_size=40, total_minutes=0.2)
    slow_train = gpu_check.Run.train_and_score

    def train_past_the_limit(self, *args):
        slow_train(self, *args)
        import time

        # Each stage is on disk as soon as it is done, for a run killed outright.
        written = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
        assert written["stages"]["prepare"]["status"] == "done"

        time.sleep(60)  # the alarm cuts this short

    monkeypatch.setattr(gpu_check.Run, "train_and_score", train_past_the_limit)
    report = run_check(config, log=lambda message: None)
    statuses = {name: s["status"] for name, s in report["stages"].items()}
    assert statuses["prepare"] == "done"
    assert statuses["transformer"].startswith("cut short")
    assert all(statuses[name].startswith("skipped") for name in STAGES[2:])
    written = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert written["stages"]["prepare"]["status"] == "done"
    assert "| transformer | cut short" in (tmp_path / "out" / "gpu-check.md").read_text()


@pytest.mark.slow
def test_a_bench_stage_cut_short_keeps_its_rows_and_a_failed_install_is_reported(multi30k_toy, tmp_path, monkeypatch):
    import nmt.bench

    wheels = tmp_path / "bundle" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "nmt_broken_probe-1.0-py3-none-any.whl").write_text("not a zip file")
    measured = nmt.bench.bench_training

    def out_of_time_at_the_second(*args, **kwargs):
        if calls:
            raise gpu_check.OutOfTime
        calls.append(1)
        return measured(*args, **kwargs)

    calls: list[int] = []
    monkeypatch.setattr(nmt.bench, "bench_training", out_of_time_at_the_second)
    config = CheckConfig(out=tmp_path / "out", data=multi30k_toy, bundle=tmp_path / "bundle", dry_run=True,
                         vocab_size=40, stages=("prepare", "bench-train", "compile"))
    report = run_check(config, log=lambda message: None)
    assert "BadZipFile" in report["environment"]["install_error"]
    statuses = {name: s["status"] for name, s in report["stages"].items()}
    assert statuses == {"prepare": "done", "bench-train": "cut short: the run's time limit was reached",
                        "compile": "skipped: the run's time limit was reached"}
    written = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert [r["model"] for r in written["stages"]["bench-train"]["report"]["train"]] == ["transformer"]
    assert "bench transformer training" not in (tmp_path / "out" / "gpu-check.md").read_text()  # a plain row only
    assert re.search(r"^transformer\s+plain", written["stages"]["bench-train"]["table"], re.MULTILINE)


@pytest.mark.slow
def test_a_signal_stops_the_run_and_keeps_each_row_measured(multi30k_toy, tmp_path, monkeypatch):
    import os
    import signal

    import nmt.bench

    measured = nmt.bench.bench_training

    def terminated_at_the_second(*args, **kwargs):
        if calls:  # the first row is on disk already, for a run killed outright
            written = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
            assert [r["model"] for r in written["stages"]["bench-train"]["report"]["train"]] == ["transformer"]
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(1)
        return measured(*args, **kwargs)

    calls: list[int] = []
    monkeypatch.setattr(nmt.bench, "bench_training", terminated_at_the_second)
    before = signal.getsignal(signal.SIGTERM)
    config = CheckConfig(out=tmp_path / "out", data=multi30k_toy, dry_run=True, vocab_size=40,
                         stages=("prepare", "bench-train", "compile"))
    with pytest.raises(SystemExit) as stopped:
        run_check(config, log=lambda message: None)
    assert stopped.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) == before
    written = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert {name: s["status"] for name, s in written["stages"].items()} == {
        "prepare": "done", "bench-train": "cut short: stopped by SIGTERM", "compile": "skipped: stopped by SIGTERM"}
    assert [r["model"] for r in written["stages"]["bench-train"]["report"]["train"]] == ["transformer"]


def _calling_at(n: int, interrupt, function):
    """`function`, with `interrupt()` called at its n-th call, before it runs."""
    calls: list[int] = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            interrupt()
        return function(*args, **kwargs)

    return wrapped


@pytest.mark.slow
def test_a_signal_during_training_keeps_the_training_figures(multi30k_toy, tmp_path, monkeypatch):
    import os
    import signal

    import nmt.train

    def terminate():
        os.kill(os.getpid(), signal.SIGTERM)

    # A few updates measured first.
    monkeypatch.setattr(nmt.train, "training_update", _calling_at(6, terminate, nmt.train.training_update))
    config = CheckConfig(out=tmp_path / "out", data=multi30k_toy, dry_run=True, vocab_size=40,
                         stages=("prepare", "transformer"))
    with pytest.raises(SystemExit) as stopped:
        run_check(config, log=lambda message: None)
    assert stopped.value.code == 128 + signal.SIGTERM
    stage = json.loads((tmp_path / "out" / "gpu-check.json").read_text())["stages"]["transformer"]
    assert stage["status"] == "cut short: stopped by SIGTERM"
    assert stage["tgt_tokens_per_s"] > 0 and "curve" in stage, stage


def test_out_of_time_while_installing_the_bundle_reports_every_stage_skipped(multi30k_toy, tmp_path, monkeypatch, capsys):
    (tmp_path / "bundle").mkdir()
    monkeypatch.setattr(gpu_check, "install_bundle", lambda *args: time.sleep(3) or [])  # a slow pip
    gpu_check.main(["run", "--dry-run", "--data", str(multi30k_toy), "--bundle", str(tmp_path / "bundle"),
                        "--out", str(tmp_path / "out"), "--total-minutes", "0.01", "--stages", "prepare,rnn"])
    written = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert {name: s["status"] for name, s in written["stages"].items()} == {
        "prepare": "skipped: the run's time limit was reached", "rnn": "skipped: the run's time limit was reached"}
    assert "| rnn | skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_out_of_time_while_decoding_keeps_the_rows_measured(multi30k_toy, tmp_path, monkeypatch):
    import nmt.bench

    def out_of_time():
        raise gpu_check.OutOfTime

    monkeypatch.setattr(nmt.bench, "time_translation", _calling_at(5, out_of_time, nmt.bench.time_translation))
    monkeypatch.setattr(gpu_check.Run, "score_test", lambda self, save_dir: {})  # not under study here
    config = CheckConfig(out=tmp_path / "out", data=multi30k_toy, dry_run=True, vocab_size=40,
                         stages=("prepare", "transformer", "bench-decode"))
    run_check(config, log=lambda message: None)
    stage = json.loads((tmp_path / "out" / "gpu-check.json").read_text())["stages"]["bench-decode"]
    assert stage["status"] == "cut short: the run's time limit was reached"
    assert [(r["path"], r["beam"]) for r in stage["report"]["decode"]] == [("plain", 1), ("nmt", 1), ("nmt-int8", 1), ("nmt-bf16", 1)]


def test_bench_figures_meet_their_targets_at_the_bound_and_not_past_it():
    from nmt.gpu_check import bench_figures

    def row(path, fp32_differing=None, plain_differing=0):
        found = {"model": "transformer", "path": path, "beam": 5, "seconds": 0.4, "bleu": 41.0, "sentences": 1000,
                 "lines_differing_from_plain": plain_differing}
        return found if fp32_differing is None else {**found, "lines_differing_from_fp32": fp32_differing}

    train = [{"model": "transformer-base", "path": "nmt", "dtype": "bfloat16", "tgt_tokens_per_s": 1e5, "mfu": mfu}
             for mfu in (0.40, 0.3999)]
    decode = [row("nmt"), row("nmt", plain_differing=3), row("nmt-bf16", 10), row("nmt-bf16", 11)]
    report = {"stages": {"bench-train": {"report": {"train": train}}, "bench-decode": {"report": {"decode": decode}}}}
    met = [(label.split(":")[-1].strip(), value, ok) for label, value, _, ok in bench_figures(report) if ok is not None]
    assert met == [("Transformer-base bf16 MFU (of datasheet peak)", 0.4, True),
                   ("Transformer-base bf16 MFU (of datasheet peak)", 0.3999, False),
                   ("lines differing from the plain path", 0, True), ("lines differing from the plain path", 3, False),
                   ("lines equal to fp32", "99.0%", True), ("lines equal to fp32", "98.9%", False)]


def _wheel(folder, name, module_text, requires=()):
    """A minimal pure-Python wheel of distribution `name` with one module."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", module_text)
        needs = "".join(f"Requires-Dist: {r}\n" for r in requires)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n{needs}")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_bundle_installs_only_what_this_python_lacks(tmp_path, monkeypatch):
    wheels = tmp_path / "bundle" / "wheels"
    wheels.mkdir(parents=True)
    _wheel(wheels, "nmt_bundle_probe", "ANSWER = 42\n", requires=["numpy"])  # installed here, not in the bundle
    _wheel(wheels, "sentencepiece", "raise ImportError('the installed sentencepiece must be used')\n")
    monkeypatch.setattr(gpu_check, "unpack_wheel", lambda *args: pytest.fail("pip refused: unpacked instead"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    installed = install_bundle(tmp_path / "bundle", tmp_path / "site", log=lambda message: None)
    assert installed == ["nmt_bundle_probe"]
    import nmt_bundle_probe

    assert nmt_bundle_probe.ANSWER == 42
    child = subprocess.run([sys.executable, "-c", "import nmt_bundle_probe, sentencepiece"], capture_output=True)
    assert child.returncode == 0, child.stderr  # children see the bundle too, and the real sentencepiece
    sys.modules.pop("nmt_bundle_probe")


def test_without_pip_the_wheels_are_unpacked(tmp_path, monkeypatch):
    wheels = tmp_path / "bundle" / "wheels"
    wheels.mkdir(parents=True)
    path = _wheel(wheels, "nmt_unpacked_probe", "ANSWER = 7\n")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("nmt_unpacked_probe-1.0.data/purelib/nmt_unpacked_extra.py", "ANSWER = 8\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")  # `python -m pip` cannot run
    assert install_bundle(tmp_path / "bundle", tmp_path / "site", log=lambda message: None) == ["nmt_unpacked_probe"]
    import nmt_unpacked_extra
    import nmt_unpacked_probe

    assert (nmt_unpacked_probe.ANSWER, nmt_unpacked_extra.ANSWER) == (7, 8)
    sys.modules.pop("nmt_unpacked_probe")
    sys.modules.pop("nmt_unpacked_extra")


def test_bundle_leaves_out_what_torch_brings():
    closure = requirement_closure("torch")
    assert {"torch", "filelock", "sympy"} <= closure and "sentencepiece" not in closure
    assert "numpy" not in closure  # an extra of torch's (torch[opt-einsum] and the like) is not what it brings


def test_command_line_options_and_unknown_stages(tmp_path):
    config = parse_args(["run", "--dry-run", "--stages", "prepare,rnn", "--total-minutes", "3", "--out", str(tmp_path)])
    assert config.stages == ("prepare", "rnn") and config.total_minutes == 3 and config.device == "cpu"
    with pytest.raises(SystemExit, match="unknown stage"):
        run_check(CheckConfig(out=tmp_path, dry_run=True, stages=("prepare", "speed")))
    with pytest.raises(SystemExit, match="not found"):
        run_check(CheckConfig(out=tmp_path, dry_run=True, data=tmp_path / "nowhere"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="error: --out .* is a file"):
        gpu_check.main(["run", "--dry-run", "--out", str(tmp_path / "afile")])


def test_a_bundle_replaces_only_an_earlier_bundle_and_only_once_complete(tmp_path, monkeypatch):
    import gzip

    from nmt.gpu_check import MULTI30K_FILES, BundleConfig, make_bundle

    data = tmp_path / "m30k"
    data.mkdir()
    for name in MULTI30K_FILES:
        with gzip.open(data / f"{name}.gz", "wt") as f:
            f.write("a line\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="is not a gpu-check bundle"):
        make_bundle(BundleConfig(out=mine, data=data), log=lambda message: None)
    assert (mine / "notes.txt").read_text() == "keep me"
    earlier = tmp_path / "bundle"
    earlier.mkdir()
    (earlier / "bundle.json").write_text("{}")

    def offline(*args, **kwargs):
        raise subprocess.CalledProcessError(1, args[0])

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(subprocess.CalledProcessError):
        make_bundle(BundleConfig(out=earlier, data=data), log=lambda message: None)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-made bundle left
    assert (earlier / "bundle.json").read_text() == "{}"


def test_a_signal_before_the_stages_still_ends_cleanly(multi30k_toy, tmp_path, monkeypatch):
    import os
    import signal

    def terminated(*args):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(gpu_check, "environment", terminated)
    before = signal.getsignal(signal.SIGTERM)
    config = CheckConfig(out=tmp_path / "out", data=multi30k_toy, dry_run=True, vocab_size=40, stages=("prepare",))
    with pytest.raises(SystemExit) as stopped:
        run_check(config, log=lambda message: None)
    assert stopped.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) == before
    written = json.loads((tmp_path / "out" / "gpu-check.json").read_text()) if (tmp_path / "out").exists() else {"stages": {}}
    assert all(s["status"] == "skipped: stopped by SIGTERM" for s in written["stages"].values())


@pytest.mark.slow
def test_a_signal_during_training_stops_the_run_not_only_the_training(multi30k_toy, tmp_path, monkeypatch):
    import os
    import signal

    import nmt.train

    update = nmt.train.training_update

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # training stops after this update
        return update(*args, **kwargs)

    monkeypatch.setattr(nmt.train, "training_update", terminated)
    config = CheckConfig(out=tmp_path / "out", data=multi30k_toy, dry_run=True, vocab_size=40,
                         stages=("prepare", "transformer", "rnn"))
    with pytest.raises(SystemExit) as stopped:
        run_check(config, log=lambda message: None)
    assert stopped.value.code == 128 + signal.SIGTERM
    written = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert {name: s["status"] for name, s in written["stages"].items()} == {
        "prepare": "done", "transformer": "cut short: stopped by SIGTERM", "rnn": "skipped: stopped by SIGTERM"}


def test_a_failed_stage_keeps_its_traceback_and_the_bundle_goes_in_before_torch(multi30k_toy, tmp_path, monkeypatch):
    order = []
    monkeypatch.setattr(gpu_check, "install_bundle", lambda *args: order.append("install") or ["probe"])
    built = gpu_check.Run.__init__
    monkeypatch.setattr(gpu_check.Run, "__init__", lambda self, *args: order.append("run") or built(self, *args))
    (tmp_path / "bundle").mkdir()
    config = CheckConfig(out=tmp_path / "out", data=multi30k_toy, bundle=tmp_path / "bundle", dry_run=True,
                         stages=("bench-decode",))  # no trained model to decode: it fails at once
    report = run_check(config, log=lambda message: None)
    assert order == ["install", "run"] and report["environment"]["installed_from_bundle"] == ["probe"]
    stage = json.loads((tmp_path / "out" / "gpu-check.json").read_text())["stages"]["bench-decode"]
    assert stage["status"].startswith("failed: RuntimeError: no trained model")
    assert any("in bench_decode" in line for line in stage["traceback"])


@pytest.mark.parametrize("threshold, met", [(41.0, "yes"), (30.0, "no"), (0.0, "no")])
def test_the_time_to_quality_row_names_its_threshold_and_meets_the_target_only_at_41(threshold, met):
    stage = {"status": "done", "seconds": 50, "train_seconds": 42.0, "dev_bleu_threshold": threshold}
    report = {"environment": {}, "settings": {}, "stages": {"transformer": stage}}
    table = gpu_check.format_markdown(report)
    assert f"| Transformer training seconds to dev BLEU {threshold:g} | 42.0 | ≤ 60 (to 41) | {met} |" in table
    stage.pop("train_seconds")  # not reached
    assert "| Transformer training seconds to dev BLEU | not reached or not measured |" in gpu_check.format_markdown(report)


@pytest.mark.slow
def test_the_training_figures_stay_when_decoding_the_test_set_fails(multi30k_toy, tmp_path, monkeypatch):
    def failing(self, save_dir):
        raise RuntimeError("out of memory while decoding")

    monkeypatch.setattr(gpu_check.Run, "score_test", failing)
    config = CheckConfig(out=tmp_path / "out", data=multi30k_toy, dry_run=True, vocab_size=40,
                         stages=("prepare", "transformer"))
    run_check(config, log=lambda message: None)
    stage = json.loads((tmp_path / "out" / "gpu-check.json").read_text())["stages"]["transformer"]
    assert stage["status"].startswith("failed: RuntimeError: out of memory")
    assert stage["tgt_tokens_per_s"] > 0 and stage["curve"] and stage["trained_seconds"] > 0


@pytest.mark.parametrize("minutes, seconds", [(9.0, 540), (0.2, 12), (0.001, 1)])
def test_the_runs_deadline_is_its_total_minutes_from_before_the_installation(minutes, seconds, multi30k_toy, tmp_path,
                                                                              monkeypatch):
    import signal

    alarms, order = [], []
    monkeypatch.setattr(signal, "alarm", lambda s: alarms.append(s) or 0)
    monkeypatch.setattr(gpu_check, "install_reporting_errors", lambda *args: order.append(("install", len(alarms))) or {})
    monkeypatch.setattr(gpu_check.Run, "run", lambda self: None)
    run_check(CheckConfig(out=tmp_path / "out", data=multi30k_toy, device="cpu", total_minutes=minutes), log=lambda m: None)
    assert alarms[0] == seconds and order == [("install", 1)]  # armed before the bundle goes in
    assert alarms[-1] == 0  # and disarmed at the end


def test_the_deadline_comes_again_should_its_first_signal_be_lost():
    """An error raised while OutOfTime unwinds (a CUDA graph capture ended halfway) replaces it,
    and a fallback may catch that one: the alarm is set again, for 15 s later."""
    import signal

    with pytest.raises(gpu_check.OutOfTime):
        gpu_check._out_of_time(signal.SIGALRM, None)
    assert signal.alarm(0) == 15  # what was left of the alarm it set, now disarmed


def test_a_figure_exactly_at_its_target_meets_it():
    """'≥ N' and '≤ N' include N; a time to quality counts only on the way to its dev BLEU."""
    from nmt.gpu_check import Target

    assert Target("≥", 360_000).met(360_000, {}) and not Target("≥", 360_000).met(359_999, {})
    assert Target("≤", 0.5).met(0.5, {}) and not Target("≤", 0.5).met(0.51, {})
    assert Target("≤", 60, dev_bleu=41.0).met(60, {"dev_bleu_threshold": 41.0})
    assert not Target("≤", 60, dev_bleu=41.0).met(60, {"dev_bleu_threshold": 40.0})


def test_training_leaves_a_minute_of_the_run_for_decoding_the_test_set(tmp_path, monkeypatch):
    """A training stage gets its budget, cut to what the run has left less one minute, in
    which the test set is decoded."""
    import nmt.bench
    from nmt import gpu_check
    from nmt.gpu_check import CheckConfig

    budgets = []

    class Measured(Exception):
        pass

    def time_to_quality(name, config, data_dir, save_dir, threshold, minutes, *args, **kwargs):
        budgets.append(minutes)
        raise Measured

    monkeypatch.setattr(nmt.bench, "bench_time_to_quality", time_to_quality)
    cc = CheckConfig(out=tmp_path / "out", device="cpu", total_minutes=9.0)
    for left, expected in ((150.0, 1.5), (9 * 60.0, 2.5)):  # 150 s: 90 s for training; plenty: the budget
        run = gpu_check.Run(cc, tmp_path, tmp_path, lambda message: None, started=time.monotonic() - (9 * 60 - left))
        with pytest.raises(Measured):
            run.train_and_score("transformer", 2.5, 41.0, True)
        assert budgets[-1] == pytest.approx(expected, abs=0.02)


def test_a_training_stage_records_its_peak_gpu_memory_from_a_reset_before_it(tmp_path, monkeypatch):
    import torch

    import nmt.bench
    import nmt.train_log

    events = []
    monkeypatch.setattr(nmt.bench, "reset_peak_memory", lambda device: events.append(("reset", device)))
    monkeypatch.setattr(nmt.bench, "peak_memory_mb", lambda device: 1234.4)
    monkeypatch.setattr(nmt.bench, "bench_time_to_quality",
                        lambda *args, **kwargs: events.append(("trained", None)) or {"stop_reason": "max_steps"})
    monkeypatch.setattr(nmt.train_log, "read_train_log", lambda save_dir: ([], None))
    run = gpu_check.Run(CheckConfig(out=tmp_path / "out", device="cpu"), tmp_path, tmp_path, lambda message: None,
                        started=time.monotonic())
    run.device = torch.device("cuda", 0)  # as on the GPU machine
    monkeypatch.setattr(run, "score_test", lambda save_dir: {})
    record = run.train_and_score("transformer", 1.0, 41.0, True)
    assert record["peak_memory_mb"] == 1234 and events == [("reset", run.device), ("trained", None)]
    run.device = torch.device("cpu")
    assert run.train_and_score("transformer", 1.0, 41.0, True)["peak_memory_mb"] is None  # a GPU figure only
