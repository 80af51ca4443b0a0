import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nmt.tokenizer import BOS

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Tiny models for the tests: a few thousand parameters, trained in seconds on a CPU.
TINY_TRANSFORMER = {"arch": "transformer", "embed_dim": 32, "ff_dim": 64, "heads": 2, "enc_layers": 1,
                    "dec_layers": 1, "dropout": 0.0}
TINY_RNN = {"arch": "rnn", "cell": "gru", "embed_dim": 32, "hidden_dim": 64, "enc_layers": 1, "dec_layers": 1,
            "dropout": 0.0, "tie_output": False}


def set_options(section: str, values: dict) -> list[str]:
    """The CLI's `--set section.key=value` options for `values`."""
    return [arg for key, value in values.items() for arg in ("--set", f"{section}.{key}={value}")]


# A toy language pair: each source word has one target word, and the target reverses the order.
SRC_WORDS = [f"w{i}" for i in range(12)]
TGT_WORDS = [f"V{i}" for i in range(12)]


def toy_pairs(count: int, seed: int = 0, min_len: int = 2, max_len: int = 5) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs, seen = [], set()
    while len(pairs) < count:
        ids = [rng.randrange(len(SRC_WORDS)) for _ in range(rng.randint(min_len, max_len))]
        src = " ".join(SRC_WORDS[i] for i in ids)
        if src in seen:
            continue
        seen.add(src)
        pairs.append((src, " ".join(TGT_WORDS[i] for i in reversed(ids))))
    return pairs


def write_pairs(prefix: Path, pairs, src="xx", tgt="yy") -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.{src}").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    Path(f"{prefix}.{tgt}").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")


def write_multi30k_toy(folder: Path) -> Path:
    """The toy language under Multi30k's de/en file names (train, val, test_2016_flickr)."""
    write_pairs(folder / "train", toy_pairs(200, seed=1), "de", "en")
    write_pairs(folder / "val", toy_pairs(20, seed=2), "de", "en")
    write_pairs(folder / "test_2016_flickr", toy_pairs(20, seed=3), "de", "en")
    return folder


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    random.seed(0)
    yield


@pytest.fixture
def toy_corpus(tmp_path) -> Path:
    """Files toy/train.xx|yy, toy/valid.*, toy/test.* of the toy language; returns the folder."""
    write_pairs(tmp_path / "toy" / "train", toy_pairs(300, seed=1))
    write_pairs(tmp_path / "toy" / "valid", toy_pairs(20, seed=2))
    write_pairs(tmp_path / "toy" / "test", toy_pairs(20, seed=3))
    return tmp_path / "toy"


def prepare_toy_data(root: Path, train: int, valid: int = 5, test: int = 5, vocab_size: int = 40,
                     joint_vocab: bool = True) -> Path:
    """A prepared data dir (xx -> yy) of the toy language under `root`; returns its path."""
    from nmt.prepare import PrepareConfig, prepare

    write_pairs(root / "c" / "train", toy_pairs(train, seed=1))
    write_pairs(root / "c" / "valid", toy_pairs(valid, seed=2))
    write_pairs(root / "c" / "test", toy_pairs(test, seed=3))
    prepare(PrepareConfig(
        out_dir=root / "data", src_lang="xx", tgt_lang="yy", vocab_size=vocab_size, joint_vocab=joint_vocab,
        train_prefix=str(root / "c" / "train"), valid_prefix=str(root / "c" / "valid"),
        test_prefix=str(root / "c" / "test"),
    ))
    return root / "data"


def assert_one_line_error(result, *fragments) -> None:
    """A CliRunner result that failed with one line naming each of `fragments`, no traceback."""
    assert result.exit_code != 0
    message = result.output.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


def train_tiny(data_dir: Path, save_dir: Path, model: dict, overwrite: bool = False, **train_options) -> Path:
    """A tiny model trained for 120 updates (seconds) on a toy data dir; returns `save_dir`."""
    from nmt.config import config_from_dict
    from nmt.train import train

    train(config_from_dict({
        "data_dir": str(data_dir), "save_dir": str(save_dir), "model": model,
        "train": {"max_steps": 120, "batch_tokens": 400, "lr": 3e-3, "warmup_steps": 20, "valid_every": 30,
                  "valid_max_sentences": 5, "log_every": 30, **train_options},
    }), progress=False, overwrite=overwrite)
    return save_dir


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory) -> tuple[Path, Path]:
    """(data dir, model): the toy language and a tiny Transformer trained for 100 updates,
    validated at 30, 60, 90 (the last 2 kept) and, off schedule, at 100."""
    root = tmp_path_factory.mktemp("tiny")
    data = prepare_toy_data(root, train=200)
    return data, train_tiny(data, root / "model", TINY_TRANSFORMER, max_steps=100, valid_every=30, keep_last=2)


# A hand-built step decoder for search tests: the next token's distribution depends on the
# previous token only.
@dataclass
class TableMemory:
    src: torch.Tensor

    def reorder(self, indices):
        return TableMemory(self.src.index_select(0, indices))


@dataclass
class TableState:
    prev: torch.Tensor  # (B,) previous token

    def reorder(self, indices):
        return TableState(self.prev.index_select(0, indices))


class TableModel:
    """Next-token distribution given by a table indexed by the previous token."""

    def __init__(self, table: torch.Tensor):
        self.log_table = table.log()  # (V, V)

    def encode(self, src):
        return TableMemory(src)

    def init_state(self, memory, attention=None):
        return TableState(torch.full((memory.src.shape[0],), BOS))

    def decode_step(self, prev_tokens, memory, state):
        return self.log_table[prev_tokens].clone(), TableState(prev_tokens)


def table(rows: dict[int, dict[int, float]], V: int = 6) -> torch.Tensor:
    table = torch.full((V, V), 1e-9)
    for prev, dist in rows.items():
        for tok, p in dist.items():
            table[prev, tok] = p
    return table / table.sum(1, keepdim=True)
