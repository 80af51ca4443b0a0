"""The JSON files of data dirs and checkpoint dirs, as versioned dataclasses:

    DATA_DIR/manifest.json      Manifest: languages, counts, cleaning, normalization, vocabulary
    SAVE_DIR/vocab.json         VocabInfo: what the checkpoint translates (or, pretrained, models)
    SAVE_DIR/{best,last}/info.json   CheckpointInfo: the training state and the files' checksums
    EXPORT_DIR/nmt_export.json  ExportRecord: what an export for CTranslate2 holds besides the model

and the names of a data dir's other files (SentencePiece models, held-out text, monolingual
documents). Everything else reads and writes them through this module. Files written by earlier
versions are read here too, and what they lack or spell differently is made up here and nowhere
else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nmt import __version__
from nmt.atomic import write_text_atomic
from nmt.config import Config, config_from_dict
from nmt.errors import CheckpointError, ConfigError, DataError
from nmt.normalize import Normalization

FORMAT_VERSION = 1
EXPORT_FORMAT_VERSION = 1  # of nmt_export.json
CONFIG_NAME = "config.yaml"  # a model directory's full config (nmt.checkpoint reads and writes it)
TRANSLATION, MASKED_LM = "translation", "masked_lm"  # the tasks a checkpoint can hold

# A data dir's other files, named here so that writers and readers agree:
SPM_JOINT, SPM_SRC, SPM_TGT = "spm.joint", "spm.src", "spm.tgt"  # SentencePiece models: STEM.model, STEM.vocab


def text_files(data_dir: Path, stem: str) -> tuple[Path, Path]:
    """A held-out split's source and reference text (STEM.src.txt, STEM.tgt.txt), STEM being
    valid or test, or valid.DIRECTION and test.DIRECTION in a multilingual data dir."""
    return Path(data_dir) / f"{stem}.src.txt", Path(data_dir) / f"{stem}.tgt.txt"


def monolingual_files(data_dir: Path, split: str) -> tuple[str, Path]:
    """A monolingual split's token files, by their stem (SPLIT.text, as `TokenArray` takes it), and
    the file of its sentences' document numbers."""
    return f"{split}.text", Path(data_dir) / f"{split}.documents.npy"


def _known_fields(cls: type, data: dict) -> dict:
    """The entries of `data` that are fields of `cls` (later versions may add others); a
    TypeError for one of another JSON kind than its field (a hand-edited file)."""
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    known = {key: value for key, value in data.items() if key in kinds}
    for key, value in known.items():
        if not _fits(kinds[key], value):
            raise TypeError(f"{key} holds {type(value).__name__}")
    return known


_JSON_KINDS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,), "list": (list,)}


def _fits(annotation, value) -> bool:
    """Whether `value` is of the JSON kind that a field's annotation ("int", "dict | None",
    "list[str]") names; fields of other types (records of their own) are checked by those."""
    for alternative in str(annotation).split("|"):
        name, _, inner = alternative.strip().partition("[")
        if name == "None":
            if value is None:
                return True
        elif name not in _JSON_KINDS:
            return True
        elif isinstance(value, _JSON_KINDS[name]) and (name == "bool" or not isinstance(value, bool)):
            # list[X]: each item an X too (dict[K, V] is left to its readers)
            return name != "list" or not inner or all(_fits(inner.rstrip("]"), item) for item in value)
    return False


