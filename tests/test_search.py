import itertools

import pytest
import torch
from conftest import TableModel
from conftest import table as _table

from nmt.config import ModelConfig
from nmt.models import build_model
from nmt.search import FullPrefixDecoding, beam_search, greedy_search, max_lengths
from nmt.tokenizer import BOS, EOS, PAD


def test_beam_finds_the_best_sequence_greedy_misses():
    A, B = 4, 5
    table = _table({BOS: {A: 0.6, B: 0.4}, A: {A: 0.35, B: 0.35, EOS: 0.3}, B: {EOS: 0.9, A: 0.1}})
    model = TableModel(table)
    src = torch.tensor([[7, 7, EOS]])
    greedy = greedy_search(model, src, max_len_a=0, max_len_b=4)
    beam = beam_search(model, src, beam_size=2, len_penalty=0.0, max_len_a=0, max_len_b=4)
    assert greedy[0].tokens[0] == A
    assert beam[0][0].tokens == [B]
    assert beam[0][0].score == pytest.approx(float(torch.log(table[BOS, B] * table[B, EOS])), abs=1e-5)


def test_large_beam_equals_exhaustive_search():
    torch.manual_seed(3)
    V, L = 7, 4  # tokens 4..6 plus EOS; outputs of at most L tokens including EOS
    table = torch.rand(V, V) ** 3 + 1e-3
    table = table / table.sum(1, keepdim=True)
    model = TableModel(table)
    src = torch.tensor([[5, EOS]])
    best_score, best_seq = float("-inf"), None
    for length in range(0, L):
        for seq in itertools.product(range(4, V), repeat=length):
            path = [BOS, *seq, EOS]
            score = sum(float(torch.log(table[a, b])) for a, b in zip(path, path[1:]))
            if score > best_score:
                best_score, best_seq = score, list(seq)
    hyps = beam_search(model, src, beam_size=V**L, len_penalty=0.0, max_len_a=0, max_len_b=L)
    assert hyps[0][0].tokens == best_seq
    assert hyps[0][0].score == pytest.approx(best_score, abs=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(embed_dim=32, ff_dim=64, heads=4, enc_layers=2, dec_layers=2),
        ModelConfig(arch="rnn", embed_dim=16, hidden_dim=32, tie_output=False, attention="general"),
    ],
    ids=["transformer", "rnn"],
)
def test_beam_one_equals_greedy(config):
    torch.manual_seed(1)
    model = build_model(config, 30, 30).eval()
    src = torch.randint(4, 30, (6, 9))
    src[:, -1] = EOS
    src[2, 5:] = PAD
    src[2, 4] = EOS
    for len_penalty in (0.0, 1.0, 2.5):  # the same scores too: beam search's, divided by the length
        greedy = greedy_search(model, src, 1.5, 5, len_penalty=len_penalty)
        beam = beam_search(model, src, beam_size=1, len_penalty=len_penalty, max_len_a=1.5, max_len_b=5)
        assert [h.tokens for h in greedy] == [b[0].tokens for b in beam]
        assert [h.score for h in greedy] == pytest.approx([b[0].score for b in beam], abs=1e-4)


def test_batched_beam_equals_one_sentence_at_a_time():
    model = build_model(ModelConfig(embed_dim=32, ff_dim=64, heads=4), 30, 30).eval()
    src = torch.randint(4, 30, (4, 8))
    src[:, -1] = EOS
    src[1, 3:] = PAD
    src[1, 2] = EOS
    batched = beam_search(model, src, beam_size=4, nbest=2)
    for i in range(4):
        length = int((src[i] != PAD).sum())
        single = beam_search(model, src[i : i + 1, :length], beam_size=4, nbest=2)
        assert [h.tokens for h in single[0]] == [h.tokens for h in batched[i]]


