"""Decoding options of the one search: n-gram blocking, sampling, target prefixes, ensembles."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RNN, TINY_TRANSFORMER, TableModel, table

from nmt.config import ModelConfig
from nmt.ensemble import Ensemble
from nmt.interfaces import StepDecoder
from nmt.models import build_model
from nmt.search import Sampling, StepRules, beam_search, greedy_search, sample_search
from nmt.tokenizer import BOS, EOS, PAD

V = 12


def _random_model(arch: dict, seed: int):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**arch), V, V).eval()


def _random_sources(seed: int, batch: int = 6, length: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (batch, length), generator=generator)
    src[:, -1] = EOS
    src[0, 4:] = PAD  # one shorter sentence
    src[0, 3] = EOS
    return src


def _repeats_an_ngram(tokens: list[int], n: int) -> bool:
    ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(ngrams) != len(set(ngrams))


def _outputs(search: str, model, src, rules=None) -> list[list[int]]:
    limits = dict(max_len_a=3.0, max_len_b=10)
    if search == "greedy":
        return [h.tokens for h in greedy_search(model, src, **limits, rules=rules)]
    if search == "beam":
        return [h.tokens for nbest in beam_search(model, src, 4, nbest=4, **limits, rules=rules) for h in nbest]
    sampling = Sampling(generator=torch.Generator().manual_seed(0))
    return [h.tokens for nbest in sample_search(model, src, sampling, 3, **limits, rules=rules) for h in nbest]


@pytest.mark.parametrize("arch", [TINY_TRANSFORMER, TINY_RNN], ids=["transformer", "rnn"])
@pytest.mark.parametrize("search", ["greedy", "beam", "sampling"])
def test_no_repeated_ngram_in_any_search(arch, search):
    repeated_without = 0
    for seed in range(3):
        model, src = _random_model(arch, seed), _random_sources(seed)
        for n in (1, 2, 3):
            for tokens in _outputs(search, model, src, StepRules(no_repeat_ngram=n)):
                assert not _repeats_an_ngram(tokens, n), (n, tokens)
        repeated_without += sum(_repeats_an_ngram(t, 2) for t in _outputs(search, model, src))
    assert repeated_without > 0  # the random models do repeat themselves when allowed to


def test_sampling_with_topk_1_is_greedy_search():
    model, src = _random_model(TINY_TRANSFORMER, 1), _random_sources(1)
    greedy = greedy_search(model, src, 2.0, 5)
    sampled = sample_search(model, src, Sampling(topk=1, generator=torch.Generator().manual_seed(5)), 1, 2.0, 5)
    assert [h.tokens for h in greedy] == [s[0].tokens for s in sampled]
    assert [h.score for h in greedy] == pytest.approx([s[0].score for s in sampled], abs=1e-5)


FIRST = {4: 0.5, 5: 0.3, 6: 0.15, 7: 0.05}  # the first token's distribution in the table below


def _expected(topk=0, topp=1.0, temperature=1.0) -> dict[int, float]:
    probs = {token: p ** (1 / temperature) for token, p in FIRST.items()}
    ranked = sorted(probs, key=probs.get, reverse=True)
    if topk:
        ranked = ranked[:topk]
    total = sum(probs[t] for t in ranked)
    kept, mass = [], 0.0
    for token in ranked:  # the smallest set whose probability reaches topp
        if mass >= topp:
            break
        kept.append(token)
        mass += probs[token] / total
    return {t: probs[t] / sum(probs[k] for k in kept) for t in kept}


@pytest.mark.parametrize("options", [{}, {"topk": 2}, {"topp": 0.7}, {"topp": 0.45}, {"temperature": 2.0},
                                     {"temperature": 0.5, "topk": 3}])
def test_sampled_frequencies_follow_the_cut_and_scaled_distribution(options):
    model = TableModel(table({BOS: FIRST, **{t: {EOS: 1.0} for t in FIRST}}, V=8))
    draws = 20_000
    src = torch.tensor([[5, EOS]])
    samples = sample_search(model, src, Sampling(**options, generator=torch.Generator().manual_seed(3)), draws, 0, 2)[0]
    counts = {}
    for h in samples:
        counts[h.tokens[0]] = counts.get(h.tokens[0], 0) + 1
    expected = _expected(**options)
    assert set(counts) <= set(expected)
    for token, p in expected.items():
        # the standard deviation of a frequency from 20,000 draws is at most 0.0035: 0.015 is > 4 of them
        assert counts.get(token, 0) / draws == pytest.approx(p, abs=0.015), (token, counts)
    # the score is the sample's log-probability under the model, not under the sampling distribution
    h = samples[0]
    assert h.score == pytest.approx(math.log(FIRST[h.tokens[0]]), abs=1e-4)


def test_sampling_rows_that_ended_before_others_reach_their_limit():
    # Token 4 ends at once; token 5 repeats itself until the length limit. With a ban on
    # repeated tokens, a finished row has no allowed token left at the limit of a longer one.
    model = TableModel(table({BOS: {4: 0.5, 5: 0.5}, 4: {EOS: 1.0}, 5: {5: 0.6, 6: 0.2, 7: 0.2}, 6: {7: 1.0}, 7: {6: 1.0}}, V=8))
    src = torch.tensor([[5, 5, 5, EOS], [5, EOS, PAD, PAD]])
    sampling = Sampling(generator=torch.Generator().manual_seed(0))
    samples = sample_search(model, src, sampling, 16, 1.0, 2, rules=StepRules(no_repeat_ngram=1))
    assert {tuple(h.tokens[:1]) for nbest in samples for h in nbest} == {(4,), (5,)}
    assert all(not _repeats_an_ngram(h.tokens, 1) for nbest in samples for h in nbest)


def test_the_same_seed_draws_the_same_samples():
    model, src = _random_model(TINY_RNN, 2), _random_sources(2)

    def draw(seed):
        sampling = Sampling(topp=0.9, temperature=1.5, generator=torch.Generator().manual_seed(seed))
        return [[h.tokens for h in nbest] for nbest in sample_search(model, src, sampling, 4, 2.0, 5)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def _forced_log_prob(model, src_row: torch.Tensor, tokens: list[int]) -> float:
    """Teacher-forced log-probability of `tokens` + EOS: what forced decoding scores."""
    memory = model.encode(src_row[None])
    tgt_in = torch.tensor([[BOS, *tokens]])
    log_probs = F.log_softmax(model.decode(tgt_in, memory).float(), dim=-1)[0]  # (T, V)
    return float(log_probs.gather(1, torch.tensor([*tokens, EOS])[:, None]).sum())


def _padded(prefixes: list[list[int]]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(p, dtype=torch.long) for p in prefixes], batch_first=True)


def _best_hypotheses(model, src, beam: int, rules: StepRules, max_len_a: float, max_len_b: int):
    """Greedy search's output (beam 1) or beam search's best, without a length penalty."""
    if beam == 1:
        return greedy_search(model, src, max_len_a, max_len_b, rules=rules)
    return [nbest[0] for nbest in beam_search(model, src, beam, len_penalty=0.0, max_len_a=max_len_a,
                                               max_len_b=max_len_b, rules=rules)]


@pytest.mark.parametrize("arch", [TINY_TRANSFORMER, TINY_RNN], ids=["transformer", "rnn"])
@pytest.mark.parametrize("beam", [1, 3])
def test_prefix_starts_the_output_and_its_score_is_the_forced_decodings(arch, beam):
    model, src = _random_model(arch, 4), _random_sources(4, batch=4)
    prefixes = [[5, 5, 5], [], [9], [6, 7, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11, 4, 5]]  # the last is longer than the length limit
    rules = StepRules(no_repeat_ngram=2, prefix=_padded(prefixes))  # the ban does not touch the prefix itself
    with torch.no_grad():
        hyps = _best_hypotheses(model, src, beam, rules, 0.5, 2)
        for row, (wanted, h) in enumerate(zip(prefixes, hyps)):
            assert h.tokens[: len(wanted)] == wanted
            assert h.score == pytest.approx(_forced_log_prob(model, src[row][src[row] != PAD], h.tokens), abs=1e-4)


@pytest.mark.parametrize("arch", [TINY_TRANSFORMER, TINY_RNN], ids=["transformer", "rnn"])
@pytest.mark.parametrize("beam", [1, 3])
def test_after_a_prefix_ending_a_word_only_word_starts_follow(arch, beam):
    from nmt.search import NEW_WORD

    model, src = _random_model(arch, 4), _random_sources(4, batch=4)
    prefixes = [[5, NEW_WORD], [9, 9, NEW_WORD], [], [7]]  # V = 12 tokens
    word_starts = torch.zeros(V, dtype=torch.bool)
    word_starts[[EOS, 10, 11]] = True
    with torch.no_grad():
        hyps = _best_hypotheses(model, src, beam, StepRules(prefix=_padded(prefixes), word_starts=word_starts), 1.0, 4)
    for row, (wanted, h) in enumerate(zip(prefixes, hyps)):
        forced = [token for token in wanted if token != NEW_WORD]
        assert h.tokens[: len(forced)] == forced
        if NEW_WORD in wanted:
            assert len(h.tokens) == len(forced) or h.tokens[len(forced)] in (10, 11)
        with torch.no_grad():
            assert h.score == pytest.approx(_forced_log_prob(model, src[row][src[row] != PAD], h.tokens), abs=1e-4)


def test_an_ensemble_of_one_model_or_of_two_copies_translates_as_the_model():
    model, src = _random_model(TINY_TRANSFORMER, 5), _random_sources(5)
    alone = beam_search(model, src, 3, nbest=3)
    for members in ([model], [model, model]):
        together = beam_search(Ensemble(members), src, 3, nbest=3)
        assert [[h.tokens for h in n] for n in together] == [[h.tokens for h in n] for n in alone]
        assert [h.score for n in together for h in n] == pytest.approx([h.score for n in alone for h in n], abs=1e-5)


def test_a_transformer_and_rnn_ensemble_averages_probabilities_through_beam_search():
    transformer, rnn = _random_model(TINY_TRANSFORMER, 6), _random_model(TINY_RNN, 7)
    ensemble, src = Ensemble([transformer, rnn]), _random_sources(6)
    assert isinstance(ensemble, StepDecoder)
    with torch.no_grad():
        prev = torch.full((src.shape[0],), BOS)
        mixed, _ = ensemble.decode_step(prev, ensemble.encode(src), ensemble.init_state(ensemble.encode(src)))
        parts = [m.decode_step(prev, m.encode(src), m.init_state(m.encode(src)))[0] for m in (transformer, rnn)]
    assert mixed.exp() == pytest.approx(((parts[0].exp() + parts[1].exp()) / 2), abs=1e-6)  # log of the mean
    results = beam_search(ensemble, src, 4, nbest=3, max_len_a=1.0, max_len_b=4)
    assert [len(nbest) for nbest in results] == [3] * src.shape[0]
    for nbest in results:
        assert [h.score for h in nbest] == sorted((h.score for h in nbest), reverse=True)


def test_sampling_scales_by_the_temperature_before_cutting_to_top_p():
    """The nucleus is taken from the distribution the tokens are drawn with: a high temperature
    flattens [0.5, 0.3, 0.2] so that top-p 0.7 keeps all three (0.5 + 0.3 would reach it unscaled)."""
    log_probs = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert Sampling(topp=0.7).distribution(log_probs)[0, 2] == 0.0
    flattened = Sampling(topp=0.7, temperature=100.0).distribution(log_probs)[0]
    assert (flattened > 0.3).all() and torch.allclose(flattened.sum(), torch.tensor(1.0))


def test_sampling_seeds_are_taken_modulo_2_to_the_32_on_every_device():
    from nmt.config import DecodeConfig
    from nmt.translate import sampling_generator

    cpu = torch.device("cpu")
    assert sampling_generator(DecodeConfig(seed=2**32 + 5), cpu).initial_seed() == 5
    assert sampling_generator(DecodeConfig(seed=-1), cpu).initial_seed() == 2**32 - 1