def _read_json(path: Path, missing: str, damaged: str, error: type[Exception]) -> dict:
    if not path.is_file():
        raise error(missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise error(damaged) from None
    if not isinstance(data, dict):
        raise error(damaged)
    check_format_version(data, path, FORMAT_VERSION, error)
    return data


def check_format_version(data: dict, path: Path, readable: int, error: type[Exception]) -> None:
    """Refuse a file of a later format than this nmt reads: fields added later are ignored, and
    a new format_version means that the meaning of earlier ones changed."""
    version = data.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise error(f"{path} is damaged (format_version {version!r})")
    if version > readable:
        raise error(f"{path} has format version {version}, newer than this nmt reads ({readable}): upgrade nmt")


def _sides(saved) -> dict:
    """A normalization record as {"src": ..., "tgt": ...}; older files hold one Unicode form for both."""
    if isinstance(saved, dict) and "src" in saved:
        return saved
    one = Normalization.from_saved(saved or "NFC").as_dict()
    return {"src": one, "tgt": one}


@dataclass
class Vocabulary:
    """The SentencePiece model(s) of a data dir or checkpoint: file names, sizes and checksums."""

    src_model: str
    tgt_model: str
    src_size: int
    tgt_size: int
    src_sha256: str
    tgt_sha256: str
    joint: bool = True
    type: str | None = "unigram"  # None: a given model's (prepare --spm-model), whose training is not known here
    requested_size: int | None = None
    character_coverage: float | None = None
    sample_sentences: int | None = None
    given_model: str | None = None  # prepare --spm-model

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        return cls(**_known_fields(cls, data))

    def sha256(self, side: str) -> str:
        return self.src_sha256 if side == "src" else self.tgt_sha256

    def size(self, side: str) -> int:
        return self.src_size if side == "src" else self.tgt_size


class _VocabularyRecord:
    """What manifest.json and vocab.json share: a vocabulary, a normalization record per side,
    and how they are built from their JSON and written back."""

    NAME: str
    vocab: Vocabulary
    normalization: dict
    languages: dict  # a multilingual record's: the normalization record of each language

    @classmethod
    def _from_json(cls, data: dict, normalization) -> _VocabularyRecord | None:
        """The record, or None when `data` lacks a field or holds one of the wrong kind."""
        try:
            values = _known_fields(cls, {k: v for k, v in data.items() if k not in ("vocab", "normalization")})
            values["vocab"] = Vocabulary.from_dict(data["vocab"])
            values["normalization"] = _sides(normalization)
            record = cls(**values)
            for saved in [record.normalization["src"], record.normalization["tgt"], *record.languages.values()]:
                Normalization.from_saved(saved)  # a known Unicode form and script
            return record
        except (KeyError, TypeError, AttributeError, DataError):
            return None

    def write(self, directory: Path) -> None:
        write_text_atomic(Path(directory) / self.NAME, json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False))

    def source_normalization(self) -> Normalization:
        return Normalization.from_saved(self.normalization["src"])

    def target_normalization(self) -> Normalization:
        return Normalization.from_saved(self.normalization["tgt"])

    def language_normalization(self, lang: str) -> Normalization:
        return Normalization.from_saved(self.languages[lang])


