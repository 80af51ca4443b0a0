import dataclasses
import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nmt.alignment import (
    EOS_LABEL,
    AttentionMap,
    describe_attention,
    format_alignments,
    hard_alignments,
    merge_words,
    word_groups,
)
from nmt.batches import pad_source
from nmt.config import ModelConfig
from nmt.errors import ConfigError, DataError
from nmt.models import build_model
from nmt.models.attention import AttentionChoice
from nmt.search import beam_search, greedy_search
from nmt.tokenizer import BOS, EOS, PAD
from nmt.train_log import TrainLog, read_train_log

V = 24
MODELS = {
    "transformer": ModelConfig(arch="transformer", embed_dim=64, ff_dim=128, heads=4, enc_layers=1, dec_layers=2,
                               dropout=0.0),
    "rnn": ModelConfig(arch="rnn", cell="gru", embed_dim=32, hidden_dim=64, enc_layers=1, dec_layers=1, dropout=0.0,
                       tie_output=False),
}
SOURCES = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def _search(model, src, beam, choice=AttentionChoice()):
    if beam == 1:
        return greedy_search(model, src, max_len_a=1.0, max_len_b=4, attention=choice)
    return [nbest[0] for nbest in beam_search(model, src, beam, max_len_a=1.0, max_len_b=4, attention=choice)]


def _forced_attention(model, src, tokens, choice=AttentionChoice()):
    """The attention rows of teacher-forcing `tokens` (then EOS) step by step through decode_step."""
    memory = model.encode(src)
    state = model.init_state(memory, choice)
    rows = []
    for prev in [BOS] + tokens:
        _, state = model.decode_step(torch.tensor([prev]), memory, state)
        rows.append(state.attention[0])
    return torch.stack(rows)  # (T+1, S)


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("arch", ["transformer", "rnn"])
def test_attention_rows_are_distributions_over_the_real_source_tokens(arch, beam):
    model = build_model(MODELS[arch], V, V).eval()
    src = pad_source(SOURCES)  # (3, 8): the shorter sources are padded
    batched = _search(model, src, beam)
    for sentence, hyp in zip(SOURCES, batched):
        real = len(sentence) + 1  # the source tokens and EOS
        assert hyp.attention.shape == (len(hyp.tokens) + 1, src.shape[1])
        torch.testing.assert_close(hyp.attention[:, :real].sum(-1), torch.ones(len(hyp.tokens) + 1))
        assert bool((hyp.attention[:, real:] == 0).all())
        alone = _search(model, pad_source([sentence]), beam)[0]  # unbatched: the same weights
        assert alone.tokens == hyp.tokens
        torch.testing.assert_close(alone.attention, hyp.attention[:, :real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["transformer", "rnn"])
def test_beam_keeps_the_weights_of_the_hypothesis_it_outputs(arch):
    """Beam search reorders the weights with its beams: each finished hypothesis carries the
    weights of its own decoding path, which forced decoding of its tokens reproduces."""
    model = build_model(MODELS[arch], V, V).eval()
    src = pad_source(SOURCES)
    with torch.inference_mode():
        nbests = beam_search(model, src, 4, max_len_a=1.0, max_len_b=4, nbest=4, attention=AttentionChoice())
        for b, nbest in enumerate(nbests):
            assert len({tuple(h.tokens) for h in nbest}) == 4
            for hyp in nbest:
                forced = _forced_attention(model, src[b : b + 1], hyp.tokens)
                torch.testing.assert_close(hyp.attention, forced, atol=1e-5, rtol=1e-4)


def test_transformer_layer_and_head_choice():
    model = build_model(MODELS["transformer"], V, V).eval()
    src, tokens = pad_source(SOURCES[:1]), [7, 8, 9]
    with torch.inference_mode():
        heads = [_forced_attention(model, src, tokens, AttentionChoice(layer=1, head=h)) for h in range(1, 5)]
        mean = _forced_attention(model, src, tokens, AttentionChoice(layer=1))
        last = _forced_attention(model, src, tokens, AttentionChoice())
        torch.testing.assert_close(torch.stack(heads).mean(0), mean)
        assert not torch.allclose(heads[0], heads[1])
        assert not torch.allclose(mean, last)  # the default is the last layer (2), not the first
        torch.testing.assert_close(last, _forced_attention(model, src, tokens, AttentionChoice(layer=2)))
        memory = model.encode(src)
        for bad in (AttentionChoice(layer=3), AttentionChoice(head=5), AttentionChoice(layer=0)):
            with pytest.raises(ConfigError, match="does not exist"):
                model.init_state(memory, bad)
        rnn = build_model(MODELS["rnn"], V, V).eval()
        with pytest.raises(ConfigError, match="single attention"):
            rnn.init_state(rnn.encode(src), AttentionChoice(head=1))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["transformer", "rnn"])
