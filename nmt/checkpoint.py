"""Checkpoint directories: everything needed to rebuild the model and translate, and to resume.

    SAVE_DIR/
      config.yaml            the full config the model was built and trained with
      vocab.json             languages and SentencePiece models (names, sizes, checksums)
      spm.*.model            the SentencePiece model(s)
      best/model.safetensors weights with the best dev BLEU (+ info.json)
      last/model.safetensors latest weights, with optimizer.safetensors and info.json to resume
                             (with train.ema_decay, the weights are the moving average and
                             optimizer.safetensors also holds the trained ones)
      checkpoints/step-N/    with train.keep_last / keep_best: weights at validations (nmt average)
      train_log.jsonl        metrics (`nmt plot` draws them)
      tensorboard/           the same metrics for TensorBoard, when it is installed

Only safetensors and JSON/YAML are read back: loading never unpickles objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from nmt.atomic import complete_dir, file_mode, recover_dir, remove_entry, replace_dir
from nmt.config import Config, ModelConfig, save_config, saved_config_from_dict
from nmt.errors import CheckpointError, ConfigError, first_line
from nmt.files import CONFIG_NAME, MASKED_LM, TRANSLATION, CheckpointInfo, TrainState, VocabInfo, Vocabulary
from nmt.models import build_model
from nmt.models.masked_lm import translation_weight_source
from nmt.tokenizer import Tokenizer, check_recorded_model, file_sha256
from nmt.train_log import LOG_NAME, TENSORBOARD_DIR

CHECKPOINT_NAMES = ("best", "last")
UPDATE_CHECKPOINTS = "checkpoints"  # the folder of train.keep_last / keep_best
LOCK_NAME = ".lock"  # held by the training run that writes the directory
TRAINED_WEIGHTS = "weights."  # optimizer.safetensors: the trained weights, when model.safetensors holds their average


def read_training_info(save_dir: Path) -> TrainState:
    """The state saved in `save_dir/last` (empty when there is none)."""
    directory = checkpoint_dir(save_dir, "last")
    return CheckpointInfo.read(directory).state if directory is not None else TrainState()


@contextlib.contextmanager
def training_lock(save_dir: Path):
    """Held by the training run that writes `save_dir`: a second one on the same directory is
    refused instead of racing the first one's saves."""
    import fcntl

    save_dir = Path(os.path.realpath(save_dir))  # "new/../mine" must not count "mine" as made here
    lock = save_dir / LOCK_NAME
    created = [path for path in (*reversed(save_dir.parents), save_dir, lock) if not path.exists()]
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "w")
    except OSError as e:
        raise CheckpointError(f"cannot write the checkpoint directory {save_dir}: {e.strerror or e}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CheckpointError(f"another training run is using {save_dir}") from None
        try:
            yield
        except BaseException:  # a run refused or failed: what it made and left empty goes
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    path.unlink() if path == lock else path.rmdir()
            raise


def check_outside_data_dir(save_dir: Path, data_dir: Path) -> None:
    save, data = Path(save_dir).resolve(), Path(data_dir).resolve()
    if save == data or data in save.parents:
        raise ConfigError(f"--out {save_dir} is the data dir or inside it (nmt prepare --overwrite would replace it): "
                          "choose another --out")


def checkpoint_dir(save_dir: Path, name: str) -> Path | None:
    """`save_dir/name`, or its previous version if a save was interrupted mid-replace."""
    return complete_dir(Path(save_dir) / name)


def has_checkpoint(save_dir: Path) -> bool:
    return (Path(save_dir) / UPDATE_CHECKPOINTS).is_dir() or any(
        (found := checkpoint_dir(save_dir, name)) is not None and (found / "model.safetensors").is_file()
        for name in CHECKPOINT_NAMES
    )


# `nmt train --overwrite` sets the model it replaces aside (in .replacing/, then renamed
# .replaced/ when all of it is there) and deletes it (renamed .dropping/ first) once the new run
# has saved a checkpoint: a run that fails, or is killed, before then gives it back. Each step
# can be cut short and taken up again by `restore_replaced`.
REPLACING, REPLACED, RESTORING, DROPPING = ".replacing", ".replaced", ".restoring", ".dropping"
# What a training run writes into its directory besides the SentencePiece models vocab.json
# names (tests/test_faults.py checks this against a run with every output). A folder of data in
# it, even one pretraining prepared, is left where it is.
RUN_FILES = ("best", "last", UPDATE_CHECKPOINTS, LOG_NAME, TENSORBOARD_DIR, CONFIG_NAME, VocabInfo.NAME)


def _run_files(save_dir: Path) -> list[Path]:
    names = list(RUN_FILES)
    with contextlib.suppress(CheckpointError, OSError):
        info = VocabInfo.read(save_dir)
        names += [info.vocab.src_model, info.vocab.tgt_model]
    return [save_dir / name for name in dict.fromkeys(names) if (save_dir / name).exists() or (save_dir / name).is_symlink()]


def model_dir_contents(model_dir: Path) -> list[Path]:
    """What of `model_dir` is the model's own: an output written there must be none of these and
    in none of them. A training run's directory may hold the user's files besides (a recipe's
    test.hyp); any other directory (an export) is the model's as a whole."""
    model_dir = Path(model_dir)
    if not has_config(model_dir):
        return [model_dir]
    hidden = [model_dir / name for name in (LOCK_NAME, REPLACING, REPLACED, RESTORING, DROPPING)]
    return _run_files(model_dir) + [path for path in hidden if path.exists()]


def set_aside_replaced(save_dir: Path) -> None:
    """--overwrite: move the model in `save_dir` aside (see REPLACED)."""
    save_dir = Path(save_dir)
    (save_dir / REPLACING).mkdir()
    for path in _run_files(save_dir):
        os.replace(path, save_dir / REPLACING / path.name)
    os.replace(save_dir / REPLACING, save_dir / REPLACED)


def has_set_aside_model(save_dir: Path) -> bool:
    """Whether an --overwrite run that stopped before its first checkpoint left the model it was
    replacing aside (the next training run in `save_dir` gives it back)."""
    return any((Path(save_dir) / name).is_dir() for name in (REPLACING, REPLACED, RESTORING))


def drop_replaced(save_dir: Path) -> None:
    """The new run has saved: the model it replaces goes."""
    if (Path(save_dir) / REPLACED).is_dir():
        os.replace(Path(save_dir) / REPLACED, Path(save_dir) / DROPPING)
        shutil.rmtree(Path(save_dir) / DROPPING, ignore_errors=True)


def restore_replaced(save_dir: Path) -> bool:
    """Give back the model an --overwrite run set aside, in place of what that run wrote, unless
    that run has saved a checkpoint; finish a set-aside, drop or restore that was cut short.
    Whether a model was given back."""
    save_dir = Path(save_dir)
    shutil.rmtree(save_dir / DROPPING, ignore_errors=True)
    if _put_back(save_dir, save_dir / REPLACING):  # the run had written nothing yet
        return True
    if (save_dir / REPLACED).is_dir():
        if has_checkpoint(save_dir):  # the new run's model stays
            drop_replaced(save_dir)
            return False
        written = [path for path in _run_files(save_dir) if not (save_dir / REPLACED / path.name).exists()]
        os.replace(save_dir / REPLACED, save_dir / RESTORING)
        for path in written:  # what the new run wrote that the old model has no file of
            remove_entry(path)
    return _put_back(save_dir, save_dir / RESTORING)


def _put_back(save_dir: Path, aside: Path) -> bool:
    """Move each file of `aside` back into `save_dir` (in place of one of its name there)."""
    if not aside.is_dir():
        return False
    for path in aside.iterdir():
        remove_entry(save_dir / path.name)
        os.replace(path, save_dir / path.name)
    aside.rmdir()
    return True


def recover_checkpoints(save_dir: Path) -> None:
    """Before training writes to `save_dir`: repair what a killed save left behind (in best/,
    last/ and the kept update checkpoints)."""
    for name in CHECKPOINT_NAMES:
        recover_dir(Path(save_dir) / name)
    kept = Path(save_dir) / UPDATE_CHECKPOINTS
    for name in sorted({p.name[1:].split(".")[0] for p in kept.glob(".step-*")}):  # .step-N.tmp-PID, .step-N.old-PID
        recover_dir(kept / name)


def init_save_dir(save_dir: Path, config: Config, info: VocabInfo, spm_models: Path) -> None:
    """Write the vocabulary description, config and SentencePiece models (found in the folder
    `spm_models`, a data dir) into `save_dir`."""
    save_dir.mkdir(parents=True, exist_ok=True)
    info.write(save_dir)  # first: it marks the directory as a model's (see `open_save_dir`)
    write_config(config, save_dir)
    for name in sorted({info.vocab.src_model, info.vocab.tgt_model}):
        shutil.copyfile(Path(spm_models) / name, save_dir / name)


def copy_model_description(model_dir: Path, out_dir: Path) -> None:
    """The files besides the weights that rebuild a model: its config, vocab.json and SentencePiece models."""
    info = VocabInfo.read(model_dir)
    for name in (CONFIG_NAME, info.NAME, *sorted({info.vocab.src_model, info.vocab.tgt_model})):
        shutil.copyfile(Path(model_dir) / name, Path(out_dir) / name)


def write_config(config: Config, save_dir: Path) -> None:
    save_config(config, Path(save_dir) / CONFIG_NAME)


def has_config(directory: Path) -> bool:
    return (Path(directory) / CONFIG_NAME).is_file()


def read_config(save_dir: Path) -> Config:
    if not Path(save_dir).is_dir():
        raise CheckpointError(f"checkpoint directory not found: {save_dir}")
    path = Path(save_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{save_dir} is not a checkpoint directory (no {CONFIG_NAME})")
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not saved:  # nmt writes every setting: an empty one was emptied since
            raise CheckpointError(f"{path} is empty (it holds the model's settings): copy it back from the run")
        return saved_config_from_dict(saved)
    except (yaml.YAMLError, ConfigError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged or from another version: {first_line(e)}") from None


def save_checkpoint(
    save_dir: Path,
    name: str,
    model: nn.Module,
    info: CheckpointInfo,
    optimizer: torch.optim.Optimizer | None = None,
    rng_state: dict[str, torch.Tensor] | None = None,
    trained_weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write `save_dir/name/` atomically: a crash leaves the previous one intact. A failed write
    (a full disk, say) removes its partial copy and is a one-line error. `name` may hold a folder
    (checkpoints/step-0001000). With the optimizer go the random states and, when `model` holds
    a moving average of the weights (train.ema_decay), the trained weights to resume from."""
    target = Path(save_dir) / name
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write_checkpoint_files(tmp, model, info, optimizer, rng_state, trained_weights)
        replace_dir(tmp, target)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not save {save_dir / name}: {first_line(e)}; the previous checkpoint is intact"
        ) from None


def _write_checkpoint_files(
    directory: Path, model: nn.Module, info: CheckpointInfo, optimizer: torch.optim.Optimizer | None,
    rng_state: dict[str, torch.Tensor] | None, trained_weights: dict[str, torch.Tensor] | None,
) -> None:
    save_model(model, str(directory / "model.safetensors"))
    sha256 = {"model.safetensors": file_sha256(directory / "model.safetensors")}
    groups = None
    if optimizer is not None:
        tensors, groups = _flatten_optimizer(optimizer)
        tensors.update({f"rng.{k}": v for k, v in (rng_state or {}).items()})
        tensors.update({f"{TRAINED_WEIGHTS}{k}": v for k, v in (trained_weights or {}).items()})
        save_file(tensors, str(directory / "optimizer.safetensors"))
        sha256["optimizer.safetensors"] = file_sha256(directory / "optimizer.safetensors")
    for written in directory.glob("*.safetensors"):  # safetensors makes them private (0600)
        os.chmod(written, file_mode())
    dataclasses.replace(info, sha256=sha256, param_groups=groups).write(directory)


@dataclasses.dataclass
class UpdateCheckpoint:
    """One of the checkpoints `train.keep_last` / `keep_best` keep: weights at a validation."""

    step: int
    path: Path
    score: float  # the dev score (the task's metric) of these weights


def update_checkpoint_name(step: int) -> str:
    return f"{UPDATE_CHECKPOINTS}/step-{step:07d}"


def update_checkpoints(save_dir: Path) -> list[UpdateCheckpoint]:
    """The kept update checkpoints of `save_dir`, oldest first."""
    found = []
    for path in sorted((Path(save_dir) / UPDATE_CHECKPOINTS).glob("step-*")):
        # The temporary copy of a save in progress is a hidden folder; one without its weights or
        # its info is damaged (a pruning cut short): not a checkpoint.
        if not (path / "model.safetensors").is_file():
            continue
        try:
            info = CheckpointInfo.read(path)
        except CheckpointError:
            continue
        found.append(UpdateCheckpoint(info.state.step, path, float(info.state.last_valid.get(info.metric, float("-inf")))))
    return sorted(found, key=lambda c: c.step)


def prune_update_checkpoints(save_dir: Path, keep_last: int, keep_best: int) -> None:
    """Remove the update checkpoints that are neither among the `keep_last` latest nor the
    `keep_best` best."""
    found = update_checkpoints(save_dir)
    keep = {c.step for c in found[-keep_last:]} if keep_last else set()
    keep |= {c.step for c in sorted(found, key=lambda c: c.score, reverse=True)[:keep_best]}
    kept = {c.path for c in found if c.step in keep}
    for path in (Path(save_dir) / UPDATE_CHECKPOINTS).glob("step-*"):  # damaged ones go too
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged or truncated ({e})") from None
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise CheckpointError(f"{path} does not match the model config: {detail}") from None
    if missing or unexpected:
        names = list(missing) + list(unexpected)
        raise CheckpointError(f"{path} does not match the model config (first mismatching tensor: {names[0]})")


def weights_dir(save_dir: Path, which: str = "best") -> Path:
    """`save_dir/which` (best or last), its files checked against their checksums. Without
    best/ (a run stopped before its first validation) its last/ is the best there is; last/ is
    never stood in for (an average holds best/ only, and best/ is not the latest weights)."""
    if which not in CHECKPOINT_NAMES:
        raise CheckpointError(f"checkpoint name must be one of {', '.join(CHECKPOINT_NAMES)}")
    for name in (which, "last") if which == "best" else (which,):
        directory = checkpoint_dir(save_dir, name)
        if directory is not None and (directory / "model.safetensors").is_file():
            verify_files(directory, CheckpointInfo.read(directory))
            return directory
    if which == "last" and checkpoint_dir(save_dir, "best") is not None:
        raise CheckpointError(f"{save_dir} holds the weights of best/ only (no last/); leave out --checkpoint last")
    if has_set_aside_model(save_dir):
        raise CheckpointError(f"{save_dir} holds no trained weights yet: an --overwrite run stopped before its first "
                              "checkpoint; nmt train into it again puts the model it was replacing back first")
    raise CheckpointError(f"{save_dir} holds no trained weights (no best/ or last/)")


def verify_files(directory: Path, info: CheckpointInfo) -> None:
    """Compare the checkpoint's files with the checksums written beside them."""
    for name, expected in info.sha256.items():
        path = Path(directory) / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if file_sha256(path) != expected:
            raise CheckpointError(f"{path} is damaged (its checksum does not match info.json)")


class SavedTraining(NamedTuple):
    info: CheckpointInfo
    rng: dict[str, torch.Tensor]  # the random generators' states
    # The trained weights when model.safetensors holds their moving average (train.ema_decay); else empty
    trained_weights: dict[str, torch.Tensor]


def load_training_state(save_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> SavedTraining:
    """Restore model (the weights of model.safetensors) and optimizer state from `save_dir/last`."""
    directory = checkpoint_dir(save_dir, "last")
    if directory is None:
        raise CheckpointError(f"nothing to resume: {save_dir} has no last/ checkpoint")
    info = CheckpointInfo.read(directory)
    verify_files(directory, info)
    load_weights(model, directory / "model.safetensors")
    try:
        tensors = load_file(str(directory / "optimizer.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{directory / 'optimizer.safetensors'} is missing or damaged ({e})") from None
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    trained = {k[len(TRAINED_WEIGHTS):]: v for k, v in tensors.items() if k.startswith(TRAINED_WEIGHTS)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(("rng.", TRAINED_WEIGHTS)):
            continue
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    # The saved groups say which parameters each held; their settings (betas, weight decay) are
    # the config's, as `optimizer` was built from it: a resumed run goes on with what config.yaml says.
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.state_dict()["param_groups"]]
    saved_groups = info.param_groups or []
    if len(saved_groups) != len(settings):
        raise CheckpointError(f"{directory}: optimizer state does not match the model "
                              f"({len(saved_groups)} parameter groups, the model has {len(settings)})")
    groups = [{**saved, **own} for saved, own in zip(saved_groups, settings)]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: optimizer state does not match the model ({e})") from None
    return SavedTraining(info, rng, trained)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state_dict = optimizer.state_dict()
    tensors = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{param_id}.{key}"] = tensor.detach().contiguous().cpu()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, groups


# ---------------------------------------------------------------------------------------------
def check_resumed_task(save_dir: Path, task: str) -> None:
    """--resume continues a run of the same command: a masked LM's directory is not resumed by
    nmt train, nor a translation model's by nmt pretrain (checked before anything is written)."""
    if not (Path(save_dir) / VocabInfo.NAME).is_file():
        return  # no model there: the checkpoint dir's own checks say so
    saved = VocabInfo.read(save_dir).task
    if saved != task:
        kinds = {TRANSLATION: "a translation model (nmt train)", MASKED_LM: "a pretrained masked LM (nmt pretrain)"}
        raise CheckpointError(f"{save_dir} holds {kinds.get(saved, saved)}, not {kinds[task]}; --resume continues "
                              "a run of the same command")


def check_same_model(save_dir: Path, config: Config) -> None:
    """--resume continues the model the checkpoint holds: every model setting as it was built."""
    saved = read_config(save_dir).model
    name = first_model_difference(saved, config.model)
    if name is not None:
        raise ConfigError(f"model.{name} is {getattr(config.model, name)!r} but the checkpoint in {save_dir} "
                          f"was built with {getattr(saved, name)!r}")


# Starting a translation model from a pretrained masked LM, or from a trained translation model
# to fine-tune it on other data (`nmt train --init`)

# The model settings that may differ from the --init translation model's: they change no weight.
FINE_TUNING_MAY_CHANGE = ("dropout", "attn_dropout")


def check_pretrained(pretrained_dir: Path, vocab: Vocabulary, model: ModelConfig, decoder: bool = False) -> VocabInfo:
    """Check that `pretrained_dir` can start a model built from `model` on data with `vocab` (the
    manifest's); returns its vocab.json. A masked LM (nmt pretrain) needs the data's source
    vocabulary (and target too, for `decoder`) and an encoder of `model`'s sizes (and decoder,
    for `decoder`); a translation model (nmt train) needs both vocabularies and every weight-
    shaping model setting to be the data's and `model`'s."""
    pretrained_dir = Path(pretrained_dir)
    if not pretrained_dir.is_dir():
        raise CheckpointError(f"model to start from not found: {pretrained_dir}")
    info = VocabInfo.read(pretrained_dir)
    if info.task == TRANSLATION:
        check_init_vocabulary(pretrained_dir, info, vocab, ("src", "tgt"))
        check_fine_tuning_model(pretrained_dir, model)
        return info
    if info.task != MASKED_LM:
        raise CheckpointError(f"{pretrained_dir} is neither a pretrained model (nmt pretrain) nor a translation model")
    check_init_vocabulary(pretrained_dir, info, vocab, ("src", "tgt") if decoder else ("src",))
    check_pretrained_sizes(pretrained_dir, model, decoder)
    return info


def check_init_vocabulary(pretrained_dir: Path, info: VocabInfo, vocab: Vocabulary, sides: tuple[str, ...]) -> None:
    """The data's SentencePiece model of each side in `sides` must be the one `pretrained_dir`
    was trained with (a masked LM has one, its source side's)."""
    for side in sides:
        if info.vocab.sha256(side if info.task == TRANSLATION else "src") != vocab.sha256(side):
            which = "source" if side == "src" else "target"
            raise CheckpointError(
                f"the {which} vocabulary of the data differs from the one of {pretrained_dir}; "
                f"prepare the data with --spm-model {pretrained_dir}"
            )


def check_fine_tuning_model(pretrained_dir: Path, model: ModelConfig) -> None:
    """Fine-tuning loads every weight of the translation model in `pretrained_dir`: `model` must
    build the same one (only FINE_TUNING_MAY_CHANGE may differ)."""
    saved = read_config(pretrained_dir).model
    name = first_model_difference(saved, model, FINE_TUNING_MAY_CHANGE)
    if name is not None:
        old, new = getattr(saved, name), getattr(model, name)
        raise CheckpointError(f"model.{name} is {new!r} but --init {pretrained_dir} was trained with {old!r}; "
                              f"set model.{name}={old}")


def first_model_difference(saved: ModelConfig, model: ModelConfig, may_differ: tuple[str, ...] = ()) -> str | None:
    """The name of the first model setting, not in `may_differ`, that differs between the two."""
    return next((field.name for field in dataclasses.fields(ModelConfig) if field.name not in may_differ
                 and getattr(saved, field.name) != getattr(model, field.name)), None)


def check_pretrained_sizes(pretrained_dir: Path, model: ModelConfig, decoder: bool) -> None:
    """The layers --init copies must be the pretrained encoder's, one for one: a Transformer with
    its width, heads, feed-forward size, norm placement, number of layers and the layer without a
    residual connection; with `decoder`, at most as many decoder layers (each takes the encoder
    layer of its number)."""
    if model.arch != "transformer":
        raise CheckpointError(f"--init {pretrained_dir} needs model.arch transformer (a pretrained Transformer encoder)")
    saved = read_config(pretrained_dir).model
    for key in ("embed_dim", "heads", "ff_dim", "norm", "enc_layers", "enc_no_residual_layer"):
        if getattr(model, key) != getattr(saved, key):
            raise CheckpointError(
                f"model.{key} is {getattr(model, key)} but --init {pretrained_dir} needs {getattr(saved, key)}, "
                f"its encoder's; set model.{key}={getattr(saved, key)}"
            )
    if decoder and model.dec_layers > saved.enc_layers:
        raise CheckpointError(
            f"model.dec_layers is {model.dec_layers} but --init {pretrained_dir} has {saved.enc_layers} encoder layers "
            f"for the decoder's to start from; set model.dec_layers to at most {saved.enc_layers} "
            "(or train.init_decoder=false)"
        )


def pretrained_parameters(model: nn.Module, decoder: bool) -> list[str]:
    """The names of `model`'s parameters that --init loads: those with a masked-LM counterpart."""
    return [name for name, _ in model.named_parameters() if translation_weight_source(name, decoder) is not None]


def load_pretrained(model: nn.Module, pretrained_dir: Path, vocab: Vocabulary, config: ModelConfig, decoder: bool) -> list[str]:
    """Copy the weights of a pretrained masked LM, or of a translation model's best/ (all of
    them), into `model` (built from `config`); returns the names of the parameters loaded. A
    tensor missing or of another shape is an error naming it."""
    pretrained_dir = Path(pretrained_dir)
    info = check_pretrained(pretrained_dir, vocab, config, decoder)
    directory = weights_dir(pretrained_dir)
    if info.task == TRANSLATION:
        load_weights(model, directory / "model.safetensors")
        return [name for name, _ in model.named_parameters()]
    try:
        tensors = load_file(str(directory / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{directory / 'model.safetensors'} is damaged ({e})") from None
    params = dict(model.named_parameters())
    loaded = pretrained_parameters(model, decoder)
    for name in loaded:
        source, param = translation_weight_source(name, decoder), params[name]
        if source not in tensors or tensors[source].shape != param.shape:
            found = f"has shape {tuple(tensors[source].shape)}" if source in tensors else "is missing"
            raise CheckpointError(
                f"{pretrained_dir}: {source} {found} but the model's {name} has {tuple(param.shape)}; "
                "give the model the pretrained model's sizes"
            )
        with torch.no_grad():
            param.copy_(tensors[source])
    return loaded


def check_sentencepiece_files(save_dir: Path, vocab: Vocabulary) -> None:
    """The SentencePiece models in `save_dir` must be those the model was trained with: another
    one (copied over it) reads and writes other words for the same ids."""
    for name, sha256 in {(vocab.src_model, vocab.src_sha256), (vocab.tgt_model, vocab.tgt_sha256)}:
        check_recorded_model(Path(save_dir) / name, sha256, "the model was trained with", VocabInfo.NAME, CheckpointError)


def load_for_inference(save_dir: Path, which: str = "best", device: torch.device | str = "cpu"):
    """Rebuild model, tokenizer and config from a checkpoint directory alone."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {save_dir}")
    config = read_config(save_dir)
    info = VocabInfo.read(save_dir)
    if info.task == MASKED_LM:
        raise CheckpointError(
            f"{save_dir} is a pretrained masked LM, not a translation model: use it with "
            "nmt train --init or nmt fill-mask"
        )
    vocab = info.vocab
    check_sentencepiece_files(save_dir, vocab)
    tokenizer = Tokenizer(save_dir / vocab.src_model, save_dir / vocab.tgt_model)
    if (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) != (vocab.src_size, vocab.tgt_size):
        raise CheckpointError(f"{save_dir}: SentencePiece models do not match vocab.json")
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    load_saved_weights(model, save_dir, which)
    model.to(device).eval()
    return model, tokenizer, config


def load_saved_weights(model: nn.Module, save_dir: Path, which: str) -> None:
    """The weights of `save_dir`'s `which` checkpoint (best, last or an update's) into `model`."""
    for attempt in range(2):  # a save by a running training may replace the files mid-read: look again
        try:
            load_weights(model, weights_dir(save_dir, which) / "model.safetensors")
            return
        except CheckpointError:
            if attempt == 1:
                raise
