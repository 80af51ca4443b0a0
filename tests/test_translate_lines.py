"""`nmt translate` line by line: prefixes stay with their lines, n-best rows, truncation warnings that name
the right lines, pivoting, and the standard input."""

import copy
import json
from pathlib import Path

import pytest
from conftest import TINY_TRANSFORMER, assert_one_line_error, prepare_toy_data, toy_pairs, train_tiny
from nmt_cli.main import app
from typer.testing import CliRunner

from nmt.checkpoint import load_for_inference
from nmt.config import DecodeConfig
from nmt.errors import ConfigError, DataError
from nmt.search import Hypothesis
from nmt.translate import PivotTranslator, Translations, _chunks, encode_lines, format_output, translate_file

runner = CliRunner()
LONG = " ".join(["w1 w2 w3"] * 6)  # far more than 4 pieces


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lines")
    return train_tiny(prepare_toy_data(root, train=200), root / "model", TINY_TRANSFORMER, max_steps=30, valid_every=30)


def _translate(model_dir, tmp_path, lines, options, prefixes=None):
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    prefix_path = None
    if prefixes is not None:
        prefix_path = tmp_path / "prefix.txt"
        prefix_path.write_text("".join(p + "\n" for p in prefixes), encoding="utf-8")
    warnings = []
    count = translate_file(model_dir, source, out, options, device="cpu", warn=warnings.append, prefix_path=prefix_path)
    assert count == len(lines)
    return out.read_text(encoding="utf-8").split("\n")[:-1], warnings


# --- the prefix file: one prefix per input line, checked at both ends -----------------------

def test_a_prefix_file_with_more_lines_than_the_input_is_refused_at_any_chunk_size():
    for size in (1, 2, 3, 10):
        with pytest.raises(DataError, match="prefix.txt has more lines than in.txt"):
            list(_chunks(["a", "b", "c"], ["p1", "p2", "p3", "p4"], size, "in.txt", "prefix.txt"))
        chunks = list(_chunks(["a", "b", "c"], ["p1", "p2", "p3"], size, "in.txt", "prefix.txt"))
        assert all(len(lines) == len(prefixes) for lines, prefixes in chunks)
        assert [p for _, prefixes in chunks for p in prefixes] == ["p1", "p2", "p3"]


def test_an_empty_last_prefix_past_the_input_is_one_line_too_many():
    with pytest.raises(DataError, match="prefix.txt has more lines than in.txt"):
        list(_chunks(["a"], ["p", ""], 1, "in.txt", "prefix.txt"))


def test_a_short_prefix_file_names_its_own_line_count_past_the_first_chunk():
    with pytest.raises(DataError, match="prefix.txt has 3 lines but in.txt has more"):
        list(_chunks(["a"] * 5, ["p"] * 3, 2, "in.txt", "prefix.txt"))


def test_a_prefix_after_an_empty_input_line_stays_with_its_own_line(model_dir, tmp_path):
    out, warnings = _translate(model_dir, tmp_path, ["", "w1 w2", "w3"], {"beam": 2}, prefixes=["", "V9 V9 V9", "V0"])
    assert out[0] == "" and out[1].startswith("V9 V9 V9") and out[2].startswith("V0")
    out, warnings = _translate(model_dir, tmp_path, ["", "w1 w2"], {"beam": 2}, prefixes=["", "V9 漢"])
    assert len(warnings) == 1 and warnings[0].startswith("warning: line 2: its prefix"), warnings


