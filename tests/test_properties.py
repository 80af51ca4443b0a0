"""Property-based: random Unicode through prepare and translate never crashes or misaligns."""

import tempfile
from pathlib import Path

import pytest
from conftest import TINY_TRANSFORMER, prepare_toy_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmt.checkpoint import load_for_inference
from nmt.config import DecodeConfig, config_from_dict
from nmt.errors import NmtError
from nmt.prepare import PrepareConfig, prepare
from nmt.train import train
from nmt.translate import translate_file, translate_lines

# Any Unicode text without the line break "\n" (surrogates cannot be written as UTF-8); "\r",
# U+2028, control characters, combining marks and emoji are all allowed inside a line.
LINE = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\n"), max_size=30)
# Lines that mix the toy language's words with arbitrary text, so that translations vary.
WORDY_LINE = st.lists(st.one_of(st.sampled_from([f"w{i}" for i in range(12)]), LINE), max_size=6).map(" ".join)
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


pytestmark = pytest.mark.slow  # several processes, or training that takes seconds

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    train(config_from_dict({
        "data_dir": str(prepare_toy_data(root, train=200)), "save_dir": str(root / "model"),
        "model": TINY_TRANSFORMER,
        "train": {"max_steps": 150, "batch_tokens": 400, "lr": 3e-3, "warmup_steps": 20, "valid_every": 1000},
    }), progress=False)
    return root / "model"


@SETTINGS
@given(lines=st.lists(st.one_of(WORDY_LINE, LINE), min_size=1, max_size=12), beam=st.sampled_from([1, 3]))
def test_translate_gives_one_line_per_input_line_in_order(model_dir, tmp_path, lines, beam):
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    count = translate_file(model_dir, source, output, {"beam": beam}, device="cpu", warn=lambda m: None)
    out_lines = output.read_bytes().decode("utf-8").split("\n")
    assert count == len(lines) and out_lines[-1] == "" and len(out_lines) == len(lines) + 1
    model, tokenizer, _ = load_for_inference(model_dir)
    for line, translated in zip(lines, out_lines):
        alone = translate_lines(model, tokenizer, [line], DecodeConfig(beam=beam), "cpu").texts[0][0]
        assert translated == alone  # the batch kept each translation on its own line
        if not line.strip():
            assert translated == ""


@SETTINGS
@given(pairs=st.lists(st.tuples(LINE, LINE), min_size=1, max_size=40))
def test_prepare_accepts_random_unicode_or_says_why(tmp_path, pairs):
    corpus = tmp_path / "c"
    for suffix, side in (("xx", 0), ("yy", 1)):
        corpus.mkdir(exist_ok=True)
        (corpus / f"train.{suffix}").write_bytes("".join(p[side] + "\n" for p in pairs).encode("utf-8"))
    out = Path(tempfile.mkdtemp(dir=tmp_path)) / "data"  # tmp_path is shared by the examples
    try:
        manifest = prepare(PrepareConfig(
            out_dir=out, src_lang="xx", tgt_lang="yy", vocab_size=30, train_prefix=str(corpus / "train"),
            valid_size=1, test_size=1, overwrite=True,
        ))
    except NmtError:
        assert not out.exists() or not any(out.iterdir())  # nothing half-written
        return
    counts = manifest.counts
    assert sum(counts[s]["pairs"] for s in ("train", "valid", "test")) <= len(pairs)
    assert len((out / "test.src.txt").read_text(encoding="utf-8").split("\n")) == counts["test"]["pairs"] + 1
