import gzip
import json

import numpy as np
import pytest
from conftest import SHARED_DATA, toy_pairs, write_pairs

from nmt.data import CleanConfig, ParallelSplit
from nmt.errors import DataError
from nmt.files import Manifest
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
    assert manifest == Manifest.read(out)
    assert manifest.counts["valid"]["pairs"] == 20 and manifest.counts["test"]["pairs"] == 20
    assert manifest.counts["train"]["pairs"] + manifest.cleaning["overlap_with_valid_test"] <= 300
    assert (out / "test.tgt.txt").read_text().splitlines() == (toy_corpus / "test.yy").read_text().splitlines()
    tokenizer = Tokenizer(out / manifest.vocab.src_model, out / manifest.vocab.tgt_model)
    split = ParallelSplit.load(out, "valid")
    first_src = (toy_corpus / "valid.xx").read_text().splitlines()[0]
    assert split.src[0].tolist() == tokenizer.encode_src([first_src])[0]
    assert split.src.tokens.dtype == np.uint16
    assert not list(tmp_path.glob(".data.tmp-*"))


def test_given_references_are_in_the_unicode_form_the_model_writes(toy_corpus, tmp_path):
    """A reference with decomposed accents (NFD) would match no output, which is NFC: a perfect
    translation would lose BLEU."""
    decomposed = ["cafe\u0301  w1", "nin\u0303o w2"]
    write_pairs(tmp_path / "given", [("w1 w2", decomposed[0]), ("w3", decomposed[1])])
    out = tmp_path / "data"
    prepare(_config(out, train_prefix=str(toy_corpus / "train"), valid_prefix=str(tmp_path / "given"),
                    test_prefix=str(tmp_path / "given")))
    assert (out / "test.tgt.txt").read_text().splitlines() == ["café w1", "niño w2"]

    path = tmp_path / "c.tsv.gz"
    pairs = toy_pairs(200, seed=4)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(f"{t}\t{s}\n" for s, t in pairs)
    config = dict(tsv=path, tsv_langs=("yy", "xx"), valid_size=10, test_size=15, seed=7)
    first = prepare(_config(tmp_path / "a", **config))
    prepare(_config(tmp_path / "b", **config))
    assert first.counts["train"]["pairs"] == 175
    assert (first.counts["valid"]["pairs"], first.counts["test"]["pairs"]) == (10, 15)  # each its own size
    assert len((tmp_path / "a" / "valid.src.txt").read_text().splitlines()) == 10
    assert (tmp_path / "a" / "test.src.txt").read_text() == (tmp_path / "b" / "test.src.txt").read_text()
    test_src = set((tmp_path / "a" / "test.src.txt").read_text().splitlines())
    assert test_src <= {s for s, _ in pairs}
    assert first.vocab.joint


@pytest.mark.parametrize("tgt_lang", ["yy", "zh"])
def test_given_sources_are_written_as_given_whatever_the_target_side_gets(tgt_lang, tmp_path):
    """The source of a held-out pair is what the user gave (translate normalizes its input
    itself); only the reference takes the target's normalization (for Chinese, its script too)."""
    write_pairs(tmp_path / "given", [("cafe\u0301 w1", "我們 w1"), ("w3", "w2")], tgt=tgt_lang)
    write_pairs(tmp_path / "train", toy_pairs(300, seed=1), tgt=tgt_lang)
    out = tmp_path / "data"
    prepare(_config(out, tgt_lang=tgt_lang, vocab_size=300, train_prefix=str(tmp_path / "train"),
                    valid_prefix=str(tmp_path / "given"), test_prefix=str(tmp_path / "given")))
    assert (out / "test.src.txt").read_text(encoding="utf-8").splitlines() == ["cafe\u0301 w1", "w3"]
    references = (out / "test.tgt.txt").read_text(encoding="utf-8").splitlines()
    assert references == (["我们 w1", "w2"] if tgt_lang == "zh" else ["我們 w1", "w2"])


def test_prepare_separate_vocab_bpe(toy_corpus, tmp_path):
    manifest = prepare(_config(tmp_path / "d", train_prefix=str(toy_corpus / "train"), joint_vocab=False,
                               spm_type="bpe", valid_size=10, test_size=10))
    assert manifest.vocab.src_model == "spm.src.model" and manifest.vocab.tgt_model == "spm.tgt.model"