@dataclass
class Manifest(_VocabularyRecord):
    """`manifest.json` of a data dir written by `nmt prepare`."""

    src_lang: str  # a monolingual data dir: its languages, joined by "+"
    tgt_lang: str
    vocab: Vocabulary
    counts: dict  # split -> {"pairs", "src_tokens", "tgt_tokens"} (monolingual: "sentences", "tokens", "documents")
    kind: str = "parallel"  # or "monolingual" (nmt prepare --mono, for nmt pretrain)
    # per side, applied to the text (a Normalization record); translate applies the source side's
    normalization: dict = field(default_factory=lambda: _sides(None))
    filters: dict = field(default_factory=dict)
    cleaning: dict = field(default_factory=dict)  # how many pairs each step changed or dropped
    input: dict = field(default_factory=dict)
    valid_unk_percent: dict = field(default_factory=dict)
    token_dtype: str = "uint16"
    files: list[str] = field(default_factory=list)
    disk_bytes: int = 0
    stage_seconds: dict = field(default_factory=dict)
    encode_workers: int = 1
    split_seed: int | None = None
    split_by: str | None = None
    seconds: float = 0.0
    format_version: int = FORMAT_VERSION
    nmt_version: str = ""
    # A multilingual data dir (nmt prepare --directions): the trained directions ("de-en"), in
    # the order of their pairs in train; the directions with valid/test sets only (zero-shot);
    # each language's normalization record (every language has a tag, `language_tag`); per
    # direction the counts of each split and what cleaning did; the sampling temperature.
    directions: list[str] = field(default_factory=list)
    zero_shot: list[str] = field(default_factory=list)
    languages: dict = field(default_factory=dict)
    direction_counts: dict = field(default_factory=dict)
    direction_cleaning: dict = field(default_factory=dict)
    lang_temperature: float | None = None

    NAME = "manifest.json"

    @property
    def multilingual(self) -> bool:
        return bool(self.directions)

    def eval_directions(self) -> list[str]:
        """The directions with valid and test sets: trained, then zero-shot."""
        return self.directions + self.zero_shot

    @staticmethod
    def written_by_nmt(path: Path) -> bool:
        """Whether `path` (a manifest.json, a name other programs use too) is a JSON object with
        the fields every version of prepare wrote (a web extension's manifest.json does not)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        required = {f.name for f in dataclasses.fields(Manifest)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        return isinstance(data, dict) and required <= data.keys()

    @classmethod
    def read(cls, data_dir: Path) -> Manifest:
        path = Path(data_dir) / cls.NAME
        data = _read_json(path, f"{data_dir} is not a prepared data dir (no {cls.NAME}); run nmt prepare",
                          f"{path} is damaged; run nmt prepare again", DataError)
        # Before per-language normalization, the filters held the Unicode form alone.
        filters = data.get("filters") if isinstance(data.get("filters"), dict) else {}
        manifest = cls._from_json(data, data.get("normalization", filters.get("normalization")))
        if manifest is None:
            raise DataError(f"{path} is damaged or from another version; run nmt prepare again")
        return manifest


@dataclass
class VocabInfo(_VocabularyRecord):
    """`vocab.json` of a checkpoint dir: the task, languages, normalization and vocabulary."""

    vocab: Vocabulary
    task: str = TRANSLATION  # or MASKED_LM (nmt pretrain)
    src_lang: str | None = None
    tgt_lang: str | None = None
    normalization: dict = field(default_factory=lambda: _sides(None))
    texts: list[str] | None = None  # what a masked LM was pretrained on
    format_version: int = FORMAT_VERSION
    # A multilingual model: its trained directions and each language's normalization record
    directions: list[str] = field(default_factory=list)
    languages: dict = field(default_factory=dict)
    # ... and per target language, the pieces its training targets use (`pack_pieces`), which
    # decoding may be restricted to (decode.restrict_vocab); models trained before have none.
    target_pieces: dict = field(default_factory=dict)
    # the training pairs (a masked LM: sentences) of the data dir it was trained on (--resume
    # checks them); None before
    train_pairs: int | None = None

    NAME = "vocab.json"

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> VocabInfo:
        train = manifest.counts.get("train")
        return cls(manifest.vocab, TRANSLATION, manifest.src_lang, manifest.tgt_lang, manifest.normalization,
                   directions=list(manifest.directions), languages=dict(manifest.languages),
                   train_pairs=train.get("pairs") if isinstance(train, dict) else None)

    @property
    def multilingual(self) -> bool:
        return bool(self.directions)

    def target_piece_mask(self, lang: str) -> np.ndarray | None:
        """(V,) bool: the pieces `lang`'s training targets use; None when not recorded."""
        packed = self.target_pieces.get(lang)
        return None if packed is None else unpack_pieces(packed, self.vocab.tgt_size)

    @classmethod
    def read(cls, save_dir: Path) -> VocabInfo:
        path = Path(save_dir) / cls.NAME
        data = _read_json(path, f"{save_dir} is not a checkpoint directory (no {cls.NAME})",
                          f"{path} is damaged", CheckpointError)
        info = cls._from_json(data, data.get("normalization"))
        if info is None:
            raise CheckpointError(f"{path} is damaged or from another version")
        return info


def pack_pieces(mask: np.ndarray) -> str:
    """A (V,) bool mask over the vocabulary as hex (piece 0 is the first byte's highest bit):
    a thousand characters for 8,000 pieces."""
    return np.packbits(np.asarray(mask, dtype=bool)).tobytes().hex()


def unpack_pieces(packed: str, vocab_size: int) -> np.ndarray:
    try:
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed), dtype=np.uint8))
    except (TypeError, ValueError):
        raise CheckpointError("vocab.json: a language's target pieces are damaged") from None
    if len(bits) < vocab_size:
        raise CheckpointError("vocab.json: a language's target pieces do not cover the vocabulary")
    return bits[:vocab_size].astype(bool)


@dataclass
class TrainState:
    """Where a training run stands: what `last/` saves and `--resume` restores."""

    step: int = 0
    epoch: int = 0
    group_in_epoch: int = 0  # updates done in the current epoch
    best_score: float = -1.0  # the best dev score (the task's metric) so far, and its step
    best_step: int = 0
    bad_validations: int = 0  # scheduled validations in a row without a better score than patience_score
    # The best score of the validations on the train.valid_every schedule, which patience counts
    # from; best_score also counts one made at a stop between two (see Trainer.validate_and_save).
    patience_score: float = -1.0
    seconds: float = 0.0  # training time of the run before this process started (resumed runs)
    valid_seconds: float = 0.0  # of which validating and saving checkpoints
    last_valid: dict = field(default_factory=dict)
    processes: int | None = None  # of the run that saved it; None in checkpoints that predate it


