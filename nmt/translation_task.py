"""Translation as a training task: the data, the model, batches, the loss and validation (dev
loss and BLEU) that `nmt train`'s loop runs, for one direction or several (a multilingual data
dir). `nmt pretrain` gives the same loop its masked-LM task (`nmt.pretrain.MaskedLMTask`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nmt.batches import Batch, make_batch, token_batches
from nmt.checkpoint import (
    check_same_model,
    init_save_dir,
    load_pretrained,
    pretrained_parameters,
    read_config,
)
from nmt.config import Config
from nmt.data import ParallelSplit, read_lines
from nmt.devices import autocast
from nmt.errors import CheckpointError, ConfigError, DataError
from nmt.evaluate import bleu_tokenizer, corpus_bleu
from nmt.files import Manifest, VocabInfo, text_files
from nmt.models import build_model
from nmt.multilingual import changed_weights, direction_languages, direction_weights, epoch_pairs, target_pieces
from nmt.normalize import Normalization
from nmt.tokenizer import PAD, Tokenizer, check_prepared_model
from nmt.translate import decode_outputs, output_tokens, translate_ids


def token_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Summed cross-entropy over non-pad target tokens. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=PAD,
        label_smoothing=label_smoothing,
        reduction="sum",
    )


def translation_loss(model: torch.nn.Module, batch: Batch, label_smoothing: float) -> torch.Tensor:
    logits = model(batch.src, batch.tgt_in)  # (B, T, V)
    return token_loss(logits, batch.tgt_out, label_smoothing)


@torch.no_grad()
def validate(
    model,
    split: ParallelSplit,
    references: list[str],
    tokenizer: Tokenizer,
    config: Config,
    device: torch.device,
    dtype: torch.dtype,
    tgt_lang: str | None = None,
    normalize_target: Normalization | None = None,
) -> dict:
    """Dev loss (teacher forced, no smoothing) and BLEU of the decoded dev sources, translated and
    written as `nmt translate` does (`normalize_target`: the target side's normalization) and
    tokenized for BLEU as the target language needs."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for indices in token_batches(split.src.lengths, split.tgt.lengths, config.train.batch_tokens):
        batch = make_batch(split, indices).to(device)
        with autocast(device, dtype):
            logits = model(batch.src, batch.tgt_in)
        total_loss += float(token_loss(logits, batch.tgt_out, 0.0))
        total_tokens += batch.num_tgt_tokens
    count = len(split)
    if config.train.valid_max_sentences:
        count = min(count, config.train.valid_max_sentences)
    decode = dataclasses.replace(config.decode, beam=config.train.valid_beam, nbest=1, sampling=False)
    with autocast(device, dtype):
        hyps = translate_ids(model, [split.src[i] for i in range(count)], decode, device, allowed=output_tokens(tokenizer))
    texts = decode_outputs(tokenizer, [nbest[0].tokens for nbest in hyps], normalize_target)
    model.train(was_training)
    loss = total_loss / max(total_tokens, 1)
    return {
        "loss": round(loss, 4),
        "ppl": round(math.exp(min(loss, 50.0)), 2),
        "bleu": round(corpus_bleu(texts, references[:count], bleu_tokenizer(tgt_lang)), 2),
        "sentences": count,
    }


def validation_set(data_dir: Path, name: str, vocab_sizes: tuple[int, int]) -> tuple[ParallelSplit, list[str]]:
    """A held-out split and its reference lines, checked now rather than at the first validation."""
    split, (_, path) = ParallelSplit.load(data_dir, name, vocab_sizes), text_files(data_dir, name)
    references = list(read_lines(path))
    if len(references) != len(split):
        raise DataError(f"{path} has {len(references)} lines for {len(split)} {name} pairs; run nmt prepare again")
    return split, references


class TranslationTask:
    """What the training loop needs to know about translation: the data, the model, the
    batches, the loss and how to validate. `nmt pretrain` gives the same loop a masked-LM task."""

    metric, metric_name = "bleu", "BLEU"  # the dev score that picks best/
    extra_metrics: tuple[str, ...] = ()  # other dev figures to print
    throughput = "tgt_tokens_per_s"  # the log figure the progress bar shows as tok/s

    def __init__(self, config: Config, data_dir: Path, manifest: Manifest, valid_split: bool = True):
        self.config, self.data_dir, self.manifest = config, data_dir, manifest
        vocab = manifest.vocab
        for name, sha256 in {vocab.src_model: vocab.src_sha256, vocab.tgt_model: vocab.tgt_sha256}.items():  # once if joint
            check_prepared_model(data_dir / name, sha256)
        self.tokenizer = Tokenizer(data_dir / vocab.src_model, data_dir / vocab.tgt_model)
        self.vocab_sizes = (self.tokenizer.src_vocab_size, self.tokenizer.tgt_vocab_size)
        self.train_split = ParallelSplit.load(data_dir, "train", self.vocab_sizes)
        self.tag_ids = tuple(self.tokenizer.tag_id(lang) for lang in manifest.languages)  # never dropped
        if valid_split:
            self.valid_split, self.references = validation_set(data_dir, "valid", self.vocab_sizes)

    def describe(self) -> str:
        return f"{len(self.train_split)} training pairs{self.over_budget_note()}"

    def over_budget_note(self) -> str:
        """The pairs longer than a batch may hold: each is trained alone, past the budget (and,
        on a GPU, may run out of memory every epoch), which the user should hear of."""
        split, budget = self.train_split, self.config.train.batch_tokens
        over = int((np.maximum(split.src.lengths, split.tgt.lengths) + 1 > budget).sum())  # + BOS/EOS, as batches count
        return f"; {over} of them longer than train.batch_tokens ({budget}), each trained as a batch of its own" if over else ""

    def build_model(self) -> torch.nn.Module:
        return build_model(self.config.model, self.tokenizer.src_vocab_size, self.tokenizer.tgt_vocab_size)

    def initialize(self, model: torch.nn.Module, resume: bool, log: Callable[[str], None]) -> list[torch.nn.Parameter]:
        """Load pretrained weights (train.init) unless resuming; returns the parameters to hold
        fixed for the first train.freeze_init_steps updates."""
        tc = self.config.train
        if not tc.init:
            return []
        if resume:  # its own weights; the pretrained model need not be there any more
            # Freezing is the run's first start's, which refused it with a translation model (check_init).
            loaded = pretrained_parameters(model, tc.init_decoder)
        else:
            loaded = load_pretrained(model, Path(tc.init), self.manifest.vocab, self.config.model, tc.init_decoder)
            fresh = [name for name, _ in model.named_parameters() if name not in loaded]
            log(f"initialised from {tc.init}: {len(loaded)} tensors loaded ({_summarize(loaded)}); "
                f"{len(fresh)} start fresh ({_summarize(fresh)})")
        if not tc.freeze_init_steps:
            return []
        return [param for name, param in model.named_parameters() if name in loaded]

    def epoch_batches(self, batch_tokens: int, epoch: int) -> list[np.ndarray]:
        split, tc = self.train_split, self.config.train
        return token_batches(split.src.lengths, split.tgt.lengths, batch_tokens, seed=tc.seed * 100_003 + epoch)

    def make_batch(self, indices: np.ndarray, pin_memory: bool, epoch: int, number: int) -> Batch:
        # Seeded by the batch's place in training, so that a resumed run drops the same words.
        tc = self.config.train
        rng = np.random.default_rng([tc.seed, epoch, number, 3]) if tc.word_dropout else None
        return make_batch(self.train_split, indices, pin_memory, tc.word_dropout, rng, self.tag_ids)

    def update_tokens(self, update: list[np.ndarray]) -> int | None:
        """Target tokens of an update's batches (+1 EOS each), known before building them."""
        return sum(len(b) + int(self.train_split.tgt.lengths[b].sum()) for b in update)

    def release_pages(self) -> None:
        self.train_split.release_pages()

    loss = staticmethod(translation_loss)

    def validate(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
        return validate(model, self.valid_split, self.references, self.tokenizer, self.config, device, dtype,
                        self.manifest.tgt_lang, self.manifest.target_normalization())

    def check_resumable(self, save_dir: Path) -> None:
        """--resume continues on the data the run was trained on: the same vocabulary, languages,
        directions and training pairs (another data dir would change the batches and the dev set)."""
        check_same_model(save_dir, self.config)
        freeze, saved_freeze = self.config.train.freeze_init_steps, read_config(save_dir).train.freeze_init_steps
        if self.config.train.init and freeze != saved_freeze:  # the weights it holds fixed are the init's
            raise ConfigError(f"train.freeze_init_steps is {freeze} but the run in {save_dir} was trained with "
                              f"{saved_freeze}; --resume needs the same value")
        saved, data = VocabInfo.read(save_dir), VocabInfo.from_manifest(self.manifest)
        if (saved.vocab.src_sha256, saved.vocab.tgt_sha256) != (data.vocab.src_sha256, data.vocab.tgt_sha256):
            raise CheckpointError(
                f"the checkpoint in {save_dir} was trained with a different vocabulary than data dir {self.data_dir}"
            )
        for what, old, new in (("languages", f"{saved.src_lang}-{saved.tgt_lang}", f"{data.src_lang}-{data.tgt_lang}"),
                               ("directions", ",".join(saved.directions) or "none", ",".join(data.directions) or "none"),
                               ("training pairs", saved.train_pairs, data.train_pairs)):
            if old is not None and old != new:  # None: recorded by an earlier version
                raise CheckpointError(f"the run in {save_dir} was trained on other data ({what} {old}; data dir "
                                      f"{self.data_dir} has {new}); --resume needs the data dir it was trained on")

    def init_save_dir(self, save_dir: Path) -> None:
        init_save_dir(save_dir, self.config, VocabInfo.from_manifest(self.manifest), self.data_dir)


class MultilingualTranslationTask(TranslationTask):
    """Translation in several directions from a multilingual data dir: each epoch draws its
    pairs from the directions with the sampling temperature (train.lang_temperature, or the data
    dir's), and validation scores every direction; their mean BLEU picks best/."""

    def __init__(self, config: Config, data_dir: Path, manifest: Manifest):
        super().__init__(config, data_dir, manifest, valid_split=False)
        self.directions = list(manifest.directions)
        self.sizes = [manifest.direction_counts[d]["train"]["pairs"] for d in self.directions]
        if sum(self.sizes) != len(self.train_split):
            raise DataError(f"{data_dir}: the directions' counts do not add up to the training pairs; run nmt prepare again")
        self.temperature = config.train.lang_temperature or manifest.lang_temperature or 1.0
        self.weights = direction_weights(config.train.direction_weights, self.directions, data_dir)
        self.valid_sets = {d: validation_set(data_dir, f"valid.{d}", self.vocab_sizes) for d in self.directions}
        self.extra_metrics = tuple(f"bleu_{d}" for d in self.directions)

    def init_save_dir(self, save_dir: Path) -> None:
        info = VocabInfo.from_manifest(self.manifest)
        info.target_pieces = target_pieces(self.train_split.tgt, self.directions, self.sizes, self.tokenizer.tgt_vocab_size)
        init_save_dir(save_dir, self.config, info, self.data_dir)

    def describe(self) -> str:
        weighted = ", ".join(f"{d} ×{w:g}" for d, w in changed_weights(dict(zip(self.directions, self.weights or []))).items())
        return (f"{len(self.train_split)} training pairs in {len(self.directions)} directions "
                f"(sampling temperature {self.temperature:g}{'; weights ' + weighted if weighted else ''})"
                f"{self.over_budget_note()}")

    def epoch_batches(self, batch_tokens: int, epoch: int) -> list[np.ndarray]:
        split, tc = self.train_split, self.config.train
        pairs = epoch_pairs(self.sizes, self.temperature, np.random.default_rng([tc.seed, epoch, 5]), self.weights)
        batches = token_batches(split.src.lengths[pairs], split.tgt.lengths[pairs], batch_tokens, seed=tc.seed * 100_003 + epoch)
        return [pairs[b] for b in batches]

    def validate(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
        """Each direction's dev loss and BLEU (`bleu_de-en`, `loss_de-en`), and their means."""
        scores = {}
        for d, (split, references) in self.valid_sets.items():
            _, tgt = direction_languages(d)
            scores[d] = validate(model, split, references, self.tokenizer, self.config, device, dtype, tgt,
                                 self.manifest.language_normalization(tgt))
        loss = sum(s["loss"] for s in scores.values()) / len(scores)
        result = {
            "loss": round(loss, 4), "ppl": round(math.exp(min(loss, 50.0)), 2),
            "bleu": round(sum(s["bleu"] for s in scores.values()) / len(scores), 2),
            "sentences": sum(s["sentences"] for s in scores.values()),
        }
        for d, s in scores.items():
            result[f"bleu_{d}"], result[f"loss_{d}"] = s["bleu"], s["loss"]
        return result


def _summarize(names: list[str]) -> str:
    """Parameter names grouped by their first part: 'encoder_layers ×24, src_embed'."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + 1
    return ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in counts.items()) or "none"
