"""`nmt pretrain`: a masked language model (BERT's cloze task, optionally with next-sentence
prediction) on monolingual text, trained by the same loop as translation (`run_training`), to
initialise a translation model (`nmt train --init`). Also `fill_mask`, to look at what it learnt.

Text: one sentence per line, a blank line between documents; each file starts a new document.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nmt.atomic import replace_dir
from nmt.batches import token_batches
from nmt.checkpoint import (
    REPLACED,
    check_outside_data_dir,
    check_resumed_task,
    check_same_model,
    check_sentencepiece_files,
    init_save_dir,
    load_saved_weights,
    read_config,
)
from nmt.config import Config, PretrainConfig, TrainConfig
from nmt.data import clean_whitespace
from nmt.devices import autocast, resolve_device, resolve_precision
from nmt.distributed import Launch, Ranks
from nmt.errors import CheckpointError, ConfigError, DataError
from nmt.files import MASKED_LM, Manifest, VocabInfo, monolingual_files
from nmt.models.masked_lm import MaskedLM
from nmt.monolingual import MONOLINGUAL, MonoPrepareConfig, prepare_mono
from nmt.normalize import Normalization
from nmt.prepare import given_sentencepiece
from nmt.shards import TokenArray, load_array
from nmt.tokenizer import (
    CLS,
    EOS,
    FIRST_REGULAR_ID,
    MASK,
    PAD,
    SEP,
    check_prepared_model,
    encode_text,
    file_sha256,
    has_reserved_symbols,
    load_sentencepiece,
    reserved_ids,
)
from nmt.train import TrainResult, launched_run, run_training

# ---------------------------------------------------------------------------------------------
# Monolingual text


@dataclass
class MonoCorpus:
    """Sentences as one flat token array with offsets (memory-mapped when loaded from a data
    dir), and the document each belongs to; sentences are cut to `max_tokens` pieces."""

    tokens: np.ndarray  # (total tokens,)
    offsets: np.ndarray  # (N + 1,)
    documents: np.ndarray  # (N,) document number of each sentence, non-decreasing
    max_tokens: int | None = None
    source: TokenArray | None = None  # the memory-mapped file, whose pages release_pages unmaps

    def __post_init__(self) -> None:
        # (N,) held in memory for batching: 2 bytes per sentence
        lengths = self.source.lengths if self.source is not None else np.diff(self.offsets)
        if self.max_tokens:
            lengths = np.minimum(lengths, min(self.max_tokens, np.iinfo(lengths.dtype).max))  # a limit past the dtype cuts nothing
        self.lengths = lengths.astype(np.uint16 if lengths.max(initial=0) <= np.iinfo(np.uint16).max else np.int32)

    @classmethod
    def load(cls, data_dir: Path, split: str, max_tokens: int | None = None, vocab_size: int | None = None) -> MonoCorpus:
        text_stem, documents_path = monolingual_files(data_dir, split)
        text = TokenArray(data_dir, text_stem, vocab_size)
        documents = load_array(documents_path)
        if documents.ndim != 1 or len(documents) != len(text):
            raise DataError(f"{data_dir}: {split} sentences and documents differ in number; run nmt prepare again")
        return cls(text.tokens, text.offsets, documents, max_tokens, text)

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, i: int) -> np.ndarray:
        end = int(self.offsets[i + 1])
        if self.max_tokens:
            end = min(end, int(self.offsets[i]) + self.max_tokens)
        return self.tokens[int(self.offsets[i]) : end]

    def has_next(self) -> np.ndarray:
        """(N,) whether the next sentence belongs to the same document."""
        return np.append(self.documents[1:] == self.documents[:-1], False)

    def release_pages(self) -> None:
        if self.source is not None:
            self.source.release_pages()


# ---------------------------------------------------------------------------------------------
# Examples: masking and sentence pairs


def mask_tokens(
    tokens: np.ndarray, rng: np.random.Generator, cfg: PretrainConfig, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of a padded batch (B, S): each regular token is chosen with probability
    mask_prob (special symbols and padding never); of the chosen, mask_token_prob become [MASK],
    random_token_prob a random regular token, the rest stay. Returns (inputs, targets): targets
    hold the original token at chosen positions and PAD elsewhere, so the loss ignores those.
    A batch gets at least one chosen position."""
    eligible = tokens >= FIRST_REGULAR_ID  # (B, S)
    chosen = eligible & (rng.random(tokens.shape) < cfg.mask_prob)
    if not chosen.any() and eligible.any():
        candidates = np.flatnonzero(eligible)
        chosen.flat[candidates[rng.integers(len(candidates))]] = True
    action = rng.random(tokens.shape)
    inputs = tokens.copy()
    inputs[chosen & (action < cfg.mask_token_prob)] = MASK
    randomized = chosen & (action >= cfg.mask_token_prob) & (action < cfg.mask_token_prob + cfg.random_token_prob)
    inputs[randomized] = rng.integers(FIRST_REGULAR_ID, vocab_size, size=int(randomized.sum()))
    targets = np.where(chosen, tokens, PAD)
    return inputs, targets


