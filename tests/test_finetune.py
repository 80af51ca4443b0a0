"""Fine-tuning a trained translation model on other data (`nmt train --init MODEL_DIR`)."""

import json
import shutil

import pytest
import torch
from conftest import assert_one_line_error, prepare_toy_data, toy_pairs, train_tiny, write_pairs
from nmt_cli.main import app
from typer.testing import CliRunner

from nmt.checkpoint import load_pretrained, load_weights, read_training_info
from nmt.config import ModelConfig
from nmt.files import Manifest
from nmt.models import build_model

runner = CliRunner()
TINY = dict(embed_dim=32, ff_dim=64, heads=2, enc_layers=1, dec_layers=1, dropout=0.0, share_embeddings=True)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny_sets(**train) -> list[str]:
    sets = [f"model.{k}={v}" for k, v in TINY.items()]
    sets += [f"train.{k}={v}" for k, v in {"batch_tokens": 300, "valid_every": 4, "max_steps": 4, "log_every": 1,
                                          "valid_max_sentences": 5, **train}.items()]
    return [part for item in sets for part in ("--set", item)]


@pytest.fixture(scope="module")
def trained_and_new_data(tmp_path_factory):
    """A tiny trained model, a data dir of other pairs prepared with its vocabulary (`new-data`)
    and one with a vocabulary of its own (`own-data`)."""
    root = tmp_path_factory.mktemp("finetune")
    train_tiny(prepare_toy_data(root, train=200), root / "model", TINY)
    write_pairs(root / "new" / "train", toy_pairs(120, seed=7))
    write_pairs(root / "new" / "valid", toy_pairs(5, seed=8))
    write_pairs(root / "new" / "test", toy_pairs(5, seed=9))
    common = ["--train", root / "new" / "train", "--valid", root / "new" / "valid", "--test", root / "new" / "test",
              "--src", "xx", "--tgt", "yy"]
    assert invoke("prepare", *common, "--spm-model", root / "model", "--out", root / "new-data").exit_code == 0
    assert invoke("prepare", *common, "--vocab-size", 45, "--out", root / "own-data").exit_code == 0
    return root


def test_every_weight_of_best_is_loaded(trained_and_new_data):
    root = trained_and_new_data
    vocab, config = Manifest.read(root / "new-data").vocab, ModelConfig(**{**TINY, "dropout": 0.3})  # dropout may change
    model = build_model(config, vocab.src_size, vocab.tgt_size)
    loaded = load_pretrained(model, root / "model", vocab, config, decoder=True)
    best = build_model(config, vocab.src_size, vocab.tgt_size)
    load_weights(best, root / "model" / "best" / "model.safetensors")
    params, saved = dict(model.named_parameters()), dict(best.named_parameters())
    assert sorted(loaded) == sorted(params)
    for name, param in params.items():
        assert torch.equal(param, saved[name]), name


