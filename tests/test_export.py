"""`nmt export --format ctranslate2` and `nmt translate --engine ctranslate2`: the exported
network computes what nmt's does, and its translator keeps nmt's input and output handling."""

import json
import shutil
import types

import numpy as np
import pytest
import torch
from conftest import TINY_RNN, TINY_TRANSFORMER, assert_one_line_error, prepare_toy_data, toy_pairs, train_tiny
from nmt_cli.main import app
from typer.testing import CliRunner

from nmt.alignment import EOS_LABEL
from nmt.batches import pad_source
from nmt.checkpoint import load_for_inference
from nmt.config import config_from_dict, save_config
from nmt.errors import ConfigError
from nmt.export import (
    INT8_WEIGHT_RANGE,
    compute_type,
    decoding_limits,
    export_model,
    int8_sums_can_overflow,
    load_ctranslate2_translator,
    quantize_spec,
    transformer_spec,
    with_eos_column,
)
from nmt.models.attention import AttentionChoice
from nmt.search import NEW_WORD, StepRules, max_lengths, output_limits
from nmt.tokenizer import EOS, PAD
from nmt.translate import load_translator, translate_file

runner = CliRunner()

TWO_LAYERS = {**TINY_TRANSFORMER, "enc_layers": 2, "dec_layers": 2}
# Each kind of model the export writes differently: the norm's place, one embedding matrix for
# both sides, the output tied to the target embeddings or not, one SentencePiece model or two.
VARIANTS = {
    "post-shared-tied-joint": (True, {"norm": "post", "share_embeddings": True, "tie_output": True}),
    "pre-untied-joint": (True, {"norm": "pre", "share_embeddings": False, "tie_output": False}),
    "pre-tied-separate": (False, {"norm": "pre", "tie_output": True}),
    "post-untied-separate": (False, {"norm": "post", "tie_output": False}),
}
LIMIT = {"max_len_a": 0.0, "max_len_b": 30}  # one length limit for every sentence: raw CTranslate2 calls take one


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (checkpoint dir, its CTranslate2 export), trained (seconds) when first asked for."""
    root = tmp_path_factory.mktemp("export")
    made = {}

    def get(variant: str):
        if variant not in made:
            joint, model = VARIANTS[variant]
            data = root / ("joint" if joint else "separate")
            if not (data / "data").exists():
                prepare_toy_data(data, train=200, joint_vocab=joint)
            save_dir = train_tiny(data / "data", root / variant, {**TWO_LAYERS, **model})
            export_model(save_dir, root / f"{variant}-ct2")
            made[variant] = save_dir, root / f"{variant}-ct2"
        return made[variant]

    return get


def _ct2(export_dir, options: dict, quantize: bool = False):
    # One thread: OpenMP threads spin-waiting for each other on a busy machine burn its CPU.
    return load_ctranslate2_translator(export_dir, options, "cpu", quantize, threads=1)


def _lines(count: int, seed: int = 5) -> list[str]:
    return [src for src, _ in toy_pairs(count, seed=seed)]


def _cut_at_the_limit(tokens: list[int]) -> bool:
    """A raw CTranslate2 output that reached LIMIT: CTranslate2 scores it without an EOS."""
    return len(tokens) >= LIMIT["max_len_b"] - 1


def _raw_ct2(translator, lines: list[str], beam: int) -> list[tuple[list[int], float]]:
    """CTranslate2's own search on the exported model, allowing every token (nmt bans PAD and
    BOS; CTranslate2 would renormalize the rest): (tokens without EOS, score) per line."""
    pieces = [translator.tokenizer.src_pieces(ids) for ids in translator.tokenizer.encode_src(lines)]
    results = translator.translator.translate_batch(
        pieces, beam_size=beam, length_penalty=0.0 if beam == 1 else 1.0, max_decoding_length=LIMIT["max_len_b"] - 1,
        min_decoding_length=0, max_input_length=0, return_scores=True, return_end_token=True)
    tgt = translator.tokenizer.tgt
    out = []
    for result in results:
        ids = [tgt.piece_to_id(piece) for piece in result.hypotheses[0]]
        out.append((ids[:-1] if ids and ids[-1] == EOS else ids, result.scores[0]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_exported_network_scores_greedy_outputs_as_nmt_does(models, variant):
    save_dir, export_dir = models(variant)
    lines = _lines(30)
    nmt = load_translator([save_dir], {"beam": 1, "len_penalty": 0.0, **LIMIT}, device="cpu").translate(lines)  # log-probs
    assert len({texts[0] for texts in nmt.texts}) > 15  # the inputs get different outputs
    ct2 = _ct2(export_dir, {"beam": 1, **LIMIT})
    for (tokens, score), nbest in zip(_raw_ct2(ct2, lines, beam=1), nmt.hypotheses):
        assert tokens == nbest[0].tokens
        if not _cut_at_the_limit(tokens):  # at the limit nmt adds the forced EOS's log-prob
            assert score == pytest.approx(nbest[0].score, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("length", [{}, {"max_len_a": 0.5, "max_len_b": 2}], ids=["model-limits", "cut-short"])
def test_greedy_translations_are_nmts(models, variant, length):
    """The same outputs, also where each line's own length limit cuts them."""
    save_dir, export_dir = models(variant)
    lines = [*_lines(30), "", "w1"]
    native = load_translator([save_dir], {"beam": 1, **length}, device="cpu")
    nmt = native.translate(lines)
    ct2 = _ct2(export_dir, {"beam": 1, **length}).translate(lines)
    assert ct2.texts == nmt.texts and ct2.hypotheses[30] == [] and ct2.texts[30] == [""]
    sources = native.tokenizer.encode_src(lines)
    limits = decoding_limits(sources, [[] for _ in sources], native.decode)  # a·|src| + b per line, EOS included
    for ours, theirs, limit in zip(ct2.hypotheses, nmt.hypotheses, limits):
        if ours:
            assert ours[0].tokens == theirs[0].tokens
        if ours and len(ours[0].tokens) < limit - 1:  # at the limit, nmt adds the forced EOS's log-prob
            # CTranslate2 renormalizes over the tokens it allows (never PAD or BOS): a little higher.
            assert theirs[0].score - 1e-4 <= ours[0].score <= theirs[0].score + 0.1 * (len(ours[0].tokens) + 1)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_search_agrees_where_both_searches_go_as_far(models, variant):
    """CTranslate2 stops a sentence at beam_size finished hypotheses; nmt goes on while a live
    beam could beat its worst finished one. Up to CTranslate2's stop both hold the same beams, so
    an output differs only where nmt found a better one later, or where CTranslate2's was cut at
    the length limit (scored without an EOS)."""
    save_dir, export_dir = models(variant)
    lines = _lines(30)
    nmt = load_translator([save_dir], {"beam": 5, **LIMIT}, device="cpu").translate(lines)
    ct2 = _ct2(export_dir, {"beam": 5, **LIMIT})
    same = 0
    for (tokens, score), nbest in zip(_raw_ct2(ct2, lines, beam=5), nmt.hypotheses):
        same += tokens == nbest[0].tokens
        if _cut_at_the_limit(tokens):
            continue  # nmt's score adds the forced EOS's log-prob, CTranslate2's does not
        if tokens == nbest[0].tokens:
            assert score == pytest.approx(nbest[0].score, abs=1e-4)
        else:
            assert nbest[0].score >= score - 1e-4
    assert same >= 24
    through_translator = ct2.translate(lines)
    assert sum(a == b for a, b in zip(through_translator.texts, nmt.texts)) >= 24