def test_copy_task_attention_is_the_diagonal(arch):
    """A model trained to copy its input attends, for each output token, to the source token it copies."""
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(0)

    def sample(count):
        return [torch.randint(4, V, (int(torch.randint(4, 11, (1,), generator=data)),), generator=data).tolist()
                for _ in range(count)]

    config = MODELS[arch]
    if arch == "transformer":
        config = dataclasses.replace(config, dec_layers=1)
    model = build_model(config, V, V)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        sequences = sample(32)
        src = pad_source(sequences)  # (B, S): tokens, EOS, padding
        tgt_in = torch.cat([torch.full((len(sequences), 1), BOS), src[:, :-1].masked_fill(src[:, :-1] == EOS, PAD)], 1)
        logits = model(src, tgt_in)  # (B, S, V)
        loss = F.cross_entropy(logits.reshape(-1, V), src.reshape(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    sequences = sample(50)
    hyps = greedy_search(model, pad_source(sequences), attention=AttentionChoice())
    on_diagonal = total = 0
    for hyp, sequence in zip(hyps, sequences):
        amap = AttentionMap(1, [str(t) for t in sequence] + [EOS_LABEL], [str(t) for t in hyp.tokens] + [EOS_LABEL],
                            hyp.attention[:, : len(sequence) + 1].numpy())
        pairs = hard_alignments(amap)
        on_diagonal += sum(i == j for i, j in pairs)
        total += len(hyp.tokens)
    assert sum(h.tokens == s for h, s in zip(hyps, sequences)) >= 40  # it learned to copy
    assert on_diagonal / total >= 0.9


def test_word_level_merging_sums_source_pieces_and_averages_output_pieces():
    weights = np.array([
        [0.1, 0.2, 0.3, 0.4],
        [0.5, 0.1, 0.2, 0.2],
        [0.0, 0.6, 0.3, 0.1],
        [0.25, 0.25, 0.25, 0.25],
    ])
    amap = AttentionMap(1, ["\u2581The", "\u2581do", "g", EOS_LABEL], ["\u2581Der", "\u2581Hu", "nd", EOS_LABEL], weights)
    assert word_groups(amap.source) == [[0], [1, 2], [3]]
    words = merge_words(amap)
    assert words.source == ["The", "dog", EOS_LABEL] and words.output == ["Der", "Hund", EOS_LABEL]
    expected = np.array([
        [0.1, 0.5, 0.4],
        [(0.5 + 0.0) / 2, (0.3 + 0.9) / 2, (0.2 + 0.1) / 2],
        [0.25, 0.5, 0.25],
    ])
    np.testing.assert_allclose(words.weights, expected)
    np.testing.assert_allclose(words.weights.sum(1), 1.0)
    # Chinese has no spaces: each of its pieces stays a word (the word mark would join them all).
    assert word_groups(["\u2581知识", "就是", "力量", "。", EOS_LABEL]) == [[0], [1], [2], [3], [4]]
    assert word_groups(["\u2581I", "\u2581li", "ke", "茶", "\u2581Tea", "s"]) == [[0], [1, 2], [3], [4, 5]]


def test_hard_alignments_leave_out_end_of_sentence():
    weights = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
    amap = AttentionMap(1, ["a", "b", EOS_LABEL], ["x", "y", "z", EOS_LABEL], weights)
    assert hard_alignments(amap) == [(0, 0), (1, 2)]  # y looked at the source EOS: no pair


def test_train_log_reads_back_a_resumed_run_and_a_cut_last_line(tmp_path):
    log = TrainLog(tmp_path, tensorboard=False, warn=print)
    for step in (10, 20, 30):
        log.write({"type": "train", "step": step, "loss": 3.0 - step / 100, "lr": 1e-3})
    log.write({"type": "valid", "step": 20, "bleu": 5.0, "loss": 2.0, "ppl": 7.4})
    log.close()
    with open(tmp_path / "train_log.jsonl", "a") as f:  # resumed from the checkpoint at step 20
        f.write(json.dumps({"type": "train", "step": 30, "loss": 2.5, "lr": 1e-3}) + "\n")
        f.write('{"type": "train", "st')  # a crash mid-line
    train, valid = read_train_log(tmp_path)
    assert [r["step"] for r in train] == [10, 20, 30] and train[-1]["loss"] == 2.5
    assert [r["bleu"] for r in valid] == [5.0]


@pytest.mark.parametrize("record, field", [
    ({"type": "train", "step": 1, "lr": 1e-3}, "loss"),  # null means every update skipped; absent is an edit
    ({"type": "train", "step": 1, "loss": 2.0, "lr": "1e-3"}, "lr"),
    ({"type": "valid", "step": 1, "loss": {}, "bleu": 3.0}, "loss"),
    ({"type": "valid", "step": 1, "loss": 2.0, "bleu": "3"}, "bleu"),
    ({"type": "valid", "step": 1, "loss": 2.0, "bleu": 3.0, "bleu_de-en": None}, "bleu_de-en"),
    ({"type": "valid", "step": 1, "loss": 2.0, "bleu": True}, "bleu"),  # not 1
    ({"type": "valid", "step": 1, "loss": 2.0, "bleu": 3.0, "metric": "chrf"}, "chrf"),  # the score it names is not there
    ({"type": "valid", "step": 1, "loss": 2.0, "bleu": "3", "metric": ""}, "bleu"),  # an empty name: as before names
])
def test_train_log_names_a_record_without_the_numbers_its_readers_plot(tmp_path, record, field):
    good = {"type": "train", "step": 0, "loss": None, "lr": 1e-3}
    (tmp_path / "train_log.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"line 2: a {record['type']} record whose '{field}' is not a number"):
        read_train_log(tmp_path)


def test_train_log_without_tensorboard_warns_and_keeps_the_json_log(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    notes = []
    log = TrainLog(tmp_path, tensorboard=True, warn=notes.append)
    log.write({"type": "train", "step": 1, "loss": 1.0, "lr": 1e-3})
    log.close()
    assert len(notes) == 1 and "tensorboard" in notes[0]
    assert not (tmp_path / "tensorboard").exists()
    assert read_train_log(tmp_path)[0][0]["loss"] == 1.0


def test_heatmap_labels_fall_back_to_installed_fonts_that_have_their_characters(monkeypatch, tmp_path):
    from nmt import plots

    fonts = {"DejaVu Sans": frozenset(map(ord, "Knowledge is power.")), "Han": frozenset(map(ord, "知识就是力量")),
             "Han Too": frozenset(map(ord, "知识")), "Kana": frozenset(map(ord, "かな"))}
    monkeypatch.setattr(plots, "installed_font_characters", lambda: fonts)
    assert plots.label_fonts(["Knowledge", "is"]) == ["DejaVu Sans"]
    assert plots.label_fonts(["知识", "就是", "力量", "power"]) == ["DejaVu Sans", "Han"]  # one font has them all
    assert plots.label_fonts(["知", "か"]) == ["DejaVu Sans", "Han", "Kana"]
    amap = AttentionMap(1, ["知识", "力量", "</s>"], ["Knowledge", "</s>"], np.full((2, 3), 1 / 3))
    assert plots.draw_attention(amap, tmp_path / "map.png", "知识就是力量", "layer 1").stat().st_size > 0


def test_the_heatmap_draws_each_weight_in_its_row_and_column(monkeypatch, tmp_path):
    """Source pieces across (in order), output pieces down (first on top), and the cell of
    output i and source j holds weights[i, j]."""
    from nmt import plots

    drawn = []

    class RecordedFigure(plots.Figure):
        def savefig(self, *args, **kwargs):
            drawn.append(self)
            return super().savefig(*args, **kwargs)

    monkeypatch.setattr(plots, "Figure", RecordedFigure)
    weights = np.array([[0.0, 0.1, 0.9], [0.7, 0.2, 0.1]])  # (2 outputs, 3 source pieces)
    amap = AttentionMap(1, ["▁ein", "▁Hund", EOS_LABEL], ["▁a", EOS_LABEL], weights)
    plots.draw_attention(amap, tmp_path / "map.png", "ein Hund", "layer 1")
    (ax, _) = drawn[0].axes
    np.testing.assert_array_equal(ax.images[0].get_array(), weights)
    assert [label.get_text() for label in ax.get_xticklabels()] == amap.source
    assert [label.get_text() for label in ax.get_yticklabels()] == amap.output
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # row 0 (the first output) at the top


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("arch", ["transformer", "rnn"])
def test_asking_for_attention_does_not_change_the_translation(arch, beam):
    torch.manual_seed(3)
    model = build_model(MODELS[arch], V, V).eval()
    src = pad_source(SOURCES)
    with torch.inference_mode():
        shown, plain = _search(model, src, beam), _search(model, src, beam, choice=None)
    assert [h.tokens for h in shown] == [h.tokens for h in plain]
    assert [h.score for h in shown] == pytest.approx([h.score for h in plain], abs=1e-5)


def test_an_ensemble_shows_its_first_models_attention():
    from nmt.ensemble import Ensemble

    torch.manual_seed(4)
    transformer, rnn = build_model(MODELS["transformer"], V, V).eval(), build_model(MODELS["rnn"], V, V).eval()
    with torch.inference_mode():
        for first, second in ((transformer, rnn), (rnn, transformer)):
            for sentence in SOURCES:
                src = pad_source([sentence])
                hyp = _search(Ensemble([first, second]), src, 3)[0]
                torch.testing.assert_close(hyp.attention, _forced_attention(first, src, hyp.tokens), atol=1e-5, rtol=1e-4)


def test_hard_alignments_are_in_source_order_when_they_cross():
    weights = np.array([[0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    amap = AttentionMap(1, ["a", "b", EOS_LABEL], ["y", "x", EOS_LABEL], weights)
    assert hard_alignments(amap) == [(0, 1), (1, 0)]  # as fast_align and Moses list them
    assert format_alignments([(0, 1), (2, 0)]) == "0-1 2-0"  # source index first
    # The output's EOS row is no pair, even where it looked most at a word.
    eos_on_a_word = AttentionMap(1, ["a", "b", EOS_LABEL], ["y", EOS_LABEL], np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]]))
    assert hard_alignments(eos_on_a_word) == [(0, 0)]


def test_words_and_descriptions_of_the_attention_shown():
    assert word_groups(["\u2581我", "叫", "T", "om", EOS_LABEL]) == [[0], [1], [2, 3], [4]]  # no Latin joined to Han
    words = merge_words(AttentionMap(1, ["\u2581", "我", EOS_LABEL], ["x", EOS_LABEL], np.full((2, 3), 1 / 3)))
    assert words.source == ["\u2581", "我", EOS_LABEL]  # a lone word mark keeps a label
    model = ModelConfig(arch="transformer", dec_layers=6, heads=8)
    assert describe_attention(model, AttentionChoice()) == "transformer, decoder layer 6 of 6, mean of 8 heads"
    assert describe_attention(model, AttentionChoice(layer=2, head=3)) == "transformer, decoder layer 2 of 6, head 3 of 8"


def test_a_stop_while_drawing_leaves_no_earlier_runs_map_and_no_half_picture(tmp_path, monkeypatch):
    import nmt.plots
    from nmt.alignment import AttentionOutput
    from nmt.plots import write_attention

    for line in (1, 2, 3):  # an earlier run's maps of the same lines
        (tmp_path / f"line-00000{line}.png").write_bytes(b"earlier run")
    amap = AttentionMap(1, ["a", EOS_LABEL], ["x", EOS_LABEL], np.array([[0.9, 0.1], [0.2, 0.8]]))
    maps = [dataclasses.replace(amap, line=line) for line in (1, 2, 3)]
    drawn = []

    def savefig(self, path, **options):  # the second picture is cut short (Ctrl-C, a full disk)
        Path(path).write_bytes(b"half a picture")
        drawn.append(path)
        if len(drawn) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(nmt.plots.Figure, "savefig", savefig)
    with pytest.raises(KeyboardInterrupt):
        write_attention(maps, AttentionOutput(tmp_path, AttentionChoice()), "title", "description")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alignments.txt", "line-000001.png"]  # this run's only
    assert (tmp_path / "line-000001.png").read_bytes() == b"half a picture"  # (the first one, complete here)


def test_a_plot_that_cannot_be_written_keeps_the_earlier_picture(tmp_path, monkeypatch):
    import errno

    import nmt.plots
    from nmt.plots import plot_training

    log = [{"type": "train", "step": s, "loss": 3.0 / s, "lr": 1e-3} for s in (1, 2)]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (tmp_path / "curves.png").write_bytes(b"the earlier picture")

    def savefig(self, path, **options):  # the disk fills up halfway
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nmt.plots.Figure, "savefig", savefig)
    with pytest.raises(DataError, match="No space left on device"):
        plot_training([tmp_path], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes() == b"the earlier picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "train_log.jsonl"]


def test_a_plot_drawn_again_keeps_the_pictures_permissions(tmp_path):
    """A picture drawn again in place of an earlier one keeps that file's permissions (a private
    0600 one stays private), as every other file nmt writes again does."""
    from nmt.plots import plot_training

    log = [{"type": "train", "step": s, "loss": 3.0 / s, "lr": 1e-3} for s in (1, 2)]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    out = plot_training([tmp_path], tmp_path / "curves.png")
    out.chmod(0o600)
    plot_training([tmp_path], out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_runs_of_the_same_folder_name_are_told_apart_by_their_paths(tmp_path):
    """Two runs whose folders have one name (a/model, b/model) are labelled by their full paths,
    else their curves would carry one label."""
    from nmt.plots import training_figure

    runs = []
    for parent in ("a", "b"):
        run = tmp_path / parent / "model"
        run.mkdir(parents=True)
        (run / "train_log.jsonl").write_text(json.dumps({"type": "train", "step": 1, "loss": 2.0, "lr": 1e-3}) + "\n")
        runs.append(run)
    loss_ax = training_figure(runs).axes[0]
    assert [line.get_label() for line in loss_ax.get_lines()] == [f"{runs[0]} train", f"{runs[1]} train"]
    one = tmp_path / "one"
    one.mkdir()
    (one / "train_log.jsonl").write_text((runs[0] / "train_log.jsonl").read_text())
    labels = [line.get_label() for line in training_figure([runs[0], one]).axes[0].get_lines()]
    assert labels == ["model train", "one train"]  # distinct names stay short


def test_the_plot_shows_the_score_each_log_names(tmp_path):
    """A validation record names its dev score (`metric`, `metric_name`): a task with another
    score is drawn under its own name, per direction too; a log written before records named it
    is read as BLEU (or masked accuracy, where that is what it holds)."""
    from nmt.plots import training_figure

    records = {
        "new": [{"type": "valid", "step": s, "loss": 2.0, "chrf": 30.0 + s, "chrf_de-en": 20.0 + s, "bleu_de-en": 1.0,
                 "metric": "chrf", "metric_name": "chrF"} for s in (1, 2)],
        "old": [{"type": "valid", "step": s, "loss": 2.0, "bleu": 10.0 * s, "bleu_fr-en": 5.0} for s in (1, 2)],
        "mlm": [{"type": "valid", "step": s, "loss": 2.0, "accuracy": 40.0 + s} for s in (1, 2)],
    }
    for name, lines in records.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    score_ax = training_figure([tmp_path / name for name in records]).axes[1]
    curves = {line.get_label(): list(line.get_ydata()) for line in score_ax.get_lines()}
    assert curves == {"new (chrF)": [31.0, 32.0], "new de-en": [21.0, 22.0], "old (BLEU)": [10.0, 20.0],
                      "old fr-en": [5.0, 5.0], "mlm (masked accuracy)": [41.0, 42.0]}
    assert score_ax.get_ylabel() == "chrF / BLEU / masked accuracy"
    assert training_figure([tmp_path / "old", tmp_path / "old"]).axes[1].get_ylabel() == "BLEU"  # each name once


def test_a_run_without_json_removes_an_earlier_runs_weights_and_words_merges_the_pieces(tmp_path, monkeypatch):
    import nmt.plots
    from nmt.alignment import AttentionOutput
    from nmt.plots import write_attention

    monkeypatch.setattr(nmt.plots, "draw_attention", lambda *args: None)
    amap = AttentionMap(1, ["▁a", "b", EOS_LABEL], ["▁x", "y", EOS_LABEL], np.array([[0.5, 0.4, 0.1], [0.1, 0.1, 0.8],
                                                                                     [0.2, 0.1, 0.7]]))
    write_attention([amap], AttentionOutput(tmp_path, AttentionChoice(), json=True), "title", "description")
    assert json.loads((tmp_path / "attention.jsonl").read_text())["source"] == ["▁a", "b", EOS_LABEL]
    write_attention([amap], AttentionOutput(tmp_path, AttentionChoice(), words=True), "title", "description")
    assert not (tmp_path / "attention.jsonl").exists()  # its weights would disagree with these alignments
    write_attention([amap], AttentionOutput(tmp_path, AttentionChoice(), words=True, json=True), "title", "description")
    merged = json.loads((tmp_path / "attention.jsonl").read_text())
    assert (merged["source"], merged["output"]) == (["ab", EOS_LABEL], ["xy", EOS_LABEL])  # whole words


def test_the_heatmaps_top_margin_grows_with_the_longest_source_label_and_its_left_with_the_output():
    from nmt.plots import heatmap_size

    def size(source, output):
        return heatmap_size(AttentionMap(1, source, output, np.zeros((len(output), len(source)))))

    width, height, margins = size(["a", EOS_LABEL], ["x", EOS_LABEL])
    _, taller, wider_top = size(["a" * 30, EOS_LABEL], ["x", EOS_LABEL])
    assert wider_top["top"] > margins["top"] and taller > height and wider_top["left"] == margins["left"]
    _, _, wider_left = size(["a", EOS_LABEL], ["x" * 30, EOS_LABEL])
    assert wider_left["left"] > margins["left"] and wider_left["top"] == margins["top"]
