"""Each command's options reach the library function it calls: the command is run through
Typer with every option away from its default, and the call it makes is caught and read."""

from pathlib import Path

import pytest
import torch
import typer
from nmt_cli.main import app
from typer.testing import CliRunner

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


class Called(Exception):
    """Raised in place of the library function: what the command passed it."""

    def __init__(self, *args, **kwargs):
        super().__init__("called")
        self.positional, self.keywords = args, kwargs


def _catch(monkeypatch, module, name: str) -> None:
    def called(*args, **kwargs):
        raise Called(*args, **kwargs)

    monkeypatch.setattr(module, name, called)


def _call(args: list[str]) -> Called:
    result = runner.invoke(app, args)
    assert isinstance(result.exception, Called), result.output
    return result.exception


def test_serve_passes_every_option(monkeypatch, tmp_path):
    import nmt.serve

    _catch(monkeypatch, nmt.serve, "serve")
    (tmp_path / "keys").write_text("k2\n")
    call = _call(["serve", str(tmp_path / "m"), "--host", "0.0.0.0", "--port", "5123", "--api-key", "k1",
                  "--api-keys-file", str(tmp_path / "keys"), "--max-chars", "900", "--max-line-chars", "90",
                  "--max-lines", "9", "--max-alternatives", "3", "--timeout", "7.5", "--batch-wait-ms", "2.5",
                  "--max-batch-lines", "64", "--max-attention-weights", "1000", "--cors-origin", "https://a.example",
                  "--cors-origin", "*", "--beam", "3", "--engine", "ctranslate2", "--checkpoint", "last",
                  "--device", "cpu", "--int8"])
    models, settings, decode, checkpoint, device, int8, engine = call.positional
    assert models == [tmp_path / "m"] and decode == {"beam": 3}
    assert (checkpoint, device, int8, engine) == ("last", "cpu", True, "ctranslate2")
    assert (settings.host, settings.port, settings.api_keys) == ("0.0.0.0", 5123, frozenset({"k1", "k2"}))
    assert (settings.max_chars, settings.max_line_chars, settings.max_lines, settings.max_alternatives) == (900, 90, 9, 3)
    assert (settings.timeout_s, settings.batch_wait_ms, settings.max_batch_lines) == (7.5, 2.5, 64)
    assert (settings.max_attention_weights, settings.cors_origins) == (1000, ("https://a.example", "*"))


def test_prepare_passes_every_option(monkeypatch, tmp_path):
    import nmt.prepare_request

    _catch(monkeypatch, nmt.prepare_request, "prepare")
    call = _call(["prepare", "--train", "c/train", "--valid", "c/valid", "--test", "c/test", "--src", "de", "--tgt", "en",
                  "--tagged-train", "c/bt", "--out", str(tmp_path / "d"), "--valid-size", "7", "--test-size", "9", "--seed", "5", "--split-by", "de",
                  "--normalize", "NFKC", "--chinese-script", "none", "--max-words", "40", "--max-ratio", "2.5",
                  "--no-dedup", "--vocab-size", "300", "--spm-type", "bpe", "--separate-vocab",
                  "--character-coverage", "0.99", "--spm-sample", "1000", "--workers", "2", "--overwrite"])
    (config,) = call.positional
    assert (config.train_prefix, config.valid_prefix, config.test_prefix) == ("c/train", "c/valid", "c/test")
    assert config.tagged_train_prefix == "c/bt"
    assert (config.src_lang, config.tgt_lang, config.out_dir) == ("de", "en", tmp_path / "d")
    assert (config.valid_size, config.test_size, config.seed, config.split_by) == (7, 9, 5, "de")
    clean = config.clean
    assert (clean.normalization, clean.chinese_script, clean.max_words, clean.max_ratio, clean.dedup) == ("NFKC", "none", 40, 2.5, False)
    assert (config.vocab_size, config.spm_type, config.joint_vocab, config.character_coverage) == (300, "bpe", False, 0.99)
    assert (config.spm_max_sentences, config.workers, config.overwrite) == (1000, 2, True)

    _catch(monkeypatch, nmt.prepare_request, "prepare_mono")
    call = _call(["prepare", "--mono", "a.de", "--mono-langs", "de", "--out", str(tmp_path / "m"), "--valid-size", "11",
                  "--seed", "3", "--vocab-size", "500", "--normalize", "NFD", "--overwrite"])
    (config,) = call.positional
    assert (config.files, config.langs, config.valid_sentences, config.seed) == ([Path("a.de")], ["de"], 11, 3)
    assert (config.vocab_size, config.clean.normalization, config.overwrite) == (500, "NFD", True)