@pytest.mark.slow
def test_prefix_and_no_repeated_ngrams_are_honoured(models):
    save_dir, export_dir = models("pre-untied-joint")
    lines = _lines(12)
    prefixes = ["V3 V3", "", "V5", *[""] * 9]
    for options in ({"beam": 1}, {"beam": 1, "no_repeat_ngram": 2}):
        nmt = load_translator([save_dir], options, device="cpu").translate(lines, prefixes)
        ct2 = _ct2(export_dir, options).translate(lines, prefixes)
        assert ct2.texts == nmt.texts
        assert ct2.texts[0][0].startswith("V3 V3") and ct2.texts[2][0].startswith("V5")
    # A prefix ending in a space: CTranslate2 cannot hold the next piece to a word's start, but
    # starts the output with the prefix all the same.
    assert _ct2(export_dir, {"beam": 1}).translate(lines[:2], ["V3 ", "V5 V1 "]).texts[0][0].startswith("V3")
    short = {"beam": 1, "max_len_a": 0, "max_len_b": 1}  # the limit leaves room for the prefix, a word and EOS
    nmt = load_translator([save_dir], short, device="cpu").translate(lines[:2], ["V3 ", "V5 V1 "])
    ct2 = _ct2(export_dir, short).translate(lines[:2], ["V3 ", "V5 V1 "])
    assert [len(h[0].tokens) for h in ct2.hypotheses] == [len(h[0].tokens) for h in nmt.hypotheses]
    free = _ct2(export_dir, {"beam": 1}).translate(lines)
    assert any(_repeats_a_bigram(h[0].tokens) for h in free.hypotheses)  # the model repeats itself when let
    for beam in (1, 4):
        blocked = _ct2(export_dir, {"beam": beam, "no_repeat_ngram": 2})
        assert not any(_repeats_a_bigram(h[0].tokens) for h in blocked.translate(lines).hypotheses)


