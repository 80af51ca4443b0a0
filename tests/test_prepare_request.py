"""`nmt prepare`'s request (nmt.prepare_request): which options go together, what reaches each
way of preparing, and the summary printed when it is done."""

import dataclasses
import re

import pytest
from conftest import prepare_toy_data

import nmt.prepare_request as prepare_request
from nmt.errors import DataError
from nmt.files import Manifest
from nmt.prepare_request import PrepareRequest, prepare_data, prepare_warnings, summary

PARALLEL = {"src": "de", "tgt": "en", "train": ["c/train"]}
SENTENCES = [f"sentence {i} of document {i // 3} says w{i} and w{i + 1}" for i in range(24)]


@pytest.mark.parametrize("options, message", [
    ({**PARALLEL, "spm_sample": 0}, "--spm-sample must be at least 1"),
    ({**PARALLEL, "src": ""}, "--src: '' is not a language code"),
    ({**PARALLEL, "tgt": "e n"}, "--tgt: 'e n' is not a language code"),
    ({"tsv": ["x.tsv"], "tsv_langs": [("de", "../x")], "src": "de", "tgt": "en"}, "--tsv-langs: '../x' is not"),
    ({"mono": ["x.de"], "mono_langs": ["d e"]}, "--mono-langs: 'd e' is not"),
    ({**PARALLEL, "workers": -1}, "--workers at least 0"),
    ({**PARALLEL, "normalize": "NFX"}, "--normalize must be one of"),
    ({**PARALLEL, "lang_temperature": 2.0}, "--zero-shot and --lang-temperature go with --directions"),
    ({**PARALLEL, "hf_revision": "main"}, "--hf-revision goes with --hf"),
    ({**PARALLEL, "hf_config": "de-en"}, "--hf-config goes with --hf"),
    ({**PARALLEL, "mono_langs": ["de"]}, "--mono-langs goes with --mono"),
    ({"src": "de", "tgt": "en", "tsv": ["a.tsv"], "tsv_langs": [("de",)]}, "--tsv-langs needs one language per column"),
    ({"src": "de", "tgt": "en", "tsv": ["a.tsv"], "tsv_langs": [("de", "en"), ("en", "de")]},
     "several --tsv-langs name the columns of several --tsv inputs"),
    ({"src": "de", "train": ["a", "b"]}, "--src and --tgt name the languages"),
    ({**PARALLEL, "train": ["a", "b"]}, "several --train, --valid, --test, --tsv or --corpus inputs go with --directions"),
    ({"src": "de", "directions": "de-en", "train": ["c/train"]}, "leave out --src and --tgt"),
])
def test_options_that_do_not_go_together_are_refused_before_anything_is_made(tmp_path, options, message):
    with pytest.raises(DataError, match=re.escape(message)):
        prepare_data(PrepareRequest(out=tmp_path / "d", **options))
    assert not (tmp_path / "d").exists()


def _caught(monkeypatch, name: str) -> list:
    calls = []
    monkeypatch.setattr(prepare_request, name, lambda config, progress=False: calls.append(config))
    return calls


def test_each_way_gets_the_inputs_it_reads(tmp_path, monkeypatch):
    parallel, multilingual = _caught(monkeypatch, "prepare"), _caught(monkeypatch, "prepare_multilingual")
    prepare_data(PrepareRequest(out=tmp_path / "d", src="de", tgt="en", hf="org/set", hf_config="de-en", hf_revision="v2"))
    assert (parallel[0].hf_name, parallel[0].hf_config, parallel[0].hf_revision) == ("org/set", "de-en", "v2")
    prepare_data(PrepareRequest(out=tmp_path / "d", src="de", tgt="en", hf="org/set", hf_revision="v2"))  # no config
    assert parallel[1].hf_revision == "v2"
    # one TSV's columns name the languages of all its directions
    prepare_data(PrepareRequest(out=tmp_path / "d", directions="de-en,en-de", tsv=["a.tsv"], tsv_langs=[("de", "en")]))
    assert multilingual[0].prepare.tsv_langs == ("de", "en") and multilingual[0].tsv_langs == []
    # several TSVs: each its own columns, none for all
    prepare_data(PrepareRequest(out=tmp_path / "d", directions="de-en,fr-en", tsv=["a.tsv", "b.tsv"],
                                tsv_langs=[("de", "en"), ("fr", "en")]))
    assert multilingual[1].prepare.tsv_langs is None and multilingual[1].tsv_langs == [("de", "en"), ("fr", "en")]
    prepare_data(PrepareRequest(out=tmp_path / "d", directions="de-en,fr-en", tsv=["a.tsv", "b.tsv"], tsv_langs=[("de", "en")]))
    assert multilingual[2].prepare.tsv_langs is None  # not the first TSV's for all (the check of the count is prepare's)


def test_the_summary_says_what_each_data_dir_holds(tmp_path):
    data = prepare_toy_data(tmp_path / "joint", train=30)
    manifest = dataclasses.replace(Manifest.read(data), valid_unk_percent={"src": 1.5, "tgt": 2.5})
    manifest.counts["train"].update(src_tokens=1234, tgt_tokens=5678)  # figures that cannot be taken for each other
    text = summary(data, manifest)
    for split, counts in manifest.counts.items():
        assert re.search(rf"{split}: +{counts['pairs']} pairs, +{counts['src_tokens']} source tokens, +{counts['tgt_tokens']} "
                         "target tokens", text), text
    unk = manifest.valid_unk_percent
    assert "vocab: joint" in text and f"<unk> in valid: {unk['src']}% source, {unk['tgt']}% target" in text
    separate = prepare_toy_data(tmp_path / "separate", train=30, joint_vocab=False)
    assert "vocab: separate" in summary(separate, Manifest.read(separate))
    sizes = Manifest.read(separate)
    sizes.vocab = dataclasses.replace(sizes.vocab, src_size=100, tgt_size=200)
    assert "100 source / 200 target pieces" in summary(separate, sizes)
    assert prepare_warnings(manifest) == []


def test_the_summary_of_monolingual_text_counts_documents(tmp_path):
    (tmp_path / "a.en").write_text("\n\n".join("\n".join(SENTENCES[i:i + 3]) for i in range(0, 24, 3)) + "\n")
    manifest = prepare_data(PrepareRequest(out=tmp_path / "m", mono=[tmp_path / "a.en"], vocab_size=40, valid_size=2))
    text = summary(tmp_path / "m", manifest)
    assert text.startswith(f"prepared {tmp_path / 'm'} (monolingual, en)")
    for split, counts in manifest.counts.items():
        assert re.search(rf"{split}: +{counts['sentences']} sentences, +{counts['tokens']} tokens, +{counts['documents']} "
                         "documents", text), text
