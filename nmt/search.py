"""Greedy search, sampling and batched beam search, written once against the model interface
(`nmt.interfaces.StepDecoder`): any model, ensemble or wrapper with encode / init_state /
decode_step. The rules every search applies at each step (the length limit, no repeated
n-grams, a forced target prefix) work on the log-probabilities and the tokens so far."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nmt.errors import ConfigError
from nmt.interfaces import StepDecoder, TranslationModel
from nmt.models.attention import AttentionChoice
from nmt.tokenizer import BOS, EOS, PAD


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS and EOS (during beam search, a device tensor until it is over)
    score: float  # log-prob / length**len_penalty (sampling: the log-prob); length counts EOS
    # (T, S) when asked for: the cross-attention weights with which each output token (the final
    # EOS included) was produced, over the padded source of its batch
    attention: torch.Tensor | None = None


@dataclass
class PrefixState:
    tokens: torch.Tensor | None  # (B, t) the target tokens fed so far, BOS first; None before the first
    attention: torch.Tensor | None = None  # the plain path keeps no attention weights

    def reorder(self, indices: torch.Tensor) -> PrefixState:
        return PrefixState(None if self.tokens is None else self.tokens.index_select(0, indices))


class FullPrefixDecoding:
    """A model's decoder without incremental state: each step reruns the teacher-forced decoder
    over the whole prefix and keeps the last position.

    Quadratic in the output length, and plain: it is the reference that incremental decoding
    (cached keys/values, carried recurrent state) must reproduce, and the benchmark's baseline.
    """

    def __init__(self, model: TranslationModel):
        self.model = model

    def encode(self, src: torch.Tensor):
        return self.model.encode(src)

    def init_state(self, memory, attention: AttentionChoice | None = None) -> PrefixState:
        if attention is not None:
            raise ConfigError("the plain full-prefix decoder keeps no attention weights")
        return PrefixState(None)

    def decode_step(self, prev_tokens: torch.Tensor, memory, state: PrefixState) -> tuple[torch.Tensor, PrefixState]:
        new = prev_tokens[:, None]  # (B, 1)
        tokens = new if state.tokens is None else torch.cat([state.tokens, new], dim=1)  # (B, t+1)
        logits = self.model.decode(tokens, memory)[:, -1]  # (B, V)
        return F.log_softmax(logits.float(), dim=-1), PrefixState(tokens)


def length_norm(length: int, len_penalty: float) -> float:
    """What a hypothesis of `length` tokens (EOS included) divides its log-prob by:
    length**len_penalty, its exponent held within a float's range."""
    return math.exp(min(max(len_penalty * math.log(max(length, 1)), -700.0), 700.0))


def max_lengths(src: torch.Tensor, a: float, b: int) -> torch.Tensor:
    """Longest output per sentence, a·|src| + b, counting the final EOS: (B,)."""
    src_len = (src != PAD).sum(1) - 1  # without the source EOS
    return (a * src_len.float() + b).floor().long().clamp(min=1)


def output_limits(src: torch.Tensor, max_len_a: float, max_len_b: int, rules: StepRules) -> torch.Tensor:
    """Longest output per sentence (B,), EOS included: a·|src| + b, and room for its prefix."""
    return torch.maximum(max_lengths(src, max_len_a, max_len_b), rules.prefix_lengths(src.shape[0], src.device) + 1)


def _restrict(log_probs: torch.Tensor, must_end: torch.Tensor) -> torch.Tensor:
    """Never produce PAD or BOS; rows that reached their length limit must produce EOS. Written
    without reading anything back from the device, so that a GPU step does not wait for it."""
    log_probs[:, PAD] = float("-inf")
    log_probs[:, BOS] = float("-inf")
    eos_scores = log_probs[:, EOS].clone()
    log_probs.masked_fill_(must_end[:, None], float("-inf"))
    log_probs[:, EOS] = torch.where(must_end, eos_scores, log_probs[:, EOS])
    return log_probs