@pytest.mark.slow
def test_prefix_only_gives_each_prefix_as_the_whole_translation(models):
    save_dir, export_dir = models("pre-untied-joint")
    lines = _lines(6)
    prefixes = ["V3 V3", "", "V5 V1 V2", "V0", "", "V7"]
    free = load_translator([save_dir], {"beam": 4}, device="cpu").translate(lines)
    for beam in (1, 4):
        options = {"beam": beam, "prefix_only": True, "nbest": min(beam, 3)}
        nmt = load_translator([save_dir], options, device="cpu").translate(lines, prefixes, attention=AttentionChoice())
        ct2 = _ct2(export_dir, options).translate(lines, prefixes)
        for engine in (nmt, ct2):
            assert [texts[0] for texts in engine.texts] == [p or f[0] for p, f in zip(prefixes, free.texts)]
        assert [m.output[-1] for m in nmt.attention_maps if m is not None] == [EOS_LABEL] * 6  # the forced end has its row
        for i in (0, 2, 3, 5):  # a whole translation is one hypothesis, scored by the model
            assert len(ct2.hypotheses[i]) == len(nmt.hypotheses[i]) == 1
            assert ct2.hypotheses[i][0].score == pytest.approx(nmt.hypotheses[i][0].score, abs=1e-4)
        with pytest.raises(ConfigError, match="without its attention"):
            _ct2(export_dir, options).translate(lines, prefixes, attention=AttentionChoice())
    # A prefix that fills the length limit leaves one hypothesis to end, as in nmt's search.
    filled = _ct2(export_dir, {"beam": 3, "nbest": 2, "max_len_a": 0, "max_len_b": 2}).translate(lines[:1], ["V3 V2"])
    assert filled.texts == [["V3 V2"]]


@pytest.mark.slow
def test_a_line_of_characters_the_vocabulary_drops_is_an_empty_line(models):
    save_dir, export_dir = models("pre-untied-joint")
    lines = [_lines(1)[0], "\u200b", "\ufeff \u200b", ""]
    for translator in (load_translator([save_dir], {"beam": 2, "nbest": 2}, device="cpu"), _ct2(export_dir, {"beam": 2, "nbest": 2})):
        result = translator.translate(lines)
        assert result.texts[1:] == [[""]] * 3 and result.hypotheses[1:] == [[]] * 3
        assert result.texts[0][0]


@pytest.mark.slow
def test_the_lines_too_long_are_found_before_translating_as_translating_finds_them(models):
    """A server refuses them before it translates anything: `too_long` must name the lines
    `translate` cuts, in either engine."""
    save_dir, export_dir = models("pre-untied-joint")
    lines = ["w1", "w1 w2 w3 w4 w5 w6", "", "w2 w3 w4 w5 w6 w7 w8", "w3 w4"]
    native = load_translator([save_dir], {"max_input_tokens": 4}, device="cpu")
    ct2 = _ct2(export_dir, {"max_input_tokens": 4})
    assert native.too_long(lines) == ct2.too_long(lines) == [2, 4]
    assert native.translate(lines).truncated == ct2.translate(lines).truncated == [2, 4]


@pytest.mark.slow
def test_a_length_limit_past_the_exports_positions_is_warned_of_once(models, capsys):
    _, export_dir = models("pre-untied-joint")
    translator = _ct2(export_dir, {"beam": 1, "max_len_a": 0, "max_len_b": _export_positions(export_dir) + 10})
    for _ in range(2):
        translator.translate(_lines(1))
    assert capsys.readouterr().err.count("longer ones are cut") == 1
    _ct2(export_dir, {"beam": 1}).translate(_lines(1))
    assert "longer ones are cut" not in capsys.readouterr().err


