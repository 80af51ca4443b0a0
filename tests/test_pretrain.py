"""Masked-LM pretraining: masking and sentence-pair statistics, the shared training loop,
fill-mask, and starting translation models from a pretrained encoder (--init)."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import assert_one_line_error, toy_pairs, write_pairs
from nmt_cli.main import app
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from nmt.checkpoint import check_pretrained, load_pretrained
from nmt.config import Config, ModelConfig, PretrainConfig, TrainConfig
from nmt.errors import CheckpointError, DataError
from nmt.files import Manifest
from nmt.models import build_model
from nmt.models.masked_lm import MaskedLM, translation_weight_source
from nmt.pretrain import (
    Examples,
    MonoCorpus,
    build_masked_batch,
    evaluate_masked_lm,
    fill_mask,
    load_masked_lm,
    mask_tokens,
    masked_lm_loss,
    pretrain,
    sentence_pairs,
)
from nmt.tokenizer import CLS, FIRST_REGULAR_ID, MASK, PAD, SEP, load_sentencepiece, train_sentencepiece

runner = CliRunner()
TINY_MODEL = dict(embed_dim=32, ff_dim=64, heads=2, enc_layers=2, dec_layers=2, dropout=0.0, share_embeddings=True)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# Masking and sentence pairs


def test_masking_statistics_on_a_large_batch():
    rng = np.random.default_rng(0)
    vocab = 1000
    tokens = rng.integers(0, vocab, size=(400, 250))  # specials (ids < 7) included at random
    tokens[:, 200:] = PAD  # and a padded tail
    inputs, targets = mask_tokens(tokens, rng, PretrainConfig(), vocab)
    eligible = tokens >= FIRST_REGULAR_ID
    chosen = targets != PAD
    assert not (chosen & ~eligible).any()  # never padding or a special symbol
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.01
    masked = (inputs[chosen] == MASK).mean()
    kept = (inputs[chosen] == tokens[chosen]).mean()
    replaced = 1.0 - masked - kept
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(replaced - 0.1) < 0.02
    assert (inputs[chosen & (inputs != MASK)] >= FIRST_REGULAR_ID).all()  # random tokens are regular ones
    assert (inputs[~chosen] == tokens[~chosen]).all()  # positions not chosen are untouched
    assert (targets[chosen] == tokens[chosen]).all()


def test_masking_respects_configured_fractions():
    rng = np.random.default_rng(1)
    tokens = rng.integers(FIRST_REGULAR_ID, 500, size=(300, 200))
    inputs, targets = mask_tokens(tokens, rng, PretrainConfig(mask_prob=0.3, mask_token_prob=1.0, random_token_prob=0.0), 500)
    chosen = targets != PAD
    assert abs(chosen.mean() - 0.3) < 0.01
    assert (inputs[chosen] == MASK).all()


def test_loss_counts_only_the_chosen_positions():
    torch.manual_seed(0)
    model = MaskedLM(ModelConfig(**TINY_MODEL), 60).eval()
    corpus = _corpus([[7 + (i * j) % 50 for j in range(3 + i % 5)] for i in range(12)], [0] * 12)
    batch = build_masked_batch(corpus, Examples(np.arange(12)), np.arange(12), PretrainConfig(mask_prob=0.3), 60,
                               np.random.default_rng(0))
    loss = masked_lm_loss(model, batch, 0.0)
    # The same from every position's logits, weighting the positions not chosen by zero.
    logits, _ = model(batch.tokens, None, None)  # (B*S, V)
    per_position = F.cross_entropy(logits, batch.targets.reshape(-1), ignore_index=PAD, reduction="none")
    weights = (batch.targets != PAD).reshape(-1).float()
    assert batch.num_tgt_tokens == int(weights.sum()) > 0
    assert torch.allclose(loss, (per_position * weights).sum(), rtol=1e-5)
    smoothed = F.cross_entropy(logits, batch.targets.reshape(-1), ignore_index=PAD, reduction="sum", label_smoothing=0.1)
    assert torch.allclose(masked_lm_loss(model, batch, 0.1), smoothed, rtol=1e-5) and not torch.allclose(smoothed, loss)


def _corpus(sentences: list[list[int]], documents: list[int]) -> MonoCorpus:
    lengths = [len(s) for s in sentences]
    return MonoCorpus(
        np.array([t for s in sentences for t in s], dtype=np.int64),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        np.array(documents, dtype=np.int64),
    )


def test_sentence_pairs_are_half_consecutive_and_negatives_from_other_documents():
    rng = np.random.default_rng(0)
    documents = np.repeat(np.arange(400), rng.integers(1, 12, size=400))  # documents of 1 to 11 lines
    corpus = _corpus([[7 + i % 90] for i in range(len(documents))], documents.tolist())
    a, b, labels = sentence_pairs(corpus, np.random.default_rng(1))
    assert abs(labels.mean() - 0.5) < 0.03
    positive, negative = labels == 1, labels == 0
    assert (b[positive] == a[positive] + 1).all()
    assert (documents[b[positive]] == documents[a[positive]]).all()
    assert (documents[b[negative]] != documents[a[negative]]).all()
    # A sentence is an A only where its document goes on after it.
    assert (documents[a + 1] == documents[a]).all()
    # A document of nearly every line: most first draws of a negative fall in it and are drawn again.
    crowded = _corpus([[7 + i % 90] for i in range(202)], [0] * 200 + [1, 1])
    for seed in range(5):
        a, b, labels = sentence_pairs(crowded, np.random.default_rng(seed))
        negative = labels == 0
        assert (crowded.documents[b[negative]] != crowded.documents[a[negative]]).all()


def test_sentence_pairs_need_two_documents():
    corpus = _corpus([[7], [8], [9]], [0, 0, 0])
    with pytest.raises(DataError, match="at least 2 documents"):
        sentence_pairs(corpus, np.random.default_rng(0))


def test_pair_batch_has_cls_sep_and_segments():
    corpus = _corpus([[10, 11], [12, 13, 14], [15]], [0, 0, 1])
    examples = Examples(np.array([0]), np.array([1]), np.array([1]))
    cfg = PretrainConfig(mask_prob=0.01)
    batch = build_masked_batch(corpus, examples, np.array([0]), cfg, 50, np.random.default_rng(0))
    targets = batch.targets[0]
    original = torch.where(targets != PAD, targets, batch.tokens[0])  # undo the masking
    assert original.tolist() == [5, 10, 11, 6, 12, 13, 14, 6]  # [CLS] A [SEP] B [SEP]
    assert batch.segments[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch.nsp_labels.tolist() == [1]


def test_documents_and_held_out_split(tmp_path):
    from nmt.monolingual import MonoPrepareConfig, prepare_mono

    text = tmp_path / "text.en"
    blocks = ["\n".join(f"sentence {d} {i}" for i in range(3)) for d in range(30)]
    text.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    (tmp_path / "more.en").write_text("another file\nstarts a document\n", encoding="utf-8")
    manifest = prepare_mono(MonoPrepareConfig(out_dir=tmp_path / "data", files=[text, tmp_path / "more.en"],
                                              valid_sentences=9, vocab_size=40))
    assert manifest.kind == "monolingual" and manifest.src_lang == "en"
    train, valid = MonoCorpus.load(tmp_path / "data", "train"), MonoCorpus.load(tmp_path / "data", "valid")
    assert len(train) + len(valid) == 92 and 7 <= len(valid) <= 9
    assert len(np.unique(np.concatenate([train.documents, valid.documents]))) == 31
    assert len(np.intersect1d(train.documents, valid.documents)) == 0  # whole documents held out
    for split, corpus in (("train", train), ("valid", valid)):  # each split counts its own documents
        assert manifest.counts[split]["documents"] == len(np.unique(corpus.documents))
    other = prepare_mono(MonoPrepareConfig(out_dir=tmp_path / "seed2", files=[text, tmp_path / "more.en"],
                                           valid_sentences=9, vocab_size=40, seed=2))
    assert set(MonoCorpus.load(tmp_path / "seed2", "valid").documents) != set(valid.documents)  # the seed picks them
    assert (manifest.split_seed, other.split_seed) == (1, 2)
    with pytest.raises(DataError, match="2 --mono files but 1 languages"):
        prepare_mono(MonoPrepareConfig(out_dir=tmp_path / "d", files=[text, tmp_path / "more.en"], langs=["en"]))
    for options in ({"valid_sentences": 0}, {"seed": -1}):
        with pytest.raises(DataError, match="--valid-size must be at least 1 and --seed 0 or more"):
            prepare_mono(MonoPrepareConfig(out_dir=tmp_path / "d", files=[text], **options))


def test_monolingual_sentencepiece_learns_from_a_sample_of_at_most_its_sentences(tmp_path, monkeypatch):
    import nmt.monolingual
    from nmt.monolingual import MonoPrepareConfig, prepare_mono

    sampled, train_sentencepiece = [], nmt.monolingual.train_sentencepiece

    def counting(sentences, *args, **options):
        sampled.append(list(sentences))
        return train_sentencepiece(sampled[-1], *args, **options)

    monkeypatch.setattr(nmt.monolingual, "train_sentencepiece", counting)
    text = tmp_path / "text.en"
    text.write_text("".join(f"sentence {i}\n" for i in range(300)), encoding="utf-8")
    prepare_mono(MonoPrepareConfig(out_dir=tmp_path / "data", files=[text], vocab_size=40, spm_max_sentences=120))
    assert len(sampled[0]) == len(set(sampled[0])) == 120


def test_held_out_split_stays_near_its_size_and_spans_documents():
    from nmt.monolingual import hold_out

    # One long document among short ones: it is never taken whole.
    documents = np.repeat(np.arange(20), [1500] + [10] * 19)
    for seed in range(6):
        assert 50 <= hold_out(documents, 100, seed).sum() <= 100
    # Documents each larger than the count: lines from many of them, so that next-sentence
    # prediction has documents to pair.
    documents = np.repeat(np.arange(25), 120)
    held = hold_out(documents, 100, 0)
    assert len(np.unique(documents[held])) >= 2 and held.sum() <= 150
    documents = np.repeat(np.arange(100), 60)  # no overshoot either
    assert 100 <= hold_out(documents, 100, 0).sum() <= 102
    # Two short documents that fit are not taken for the whole count: long ones give their share.
    documents = np.repeat(np.arange(32), [2000] * 30 + [3, 3])
    assert 900 <= hold_out(documents, 1000, 0).sum() <= 1100
    documents = np.repeat(np.arange(3), [3000, 40, 40])  # one text per language: each gives lines
    held = hold_out(documents, 300, 0)
    assert 250 <= held.sum() <= 320 and set(documents[held]) == {0, 1, 2}


# ---------------------------------------------------------------------------------------------
# Pretraining through the training loop


FACTS = [
    "the red fox jumps over the lazy dog",
    "a small bird sings in the green tree",
    "my old uncle drives a yellow taxi",
    "seven sailors cross the stormy sea",
    "the baker sells fresh bread every morning",
    "children play football in the park",
]


def _pretrain_config(save_dir: Path, **train) -> Config:
    settings = dict(batch_tokens=400, lr=3e-3, warmup_steps=20, label_smoothing=0.0, max_steps=300,
                    valid_every=100, log_every=50, seed=1, tensorboard=False)
    settings.update(train)
    return Config(
        save_dir=str(save_dir), model=ModelConfig(**{**TINY_MODEL, "embed_dim": 64, "ff_dim": 128}),
        train=TrainConfig(**settings), pretrain=PretrainConfig(mask_prob=0.25, valid_sentences=5),
    )


@pytest.fixture(scope="module")
def overfit_mlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm")
    (root / "facts.txt").write_text("\n".join(FACTS * 5) + "\n", encoding="utf-8")
    # Each word of FACTS one piece, whatever a SentencePiece version makes of so small a text alone.
    words = sorted(set(" ".join(FACTS).split()))
    vocab = train_sentencepiece(FACTS * 5 + words * 20, root / "spm", 100)
    result = pretrain(_pretrain_config(root / "mlm"), [root / "facts.txt"], vocab=vocab, progress=False)
    return root, result


@pytest.mark.slow
def test_tiny_masked_lm_overfits_and_fills_a_masked_word(overfit_mlm):
    root, result = overfit_mlm
    assert result.steps == 300
    valid = [json.loads(line) for line in (root / "mlm" / "train_log.jsonl").read_text().splitlines()]
    valid = [r for r in valid if r["type"] == "valid"]
    assert valid[-1]["loss"] < valid[0]["loss"] / 2 and valid[-1]["accuracy"] > 60
    model, processor = load_masked_lm(root / "mlm")
    # A word that occurs once and is one piece of the vocabulary: its sentence alone says what it is.
    words = " ".join(FACTS).split()
    sentence, word = next(
        (fact, w) for fact in FACTS for w in fact.split()
        if words.count(w) == 1 and len(processor.encode(" " + w)) == 1 and not fact.startswith(w)
    )
    filled = fill_mask(model, processor, sentence.replace(f" {word}", " [MASK]", 1), top_k=3)
    assert filled.text == sentence
    assert filled.masks[0].candidates[0][0] == word
    probabilities = [p for _, p in filled.masks[0].candidates]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001


def test_fill_mask_keeps_the_space_before_a_fill_that_does_not_start_a_word(overfit_mlm):
    root, _ = overfit_mlm
    _, processor = load_masked_lm(root / "mlm")
    size = processor.get_piece_size()
    inner = next(i for i in range(FIRST_REGULAR_ID, size) if processor.id_to_piece(i).isalpha())  # no "▁"

    class FavouringOnePiece:  # a masked LM sure of `inner`, and surer still of the special symbols
        next_sentence = False

        def __call__(self, tokens, segments, positions):
            logits = torch.zeros(len(positions), size)
            logits[:, inner], logits[:, :FIRST_REGULAR_ID] = 10.0, 20.0
            return logits, None

    filled = fill_mask(FavouringOnePiece(), processor, "the red [MASK] jumps", top_k=10 * size)
    assert filled.text == f"the red {processor.id_to_piece(inner)} jumps"
    assert len(filled.masks[0].candidates) == size - FIRST_REGULAR_ID  # never a special symbol
    assert filled.masks[0].candidates[0][0] == processor.id_to_piece(inner)
    filled = fill_mask(FavouringOnePiece(), processor, "[MASK] red fox", top_k=1)
    assert filled.text == f"{processor.id_to_piece(inner)} red fox"

    class SeeingTokens(FavouringOnePiece):
        def __call__(self, tokens, segments, positions):
            seen.extend(tokens[0].tolist())
            return super().__call__(tokens, segments, positions)

    seen = []  # [SEP] and [CLS] written in the text are their characters, as pretraining spelled them
    fill_mask(SeeingTokens(), processor, "the [SEP] red [CLS] [MASK]", top_k=1)
    assert SEP not in seen and CLS not in seen and seen.count(MASK) == 1


def test_pretrain_resume_matches_uninterrupted_run(tmp_path):
    (tmp_path / "facts.txt").write_text("\n".join(FACTS * 3) + "\n", encoding="utf-8")
    texts = [tmp_path / "facts.txt"]
    settings = dict(max_steps=12, valid_every=6, log_every=1, batch_tokens=60)
    pretrain(_pretrain_config(tmp_path / "a", **settings), texts, vocab_size=50, progress=False)
    pretrain(_pretrain_config(tmp_path / "b", **{**settings, "max_steps": 6}), texts, vocab_size=50, progress=False)
    pretrain(_pretrain_config(tmp_path / "b", **settings), texts, resume=True, progress=False)

    def losses(name):
        records = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if r["type"] == "train"}

    assert len(losses("a")) == 12 and losses("a") == losses("b")


@pytest.mark.slow
def test_next_sentence_prediction_learns_which_sentence_follows(tmp_path):
    # Every document is a rotation of FACTS: each sentence has one follower, which can be learned.
    documents = ["\n".join(FACTS[i:] + FACTS[:i]) for i in range(len(FACTS))]
    (tmp_path / "docs.txt").write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    config = _pretrain_config(tmp_path / "nsp", max_steps=300, valid_every=100)
    config.pretrain.next_sentence = True
    result = pretrain(config, [tmp_path / "docs.txt"], vocab_size=60, progress=False)
    assert result.steps == 300
    records = [json.loads(line) for line in (tmp_path / "nsp" / "train_log.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["type"] == "valid" and "nsp_accuracy" in r]) == 3
    model, processor = load_masked_lm(tmp_path / "nsp", which="last")
    assert model.next_sentence
    # The held-out pairs are few, and their negatives, drawn from other rotations, are at times the
    # true follower: the test asks about every training sentence instead. Sentence k is followed by
    # k + 1 in every rotation and never by k + 2.
    corpus = MonoCorpus.load(tmp_path / "nsp" / "data", "train")
    first = np.flatnonzero(corpus.has_next())
    second = first[np.isin(first + 1, first)]
    pairs = Examples(np.concatenate([first, second]), np.concatenate([first + 1, second + 2]),
                     np.concatenate([np.ones(len(first), np.int64), np.zeros(len(second), np.int64)]))
    with torch.no_grad():
        measured = evaluate_masked_lm(model, corpus, pairs, config, processor.get_piece_size(), torch.device("cpu"), torch.float32)
    assert len(pairs.a) > 40 and measured["nsp_accuracy"] >= 75.0, measured  # 56% by always answering "follows"


# ---------------------------------------------------------------------------------------------
# Starting translation from a pretrained model


def test_decoder_mapping():
    assert translation_weight_source("encoder_layers.1.self_attn.q.weight", False) == "encoder_layers.1.self_attn.q.weight"
    assert translation_weight_source("decoder_layers.1.self_attn.q.weight", False) is None
    assert translation_weight_source("decoder_layers.1.self_attn.q.weight", True) == "encoder_layers.1.self_attn.q.weight"
    assert translation_weight_source("decoder_layers.0.norm3.weight", True) == "encoder_layers.0.norm2.weight"
    assert translation_weight_source("decoder_layers.0.cross_attn.q.weight", True) is None
    assert translation_weight_source("decoder_layers.0.norm2.weight", True) is None
    assert translation_weight_source("tgt_embed.weight", True) == "src_embed.weight"


@pytest.fixture(scope="module")
def pretrained_and_data(tmp_path_factory):
    """A small masked LM on both sides of the toy corpus, and data dirs prepared with its
    vocabulary and with one of their own."""
    root = tmp_path_factory.mktemp("init")
    pairs = toy_pairs(300, seed=1)
    (root / "mono.xx").write_text("".join(s + "\n" for s, _ in pairs[100:]), encoding="utf-8")
    (root / "mono.yy").write_text("".join(t + "\n" for _, t in pairs[100:]), encoding="utf-8")
    write_pairs(root / "c" / "train", pairs[:100])
    write_pairs(root / "c" / "valid", toy_pairs(10, seed=2))
    write_pairs(root / "c" / "test", toy_pairs(10, seed=3))
    result = invoke(
        "pretrain", "--text", root / "mono.xx", "--text", root / "mono.yy", "--vocab-size", 50, "--out", root / "mlm",
        *_tiny_sets(max_steps=20), "--no-progress",
    )
    assert result.exit_code == 0, result.output
    common = ["--train", root / "c" / "train", "--valid", root / "c" / "valid", "--test", root / "c" / "test",
              "--src", "xx", "--tgt", "yy"]
    result = invoke("prepare", *common, "--spm-model", root / "mlm", "--out", root / "data")
    assert result.exit_code == 0, result.output
    result = invoke("prepare", *common, "--vocab-size", 45, "--out", root / "other-data")
    assert result.exit_code == 0, result.output
    return root


def _tiny_sets(**train) -> list[str]:
    sets = [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
    sets += [f"train.{k}={v}" for k, v in {"batch_tokens": 300, "valid_every": 10, "max_steps": 4, **train}.items()]
    return [part for item in sets for part in ("--set", item)]


def test_init_copies_the_pretrained_tensors_exactly(pretrained_and_data):
    root = pretrained_and_data
    manifest = Manifest.read(root / "data")
    config = ModelConfig(**TINY_MODEL)
    model = build_model(config, manifest.vocab.src_size, manifest.vocab.tgt_size)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loaded = load_pretrained(model, root / "mlm", manifest.vocab, config, decoder=True)
    from safetensors.torch import load_file

    pretrained = load_file(str(root / "mlm" / "best" / "model.safetensors"))
    params = dict(model.named_parameters())
    assert "encoder_layers.0.self_attn.q_proj.weight" in loaded and "decoder_layers.1.self_attn.q_proj.weight" in loaded
    for name in loaded:
        assert torch.equal(params[name], pretrained[translation_weight_source(name, True)]), name
    fresh = [name for name in params if name not in loaded]
    assert fresh and all("cross_attn" in name or ".norm2." in name for name in fresh)
    assert all(torch.equal(params[name], before[name]) for name in fresh)
    # Encoder only: the decoder keeps its own initial weights.
    model = build_model(config, manifest.vocab.src_size, manifest.vocab.tgt_size)
    loaded = load_pretrained(model, root / "mlm", manifest.vocab, config, decoder=False)
    assert loaded and all(not name.startswith("decoder") for name in loaded)


def test_init_into_its_own_directory_is_refused_and_keeps_the_pretrained_model(pretrained_and_data):
    root = pretrained_and_data
    weights = root / "mlm" / "best" / "model.safetensors"
    before = weights.read_bytes()
    result = invoke("train", "--data", root / "data", "--out", root / "mlm", "--init", root / "mlm", "--overwrite",
                    *_tiny_sets(), "--no-progress")
    assert result.exit_code == 1 and "is the --out directory" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert weights.read_bytes() == before


def test_init_trains_and_translates_through_the_pipeline(pretrained_and_data, tmp_path):
    root = pretrained_and_data
    result = invoke("train", "--data", root / "data", "--out", tmp_path / "model", "--init", root / "mlm",
                    *_tiny_sets(max_steps=6, freeze_init_steps=3), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "initialised from" in result.output and "start fresh" in result.output
    lines = (root / "c" / "test.xx").read_text().splitlines()
    out = tmp_path / "hyp.txt"
    result = invoke("translate", tmp_path / "model", "-i", root / "c" / "test.xx", "-o", out, "--beam", 2)
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == len(lines)


def test_frozen_weights_stay_for_the_first_steps(pretrained_and_data, tmp_path):
    from nmt.config import load_config
    from nmt.train import train

    root = pretrained_and_data
    sets = _tiny_sets(max_steps=3, valid_every=3, freeze_init_steps=3)
    config = load_config(None, [s for s in sets if s != "--set"] + [
        f"data_dir={root / 'data'}", f"save_dir={tmp_path / 'model'}", f"train.init={root / 'mlm'}",
    ])
    train(config, progress=False)
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "model" / "last" / "model.safetensors"))
    pretrained = load_file(str(root / "mlm" / "best" / "model.safetensors"))
    assert torch.equal(trained["encoder_layers.0.ff.fc1.weight"], pretrained["encoder_layers.0.ff.fc1.weight"])
    assert torch.equal(trained["decoder_layers.1.ff.fc2.weight"], pretrained["encoder_layers.1.ff.fc2.weight"])
    torch.manual_seed(config.train.seed)  # the model's initial weights, as training drew them
    manifest = Manifest.read(root / "data")
    initial = dict(build_model(config.model, manifest.vocab.src_size, manifest.vocab.tgt_size).state_dict())
    assert not torch.equal(trained["decoder_layers.0.cross_attn.q_proj.weight"], initial["decoder_layers.0.cross_attn.q_proj.weight"])
    # Without freezing, the loaded weights train too.
    config.train.max_steps, config.train.freeze_init_steps = 3, 0
    config.save_dir = str(tmp_path / "unfrozen")
    train(config, progress=False)
    moved = load_file(str(tmp_path / "unfrozen" / "last" / "model.safetensors"))
    assert not torch.equal(moved["encoder_layers.0.ff.fc1.weight"], pretrained["encoder_layers.0.ff.fc1.weight"])


def test_vocabulary_mismatch_is_a_one_line_error(pretrained_and_data, tmp_path):
    root = pretrained_and_data
    result = invoke("train", "--data", root / "other-data", "--out", tmp_path / "m", "--init", root / "mlm",
                    *_tiny_sets(), "--no-progress")
    assert result.exit_code == 1
    assert "vocabulary" in result.output and "--spm-model" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m" / "best").exists()
    vocab = Manifest.read(root / "data").vocab  # the pretrained model's, on the source side only
    other_target = dataclasses.replace(vocab, joint=False, tgt_sha256="0" * 64)
    check_pretrained(root / "mlm", vocab, ModelConfig(**TINY_MODEL))
    with pytest.raises(CheckpointError, match="target vocabulary"):
        check_pretrained(root / "mlm", other_target, ModelConfig(**TINY_MODEL), decoder=True)


def test_shape_mismatch_names_the_setting(pretrained_and_data):
    root = pretrained_and_data
    manifest = Manifest.read(root / "data")
    config = ModelConfig(**{**TINY_MODEL, "embed_dim": 48, "heads": 2})
    model = build_model(config, manifest.vocab.src_size, manifest.vocab.tgt_size)
    with pytest.raises(CheckpointError, match=r"model\.embed_dim is 48 but"):
        load_pretrained(model, root / "mlm", manifest.vocab, config, decoder=True)


@pytest.mark.parametrize("change, named", [
    ({"heads": 1}, "model.heads is 1"),  # the same tensor shapes, another model
    ({"norm": "post"}, "model.norm is post"),
    ({"enc_layers": 1}, "model.enc_layers is 1"),  # the pretrained second layer would be dropped
    ({"dec_layers": 3}, "model.dec_layers is 3"),  # a decoder layer without a counterpart (1 is fine)
    ({"enc_no_residual_layer": 1}, "model.enc_no_residual_layer is 1"),  # the layer computes otherwise
    ({"arch": "rnn", "tie_output": "false"}, "needs model.arch transformer"),
])
def test_init_refuses_a_model_unlike_the_pretrained_one(pretrained_and_data, tmp_path, change, named):
    root = pretrained_and_data
    sets = [part for k, v in change.items() for part in ("--set", f"model.{k}={v}")]
    result = invoke("train", "--data", root / "data", "--out", tmp_path / "m", "--init", root / "mlm",
                    *_tiny_sets(), *sets, "--no-progress")
    assert result.exit_code == 1 and named in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    # Without the decoder, its layers may differ; with it, there may be fewer.
    if "dec_layers" in change:
        result = invoke("train", "--data", root / "data", "--out", tmp_path / "m", "--init", root / "mlm",
                        *_tiny_sets(init_decoder="false"), *sets, "--no-progress")
        assert result.exit_code == 0, result.output
        result = invoke("train", "--data", root / "data", "--out", tmp_path / "m1", "--init", root / "mlm",
                        *_tiny_sets(), "--set", "model.dec_layers=1", "--no-progress")
        assert result.exit_code == 0, result.output


def test_resume_after_the_freeze_needs_no_pretrained_model(pretrained_and_data, tmp_path):
    root = pretrained_and_data
    shutil.copytree(root / "mlm", tmp_path / "mlm")
    args = ["train", "--data", root / "data", "--out", tmp_path / "m", "--init", tmp_path / "mlm", "--no-progress"]
    result = invoke(*args, *_tiny_sets(max_steps=3, freeze_init_steps=2))
    assert result.exit_code == 0, result.output
    shutil.rmtree(tmp_path / "mlm")
    result = invoke(*args, "--resume", *_tiny_sets(max_steps=5, freeze_init_steps=2))
    assert result.exit_code == 0, result.output


def test_wrong_checkpoint_kinds_are_one_line_errors(pretrained_and_data, tmp_path):
    root = pretrained_and_data
    result = invoke("translate", root / "mlm", "-i", root / "c" / "test.xx")
    assert result.exit_code == 1 and "pretrained masked LM" in result.output
    result = invoke("train", "--data", root / "data", "--out", tmp_path / "model", *_tiny_sets(max_steps=2), "--no-progress")
    assert result.exit_code == 0, result.output
    result = invoke("fill-mask", tmp_path / "model", "w1 [MASK]")
    assert result.exit_code == 1 and "not a pretrained model" in result.output
    result = invoke("train", "--data", root / "data", "--out", tmp_path / "m2", "--init", tmp_path / "model", *_tiny_sets())
    assert result.exit_code == 0 and "0 start fresh" in result.output  # a translation model: fine-tuned (test_finetune.py)
    result = invoke("pretrain", "--text", tmp_path / "missing.txt", "--out", tmp_path / "p")
    assert result.exit_code == 1 and "missing.txt" in result.output
    # --resume of the other command's run: refused before anything is written into it
    before = sorted(p.name for p in (tmp_path / "model").iterdir())
    result = invoke("pretrain", "--text", root / "mono.xx", "--out", tmp_path / "model", "--resume", *_tiny_sets())
    assert_one_line_error(result, "holds a translation model (nmt train), not a pretrained masked LM")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before  # no data/ prepared into it
    result = invoke("train", "--data", root / "data", "--out", root / "mlm", "--resume", *_tiny_sets())
    assert_one_line_error(result, "holds a pretrained masked LM (nmt pretrain), not a translation model")
    copy = tmp_path / "mlm"
    shutil.copytree(root / "mlm", copy)
    vocab = json.loads((copy / "vocab.json").read_text())
    vocab["vocab"]["src_sha256"] = vocab["vocab"]["tgt_sha256"] = "0" * 64  # as if its model were replaced
    (copy / "vocab.json").write_text(json.dumps(vocab))
    assert_one_line_error(invoke("fill-mask", copy, "w1 [MASK]"), "not the SentencePiece model")


def test_a_pretraining_run_resumes_only_on_its_own_text(pretrained_and_data, tmp_path):
    """Its batches and the dev set that picks best/ are those of its text: other text of the
    same vocabulary is refused, as nmt train refuses another data dir."""
    root = pretrained_and_data
    shutil.copytree(root / "mlm", tmp_path / "mlm")
    (tmp_path / "other.xx").write_text("".join(s + "\n" for s, _ in toy_pairs(60, seed=5)), encoding="utf-8")
    assert invoke("prepare", "--mono", tmp_path / "other.xx", "--spm-model", root / "mlm", "--valid-size", 5,
                  "--out", tmp_path / "other", "--no-progress").exit_code == 0
    result = invoke("pretrain", "--data", tmp_path / "other", "--out", tmp_path / "mlm", "--resume",
                    *_tiny_sets(max_steps=25), "--no-progress")
    *_, last = result.output.strip().splitlines()  # after the line that describes the text
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert last.startswith("error: ") and "pretrained on other text" in last and "--resume needs the text" in last
    result = invoke("pretrain", "--data", root / "mlm" / "data", "--out", tmp_path / "mlm", "--resume",
                    *_tiny_sets(max_steps=22), "--no-progress")
    assert result.exit_code == 0, result.output


def test_fill_mask_command_reads_arguments_and_stdin(pretrained_and_data):
    root = pretrained_and_data
    result = invoke("fill-mask", root / "mlm", "w1 w2 [MASK] w4", "--top-k", 3)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("w1 w2") and "[MASK]" not in lines[0]
    assert lines[1].startswith("  [MASK] 1: ") and lines[1].count(",") == 2
    result = runner.invoke(app, ["fill-mask", str(root / "mlm")], input="w3 [MASK]\n\n[MASK] w5 [MASK]\n")
    assert result.exit_code == 0, result.output
    assert sum(line.startswith("  [MASK]") for line in result.output.splitlines()) == 3
    result = invoke("fill-mask", root / "mlm", "no mask here")
    assert result.exit_code == 1 and "no [MASK]" in result.output
    assert_one_line_error(invoke("fill-mask", root / "mlm", "w1 [MASK]", "--top-k", 0), "--top-k must be at least 1")
    for result in (runner.invoke(app, ["fill-mask", str(root / "mlm")], input=b"\xff [MASK]\n"),
                   invoke("fill-mask", root / "mlm", "w1 \udcff [MASK]")):  # bytes no UTF-8 decoding gives
        assert_one_line_error(result, "UTF-8")


def test_prepare_reserves_the_special_symbols_and_reuses_a_given_model(pretrained_and_data, tmp_path):
    from nmt.tokenizer import has_reserved_symbols

    root = pretrained_and_data
    for data in ("data", "other-data"):
        manifest = Manifest.read(root / data)
        processor = load_sentencepiece(root / data / manifest.vocab.src_model)
        assert has_reserved_symbols(processor)
        assert processor.encode("w1 [MASK] w2").count(MASK) == 1
    given = json.loads((root / "data" / "manifest.json").read_text())["vocab"]
    pretrained = json.loads((root / "mlm" / "vocab.json").read_text())["vocab"]
    assert given["src_sha256"] == given["tgt_sha256"] == pretrained["src_sha256"]
    assert given["given_model"] and given["type"] is None and given["requested_size"] is None  # not prepare's training
    # A model without the reserved symbols is refused.
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["w1 w2 w3", "w4 w5"] * 20), model_prefix=str(tmp_path / "old"), vocab_size=12,
        hard_vocab_limit=False, minloglevel=2,
    )
    result = invoke("prepare", "--train", root / "c" / "train", "--valid", root / "c" / "valid", "--test",
                    root / "c" / "test", "--src", "xx", "--tgt", "yy", "--spm-model", tmp_path / "old.model",
                    "--out", tmp_path / "d")
    assert result.exit_code == 1 and "[MASK]" in result.output
    assert not (tmp_path / "d").exists()


def test_plot_draws_a_pretraining_run_beside_a_translation_run(pretrained_and_data, tmp_path):
    root = pretrained_and_data
    result = invoke("train", "--data", root / "data", "--out", tmp_path / "model", *_tiny_sets(max_steps=4), "--no-progress")
    assert result.exit_code == 0, result.output
    result = invoke("plot", root / "mlm", tmp_path / "model", "-o", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "curves.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------
# Monolingual data dirs (nmt prepare --mono) and pretrain --data


def test_prepare_mono_normalizes_each_language_and_reserves_the_symbols(tmp_path):
    (tmp_path / "news.zh").write_text("知識就是力量\n我們明天見\n\n她在圖書館讀書\n" * 5, encoding="utf-8")
    (tmp_path / "news.en").write_text("Knowledge is power.\n\nSee you tomorrow.\n" * 5, encoding="utf-8")
    result = invoke("prepare", "--mono", tmp_path / "news.zh", "--mono", tmp_path / "news.en", "--vocab-size", "400",
                    "--valid-size", "4", "--out", tmp_path / "data", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "monolingual, zh+en" in result.output and "train:" in result.output
    manifest = Manifest.read(tmp_path / "data")
    assert manifest.kind == "monolingual" and manifest.input["langs"] == ["zh", "en"]
    assert manifest.vocab.character_coverage == 0.9995  # Chinese: byte fallback spells the rarest characters
    processor = load_sentencepiece(tmp_path / "data" / manifest.vocab.src_model)
    assert [processor.id_to_piece(i) for i in (MASK, 5, 6)] == ["[MASK]", "[CLS]", "[SEP]"]
    corpus = MonoCorpus.load(tmp_path / "data", "train")
    text = "".join(processor.decode(corpus[i].tolist()) for i in range(len(corpus)))
    assert "知识就是力量" in text and "知識" not in text  # Traditional folded to Simplified, as prepare does
    assert "Knowledge is power." in text
    assert isinstance(corpus.tokens, np.memmap)


def test_pretrain_from_a_data_dir_equals_the_text_shortcut(tmp_path):
    from nmt.monolingual import MonoPrepareConfig, prepare_mono

    documents = ["\n".join(FACTS[i:] + FACTS[:i]) for i in range(len(FACTS))]
    (tmp_path / "docs.en").write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    settings = dict(max_steps=6, valid_every=3, log_every=1)
    shortcut = pretrain(_pretrain_config(tmp_path / "a", **settings), [tmp_path / "docs.en"], vocab_size=60,
                        progress=False)
    config = _pretrain_config(tmp_path / "b", **settings)
    prepare_mono(MonoPrepareConfig(out_dir=tmp_path / "mono", files=[tmp_path / "docs.en"], vocab_size=60,
                                   valid_sentences=config.pretrain.valid_sentences, seed=config.train.seed))
    from_dir = pretrain(config, data=tmp_path / "mono", progress=False)
    assert (tmp_path / "a" / "data" / "manifest.json").is_file()  # --text went through a data dir

    def losses(name):
        records = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["type"] == "train"]

    assert losses("a") == losses("b") and len(losses("a")) == 6
    assert shortcut.best_score == from_dir.best_score


def test_monolingual_and_parallel_data_dirs_are_not_mixed_up(tmp_path):
    from conftest import prepare_toy_data

    parallel = prepare_toy_data(tmp_path / "p", train=30)
    (tmp_path / "mono.en").write_text("\n".join(FACTS * 4) + "\n", encoding="utf-8")
    assert invoke("prepare", "--mono", tmp_path / "mono.en", "--vocab-size", "50", "--valid-size", "3",
                  "--out", tmp_path / "mono", "--no-progress").exit_code == 0
    result = invoke("train", "--data", tmp_path / "mono", "--out", tmp_path / "t", "--device", "cpu")
    assert result.exit_code == 1 and "monolingual data dir" in result.output and "Traceback" not in result.output
    result = invoke("pretrain", "--data", parallel, "--out", tmp_path / "m", "--device", "cpu")
    assert result.exit_code == 1 and "parallel data dir" in result.output
    result = invoke("pretrain", "--data", tmp_path / "mono", "--text", tmp_path / "mono.en", "--out", tmp_path / "m")
    assert result.exit_code == 1 and "leave out --text" in result.output
    for vocabulary in (["--data", tmp_path / "mono"], ["--text", tmp_path / "mono.en", "--vocab", tmp_path / "mono"]):
        result = invoke("pretrain", *vocabulary, "--vocab-size", 50, "--out", tmp_path / "m")  # they bring the vocabulary
        assert_one_line_error(result, "--vocab-size does not go with --data or --vocab")
    for setting in ("word_dropout=0.1", "freeze_init_steps=2", "init=elsewhere", "direction_weights.de-en=2",
                    "init_decoder=false"):
        result = invoke("pretrain", "--data", tmp_path / "mono", "--out", tmp_path / "m", "--set", f"train.{setting}",
                        *_tiny_sets(max_steps=1), "--no-progress")
        assert_one_line_error(result, f"train.{setting.split('=')[0].split('.')[0]} is for nmt train")
    result = invoke("prepare", "--out", tmp_path / "x", "--train", tmp_path / "nothing")
    assert result.exit_code == 1 and "--src and --tgt" in result.output
    for extra in (["--train", tmp_path / "nothing"], ["--src", "de"], ["--separate-vocab"], ["--test-size", "5"]):
        result = invoke("prepare", "--mono", tmp_path / "mono.en", *extra, "--out", tmp_path / "y", "--no-progress")
        assert result.exit_code == 1 and "does not go with --mono" in result.output, result.output
        assert not (tmp_path / "y").exists()


def test_a_pretraining_that_cannot_start_keeps_the_models_text(tmp_path):
    (tmp_path / "a.en").write_text("\n".join(FACTS * 4) + "\n", encoding="utf-8")
    (tmp_path / "b.en").write_text("\n".join(reversed(FACTS * 4)) + "\n", encoding="utf-8")
    args = ["pretrain", "--out", tmp_path / "m", "--vocab-size", "50", *_tiny_sets(max_steps=2, valid_every=2), "--no-progress"]
    assert invoke(*args, "--text", tmp_path / "a.en").exit_code == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "m" / "data").iterdir() if p.is_file()}
    for wrong in (["--device", "cuda:9"], ["--set", "model.arch=rnn"]):
        result = invoke(*args, "--text", tmp_path / "b.en", "--overwrite", *wrong)
        assert_one_line_error(result)
        assert {p.name: p.read_bytes() for p in (tmp_path / "m" / "data").iterdir() if p.is_file()} == before
    # --resume goes on with its own text and vocabulary, and says so when given others.
    result = invoke(*args, "--text", tmp_path / "b.en", "--resume")
    assert_one_line_error(result)
    assert "a.en" in result.output
    without_size = [*args[:3], *args[5:]]  # --vocab brings the vocabulary
    result = invoke(*without_size, "--text", tmp_path / "a.en", "--vocab", tmp_path / "none.model", "--resume")
    assert_one_line_error(result)
    assert "none.model" in result.output
    result = invoke(*args, "--text", tmp_path / "a.en", "--resume", "--set", "pretrain.max_tokens=5")
    assert result.exit_code == 1 and "error: pretrain.max_tokens is 5" in result.output


def test_resuming_a_run_from_before_its_text_was_kept_as_a_data_dir(tmp_path):
    import shutil

    documents = ["\n".join(FACTS[i:] + FACTS[:i]) for i in range(len(FACTS))]
    (tmp_path / "docs.en").write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    pretrain(_pretrain_config(tmp_path / "m", max_steps=2, valid_every=2), [tmp_path / "docs.en"], vocab_size=60,
             progress=False)
    shutil.rmtree(tmp_path / "m" / "data")  # how earlier versions left a run
    result = pretrain(_pretrain_config(tmp_path / "m", max_steps=4, valid_every=2), [tmp_path / "docs.en"],
                      vocab_size=60, resume=True, progress=False)
    assert result.steps == 4  # prepared again with the run's own vocabulary


class DeviceWaits(TorchDispatchMode):
    """Records the operations that make the host wait for a GPU: a value read back (`.item()`)
    or an output whose size depends on the values (a boolean mask's selection, nonzero)."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name.startswith("aten.index.") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))
        if boolean_index or name.split(".")[1] in ("nonzero", "masked_select", "_local_scalar_dense", "unique"):
            self.waits.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("next_sentence", [False, True])
def test_a_pretraining_update_never_waits_for_the_device(next_sentence):
    """On a GPU, a host that waits in every update cannot queue the next one: the chosen
    positions come with the batch, found on the host."""
    from nmt.train import make_optimizer, training_update

    torch.manual_seed(0)
    model = MaskedLM(ModelConfig(**TINY_MODEL), 60, next_sentence=next_sentence)
    corpus = _corpus([[7 + (i * j) % 50 for j in range(3 + i % 5)] for i in range(12)], [i // 3 for i in range(12)])
    examples = Examples(np.arange(12), np.roll(np.arange(12), 1), np.arange(12) % 2) if next_sentence else Examples(np.arange(12))
    batch = build_masked_batch(corpus, examples, np.arange(12), PretrainConfig(mask_prob=0.3), 60, np.random.default_rng(0))
    tc = TrainConfig()
    optimizer = make_optimizer(model, tc)
    with DeviceWaits() as mode:
        training_update(model, optimizer, None, [batch], tc, 1e-3, torch.device("cpu"), torch.float32, compute_loss=masked_lm_loss)
    assert mode.waits == []


def test_a_sentence_limit_past_the_stored_lengths_range_cuts_nothing():
    corpus = _corpus([[7] * 5, [8] * 3], [0, 1])
    stored = MonoCorpus(corpus.tokens, corpus.offsets, corpus.documents, max_tokens=4)
    assert stored.lengths.tolist() == [4, 3]
    lengths = np.array([5, 3], dtype=np.uint16)  # as a data dir stores them
    source = type("Stored", (), {"lengths": lengths})()
    assert MonoCorpus(corpus.tokens, corpus.offsets, corpus.documents, 70_000, source).lengths.tolist() == [5, 3]


def test_average_names_a_pretrained_model_for_what_it_is(overfit_mlm, tmp_path):
    root, _ = overfit_mlm
    result = runner.invoke(app, ["average", str(root / "mlm"), "--last", "2", "--out", str(tmp_path / "avg")])
    assert_one_line_error(result, "is a pretrained masked LM; nmt average averages translation models")
    assert not (tmp_path / "avg").exists()


def test_the_halves_of_a_batch_choose_their_own_positions():
    """The out-of-memory retry splits a batch: each half's chosen positions index its own rows
    (found where its targets are), and the two losses add up to the whole one."""
    torch.manual_seed(0)
    model = MaskedLM(ModelConfig(**TINY_MODEL), 60).eval()
    corpus = _corpus([[7 + (i * j) % 50 for j in range(3 + i % 5)] for i in range(12)], [0] * 12)
    batch = build_masked_batch(corpus, Examples(np.arange(12)), np.arange(12), PretrainConfig(mask_prob=0.3), 60,
                               np.random.default_rng(0))
    halves = batch.halves()
    assert len(halves) == 2 and sum(half.num_tgt_tokens for half in halves) == batch.num_tgt_tokens
    for half in halves:
        assert half.chosen.device == half.targets.device
        assert half.chosen.tolist() == np.flatnonzero(half.targets.numpy() != PAD).tolist()
    with torch.no_grad():
        whole = masked_lm_loss(model, batch, 0.0)
        parts = sum(masked_lm_loss(model, half, 0.0) for half in halves)
    assert torch.allclose(whole, parts, rtol=1e-5)
    # With next-sentence prediction: halves with other shares of the chosen positions per sentence
    nsp = MaskedLM(ModelConfig(**TINY_MODEL), 60, next_sentence=True).eval()
    pairs = Examples(np.arange(12), np.roll(np.arange(12), 1), np.arange(12) % 2)
    batch = build_masked_batch(corpus, pairs, np.arange(12), PretrainConfig(mask_prob=0.3, next_sentence=True), 60,
                               np.random.default_rng(1))
    halves = batch.halves()
    assert halves[0].num_tgt_tokens != halves[1].num_tgt_tokens
    with torch.no_grad():
        whole = masked_lm_loss(nsp, batch, 0.0)
        parts = sum(masked_lm_loss(nsp, half.to(torch.device("cpu")), 0.0) for half in halves)
    assert torch.allclose(whole, parts, rtol=1e-5)


def test_an_untied_output_layer_starts_from_the_pretrained_embeddings():
    # With model.tie_output=false and train.init_decoder, the output layer is initialised too.
    assert translation_weight_source("output.weight", True) == "src_embed.weight"
    assert translation_weight_source("output.weight", False) is None


def test_a_run_resumed_during_the_freeze_keeps_the_pretrained_weights_frozen(pretrained_and_data, tmp_path):
    from safetensors.torch import load_file

    root = pretrained_and_data
    args = ["train", "--data", root / "data", "--out", tmp_path / "m", "--init", root / "mlm", "--no-progress"]
    result = invoke(*args, *_tiny_sets(max_steps=2, freeze_init_steps=4))
    assert result.exit_code == 0, result.output
    result = invoke(*args, "--resume", *_tiny_sets(max_steps=3, freeze_init_steps=4))  # update 3: still frozen
    assert result.exit_code == 0, result.output
    # Resumed without --init, the run goes on from the one it began with: update 4 is frozen too.
    result = invoke(*[a for a in args if a not in ("--init", root / "mlm")], "--resume",
                    *_tiny_sets(max_steps=4, freeze_init_steps=4))
    assert result.exit_code == 0, result.output
    trained = load_file(str(tmp_path / "m" / "last" / "model.safetensors"))
    pretrained = load_file(str(root / "mlm" / "best" / "model.safetensors"))
    assert torch.equal(trained["encoder_layers.0.ff.fc1.weight"], pretrained["encoder_layers.0.ff.fc1.weight"])
    assert yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())["train"]["init"] == str(root / "mlm")


def test_masking_chooses_the_first_regular_token_too():
    tokens = np.full((4, 5), FIRST_REGULAR_ID)
    _, targets = mask_tokens(tokens, np.random.default_rng(0), PretrainConfig(mask_prob=1.0), FIRST_REGULAR_ID + 10)
    assert (targets != PAD).all()


def test_random_replacements_may_be_any_regular_token():
    tokens = np.full((2, 50), FIRST_REGULAR_ID + 1)
    cfg = PretrainConfig(mask_prob=1.0, mask_token_prob=0.0, random_token_prob=1.0)
    inputs, _ = mask_tokens(tokens, np.random.default_rng(0), cfg, FIRST_REGULAR_ID + 2)  # two regular tokens
    assert set(np.unique(inputs)) == {FIRST_REGULAR_ID, FIRST_REGULAR_ID + 1}


def test_a_batch_always_gets_one_masked_position():
    from nmt.tokenizer import EOS

    tokens = np.array([[FIRST_REGULAR_ID + 3, FIRST_REGULAR_ID + 4, EOS, PAD]])
    for seed in range(5):
        _, targets = mask_tokens(tokens, np.random.default_rng(seed), PretrainConfig(mask_prob=1e-9), FIRST_REGULAR_ID + 10)
        chosen = np.flatnonzero(targets != PAD)
        assert len(chosen) == 1 and chosen[0] in (0, 1)
    positions = {int(np.flatnonzero(mask_tokens(tokens, np.random.default_rng(seed), PretrainConfig(mask_prob=1e-9),
                                                FIRST_REGULAR_ID + 10)[1] != PAD)[0]) for seed in range(20)}
    assert positions == {0, 1}  # drawn among the regular tokens, not always the first


def test_an_overwrite_that_cannot_start_keeps_the_old_runs_text(tmp_path):
    """--text prepared for a run that replaces another takes the old text's place only once the
    new run starts: the old run stays resumable."""
    (tmp_path / "a.en").write_text("\n".join(FACTS * 4) + "\n", encoding="utf-8")
    (tmp_path / "one.en").write_text("\n".join(reversed(FACTS * 4)) + "\n", encoding="utf-8")  # one document: no NSP
    args = ["pretrain", "--out", tmp_path / "m", "--vocab-size", "50", *_tiny_sets(max_steps=2, valid_every=2), "--no-progress"]
    assert invoke(*args, "--text", tmp_path / "a.en").exit_code == 0
    data_before = {p.name: p.read_bytes() for p in (tmp_path / "m" / "data").iterdir() if p.is_file()}
    result = invoke(*args, "--text", tmp_path / "one.en", "--nsp", "--overwrite")
    assert result.exit_code == 1 and "error: next-sentence prediction needs at least 2 documents" in result.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "m" / "data").iterdir() if p.is_file()} == data_before
    resumed = invoke(*args[:-1], *_tiny_sets(max_steps=4, valid_every=2), "--no-progress", "--text", tmp_path / "a.en", "--resume")
    assert resumed.exit_code == 0, resumed.output
    # A replacing run that starts takes its own text.
    assert invoke(*args, "--text", tmp_path / "one.en", "--overwrite").exit_code == 0
    assert Manifest.read(tmp_path / "m" / "data").input["mono"] == [str((tmp_path / "one.en").resolve())]
    assert not (tmp_path / "m" / ".data-next").exists()