@dataclass
class CheckpointInfo:
    """`info.json` of `best/` or `last/`: the training state when saved, the dev metric, the
    files' checksums and (last/) the optimizer's parameter groups."""

    state: TrainState
    metric: str = "bleu"
    sha256: dict[str, str] = field(default_factory=dict)
    param_groups: list[dict] | None = None
    averaged: list[str] | None = None  # `nmt average`: the checkpoints whose mean these weights are
    loss_scale: dict | None = None  # last/ under loss scaling (fp16): the gradient scaler's state
    format_version: int = FORMAT_VERSION

    NAME = "info.json"

    @classmethod
    def read(cls, directory: Path) -> CheckpointInfo:
        path = Path(directory) / cls.NAME
        data = _read_json(path, f"{path} is missing or damaged", f"{path} is missing or damaged", CheckpointError)
        try:
            if "best_score" not in data and "best_bleu" in data:  # written before pretraining had a metric of its own
                data["best_score"] = data["best_bleu"]
            if "patience_score" not in data and "best_score" in data:  # written before the two were apart
                data["patience_score"] = data["best_score"]
            state = TrainState(**_known_fields(TrainState, data))
            return cls(state, **{k: v for k, v in _known_fields(cls, data).items() if k != "state"})
        except TypeError:
            raise CheckpointError(f"{path} is damaged or from another version") from None

    def to_dict(self) -> dict:
        state = dataclasses.asdict(self.state)
        state["seconds"], state["valid_seconds"] = round(state["seconds"], 1), round(state["valid_seconds"], 1)
        return {**state, **{k: v for k, v in dataclasses.asdict(self).items() if k != "state"}}

    def write(self, directory: Path) -> None:
        (Path(directory) / self.NAME).write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")


@dataclass
class ExportRecord:
    """`nmt_export.json`: what an export directory (`nmt export`) holds besides the CTranslate2 model."""

    format: str
    languages: dict  # {"source": ..., "target": ...} as the data dir named them
    sentencepiece: dict  # {"source": file name, "target": file name} (the same one when joint)
    normalization: dict  # {"src": ..., "tgt": ...}: the checkpoint's record (`nmt.files.VocabInfo`)
    decode: dict  # the checkpoint's decode config: the defaults of translating
    model: dict  # the checkpoint's model config
    quantization: str | None  # of the stored weights; None: float32
    checkpoint: str  # the weights exported (a best/ or last/ directory)
    step: int  # the training update of those weights
    max_positions: int  # rows of the position tables: the longest source (EOS included) or output
    attention: str  # the cross-attention CTranslate2 returns, in words
    directions: list[str] = field(default_factory=list)  # a multilingual model's (its vocab.json is copied too)
    int8_weight_range: int = 127  # the largest |weight| of int8 weights (exports before 7-bit ones: 127)
    sentencepiece_sha256: dict = field(default_factory=dict)  # as `sentencepiece` (earlier exports: none)
    # The --checkpoint asked for: "best" of a run stopped before its first validation exports last/.
    checkpoint_asked: str = ""
    format_version: int = EXPORT_FORMAT_VERSION
    nmt_version: str = __version__

    NAME = "nmt_export.json"

    @classmethod
    def exists(cls, directory: Path) -> bool:
        return (Path(directory) / cls.NAME).is_file()

    def write(self, directory: Path) -> None:
        (Path(directory) / self.NAME).write_text(json.dumps(dataclasses.asdict(self), indent=2), encoding="utf-8")

    @classmethod
    def read(cls, directory: Path) -> ExportRecord:
        path = Path(directory) / cls.NAME
        if not path.is_file():
            if (Path(directory) / CONFIG_NAME).is_file():
                raise CheckpointError(f"{directory} is a checkpoint directory: translate it with --engine nmt, or "
                                      "export it first with nmt export")
            raise CheckpointError(f"{directory} is not a directory of nmt export (no {cls.NAME})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                check_format_version(data, path, EXPORT_FORMAT_VERSION, CheckpointError)
            record = cls(**_known_fields(cls, data))
            sides_named = all(set(getattr(record, name)) >= {"source", "target"} for name in ("languages", "sentencepiece"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, AttributeError):
            sides_named = False
        if not sides_named:
            raise CheckpointError(f"{path} is damaged")
        return record

    def config(self) -> Config:
        """The checkpoint's model and decode configs (the rest: defaults)."""
        try:
            return config_from_dict({"model": self.model, "decode": self.decode})
        except ConfigError as e:
            raise CheckpointError(f"{self.NAME} is damaged or from another version: {e}") from None

    def source_normalization(self) -> Normalization:
        return Normalization.from_saved(self.normalization.get("src"))

    def target_normalization(self) -> Normalization:
        return Normalization.from_saved(self.normalization.get("tgt"))