def _export_positions(export_dir) -> int:
    return json.loads((export_dir / "nmt_export.json").read_text())["max_positions"]


def _repeats_a_bigram(tokens: list[int]) -> bool:
    bigrams = list(zip(tokens, tokens[1:]))
    return len(bigrams) != len(set(bigrams))


@pytest.mark.slow
def test_attention_is_the_last_layers_mean_over_heads(models):
    save_dir, export_dir = models("post-shared-tied-joint")
    lines = [*_lines(8), ""]
    nmt = load_translator([save_dir], {"beam": 1}, device="cpu").translate(lines, attention=AttentionChoice())
    translator = _ct2(export_dir, {"beam": 1})
    ct2 = translator.translate(lines, attention=AttentionChoice())
    assert ct2.attention_maps[-1] is None
    for ours, theirs in zip(ct2.attention_maps[:-1], nmt.attention_maps):
        assert (ours.source, ours.output, ours.line) == (theirs.source, theirs.output, theirs.line)
        np.testing.assert_allclose(ours.weights, theirs.weights, atol=1e-5)  # the source EOS column included
    assert translator.describe_attention(AttentionChoice()).startswith("transformer, decoder layer 2 of 2, mean of 2 heads")
    translator.translate(lines, attention=AttentionChoice(layer=2))
    cut = _ct2(export_dir, {"beam": 1, "max_len_a": 0.0, "max_len_b": 2}).translate(lines[:-1], attention=AttentionChoice())
    assert all(len(m.output) == m.weights.shape[0] for m in cut.attention_maps)  # a label for each row
    assert any(m.output[-1] != EOS_LABEL for m in cut.attention_maps)  # an output cut at the limit: no EOS row
    for choice in (AttentionChoice(layer=1), AttentionChoice(head=1)):
        with pytest.raises(ConfigError, match="last decoder layer"):
            translator.translate(lines, attention=choice)


@pytest.mark.slow
def test_sampling_is_seeded_and_nbest_is_sorted(models):
    _, export_dir = models("pre-tied-separate")
    lines = _lines(4)
    options = {"sampling": True, "nbest": 4, "topk": 5, "seed": 3}
    first = _ct2(export_dir, options).translate(lines)
    again = _ct2(export_dir, options).translate(lines)
    assert first.texts == again.texts and all(len(texts) == 4 for texts in first.texts)
    for nbest in first.hypotheses:
        assert [h.score for h in nbest] == sorted((h.score for h in nbest), reverse=True)
    other = _ct2(export_dir, {**options, "seed": 4}).translate(lines)
    assert other.texts != first.texts
    # Workers draw from streams of their own in whatever order they take batches: one samples.
    for decode, workers in ((options, 1), ({"beam": 2}, 2)):
        assert load_ctranslate2_translator(export_dir, decode, "cpu", threads=2).translator.num_translators == workers
    with pytest.raises(ConfigError, match="only with sampling"):
        _ct2(export_dir, {"topk": 3})
    # topk 1: every sample is the greedy translation, n times, as nmt's own sampling gives
    greedy = _ct2(export_dir, {"beam": 1}).translate(lines).texts
    assert _ct2(export_dir, {**options, "topk": 1}).translate(lines).texts == [[t[0]] * 4 for t in greedy]
    # So does a nucleus of the most probable piece alone, from all pieces; and a temperature near
    # 0 draws other samples than 1 with the same seed.
    assert _ct2(export_dir, {**options, "topk": 0, "topp": 1e-6}).translate(lines).texts == [[t[0]] * 4 for t in greedy]
    cold, warm = ({**options, "topk": 0, "temperature": t} for t in (1e-3, 1.0))
    assert _ct2(export_dir, cold).translate(lines).texts != _ct2(export_dir, warm).translate(lines).texts


@pytest.mark.slow
def test_int8_exports_and_int8_computation_translate(models, tmp_path, capsys):
    save_dir, export_dir = models("post-untied-separate")
    lines = [*_lines(20), ""]
    fp32 = _ct2(export_dir, {"beam": 1}).translate(lines).texts
    result = runner.invoke(app, ["export", str(save_dir), "--out", str(tmp_path / "int8"), "--quantization", "int8"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "int8" / "nmt_export.json").read_text())["quantization"] == "int8"
    for directory, quantize in ((tmp_path / "int8", False), (export_dir, True)):
        texts = _ct2(directory, {"beam": 1}, quantize).translate(lines).texts
        assert len(texts) == 21 and texts[-1] == [""] and all(t[0] for t in texts[:-1])
        if directory == export_dir and int8_sums_can_overflow():
            continue  # 8-bit weights quantized at load: this CPU's int8 sums overflow (and it says so)
        assert sum(a == b for a, b in zip(texts, fp32)) >= 14  # int8 weights round a little
    assert ("without VNNI" in capsys.readouterr().err) == int8_sums_can_overflow()