def test_pair_lengths_are_what_the_built_rows_hold_less_the_one_batching_adds():
    """A pair's length counts its [CLS] and [SEP]: batches of pairs stay within train.batch_tokens."""
    from nmt.config import PretrainConfig
    from nmt.pretrain import Examples, MonoCorpus, build_masked_batch
    from nmt.tokenizer import PAD

    sentences = [[10, 11], [12, 13, 14], [15], [16, 17, 18, 19]]
    corpus = MonoCorpus(np.array([t for s in sentences for t in s], dtype=np.int64),
                        np.concatenate([[0], np.cumsum([len(s) for s in sentences])]).astype(np.int64),
                        np.array([0, 0, 1, 1], dtype=np.int64))
    for examples in (Examples(None), Examples(np.array([0, 2]), np.array([1, 3]), np.array([1, 1]))):
        rows = np.arange(len(sentences) if examples.a is None else 2)
        batch = build_masked_batch(corpus, examples, rows, PretrainConfig(), 50, np.random.default_rng(0))
        assert ((batch.tokens != PAD).sum(1).numpy() == examples.lengths(corpus)[rows] + 1).all()


def test_a_valid_size_larger_than_a_small_text_holds_out_a_tenth_at_most():
    """--valid-size is cut to a tenth of the sentences: a small text keeps nine tenths of its
    sentences (here its short documents, whole) for pretraining."""
    from nmt.monolingual import hold_out

    documents = np.repeat(np.arange(30), 3)  # 90 sentences in documents of 3
    held = hold_out(documents, 1000, 0)
    assert 1 <= held.sum() <= 9 and (~held).sum() >= 81
    assert len(np.intersect1d(documents[held], documents[~held])) == 0  # whole documents