def sentence_pairs(corpus: MonoCorpus, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-sentence examples: each sentence that has a successor in its document is an A; half
    the time B is that successor (label 1), otherwise a random sentence of another document
    (label 0). Returns (a, b, labels), each (M,)."""
    if len(np.unique(corpus.documents)) < 2:
        raise DataError("next-sentence prediction needs at least 2 documents (separate them with a blank line)")
    a = np.flatnonzero(corpus.has_next())
    if len(a) == 0:
        raise DataError("next-sentence prediction needs documents of at least 2 sentences")
    labels = (rng.random(len(a)) < 0.5).astype(np.int64)
    b = a + 1
    negatives = np.flatnonzero(labels == 0)
    others = rng.integers(0, len(corpus), size=len(negatives))
    clash = corpus.documents[others] == corpus.documents[a[negatives]]
    while clash.any():  # draw again where B fell in A's own document
        others[clash] = rng.integers(0, len(corpus), size=int(clash.sum()))
        clash = corpus.documents[others] == corpus.documents[a[negatives]]
    b[negatives] = others
    return a, b, labels


@dataclass
class Examples:
    """One epoch's examples: sentence A (and B with next-sentence prediction). Without pairs,
    `a` None stands for every sentence in order (no index of the corpus's size in memory)."""

    a: np.ndarray | None
    b: np.ndarray | None = None
    labels: np.ndarray | None = None

    def lengths(self, corpus: MonoCorpus) -> np.ndarray:
        lengths = corpus.lengths
        if self.a is None:
            return lengths
        if self.b is None:
            return lengths[self.a]
        return lengths[self.a] + lengths[self.b] + 2  # [CLS] A [SEP] B [SEP], one counted by batching

    def first(self, rows: np.ndarray) -> np.ndarray:
        """The A sentence of each example in `rows`."""
        return rows if self.a is None else self.a[rows]


def make_examples(corpus: MonoCorpus, next_sentence: bool, rng: np.random.Generator) -> Examples:
    if not next_sentence:
        return Examples(None)
    return Examples(*sentence_pairs(corpus, rng))


@dataclass
class MaskedBatch:
    tokens: torch.Tensor  # (B, S) masked input
    segments: torch.Tensor | None  # (B, S) 0 for [CLS] A [SEP], 1 for B [SEP]; None without pairs
    targets: torch.Tensor  # (B, S) original tokens at chosen positions, PAD elsewhere
    nsp_labels: torch.Tensor | None  # (B,) 1 when B follows A
    num_tgt_tokens: int  # chosen positions: what the loss is averaged over
    num_src_tokens: int = 0
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    chosen: torch.Tensor | None = None  # (N,) flat positions of the chosen tokens, row-major
    # The weight of each sentence's next-sentence loss: the batch's chosen positions per sentence,
    # so that after division by them it counts as its mean. The halves of a batch keep the whole
    # batch's, so that their losses add up to its loss.
    nsp_weight: float | None = None

    def __post_init__(self) -> None:
        if self.chosen is None:  # a half of a batch (out-of-memory retry): found where its targets are
            self.chosen = (self.targets.reshape(-1) != PAD).nonzero()[:, 0]
        if self.nsp_weight is None:
            self.nsp_weight = self.num_tgt_tokens / max(self.tokens.shape[0], 1)

    def to(self, device: torch.device) -> MaskedBatch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=device.type == "cuda")

        return MaskedBatch(
            move(self.tokens), move(self.segments), move(self.targets), move(self.nsp_labels),
            self.num_tgt_tokens, self.num_src_tokens, self.indices, move(self.chosen), self.nsp_weight,
        )

    def halves(self) -> list[MaskedBatch]:
        half = self.tokens.shape[0] // 2
        if half == 0:
            return [self]
        parts = []
        for rows in (slice(0, half), slice(half, None)):
            targets = self.targets[rows]
            parts.append(MaskedBatch(
                self.tokens[rows], None if self.segments is None else self.segments[rows], targets,
                None if self.nsp_labels is None else self.nsp_labels[rows], int((targets != PAD).sum()),
                int((self.tokens[rows] != PAD).sum()), self.indices[rows], nsp_weight=self.nsp_weight,
            ))
        return parts


def build_masked_batch(
    corpus: MonoCorpus, examples: Examples, rows: np.ndarray, cfg: PretrainConfig, vocab_size: int,
    rng: np.random.Generator, pin_memory: bool = False,
) -> MaskedBatch:
    """Padded, masked batch of examples `rows`: `A EOS`, or `[CLS] A [SEP] B [SEP]` with pairs."""
    first = examples.first(rows).tolist()
    if examples.b is None:
        sequences = [np.append(corpus[i], EOS) for i in first]
    else:
        sequences = [
            np.concatenate([[CLS], corpus[a], [SEP], corpus[b], [SEP]]) for a, b in zip(first, examples.b[rows].tolist())
        ]
    width = max(len(s) for s in sequences)
    tokens = np.full((len(sequences), width), PAD, dtype=np.int64)
    segments = np.zeros((len(sequences), width), dtype=np.int64) if examples.b is not None else None
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = seq
        if segments is not None:
            segments[row, len(corpus[first[row]]) + 2 : len(seq)] = 1
    inputs, targets = mask_tokens(tokens, rng, cfg, vocab_size)
    chosen = np.flatnonzero(targets != PAD)
    tensors = [torch.from_numpy(inputs), None if segments is None else torch.from_numpy(segments), torch.from_numpy(targets),
               torch.from_numpy(chosen)]
    labels = None if examples.labels is None else torch.from_numpy(examples.labels[rows])
    if pin_memory:
        tensors = [None if t is None else t.pin_memory() for t in tensors]
        labels = None if labels is None else labels.pin_memory()
    return MaskedBatch(
        tensors[0], tensors[1], tensors[2], labels, num_tgt_tokens=len(chosen),
        num_src_tokens=int((tokens != PAD).sum()), indices=rows, chosen=tensors[3],
    )


def masked_lm_loss(model: torch.nn.Module, batch: MaskedBatch, label_smoothing: float) -> torch.Tensor:
    """Summed cross-entropy at the chosen positions (+ the next-sentence loss, weighted so that
    after division by the chosen count it counts as its mean over sentences)."""
    logits, nsp_logits = model(batch.tokens, batch.segments, batch.chosen)  # (N, V), (B, 2)
    targets = batch.targets.reshape(-1).index_select(0, batch.chosen)  # (N,)
    loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing, reduction="sum")
    if nsp_logits is not None:
        loss = loss + F.cross_entropy(nsp_logits.float(), batch.nsp_labels, reduction="sum") * batch.nsp_weight
    return loss


