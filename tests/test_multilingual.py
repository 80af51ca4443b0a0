"""Multilingual data dirs, training and translation: language tags, temperature sampling,
per-direction validation, --tgt-lang, --pivot and per-direction evaluation."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SRC_WORDS, TGT_WORDS, assert_one_line_error
from nmt_cli.main import app
from typer.testing import CliRunner

from nmt.data import ParallelSplit, read_lines
from nmt.errors import ConfigError, DataError
from nmt.files import CheckpointInfo, Manifest, VocabInfo
from nmt.multilingual import (
    MultilingualConfig,
    balanced_sample,
    epoch_pairs,
    hold_out_everywhere,
    parse_directions,
    prepare_multilingual,
    temperature_weights,
)
from nmt.prepare import PrepareConfig, clean_and_split
from nmt.prepare_request import prepare_warnings
from nmt.tokenizer import CLS, MASK, SEP, Tokenizer, language_tag

runner = CliRunner()
THIRD_WORDS = [f"z{i}q" for i in range(12)]
DIRECTIONS = ["aa-bb", "bb-aa", "aa-cc"]


def three_way(count: int, seed: int) -> list[tuple[str, str, str]]:
    """Sentences of three toy languages, parallel: bb reverses aa's order, cc keeps it."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < count:
        ids = [rng.randrange(12) for _ in range(rng.randint(2, 5))]
        aa = " ".join(SRC_WORDS[i] for i in ids)
        if aa not in seen:
            seen.add(aa)
            rows.append((aa, " ".join(TGT_WORDS[i] for i in reversed(ids)), " ".join(THIRD_WORDS[i] for i in ids)))
    return rows


def write_three_way(folder: Path, train: int = 300) -> Path:
    for name, count, seed in (("train", train, 1), ("valid", 12, 2), ("test", 10, 3)):
        rows = three_way(count, seed)
        for k, lang in enumerate(("aa", "bb", "cc")):
            (folder / f"{name}.{lang}").parent.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.{lang}").write_text("".join(r[k] + "\n" for r in rows), encoding="utf-8")
    return folder


def prepare_three_way(root: Path, directions=DIRECTIONS, zero_shot=("bb-cc",), temperature: float = 1.5) -> Path:
    corpus = write_three_way(root / "corpus")
    prepare_multilingual(MultilingualConfig(
        PrepareConfig(out_dir=root / "data", src_lang="", tgt_lang="", train_prefix=str(corpus / "train"),
                      valid_prefix=str(corpus / "valid"), test_prefix=str(corpus / "test"), vocab_size=60),
        list(directions), list(zero_shot), temperature,
    ))
    return root / "data"


def prepare_with_chinese(root: Path) -> Path:
    """Directions aa-bb and aa-zh, zh being the toy cc under Chinese's name (and normalization)."""
    corpus = write_three_way(root / "corpus")
    for path in corpus.glob("*.cc"):
        path.rename(path.with_suffix(".zh"))
    prepare_multilingual(MultilingualConfig(
        PrepareConfig(out_dir=root / "data", src_lang="", tgt_lang="", train_prefix=str(corpus / "train"),
                      valid_prefix=str(corpus / "valid"), test_prefix=str(corpus / "test"), vocab_size=300),
        ["aa-bb", "aa-zh"], [], 1.5,  # a Chinese side takes byte pieces too
    ))
    return root / "data"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_three_way(tmp_path_factory.mktemp("multilingual"))


def test_every_source_starts_with_the_tag_of_its_directions_target(data_dir):
    manifest = Manifest.read(data_dir)
    assert manifest.directions == DIRECTIONS and manifest.zero_shot == ["bb-cc"]
    assert sorted(manifest.languages) == ["aa", "bb", "cc"]
    tokenizer = Tokenizer(data_dir / manifest.vocab.src_model, data_dir / manifest.vocab.tgt_model)
    train = ParallelSplit.load(data_dir, "train")
    start = 0
    for direction in DIRECTIONS:
        count = manifest.direction_counts[direction]["train"]["pairs"]
        tag = tokenizer.tag_id(direction.split("-")[1])
        sources = [train.src[i] for i in range(start, start + count)]
        assert all(int(ids[0]) == tag and tag not in ids[1:].tolist() for ids in sources)
        assert all(tag not in train.tgt[i].tolist() for i in range(start, start + count))
        start += count
    assert start == len(train) == manifest.counts["train"]["pairs"]
    for direction in DIRECTIONS + ["bb-cc"]:  # held-out sets per direction, zero-shot included
        src_lang, tgt_lang = direction.split("-")
        test = ParallelSplit.load(data_dir, f"test.{direction}")
        assert all(int(test.src[i][0]) == tokenizer.tag_id(tgt_lang) for i in range(len(test)))
        references = list(read_lines(data_dir / f"test.{direction}.tgt.txt"))
        assert references == list(read_lines(data_dir.parent / "corpus" / f"test.{tgt_lang}"))
        assert list(read_lines(data_dir / f"test.{direction}.src.txt")) == list(read_lines(data_dir.parent / "corpus" / f"test.{src_lang}"))
    # The tags are reserved pieces: written in text, a tag encodes to its one id.
    assert tokenizer.src.encode(language_tag("cc")) [-1] == tokenizer.tag_id("cc")
    # ... and never part of a translation, as the pretraining symbols.
    tags = sorted(tokenizer.tag_id(lang) for lang in ("aa", "bb", "cc"))
    assert tokenizer.reserved_target_ids == [MASK, CLS, SEP, *tags]
    # A tag or mask spelled in the text the model reads is the pieces of its characters: no input
    # chooses the output language (<2bb> in a line asked for cc) or stands for a mask.
    tagged = tokenizer.for_target("cc")
    text = f"w1 {language_tag('bb')} w2 [MASK]"
    source, target = tagged.encode_src([text])[0], tagged.encode_tgt([text])[0]
    reserved = {MASK, CLS, SEP, *tags}
    assert source[0] == tokenizer.tag_id("cc") and not reserved & set(source[1:]) and not reserved & set(target)


def test_temperature_weights_follow_the_formula():
    weights = temperature_weights({"big": 900, "small": 100}, 1.0)
    assert weights["big"] == pytest.approx(0.9)
    weights = temperature_weights({"big": 900, "small": 100}, 5.0)
    expected_small = 0.1 ** 0.2 / (0.9 ** 0.2 + 0.1 ** 0.2)
    assert weights["small"] == pytest.approx(expected_small)
    assert temperature_weights({"big": 900, "small": 100}, 1e6)["small"] == pytest.approx(0.5, abs=1e-4)


