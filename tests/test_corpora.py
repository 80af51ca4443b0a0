"""`nmt prepare --corpus`: the recipes' public corpora, from the Hub or from local files.

The Hub is out of reach in tests: `datasets.load_dataset` is replaced by one that records its
arguments and returns `datasets` objects built from local sample rows, so everything after
loading runs as it would online.
"""

import json

import datasets
import pytest
from conftest import toy_pairs
from nmt_cli.main import app
from typer.testing import CliRunner

from nmt.corpora import CORPORA
from nmt.errors import DataError
from nmt.prepare import PrepareConfig, prepare


def _rows(corpus, count, seed):
    """Sample rows in the corpus's own layout (toy sentences stand in for the real ones)."""
    first, second = CORPORA[corpus].languages
    pairs = toy_pairs(count, seed=seed)
    if corpus == "multi30k":  # flat language columns
        return {first: [s for s, _ in pairs], second: [t for _, t in pairs]}
    return {"translation": [{first: s, second: t} for s, t in pairs]}


def _sample(corpus):
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(_rows(corpus, 120, 1)),
        "validation": datasets.Dataset.from_dict(_rows(corpus, 10, 2)),
        "test": datasets.Dataset.from_dict(_rows(corpus, 12, 3)),
    })


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_corpus_from_the_hub(corpus, tmp_path, monkeypatch):
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return _sample(corpus)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    src, tgt = CORPORA[corpus].languages
    manifest = prepare(PrepareConfig(out_dir=tmp_path / "data", src_lang=tgt, tgt_lang=src, vocab_size=40,
                                     corpus=corpus))
    entry = CORPORA[corpus]
    expected = {k: v for k, v in (("revision", entry.revision), ("data_dir", entry.data_dir)) if v}
    assert calls == [(entry.hub_id, entry.config, expected)]
    assert manifest.counts["valid"]["pairs"] == 10 and manifest.counts["test"]["pairs"] == 12
    assert manifest.input == {"corpus": corpus, "local_files": None}
    # Both directions: the source side is the language asked for.
    test_src = (tmp_path / "data" / "test.src.txt").read_text(encoding="utf-8").splitlines()
    test = _sample(corpus)["test"]
    assert test_src == (list(test[tgt]) if corpus == "multi30k" else [row[tgt] for row in test["translation"]])


def test_corpus_from_local_files(tmp_path):
    folder = tmp_path / "wmt16"
    folder.mkdir()
    for split, count, seed in (("train", 150, 1), ("validation", 8, 2), ("test", 9, 3)):
        rows = _rows("wmt16-ro-en", count, seed)["translation"]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"translation": r}) + "\n" for r in rows))
    manifest = prepare(PrepareConfig(out_dir=tmp_path / "data", src_lang="ro", tgt_lang="en", vocab_size=40,
                                     corpus="wmt16-ro-en", corpus_dir=folder))
    assert manifest.counts["valid"]["pairs"] == 8 and manifest.counts["test"]["pairs"] == 9
    assert manifest.input["local_files"] == str(folder)


def test_a_local_copy_reads_its_corpus_folder_and_a_lone_test_split_is_kept(tmp_path):
    folder = tmp_path / "iwslt_copy"
    for config, count in (("iwslt2017-de-en", 1), ("iwslt2017-en-de", 2)):  # as the parquet export holds them
        for split, size, seed in (("train", 150, 1), ("test", 9, 3)):  # no validation split
            (folder / config / split).mkdir(parents=True)
            rows = _rows("iwslt2017-de-en", size, seed + count)["translation"]
            (folder / config / split / "rows.jsonl").write_text("".join(json.dumps({"translation": r}) + "\n" for r in rows))
    manifest = prepare(PrepareConfig(out_dir=tmp_path / "data", src_lang="de", tgt_lang="en", vocab_size=40,
                                     corpus="iwslt2017-de-en", corpus_dir=folder, valid_size=5))
    assert manifest.counts["test"]["pairs"] == 9 and manifest.counts["valid"]["pairs"] == 5  # test given, valid carved
    test = _rows("iwslt2017-de-en", 9, 4)["translation"]
    assert (tmp_path / "data" / "test.tgt.txt").read_text(encoding="utf-8").splitlines() == [r["en"] for r in test]


def test_unknown_corpus_or_languages(tmp_path):
    with pytest.raises(DataError, match="unknown corpus 'wmt99'"):
        prepare(PrepareConfig(out_dir=tmp_path / "d", src_lang="de", tgt_lang="en", corpus="wmt99"))
    result = CliRunner().invoke(app, ["prepare", "--corpus", "wmt14-de-en", "--src", "fr", "--tgt", "en",
                                      "--out", str(tmp_path / "d")])
    assert result.exit_code == 1 and "has the languages de and en, not fr-en" in result.output
    assert len(result.output.strip().splitlines()) == 1
