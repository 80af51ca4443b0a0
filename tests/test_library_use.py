"""The README's Python section runs as written: the library calls behind the commands."""

import re
from pathlib import Path

import yaml
from conftest import TINY_TRANSFORMER, write_multi30k_toy

ROOT = Path(__file__).resolve().parents[1]


def _readme_python_block() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Python: the same steps as library calls", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_python_block_prepares_trains_translates_and_scores(tmp_path, monkeypatch, capsys):
    corpus = write_multi30k_toy(tmp_path / "corpus")
    tiny = tmp_path / "tiny.yaml"  # the recipe's role, in seconds
    tiny.write_text(yaml.safe_dump({
        "model": TINY_TRANSFORMER,
        "train": {"max_steps": 60, "batch_tokens": 400, "lr": 3e-3, "warmup_steps": 20, "valid_every": 30,
                  "valid_max_sentences": 5, "log_every": 30},
    }))
    code = _readme_python_block()
    for old, new in (('"../shared/data/multi30k"', repr(str(corpus))), ("vocab_size=5000", "vocab_size=40"),
                     ('"recipes/multi30k/transformer-cpu.yaml"', repr(str(tiny)))):
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # its data/ and runs/ go here
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    pairs, rest = printed[0].split(" ", 1)
    assert rest == "training pairs" and 150 < int(pairs) <= 200  # cleaning drops the duplicates
    assert [line.split()[0] for line in printed[1:]] == ["BLEU", "chrF2", "TER"]
    assert all("nrefs:1" in line for line in printed[1:])
    assert (tmp_path / "runs" / "m30k-tf-cpu" / "best").is_dir()