def test_prepare_from_datasets_local_folder(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "hub_copy"
    folder.mkdir()
    for split, seed, count in (("train", 1, 120), ("validation", 2, 10), ("test", 3, 12)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for s, t in toy_pairs(count, seed=seed):
                f.write(json.dumps({"xx": s, "yy": t}) + "\n")
    manifest = prepare(_config(tmp_path / "data", hf_name=str(folder)))
    assert manifest.counts["valid"]["pairs"] == 10 and manifest.counts["test"]["pairs"] == 12
    assert not list(tmp_path.rglob("*.arrow"))  # no copy of the local corpus kept in a cache
    assert manifest.input["datasets"] == str(folder)
    from nmt.data import load_hf_corpus

    splits = load_hf_corpus(str(folder), None, "xx", "yy")
    assert not isinstance(splits["train"], list)  # read lazily from the Arrow table, not held as strings
    # A dataset brings its own splits: --valid/--test files beside it would go unread.
    write_pairs(tmp_path / "mine", toy_pairs(5, seed=9))
    with pytest.raises(DataError, match="--valid/--test go with --train; --corpus and --hf bring their own splits"):
        prepare(_config(tmp_path / "other", hf_name=str(folder), valid_prefix=str(tmp_path / "mine"),
                        test_prefix=str(tmp_path / "mine")))
    from nmt.multilingual import MultilingualConfig, prepare_multilingual

    given = _config(tmp_path / "multi", hf_name=str(folder), valid_prefix=str(tmp_path / "mine"))
    with pytest.raises(DataError, match="--valid and --test give the --zero-shot directions'"):
        prepare_multilingual(MultilingualConfig(given, ["xx-yy"], valids=[str(tmp_path / "mine")]))
    for settings, message in (({"seed": -1}, "--seed must be 0 or more"), ({"valid_size": 0}, "--valid-size")):
        with pytest.raises(DataError, match=message):
            prepare(_config(tmp_path / "bad", hf_name=str(folder), **settings))
    assert list(splits["train"]) == toy_pairs(120, seed=1) and splits["test"] == toy_pairs(12, seed=3)


def test_local_files_keep_words_csv_reads_as_missing_and_bad_files_are_one_line(tmp_path):
    from nmt.data import load_hf_corpus

    folder = tmp_path / "csv_copy"
    folder.mkdir()
    words = [("NA", "None"), ("null", "nan")]  # sentences, not missing values
    for split, seed, count in (("train", 1, 30), ("validation", 2, 4), ("test", 3, 4)):
        rows = [*words, *toy_pairs(count, seed=seed)]
        (folder / f"{split}.csv").write_text("xx,yy\n" + "".join(f"{s},{t}\n" for s, t in rows), encoding="utf-8")
    assert load_hf_corpus(str(folder), None, "xx", "yy")["test"][:2] == words
    # TSV and compressed files too; a quote in a TSV field is part of the sentence
    quoted = [('"Hallo Welt', "NA"), ('"x" y', 'a "b"'), ("null", "c")]
    for suffix, separator in ((".tsv", "\t"), (".tsv.gz", "\t"), (".csv.gz", ",")):
        other = tmp_path / f"copy{suffix}"
        other.mkdir()
        rows = quoted if separator == "\t" else words
        text = f"xx{separator}yy\n" + "".join(f"{s}{separator}{t}\n" for s, t in [*rows, *toy_pairs(20, seed=1)])
        write = gzip.open if suffix.endswith(".gz") else open
        with write(other / f"train{suffix}", "wt", encoding="utf-8") as f:
            f.write(text)
        assert list(load_hf_corpus(str(other), None, "xx", "yy")["train"]) == [*rows, *toy_pairs(20, seed=1)], suffix
    jsonl = tmp_path / "jsonl_copy"  # a CSV of notes beside JSON lines does not make it a CSV dataset
    (jsonl / "stats").mkdir(parents=True)
    (jsonl / "stats" / "lengths.csv").write_text("a,b\n1,2\n")
    (jsonl / "train.jsonl").write_text("".join(json.dumps({"xx": s, "yy": t}) + "\n" for s, t in toy_pairs(20, seed=1)))
    assert len(list(load_hf_corpus(str(jsonl), None, "xx", "yy")["train"])) == 20
    for name, text in (("cut.jsonl", '{"xx": "a", "yy": "b"}\n{"xx": "kaputt", "yy": '),
                       ("number.jsonl", '{"xx": "a", "yy": "b"}\n{"xx": 5, "yy": "five"}\n')):
        bad = tmp_path / name.split(".")[0]
        bad.mkdir()
        (bad / f"train.{name.split('.')[1]}").write_text(text, encoding="utf-8")
        with pytest.raises(DataError) as error:
            list(load_hf_corpus(str(bad), None, "xx", "yy")["train"])
        assert "\n" not in str(error.value)


def test_split_by_carves_both_sets_by_group_when_a_dataset_gives_one(tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for split, seed, count in (("train", 1, 150), ("validation", 2, 10)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"xx": s, "yy": t}) + "\n" for s, t in toy_pairs(count, seed=seed)))
    manifest = prepare(_config(tmp_path / "data", hf_name=str(folder), split_by="xx", valid_size=8, test_size=8))
    assert manifest.counts["valid"]["pairs"] >= 8 and manifest.counts["test"]["pairs"] >= 8
    # whole groups, each set at least its own size and not much more
    rows = [{"xx": f"w{i % 40}", "yy": f"v{i}"} for i in range(200)]  # 40 groups of 5 pairs
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "validation.jsonl").unlink()
    manifest = prepare(_config(tmp_path / "grouped", hf_name=str(folder), split_by="xx", valid_size=5, test_size=30))
    assert (manifest.counts["valid"]["pairs"], manifest.counts["test"]["pairs"]) == (5, 30)