def test_the_sentencepiece_sample_follows_the_temperature(tmp_path):
    """aa has 400 distinct sentences (shared by two directions: counted once), bb 400 and cc 50."""
    corpus = write_three_way(tmp_path / "corpus", train=400)
    rows = three_way(400, 1)
    (corpus / "small.aa").write_text("".join(r[0] + "\n" for r in rows[:50]), encoding="utf-8")
    (corpus / "small.cc").write_text("".join(r[2] + "\n" for r in rows[:50]), encoding="utf-8")
    base = PrepareConfig(out_dir=tmp_path / "x", src_lang="aa", tgt_lang="bb", train_prefix=str(corpus / "train"),
                         valid_size=0, test_size=0)
    corpora = {
        "aa-bb": clean_and_split(base, tmp_path / "w1", False),
        "aa-cc": clean_and_split(PrepareConfig(out_dir=tmp_path / "x", src_lang="aa", tgt_lang="cc", valid_size=0,
                                               test_size=0, train_prefix=str(corpus / "small")), tmp_path / "w2", False),
    }
    for temperature in (1.0, 3.0):
        sentences, counts = balanced_sample(corpora, 100_000, temperature, seed=1)
        weights = temperature_weights({"aa": 400, "bb": 400, "cc": 50}, temperature)
        sample = list(sentences)
        assert len(sample) == sum(counts.values()) == pytest.approx(850, abs=2)
        for lang, weight in weights.items():
            assert counts[lang] / len(sample) == pytest.approx(weight, abs=0.01)
        assert sum(s.startswith("z") for s in sample) == counts["cc"]  # the counts are what was yielded
    sentences, counts = balanced_sample(corpora, 101, 1.0, seed=1)  # --spm-sample caps it
    assert len(list(sentences)) == sum(counts.values()) == pytest.approx(101, abs=2)


def test_a_sample_of_all_holds_each_distinct_sentence_once_wherever_it_first_occurs(tmp_path):
    """aa's sentences 0-29 come with aa-bb, 20-49 with aa-cc: 50 distinct, 20 of them first seen
    in the second direction."""
    rows = three_way(50, 1)
    for name, lang, part in (("one", "bb", rows[:30]), ("two", "cc", rows[20:])):
        (tmp_path / f"{name}.aa").write_text("".join(r[0] + "\n" for r in part), encoding="utf-8")
        (tmp_path / f"{name}.{lang}").write_text("".join(r[1 if lang == "bb" else 2] + "\n" for r in part), encoding="utf-8")
    corpora = {f"aa-{lang}": clean_and_split(PrepareConfig(out_dir=tmp_path / "x", src_lang="aa", tgt_lang=lang, valid_size=0,
                                                           test_size=0, train_prefix=str(tmp_path / name)), tmp_path / name, False)
               for name, lang in (("one", "bb"), ("two", "cc"))}
    sentences, counts = balanced_sample(corpora, 100_000, 1.0, seed=1)
    assert counts == {"aa": 50, "bb": 30, "cc": 30}
    sample = list(sentences)
    assert sorted(s for s in sample if s.startswith("w")) == sorted(r[0] for r in rows)


def test_a_held_out_sentence_leaves_the_training_pairs_of_every_direction_on_its_side(tmp_path):
    corpus = write_three_way(tmp_path / "corpus")
    rows = three_way(300, 1)  # the training rows
    base = PrepareConfig(out_dir=tmp_path / "x", src_lang="aa", tgt_lang="bb", train_prefix=str(corpus / "train"),
                         valid_size=0, test_size=0)
    corpora = {"aa-bb": clean_and_split(base, tmp_path / "w", False)}
    held_out = {"cc-bb": {"test": [(rows[0][2], rows[0][1])]},  # rows[0]'s bb sentence is a target
                "bb-aa": {"valid": [(rows[1][1], rows[1][0])]}}  # rows[1]'s aa sentence is a target
    assert hold_out_everywhere(corpora, held_out) == {"aa-bb": 2}
    training = list(corpora["aa-bb"].training_pairs())
    assert (rows[0][0], rows[0][1]) not in training and (rows[1][0], rows[1][1]) not in training
    assert len(training) == 298


def test_an_epoch_draws_each_direction_in_its_temperature_share():
    sizes = [1000, 100]
    for temperature in (1.0, 5.0):
        pairs = epoch_pairs(sizes, temperature, np.random.default_rng(0))
        weights = temperature_weights({"0": 1000, "1": 100}, temperature)
        assert len(pairs) == pytest.approx(1100, abs=1)
        small = int((pairs >= 1000).sum())
        assert small == round(1100 * weights["1"])
        assert pairs.min() >= 0 and pairs.max() < 1100
        if small > 100:  # oversampled: every small pair is seen, none more than once more than another
            counts = np.bincount(pairs[pairs >= 1000] - 1000, minlength=100)
            assert counts.min() >= 1 and counts.max() - counts.min() <= 1


def test_direction_weights_multiply_the_temperature_shares():
    """p_i ∝ w_i · n_i^(1/T), over as many pairs as there are."""
    sizes, weights = np.array([1000, 100, 100]), np.array([1.0, 3.0, 1.0])
    expected = weights * sizes ** 0.5 / (weights * sizes ** 0.5).sum() * 1200
    pairs = epoch_pairs(sizes.tolist(), 2.0, np.random.default_rng(0), weights.tolist())
    drawn = [((pairs >= lo) & (pairs < lo + n)).sum() for lo, n in ((0, 1000), (1000, 100), (1100, 100))]
    assert drawn == pytest.approx(expected, abs=1) and len(pairs) == pytest.approx(1200, abs=2)
    assert drawn[1] > 2.9 * drawn[2]


def test_parse_directions_rejects_what_is_not_a_direction():
    assert parse_directions("de-en, en-de") == ["de-en", "en-de"]
    for bad in ("de", "de-de", "de-en,de-en", "de-en-x"):
        with pytest.raises(DataError, match="direction"):
            parse_directions(bad)


def test_training_epochs_draw_from_the_directions_and_word_dropout_keeps_the_tags(data_dir):
    from nmt.config import config_from_dict
    from nmt.translation_task import MultilingualTranslationTask

    manifest = Manifest.read(data_dir)
    config = config_from_dict({"data_dir": str(data_dir), "train": {"word_dropout": 0.9, "lang_temperature": 100.0}})
    task = MultilingualTranslationTask(config, data_dir, manifest)
    first, again, other = task.epoch_batches(300, 0), task.epoch_batches(300, 0), task.epoch_batches(300, 1)
    assert [b.tolist() for b in first] == [b.tolist() for b in again]  # a resumed run gets the same epoch
    assert [b.tolist() for b in first] != [b.tolist() for b in other]
    pairs = np.concatenate(first)
    assert len(pairs) == pytest.approx(len(task.train_split), abs=2) and pairs.max() < len(task.train_split)
    offsets = np.cumsum([0] + task.sizes)
    shares = [((pairs >= offsets[i]) & (pairs < offsets[i + 1])).sum() for i in range(len(DIRECTIONS))]
    assert max(shares) - min(shares) <= 2  # a high temperature evens the directions out
    batch = task.make_batch(first[0], False, 0, 0)
    tags = {task.tokenizer.tag_id(lang) for lang in ("aa", "bb", "cc")}
    assert set(batch.src[:, 0].tolist()) <= tags  # every tag survives 90% word dropout
    assert (batch.src[:, 1:] == 1).float().mean() > 0.5  # while most words became <unk>


def test_direction_weights_train_a_named_direction_more_and_must_name_the_data_dirs(data_dir):
    from nmt.config import config_from_dict
    from nmt.translation_task import MultilingualTranslationTask

    manifest = Manifest.read(data_dir)
    config = config_from_dict({"data_dir": str(data_dir), "train": {"lang_temperature": 100.0,
                                                                      "direction_weights": {"aa-cc": 2.0}}})
    task = MultilingualTranslationTask(config, data_dir, manifest)
    assert "aa-cc ×2" in task.describe()
    pairs = np.concatenate(task.epoch_batches(300, 0))
    offsets = np.cumsum([0] + task.sizes)
    shares = [((pairs >= offsets[i]) & (pairs < offsets[i + 1])).sum() for i in range(len(DIRECTIONS))]
    assert shares[2] == pytest.approx(2 * shares[0], abs=3) and shares[0] == pytest.approx(shares[1], abs=2)
    config = config_from_dict({"data_dir": str(data_dir), "train": {"direction_weights": {"cc-aa": 2.0}}})
    with pytest.raises(ConfigError, match=f"cc-aa, which data dir {re.escape(str(data_dir))} does not have .it has aa-bb, bb-aa, aa-cc"):
        MultilingualTranslationTask(config, data_dir, manifest)