def test_prefix_warnings_and_attention_maps_name_the_lines_of_the_file_across_chunks(model_dir, tmp_path):
    from nmt.alignment import AttentionOutput

    source, prefix_path, out = tmp_path / "in.txt", tmp_path / "prefix.txt", tmp_path / "out.txt"
    source.write_text("w1 w2\n\nw3\nw1 w4\nw2\n", encoding="utf-8")
    prefix_path.write_text("\n\n\nV9 漢\n\n", encoding="utf-8")
    warnings = []
    translate_file(model_dir, source, out, {"chunk_lines": 2, "beam": 2}, device="cpu", warn=warnings.append,
                   prefix_path=prefix_path, attention=AttentionOutput(tmp_path / "att", json=True))
    assert warnings[0].startswith("warning: line 4: its prefix holds characters")
    records = [json.loads(line) for line in (tmp_path / "att" / "attention.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "att").glob("line-*.png")) == [f"line-{n:06d}.png" for n in (1, 3, 4, 5)]


def test_five_prefixes_with_characters_the_vocabulary_lacks_are_each_named_and_more_are_summed_up(model_dir, tmp_path):
    _, warnings = _translate(model_dir, tmp_path, ["w1"] * 7, {"beam": 2, "chunk_lines": 3}, prefixes=["V9 漢"] * 7)
    assert [w.split(": its")[0] for w in warnings[:5]] == [f"warning: line {n}" for n in range(1, 6)]
    assert warnings[5:] == ["warning: 7 prefixes held characters the target vocabulary lacks"]


def test_a_prefix_ending_in_any_whitespace_ends_a_word(model_dir):
    _, tokenizer, _ = load_for_inference(model_dir, "best", "cpu")
    encoded = encode_lines(tokenizer, ["w1"] * 4, DecodeConfig(), prefixes=["V9 ", "V9\t", "V9\u00a0", "V9"])
    assert encoded.prefixes[0] == encoded.prefixes[1] == encoded.prefixes[2] != encoded.prefixes[3]


def test_line_and_paragraph_separators_in_a_line_are_spaces(model_dir):
    _, tokenizer, _ = load_for_inference(model_dir, "best", "cpu")
    lines = ["w1 w2", "w1\u2028w2", "w1\x1fw2", "w1\u0085w2"]
    sources = encode_lines(tokenizer, lines, DecodeConfig()).sources
    assert all(ids == sources[0] for ids in sources), sources


def test_decode_batches_cover_every_line_once_longest_first_within_the_token_budget():
    import random

    from nmt.translate import decode_batches

    rng = random.Random(3)
    for _ in range(50):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(32, 200)
        batches = decode_batches(lengths, budget)
        assert sorted(int(i) for b in batches for i in b) == list(range(len(lengths)))
        order = [lengths[i] for b in batches for i in b]
        assert order == sorted(lengths, reverse=True)
        for b in batches:  # padded to its longest (+ EOS); one line alone may exceed the budget
            assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 1) <= budget


# --- n-best output: 'i ||| text ||| score' ---------------------------------------------------

def test_nbest_lines_hold_the_index_the_text_and_the_score():
    translations = Translations([[Hypothesis([5], -1.25), Hypothesis([6], -2.5)], []], [["V1", "V2"], [""]], [])
    assert format_output(translations, True, 7) == "7 ||| V1 ||| -1.2500\n7 ||| V2 ||| -2.5000\n8 |||  ||| 0.0000\n"
    assert format_output(translations, False) == "V1\n\n"


def test_nbest_scores_from_the_command_line_are_log_probabilities_best_first(model_dir, tmp_path):
    (tmp_path / "in.txt").write_text("w1 w2\n\nw3 w4 w5\n", encoding="utf-8")
    result = runner.invoke(app, ["translate", str(model_dir), "-i", str(tmp_path / "in.txt"), "--beam", "3", "--nbest", "2",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [line.split(" ||| ") for line in result.stdout.splitlines()]
    assert all(len(row) == 3 for row in rows), rows
    assert rows[2] == ["1", "", "0.0000"]  # the empty line: an empty text between the separators
    for first, second in ((rows[0], rows[1]), (rows[3], rows[4])):
        assert float(second[2]) <= float(first[2]) < 0


# --- over-long lines: cut, and warned of by their line number in the file ---------------------

def test_truncation_warnings_name_the_lines_of_the_file_across_chunks_and_empty_lines(model_dir, tmp_path):
    lines = ["", LONG, "w1", "", "w2", LONG, "w3"]
    _, warnings = _translate(model_dir, tmp_path, lines, {"max_input_tokens": 4, "chunk_lines": 3})
    assert warnings == [f"warning: line {n} has more than 4 tokens and was truncated" for n in (2, 6)]


def test_five_truncated_lines_are_each_named_and_more_are_summed_up(model_dir, tmp_path):
    _, warnings = _translate(model_dir, tmp_path, [LONG] * 5, {"max_input_tokens": 4})
    assert warnings == [f"warning: line {n} has more than 4 tokens and was truncated" for n in range(1, 6)]
    _, warnings = _translate(model_dir, tmp_path, [LONG] * 7, {"max_input_tokens": 4})
    assert warnings[:5] == [f"warning: line {n} has more than 4 tokens and was truncated" for n in range(1, 6)]
    assert warnings[5:] == ["warning: 7 lines were truncated in all"]


def test_a_line_of_exactly_max_input_tokens_is_kept_whole_and_not_warned_of(model_dir):
    _, tokenizer, _ = load_for_inference(model_dir, "best", "cpu")
    length = len(tokenizer.encode_src(["w1 w2 w3 w4"])[0])
    whole = encode_lines(tokenizer, ["w1 w2 w3 w4"], DecodeConfig(max_input_tokens=length))
    assert whole.truncated == [] and len(whole.sources[0]) == length
    cut = encode_lines(tokenizer, ["w1 w2 w3 w4"], DecodeConfig(max_input_tokens=length - 1))
    assert cut.truncated == [1] and len(cut.sources[0]) == length - 1


def test_a_line_the_vocabulary_drops_is_empty_behind_a_language_tag(model_dir):
    _, tokenizer, _ = load_for_inference(model_dir, "best", "cpu")
    tagged = copy.copy(tokenizer)
    tagged.source_prefix = [5]  # as a multilingual model's --tgt-lang tag
    encoded = encode_lines(tagged, ["\u200b", "w1 w2", "\ufeff \u200b"], DecodeConfig())
    assert encoded.non_empty == [1]


# --- --pivot ---------------------------------------------------------------------------------

class _Fake:
    def __init__(self, truncated, nbest=3):
        self.decode, self.languages, self.truncated, self.asked = DecodeConfig(nbest=nbest), ("aa", "bb"), truncated, []

    def translate(self, lines, prefixes=None, attention=None, first_line=1, progress=False, decode=None):
        self.asked.append(decode or self.decode)
        return Translations([[Hypothesis([5], -1.0)] for _ in lines], [[f"{line}!"] for line in lines],
                            [n for n in self.truncated if first_line <= n < first_line + len(lines)])

    def too_long(self, lines):
        return [n for n in self.truncated if n <= len(lines)]


def test_pivot_warns_of_lines_cut_in_either_step_and_translates_into_the_pivot_once():
    first, second = _Fake([2]), _Fake([3])
    result = PivotTranslator(first, second).translate(["a", "b", "c"])
    assert result.truncated == [2, 3] and result.texts == [["a!!"], ["b!!"], ["c!!"]]
    assert PivotTranslator(first, second).too_long(["a", "b", "c"]) == [2]  # the input's: the second step's is not known yet
    assert [decode.nbest for decode in first.asked] == [1]  # the best translation into the pivot only
    later = PivotTranslator(_Fake([4]), _Fake([5])).translate(["d", "e"], first_line=4)  # a later chunk's lines
    assert later.truncated == [4, 5]


def test_pivot_errors_are_found_before_loading_a_model(tmp_path):
    from nmt.translate import LanguageChoice, load_text_translator

    for pivot in ("", " "):
        with pytest.raises(ConfigError, match="--pivot names no language"):
            load_text_translator([tmp_path], pivot=pivot)
    for choice in (LanguageChoice("bb", "aa"), LanguageChoice("aa", "bb")):
        with pytest.raises(ConfigError, match="--pivot aa is the source or target language itself"):
            load_text_translator([tmp_path], languages=choice, pivot="aa")


# --- reading the input -----------------------------------------------------------------------

def test_dash_reads_the_standard_input(model_dir):
    dash = runner.invoke(app, ["translate", str(model_dir), "-i", "-", "--device", "cpu"], input="w1 w2\n\nw3\n")
    plain = runner.invoke(app, ["translate", str(model_dir), "--device", "cpu"], input="w1 w2\n\nw3\n")
    assert dash.exit_code == 0, dash.output
    assert dash.stdout == plain.stdout and len(dash.stdout.split("\n")) == 4


def test_replace_invalid_applies_to_the_prefix_file_too(model_dir, tmp_path):
    (tmp_path / "in.txt").write_text("w1 w2\nw3\n", encoding="utf-8")
    (tmp_path / "prefix.txt").write_bytes(b"\nV9 \xff\n")
    options = ["translate", str(model_dir), "-i", str(tmp_path / "in.txt"), "--prefix", str(tmp_path / "prefix.txt"),
               "--device", "cpu"]
    result = runner.invoke(app, [*options, "--replace-invalid"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2 and result.stdout.splitlines()[1].startswith("V9")
    refused = runner.invoke(app, options)
    assert_one_line_error(refused, "prefix.txt:2: invalid UTF-8")


def test_a_nul_byte_on_the_standard_input_is_refused(model_dir):
    refused = runner.invoke(app, ["translate", str(model_dir), "--device", "cpu"], input=b"w1 w2\nw\x003\n")
    assert_one_line_error(refused, "<stdin>:2: a NUL byte")


def test_replace_invalid_applies_to_the_standard_input(model_dir):
    result = runner.invoke(app, ["translate", str(model_dir), "--replace-invalid", "--device", "cpu"],
                           input=b"w1 w2\nw3 \xff w4\n")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split("\n")) == 3
    refused = runner.invoke(app, ["translate", str(model_dir), "--device", "cpu"], input=b"w1 w2\nw3 \xff w4\n")
    assert refused.exit_code != 0 and "<stdin>:2: invalid UTF-8" in refused.output


def test_a_prefix_ending_in_a_space_may_end_the_translation_there(tiny_trained):
    """After a prefix that ends a word, the translation may end there (EOS may follow it)."""
    from nmt.tokenizer import EOS
    from nmt.translate import load_translator, word_start_mask

    _, model = tiny_trained
    translator = load_translator([model], {"beam": 1}, device="cpu")
    assert bool(word_start_mask(translator.tokenizer)[EOS])
    lines = [src for src, _ in toy_pairs(6, seed=5)]
    free = [texts[0] for texts in translator.translate(lines).texts]
    assert all(free)
    prefixed = translator.translate(lines, [text + " " for text in free]).texts
    assert [texts[0] for texts in prefixed] == free


def test_a_bilingual_model_refuses_another_source_language(tiny_trained):
    from nmt.translate import LanguageChoice, load_translator

    _, model = tiny_trained
    load_translator([model], device="cpu", languages=LanguageChoice("yy", "xx"))
    with pytest.raises(ConfigError, match=r"translates from xx only \(not zz\)"):
        load_translator([model], device="cpu", languages=LanguageChoice("yy", "zz"))


def test_one_translation_per_line_unless_nbest_is_given_whatever_the_checkpoint_says():
    from nmt.translate import decode_settings

    saved = DecodeConfig(beam=5, nbest=3)
    assert decode_settings(saved, None).nbest == 1
    assert decode_settings(saved, {"nbest": None, "beam": 4}).nbest == 1
    assert decode_settings(saved, {"nbest": 2}).nbest == 2


def test_a_language_code_is_taken_as_the_model_spells_it():
    from nmt.translate import as_spelled

    assert as_spelled("zh-tw", ["zh_TW", "en"]) == "zh_TW" and as_spelled("EN", ("de", "en")) == "en"
    assert as_spelled("de", ["de", "DE"]) == "de"  # the exact spelling first
    assert as_spelled("pt-br", ["pt_BR", "pt-BR"]) == "pt-br"  # two could be meant: as given (refused later)
    assert as_spelled(None, ["en"]) is None and as_spelled("fr", ["de", "en"]) == "fr"