def test_int8_weights_keep_seven_bits(models):
    """Exported int8 weights stay within INT8_WEIGHT_RANGE, each row scaled to reach it, and
    their dequantized values are the float weights rounded."""
    save_dir, _ = models("pre-untied-joint")
    model, tokenizer, config = load_for_inference(save_dir, "best", "cpu")
    spec = transformer_spec(model, config.model, tokenizer, 64)
    spec.validate()
    floats = {name: np.array(value.numpy(), dtype=np.float32) for name, value in spec.variables().items()}
    quantize_spec(spec, "int8", INT8_WEIGHT_RANGE)
    variables = spec.variables()
    quantized = [name for name in variables if f"{name}_scale" in variables]
    assert len(quantized) >= 10
    for name in quantized:
        weight, scale = variables[name].numpy().astype(np.float32), variables[f"{name}_scale"].numpy()
        reaching = np.where(np.abs(floats[name]).max(axis=1) > 0, INT8_WEIGHT_RANGE, 0)  # a zero row stays zero
        np.testing.assert_array_equal(np.abs(weight).max(axis=1), reaching)
        np.testing.assert_allclose(weight / scale[:, None], floats[name], atol=0.5 / scale.min() + 1e-7)


@pytest.mark.slow
def test_translate_engine_ctranslate2_from_the_command_line(models, tmp_path):
    save_dir, _ = models("pre-untied-joint")
    export_dir = tmp_path / "exported"
    result = runner.invoke(app, ["export", str(save_dir), "--out", str(export_dir)])
    assert result.exit_code == 0, result.output
    assert "--engine ctranslate2" in result.output
    assert not list(tmp_path.glob(".exported*"))  # written beside it, then renamed
    source = tmp_path / "in.txt"
    source.write_text("".join(f"{line}\n" for line in [*_lines(5), "", "  ", *_lines(3, seed=6)]), encoding="utf-8")
    outputs = {}
    for engine, directory in (("nmt", save_dir), ("ctranslate2", export_dir)):
        result = runner.invoke(app, ["translate", str(directory), "-i", str(source), "--beam", "1", "--device", "cpu",
                                     "--engine", engine])
        assert result.exit_code == 0, result.output
        outputs[engine] = result.output
    lines = outputs["ctranslate2"].split("\n")
    assert len(lines) == 11 and lines[5] == lines[6] == "" and lines[-1] == "" and all(lines[:5])
    assert outputs["ctranslate2"] == outputs["nmt"]
    alone = tmp_path / "elsewhere" / "model"  # the directory alone translates
    shutil.copytree(export_dir, alone)
    record = json.loads((alone / "nmt_export.json").read_text())
    assert record["languages"] == {"source": "xx", "target": "yy"} and set(record["normalization"]) == {"src", "tgt"}
    assert record["decode"]["beam"] == 5 and record["model"]["norm"] == "pre" and (alone / record["sentencepiece"]["source"]).is_file()
    result = runner.invoke(app, ["translate", str(alone), "-i", str(source), "--beam", "1", "--engine", "ctranslate2"])
    assert result.output == outputs["nmt"]
    nbest = runner.invoke(app, ["translate", str(export_dir), "-i", str(source), "--nbest", "2", "--engine", "ctranslate2"])
    assert [int(line.split(" ||| ")[0]) for line in nbest.output.splitlines()] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6,
                                                                                 7, 7, 8, 8, 9, 9]
    prefixes = tmp_path / "prefix.txt"
    prefixes.write_text("V9 V9\n" + "\n" * 9, encoding="utf-8")
    prefixed = runner.invoke(app, ["translate", str(export_dir), "-i", str(source), "--prefix", str(prefixes),
                                   "--engine", "ctranslate2"])
    assert prefixed.exit_code == 0 and prefixed.output.startswith("V9 V9"), prefixed.output
    chunked = {}
    for chunk in (3, 10_000):
        out = tmp_path / f"out-{chunk}.txt"
        assert translate_file(export_dir, source, out, {"chunk_lines": chunk, "beam": 2}, engine="ctranslate2") == 10
        chunked[chunk] = out.read_text(encoding="utf-8")
    assert chunked[3] == chunked[10_000]