def test_a_direction_weighted_below_one_trains_on_another_part_of_its_pairs_each_epoch(data_dir):
    from nmt.config import config_from_dict
    from nmt.translation_task import MultilingualTranslationTask

    manifest = Manifest.read(data_dir)
    config = config_from_dict({"data_dir": str(data_dir), "train": {"direction_weights": {"aa-cc": 0.5}}})
    task = MultilingualTranslationTask(config, data_dir, manifest)
    assert "sampling temperature 1.5; weights aa-cc ×0.5" in task.describe()  # the data dir's temperature
    offsets = np.cumsum([0] + task.sizes)
    drawn = []
    for epoch in (0, 1):
        pairs = np.concatenate(task.epoch_batches(300, epoch))
        shares = [((pairs >= offsets[i]) & (pairs < offsets[i + 1])).sum() for i in range(len(DIRECTIONS))]
        assert shares[2] == pytest.approx(shares[0] / 2, abs=3) and shares[0] == pytest.approx(shares[1], abs=2)
        drawn.append(set(pairs[pairs >= offsets[2]].tolist()))
    assert drawn[0] != drawn[1]  # not the same half every epoch
    config.train.lang_temperature = 5.0  # the config's temperature before the data dir's
    assert "sampling temperature 5" in MultilingualTranslationTask(config, data_dir, manifest).describe()


