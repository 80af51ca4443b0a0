import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from nmt.batches import drop_source_tokens, make_batch, token_batches
from nmt.data import (
    CleanConfig,
    PairCleaner,
    ParallelSplit,
    clean_whitespace,
    read_lines,
    read_parallel_files,
    read_tsv,
)
from nmt.errors import DataError
from nmt.shards import write_token_file
from nmt.tokenizer import BOS, EOS, FIRST_REGULAR_ID, MASK, PAD, UNK


def test_read_lines_gz_and_carriage_return(tmp_path):
    path = tmp_path / "a.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write("one\r\ntwo has \r inside\nthree\u2028same line\n".encode())
    assert list(read_lines(path)) == ["one", "two has \r inside", "three\u2028same line"]


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good\nalso good\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"bad.txt:3: invalid UTF-8"):
        list(read_lines(path))
    assert list(read_lines(path, replace_invalid=True))[2] == "bad \ufffd byte"


def test_a_nul_byte_is_an_error_and_a_byte_order_mark_is_not_text(tmp_path):
    path = tmp_path / "utf16.txt"
    path.write_bytes("one\ntwo\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"utf16.txt:1: a NUL byte \(a UTF-16"):
        list(read_lines(path, corpus=True))
    with pytest.raises(DataError, match=r"utf16.txt:1: a NUL byte"):  # text to translate too: no UTF-8 text has one
        list(read_lines(path))
    assert list(read_lines(path, replace_invalid=True))[0] == "o\x00n\x00e\x00"  # taken as it is
    path.write_bytes("\ufeffone\n\ufefftwo\n".encode())
    assert list(read_lines(path)) == ["one", "\ufefftwo"]  # only the file's first character is a mark
    assert clean_whitespace("\ufefftwo\x01\x7f words\x9f") == "two words"


def test_misaligned_files(tmp_path):
    (tmp_path / "a.de").write_text("1\n2\n3\n")
    (tmp_path / "a.en").write_text("1\n2\n")
    with pytest.raises(DataError, match=r"a.de has 3 lines, .*a.en has 2"):
        list(read_parallel_files(tmp_path / "a.de", tmp_path / "a.en"))
    with pytest.raises(DataError, match=r"a.en has 2 lines, .*a.de has 3"):
        list(read_parallel_files(tmp_path / "a.en", tmp_path / "a.de"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        list(read_lines(tmp_path / "nope.txt"))


def test_tsv_wrong_field_count(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("a\tb\nc\td\ne\tf\tg\n")
    with pytest.raises(DataError, match=r"c.tsv:3: 3 tab-separated fields, expected 2"):
        list(read_tsv(path, 0, 1))
    path.write_text("a\tb\nc\td\n")
    assert list(read_tsv(path, 1, 0)) == [("b", "a"), ("d", "c")]
    with pytest.raises(DataError, match=r"c.tsv:1: 2 tab-separated fields, expected 3 \(the languages --tsv-langs"):
        list(read_tsv(path, 1, 0, columns=3))


def test_cleaning_counts_each_step():
    pairs = [
        ("Hello  world ", "Hallo Welt"),  # whitespace fixed
        ("Cafe\u0301", "Cafe\u0301"),  # normalized (NFC)
        ("", "leer"),  # empty
        ("a " * 300, "b " * 300),  # too long
        ("x" * 5001, "y" * 5001),  # too long: one "word" of more than 20 × max_words characters
        ("\x01\x02", "z"),  # empty: control characters only
        ("one", "one two three four five"),  # ratio
        ("fine", "gut"),
    ]
    cleaner = PairCleaner(CleanConfig(max_words=250, max_ratio=3.0))
    kept = [pair for pair in (cleaner(s, t) for s, t in pairs) if pair is not None]
    assert kept == [("Hello world", "Hallo Welt"), ("Café", "Café"), ("fine", "gut")]
    stats = cleaner.stats
    assert (stats.pairs_read, stats.whitespace_fixed, stats.normalized) == (8, 3, 1)
    assert (stats.empty, stats.too_long, stats.ratio) == (2, 2, 1)


def test_token_batches_cover_all_and_respect_budget():
    rng = np.random.default_rng(0)
    src_len, tgt_len = rng.integers(1, 40, 500), rng.integers(1, 40, 500)
    batches = token_batches(src_len, tgt_len, batch_tokens=300, seed=5)
    flat = np.sort(np.concatenate(batches))
    assert (flat == np.arange(500)).all()
    for batch in batches:
        longest = int(np.maximum(src_len[batch], tgt_len[batch]).max()) + 1
        assert longest * len(batch) <= 300
    again = token_batches(src_len, tgt_len, batch_tokens=300, seed=5)
    assert all((a == b).all() for a, b in zip(batches, again))
    other = token_batches(src_len, tgt_len, batch_tokens=300, seed=6)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(batches, other))


def test_binarized_round_trip_and_batch(tmp_path):
    src = [[5, 6, 7], [8], [9, 10]]
    tgt = [[11], [12, 13, 14, 15], [16, 17]]
    write_token_file(tmp_path, "train.src", src, np.dtype(np.uint16))
    write_token_file(tmp_path, "train.tgt", tgt, np.dtype(np.uint16))
    split = ParallelSplit.load(tmp_path, "train")
    assert [split.src[i].tolist() for i in range(3)] == src
    batch = make_batch(split, np.array([1, 0]))
    assert batch.src.tolist() == [[8, EOS, PAD, PAD], [5, 6, 7, EOS]]
    assert batch.tgt_in.tolist() == [[BOS, 12, 13, 14, 15], [BOS, 11, PAD, PAD, PAD]]
    assert batch.tgt_out.tolist() == [[12, 13, 14, 15, EOS], [11, EOS, PAD, PAD, PAD]]
    assert batch.num_tgt_tokens == 7


def test_word_dropout_drops_the_stated_share_of_regular_source_tokens():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=400)
    src = torch.full((400, 31), PAD)  # (B, S)
    for row, n in enumerate(lengths):
        src[row, :n] = torch.from_numpy(rng.integers(FIRST_REGULAR_ID, 500, size=n))
        src[row, n] = EOS
    src[:, 0] = MASK  # a special id in every row: never dropped
    dropped = drop_source_tokens(src, 0.2, np.random.default_rng(1))
    regular = src >= FIRST_REGULAR_ID
    share = ((dropped == UNK) & regular).sum() / regular.sum()
    assert abs(float(share) - 0.2) < 0.01  # about 9,600 regular tokens
    assert torch.equal(dropped[~regular], src[~regular])  # PAD, EOS and MASK kept
    assert torch.equal(dropped[dropped != UNK], src[dropped != UNK])  # the rest unchanged


def test_word_dropout_changes_the_source_only(tmp_path):
    src = [[10 + i for i in range(20)], [40, 41]]
    tgt = [[11, 12], [13, 14, 15]]
    write_token_file(tmp_path, "train.src", src, np.dtype(np.uint16))
    write_token_file(tmp_path, "train.tgt", tgt, np.dtype(np.uint16))
    split = ParallelSplit.load(tmp_path, "train")
    plain = make_batch(split, np.array([0, 1]))
    dropped = make_batch(split, np.array([0, 1]), word_dropout=0.5, rng=np.random.default_rng(3))
    assert (dropped.src == UNK).any() and not (plain.src == UNK).any()
    assert torch.equal(dropped.src != PAD, plain.src != PAD)
    assert torch.equal(dropped.tgt_in, plain.tgt_in) and torch.equal(dropped.tgt_out, plain.tgt_out)


def _sequential_token_batches(src_lengths, tgt_lengths, batch_tokens, seed=None):
    """token_batches written as the plain loop over sentences it must equal."""
    sizes = np.maximum(src_lengths, tgt_lengths) + 1
    rng = np.random.default_rng(seed) if seed is not None else None
    order = rng.permutation(len(sizes)) if rng is not None else np.arange(len(sizes))
    order = order[np.argsort(sizes[order], kind="stable")]
    batches, start = [], 0
    for pos, index in enumerate(order):
        count = pos - start
        if count and int(sizes[index]) * (count + 1) > batch_tokens:
            batches.append(order[start:pos])
            start = pos
    if start < len(order):
        batches.append(order[start:])
    if rng is not None:
        rng.shuffle(batches)
    return batches


def test_token_batches_equal_the_sentence_by_sentence_definition():
    rng = np.random.default_rng(1)
    for trial in range(200):
        n, longest = int(rng.integers(1, 300)), int(rng.integers(2, 80))
        src, tgt = rng.integers(0, longest, n), rng.integers(0, longest, n)
        batch_tokens = int(rng.integers(1, 600))
        seed = None if trial % 2 else trial
        fast = token_batches(src, tgt, batch_tokens, seed)
        plain = _sequential_token_batches(src, tgt, batch_tokens, seed)
        assert len(fast) == len(plain) and all((a == b).all() for a, b in zip(fast, plain))


@pytest.mark.parametrize("ahead", [0, 2])
def test_batch_prefetcher_returns_every_update_in_order_and_raises_failures(ahead):
    from nmt.batches import BatchPrefetcher

    built = []

    def build(index):
        built.append(index)
        if index == 7:
            raise ValueError("bad batch")
        return [index]

    with BatchPrefetcher(build, 3, 7, ahead) as prefetcher:
        assert [prefetcher.next() for _ in range(4)] == [[3], [4], [5], [6]]
        assert not prefetcher.pending  # nothing built past the end
    assert sorted(built) == [3, 4, 5, 6]
    with BatchPrefetcher(build, 6, 9, ahead) as prefetcher:
        assert prefetcher.next() == [6]
        with pytest.raises(ValueError, match="bad batch"):
            prefetcher.next()


def test_sequence_lengths_in_blocks_equal_the_differences_of_the_offsets():
    import numpy as np

    from nmt.shards import sequence_lengths

    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(0, 300, size=1001))])
    for block in (1, 7, 1000, 5000):
        lengths = sequence_lengths(offsets, block)
        assert lengths.dtype == np.uint16 and (lengths == np.diff(offsets)).all()
    assert sequence_lengths(np.array([0, 70_000]), 4).dtype == np.int32 and len(sequence_lengths(np.array([0]))) == 0