def test_prepare_options_are_the_fields_of_its_request():
    import dataclasses

    from nmt.prepare_request import PrepareRequest

    command = typer.main.get_command(app).commands["prepare"]
    options = {param.name for param in command.params if param.param_type_name == "option"} - {"progress"}
    assert options == {f.name for f in dataclasses.fields(PrepareRequest)}


def test_translate_passes_every_option(monkeypatch, tmp_path):
    import nmt.translate

    _catch(monkeypatch, nmt.translate, "translate_file")
    call = _call(["translate", "m1", "m2", "-i", "in.txt", "-o", "out.txt", "--beam", "3", "--nbest", "2", "--len-penalty", "0.5",
                  "--max-len-a", "1.5", "--max-len-b", "7", "--batch-tokens", "900", "--no-repeat-ngram", "3",
                  "--chunk-lines", "50", "--no-static-cache", "--checkpoint", "last", "--device", "cpu", "--replace-invalid",
                  "--int8", "--tgt-lang", "fr", "--src-lang", "de", "--pivot", "en", "--pivot-model", "p1",
                  "--restrict-vocab", "--prefix", "prefixes.txt"])
    model_dirs, input_path, output_path, options, checkpoint, device, replace_invalid = call.positional
    assert (model_dirs, input_path, output_path) == ([Path("m1"), Path("m2")], Path("in.txt"), Path("out.txt"))
    assert {key: options[key] for key in ("beam", "nbest", "len_penalty", "max_len_a", "max_len_b", "batch_tokens",
                                          "no_repeat_ngram", "chunk_lines", "static_cache", "restrict_vocab")} == {
        "beam": 3, "nbest": 2, "len_penalty": 0.5, "max_len_a": 1.5, "max_len_b": 7, "batch_tokens": 900,
        "no_repeat_ngram": 3, "chunk_lines": 50, "static_cache": False, "restrict_vocab": True}
    assert (checkpoint, device, replace_invalid, call.keywords["quantize"]) == ("last", "cpu", True, True)
    languages = call.keywords["languages"]
    assert (languages.tgt, languages.src, call.keywords["pivot"], call.keywords["pivot_dirs"]) == ("fr", "de", "en", [Path("p1")])
    assert call.keywords["prefix_path"] == Path("prefixes.txt")


def test_evaluate_passes_every_option(monkeypatch):
    import nmt.evaluate

    for name in ("score_files", "translate_and_score", "evaluate_directions"):
        _catch(monkeypatch, nmt.evaluate, name)
    call = _call(["evaluate", "--hyp", "h", "--ref", "r", "--metrics", "bleu,ter", "--tokenize", "zh", "--lang", "zh"])
    assert call.positional == (Path("h"), Path("r"), ("bleu", "ter"), "zh", "zh")
    call = _call(["evaluate", "--src", "s", "--ref", "r", "--model", "m", "--beam", "2", "--tokenize", "intl",
                  "--lang", "ja", "--tgt-lang", "ja", "--src-lang", "en", "--device", "cpu"])
    assert call.positional == (Path("m"), Path("s"), Path("r"), {"beam": 2, "restrict_vocab": None}, ("bleu", "chrf", "ter"),
                               "intl", "cpu", "ja", "ja", "en")
    call = _call(["evaluate", "--data", "d", "--model", "m", "--beam", "4", "--tokenize", "13a", "--split", "valid"])
    assert call.positional[:4] == ([Path("m")], Path("d"), "valid", None) and call.positional[4] == {"beam": 4, "restrict_vocab": None}
    assert call.keywords["tokenize"] == "13a"


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_train_and_pretrain_pass_resume_and_overwrite(monkeypatch, command):
    import nmt.pretrain
    import nmt.train

    _catch(monkeypatch, nmt.train if command == "train" else nmt.pretrain, command)
    recipe = "recipes/multi30k/transformer-cpu.yaml" if command == "train" else "recipes/multi30k-lowres/pretrain-cpu.yaml"
    root = Path(__file__).resolve().parents[1]
    call = _call([command, str(root / recipe), "--out", "o", "--overwrite", "--no-progress", "--set", "train.seed=9"])
    assert call.keywords["overwrite"] is True and call.keywords["resume"] is False and call.keywords["progress"] is False
    assert call.positional[0].train.seed == 9 and call.positional[0].save_dir == "o"
    if command == "pretrain":
        call = _call([command, str(root / recipe), "--nsp", "--vocab-size", "700"])
        assert call.positional[0].pretrain.next_sentence is True and call.positional[3] == 700