def test_dev_translation_takes_the_dev_settings_and_never_writes_a_tag(data_dir, monkeypatch):
    import nmt.translation_task
    from nmt.config import config_from_dict
    from nmt.models import build_model
    from nmt.search import Hypothesis
    from nmt.translation_task import MultilingualTranslationTask

    config = config_from_dict({"data_dir": str(data_dir), "model": {"arch": "transformer", "embed_dim": 32, "enc_layers": 1,
                                                                   "dec_layers": 1, "heads": 2, "ff_dim": 64},
                               "train": {"valid_max_sentences": 3, "valid_beam": 2}, "decode": {"beam": 5, "nbest": 4}})
    task = MultilingualTranslationTask(config, data_dir, Manifest.read(data_dir))
    calls = []

    def recording(model, sources, decode, device, allowed=None, **options):
        calls.append((len(sources), decode.beam, decode.nbest, allowed))
        return [[Hypothesis([], 0.0)] for _ in sources]

    monkeypatch.setattr(nmt.translation_task, "translate_ids", recording)
    vocab = task.tokenizer.tgt_vocab_size
    result = task.validate(build_model(config.model, vocab, vocab), torch.device("cpu"), torch.float32)
    assert result["sentences"] == 3 * len(DIRECTIONS) and len(calls) == len(DIRECTIONS)
    losses = [result[f"loss_{d}"] for d in DIRECTIONS]
    assert len(set(losses)) > 1 and result["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)  # their mean
    tags = [task.tokenizer.tag_id(lang) for lang in ("aa", "bb", "cc")]
    for count, beam, nbest, allowed in calls:
        assert (count, beam, nbest) == (3, 2, 1)
        assert not allowed[tags].any() and allowed[task.tokenizer.tgt.piece_to_id("V3")]


def test_validation_scores_each_direction_on_its_own_set_and_best_follows_their_mean(data_dir, tmp_path, monkeypatch):
    """The dev BLEU of one direction rises at the second validation while the mean falls: best/
    stays at the first, and moves to the third, where the mean is highest."""
    import nmt.translation_task
    from nmt.config import config_from_dict
    from nmt.train import train

    scripted = {1: {"bb": 20.0, "aa": 20.0, "cc": 20.0}, 2: {"bb": 50.0, "aa": 0.0, "cc": 0.0},
                3: {"bb": 30.0, "aa": 30.0, "cc": 30.0}}
    calls = []

    def fake_validate(model, split, references, tokenizer, config, device, dtype, tgt_lang=None, normalize_target=None):
        calls.append((int(split.src[0][0]), references[0], tgt_lang))
        step = 1 + (len(calls) - 1) // len(DIRECTIONS)
        return {"loss": 1.0, "ppl": 2.7, "bleu": scripted[step][tgt_lang], "sentences": len(split)}

    monkeypatch.setattr(nmt.translation_task, "validate", fake_validate)
    config = config_from_dict({
        "data_dir": str(data_dir), "save_dir": str(tmp_path / "run"),
        "model": {"arch": "transformer", "embed_dim": 16, "enc_layers": 1, "dec_layers": 1, "heads": 2, "ff_dim": 32},
        "train": {"max_steps": 3, "batch_tokens": 200, "valid_every": 1, "log_every": 1, "warmup_steps": 1},
    })
    result = train(config, progress=False)
    manifest = Manifest.read(data_dir)
    tokenizer = Tokenizer(data_dir / manifest.vocab.src_model, data_dir / manifest.vocab.tgt_model)
    expected = [(tokenizer.tag_id(d.split("-")[1]), next(read_lines(data_dir / f"valid.{d}.tgt.txt")), d.split("-")[1])
                for d in DIRECTIONS]
    assert calls[:3] == expected
    assert result.best_step == 3 and result.best_score == 30.0
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    valid = [r for r in log if r["type"] == "valid"]
    assert [r["bleu"] for r in valid] == [20.0, pytest.approx(50 / 3, abs=0.01), 30.0]
    assert valid[1]["bleu_aa-bb"] == 50.0 and valid[1]["bleu_bb-aa"] == 0.0
    assert (valid[0]["metric"], valid[0]["metric_name"]) == ("bleu", "BLEU")  # what the log's readers go by
    assert CheckpointInfo.read(tmp_path / "run" / "best").state.step == 3


def test_each_directions_dev_output_is_written_with_its_target_languages_normalization(tmp_path, monkeypatch):
    """A Chinese target's dev translations get Chinese normalization (width, punctuation,
    script) before BLEU, and the other directions their own."""
    import nmt.translation_task
    from nmt.config import config_from_dict
    from nmt.models import build_model
    from nmt.normalize import language_normalization
    from nmt.translation_task import MultilingualTranslationTask

    prepare_with_chinese(tmp_path)
    calls = {}

    def fake_validate(model, split, references, tokenizer, config, device, dtype, tgt_lang=None, normalize_target=None):
        calls[tgt_lang] = normalize_target
        return {"loss": 1.0, "ppl": 2.7, "bleu": 1.0, "sentences": len(split)}

    monkeypatch.setattr(nmt.translation_task, "validate", fake_validate)
    config = config_from_dict({"data_dir": str(tmp_path / "data"), "model": {
        "arch": "transformer", "embed_dim": 16, "enc_layers": 1, "dec_layers": 1, "heads": 2, "ff_dim": 32}})
    task = MultilingualTranslationTask(config, tmp_path / "data", Manifest.read(tmp_path / "data"))
    vocab = task.tokenizer.tgt_vocab_size
    task.validate(build_model(config.model, vocab, vocab), torch.device("cpu"), torch.float32)
    assert calls == {"bb": language_normalization("bb"), "zh": language_normalization("zh")}
    assert calls["zh"] != calls["bb"]


def test_the_manifest_gives_the_unk_share_of_the_direction_with_most(tmp_path):
    """Characters never seen in training, in bb's dev sentences only: <unk> in the target of
    aa-bb and the source of bb-aa, the first two directions of three."""
    corpus = write_three_way(tmp_path / "corpus")
    lines = (corpus / "valid.bb").read_text(encoding="utf-8").splitlines()
    (corpus / "valid.bb").write_text("".join(f"{line} ǂ\n" for line in lines), encoding="utf-8")
    unk = prepare_multilingual(MultilingualConfig(
        PrepareConfig(out_dir=tmp_path / "data", src_lang="", tgt_lang="", train_prefix=str(corpus / "train"),
                      valid_prefix=str(corpus / "valid"), test_prefix=str(corpus / "test"), vocab_size=60),
        DIRECTIONS, [], 1.5,
    )).valid_unk_percent
    assert unk["src"] > 0 and unk["tgt"] > 0, unk


def test_training_refuses_a_data_dir_whose_direction_counts_are_not_its_training_pairs(data_dir, tmp_path):
    """A manifest that does not match the token files (a data dir edited or half rewritten): a
    one-line error, since the directions' shares would be drawn from the wrong pairs."""
    stale = tmp_path / "stale"
    shutil.copytree(data_dir, stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["direction_counts"]["bb-aa"]["train"]["pairs"] -= 1
    (stale / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["train", "--data", str(stale), "--out", str(tmp_path / "run"), "--no-progress",
                                 "--set", "model.embed_dim=16", "--set", "model.ff_dim=32", "--set", "train.max_steps=1"])
    assert_one_line_error(result, str(stale), "do not add up", "nmt prepare")
    assert not (tmp_path / "run" / "last").exists()


def test_the_training_plot_shows_each_direction(trained, tmp_path):
    from nmt.plots import plot_training, training_figure

    labels = [text.get_text() for text in training_figure([trained]).axes[1].get_legend().get_texts()]
    assert labels == ["run (BLEU)"] + [f"run {d}" for d in DIRECTIONS]
    assert plot_training([trained], tmp_path / "plot.png").stat().st_size > 0


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Path:
    from conftest import train_tiny

    return train_tiny(data_dir, tmp_path_factory.mktemp("ml-run") / "run",
                      {"arch": "transformer", "embed_dim": 32, "enc_layers": 1, "dec_layers": 1, "heads": 2, "ff_dim": 64},
                      max_steps=120, valid_every=120)


def test_resume_compares_the_sampling_temperature_in_use(trained, data_dir, tmp_path):
    import shutil

    from nmt.checkpoint import read_config
    from nmt.errors import ConfigError
    from nmt.train import train

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = read_config(run)
    assert config.train.lang_temperature == Manifest.read(data_dir).lang_temperature  # saved as used
    config.save_dir, config.train.max_steps = str(run), 122
    train(dataclasses.replace(config, train=dataclasses.replace(config.train, lang_temperature=0.0)),
          resume=True, progress=False)  # 0: the data dir's, the same
    config.train.max_steps, config.train.lang_temperature = 124, 3.0
    with pytest.raises(ConfigError, match="lang_temperature is 3.0"):
        train(config, resume=True, progress=False)


def test_translate_needs_a_target_language_the_model_knows(trained):
    result = runner.invoke(app, ["translate", str(trained)], input="w1 w2\n")
    assert_one_line_error(result, "multilingual", "--tgt-lang", "aa, bb, cc")
    result = runner.invoke(app, ["translate", str(trained), "--tgt-lang", "fr"], input="w1 w2\n")
    assert_one_line_error(result, "'fr'", "aa, bb, cc")
    result = runner.invoke(app, ["translate", str(trained), "--tgt-lang", "bb"], input="w1 w2\n\nw3\n")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 3


def test_the_tag_picks_the_target_language(trained):
    from nmt.translate import LanguageChoice, load_translator

    lines = ["w1 w2 w3", "w4 w5"]
    into_bb = load_translator([trained], {"beam": 1}, languages=LanguageChoice("bb")).translate(lines)
    into_cc = load_translator([trained], {"beam": 1}, languages=LanguageChoice("cc")).translate(lines)
    # bb's words are V0..V11 and cc's z0q..z11q: each output is all in its tag's language.
    assert all(words and all(w.startswith("V") for w in words) for words in (t[0].split() for t in into_bb.texts))
    assert all(words and all(w.startswith("z") for w in words) for words in (t[0].split() for t in into_cc.texts))


def test_attention_maps_cover_the_input_not_the_language_tag(trained):
    """Alignments and heat-maps index the input's own pieces: the tag the model reads first is
    left out, so that the first word is position 0."""
    from nmt.models.attention import AttentionChoice
    from nmt.translate import LanguageChoice, load_translator

    translator = load_translator([trained], {"beam": 2}, languages=LanguageChoice("bb"))
    lines = ["w1 w2 w3", "w4 w5"]
    translations = translator.translate(lines, attention=AttentionChoice())
    for line, attention_map in zip(lines, translations.attention_maps):
        pieces = translator.tokenizer.src_pieces(translator.tokenizer.encode_src([line])[0])
        assert pieces[0] == language_tag("bb")
        assert attention_map.source[:-1] == pieces[1:] and attention_map.source[-1] != language_tag("bb")
        assert attention_map.weights.shape == (len(attention_map.output), len(pieces))  # the input's pieces and EOS


def test_pivot_translates_through_the_pivot_language(trained, tmp_path):
    from nmt.translate import LanguageChoice, load_translator

    lines = ["V1 V2 V3", "V4 V5"]
    into_aa = load_translator([trained], {"beam": 2}, languages=LanguageChoice("aa")).translate(lines)
    middle = [texts[0] for texts in into_aa.texts]
    direct = load_translator([trained], {"beam": 2}, languages=LanguageChoice("cc")).translate(middle)
    source = tmp_path / "in.bb"
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    result = runner.invoke(app, ["translate", str(trained), "-i", str(source), "--tgt-lang", "cc", "--pivot", "aa",
                                 "--beam", "2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [texts[0] for texts in direct.texts]
    result = runner.invoke(app, ["translate", str(trained), "-i", str(source), "--tgt-lang", "cc", "--pivot", "cc"])
    assert_one_line_error(result, "--pivot cc")


def test_evaluate_scores_each_direction_of_a_multilingual_data_dir(trained, data_dir, tmp_path):
    # No language identifier knows the toy languages: refused before anything is translated
    refused = runner.invoke(app, ["evaluate", "--model", str(trained), "--data", str(data_dir), "--beam", "1",
                                  "--hyp-dir", str(tmp_path / "hyps"), "--off-target"])
    assert_one_line_error(refused, "--off-target: py3langid does not know the language")
    assert not list((tmp_path / "hyps").glob("*.hyp"))
    result = runner.invoke(app, ["evaluate", "--model", str(trained), "--data", str(data_dir), "--json", "--beam", "1",
                                 "--hyp-dir", str(tmp_path / "hyps")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    directions = {r["direction"]: r for r in report["directions"]}
    assert list(directions) == DIRECTIONS + ["bb-cc"]
    assert directions["bb-cc"]["zero_shot"] and not directions["aa-bb"]["zero_shot"]
    assert set(report["mean"]) == {"trained", "zero-shot"}
    assert report["mean"]["zero-shot"]["bleu"] == pytest.approx(directions["bb-cc"]["scores"][0]["score"], abs=0.01)
    hyps = list(read_lines(tmp_path / "hyps" / "test.bb-cc.hyp"))
    assert len(hyps) == 10
    assert all(r["off_target_percent"] is None for r in directions.values())  # not asked for
    assert_one_line_error(runner.invoke(app, ["evaluate", "--model", str(trained), "--data", str(data_dir),
                                              "--directions", ","]), "--directions names no direction")
    result = runner.invoke(app, ["evaluate", "--model", str(trained), "--data", str(data_dir), "--directions", "cc-aa"])
    assert_one_line_error(result, "cc-aa", "aa-bb")
    # Through a pivot: by default the directions without it; one with it is refused before translating.
    pivoted = ["evaluate", "--model", str(trained), "--data", str(data_dir), "--json", "--beam", "1", "--pivot", "aa"]
    result = runner.invoke(app, pivoted)
    assert result.exit_code == 0, result.output
    assert [r["direction"] for r in json.loads(result.stdout)["directions"]] == ["bb-cc"]
    second = runner.invoke(app, [*pivoted, "--pivot-model", str(trained)])  # named for the second step: the same
    assert second.exit_code == 0 and json.loads(second.stdout) == json.loads(result.stdout), second.output
    assert_one_line_error(runner.invoke(app, [*pivoted[:-2], "--pivot-model", str(trained)]), "--pivot-model goes with --pivot")
    assert_one_line_error(runner.invoke(app, [*pivoted, "--directions", "bb-cc,aa-bb"]), "--pivot aa", "bb-cc")
    table = runner.invoke(app, ["evaluate", "--model", str(trained), "--data", str(data_dir), "--beam", "1",
                                "--directions", "aa-bb,bb-aa"])
    assert table.exit_code == 0, table.output
    labelled = [line.split(":")[0] for line in table.stdout.splitlines() if "signature" in line]
    assert labelled == ["bleu signature", "chrf signature", "ter signature"]  # one per metric, named



def test_evaluate_scores_each_direction_with_its_target_languages_tokenizer(tmp_path):
    from conftest import TINY_TRANSFORMER, train_tiny

    from nmt.evaluate import evaluate_directions

    data = prepare_with_chinese(tmp_path)
    model = train_tiny(data, tmp_path / "run", TINY_TRANSFORMER, max_steps=2, valid_every=2)
    signatures = {r.direction: r.scores[0].signature for r in evaluate_directions([model], data, metrics=("bleu",))}
    assert "tok:zh" in signatures["aa-zh"] and "tok:13a" in signatures["aa-bb"], signatures


def test_evaluate_marks_zero_shot_what_the_model_was_not_trained_on(trained, tmp_path):
    """Scored on a data dir made for another run, where a direction this model learned is zero-shot."""
    other = prepare_three_way(tmp_path, directions=["aa-bb", "bb-aa"], zero_shot=("aa-cc", "bb-cc"))
    result = runner.invoke(app, ["evaluate", "--model", str(trained), "--data", str(other), "--json", "--beam", "1"])
    assert result.exit_code == 0, result.output
    zero_shot = {r["direction"]: r["zero_shot"] for r in json.loads(result.stdout)["directions"]}
    assert zero_shot == {"aa-bb": False, "bb-aa": False, "aa-cc": False, "bb-cc": True}


def test_evaluate_translates_a_source_file_from_and_into_the_named_languages(trained, tmp_path):
    source, reference = tmp_path / "in.aa", tmp_path / "ref.bb"
    source.write_text("w1 w2\nw3\n", encoding="utf-8")
    reference.write_text("v1 v2\nv3\n", encoding="utf-8")
    args = ["evaluate", "--model", str(trained), "--src", str(source), "--ref", str(reference), "--tgt-lang", "bb"]
    result = runner.invoke(app, args + ["--src-lang", "aa", "--json"])
    assert result.exit_code == 0, result.output
    assert [s["metric"] for s in json.loads(result.stdout)] == ["bleu", "chrf", "ter"]
    assert_one_line_error(runner.invoke(app, args + ["--src-lang", "zz"]), "does not know the language 'zz'")
    assert runner.invoke(app, [*args[:-1], "BB", "--src-lang", "Aa", "--json"]).stdout == result.stdout  # codes as spelled
    assert_one_line_error(runner.invoke(app, ["evaluate", "--hyp", str(source), "--ref", str(reference), "--src-lang", "aa"]),
                          "--src-lang go with --src")

def test_off_target_counts_lines_in_another_language():
    from nmt.evaluate import off_target_percent

    lines = ["Ein Mann fährt mit dem Fahrrad die Straße entlang.", "A man rides his bicycle down the street.",
             "Un homme descend la rue à vélo.", ""]
    assert off_target_percent(lines, "de", ["de", "en", "fr"]) == pytest.approx(200 / 3, abs=0.01)
    assert off_target_percent(lines[:1], "de", ["de", "en", "fr"]) == 0.0
    # Regional and ISO 639-3 codes are the identifier's zh; a language it does not know leaves the rate unknown.
    chinese = ["我们走吧。", "你好，世界！"]
    for code in ("zh_TW", "cmn", "zh"):
        assert off_target_percent(chinese, "en", ["en", code]) == 100.0
    assert off_target_percent(chinese, "cmn", ["en", "cmn"]) == 0.0
    assert off_target_percent(lines, "de", ["de", "xx"]) is None


def test_a_datasets_corpus_trains_its_directions_and_prefixes_give_the_zero_shot_ones(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    corpus = write_three_way(tmp_path / "corpus")
    folder = tmp_path / "hub_copy"
    folder.mkdir()
    for split, seed, count in (("train", 1, 300), ("validation", 2, 12), ("test", 3, 10)):
        rows = three_way(count, seed)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(dict(zip(("aa", "bb", "cc"), r))) + "\n" for r in rows))
    args = ["prepare", "--hf", str(folder), "--directions", "aa-bb,aa-cc", "--vocab-size", "60", "--no-progress",
            "--out", str(tmp_path / "data")]
    result = runner.invoke(app, [*args, "--zero-shot", "bb-cc", "--valid", str(corpus / "valid"), "--test", str(corpus / "test")])
    assert result.exit_code == 0, result.output
    manifest = Manifest.read(tmp_path / "data")
    assert manifest.directions == ["aa-bb", "aa-cc"] and manifest.zero_shot == ["bb-cc"]
    assert manifest.direction_counts["bb-cc"]["test"]["pairs"] == 10 and manifest.direction_counts["aa-cc"]["train"]["pairs"] > 250
    result = runner.invoke(app, [*args, "--valid", str(corpus / "valid"), "--overwrite"])  # no zero-shot direction to read
    assert_one_line_error(result, "the corpus's", "--zero-shot")


def test_prepare_directions_errors_are_one_line(tmp_path):
    corpus = write_three_way(tmp_path / "corpus")
    common = ["prepare", "--train", str(corpus / "train"), "--out", str(tmp_path / "out"), "--no-progress"]
    result = runner.invoke(app, [*common, "--directions", "aa-bb", "--src", "aa", "--tgt", "bb"])
    assert_one_line_error(result, "--directions", "--src")
    result = runner.invoke(app, [*common, "--directions", "aa-bb", "--zero-shot", "bb-cc"])
    assert_one_line_error(result, "--zero-shot", "--valid")
    result = runner.invoke(app, [*common, "--directions", "aa-bb", "--tsv", "a.tsv", "--tsv", "b.tsv", "--tsv", "c.tsv"])
    assert_one_line_error(result, "3 --tsv", "1 directions")
    result = runner.invoke(app, [*common, "--directions", "aa-bb,bb-cc", "--zero-shot", "bb-cc"])
    assert_one_line_error(result, "bb-cc", "zero-shot direction is one not trained on")
    result = runner.invoke(app, [*common, "--directions", "aa-xx"])
    assert_one_line_error(result, "train.xx")
    result = runner.invoke(app, [*common, "--directions", "aa-bb", "--separate-vocab"])
    assert_one_line_error(result, "one joint vocabulary")
    result = runner.invoke(app, [*common, "--directions", "aa-bb,aa-cc", "--split-by", "bb"])
    assert_one_line_error(result, "--split-by bb: not a language of aa-cc")
    result = runner.invoke(app, ["prepare", "--tsv", "a.tsv", "--tsv-langs", "aa,bb", "--directions", "aa-bb",
                                 "--zero-shot", "bb-cc", "--valid", "v", "--test", "t", "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "--zero-shot", "--tsv")
    for temperature in ("nan", "1e-9"):
        result = runner.invoke(app, [*common, "--directions", "aa-bb", "--lang-temperature", temperature])
        assert_one_line_error(result, "--lang-temperature must be between")
    for code in ("aa-b/b", "aa-b b", "aa-<2b>"):  # part of file names and tags
        assert_one_line_error(runner.invoke(app, [*common, "--directions", code]), "is not SRC-TGT")
    for sizes in (["--valid-size", "0"], ["--test-size", "-5"], ["--seed", "-1"]):
        result = runner.invoke(app, [*common, "--directions", "aa-bb", *sizes])
        assert_one_line_error(result, "must be")
    (corpus / "empty.aa").write_text("")
    (corpus / "empty.cc").write_text("")
    sets = ["--valid", str(corpus / "valid"), "--valid", str(corpus / "empty"), "--test", str(corpus / "test"),
            "--test", str(corpus / "test")]
    result = runner.invoke(app, [*common, "--directions", "aa-bb", "--zero-shot", "aa-cc", *sets])
    assert_one_line_error(result, "the given valid set of aa-cc", "has no lines")
    sets = ["--valid", str(corpus / "valid"), "--test", str(corpus / "test"), "--vocab-size", "40"]
    result = runner.invoke(app, ["prepare", "--train", str(corpus / "train"), "--out", str(tmp_path / "unsampled"),
                                 "--no-progress", "--directions", "aa-bb", "--zero-shot", "aa-cc", *sets])
    assert result.exit_code == 0 and "warning: cc only in --zero-shot directions" in result.output, result.output
    manifest = Manifest.read(tmp_path / "unsampled")
    for direction, counts in manifest.direction_counts.items():  # each split of each direction
        line = ", ".join(f"{counts[split]['pairs']} {split}" for split in ("train", "valid", "test") if split in counts)
        assert f"{direction}: {line}" in result.output and ("train" in counts) == (direction == "aa-bb")
    given_model = dataclasses.replace(manifest, input={**manifest.input, "spm_sample": {}})
    assert prepare_warnings(given_model) == []  # a given SentencePiece model: no sample that could leave a language out
    tsv = ["prepare", "--tsv", "a.tsv", "--tsv-langs", "aa,bb", "--out", str(tmp_path / "out"), "--no-progress"]
    result = runner.invoke(app, [*tsv, "--directions", "aa-bb", "--zero-shot", "bb-aa"])
    assert_one_line_error(result, "--zero-shot", "--tsv")
    assert not (tmp_path / "out").exists()


def test_one_tsv_per_direction(tmp_path):
    rows = three_way(120, 1)
    ab, ac = tmp_path / "ab.tsv", tmp_path / "ac.tsv"
    ab.write_text("".join(f"{a}\t{b}\n" for a, b, _ in rows), encoding="utf-8")
    ac.write_text("".join(f"{a}\t{c}\n" for a, _, c in rows[:60]), encoding="utf-8")
    result = runner.invoke(app, ["prepare", "--directions", "aa-bb,aa-cc", "--tsv", str(ab), "--tsv", str(ac),
                                 "--valid-size", "5", "--test-size", "5", "--vocab-size", "60",
                                 "--out", str(tmp_path / "data"), "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = Manifest.read(tmp_path / "data")
    for d, read in (("aa-bb", 120), ("aa-cc", 60)):
        cleaning = manifest.direction_cleaning[d]
        assert cleaning["pairs_read"] == read
        assert manifest.direction_counts[d]["train"]["pairs"] == read - 10 - cleaning["sharing_held_out_sentence"]
    assert "aa-cc: " in result.output and "aa-bb: " in result.output
    assert list(read_lines(tmp_path / "data" / "test.aa-cc.tgt.txt"))[0].startswith("z")
    # Each direction carves its own held-out pairs; none of their sentences is trained on elsewhere.
    data = tmp_path / "data"
    train, tokenizer = ParallelSplit.load(data, "train"), Tokenizer(data / "spm.joint.model", data / "spm.joint.model")
    trained_aa = {tuple(train.src[i][1:].tolist()) for i in range(len(train))}
    for d in ("aa-bb", "aa-cc"):
        held = [ids for split in ("valid", "test") for ids in tokenizer.encode_src(list(read_lines(data / f"{split}.{d}.src.txt")))]
        assert not {tuple(ids) for ids in held} & trained_aa
    assert manifest.direction_cleaning["aa-bb"]["sharing_held_out_sentence"] > 0
    result = runner.invoke(app, ["prepare", "--directions", "aa-bb,aa-cc", "--tsv", str(ab), "--tsv", str(ac),
                                 "--tsv-langs", "bb,aa", "--out", str(tmp_path / "swapped")])
    assert_one_line_error(result, "1 --tsv-langs for 2 --tsv inputs", "one --tsv-langs per --tsv")
    # Columns named per TSV: directions against a file's order (bb-aa from an aa-first file) read right.
    result = runner.invoke(app, ["prepare", "--directions", "bb-aa,cc-aa", "--tsv", str(ab), "--tsv", str(ac),
                                 "--tsv-langs", "aa,bb", "--tsv-langs", "aa,cc", "--valid-size", "5", "--test-size", "5",
                                 "--vocab-size", "60", "--out", str(tmp_path / "named"), "--no-progress"])
    assert result.exit_code == 0, result.output
    for d in ("bb-aa", "cc-aa"):
        sources = list(read_lines(tmp_path / "named" / f"test.{d}.src.txt"))
        targets = list(read_lines(tmp_path / "named" / f"test.{d}.tgt.txt"))
        assert all(line[0] != "w" for line in sources) and all(line.startswith("w") for line in targets)


def test_one_tsv_for_several_directions_names_its_columns(tmp_path):
    rows = three_way(120, 1)
    tsv = tmp_path / "ab.tsv"
    tsv.write_text("".join(f"{a}\t{b}\n" for a, b, _ in rows), encoding="utf-8")
    args = ["prepare", "--directions", "aa-bb,bb-aa", "--tsv", str(tsv), "--valid-size", "5", "--test-size", "5",
            "--vocab-size", "60", "--no-progress"]
    assert_one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path / "x")]), "--tsv-langs")
    result = runner.invoke(app, [*args, "--tsv-langs", "aa,bb", "--out", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    for d, first_word in (("aa-bb", "w"), ("bb-aa", "V")):
        assert all(line.startswith(first_word) for line in read_lines(tmp_path / "data" / f"test.{d}.src.txt"))


def test_serve_offers_each_trained_direction_of_a_multilingual_model(trained):
    from fastapi.testclient import TestClient

    from nmt.serve import load_served_models
    from nmt.serve.api import create_app
    from nmt.translate import LanguageChoice, load_translator

    models = load_served_models([trained], {"beam": 1})
    assert [(m.source, m.target) for m in models] == [tuple(d.split("-")) for d in DIRECTIONS]
    assert len({id(m.translator.model) for m in models}) == 1  # one model loaded, shared by the directions
    with TestClient(create_app(models)) as client:
        languages = {lang["code"]: lang["targets"] for lang in client.get("/languages").json()}
        assert sorted(languages["aa"]) == ["bb", "cc"] and languages["bb"] == ["aa"]
        for src, tgt in (("aa", "bb"), ("aa", "cc")):
            answer = client.post("/translate", json={"q": "w1 w2 w3", "source": src, "target": tgt}).json()
            expected = load_translator([trained], {"beam": 1}, languages=LanguageChoice(tgt)).translate(["w1 w2 w3"])
            assert answer["translatedText"] == expected.texts[0][0]
        assert client.post("/translate", json={"q": "V1", "source": "bb", "target": "cc"}).status_code == 400


def test_a_ctranslate2_export_keeps_the_tags(trained, tmp_path):
    from nmt.export import export_model
    from nmt.translate import LanguageChoice, load_text_translator

    export_model(trained, tmp_path / "ct2")
    lines = ["w1 w2 w3", "w4 w5 w6 w7"]
    for tgt in ("bb", "cc"):
        ours = load_text_translator([trained], {"beam": 1}, languages=LanguageChoice(tgt)).translate(lines)
        theirs = load_text_translator([tmp_path / "ct2"], {"beam": 1}, engine="ctranslate2",
                                      languages=LanguageChoice(tgt)).translate(lines)
        assert theirs.texts == ours.texts
    result = runner.invoke(app, ["translate", str(tmp_path / "ct2"), "--engine", "ctranslate2"], input="w1\n")
    assert_one_line_error(result, "--tgt-lang")


def test_each_direction_may_have_files_of_its_own(tmp_path):
    """Corpora per pair (as downloads come), a small one among them; valid/test per direction,
    the zero-shot direction's last."""
    big, small = write_three_way(tmp_path / "big"), write_three_way(tmp_path / "small", train=40)
    args = ["prepare", "--directions", "aa-bb,aa-cc", "--zero-shot", "bb-cc", "--vocab-size", "60",
            "--train", str(big / "train"), "--train", str(small / "train"),
            "--valid", str(big / "valid"), "--valid", str(small / "valid"), "--valid", str(big / "valid"),
            "--test", str(big / "test"), "--out", str(tmp_path / "data"), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = Manifest.read(tmp_path / "data")
    assert manifest.direction_cleaning["aa-bb"]["pairs_read"] == 300
    assert manifest.direction_cleaning["aa-cc"]["pairs_read"] == 40
    assert list(read_lines(tmp_path / "data" / "valid.aa-cc.src.txt")) == list(read_lines(small / "valid.aa"))
    assert list(read_lines(tmp_path / "data" / "valid.bb-cc.src.txt")) == list(read_lines(big / "valid.bb"))
    result = runner.invoke(app, [*args[:-3], "--valid", str(big / "valid"), "--out", str(tmp_path / "data2"), "--no-progress"])
    assert_one_line_error(result, "4 --valid", "2 directions and 1 zero-shot")


def test_evaluate_asks_the_language_identifier_about_each_directions_output(trained, data_dir, monkeypatch):
    import nmt.evaluate

    asked = []

    def identify(lines, lang, candidates):
        asked.append((len(lines), lang, tuple(candidates)))
        return 12.5

    monkeypatch.setattr(nmt.evaluate, "off_target_percent", identify)
    monkeypatch.setattr(nmt.evaluate, "check_identifiable", lambda codes: None)  # it knows no toy language
    results = nmt.evaluate.evaluate_directions([trained], data_dir, "test", ["aa-bb", "bb-cc"], {"beam": 1}, off_target=True)
    assert asked == [(10, "bb", ("aa", "bb", "cc")), (10, "cc", ("aa", "bb", "cc"))]
    assert [r.off_target for r in results] == [12.5, 12.5]


def test_every_direction_is_checked_before_the_first_is_translated(trained, data_dir, tmp_path, monkeypatch):
    """A direction the model cannot translate as asked (here: restricted to pieces it never
    recorded for cc) stops the run before the directions ahead of it are translated."""
    import nmt.translate
    from nmt.errors import ConfigError
    from nmt.evaluate import evaluate_directions

    model = tmp_path / "model"
    shutil.copytree(trained, model)
    info = VocabInfo.read(model)
    del info.target_pieces["cc"]
    info.write(model)
    monkeypatch.setattr(nmt.translate, "translate_file", lambda *args, **kwargs: pytest.fail("translated"))
    with pytest.raises(ConfigError, match="never translated into cc"):
        evaluate_directions([model], data_dir, "test", ["aa-bb", "aa-cc"], {"beam": 1, "restrict_vocab": True})
    with pytest.raises(ConfigError, match="both aa: nothing to translate"):
        nmt.translate.check_language_choices([trained], None, [("aa", "aa")], None, None)


def test_a_bilingual_model_refuses_other_languages(trained, tmp_path):
    from conftest import TINY_TRANSFORMER, prepare_toy_data, train_tiny

    bilingual = train_tiny(prepare_toy_data(tmp_path, 40), tmp_path / "run", TINY_TRANSFORMER, max_steps=2, valid_every=2)
    result = runner.invoke(app, ["translate", str(bilingual), "--tgt-lang", "fr"], input="w1\n")
    assert_one_line_error(result, "translates into yy only")
    result = runner.invoke(app, ["translate", str(bilingual), "--tgt-lang", "yy", "--src-lang", "xx"], input="w1\n")
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["translate", str(bilingual), "--pivot", "zz"], input="w1\n")
    assert_one_line_error(result, "--pivot needs a multilingual model")
    assert_one_line_error(runner.invoke(app, ["translate", str(trained), "--tgt-lang", "bb", "--pivot", ""], input="w1\n"),
                          "--pivot names no language")
    from nmt.translate import check_language_choices

    check_language_choices([trained], None, [("aa", "cc")], "bb", None)  # the same model both ways: it knows bb -> cc
    with pytest.raises(ConfigError, match="translates into yy only"):  # a second model for the second step: it does not
        check_language_choices([trained], [bilingual], [("aa", "cc")], "bb", None)


def test_a_model_records_the_pieces_of_each_target_language(trained, data_dir):
    from nmt.files import VocabInfo
    from nmt.tokenizer import EOS

    manifest, info = Manifest.read(data_dir), VocabInfo.read(trained)
    train = ParallelSplit.load(data_dir, "train")
    used: dict[str, set[int]] = {}
    start = 0
    for direction in DIRECTIONS:
        count = manifest.direction_counts[direction]["train"]["pairs"]
        target = used.setdefault(direction.split("-")[1], set())
        for i in range(start, start + count):
            target.update(train.tgt[i].tolist())
        start += count
    assert sorted(info.target_pieces) == ["aa", "bb", "cc"]
    for lang, pieces in used.items():
        assert set(np.flatnonzero(info.target_piece_mask(lang)).tolist()) == pieces | {EOS}
    assert used["bb"] - used["cc"] and used["cc"] - used["bb"]  # each language has pieces of its own


def test_a_language_keeps_only_the_pieces_that_are_not_stray_in_its_targets():
    from types import SimpleNamespace

    from nmt.files import unpack_pieces
    from nmt.multilingual import target_pieces
    from nmt.tokenizer import EOS

    # aa-bb targets: 99,990 of piece 10, 5 of piece 11 (the least kept), 3 of 12 and 2 of 14 (stray);
    # bb-aa: 3 of piece 13
    sentences = [[10] * 9999 for _ in range(10)] + [[11] * 5 + [12] * 3 + [14] * 2] + [[13, 13, 13]]
    tokens = np.array([t for s in sentences for t in s], dtype=np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sentences])])
    tgt = SimpleNamespace(tokens=tokens, offsets=offsets)
    masks = target_pieces(tgt, ["aa-bb", "bb-aa"], [11, 1], 20, min_share=5e-5)  # bb: at least 5 of 100,000
    assert np.flatnonzero(unpack_pieces(masks["bb"], 20)).tolist() == sorted([EOS, 10, 11])
    assert np.flatnonzero(unpack_pieces(masks["aa"], 20)).tolist() == sorted([EOS, 13])  # 3 pieces: each counts


def test_restrict_vocab_keeps_the_output_to_the_allowed_pieces(trained):
    """Zero-shot bb→cc drifts into the trained directions' words; restricted, every token is
    cc's, in greedy and beam search and sampling. Greedy output that keeps to cc's pieces
    anyway is unchanged."""
    from nmt.files import VocabInfo
    from nmt.translate import LanguageChoice, load_translator

    lines = ["V1 V2 V3", "V4 V5", "V7 V1 V9 V2", "V3"]
    allowed = VocabInfo.read(trained).target_piece_mask("cc")
    for options in ({"beam": 1}, {"beam": 3, "nbest": 3}, {"sampling": True, "nbest": 4, "seed": 3}):
        restricted = load_translator([trained], {**options, "restrict_vocab": True}, languages=LanguageChoice("cc"))
        result = restricted.translate(lines)
        assert all(allowed[h.tokens].all() for nbest in result.hypotheses for h in nbest), options
    free = load_translator([trained], {"beam": 1}, languages=LanguageChoice("cc")).translate(lines + ["w1 w2 w3"])
    restricted = load_translator([trained], {"beam": 1, "restrict_vocab": True}, languages=LanguageChoice("cc"))
    for line, nbest, text in zip(lines + ["w1 w2 w3"], free.hypotheses, free.texts):
        if allowed[nbest[0].tokens].all():
            assert restricted.translate([line]).texts[0] == text


def test_step_rules_ban_the_tokens_not_allowed_but_keep_a_forced_prefix():
    import torch

    from nmt.search import StepRules

    log_probs = torch.log_softmax(torch.randn(2, 6), dim=-1)
    allowed = torch.tensor([False, False, True, True, False, True])
    out = StepRules(banned=StepRules.banning(allowed)).apply(log_probs.clone(), torch.zeros(2, 0, dtype=torch.long), torch.arange(2))
    assert torch.isinf(out[:, ~allowed]).all() and torch.equal(out[:, allowed], log_probs[:, allowed])
    prefix = torch.tensor([[4], [0]])  # row 0 must start with token 4, which is not allowed; row 1 has no prefix
    out = StepRules(prefix=prefix, banned=StepRules.banning(allowed)).apply(log_probs.clone(), torch.zeros(2, 0, dtype=torch.long), torch.arange(2))
    assert out[0, 4] == log_probs[0, 4] and torch.isinf(out[0, torch.arange(6) != 4]).all()
    assert torch.equal(out[1, allowed], log_probs[1, allowed]) and torch.isinf(out[1, ~allowed]).all()


def test_restrict_vocab_errors_are_one_line(trained, tmp_path):
    import shutil

    from conftest import TINY_TRANSFORMER, prepare_toy_data, train_tiny

    from nmt.files import VocabInfo

    bilingual = train_tiny(prepare_toy_data(tmp_path, 40), tmp_path / "run", TINY_TRANSFORMER, max_steps=2, valid_every=2)
    result = runner.invoke(app, ["translate", str(bilingual), "--restrict-vocab"], input="w1\n")
    assert_one_line_error(result, "multilingual models")
    older = tmp_path / "older"
    shutil.copytree(trained, older)
    info = VocabInfo.read(older)
    info.target_pieces = {}
    info.write(older)
    result = runner.invoke(app, ["translate", str(older), "--tgt-lang", "cc", "--restrict-vocab"], input="V1\n")
    assert_one_line_error(result, "trained before", "--restrict-vocab")
    result = runner.invoke(app, ["translate", str(older), "--tgt-lang", "cc"], input="V1\n")
    assert result.exit_code == 0, result.output  # without the option, an older model translates as before
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("a\n", encoding="utf-8")
    result = runner.invoke(app, ["evaluate", "--hyp", str(hyp), "--ref", str(hyp), "--restrict-vocab"])
    assert_one_line_error(result, "--restrict-vocab goes with")


def test_a_ctranslate2_export_restricts_the_output_as_nmt_does(trained, tmp_path):
    from nmt.export import export_model
    from nmt.translate import LanguageChoice, load_text_translator

    export_model(trained, tmp_path / "ct2")
    lines = ["V1 V2 V3", "V4 V5", "V7 V1 V9 V2"]
    options = {"beam": 1, "restrict_vocab": True}
    ours = load_text_translator([trained], options, languages=LanguageChoice("cc")).translate(lines)
    theirs = load_text_translator([tmp_path / "ct2"], options, engine="ctranslate2",
                                  languages=LanguageChoice("cc")).translate(lines)
    assert theirs.texts == ours.texts


RECIPE_RUN = Path(__file__).resolve().parents[1] / "recipes" / "multi30k-multilingual" / "run.sh"


@pytest.mark.parametrize("kind, other", [("cpu", "gpu"), ("gpu", "cpu")])
def test_the_recipe_gives_cpu_and_gpu_runs_work_dirs_of_their_own(tmp_path, kind, other):
    """Both kinds would write their scores to the same WORK/*.json: the second one refuses to start."""
    (tmp_path / other).mkdir()
    result = subprocess.run(["bash", str(RECIPE_RUN), kind, str(tmp_path), str(tmp_path / "no-multi30k")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and f"holds a {other} run" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [other]


def test_the_manifests_valid_and_test_totals_are_the_trained_directions(tmp_path):
    from nmt.files import Manifest

    manifest = Manifest.read(prepare_three_way(tmp_path))
    for split in ("valid", "test"):
        trained = sum(manifest.direction_counts[d][split]["pairs"] for d in manifest.directions)
        assert manifest.counts[split]["pairs"] == trained
        assert manifest.direction_counts["bb-cc"][split]["pairs"] > 0  # the zero-shot one has its own


def test_the_mean_of_each_metric_is_over_that_metric():
    from nmt.evaluate import DirectionReport, DirectionScores, Score

    def scores(bleu, chrf):
        return [Score("bleu", bleu, "", ""), Score("chrf", chrf, "", "")]

    report = DirectionReport([DirectionScores("aa-bb", scores(10.0, 40.0)), DirectionScores("bb-aa", scores(20.0, 60.0)),
                              DirectionScores("bb-cc", scores(1.0, 30.0), zero_shot=True)])
    assert report.means() == {"trained": {"bleu": 15.0, "chrf": 50.0}, "zero-shot": {"bleu": 1.0, "chrf": 30.0}}
