import gzip
import json

import numpy as np
import pytest

from conftest import SHARED_DATA, toy_pairs, write_pairs
from nmt.data import CleanConfig, ParallelSplit, read_manifest
from nmt.errors import DataError
from nmt.prepare import PrepareConfig, prepare
from nmt.tokenizer import Tokenizer


def _config(out, **kwargs):
    defaults = dict(src_lang="xx", tgt_lang="yy", vocab_size=60)
    return PrepareConfig(out_dir=out, **{**defaults, **kwargs})


def test_prepare_from_files_with_given_splits(toy_corpus, tmp_path):
    out = tmp_path / "data"
    manifest = prepare(_config(
        out, train_prefix=str(toy_corpus / "train"), valid_prefix=str(toy_corpus / "valid"),
        test_prefix=str(toy_corpus / "test"),
    ))
    assert manifest == read_manifest(out)
    assert manifest["counts"]["valid"]["pairs"] == 20 and manifest["counts"]["test"]["pairs"] == 20
    assert manifest["counts"]["train"]["pairs"] + manifest["cleaning"]["overlap_with_valid_test"] <= 300
    assert (out / "test.tgt.txt").read_text().splitlines() == (toy_corpus / "test.yy").read_text().splitlines()
    tokenizer = Tokenizer(out / manifest["vocab"]["src_model"], out / manifest["vocab"]["tgt_model"])
    split = ParallelSplit.load(out, "valid")
    first_src = (toy_corpus / "valid.xx").read_text().splitlines()[0]
    assert split.src[0].tolist() == tokenizer.encode_src([first_src])[0]
    assert split.src.tokens.dtype == np.uint16
    assert not list(tmp_path.glob(".data.tmp-*"))


def test_prepare_tsv_carves_fixed_splits(tmp_path):
    path = tmp_path / "c.tsv.gz"
    pairs = toy_pairs(200, seed=4)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(f"{t}\t{s}\n" for s, t in pairs)
    config = dict(tsv=path, tsv_langs=("yy", "xx"), valid_size=10, test_size=15, seed=7)
    first = prepare(_config(tmp_path / "a", **config))
    prepare(_config(tmp_path / "b", **config))
    assert first["counts"]["train"]["pairs"] == 175
    assert (tmp_path / "a" / "test.src.txt").read_text() == (tmp_path / "b" / "test.src.txt").read_text()
    test_src = set((tmp_path / "a" / "test.src.txt").read_text().splitlines())
    assert test_src <= {s for s, _ in pairs}
    assert first["vocab"]["joint"]


def test_prepare_separate_vocab_bpe(toy_corpus, tmp_path):
    manifest = prepare(_config(tmp_path / "d", train_prefix=str(toy_corpus / "train"), joint_vocab=False,
                               spm_type="bpe", valid_size=10, test_size=10))
    assert manifest["vocab"]["src_model"] == "spm.src.model" and manifest["vocab"]["tgt_model"] == "spm.tgt.model"


def test_prepare_from_datasets_local_folder(tmp_path):
    folder = tmp_path / "hub_copy"
    folder.mkdir()
    for split, seed, count in (("train", 1, 120), ("validation", 2, 10), ("test", 3, 12)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for s, t in toy_pairs(count, seed=seed):
                f.write(json.dumps({"xx": s, "yy": t}) + "\n")
    manifest = prepare(_config(tmp_path / "data", hf_name=str(folder)))
    assert manifest["counts"]["valid"]["pairs"] == 10 and manifest["counts"]["test"]["pairs"] == 12
    assert manifest["input"]["datasets"] == str(folder)


def test_empty_after_filtering_is_an_error(tmp_path):
    write_pairs(tmp_path / "bad", [("a b c d e f g", "x")] * 5)
    with pytest.raises(DataError, match="no sentence pairs left after cleaning"):
        prepare(_config(tmp_path / "out", train_prefix=str(tmp_path / "bad"), clean=CleanConfig(max_ratio=2)))
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(toy_corpus, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="--overwrite"):
        prepare(_config(out, train_prefix=str(toy_corpus / "train"), valid_size=10, test_size=10))
    assert (out / "keep.txt").read_text() == "user data"


@pytest.mark.skipif(not (SHARED_DATA / "multi30k").is_dir(), reason="shared Multi30k data not present")
def test_prepare_multi30k_gz_files(tmp_path):
    manifest = prepare(PrepareConfig(
        out_dir=tmp_path / "m30k", src_lang="de", tgt_lang="en", vocab_size=2000,
        train_prefix=str(SHARED_DATA / "multi30k" / "val"),
        valid_prefix=str(SHARED_DATA / "multi30k" / "test_2016_flickr"),
        test_prefix=str(SHARED_DATA / "multi30k" / "test_2016_flickr"),
    ))
    assert manifest["counts"]["test"]["pairs"] == 1000
    assert manifest["counts"]["train"]["pairs"] > 1000