def test_an_overwrite_that_stops_before_it_saves_gives_back_the_models_text_too(tmp_path, monkeypatch):
    """--text with --overwrite: the new text replaces data/ once the run starts; should the run
    stop before its first checkpoint, the old model comes back with the text it was trained on,
    so that --resume goes on with it."""
    import nmt.train

    (tmp_path / "a.en").write_text("\n".join(FACTS * 4) + "\n", encoding="utf-8")
    (tmp_path / "b.en").write_text("\n".join(reversed(FACTS * 4)) + "\n", encoding="utf-8")
    pretrain(_pretrain_config(tmp_path / "m", max_steps=2, valid_every=2), [tmp_path / "a.en"], vocab_size=50, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "m" / "data").iterdir() if p.is_file()}

    def fails(self, progress):
        raise RuntimeError("stopped before the first checkpoint")

    with monkeypatch.context() as patch:
        patch.setattr(nmt.train.Trainer, "run", fails)
        with pytest.raises(RuntimeError):
            pretrain(_pretrain_config(tmp_path / "m", max_steps=2, valid_every=2), [tmp_path / "b.en"], vocab_size=50,
                     overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "m" / "data").iterdir() if p.is_file()} == before
    result = pretrain(_pretrain_config(tmp_path / "m", max_steps=4, valid_every=2), [tmp_path / "a.en"], resume=True,
                      progress=False)
    assert result.steps == 4
    replaced = pretrain(_pretrain_config(tmp_path / "m", max_steps=2, valid_every=2), [tmp_path / "b.en"], vocab_size=50,
                        overwrite=True, progress=False)
    assert replaced.steps == 2 and Manifest.read(tmp_path / "m" / "data").input["mono"] == [str((tmp_path / "b.en").resolve())]
    assert [p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".") and p.name != ".lock"] == []