def test_nbest_sorted_and_within_length_limit():
    model = build_model(ModelConfig(embed_dim=32, ff_dim=64, heads=4), 30, 30).eval()
    src = torch.randint(4, 30, (3, 5))
    src[:, -1] = EOS
    hyps = beam_search(model, src, beam_size=4, nbest=4, max_len_a=1.0, max_len_b=2)
    limits = max_lengths(src, 1.0, 2)
    for nbest, limit in zip(hyps, limits.tolist()):
        assert len(nbest) == 4
        assert [h.score for h in nbest] == sorted((h.score for h in nbest), reverse=True)
        assert all(len(h.tokens) + 1 <= limit for h in nbest)
        assert all(PAD not in h.tokens and BOS not in h.tokens and EOS not in h.tokens for h in nbest)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(embed_dim=32, ff_dim=64, heads=4, enc_layers=2, dec_layers=2),
        ModelConfig(arch="rnn", cell="lstm", embed_dim=16, hidden_dim=32, enc_layers=2, dec_layers=2, tie_output=False),
    ],
    ids=["transformer", "rnn"],
)
def test_incremental_search_equals_full_prefix_recompute(config):
    torch.manual_seed(2)
    model = build_model(config, 30, 30).eval()
    src = torch.randint(4, 30, (5, 7))
    src[:, -1] = EOS
    src[3, 4:] = PAD
    src[3, 3] = EOS
    plain = FullPrefixDecoding(model)
    assert [h.tokens for h in greedy_search(model, src)] == [h.tokens for h in greedy_search(plain, src)]
    fast, slow = beam_search(model, src, beam_size=4, nbest=3), beam_search(plain, src, beam_size=4, nbest=3)
    assert [[h.tokens for h in n] for n in fast] == [[h.tokens for h in n] for n in slow]
    for fast_nbest, slow_nbest in zip(fast, slow):
        assert [h.score for h in fast_nbest] == pytest.approx([h.score for h in slow_nbest], abs=1e-4)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_decoding_precision_sets_the_arithmetic_of_the_search(precision, dtype):
    from nmt.config import DecodeConfig
    from nmt.translate import translate_ids

    torch.manual_seed(3)
    model = build_model(ModelConfig(embed_dim=32, ff_dim=64, heads=4), 30, 30).eval()
    seen = set()
    model.output.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    sources = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    reference = translate_ids(model, sources, DecodeConfig(beam=3), torch.device("cpu"))
    results = translate_ids(model, sources, DecodeConfig(beam=3, precision=precision), torch.device("cpu"))
    assert seen == {torch.float32, dtype}
    for ours, theirs in zip(results, reference):  # scores stay log-probabilities, close to fp32's
        assert all(h.score <= 0 for h in ours)
        if ours[0].tokens == theirs[0].tokens:
            assert ours[0].score == pytest.approx(theirs[0].score, abs=0.2)


@pytest.mark.parametrize("len_penalty", [0.6, 1.0])
@pytest.mark.parametrize("arch", ["transformer", "rnn"])
def test_beam_with_length_penalty_equals_exhaustive_search_on_a_small_model(arch, len_penalty):
    from conftest import TINY_RNN, TINY_TRANSFORMER

    torch.manual_seed(4)
    V, L = 7, 3  # outputs of at most L tokens, EOS included
    model = build_model(ModelConfig(**(TINY_TRANSFORMER if arch == "transformer" else TINY_RNN)), 12, V).eval()
    src = torch.tensor([[8, 9, 10, EOS]])
    allowed = [t for t in range(V) if t not in (PAD, BOS, EOS)]
    best_score, best_seq = float("-inf"), None
    with torch.no_grad():
        memory = model.encode(src)
        for length in range(L):
            for seq in itertools.product(allowed, repeat=length):
                tgt = torch.tensor([[BOS, *seq]])
                log_probs = torch.log_softmax(model.decode(tgt, memory).float(), dim=-1)[0]  # (T, V)
                path = [*seq, EOS]
                score = sum(float(log_probs[i, tok]) for i, tok in enumerate(path)) / len(path) ** len_penalty
                if score > best_score:
                    best_score, best_seq = score, list(seq)
    # A beam wider than the number of outputs keeps them all: the search is then exhaustive.
    hyps = beam_search(model, src, beam_size=len(allowed) ** L, len_penalty=len_penalty, max_len_a=0, max_len_b=L)
    assert hyps[0][0].tokens == best_seq
    assert hyps[0][0].score == pytest.approx(best_score, abs=1e-4)


