"""Search limits, sampling cuts, sampled n-best grouping and the ensemble vocabulary check."""

import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from conftest import TableMemory

from nmt.ensemble import shared_vocabulary
from nmt.errors import CheckpointError
from nmt.files import Normalization, VocabInfo, Vocabulary
from nmt.search import Sampling, greedy_search, max_lengths, sample_search
from nmt.tokenizer import BOS, EOS, PAD

V = 8


@dataclass
class NoState:
    def reorder(self, indices):
        return self


class EndlessModel:
    """Always prefers token 4 by far; EOS comes only when the length limit forces it."""

    def encode(self, src):
        return TableMemory(src)

    def init_state(self, memory, attention=None):
        return NoState()

    def decode_step(self, prev_tokens, memory, state):
        logits = torch.zeros(prev_tokens.shape[0], V)
        logits[:, 4] = 10.0
        return F.log_softmax(logits, dim=-1), state


class CopyFirstModel(EndlessModel):
    """Outputs its source's first token, then EOS, with (almost) certainty."""

    def decode_step(self, prev_tokens, memory, state):
        logits = torch.full((prev_tokens.shape[0], V), -30.0)
        first = prev_tokens == BOS
        target = torch.where(first, memory.src[:, 0], torch.full_like(prev_tokens, EOS))
        logits.scatter_(1, target[:, None], 0.0)
        return F.log_softmax(logits, dim=-1), state


def test_max_lengths_count_the_source_without_its_eos_and_round_down():
    src = torch.tensor([[5, 6, 7, EOS, PAD], [5, EOS, PAD, PAD, PAD]])
    # 1.5·3 + 1 = 5.5 and 1.5·1 + 1 = 2.5, rounded down
    assert max_lengths(src, 1.5, 1).tolist() == [5, 2]
    hyps = greedy_search(EndlessModel(), src, max_len_a=1.5, max_len_b=1)
    # the limit counts the final EOS: 4 and 1 tokens before it
    assert [h.tokens for h in hyps] == [[4, 4, 4, 4], [4]]


def test_top_p_keeps_the_smallest_set_that_reaches_it_exactly():
    log_probs = torch.full((1, 4), 0.25).log()
    probs = Sampling(topp=0.5).distribution(log_probs)[0]
    assert int((probs > 0).sum()) == 2  # two tokens of 0.25 reach 0.5: a third is not needed
    assert probs[probs > 0].tolist() == pytest.approx([0.5, 0.5])
    two = Sampling(topp=0.5).distribution(torch.tensor([[0.5, 0.5]]).log())[0]
    assert int((two > 0).sum()) == 1 and float(two.max()) == pytest.approx(1.0)


def test_top_k_of_one_less_than_the_vocabulary_drops_the_least_probable_token():
    log_probs = torch.tensor([[0.5, 0.3, 0.2]]).log()
    probs = Sampling(topk=2).distribution(log_probs)[0]
    assert probs[2] == 0.0
    assert probs[:2].tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8])


def test_each_sentences_samples_are_its_own():
    src = torch.tensor([[5, EOS], [6, EOS], [7, EOS]])
    sampling = Sampling(generator=torch.Generator().manual_seed(0))
    samples = sample_search(CopyFirstModel(), src, sampling, nbest=3, max_len_a=1.0, max_len_b=2)
    assert [[h.tokens for h in nbest] for nbest in samples] == [[[5]] * 3, [[6]] * 3, [[7]] * 3]


def _write_vocab(directory, **changes):
    vocab = Vocabulary("spm.model", "spm.model", 40, 40, "a" * 64, "b" * 64, joint=False)
    one = Normalization.from_saved("NFC").as_dict()
    info = VocabInfo(vocab, src_lang="de", tgt_lang="en", normalization={"src": one, "tgt": one})
    vocab_changes = {k: v for k, v in changes.items() if hasattr(vocab, k)}
    info_changes = {k: v for k, v in changes.items() if not hasattr(vocab, k)}
    info = replace(info, vocab=replace(vocab, **vocab_changes), **info_changes)
    directory.mkdir()
    info.write(directory)
    return directory


@pytest.mark.parametrize("changes, message", [
    ({"src_lang": "fr"}, "source languages differ"),
    ({"tgt_lang": "fr"}, "target languages differ"),
    ({"src_size": 41}, "source vocabularies differ in size"),
    ({"src_sha256": "c" * 64}, "source SentencePiece models differ"),
    ({"tgt_sha256": "c" * 64}, "target SentencePiece models differ"),
    ({"normalization": {"src": Normalization.from_saved("NFKC").as_dict(), "tgt": Normalization.from_saved("NFC").as_dict()}},
     "source text is normalized differently"),
])
def test_an_ensemble_needs_one_vocabulary(tmp_path, changes, message):
    first = _write_vocab(tmp_path / "first")
    assert shared_vocabulary([first, _write_vocab(tmp_path / "same")]).vocab == VocabInfo.read(first).vocab
    with pytest.raises(CheckpointError, match=message):
        shared_vocabulary([first, _write_vocab(tmp_path / "other", **changes)])


def test_a_model_without_a_recorded_language_may_join_an_ensemble(tmp_path):
    first = _write_vocab(tmp_path / "first")
    shared_vocabulary([first, _write_vocab(tmp_path / "other", src_lang=None, tgt_lang=None)])


def test_length_normalization_stays_finite_for_any_penalty_and_length():
    from nmt.search import length_norm

    assert length_norm(7, 1.0) == pytest.approx(7.0) and length_norm(7, 0.0) == 1.0
    for len_penalty in (100.0, -100.0):  # 2000**100 is beyond a float; the score must stay a number
        norm = length_norm(2000, len_penalty)
        assert 0.0 < norm < float("inf") and math.isfinite(-3.0 / norm)