# ---------------------------------------------------------------------------------------------
# The task run by the training loop


class MaskedLMTask:
    metric, metric_name = "accuracy", "masked accuracy"  # percent of chosen tokens predicted right
    throughput = "tokens_per_s"  # input tokens and predictions: the chosen positions alone are 15%

    def __init__(self, config: Config, data_dir: Path, log: Callable[[str], None]):
        self.config, self.data_dir, self.pc = config, Path(data_dir), config.pretrain
        self.extra_metrics = ("nsp_accuracy",) if self.pc.next_sentence else ()  # printed at validation
        self.manifest = Manifest.read(self.data_dir)
        if self.manifest.kind != MONOLINGUAL:
            raise DataError(f"{data_dir} is a parallel data dir; nmt pretrain reads a monolingual one (nmt prepare --mono)")
        self.spm_path = self.data_dir / self.manifest.vocab.src_model
        check_prepared_model(self.spm_path, self.manifest.vocab.src_sha256)
        self.processor = load_sentencepiece(self.spm_path)
        if not has_reserved_symbols(self.processor):
            raise DataError(f"{self.spm_path} does not reserve [MASK], [CLS] and [SEP]: prepare the data again with this version")
        self.vocab_size = self.processor.get_piece_size()
        # Memory-mapped: resident memory holds 2 bytes per sentence, whatever the corpus size.
        self.train_corpus = MonoCorpus.load(self.data_dir, "train", self.pc.max_tokens, self.vocab_size)
        self.valid_corpus = MonoCorpus.load(self.data_dir, "valid", self.pc.max_tokens, self.vocab_size)
        counts = self.manifest.counts["train"]
        log(f"pretraining text: {counts['sentences']} sentences, {counts['tokens']} tokens, "
            f"{counts['documents']} documents; {len(self.valid_corpus)} held out")
        self.valid_examples = make_examples(self.valid_corpus, self.pc.next_sentence, np.random.default_rng(0))
        self.epoch_examples: dict[int, Examples] = {}

    def describe(self) -> str:
        kind = "sentence pairs (masked LM + next sentence)" if self.pc.next_sentence else "sentences (masked LM)"
        return f"{len(self.train_corpus)} training {kind}"

    def build_model(self) -> torch.nn.Module:
        return MaskedLM(self.config.model, self.vocab_size, self.pc.next_sentence)

    def initialize(self, model, resume: bool, log) -> list[torch.nn.Parameter]:
        return []

    def examples(self, epoch: int) -> Examples:
        """Sentence pairs are drawn anew each epoch (as are the masks, in make_batch)."""
        if epoch not in self.epoch_examples:
            rng = np.random.default_rng([self.config.train.seed, epoch, 1])
            self.epoch_examples = {epoch: make_examples(self.train_corpus, self.pc.next_sentence, rng)}
        return self.epoch_examples[epoch]

    def epoch_batches(self, batch_tokens: int, epoch: int) -> list[np.ndarray]:
        lengths = self.examples(epoch).lengths(self.train_corpus)
        return token_batches(lengths, lengths, batch_tokens, seed=self.config.train.seed * 100_003 + epoch)

    def make_batch(self, rows: np.ndarray, pin_memory: bool, epoch: int, number: int) -> MaskedBatch:
        # The masks depend on (seed, epoch, batch number) only: new each epoch, the same on resume.
        rng = np.random.default_rng([self.config.train.seed, epoch, number, 2])
        return build_masked_batch(self.train_corpus, self.examples(epoch), rows, self.pc, self.vocab_size, rng, pin_memory)

    def update_tokens(self, update) -> None:
        return None  # how many positions get chosen is known once the batches are built

    def release_pages(self) -> None:
        self.train_corpus.release_pages()

    loss = staticmethod(masked_lm_loss)

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
        return evaluate_masked_lm(model, self.valid_corpus, self.valid_examples, self.config, self.vocab_size, device, dtype)

    @property
    def train_sentences(self) -> int | None:
        train = self.manifest.counts.get("train")
        return train.get("sentences") if isinstance(train, dict) else None

    def check_resumable(self, save_dir: Path) -> None:
        check_same_model(save_dir, self.config)
        info = VocabInfo.read(save_dir)
        if info.vocab.src_sha256 != self.manifest.vocab.src_sha256:
            raise CheckpointError(f"the model in {save_dir} was pretrained with another vocabulary than {self.data_dir}'s")
        if info.train_pairs is not None and info.train_pairs != self.train_sentences:  # None: recorded before
            raise CheckpointError(f"the run in {save_dir} was pretrained on other text ({info.train_pairs} training "
                                  f"sentences; {self.data_dir} has {self.train_sentences}); --resume needs the text it "
                                  "was pretrained on")
        saved = read_config(save_dir).pretrain
        if saved.next_sentence != self.pc.next_sentence:
            raise ConfigError(f"the model in {save_dir} was pretrained with next_sentence={saved.next_sentence}")
        if saved.max_tokens != self.pc.max_tokens:  # sentence lengths make the batches
            raise ConfigError(f"pretrain.max_tokens is {self.pc.max_tokens} but the run in {save_dir} was trained with "
                              f"{saved.max_tokens}; --resume needs the same value (or start a new run)")

    def init_save_dir(self, save_dir: Path) -> None:
        save_dir.mkdir(parents=True, exist_ok=True)
        if self.data_dir == save_dir / NEXT_DATA:  # the run starts: its text replaces the old run's
            if (save_dir / "data").is_dir() and (save_dir / REPLACED).is_dir():
                # which goes with the model set aside, and comes back with it should this run stop before it saves
                os.replace(save_dir / "data", save_dir / REPLACED / "data")
            replace_dir(self.data_dir, save_dir / "data")  # (open memory maps follow the files)
            self.data_dir, self.spm_path = save_dir / "data", save_dir / "data" / self.spm_path.name
        info = VocabInfo(self.manifest.vocab, MASKED_LM, normalization=self.manifest.normalization,
                         texts=self.manifest.input.get("mono"), train_pairs=self.train_sentences)
        init_save_dir(save_dir, self.config, info, self.spm_path.parent)