def test_a_corpus_with_old_mac_line_ends_is_refused(tmp_path):
    for lang in ("xx", "yy"):
        (tmp_path / f"mac.{lang}").write_text("\r".join(f"{lang} line {i}" for i in range(20)) + "\r", encoding="utf-8")
    with pytest.raises(DataError, match="end in CR alone"):
        prepare(_config(tmp_path / "out", train_prefix=str(tmp_path / "mac"), valid_size=2, test_size=2))
    from nmt.data import read_lines

    (tmp_path / "one.xx").write_bytes(b"w1 w2\rw3")  # one sentence with a stray CR, no line end: read as it is
    assert list(read_lines(tmp_path / "one.xx", corpus=True)) == ["w1 w2\rw3"]


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


def test_overwrite_replaces_only_a_data_dir(toy_corpus, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for side in ("xx", "yy"):
        (corpus / f"train.{side}").write_bytes((toy_corpus / f"train.{side}").read_bytes())
    config = dict(train_prefix=str(corpus / "train"), valid_size=10, test_size=10, overwrite=True)
    with pytest.raises(DataError, match="inside the output directory"):  # the corpus itself
        prepare(_config(corpus, **config))
    with pytest.raises(DataError, match="not a data dir"):  # a folder of the user's
        prepare(_config(corpus, **{**config, "train_prefix": str(toy_corpus / "train")}))
    assert (corpus / "train.xx").is_file() and (corpus / "train.yy").is_file()
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(DataError, match="is a file"):
        prepare(_config(tmp_path / "afile", **config))
    monkeypatch.chdir(corpus)
    for out in (corpus, tmp_path):
        with pytest.raises(DataError, match="current directory"):
            prepare(_config(out, **config))
    prepare(_config(tmp_path / "data", **config))
    prepare(_config(tmp_path / "data", **config))  # a data dir is replaced
    # A manifest.json of another program's (a web extension's) makes no data dir
    extension = tmp_path / "extension"
    extension.mkdir()
    (extension / "manifest.json").write_text('{"manifest_version": 3}')
    (extension / "background.js").write_text("mine")
    with pytest.raises(DataError, match="not a data dir"):
        prepare(_config(extension, **config))
    assert (extension / "background.js").read_text() == "mine"
    # Files PREFIX.LANG beside a folder PREFIX: the folder is the output, the files the input
    beside = tmp_path / "beside"
    for side in ("xx", "yy"):
        (tmp_path / f"beside.{side}").write_bytes((toy_corpus / f"train.{side}").read_bytes())
    prepare(_config(beside, **{**config, "train_prefix": str(beside)}))
    prepare(_config(beside, **{**config, "train_prefix": str(beside)}))


def test_held_out_pairs_leave_train_with_every_copy_when_duplicates_are_kept(tmp_path):
    pairs = toy_pairs(150, seed=8)
    write_pairs(tmp_path / "twice", pairs + pairs)
    out = tmp_path / "data"
    manifest = prepare(_config(out, train_prefix=str(tmp_path / "twice"), valid_size=20, test_size=20,
                               clean=CleanConfig(dedup=False)))
    held = [set(zip(*(f.read_text().splitlines() for f in (out / f"{split}.src.txt", out / f"{split}.tgt.txt"))))
            for split in ("valid", "test")]
    assert len(held[0]) == len(held[1]) == 20 and not held[0] & held[1]
    assert manifest.counts["train"]["pairs"] == sum(2 for pair in pairs if pair not in held[0] | held[1])
    # The summary adds up: what was kept is train, valid, test and the copies that left train with them.
    cleaning = manifest.cleaning
    assert cleaning["kept"] == manifest.counts["train"]["pairs"] + 40 + cleaning["overlap_with_valid_test"]
    assert cleaning["overlap_with_valid_test"] == 40


@pytest.mark.parametrize("sizes", [(-5, 10), (10, 0)])
def test_held_out_sizes_are_at_least_one(toy_corpus, tmp_path, sizes):
    with pytest.raises(DataError, match="at least 1"):
        prepare(_config(tmp_path / "d", train_prefix=str(toy_corpus / "train"), valid_size=sizes[0], test_size=sizes[1]))


def test_an_empty_given_valid_set_is_an_error(toy_corpus, tmp_path):
    write_pairs(tmp_path / "empty", [])
    with pytest.raises(DataError, match="valid set has no lines"):
        prepare(_config(tmp_path / "d", train_prefix=str(toy_corpus / "train"), valid_prefix=str(tmp_path / "empty"),
                        test_prefix=str(toy_corpus / "test")))


@pytest.mark.skipif(not (SHARED_DATA / "multi30k").is_dir(), reason="shared Multi30k data not present")
def test_prepare_multi30k_gz_files(tmp_path):
    manifest = prepare(PrepareConfig(
        out_dir=tmp_path / "m30k", src_lang="de", tgt_lang="en", vocab_size=2000,
        train_prefix=str(SHARED_DATA / "multi30k" / "val"),
        valid_prefix=str(SHARED_DATA / "multi30k" / "test_2016_flickr"),
        test_prefix=str(SHARED_DATA / "multi30k" / "test_2016_flickr"),
    ))
    assert manifest.counts["test"]["pairs"] == 1000
    assert manifest.counts["train"]["pairs"] > 1000


def _reference_prepare(pairs, held_out, config: CleanConfig):
    """The plain in-memory way: clean every pair, keep the first of exact duplicates, drop
    pairs that are also held out. Returns (kept pairs, duplicate count)."""
    from nmt.data import PairCleaner

    cleaner = PairCleaner(config)
    seen, kept, duplicates = set(), [], 0
    for src, tgt in pairs:
        pair = cleaner(src, tgt)
        if pair is None:
            continue
        if pair in seen:
            duplicates += 1
            continue
        seen.add(pair)
        kept.append(pair)
    return [p for p in kept if p not in held_out], duplicates


def _messy_corpus(root, count=600):
    """Toy pairs with duplicates (also differing only in whitespace), empty and too-long lines."""
    pairs = toy_pairs(count, seed=21)
    messy = []
    for i, (s, t) in enumerate(pairs):
        messy.append((s, t))
        if i % 7 == 0:
            messy.append((s + "  ", " " + t))  # a duplicate once cleaned
        if i % 11 == 0:
            messy.append(("", t))
        if i % 13 == 0:
            messy.append((s, " ".join([t] * 4)))  # length ratio
    messy += pairs[:40]  # plain duplicates, and some that are in the held-out splits below
    write_pairs(root / "train", messy)
    write_pairs(root / "valid", pairs[:10])
    write_pairs(root / "test", pairs[10:20])
    return messy, set(pairs[:20])


@pytest.mark.parametrize("workers", [1, 2])
def test_streaming_prepare_keeps_what_the_in_memory_reference_keeps(tmp_path, monkeypatch, workers):
    import nmt.prepare

    if workers > 1:  # encode in worker processes even for this small corpus, in chunks
        monkeypatch.setattr(nmt.prepare, "PARALLEL_ENCODE_PAIRS", 0)
        monkeypatch.setattr(nmt.prepare, "ENCODE_CHUNK_PAIRS", 50)
    messy, held_out = _messy_corpus(tmp_path / "c")
    out = tmp_path / "data"
    manifest = prepare(_config(out, train_prefix=str(tmp_path / "c" / "train"), valid_prefix=str(tmp_path / "c" / "valid"),
                               test_prefix=str(tmp_path / "c" / "test"), workers=workers))
    expected, duplicates = _reference_prepare(messy, held_out, CleanConfig())
    assert manifest.encode_workers == workers
    assert manifest.cleaning["duplicates"] == duplicates
    assert manifest.counts["train"]["pairs"] == len(expected)
    assert manifest.cleaning["overlap_with_valid_test"] == sum(1 for p in held_out if p in set(messy))
    # Shards round-trip: the stored ids are the SentencePiece encoding of each kept pair, in order.
    tokenizer = Tokenizer(out / manifest.vocab.src_model, out / manifest.vocab.tgt_model)
    split = ParallelSplit.load(out, "train")
    assert [split.src[i].tolist() for i in range(len(split))] == tokenizer.encode_src([s for s, _ in expected])
    assert [split.tgt[i].tolist() for i in range(len(split))] == tokenizer.encode_tgt([t for _, t in expected])
    assert not (out / "work").exists() and "work" not in manifest.files


def test_token_files_round_trip_in_both_dtypes_and_are_memory_mapped(tmp_path):
    from nmt.shards import TokenArray, TokenFileWriter

    sequences = [[5, 70000, 7], [], [8], [65535, 0, 1, 2]]
    for dtype in (np.uint16, np.int32):
        stored = [s for s in sequences if dtype == np.int32 or max(s, default=0) <= 65535]
        writer = TokenFileWriter(tmp_path, f"t.{np.dtype(dtype).name}", np.dtype(dtype))
        for start in range(0, len(stored), 2):  # appended in two pieces
            part = stored[start : start + 2]
            writer.append(np.array([t for s in part for t in s], dtype=np.int64), np.array([len(s) for s in part]))
        assert writer.close() == {"sequences": len(stored), "tokens": sum(map(len, stored))}
        array = TokenArray(tmp_path, f"t.{np.dtype(dtype).name}")
        assert [array[i].tolist() for i in range(len(array))] == stored
        assert isinstance(array.tokens, np.memmap) and array.tokens.dtype == dtype


def test_training_split_is_read_through_memory_mapping(toy_corpus, tmp_path):
    from nmt.batches import make_batch

    prepare(_config(tmp_path / "data", train_prefix=str(toy_corpus / "train"), valid_size=10, test_size=10))
    split = ParallelSplit.load(tmp_path / "data", "train")
    for side in (split.src, split.tgt):
        assert isinstance(side.tokens, np.memmap) and isinstance(side.offsets, np.memmap)
        assert not side.tokens.flags.owndata
        assert side.lengths.dtype == np.uint16  # the index kept in memory: 2 bytes per sentence
    first = make_batch(split, np.arange(5))
    split.release_pages()  # unmaps what was read; the data stays readable
    again = make_batch(split, np.arange(5))
    assert isinstance(split.src.tokens, np.memmap)  # batches read slices; nothing loads the whole array
    assert (first.src == again.src).all() and (first.tgt_out == again.tgt_out).all()


@pytest.mark.slow
def test_killed_prepare_leaves_nothing_that_is_read_as_data_and_reruns_cleanly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    write_pairs(tmp_path / "c" / "train", toy_pairs(3000, seed=5, max_len=9))
    out = tmp_path / "data"
    command = [sys.executable, "-m", "nmt_cli", "prepare", "--train", str(tmp_path / "c" / "train"), "--src", "xx",
               "--tgt", "yy", "--vocab-size", "60", "--valid-size", "10", "--test-size", "10", "--out", str(out),
               "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".data.tmp-*/work/train.src")):
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert list(tmp_path.glob(".data.tmp-*")), "the kill came too late to test anything"
    assert not out.exists()
    with pytest.raises(DataError, match="not a prepared data dir"):
        Manifest.read(out)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert Manifest.read(out).counts["train"]["pairs"] > 2900
    assert not list(tmp_path.glob(".data.tmp-*"))  # the killed run's leftovers are gone


def test_count_lines_of_plain_files_only(tmp_path):
    from nmt.prepare import count_lines

    (tmp_path / "a.txt").write_bytes(b"one\ntwo\r\nthree\xe2\x80\xa8still three\n")
    assert count_lines(tmp_path / "a.txt") == 3
    assert count_lines(tmp_path / "a.txt.gz") is None


def test_the_vocabulary_does_not_depend_on_the_machines_cores(tmp_path):
    """SentencePiece's model changes with its thread count; prepare fixes it, so a machine with
    more cores (more encoding workers) gets the vocabulary of the README's runs."""
    from importlib import resources

    from nmt.corpora import find_corpus  # noqa: F401  (the bundled sample is part of the package)

    sample = resources.files("nmt.corpora").joinpath("tatoeba-en-es-15k.tsv.gz")
    vocabularies = []
    for workers in (1, 3):
        prepare(PrepareConfig(out_dir=tmp_path / f"w{workers}", src_lang="en", tgt_lang="es", tsv=sample,
                              vocab_size=3000, workers=workers, valid_size=100, test_size=100))
        vocabularies.append((tmp_path / f"w{workers}" / "spm.joint.vocab").read_text(encoding="utf-8"))
    assert vocabularies[0] == vocabularies[1]


def test_the_same_input_gives_the_same_vocabulary_file_wherever_it_is_prepared(toy_corpus, tmp_path):
    manifests = [prepare(_config(tmp_path / name, train_prefix=str(toy_corpus / "train"), valid_size=10, test_size=10))
                 for name in ("a", "elsewhere")]
    assert manifests[0].vocab.src_sha256 == manifests[1].vocab.src_sha256  # ensembles and --init compare these
    assert (tmp_path / "a" / "spm.joint.vocab").read_text(encoding="utf-8").startswith("<pad>\t0\n")


def test_sentencepiece_settings_are_checked_before_reading_and_a_small_vocabulary_is_explained(toy_corpus, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    common = ["prepare", "--train", str(toy_corpus / "train"), "--src", "xx", "--tgt", "yy", "--out", str(tmp_path / "d")]
    for option, value in (("--spm-sample", "50"), ("--character-coverage", "1.5"), ("--character-coverage", "0.9"), ("--spm-type", "char")):
        result = CliRunner().invoke(app, [*common, option, value])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert option.lstrip("-").replace("spm-type", "model type").replace("-", " ").split()[0] in result.output
    chars = "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天而能好"
    rows = [(f"the word w{i} here", "".join(chars[(i * 7 + k) % len(chars)] for k in range(6))) for i in range(200)]
    write_pairs(tmp_path / "zh" / "train", rows, "en", "zh")
    with pytest.raises(DataError, match="smaller than the .* the text needs"):
        prepare(PrepareConfig(out_dir=tmp_path / "zd", src_lang="en", tgt_lang="zh", vocab_size=30,
                              train_prefix=str(tmp_path / "zh" / "train"), valid_size=5, test_size=5))


def test_reserved_symbols_written_in_the_corpus_are_plain_text(tmp_path):
    """"[MASK]" in a training or test sentence is its characters, not the mask id (nor a tag)."""
    from nmt.data import ParallelSplit
    from nmt.tokenizer import CLS, MASK, SEP

    pairs = [(f"{s} [MASK]", f"[SEP] {t}") for s, t in toy_pairs(200, seed=1)]
    for split, chosen in (("train", pairs[:180]), ("valid", pairs[180:190]), ("test", pairs[190:])):
        write_pairs(tmp_path / split, chosen)
    prepare(_config(tmp_path / "data", train_prefix=str(tmp_path / "train"), valid_prefix=str(tmp_path / "valid"),
                    test_prefix=str(tmp_path / "test")))
    for split in ("train", "valid", "test"):
        data = ParallelSplit.load(tmp_path / "data", split)
        for i in range(len(data)):
            assert not {MASK, CLS, SEP} & {*data.src[i].tolist(), *data.tgt[i].tolist()}


def test_reserved_symbols_are_spelled_in_byte_pieces_where_the_vocabulary_lacks_a_letter(tmp_path):
    """A byte-fallback vocabulary (Chinese, Japanese, Korean) spells "[SEP]" written in a text
    with the byte pieces of a letter it lacks (E), as any other unknown character: no <unk>."""
    from nmt.tokenizer import Tokenizer, train_sentencepiece

    text = [f"{s} {t}" for s, t in toy_pairs(300, seed=1)] + ["[ ] < > S P M A K C L 2 x"] * 5
    model = train_sentencepiece(text, tmp_path / "spm", 320, byte_fallback=True, extra_symbols=("<2xx>",))
    tokenizer = Tokenizer(model, model)
    line = "w1 [SEP] [MASK] <2xx> w2"
    ids = tokenizer.encode_tgt([line])[0]
    assert tokenizer.tgt.unk_id() not in ids and tokenizer.tgt.piece_to_id("E") == tokenizer.tgt.unk_id()
    assert tokenizer.decode_tgt([ids])[0] == line


def test_a_failed_prepare_leaves_no_folders_of_its_making(tmp_path):
    (tmp_path / "bad.xx").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "bad.yy").write_text("a\n", encoding="utf-8")  # a line short
    with pytest.raises(DataError):
        prepare(_config(tmp_path / "new" / "deeper" / "data", train_prefix=str(tmp_path / "bad")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.xx", "bad.yy"]
    write_pairs(tmp_path / "bad", toy_pairs(60))  # good pairs, into a name the file system cannot take
    with pytest.raises(OSError, match="File name too long"):
        prepare(_config(tmp_path / "new" / "deeper" / ("x" * 300), train_prefix=str(tmp_path / "bad"),
                        valid_size=5, test_size=5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.xx", "bad.yy"]


def test_blank_lines_of_a_tsv_file_are_skipped(tmp_path):
    from nmt.data import read_tsv

    path = tmp_path / "c.tsv"
    path.write_text("a\tb\n\n  \nc\td\n", encoding="utf-8")
    assert list(read_tsv(path, 0, 1)) == [("a", "b"), ("c", "d")]


def test_a_chinese_side_counts_its_characters_not_its_spaces():
    from nmt.data import CleanConfig, PairCleaner

    cleaner = PairCleaner(CleanConfig(max_words=4, max_ratio=9.0), "zh", "en")
    assert cleaner("我们 走吧", "let us go") == ("我们 走吧", "let us go")  # 4 characters
    assert cleaner("我们 走吧 了", "let us go") is None and cleaner.stats.too_long == 1


def test_split_by_keeps_whole_groups_of_its_languages_sentences_out_of_train(tmp_path):
    from nmt.prepare import prepare

    # 40 xx sentences, each with 5 different yy translations
    write_pairs(tmp_path / "c" / "train", [(f"w{i % 40}", f"v{i}") for i in range(200)])
    out = tmp_path / "data"
    prepare(_config(out, train_prefix=str(tmp_path / "c" / "train"), split_by="xx", valid_size=5, test_size=10))
    held = {split: (out / f"{split}.src.txt").read_text(encoding="utf-8").splitlines() for split in ("valid", "test")}
    for split, sentences in held.items():
        assert all(sentences.count(s) == 5 for s in sentences), (split, sentences)  # every pair of the sentence
    assert not set(held["valid"]) & set(held["test"])


def test_a_dataset_with_a_valid_split_only_gets_a_test_set_of_test_size(tmp_path):
    from nmt.prepare import prepare

    folder = tmp_path / "copy"
    folder.mkdir()
    for split, seed, count in (("train", 1, 150), ("validation", 2, 10)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"xx": s, "yy": t}) + "\n"
                                                       for s, t in toy_pairs(count, seed=seed)))
    manifest = prepare(_config(tmp_path / "data", hf_name=str(folder), valid_size=5, test_size=12))
    assert (manifest.counts["valid"]["pairs"], manifest.counts["test"]["pairs"]) == (10, 12)


def test_the_sentencepiece_sample_and_vocabulary_must_be_more_than_their_minimum(toy_corpus, tmp_path):
    from nmt.tokenizer import FIRST_REGULAR_ID, MIN_SENTENCEPIECE_SAMPLE, check_sentencepiece_settings

    with pytest.raises(DataError, match=f"more than {MIN_SENTENCEPIECE_SAMPLE}"):
        check_sentencepiece_settings("unigram", None, MIN_SENTENCEPIECE_SAMPLE, 100)
    check_sentencepiece_settings("unigram", None, MIN_SENTENCEPIECE_SAMPLE + 1, FIRST_REGULAR_ID + 1)
    for size in (0, 3, FIRST_REGULAR_ID):  # SentencePiece's own assertion, before: not naming the option
        with pytest.raises(DataError, match=f"--vocab-size must be more than {FIRST_REGULAR_ID}"):
            prepare(_config(tmp_path / "d", train_prefix=str(toy_corpus / "train"), vocab_size=size))


def test_a_prepare_request_checks_directions_as_the_command_does(tmp_path):
    """The library call parses and checks directions given as text, as `nmt prepare` does, and
    options that go only with --directions are refused before a direction is read."""
    from nmt.prepare_request import PrepareRequest, prepare_data

    with pytest.raises(DataError, match="direction 'bad' is not SRC-TGT"):
        prepare_data(PrepareRequest(out=tmp_path / "d", directions="bad", train=["c/train"]))
    with pytest.raises(DataError, match="--zero-shot and --lang-temperature go with --directions"):
        prepare_data(PrepareRequest(out=tmp_path / "d", src="de", tgt="en", train=["c/train"], zero_shot="bad"))
    with pytest.raises(DataError, match="leave out --src and --tgt"):
        prepare_data(PrepareRequest(out=tmp_path / "d", src="de", tgt="en", directions="bad", train=["c/train"]))
    assert not (tmp_path / "d").exists()


def test_kept_counts_each_distinct_pair_once_and_the_seed_picks_the_held_out_pairs(tmp_path):
    pairs = toy_pairs(150, seed=8)
    write_pairs(tmp_path / "twice", pairs + pairs[:30])
    manifests = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        manifests[name] = prepare(_config(tmp_path / name, train_prefix=str(tmp_path / "twice"), valid_size=10,
                                          test_size=10, seed=seed))
    cleaning, counts = manifests["a"].cleaning, manifests["a"].counts
    assert (cleaning["duplicates"], cleaning["kept"]) == (30, 150)
    assert cleaning["kept"] == sum(counts[split]["pairs"] for split in ("train", "valid", "test"))
    held = {name: (tmp_path / name / "test.src.txt").read_text() for name in manifests}
    assert held["a"] == held["b"] != held["c"]


def test_the_unk_share_of_the_dev_set_is_a_percentage_of_its_tokens(toy_corpus, tmp_path):
    valid = [(src, f"{tgt} ǂ") for src, tgt in toy_pairs(20, seed=2)]  # one character training never saw, per line
    write_pairs(tmp_path / "valid", valid)
    out = tmp_path / "data"
    manifest = prepare(_config(out, train_prefix=str(toy_corpus / "train"), valid_prefix=str(tmp_path / "valid"),
                               test_prefix=str(toy_corpus / "test")))
    tokenizer = Tokenizer(out / manifest.vocab.src_model, out / manifest.vocab.tgt_model)
    ids = tokenizer.encode_tgt([tgt for _, tgt in valid])
    expected = 100.0 * sum(seq.count(1) for seq in ids) / sum(map(len, ids))  # <unk> is id 1
    assert manifest.valid_unk_percent == {"src": 0.0, "tgt": pytest.approx(expected, abs=1e-3)} and 3 < expected < 30


def test_held_out_sets_that_take_every_training_pair_leave_none_to_train_on(tmp_path):
    pairs = toy_pairs(40, seed=4)
    write_pairs(tmp_path / "train", pairs)
    write_pairs(tmp_path / "valid", pairs[:20])
    write_pairs(tmp_path / "test", pairs[20:])
    with pytest.raises(DataError, match="no training pairs left once valid/test pairs are removed"):
        prepare(_config(tmp_path / "d", train_prefix=str(tmp_path / "train"), valid_prefix=str(tmp_path / "valid"),
                        test_prefix=str(tmp_path / "test")))


def test_a_carved_test_set_takes_its_copies_out_of_train_when_a_dataset_gives_only_valid(tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    train = toy_pairs(150, seed=1)
    for split, rows in (("train", train + train), ("validation", toy_pairs(10, seed=2))):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"xx": s, "yy": t}) + "\n" for s, t in rows))
    manifest = prepare(_config(tmp_path / "data", hf_name=str(folder), valid_size=5, test_size=12,
                               clean=CleanConfig(dedup=False)))
    assert manifest.cleaning["overlap_with_valid_test"] == 12  # the second copy of each test pair
    assert manifest.counts["train"]["pairs"] == 2 * (150 - 12)