def ban_repeated_ngrams(log_probs: torch.Tensor, history: torch.Tensor, n: int) -> None:
    """Forbid each row's next token where it would complete an n-gram the row already holds.
    log_probs: (R, V), changed in place; history: (R, t) the row's tokens so far."""
    R, t = history.shape
    if t < n:
        return
    windows = history.unfold(1, n, 1)  # (R, W, n) every n-gram so far, W = t-n+1
    last = history[:, t - n + 1 :]  # (R, n-1) what the next token would extend
    repeats = (windows[:, :, : n - 1] == last[:, None, :]).all(-1)  # (R, W) n-grams starting like it
    penalty = torch.zeros(repeats.shape, dtype=log_probs.dtype, device=log_probs.device)
    log_probs.scatter_add_(1, windows[:, :, n - 1], penalty.masked_fill_(repeats, float("-inf")))


# In a prefix, after its tokens: the next token must begin a word (the prefix text ended in a
# space, so "The cat " goes on with a new word, not "The cats").
NEW_WORD = -1


@dataclass
class StepRules:
    """What every search applies to the model's log-probs at each step, besides the length limit:
    no repeated n-gram of size `no_repeat_ngram` (0: off), none of the `banned` tokens, and a
    forced target prefix per sentence. A forced token keeps the model's log-probability, so
    scores count the prefix (and a prefix may use banned tokens). A prefix may end in NEW_WORD:
    there, only the `word_starts` tokens are allowed."""

    no_repeat_ngram: int = 0
    prefix: torch.Tensor | None = None  # (B, P) target tokens per sentence, PAD after its end
    banned: torch.Tensor | None = None  # (K,) ids an output never holds (reserved symbols, other languages' pieces)
    word_starts: torch.Tensor | None = None  # (V,) bool: the tokens that begin a word, and EOS

    @staticmethod
    def banning(allowed: torch.Tensor | None) -> torch.Tensor | None:
        """The `banned` ids of an (V,) bool mask of the tokens an output may hold."""
        return None if allowed is None else (~allowed).nonzero()[:, 0]

    def prefix_lengths(self, batch: int, device: torch.device) -> torch.Tensor:  # (B,)
        if self.prefix is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        return (self.prefix != PAD).sum(1)

    def select(self, sentences: torch.Tensor) -> StepRules:
        """The rules of these sentences (repeated or picked), in this order."""
        return dataclasses.replace(self, prefix=None if self.prefix is None else self.prefix[sentences])

    def apply(self, log_probs: torch.Tensor, history: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
        """log_probs: (R, V); history: (R, t) tokens so far; sentences: (R,) each row's sentence."""
        t = history.shape[1]
        forced = None
        if self.prefix is not None and t < self.prefix.shape[1]:
            forced = self.prefix[sentences, t][:, None]  # (R, 1), PAD where the prefix is over
            new_word = forced == NEW_WORD  # (R, 1)
            forced = forced.masked_fill(new_word, PAD)
            forced_scores = log_probs.gather(1, forced)  # before the n-gram ban: a prefix may repeat itself
        if self.no_repeat_ngram:
            ban_repeated_ngrams(log_probs, history, self.no_repeat_ngram)
        if self.banned is not None:
            log_probs.index_fill_(1, self.banned, float("-inf"))  # (R, K) entries, not (R, V)
        if forced is not None:
            forcing = forced != PAD  # (R, 1)
            log_probs.masked_fill_(forcing, float("-inf"))
            log_probs.scatter_(1, forced, torch.where(forcing, forced_scores, log_probs.gather(1, forced)))
            if self.word_starts is not None:
                log_probs.masked_fill_(new_word & ~self.word_starts, float("-inf"))  # (R, V)
        return log_probs


@dataclass
class Sampling:
    """Draw each token from the model's distribution, scaled by 1/temperature, then cut to the
    `topk` most probable tokens (0: all) and to the smallest set whose probability reaches `topp`."""

    topk: int = 0
    topp: float = 1.0
    temperature: float = 1.0
    generator: torch.Generator | None = None

    def distribution(self, log_probs: torch.Tensor) -> torch.Tensor:
        """The probabilities tokens are drawn with: (R, V) -> (R, V), rows summing to 1."""
        logits = log_probs / self.temperature
        if self.topk and self.topk < logits.shape[-1]:
            kth = logits.topk(self.topk, dim=-1).values[:, -1:]  # (R, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.topp < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            before = probs.cumsum(-1) - probs  # (R, V) the probability of the better tokens
            drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, before >= self.topp)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits.softmax(-1)

    def choose(self, log_probs: torch.Tensor) -> torch.Tensor:  # (R, V) -> (R,)
        """One token per row, drawn with `distribution`: argmax of p / q with q ~ Exp(1) picks
        token i with probability p_i (as torch.multinomial does, without its checks, which
        wait for the GPU at every step)."""
        probs = self.distribution(log_probs)
        noise = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
        return (probs / noise).argmax(dim=-1)