def test_edited_offsets_that_go_back_are_refused_in_one_line(tmp_path):
    """Unchecked, a length below 0 wraps to 65,5xx tokens and the sentence before takes its
    neighbour's tokens: a data dir that loads and trains on garbage."""
    import numpy as np

    from nmt.errors import DataError
    from nmt.shards import TokenArray

    np.save(tmp_path / "train.src.tokens.npy", np.arange(10, dtype=np.uint16))
    for offsets, problem in (([0, 4, 2, 10], "offset 2 is below the one before it"),
                             ([0, 4, 3, 10], "offset 2 is below the one before it"),  # by one: a length of 65,535
                             ([1, 4, 10], "do not match")):
        np.save(tmp_path / "train.src.offsets.npy", np.array(offsets, dtype=np.int64))
        with pytest.raises(DataError, match=problem):
            TokenArray(tmp_path, "train.src")
    np.save(tmp_path / "train.src.offsets.npy", np.array([0, 4, 4, 10], dtype=np.int64))
    assert TokenArray(tmp_path, "train.src").lengths.tolist() == [4, 0, 6]


def test_counting_sort_by_size_equals_a_stable_argsort():
    import numpy as np

    from nmt.batches import sorted_by_size

    rng = np.random.default_rng(1)
    for n in (0, 1, 17, 5000):
        sizes = rng.integers(1, 40, size=n).astype(np.int32)
        order = rng.permutation(n).astype(np.int32)
        for block in (1, 3, 1000, 1 << 20):
            assert (sorted_by_size(order, sizes, block) == order[np.argsort(sizes[order], kind="stable")]).all()