def test_sentencepiece_learns_from_a_sample_of_at_most_its_sentences(toy_corpus, tmp_path, monkeypatch):
    import nmt.prepare

    seen = []
    train = nmt.prepare.train_sentencepiece

    def counting(sentences, *args, **kwargs):
        sentences = list(sentences)
        seen.append(len(sentences))
        return train(sentences, *args, **kwargs)

    monkeypatch.setattr(nmt.prepare, "train_sentencepiece", counting)
    given = dict(train_prefix=str(toy_corpus / "train"), valid_prefix=str(toy_corpus / "valid"),
                 test_prefix=str(toy_corpus / "test"), spm_max_sentences=120)
    prepare(_config(tmp_path / "joint", **given))
    prepare(_config(tmp_path / "separate", **given, joint_vocab=False))
    assert seen == [120, 120, 120]  # joint: 60 pairs, both sides; separate: 120 of each side


def test_a_line_too_long_in_characters_is_dropped_at_twenty_per_allowed_word():
    from nmt.data import PairCleaner

    cleaner = PairCleaner(CleanConfig(max_words=10), "xx", "yy")
    assert cleaner("a" * 200, "b") is not None and cleaner("b", "a" * 200) is not None
    assert cleaner("a" * 201, "b") is None and cleaner("b", "a" * 201) is None