A, B, C = 4, 5, 6  # the table models' words


def test_sampled_nbest_is_most_probable_first():
    from nmt.search import Sampling, sample_search

    model = TableModel(_table({BOS: {A: 0.5, B: 0.3, C: 0.2}, A: {EOS: 1.0}, B: {EOS: 1.0}, C: {EOS: 1.0}}, V=8))
    sampling = Sampling(generator=torch.Generator().manual_seed(0))
    nbest = sample_search(model, torch.tensor([[5, EOS]]), sampling, nbest=8, max_len_a=0, max_len_b=3)[0]
    scores = [h.score for h in nbest]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1


def test_beam_keeps_k_live_beams_when_one_of_the_k_best_continuations_ends():
    # The 2 best first steps are EOS and A: the second live beam is B, the third best.
    model = TableModel(_table({BOS: {EOS: 0.4, A: 0.35, B: 0.25}, A: {A: 0.5, EOS: 0.5}, B: {EOS: 1.0}}, V=8))
    nbest = beam_search(model, torch.tensor([[5, EOS]]), beam_size=2, len_penalty=0.0, max_len_a=0, max_len_b=3, nbest=2)[0]
    assert [h.tokens for h in nbest] == [[], [B]]


def test_nbest_holds_only_possible_hypotheses():
    # Fewer finite continuations than 2K (two words, a short limit, a forced prefix): the
    # impossible ones (score -inf) never end up in the n-best.
    from nmt.search import StepRules

    model = TableModel(_table({BOS: {A: 0.5, B: 0.5}, A: {EOS: 1.0}, B: {EOS: 1.0}}, V=6))
    src = torch.tensor([[5, EOS]])
    for K in (3, 4, 6):
        for limit in (1, 2, 3):
            nbest = beam_search(model, src, beam_size=K, len_penalty=0.0, max_len_a=0, max_len_b=limit, nbest=K)[0]
            assert all(h.score > float("-inf") for h in nbest), (K, limit)
    forced = StepRules(prefix=torch.tensor([[A, A]]))
    nbest = beam_search(model, src, beam_size=3, len_penalty=0.0, max_len_a=0, max_len_b=1, nbest=3, rules=forced)[0]
    assert all(h.score > float("-inf") for h in nbest)


def test_the_second_best_is_not_lost_to_stopping_early_or_to_a_worse_one():
    model = TableModel(_table({BOS: {EOS: 0.5, A: 0.3, B: 0.2}, A: {EOS: 0.1, C: 0.9}, B: {EOS: 1.0}, C: {EOS: 1.0}}, V=8))
    nbest = beam_search(model, torch.tensor([[5, EOS]]), beam_size=2, len_penalty=0.0, max_len_a=0, max_len_b=4, nbest=2)[0]
    assert [h.tokens for h in nbest] == [[], [A, C]]


def test_with_a_length_penalty_stopping_compares_scores_divided_by_the_same_length():
    # Length penalty 1, beam 2. After 2 tokens the finished are [] (log 0.33 = -1.11) and [A]
    # (-1.56 / 2 = -0.78); the best live beam, [B, D], has log-probability -1.24: not better
    # than -1.11 as it is, but -0.62 divided by its length, and it ends at -1.24 / 3 = -0.41.
    D = 7
    model = TableModel(_table({BOS: {A: 0.35, EOS: 0.33, B: 0.32}, A: {EOS: 0.6, C: 0.4}, B: {EOS: 0.1, D: 0.9},
                               C: {EOS: 1.0}, D: {EOS: 1.0}}, V=8))
    nbest = beam_search(model, torch.tensor([[5, EOS]]), beam_size=2, len_penalty=1.0, max_len_a=0, max_len_b=4, nbest=2)[0]
    assert [h.tokens for h in nbest] == [[B, D], [A, C]]