def _first_loss(save_dir) -> float:
    records = [json.loads(line) for line in (save_dir / "train_log.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if r.get("type") == "train")


def test_fine_tuning_continues_from_the_trained_model(trained_and_new_data, tmp_path):
    root = trained_and_new_data
    result = invoke("train", "--data", root / "new-data", "--out", tmp_path / "tuned", "--init", root / "model",
                    *tiny_sets(lr=1e-4, warmup_steps=1), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "initialised from" in result.output and "0 start fresh" in result.output
    result = invoke("train", "--data", root / "new-data", "--out", tmp_path / "scratch",
                    *tiny_sets(lr=1e-4, warmup_steps=1), "--no-progress")
    assert result.exit_code == 0, result.output
    # The toy language is learnt already: the first update's loss is far below a fresh model's.
    assert _first_loss(tmp_path / "tuned") < 0.7 * _first_loss(tmp_path / "scratch")
    assert read_training_info(tmp_path / "tuned").step == 4  # its own count, from 0
    out = tmp_path / "hyp.txt"
    result = invoke("translate", tmp_path / "tuned", "-i", root / "new" / "test.xx", "-o", out)
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 5


def test_another_vocabulary_is_a_one_line_error_naming_the_fix(trained_and_new_data, tmp_path):
    root = trained_and_new_data
    result = invoke("train", "--data", root / "own-data", "--out", tmp_path / "m", "--init", root / "model",
                    *tiny_sets(), "--no-progress")
    assert_one_line_error(result, "vocabulary", f"--spm-model {root / 'model'}")
    assert not (tmp_path / "m" / "best").exists()


@pytest.mark.parametrize("change, named", [
    ({"ff_dim": 48}, "model.ff_dim is 48 but"),
    ({"heads": 1}, "model.heads is 1 but"),  # the same tensor shapes, another model
    ({"norm": "post"}, "model.norm is 'post' but"),
    ({"tie_output": "false"}, "model.tie_output is False but"),
])
def test_a_model_unlike_the_trained_one_is_a_one_line_error(trained_and_new_data, tmp_path, change, named):
    root = trained_and_new_data
    sets = [part for k, v in change.items() for part in ("--set", f"model.{k}={v}")]
    result = invoke("train", "--data", root / "new-data", "--out", tmp_path / "m", "--init", root / "model",
                    *tiny_sets(), *sets, "--no-progress")
    assert_one_line_error(result, named, "--init")


def test_freezing_a_translation_model_is_refused(trained_and_new_data, tmp_path):
    root = trained_and_new_data
    result = invoke("train", "--data", root / "new-data", "--out", tmp_path / "m", "--init", root / "model",
                    *tiny_sets(freeze_init_steps=2), "--no-progress")
    assert_one_line_error(result, "train.freeze_init_steps", "translation model")
    result = invoke("train", "--data", root / "new-data", "--out", tmp_path / "m", "--init", root / "model",
                    *tiny_sets(init_decoder="false"), "--no-progress")  # every weight loads all the same
    assert_one_line_error(result, "train.init_decoder", "translation model")
    for setting in ("freeze_init_steps=2", "init_decoder=false"):  # about --init's weights: without it, none
        result = invoke("train", "--data", root / "new-data", "--out", tmp_path / "m", *tiny_sets(),
                        "--set", f"train.{setting}", "--no-progress")
        assert_one_line_error(result, f"train.{setting.split('=')[0]}", "none is given")
    assert not (tmp_path / "m").exists()


def test_a_model_with_separate_vocabularies_gives_the_new_data_both(tmp_path):
    """prepare --spm-model takes a checkpoint's separate source and target models as they are
    (no --separate-vocab needed), and the model fine-tunes on that data."""
    separate = {**TINY, "share_embeddings": False}
    train_tiny(prepare_toy_data(tmp_path, train=200, joint_vocab=False), tmp_path / "model", separate)
    for split, lines, seed in (("train", 120, 7), ("valid", 5, 8), ("test", 5, 9)):
        write_pairs(tmp_path / "new" / split, toy_pairs(lines, seed=seed))
    common = [part for split in ("train", "valid", "test") for part in (f"--{split}", tmp_path / "new" / split)]
    result = invoke("prepare", *common, "--src", "xx", "--tgt", "yy", "--spm-model", tmp_path / "model",
                    "--out", tmp_path / "new-data")
    assert result.exit_code == 0, result.output
    data, model = Manifest.read(tmp_path / "new-data").vocab, json.loads((tmp_path / "model" / "vocab.json").read_text())["vocab"]
    assert not data.joint and data.src_sha256 != data.tgt_sha256
    assert (data.src_sha256, data.tgt_sha256) == (model["src_sha256"], model["tgt_sha256"])
    # One embedding matrix for two vocabularies of the same size would train without a word.
    result = invoke("train", "--data", tmp_path / "new-data", "--out", tmp_path / "shared", *tiny_sets(), "--no-progress")
    assert_one_line_error(result, "model.share_embeddings needs a joint vocabulary", "model.share_embeddings=false")
    # Its models serve their own sides: not English with the German model.
    result = invoke("prepare", *common, "--src", "yy", "--tgt", "xx", "--spm-model", tmp_path / "model",
                    "--out", tmp_path / "reversed")
    assert_one_line_error(result, "a source vocabulary for xx and a target one for yy", "this data is yy->xx")
    result = invoke("train", "--data", tmp_path / "new-data", "--out", tmp_path / "tuned", "--init", tmp_path / "model",
                    *tiny_sets(), "--set", "model.share_embeddings=false", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "initialised from" in result.output
    out = tmp_path / "hyp.txt"
    result = invoke("translate", tmp_path / "tuned", "-i", tmp_path / "new" / "test.xx", "-o", out)
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 5
    # A data dir with one model for every language cannot take them.
    (tmp_path / "mono.xx").write_text("w1 w2\n" * 20, encoding="utf-8")
    result = invoke("prepare", "--mono", tmp_path / "mono.xx", "--spm-model", tmp_path / "model", "--out", tmp_path / "mono")
    assert_one_line_error(result, "separate source and target vocabularies")


def test_a_failing_start_leaves_the_model_that_overwrite_would_replace(trained_and_new_data, tmp_path):
    """--overwrite removes the old run only once the new one has its weights: an --init model
    without weights, or with damaged ones, leaves it as it was."""
    root = trained_and_new_data
    shutil.copytree(root / "model", tmp_path / "old")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()}
    no_weights, damaged = tmp_path / "no-weights", tmp_path / "damaged"
    shutil.copytree(root / "model", damaged)
    weights = damaged / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    shutil.copytree(root / "model", no_weights, ignore=shutil.ignore_patterns("best", "last", "checkpoints"))
    for init, fragment in ((no_weights, "no trained weights"), (damaged, "damaged")):
        result = invoke("train", "--data", root / "new-data", "--out", tmp_path / "old", "--init", init, "--overwrite",
                        *tiny_sets(), "--no-progress")
        assert_one_line_error(result, fragment)
        after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()}
        assert after == before


def test_resuming_a_fine_tuning_run_refuses_freezing_too(trained_and_new_data, tmp_path):
    root = trained_and_new_data
    args = ["train", "--data", root / "new-data", "--out", tmp_path / "tuned", "--init", root / "model", "--no-progress"]
    assert invoke(*args, *tiny_sets()).exit_code == 0
    result = invoke(*args, "--resume", *tiny_sets(max_steps=8, freeze_init_steps=6))
    assert_one_line_error(result, "train.freeze_init_steps is 6 but", "--resume needs the same value")
    result = invoke(*args, "--resume", *tiny_sets(max_steps=8))
    assert result.exit_code == 0, result.output
    # Another --init for a resumed run would be written into its config, its weights never loaded
    other = tmp_path / "other-model"
    shutil.copytree(root / "model", other)
    moved = [part if part != root / "model" else other for part in args]
    result = invoke(*moved, "--resume", *tiny_sets(max_steps=9))
    assert_one_line_error(result, f"began from {root / 'model'}", "leave out --init")
    scratch = ["train", "--data", root / "new-data", "--out", tmp_path / "scratch", "--no-progress"]
    assert invoke(*scratch, *tiny_sets(max_steps=2)).exit_code == 0
    assert_one_line_error(invoke(*scratch, "--init", root / "model", "--resume", *tiny_sets(max_steps=3)), "began from scratch")