@pytest.mark.parametrize("workers", [1, 2])
def test_tagged_training_pairs_follow_the_real_ones_after_cls_and_are_never_held_out(tmp_path, monkeypatch, workers):
    import nmt.prepare
    from nmt.prepare_request import summary
    from nmt.tokenizer import CLS

    if workers > 1:  # worker processes, and a chunk that holds real and tagged pairs
        monkeypatch.setattr(nmt.prepare, "PARALLEL_ENCODE_PAIRS", 0)
    monkeypatch.setattr(nmt.prepare, "ENCODE_CHUNK_PAIRS", 7)
    real = toy_pairs(60, seed=1)
    synthetic = [pair for pair in toy_pairs(200, seed=2) if pair[0] not in dict(real)][:80]
    write_pairs(tmp_path / "c" / "train", real)
    write_pairs(tmp_path / "c" / "bt", [("[CLS] " + synthetic[0][0], synthetic[0][1]), *synthetic[1:], ("", "dropped")])
    out = tmp_path / "data"
    manifest = prepare(_config(out, train_prefix=str(tmp_path / "c" / "train"), tagged_train_prefix=str(tmp_path / "c" / "bt"),
                               valid_size=5, test_size=5, workers=workers))
    assert manifest.counts["train"]["pairs"] == 50 + 80 and manifest.counts["train"]["tagged_pairs"] == 80
    assert manifest.input["tagged_train"] == str(tmp_path / "c" / "bt")
    assert "130 pairs" in summary(out, manifest) and "(80 pairs tagged)" in summary(out, manifest)
    held_out = {s for split in ("valid", "test") for s in (out / f"{split}.src.txt").read_text().splitlines()}
    assert len(held_out) == 10 and held_out <= {s for s, _ in real}  # carved from the real pairs only
    tokenizer = Tokenizer(out / manifest.vocab.src_model, out / manifest.vocab.tgt_model)
    split = ParallelSplit.load(out, "train")
    sources = [split.src[i].tolist() for i in range(len(split))]
    kept_real = [s for s, _ in real if s not in held_out]
    assert sources[:50] == tokenizer.encode_src(kept_real)  # as given, no tag
    synthetic[0] = ("[CLS] " + synthetic[0][0], synthetic[0][1])  # a tag spelled in the text stays text
    assert sources[50:] == [[CLS, *ids] for ids in tokenizer.encode_src([s for s, _ in synthetic])]
    assert [split.tgt[i].tolist() for i in range(50, 130)] == tokenizer.encode_tgt([t for _, t in synthetic])


def test_tagged_training_pairs_are_refused_with_directions_and_missing_files(toy_corpus, tmp_path):
    from nmt.prepare_request import PrepareRequest, prepare_data

    with pytest.raises(DataError, match="--tagged-train goes with one language pair"):
        prepare_data(PrepareRequest(out=tmp_path / "d", directions="xx-yy,yy-xx", train=[str(toy_corpus / "train")],
                                    tagged_train=str(toy_corpus / "train")))
    with pytest.raises(DataError, match="nowhere"):
        prepare(_config(tmp_path / "d", train_prefix=str(toy_corpus / "train"), tagged_train_prefix=str(tmp_path / "nowhere")))
    assert not (tmp_path / "d").exists()


def test_a_corpus_data_dir_that_is_not_a_folder_is_refused_before_the_hub_is_asked(tmp_path):
    (tmp_path / "afile").write_text("x")
    for given in (tmp_path / "nope", tmp_path / "afile"):
        with pytest.raises(DataError, match=f"--data-dir {given}: folder not found"):
            prepare(_config(tmp_path / "d", src_lang="de", tgt_lang="en", corpus="multi30k", corpus_dir=given))