@pytest.mark.slow
def test_wrong_directories_and_options_are_one_line_errors(models, tmp_path):
    save_dir, export_dir = models("pre-untied-joint")
    source = tmp_path / "in.txt"
    source.write_text("w1 w2\n", encoding="utf-8")
    assert_one_line_error(runner.invoke(app, ["translate", str(export_dir), "-i", str(source)]), "--engine ctranslate2")
    assert_one_line_error(runner.invoke(app, ["translate", str(save_dir), "-i", str(source), "--engine", "ctranslate2"]),
                    "is a checkpoint directory", "nmt export")
    assert_one_line_error(runner.invoke(app, ["translate", str(export_dir), str(export_dir), "-i", str(source),
                                        "--engine", "ctranslate2"]), "no ensembles")
    assert_one_line_error(runner.invoke(app, ["translate", str(export_dir), "-i", str(source), "--engine", "marian"]),
                    "unknown engine")
    assert_one_line_error(runner.invoke(app, ["translate", str(export_dir), "-i", str(source), "--engine", "ctranslate2",
                                        "--attention", str(tmp_path / "a"), "--attention-layer", "1"]), "last decoder layer")
    assert_one_line_error(runner.invoke(app, ["export", str(save_dir), "--out", str(export_dir)]), "--overwrite")
    assert_one_line_error(runner.invoke(app, ["translate", str(export_dir), "-i", str(source), "--engine", "ctranslate2",
                                              "--checkpoint", "last"]), "weights of best/")
    assert_one_line_error(runner.invoke(app, ["translate", str(export_dir), "-i", str(source), "--engine", "ctranslate2",
                                              "--restrict-vocab"]), "one language")
    assert_one_line_error(runner.invoke(app, ["export", str(save_dir), "--out", str(tmp_path / "x"), "--format", "onnx"]),
                    "unknown export format")
    assert_one_line_error(runner.invoke(app, ["export", str(save_dir), "--out", str(tmp_path / "x"), "--quantization", "int4"]),
                    "unknown quantization")
    before = (export_dir / "model.bin").stat().st_mtime_ns
    result = runner.invoke(app, ["export", str(save_dir), "--out", str(export_dir), "--overwrite", "--checkpoint", "last"])
    assert result.exit_code == 0, result.output
    assert (export_dir / "model.bin").stat().st_mtime_ns != before
    assert json.loads((export_dir / "nmt_export.json").read_text())["checkpoint"].endswith("last")
    assert_one_line_error(runner.invoke(app, ["translate", str(export_dir), "-i", str(source), "--engine", "ctranslate2",
                                              "--checkpoint", "best"]), "weights of last/")
    # A run stopped before its first validation: best is its last/, exported and translated so
    unvalidated = tmp_path / "unvalidated"
    shutil.copytree(save_dir, unvalidated, ignore=shutil.ignore_patterns("best"))
    assert runner.invoke(app, ["export", str(unvalidated), "--out", str(tmp_path / "unvalidated-export")]).exit_code == 0
    result = runner.invoke(app, ["translate", str(tmp_path / "unvalidated-export"), "-i", str(source), "--engine",
                                 "ctranslate2", "--checkpoint", "best"])
    assert result.exit_code == 0, result.output
    for out in (save_dir / "best", save_dir, save_dir.parent):  # replacing it would lose the model
        assert_one_line_error(runner.invoke(app, ["export", str(save_dir), "--out", str(out), "--overwrite"]),
                              "export to another directory")
    assert (save_dir / "best").is_dir() and not (save_dir / "best" / "nmt_export.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()  # made beforehand: used as it is, --overwrite or not
    assert runner.invoke(app, ["export", str(save_dir), "--out", str(empty)]).exit_code == 0
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine", encoding="utf-8")
    assert_one_line_error(runner.invoke(app, ["export", str(save_dir), "--out", str(notes), "--overwrite"]), "not an export")
    assert (notes / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_an_export_with_another_sentencepiece_model_or_of_a_newer_format_is_refused(models, tmp_path):
    _, export_dir = models("pre-untied-joint")
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    source = tmp_path / "in.txt"
    source.write_text("w1 w2\n", encoding="utf-8")
    translate = ["translate", str(copy), "-i", str(source), "--engine", "ctranslate2"]
    assert runner.invoke(app, translate).exit_code == 0
    record = json.loads((copy / "nmt_export.json").read_text())
    other = {**record, "sentencepiece_sha256": {**record["sentencepiece_sha256"], "target": "0" * 64}}
    (copy / "nmt_export.json").write_text(json.dumps(other))
    assert_one_line_error(runner.invoke(app, translate), "not the SentencePiece model the export was made with")
    (copy / "nmt_export.json").write_text(json.dumps({**record, "format_version": 99}))
    assert_one_line_error(runner.invoke(app, translate), "format version 99", "upgrade nmt")


def test_an_rnn_is_refused_in_one_line(tmp_path):
    save_config(config_from_dict({"model": TINY_RNN}), tmp_path / "config.yaml")  # read before any weights
    result = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "no RNN decoder")
    assert not (tmp_path / "out").exists()


def test_an_encoder_layer_without_its_residual_is_refused_in_one_line(tmp_path):
    model = {**TINY_TRANSFORMER, "enc_no_residual_layer": 1}
    save_config(config_from_dict({"model": model}), tmp_path / "config.yaml")
    result = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "encoder layer 1 has no residual connection")
    assert not (tmp_path / "out").exists()