def evaluate_masked_lm(
    model, corpus: MonoCorpus, examples: Examples, config: Config, vocab_size: int, device, dtype
) -> dict:
    """Loss, perplexity and accuracy at the chosen positions of `corpus` (masks drawn with a
    fixed seed, so that validations compare), and next-sentence accuracy with pairs."""
    was_training = model.training
    model.eval()
    lengths = examples.lengths(corpus)
    total_loss, chosen_count, correct, nsp_correct, sentences = 0.0, 0, 0, 0, 0
    for number, rows in enumerate(token_batches(lengths, lengths, config.train.batch_tokens)):
        rng = np.random.default_rng([number, 3])
        batch = build_masked_batch(corpus, examples, rows, config.pretrain, vocab_size, rng).to(device)
        with autocast(device, dtype):
            logits, nsp_logits = model(batch.tokens, batch.segments, batch.chosen)
        targets = batch.targets.reshape(-1).index_select(0, batch.chosen)
        total_loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        chosen_count += len(targets)
        if nsp_logits is not None:
            nsp_correct += int((nsp_logits.argmax(-1) == batch.nsp_labels).sum())
            sentences += len(rows)
    model.train(was_training)
    loss = total_loss / max(chosen_count, 1)
    result = {
        "loss": round(loss, 4),
        "ppl": round(math.exp(min(loss, 50.0)), 2),
        "accuracy": round(100.0 * correct / max(chosen_count, 1), 2),
        "masked_tokens": chosen_count,
    }
    if sentences:
        result["nsp_accuracy"] = round(100.0 * nsp_correct / sentences, 2)
    return result