def test_bench_passes_every_option(monkeypatch):
    import nmt.bench

    _catch(monkeypatch, nmt.bench, "run_bench")
    call = _call(["bench", "--data", "m30k", "--out", "b.json", "--recipe", "t=r.yaml", "--checkpoint", "t=ck",
                  "--sections", "train,decode", "--device", "cpu", "--steps", "6", "--repeats", "2", "--vocab-size", "3000",
                  "--ttq-bleu", "12", "--ttq-minutes", "3", "--work-dir", "w", "--no-cpu-bf16"])
    (config,) = call.positional
    assert (config.data, config.out, config.recipes, config.checkpoints) == (Path("m30k"), Path("b.json"), {"t": Path("r.yaml")}, {"t": Path("ck")})
    assert (config.sections, config.device, config.steps, config.repeats) == (("train", "decode"), "cpu", 6, 2)
    assert (config.vocab_size, config.ttq_bleu, config.ttq_minutes, config.work_dir, config.cpu_bf16_training) == (3000, 12.0, 3.0, Path("w"), False)


def test_train_passes_device_data_init_and_resume(monkeypatch):
    import nmt.train

    _catch(monkeypatch, nmt.train, "train")
    call = _call(["train", str(ROOT / "recipes/multi30k/transformer-cpu.yaml"), "--data", "dd", "--out", "o",
                  "--device", "cpu", "--init", "pre", "--resume"])
    settings = call.positional[0]
    assert settings.train.device == "cpu"
    assert settings.data_dir == "dd"
    assert settings.train.init == "pre"
    assert call.keywords["resume"] is True


def test_pretrain_passes_data_text_and_vocab(monkeypatch):
    import nmt.pretrain

    _catch(monkeypatch, nmt.pretrain, "pretrain")
    call = _call(["pretrain", str(ROOT / "recipes/multi30k-lowres/pretrain-cpu.yaml"), "--data", "mono",
                  "--device", "cpu", "--resume"])
    assert call.keywords["data"] == Path("mono") and call.keywords["resume"] is True
    assert call.positional[0].train.device == "cpu"
    call = _call(["pretrain", str(ROOT / "recipes/multi30k-lowres/pretrain-cpu.yaml"), "--text", "a.de",
                  "--vocab", "v.model"])
    assert call.positional[1:3] == ([Path("a.de")], Path("v.model"))