def test_a_pair_at_the_word_limit_is_kept_and_one_word_more_is_not():
    from nmt.data import CleanConfig, PairCleaner

    cleaner = PairCleaner(CleanConfig(max_words=5, max_ratio=9.0), "xx", "yy")
    assert cleaner("w1 w2 w3 w4 w5", "v1 v2 v3 v4 v5") is not None
    assert cleaner("w1 w2 w3 w4 w5 w6", "v1 v2 v3 v4 v5") is None and cleaner.stats.too_long == 1


def _split(tmp_path, src, tgt):
    from nmt.data import ParallelSplit
    from nmt.shards import write_token_file
    write_token_file(tmp_path, "train.src", src, np.dtype(np.uint16))
    write_token_file(tmp_path, "train.tgt", tgt, np.dtype(np.uint16))
    return ParallelSplit.load(tmp_path, "train")


def test_halves_of_an_odd_batch_keep_every_sentence(tmp_path):
    from nmt.batches import make_batch
    split = _split(tmp_path, [[5, 6], [7], [8, 9, 10]], [[11], [12, 13], [14]])
    batch = make_batch(split, np.array([0, 1, 2]))
    halves = batch.halves()
    assert np.concatenate([h.indices for h in halves]).tolist() == [0, 1, 2]
    assert torch.equal(torch.cat([h.src for h in halves]), batch.src)
    assert sum(h.num_tgt_tokens for h in halves) == batch.num_tgt_tokens
    assert sum(h.num_src_tokens for h in halves) == batch.num_src_tokens != batch.num_tgt_tokens