def vocabulary_model(path: Path) -> Path:
    """The SentencePiece model of `--vocab`: a .model file, a data dir from nmt prepare or a
    checkpoint directory."""
    if path.is_dir() and (path / VocabInfo.NAME).is_file():
        return given_sentencepiece(path)
    if path.is_dir():
        vocab = Manifest.read(path).vocab
        if not vocab.joint:
            raise DataError(f"{path} has a separate vocabulary per language: pretrain one side with its model file")
        return path / vocab.src_model
    if not path.is_file():
        raise DataError(f"vocabulary not found: {path} (give a data dir from nmt prepare or a SentencePiece .model)")
    return path


def pretrain(
    config: Config,
    texts: list[Path] | None = None,
    vocab: Path | None = None,
    vocab_size: int = 8000,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: tqdm.write(message, file=sys.stderr),
    data: Path | None = None,
    launch: Launch | None = None,
) -> TrainResult:
    """Pretrain a masked LM into `config.save_dir` on a monolingual data dir (`data`, from
    `nmt prepare --mono`), or on `texts`, which go through that same preparation into
    SAVE_DIR/data first: with the vocabulary `vocab` (a data dir, checkpoint or SentencePiece
    model), or one trained on the texts with `vocab_size` pieces. With a `launch` of several
    processes, start them, each running that command line."""
    started = time.time()
    check_pretrain_inputs(config, texts, vocab, data, resume)
    if launch is not None and launch.starts_processes:
        return launched_run(config, launch, resume, overwrite, started)

    def make_task(ranks: Ranks) -> MaskedLMTask:
        data_dir = Path(data) if data is not None else prepare_text(config, texts, vocab, vocab_size, resume, ranks, progress)
        return MaskedLMTask(config, data_dir, log)

    return run_training(make_task, config, Path(config.save_dir), resume, overwrite, progress, log, started)