def test_fill_mask_passes_checkpoint_and_device(monkeypatch):
    import nmt.pretrain

    _catch(monkeypatch, nmt.pretrain, "load_masked_lm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    call = _call(["fill-mask", "m", "a [MASK] b", "--checkpoint", "last", "--device", "cpu", "--top-k", "2"])
    assert call.positional == (Path("m"), torch.device("cpu"), "last")


def test_translate_passes_sampling_precision_stream_and_engine(monkeypatch):
    import nmt.translate

    _catch(monkeypatch, nmt.translate, "translate_file")
    call = _call(["translate", "m", "--sampling", "--topk", "5", "--topp", "0.9", "--temperature", "0.7",
                  "--seed", "42", "--precision", "bf16", "--stream", "--engine", "ctranslate2",
                  "--prefix", "p.txt", "--prefix-only"])
    options = call.positional[3]
    assert {k: options[k] for k in ("sampling", "topk", "topp", "temperature", "seed", "precision", "prefix_only")} == {
        "sampling": True, "topk": 5, "topp": 0.9, "temperature": 0.7, "seed": 42, "precision": "bf16", "prefix_only": True}
    assert call.keywords["stream"] is True and call.keywords["engine"] == "ctranslate2"


def test_translate_passes_attention_options(monkeypatch, tmp_path):
    import nmt.translate

    _catch(monkeypatch, nmt.translate, "translate_file")
    call = _call(["translate", "m", "--attention", str(tmp_path / "att"), "--attention-lines", "4",
                  "--attention-layer", "2", "--attention-head", "3", "--attention-words", "--json"])
    att = call.keywords["attention"]
    assert (att.directory, att.pictures, att.words, att.json) == (tmp_path / "att", 4, True, True)
    assert (att.choice.layer, att.choice.head) == (2, 3)


def test_export_passes_checkpoint_quantization_and_overwrite(monkeypatch):
    import nmt.export

    _catch(monkeypatch, nmt.export, "export_model")
    call = _call(["export", "m", "--out", "e", "--quantization", "int8", "--checkpoint", "last", "--overwrite"])
    assert call.positional == (Path("m"), Path("e"), "ctranslate2", "int8", "last", True)


def test_average_passes_last_and_best_in_their_places(monkeypatch):
    import nmt.average

    _catch(monkeypatch, nmt.average, "average_checkpoints")
    call = _call(["average", "m", "--out", "a", "--last", "3"])
    assert call.positional == (Path("m"), Path("a"), 3, 0)
    call = _call(["average", "m", "--out", "a", "--best", "2"])
    assert call.positional == (Path("m"), Path("a"), 0, 2)


def test_evaluate_data_passes_pivot_hyp_dir_directions_and_off_target(monkeypatch):
    import nmt.evaluate

    _catch(monkeypatch, nmt.evaluate, "evaluate_directions")
    call = _call(["evaluate", "--data", "d", "--model", "m", "--pivot", "en", "--hyp-dir", "h", "--off-target",
                  "--directions", "de-fr", "--device", "cpu", "--metrics", "chrf", "--pivot-model", "p"])
    assert call.positional[5:8] == (("chrf",), "cpu", "en")
    assert call.positional[3] == ["de-fr"]
    assert call.keywords["hyp_dir"] == Path("h") and call.keywords["off_target"] is True
    assert call.keywords["pivot_dirs"] == [Path("p")]


def test_bench_serve_passes_every_option(monkeypatch):
    import nmt.serve.bench

    _catch(monkeypatch, nmt.serve.bench, "bench_serve")
    call = _call(["bench-serve", "m", "--src", "s.txt", "--clients", "1,4", "--lines", "9", "--beam", "2",
                  "--engine", "ctranslate2", "--device", "cpu", "--out", "r.json"])
    assert call.positional == (Path("m"), Path("s.txt"), [1, 4], 9, 2, "cpu", "ctranslate2")
    assert call.keywords["out"] == Path("r.json")


def test_bench_scale_passes_every_option(monkeypatch):
    import nmt.bench_scale

    _catch(monkeypatch, nmt.bench_scale, "run_scale_bench")
    call = _call(["bench-scale", "--data", "m30k", "--pairs", "500", "--ratio", "5", "--steps", "3", "--work-dir", "w",
                  "--out", "r.json", "--mono", "--translate", "mdl", "--beam", "2", "--src", "fr", "--tgt", "de"])
    (config,) = call.positional
    assert (config.data, config.pairs, config.ratio, config.steps, config.work_dir, config.out) == (
        Path("m30k"), 500, 5, 3, Path("w"), Path("r.json"))
    assert (config.mono, config.translate, config.beam, config.src, config.tgt) == (True, Path("mdl"), 2, "fr", "de")


def test_train_exits_with_status_1_when_too_many_updates_were_skipped(monkeypatch, tmp_path):
    """A run stopped because its updates kept being skipped (a diverged model) fails the command,
    for scripts and CI to see; one stopped by its budget does not."""
    from nmt_cli.main import app
    from typer.testing import CliRunner

    import nmt.train
    from nmt.train import TOO_MANY_SKIPPED, TrainResult

    recipe = Path(__file__).resolve().parents[1] / "recipes/multi30k/transformer-cpu.yaml"
    for reason, status in ((TOO_MANY_SKIPPED, 1), ("max_steps", 0)):
        def stopped(config, reason=reason, **options):
            return TrainResult(Path(config.save_dir), 4, 0.1, 1.0, 2, {}, 1.0, reason)

        monkeypatch.setattr(nmt.train, "train", stopped)
        result = CliRunner().invoke(app, ["train", str(recipe), "--out", str(tmp_path / "o"), "--no-progress"])
        assert result.exit_code == status, result.output
        assert f"stopped by {reason}" in result.output