def test_a_sentence_is_done_when_its_finished_hypotheses_tie_the_best_live_beam():
    """The stopping rule: K finished hypotheses all at least as good as the best live beam
    could be (a tie included, else the search goes on for nothing), or the length limit."""
    from nmt.search import Hypothesis, _sentence_done

    finished = [Hypothesis([5], -1.0), Hypothesis([6], -2.0)]
    assert _sentence_done(finished, 2, best_alive=-2.0, at_limit=False)  # a tie
    assert not _sentence_done(finished, 2, best_alive=-1.5, at_limit=False)
    assert not _sentence_done(finished[:1], 2, best_alive=-3.0, at_limit=False)  # fewer than K finished
    assert _sentence_done(finished[:1], 2, best_alive=0.0, at_limit=True)


class CountingModel(TableModel):
    """A table model that records the batch rows of each decode_step."""

    def __init__(self, table):
        super().__init__(table)
        self.rows = []

    def decode_step(self, prev_tokens, memory, state):
        self.rows.append(prev_tokens.shape[0])
        return super().decode_step(prev_tokens, memory, state)


def test_greedy_search_stops_once_every_row_has_ended():
    model = CountingModel(_table({BOS: {A: 1.0}, A: {EOS: 1.0}}, V=8))
    hyps = greedy_search(model, torch.tensor([[5, EOS], [6, EOS]]), max_len_a=0, max_len_b=10)
    assert [h.tokens for h in hyps] == [[A], [A]]
    assert len(model.rows) == 2  # not 10, the length limit


def test_beam_search_keeps_k_finished_and_stops_once_they_beat_the_live_beams():
    model = CountingModel(_table({BOS: {EOS: 0.4, A: 0.35, B: 0.25}, A: {EOS: 0.9, C: 0.1}, B: {EOS: 0.8, C: 0.2},
                                  C: {C: 1.0}}, V=8))
    nbest = beam_search(model, torch.tensor([[5, EOS]]), beam_size=2, len_penalty=0.0, max_len_a=0, max_len_b=10, nbest=2)[0]
    assert [h.tokens for h in nbest] == [[], [A]]
    assert len(model.rows) == 2  # [] and [A] beat every live beam after two steps


def test_a_sentence_at_its_length_limit_leaves_the_batch():
    # Sentence 0 may hold only EOS: at its limit it has 1 finished hypothesis, fewer than K,
    # and is done all the same; after the first step only sentence 1's 3 beams are decoded.
    model = CountingModel(_table({BOS: {A: 0.6, B: 0.4}, A: {A: 0.5, EOS: 0.5}, B: {B: 0.5, EOS: 0.5}}, V=8))
    src = torch.tensor([[5, EOS, PAD, PAD, PAD], [5, 5, 5, 5, EOS]])
    beam_search(model, src, beam_size=3, len_penalty=0.0, max_len_a=1.0, max_len_b=0)
    assert model.rows[0] == 6 and len(model.rows) > 1 and set(model.rows[1:]) == {3}


def test_every_sample_starts_with_its_own_sentences_prefix():
    from nmt.search import Sampling, StepRules, sample_search

    model = TableModel(_table({BOS: {A: 0.5, B: 0.5}, A: {EOS: 1.0}, B: {EOS: 1.0}, C: {EOS: 1.0}}, V=8))
    rules = StepRules(prefix=torch.tensor([[C], [B]]))
    samples = sample_search(model, torch.tensor([[5, EOS], [6, EOS]]), Sampling(generator=torch.Generator().manual_seed(0)),
                            nbest=3, max_len_a=0, max_len_b=3, rules=rules)
    assert [[h.tokens for h in nbest] for nbest in samples] == [[[C]] * 3, [[B]] * 3]