@torch.inference_mode()
def greedy_search(
    model: StepDecoder, src: torch.Tensor, max_len_a: float = 1.5, max_len_b: int = 10, attention: AttentionChoice | None = None,
    rules: StepRules | None = None, sampling: Sampling | None = None, len_penalty: float = 0.0,
) -> list[Hypothesis]:
    """Pick the most probable token at each step (or, with `sampling`, draw it). src: (B, S).
    With `attention`, each hypothesis keeps the chosen cross-attention weights. The score is
    the log-probability of the output under the model (not the sampling distribution),
    divided by length**len_penalty as beam search scores it."""
    B = src.shape[0]
    rules = rules or StepRules()
    sentences = torch.arange(B, device=src.device)
    limits = output_limits(src, max_len_a, max_len_b, rules)  # (B,)
    memory = model.encode(src)
    state = model.init_state(memory, attention)
    prev = torch.full((B,), BOS, dtype=torch.long, device=src.device)
    finished = torch.zeros(B, dtype=torch.bool, device=src.device)
    scores = torch.zeros(B, device=src.device)
    history = torch.zeros(B, 0, dtype=torch.long, device=src.device)  # (B, t)
    step_weights = []
    for t in range(int(limits.max())):
        log_probs, state = model.decode_step(prev, memory, state)  # (B, V)
        if attention is not None:
            step_weights.append(state.attention.float())  # (B, S)
        log_probs = rules.apply(_restrict(log_probs, limits <= t + 1), history, sentences)
        # Finished rows choose nothing (their token becomes PAD); the rules may have left them no
        # allowed token, which sampling cannot draw from.
        log_probs.masked_fill_(finished[:, None], 0.0)
        tokens = log_probs.argmax(dim=-1) if sampling is None else sampling.choose(log_probs)  # (B,)
        token_scores = log_probs.gather(1, tokens[:, None])[:, 0]
        tokens = tokens.masked_fill(finished, PAD)
        scores += token_scores.masked_fill(finished, 0.0)
        history = torch.cat([history, tokens[:, None]], dim=1)
        finished |= tokens == EOS
        if bool(finished.all()):
            break
        prev = tokens
    out = history.tolist()  # (B, T)
    weights = torch.stack(step_weights, dim=1) if attention is not None else None  # (B, T, S)
    hyps = []
    for b, (row, score) in enumerate(zip(out, scores.tolist())):
        length = row.index(EOS) + 1 if EOS in row else len(row)  # output tokens, EOS included
        tokens = row[: length - 1] if EOS in row else row
        hyps.append(Hypothesis(tokens, score / length_norm(length, len_penalty), None if weights is None else weights[b, :length]))
    return hyps


def sample_search(
    model: StepDecoder, src: torch.Tensor, sampling: Sampling, nbest: int = 1, max_len_a: float = 1.5,
    max_len_b: int = 10, attention: AttentionChoice | None = None, rules: StepRules | None = None,
) -> list[list[Hypothesis]]:
    """`nbest` independent samples per sentence, most probable first: each sentence is
    repeated `nbest` times in the batch and sampled like greedy search."""
    B = src.shape[0]
    sentences = torch.arange(B, device=src.device).repeat_interleave(nbest)  # (B*n,)
    samples = greedy_search(model, src[sentences], max_len_a, max_len_b, attention, (rules or StepRules()).select(sentences), sampling)
    groups = [samples[b * nbest : (b + 1) * nbest] for b in range(B)]
    return [sorted(group, key=lambda h: h.score, reverse=True) for group in groups]