def test_num_src_tokens_counts_the_unpadded_source(tmp_path):
    from nmt.batches import make_batch
    split = _split(tmp_path, [[5, 6, 7], [8]], [[11], [12]])
    assert make_batch(split, np.array([0, 1])).num_src_tokens == 6  # 3+EOS, 1+EOS


def test_token_dtype_boundary():
    from nmt.shards import token_dtype
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32


def test_a_sentence_of_65536_tokens_keeps_its_length():
    from nmt.shards import sequence_lengths
    assert sequence_lengths(np.array([0, 65535])).dtype == np.uint16
    lengths = sequence_lengths(np.array([0, 65536]))
    assert lengths.tolist() == [65536]


def test_a_truncated_token_file_is_refused(tmp_path):
    from nmt.shards import TokenArray
    np.save(tmp_path / "train.src.tokens.npy", np.arange(10, dtype=np.uint16))
    np.save(tmp_path / "train.src.offsets.npy", np.array([0, 4, 12], dtype=np.int64))
    with pytest.raises(DataError, match="do not match"):
        TokenArray(tmp_path, "train.src")


def test_one_worker_asked_for_is_one(monkeypatch):
    import os

    from nmt.shards import worker_count
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert worker_count(1) == 1 and worker_count(3) == 3 and worker_count(0) == 8


def test_concatenation_removes_its_inputs(tmp_path):
    from nmt.shards import TokenArray, concatenate_token_files, write_token_file
    write_token_file(tmp_path, "a", [[5, 6], [7]], np.dtype(np.uint16))
    write_token_file(tmp_path, "b", [[8, 9, 10]], np.dtype(np.uint16))
    assert concatenate_token_files(tmp_path, ["a", "b"], "ab", block=2) == {"sequences": 3, "tokens": 6}
    joined = TokenArray(tmp_path, "ab")
    assert [joined[i].tolist() for i in range(3)] == [[5, 6], [7], [8, 9, 10]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ab.offsets.npy", "ab.tokens.npy"]


def test_read_tsv_column_past_the_fields_is_a_one_line_error(tmp_path):
    from nmt.data import read_tsv
    path = tmp_path / "c.tsv"
    path.write_text("a\tb\n")
    with pytest.raises(DataError, match="column 3 was asked for"):
        list(read_tsv(path, 0, 2))


@pytest.mark.parametrize("name", ["validation", "valid", "dev", "val"])
def test_a_split_named_as_datasets_name_them_is_the_valid_set(monkeypatch, name):
    import datasets

    from nmt.data import load_hf_corpus
    rows = {"xx": ["a", "b"], "yy": ["c", "d"]}
    fake = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), name: datasets.Dataset.from_dict(rows)})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    assert load_hf_corpus("some/dataset", None, "xx", "yy")["valid"] == [("a", "c"), ("b", "d")]


def test_a_pair_at_the_ratio_limit_is_kept():
    from nmt.data import CleanConfig, PairCleaner
    cleaner = PairCleaner(CleanConfig(max_ratio=3.0), "xx", "yy")
    assert cleaner("w", "a b c") is not None
    assert cleaner("w", "a b c d") is None and cleaner.stats.ratio == 1


def test_pair_hash_separates_the_sides():
    from nmt.data import pair_hash
    assert pair_hash("ab", "c") != pair_hash("a", "bc")


def test_split_sides_of_different_counts_are_refused(tmp_path):
    with pytest.raises(DataError, match="counts differ"):
        _split(tmp_path, [[5], [6], [7]], [[8], [9]])


def test_word_dropout_of_one_drops_every_regular_token_the_first_regular_id_too():
    """Word dropout must be able to drop the first regular id too."""
    from nmt.batches import drop_source_tokens
    from nmt.tokenizer import EOS, FIRST_REGULAR_ID, PAD, UNK

    src = torch.tensor([[FIRST_REGULAR_ID, FIRST_REGULAR_ID + 1, 300, EOS], [FIRST_REGULAR_ID, EOS, PAD, PAD]])
    dropped = drop_source_tokens(src, 1.0, np.random.default_rng(0))
    assert dropped.tolist() == [[UNK, UNK, UNK, EOS], [UNK, EOS, PAD, PAD]]