def check_pretrain_inputs(config: Config, texts: list[Path] | None, vocab: Path | None, data: Path | None,
                          resume: bool) -> None:
    """What refuses a pretraining run before --text is prepared into OUT/data (which --overwrite
    replaces), and before torchrun starts processes that would each print the refusal."""
    if not config.save_dir:
        raise ConfigError("no checkpoint dir: set save_dir in the config or pass --out")
    if data is not None and (texts or vocab is not None):
        raise ConfigError("--data brings its own text and vocabulary: leave out --text and --vocab")
    if data is None and not texts:
        raise ConfigError("no text to pretrain on: pass --data DIR (from nmt prepare --mono) or --text FILE")
    for path in texts or []:
        if not Path(path).is_file():
            raise DataError(f"text file not found: {path}")
    if data is not None:
        check_outside_data_dir(Path(config.save_dir), Path(data))
    if config.model.arch != "transformer":
        raise ConfigError("nmt pretrain trains a Transformer encoder: set model.arch to transformer")
    defaults = TrainConfig()
    for setting in dataclasses.fields(TrainConfig):  # nmt train's: pretraining would ignore them
        key = setting.name
        if setting.metadata.get("translation_only") and getattr(config.train, key) != getattr(defaults, key):
            raise ConfigError(f"train.{key} is for nmt train (translation) and nmt pretrain does not use it: leave it "
                              f"out of the config (or --set train.{key}={json.dumps(getattr(defaults, key))})")
    resolve_precision(config.train.precision, resolve_device(config.train.device))
    if resume:
        check_resumed_task(Path(config.save_dir), MASKED_LM)


NEXT_DATA = ".data-next"  # --text prepared for a run that replaces another (hidden: nmt's own)


def prepare_text(
    config: Config, texts: list[Path], vocab: Path | None, vocab_size: int, resume: bool, ranks: Ranks, progress: bool,
) -> Path:
    """`--text`: the texts prepared as `nmt prepare --mono` does, into SAVE_DIR/data (by the main
    process; a resumed run uses the data it was prepared with). A run that replaces another
    (--overwrite) prepares them beside it, in SAVE_DIR/.data-next, which takes the place of the
    old run's data only once the new run starts (`MaskedLMTask.init_save_dir`; the old data goes
    aside with the old model, and comes back with it if the run stops before it saves); after a
    start that failed it stays there, hidden, until the next run replaces it."""
    save_dir = Path(config.save_dir)
    data_dir = save_dir / "data"
    model = vocabulary_model(Path(vocab)) if vocab is not None else None
    if resume and (data_dir / Manifest.NAME).is_file():
        check_same_text(data_dir, texts, model)
        return data_dir
    target = save_dir / NEXT_DATA if not resume and data_dir.exists() else data_dir
    ranks.barrier()  # every process has chosen before the main one writes
    if ranks.is_main:
        if resume:  # a run pretrained before its text was kept as a data dir: its own vocabulary
            model = save_dir / VocabInfo.read(save_dir).vocab.src_model
        prepare_mono(MonoPrepareConfig(
            out_dir=target, files=[Path(t).resolve() for t in texts], valid_sentences=config.pretrain.valid_sentences,
            seed=config.train.seed, vocab_size=vocab_size, spm_model=model, overwrite=True,
        ), progress=progress)
    ranks.barrier()
    return target


def check_same_text(data_dir: Path, texts: list[Path], vocab_model: Path | None) -> None:
    """--resume goes on with the text and vocabulary prepared in `data_dir`: the same files again."""
    manifest = Manifest.read(data_dir)
    prepared = [Path(t) for t in manifest.input.get("mono") or []]
    # Recorded whole since this check exists; a run prepared before recorded them as typed.
    if all(p.is_absolute() for p in prepared) and prepared != [Path(t).resolve() for t in texts]:
        raise ConfigError(f"--resume goes on with the text prepared in {data_dir} from "
                          f"{', '.join(map(str, manifest.input['mono']))}: pass those --text files (or start again with --overwrite)")
    if vocab_model is not None and file_sha256(vocab_model) != manifest.vocab.src_sha256:
        raise ConfigError(f"--vocab {vocab_model} is not the vocabulary of the run in {data_dir.parent}; leave it out to resume")


# ---------------------------------------------------------------------------------------------
# Fill-mask


@dataclass
class MaskFill:
    candidates: list[tuple[str, float]]  # (piece text, probability), best first