@torch.inference_mode()
def beam_search(
    model: StepDecoder,
    src: torch.Tensor,
    beam_size: int = 5,
    len_penalty: float = 1.0,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    nbest: int = 1,
    attention: AttentionChoice | None = None,
    rules: StepRules | None = None,
) -> list[list[Hypothesis]]:
    """Batched beam search with incremental decoding; returns the `nbest` best per sentence.

    At each step the 2K best continuations of the K beams are taken; those ending in EOS among
    the first K are finished hypotheses, and the best K others continue. A sentence is done once
    it has K finished hypotheses that no live beam is likely to beat, and is then removed from
    the batch. With `attention`, each beam carries the chosen cross-attention weights of its
    steps, reordered with it, and each hypothesis keeps its own.

    Each step reads one small tensor back from the device (what ended, and whether sentences are
    done); tokens stay on the device until the search is over.
    """
    B, K = src.shape[0], beam_size
    device = src.device
    rules = rules or StepRules()
    limits = output_limits(src, max_len_a, max_len_b, rules)  # (B,)
    max_steps = int(limits.max())
    memory = model.encode(src)
    memory = memory.reorder(torch.arange(B, device=device).repeat_interleave(K))  # (B*K, ...)
    state = model.init_state(memory, attention)
    weights_history = torch.zeros(B * K, 0, src.shape[1], device=device) if attention is not None else None  # (N*K, t, S)

    active = torch.arange(B, device=device)  # original sentence index of each row group
    active_list = list(range(B))
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    history = torch.full((B * K, 0), BOS, dtype=torch.long, device=device)  # (N*K, t)
    prev = torch.full((B * K,), BOS, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    first_rows = torch.arange(B, device=device)[:, None] * K  # (B, 1) each sentence's first beam row

    for t in range(max_steps):
        N = active.shape[0]
        log_probs, state = model.decode_step(prev, memory, state)  # (N*K, V)
        step_weights = None if attention is None else state.attention.float()  # (N*K, S)
        at_limit = limits[active] <= t + 1  # (N,)
        log_probs = rules.apply(_restrict(log_probs, at_limit.repeat_interleave(K)), history, active.repeat_interleave(K))
        choice = _choose_continuations(scores, log_probs, K)
        report = _read_step(choice, at_limit, K, t + 1, len_penalty)
        for n, ended in enumerate(report.ended):
            for beam, score in ended:
                _add_finished(finished[active_list[n]], K, score, n * K + beam, history, weights_history, step_weights)
        if t + 1 >= max_steps:
            break
        alive_list = [n for n in range(N)
                      if not _sentence_done(finished[active_list[n]], K, report.best_alive[n], report.at_limit[n])]
        if not alive_list:
            break
        keep_beams, keep_tokens, scores = choice.keep_beams, choice.keep_tokens, choice.keep_scores  # (N, K)
        if len(alive_list) < N:  # drop finished sentences (beams of one sentence share memory)
            alive = torch.tensor(alive_list, device=device)  # (N',): a copy to the device only then
            rows = (alive[:, None] * K + keep_beams[alive]).view(-1)  # (N'*K,) rows of the old batch
            memory = memory.reorder(rows)
            keep_tokens, scores, active = keep_tokens[alive], scores[alive], active[alive]
            active_list = [active_list[n] for n in alive_list]
        else:
            rows = (first_rows[:N] + keep_beams).view(-1)  # (N*K,)
        state = state.reorder(rows)
        history = torch.cat([history[rows], keep_tokens.view(-1, 1)], dim=1)
        if step_weights is not None:
            weights_history = torch.cat([weights_history[rows], step_weights[rows, None]], dim=1)
        prev = keep_tokens.view(-1)
    return _best_hypotheses(finished, nbest, device)


class _Continuations(NamedTuple):
    """A beam-search step's choice, on the device: the 2K best continuations of the K beams of
    each sentence, and the K best of those that do not end in EOS, which go on."""

    top_scores: torch.Tensor  # (N, 2K) best first
    top_beams: torch.Tensor  # (N, 2K) the beam each continues
    top_tokens: torch.Tensor  # (N, 2K)
    keep_scores: torch.Tensor  # (N, K) best first
    keep_beams: torch.Tensor  # (N, K)
    keep_tokens: torch.Tensor  # (N, K)


def _choose_continuations(scores: torch.Tensor, log_probs: torch.Tensor, K: int) -> _Continuations:
    """scores (N, K) of the beams so far, log_probs (N*K, V) of their next token."""
    N, V = scores.shape[0], log_probs.shape[-1]
    candidates = (scores[:, :, None] + log_probs.view(N, K, V)).view(N, K * V)
    top_scores, top_ids = candidates.topk(min(2 * K, K * V), dim=-1)  # (N, 2K)
    top_beams, top_tokens = top_ids // V, top_ids % V
    keep_scores = top_scores.masked_fill(top_tokens == EOS, float("-inf"))
    keep_scores, order = keep_scores.topk(K, dim=-1)  # (N, K), best first
    return _Continuations(top_scores, top_beams, top_tokens, keep_scores, top_beams.gather(1, order),
                          top_tokens.gather(1, order))


@dataclass
class _StepReport:
    """What the host needs of a step, per sentence."""

    ended: list[list[tuple[int, float]]]  # the hypotheses that end here: (beam, length-penalized score)
    best_alive: list[float]  # the best live beam's score, were it to end now
    at_limit: list[bool]  # the sentence reached its length limit


def _read_step(choice: _Continuations, at_limit: torch.Tensor, K: int, length: int, len_penalty: float) -> _StepReport:
    """The step's one read-back from the device. Hypotheses end where EOS is among the first K
    continuations; `length` counts the generated tokens, EOS included."""
    ends = (choice.top_tokens[:, :K] == EOS) & torch.isfinite(choice.top_scores[:, :K])  # (N, K)
    norm = length_norm(length, len_penalty)
    best_alive = choice.keep_scores[:, :1] / norm  # (N, 1)
    read = torch.cat([choice.top_scores[:, :K], ends.float(), choice.top_beams[:, :K].float(), best_alive,
                      at_limit[:, None].float()], dim=1).tolist()  # (N, 3K+2)
    return _StepReport(
        ended=[[(int(v[2 * K + j]), v[j] / norm) for j in range(K) if v[K + j]] for v in read],
        best_alive=[v[3 * K] for v in read],
        at_limit=[bool(v[3 * K + 1]) for v in read],
    )


def _sentence_done(hyps: list[Hypothesis], K: int, best_alive: float, at_limit: bool) -> bool:
    """Done at its length limit, or once its K finished hypotheses all score at least as well as
    the best live beam would if it ended now. Exact without a length penalty (log-probs only fall
    as a hypothesis grows); with one, a longer hypothesis divides by a larger length and may still
    have won, rarely (fairseq's and Hugging Face's rule too, and what the recipes measured)."""
    return at_limit or (len(hyps) == K and min(h.score for h in hyps) >= best_alive)


def _add_finished(
    hyps: list[Hypothesis], K: int, score: float, row: int, history: torch.Tensor,
    weights_history: torch.Tensor | None, step_weights: torch.Tensor | None,
) -> None:
    """Keep the hypothesis ending at `row` if it is among its sentence's K best so far. Its
    tokens stay a device tensor (history[row]) until the search is over."""
    if len(hyps) == K:
        worst = min(range(K), key=lambda i: hyps[i].score)
        if score <= hyps[worst].score:
            return
        hyps.pop(worst)
    weights = None
    if step_weights is not None:
        weights = torch.cat([weights_history[row], step_weights[row, None]])  # (t+1, S)
    hyps.append(Hypothesis(history[row].clone(), score, weights))  # a copy, not a view that keeps the whole history


def _best_hypotheses(finished: list[list[Hypothesis]], nbest: int, device: torch.device) -> list[list[Hypothesis]]:
    """The `nbest` best of each sentence, best first, their tokens read back in one transfer."""
    for hyps in finished:
        if not hyps:  # cannot happen with finite scores; keep an empty output
            hyps.append(Hypothesis(torch.zeros(0, dtype=torch.long, device=device), float("-inf")))
        hyps.sort(key=lambda h: h.score, reverse=True)
        del hyps[nbest:]
    chosen = [h for hyps in finished for h in hyps]
    flat = torch.cat([h.tokens for h in chosen]).tolist()
    start = 0
    for h in chosen:
        length = h.tokens.shape[0]
        h.tokens = flat[start : start + length]
        start += length
    return finished