def test_an_empty_corpus_has_no_batches():
    empty = np.array([], dtype=np.int64)
    assert token_batches(empty, empty, 100) == [] and token_batches(empty, empty, 100, seed=3) == []


def test_a_text_files_name_gives_its_language_only_where_it_is_a_language_code():
    from nmt.monolingual import LANGUAGE_UNKNOWN, file_language

    assert [file_language(Path(n)) for n in ("news.de", "news.de.gz", "mono.zh-TW.txt", "a.eng.txt", "news.zh_TW")] == [
        "de", "de", "zh-TW", "eng", "zh_TW"]
    assert [file_language(Path(n)) for n in ("notes.text", "news.e1", "news.txt", "news")] == [LANGUAGE_UNKNOWN] * 4


def test_local_csv_and_tsv_folders_are_read_literally_and_without_quoting_only_when_all_tsv(tmp_path):
    import csv

    from nmt.data import _csv_options, _text

    (tmp_path / "tsv").mkdir()
    (tmp_path / "tsv" / "train.tsv").write_text("a\tb\n")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "train.tsv").write_text("a\tb\n")
    (tmp_path / "mixed" / "valid.csv.gz").write_bytes(b"")
    assert _csv_options(tmp_path / "tsv")["quoting"] == csv.QUOTE_NONE
    assert "quoting" not in _csv_options(tmp_path / "mixed") and _csv_options(tmp_path / "mixed")["na_filter"] is False
    assert _text(None, "row 1") == ""  # a missing value: an empty sentence, dropped as such



def test_a_text_files_language_is_its_last_code_and_each_file_is_normalized_for_its_own(tmp_path):
    from nmt.data import CleanConfig
    from nmt.monolingual import file_language, read_documents

    assert file_language(Path("news.2019.de.gz")) == "de"
    (tmp_path / "x.en").write_text("\nhello\n\n\nworld\n")
    (tmp_path / "x.zh").write_text("漢語\n")
    documents = list(read_documents([tmp_path / "x.en", tmp_path / "x.zh"], ["en", "zh"], CleanConfig()))
    assert documents == [(0, "hello"), (1, "world"), (2, "汉语")]  # blank lines end a document once; zh made Simplified


def test_held_out_documents_fill_the_count_exactly_and_tails_take_at_least_two_lines():
    from nmt.monolingual import hold_out

    held = hold_out(np.repeat(np.arange(20), 5), 10, 0)  # documents that fit exactly: two whole ones
    assert held.sum() == 10 and len(np.unique(np.repeat(np.arange(20), 5)[held])) == 2
    assert hold_out(np.repeat(np.arange(100), 60), 100, 0).sum() == 100  # tails until the count, not past it
    assert hold_out(np.repeat(np.arange(7), 3), 1000, 0).sum() == 3  # documents too short for tails: one whole
    documents = np.repeat(np.arange(3), [5000, 8, 8])
    held = hold_out(documents, 500, 0)
    assert all(held[documents == d].sum() in (0, 2) for d in (1, 2))  # a short document's tail: 2 lines
    documents = np.repeat(np.arange(4), [25, 25, 1000, 1000])  # whole documents make exactly half the count
    held = hold_out(documents, 100, 0)
    assert held.sum() == 50 and set(np.unique(documents[held]).tolist()) == {0, 1}
    documents = np.repeat(np.arange(3), [4000, 4, 4])  # a 4-line document is long enough for a tail
    held = hold_out(documents, 500, 0)
    assert held[documents == 0].sum() == 399 and held[documents == 1].sum() == held[documents == 2].sum() == 2


def test_cleaning_counts_changes_to_either_side_and_pairs_hash_to_64_bits():
    import math

    from nmt.data import CleanConfig, PairCleaner, pair_hash
    from nmt.errors import DataError

    cleaner = PairCleaner(CleanConfig())
    cleaner("fine", "gut  so")
    cleaner("fine", "Cafe\u0301")
    assert (cleaner.stats.whitespace_fixed, cleaner.stats.normalized) == (1, 1)
    assert any(pair_hash(f"s{i}", "t") >= 2**32 for i in range(10))
    with pytest.raises(DataError):
        CleanConfig(max_ratio=math.inf)


def test_a_side_file_may_be_compressed(tmp_path):
    from nmt.data import find_side_file

    (tmp_path / "train.de.gz").write_bytes(gzip.compress(b"a\n"))
    assert find_side_file(tmp_path / "train", "de") == tmp_path / "train.de.gz"