def test_length_limits_are_nmts_per_sentence():
    decode = config_from_dict({"decode": {"max_len_a": 1.2, "max_len_b": 3}}).decode
    sources = [[7] * n for n in (1, 5, 8, 13)]
    assert decoding_limits(sources, [[]] * 4, decode) == max_lengths(pad_source(sources), 1.2, 3).tolist() == [4, 9, 12, 18]
    assert decoding_limits(sources, [[], [], [9] * 20, []], decode) == [4, 9, 21, 18]  # a prefix and EOS fit
    prefixes = [[], [], [9] * 20 + [NEW_WORD], []]  # and the word begun after it
    rules = StepRules(prefix=torch.tensor([ids + [PAD] * (21 - len(ids)) for ids in prefixes]))
    assert decoding_limits(sources, prefixes, decode) == output_limits(pad_source(sources), 1.2, 3, rules).tolist()
    assert decoding_limits(sources, prefixes, decode) == [4, 9, 22, 18]


def test_the_source_eos_column_is_what_each_row_leaves():
    rows = np.array([[0.5, 0.25], [0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(with_eos_column(rows), [[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])


def test_compute_types():
    assert compute_type("fp32", False, "cpu") == "default"  # as exported
    assert compute_type("fp32", True, "cpu") == "int8"
    assert compute_type("fp32", True, "cuda") == "int8_float16"
    assert compute_type("bf16", True, "cuda") == "int8_bfloat16"
    assert compute_type("fp16", False, "cuda") == "float16"


def test_position_tables_hold_the_longest_source_and_output_the_settings_let_through():
    from nmt.config import DecodeConfig
    from nmt.export import position_rows

    assert position_rows(DecodeConfig(max_input_tokens=3000, max_len_a=0.0, max_len_b=10)) == 3001  # + EOS
    assert position_rows(DecodeConfig(max_input_tokens=3000, max_len_a=1.5, max_len_b=10)) >= 1.5 * 3000 + 10


@pytest.mark.slow
def test_the_export_records_the_layer_norms_epsilon(models):
    save_dir, export_dir = models("pre-untied-joint")
    model = load_for_inference(save_dir, "best", "cpu")[0]
    written = json.loads((export_dir / "config.json").read_text())
    # CTranslate2's own default (1e-6) differs from torch's; too little to change the tiny models' outputs.
    assert written["layer_norm_epsilon"] == model.encoder_layers[0].norm1.eps == 1e-5


def test_only_8_bit_int8_weights_are_warned_of():
    """Only exports with 8-bit int8 weights (made before the 7-bit ones) are warned of: on CPUs
    without VNNI the warning would otherwise be needless."""
    from nmt.export import INT8_WEIGHT_RANGE, _eight_bit_weights

    def record(quantization, weight_range):
        return types.SimpleNamespace(quantization=quantization, int8_weight_range=weight_range)

    assert not _eight_bit_weights(record("int8", INT8_WEIGHT_RANGE), quantize=False)
    assert not _eight_bit_weights(record("int8_float16", INT8_WEIGHT_RANGE), quantize=True)
    assert _eight_bit_weights(record("int8", 127), quantize=False)  # an export from before 7-bit weights
    assert _eight_bit_weights(record(None, INT8_WEIGHT_RANGE), quantize=True)  # float weights quantized at load
    assert not _eight_bit_weights(record(None, INT8_WEIGHT_RANGE), quantize=False)


def test_int8_float16_weights_keep_seven_bits_too(tmp_path):
    from nmt.export import INT8_WEIGHT_RANGE, quantize_spec, transformer_spec
    from nmt.files import Manifest
    from nmt.models import build_model
    from nmt.tokenizer import Tokenizer

    data = prepare_toy_data(tmp_path, train=200)
    manifest = Manifest.read(data)
    tokenizer = Tokenizer(data / manifest.vocab.src_model, data / manifest.vocab.tgt_model)
    config = config_from_dict({"model": TINY_TRANSFORMER}).model
    model = build_model(config, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).eval()
    spec = transformer_spec(model, config, tokenizer, 64)
    spec.validate()
    quantize_spec(spec, "int8_float16", INT8_WEIGHT_RANGE)
    variables = spec.variables()
    quantized = [name for name in variables if f"{name}_scale" in variables]
    assert quantized
    for name in quantized:
        assert np.abs(variables[name].numpy().astype(np.int32)).max() == INT8_WEIGHT_RANGE, name


def test_ctranslate2_never_outputs_the_reserved_symbols(tiny_trained, tmp_path):
    """[MASK], [CLS], [SEP] and a multilingual model's tags are never outputs, as in nmt's own search."""
    from nmt.export import export_model, load_ctranslate2_translator

    _, model = tiny_trained
    export_model(model, tmp_path / "ct2")
    translator = load_ctranslate2_translator(tmp_path / "ct2", {"beam": 1}, "cpu", threads=1)
    banned = {pieces[0] for pieces in translator._suppressed_pieces}
    assert {"[MASK]", "[CLS]", "[SEP]", "<pad>", "<s>"} <= banned

    class Recording:  # CTranslate2's translator, its calls' options kept
        def __init__(self, inner):
            self.inner, self.calls = inner, []

        def translate_batch(self, *args, **options):
            self.calls.append(options)
            return self.inner.translate_batch(*args, **options)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    translator.translator = recording = Recording(translator.translator)
    translator.translate(["w1 w2", "w3"])
    assert recording.calls and all(call["suppress_sequences"] == translator._suppressed_pieces for call in recording.calls)


@pytest.mark.slow
def test_sources_fill_the_exports_positions_and_an_output_limit_of_one_is_empty(models):
    _, export_dir = models("pre-untied-joint")
    rows = _ct2(export_dir, {"beam": 1}).max_positions
    assert _ct2(export_dir, {"beam": 1, "max_input_tokens": rows - 1}).translate(["w1"]).texts[0][0]  # and EOS
    with pytest.raises(ConfigError, match="max_input_tokens"):
        _ct2(export_dir, {"beam": 1, "max_input_tokens": rows}).translate(["w1"])
    # Room for EOS alone: the empty output nmt gives.
    assert _ct2(export_dir, {"beam": 1, "max_len_a": 0, "max_len_b": 1}).translate(["w1"]).texts == [[""]]


def test_ctranslate2_refuses_a_gpu_index_equal_to_the_count(monkeypatch):
    import ctranslate2

    from nmt.export import ctranslate2_device

    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 1)
    assert ctranslate2_device("cuda:0") == ("cuda", 0) and ctranslate2_device("cuda") == ("cuda", 0)
    with pytest.raises(ConfigError, match="CTranslate2 sees 1 GPUs"):
        ctranslate2_device("cuda:1")


def test_a_bilingual_export_takes_its_own_languages_and_refuses_others(tiny_trained, tmp_path):
    from nmt.export import export_model, load_ctranslate2_translator
    from nmt.translate import LanguageChoice

    _, model = tiny_trained
    export_model(model, tmp_path / "ct2")
    load_ctranslate2_translator(tmp_path / "ct2", None, "cpu", threads=1, languages=LanguageChoice("yy", "xx"))
    for choice, side in ((LanguageChoice("zz"), "target zz"), (LanguageChoice("yy", "zz"), "source zz")):
        with pytest.raises(ConfigError, match=f"translates xx -> yy only \\(not {side}\\)"):
            load_ctranslate2_translator(tmp_path / "ct2", None, "cpu", threads=1, languages=choice)