@dataclass
class FilledLine:
    text: str  # the input with each [MASK] replaced by its best candidate
    masks: list[MaskFill]


def load_masked_lm(save_dir: Path, device: torch.device | str = "cpu", which: str = "best"):
    """(model, SentencePiece processor) from a checkpoint dir of `nmt pretrain`."""
    save_dir = Path(save_dir)
    config = read_config(save_dir)
    info = VocabInfo.read(save_dir)
    if info.task != MASKED_LM:
        raise CheckpointError(f"{save_dir} is not a pretrained model from nmt pretrain (use nmt translate)")
    check_sentencepiece_files(save_dir, info.vocab)
    processor = load_sentencepiece(save_dir / info.vocab.src_model)
    model = MaskedLM(config.model, processor.get_piece_size(), config.pretrain.next_sentence)
    load_saved_weights(model, save_dir, which)
    return model.to(device).eval(), processor


@torch.no_grad()
def fill_mask(
    model: MaskedLM, processor, text: str, top_k: int = 5, device: torch.device | str = "cpu",
    normalize: Normalization | None = None,
) -> FilledLine:
    """The `top_k` most likely pieces for each [MASK] in `text` (one piece per mask)."""
    # As the pretraining text was (the checkpoint's record, VocabInfo.source_normalization).
    # [MASK] alone is a symbol here: [CLS], [SEP] or a tag written in the text is its characters, as in pretraining.
    encoded = encode_text(processor, [clean_whitespace((normalize or Normalization())(text))],
                          reserved_ids(processor) - {MASK})[0]
    # SentencePiece splits " [MASK]" into a bare "▁" and [MASK]; in pretraining the mask took a
    # whole piece, space included, so the bare "▁" goes (and comes back before a fill that is
    # not the start of a word).
    space = processor.piece_to_id("▁")
    spaced = [i + 1 < len(encoded) and t == space and encoded[i + 1] == MASK for i, t in enumerate(encoded)]
    ids = [t for t, dropped in zip(encoded, spaced) if not dropped]
    after_space = [i > 0 and spaced[i - 1] for i, t in enumerate(encoded) if t == MASK]  # per mask
    if MASK not in ids:
        raise DataError(f"no [MASK] in: {text}")
    if model.next_sentence:
        tokens, segments = [CLS, *ids, SEP], torch.zeros(1, len(ids) + 2, dtype=torch.long, device=device)
    else:
        tokens, segments = [*ids, EOS], None
    tokens = torch.tensor([tokens], device=device)  # (1, S)
    logits, _ = model(tokens, segments, (tokens[0] == MASK).nonzero()[:, 0])  # (M, V)
    probs = logits.float().softmax(-1)
    probs[:, :FIRST_REGULAR_ID] = 0.0  # a special symbol is never the answer
    top = probs.topk(min(top_k, probs.shape[-1] - FIRST_REGULAR_ID), dim=-1)
    masks, filled = [], [[t] for t in ids]
    positions = [i for i, t in enumerate(ids) if t == MASK]
    for row, position in enumerate(positions):
        candidates = [
            (processor.decode([int(i)]) or processor.id_to_piece(int(i)), float(p))
            for p, i in zip(top.values[row].tolist(), top.indices[row].tolist())
        ]
        masks.append(MaskFill(candidates))
        best = int(top.indices[row, 0])
        word_start = processor.id_to_piece(best).startswith("▁")
        filled[position] = [best] if word_start or not after_space[row] else [space, best]
    return FilledLine(processor.decode([t for piece in filled for t in piece]), masks)


def fill_mask_lines(save_dir: Path, lines: Iterable[str], top_k: int = 5, which: str = "best",
                    device: str = "auto") -> Iterator[FilledLine]:
    """`nmt fill-mask`: each non-blank line filled by the masked LM in `save_dir` (its `which`
    weights), normalized as its pretraining text was."""
    if top_k < 1:
        raise DataError("--top-k must be at least 1")
    resolved = resolve_device(device)
    model, processor = load_masked_lm(save_dir, resolved, which)
    normalize = VocabInfo.read(save_dir).source_normalization()
    for line in lines:
        if any("\udc80" <= c <= "\udcff" for c in line):  # undecodable bytes of a command-line argument
            raise DataError("the text is not valid UTF-8")
        if line.strip():
            yield fill_mask(model, processor, line, top_k, resolved, normalize)
