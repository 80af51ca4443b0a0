"""Decoding on fixed-shape buffers (`decode.static_cache`, CUDA graphs on a GPU) gives the plain
incremental decoder's output, in every search."""

import contextlib
import dataclasses
import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_TRANSFORMER

from nmt.config import DecodeConfig, ModelConfig
from nmt.models import build_model
from nmt.models.attention import AttentionChoice
from nmt.search import Sampling, StepRules, beam_search, greedy_search, output_limits, sample_search
from nmt.static_decoding import StaticDecoding, StaticState
from nmt.tokenizer import EOS, PAD
from nmt.translate import translate_ids

V = 14
ARCH = {**TINY_TRANSFORMER, "enc_layers": 2, "dec_layers": 2}
LIMITS = dict(max_len_a=2.0, max_len_b=6)


def _model(seed: int, norm: str = "pre"):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**ARCH, "norm": norm}), V, V).eval()


def _sources(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(7, V, (5, 7), generator=generator)
    src[:, -1] = EOS
    src[1, 3], src[1, 4:] = EOS, PAD  # a shorter sentence
    return src


def _static(model, src, rules=None):
    return StaticDecoding(model, int(output_limits(src, LIMITS["max_len_a"], LIMITS["max_len_b"], rules or StepRules()).max()))


def _same(plain, static):
    assert [h.tokens for h in plain] == [h.tokens for h in static]
    assert [h.score for h in plain] == pytest.approx([h.score for h in static], abs=1e-4)
    for a, b in zip(plain, static):
        if a.attention is not None:
            assert torch.allclose(a.attention, b.attention, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_greedy_and_beam_search_give_the_plain_output(seed, norm):
    model, src = _model(seed, norm), _sources(seed)
    _same(greedy_search(model, src, **LIMITS), greedy_search(_static(model, src), src, **LIMITS))
    plain = beam_search(model, src, 4, nbest=3, **LIMITS)
    static = beam_search(_static(model, src), src, 4, nbest=3, **LIMITS)
    for a, b in zip(plain, static):  # sentences finish at different steps: the batch shrinks
        _same(a, b)


def test_under_bf16_autocast_the_buffers_hold_autocasts_keys_and_give_the_plain_output():
    model, src = _model(4), _sources(4)
    decoder = _static(model, src)
    with torch.inference_mode():  # buffers of the same shapes in fp32 first: not the ones autocast gets
        greedy_search(decoder, src, **LIMITS)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():  # as translating runs
        plain = greedy_search(model, src, **LIMITS)
        state = decoder.init_state(decoder.encode(src))
        static = greedy_search(decoder, src, **LIMITS)
    assert {keys.dtype for keys, _ in state.buffers.caches} == {torch.bfloat16}  # as the step's new keys
    assert [h.tokens for h in plain] == [h.tokens for h in static]


def test_attention_prefixes_banned_ngrams_and_sampling_give_the_plain_output():
    model, src = _model(3), _sources(3)
    choice = AttentionChoice(1, None)
    _same(greedy_search(model, src, **LIMITS, attention=choice),
          greedy_search(_static(model, src), src, **LIMITS, attention=choice))
    rules = StepRules(2, torch.tensor([[8, 9, 10], [11, 0, 0], [0, 0, 0], [12, 12, 12], [9, 0, 0]]))
    plain = beam_search(model, src, 3, nbest=2, **LIMITS, attention=AttentionChoice(2, 1), rules=rules)
    static = beam_search(_static(model, src, rules), src, 3, nbest=2, **LIMITS, attention=AttentionChoice(2, 1), rules=rules)
    for a, b in zip(plain, static):
        _same(a, b)
    draw = lambda: Sampling(topk=5, generator=torch.Generator().manual_seed(4))  # noqa: E731
    for a, b in zip(sample_search(model, src, draw(), 3, **LIMITS), sample_search(_static(model, src), src, draw(), 3, **LIMITS)):
        _same(a, b)


def test_translate_with_static_cache_gives_the_same_translations(monkeypatch):
    import nmt.static_decoding as static_decoding

    monkeypatch.setattr(static_decoding, "GRAPH_COUNTS", type(static_decoding.GRAPH_COUNTS)())
    model = _model(5)
    sources = [[7, 8, 9, 10], [11, 12], [13, 7, 7, 9, 10, 11, 12, 8], [9]]
    plain = DecodeConfig(beam=3, nbest=2, batch_tokens=12, **LIMITS)  # several batches of several lengths
    static = dataclasses.replace(plain, static_cache=True)
    for a, b in zip(translate_ids(model, sources, plain, torch.device("cpu")),
                    translate_ids(model, sources, static, torch.device("cpu"))):
        _same(a, b)
    assert static_decoding.GRAPH_COUNTS["eager_steps"] > 0  # the static path did run


def test_the_buffers_keep_one_shape_and_rows_move_with_their_beams():
    model, src = _model(6), _sources(6)
    decoder = _static(model, src)
    memory = decoder.encode(src)
    state = decoder.init_state(memory)
    keys = state.buffers.caches[0][0]
    assert keys.shape[0] == 8 and keys.shape[2] % 16 == 0 and keys.shape[2] >= decoder.length  # buckets
    prev = torch.full((5,), 2)
    for _ in range(3):
        _, state = decoder.decode_step(prev, memory, state)
        assert state.buffers.caches[0][0] is keys
    before = keys[[4, 0]].clone()
    state = state.reorder(torch.tensor([4, 0]))
    assert isinstance(state, StaticState) and state.rows == 2
    assert torch.equal(keys[:2], before)
    log_probs, state = decoder.decode_step(prev[:2], memory.reorder(torch.tensor([4, 0])), state)
    assert log_probs.shape == (2, V)


def test_the_position_table_a_captured_step_read_stays_allocated_when_it_grows():
    """A CUDA graph replays the addresses it captured: a longer output limit that grows the
    table must not free the one that graphs of other shapes still read."""
    model = _model(9)
    captured = weakref.ref(model.positions)
    model.static_buffers(2, 3000, model.encode(torch.tensor([[5, 6]])))  # past the table's 1,024 positions
    gc.collect()
    assert model.positions.shape[0] >= 3000
    assert captured() is not None and torch.equal(model.positions[: captured().shape[0]], captured())


class ReplayedStep:
    """A stand-in for a CUDA graph on the CPU: replay() runs the captured step again and writes
    its results into the same output tensors, as a graph does."""

    def __init__(self, decoder, buffers):
        self.decoder, self.buffers = decoder, buffers

    def replay(self):
        for out, new in zip(self.buffers.outputs, self.decoder._step(self.buffers)):
            if out is not None:
                out.copy_(new)


class FakeGraphs(StaticDecoding):
    captures: list = []

    def graphs_on(self, device):
        return True

    def capture(self, buffers):
        FakeGraphs.captures.append(buffers)
        buffers.outputs = self._step(buffers)
        buffers.graph = ReplayedStep(self, buffers)


def test_replayed_steps_give_the_plain_output_batch_after_batch(monkeypatch):
    """The replay path (outputs overwritten in place at every step, buffers reused by the next
    batch of the same bucket) on the CPU, with a stand-in graph."""
    import nmt.static_decoding as static_decoding

    monkeypatch.setattr(static_decoding, "GRAPH_COUNTS", type(static_decoding.GRAPH_COUNTS)())
    monkeypatch.setattr(FakeGraphs, "captures", [])
    model = _model(7)
    for seed in (7, 8):  # two batches of one bucket: the second replays the first one's buffers
        src = _sources(seed)
        choice = AttentionChoice(2, None)
        decoder = FakeGraphs(model, int(output_limits(src, LIMITS["max_len_a"], LIMITS["max_len_b"], StepRules()).max()))
        plain = beam_search(model, src, 3, nbest=2, **LIMITS, attention=choice)
        replayed = beam_search(decoder, src, 3, nbest=2, **LIMITS, attention=choice)
        assert len(plain) == len(replayed) == len(src)
        for plain_nbest, replayed_nbest in zip(plain, replayed):  # later sentences ride the shrinking batch
            _same(plain_nbest, replayed_nbest)
        _same(greedy_search(model, src, **LIMITS, attention=choice), greedy_search(decoder, src, **LIMITS, attention=choice))
    assert len(FakeGraphs.captures) == 2  # beam (15 rows) and greedy (5 rows) buckets, each captured once
    assert static_decoding.GRAPH_COUNTS["replayed_steps"] > 0 and static_decoding.GRAPH_COUNTS["eager_steps"] == 0


class CudaStandIn:
    """What `capture()` calls of torch.cuda, on the CPU: records on which device (the one given,
    or the current one) each stream is made and the graph is recorded."""

    def __init__(self, decoder):
        self.decoder, self.current, self.calls = decoder, "cuda:0", []

    @contextlib.contextmanager
    def device(self, device):
        before, self.current = self.current, str(device)
        yield
        self.current = before

    def Stream(self, device=None):  # noqa: N802 (torch's name)
        stream = SimpleNamespace(device=str(device) if device is not None else self.current, wait_stream=lambda other: None)
        self.calls.append(("stream", stream.device))
        return stream

    def current_stream(self, device=None):
        return self.Stream(device)

    def stream(self, stream):
        return contextlib.nullcontext()

    def CUDAGraph(self):  # noqa: N802
        return SimpleNamespace()

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None, capture_error_mode="global"):
        # without a stream, torch records on one capture stream made once, on the device current then
        self.calls.append(("capture", stream.device if stream is not None else "the first capture's device"))
        yield
        graph.replay = ReplayedStep(self.decoder, self.buffers).replay

    def capture(self, buffers):
        self.buffers = buffers


def test_the_real_capture_records_on_the_model_device_and_replays_the_plain_output(monkeypatch):
    """`capture()` itself, with torch.cuda stood in for: its streams and its recording are on the
    tensors' device, not the current one (a capture on another device's stream records nothing),
    and the replayed steps give the plain output."""
    import nmt.static_decoding as static_decoding

    monkeypatch.setattr(static_decoding, "GRAPH_COUNTS", type(static_decoding.GRAPH_COUNTS)())
    monkeypatch.setattr(StaticDecoding, "capture_failed", False)
    model, src = _model(11), _sources(11)
    decoder = _static(model, src)
    cuda = _stand_in_cuda(monkeypatch, decoder)
    _same(greedy_search(model, src, **LIMITS), greedy_search(decoder, src, **LIMITS))
    assert static_decoding.GRAPH_COUNTS["captured"] == 1 and static_decoding.GRAPH_COUNTS["replayed_steps"] > 0
    assert cuda.calls and all(device == "cpu" for _, device in cuda.calls)  # the tensors' device throughout


def _stand_in_cuda(monkeypatch, decoder, graph=None) -> CudaStandIn:
    cuda = CudaStandIn(decoder)
    for name in ("device", "Stream", "current_stream", "stream", "CUDAGraph", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    if graph is not None:
        monkeypatch.setattr(torch.cuda, "graph", graph)
    real_capture = decoder.capture
    monkeypatch.setattr(decoder, "graphs_on", lambda device: True)
    monkeypatch.setattr(decoder, "capture", lambda buffers: cuda.capture(buffers) or real_capture(buffers))
    return cuda


def test_a_failed_capture_warns_once_and_every_later_batch_decodes_without_graphs(monkeypatch, capsys):
    import nmt.static_decoding as static_decoding

    monkeypatch.setattr(static_decoding, "GRAPH_COUNTS", type(static_decoding.GRAPH_COUNTS)())
    monkeypatch.setattr(StaticDecoding, "capture_failed", False)
    model, src = _model(12), _sources(12)
    decoder = _static(model, src)

    def refusing(graph, pool=None, stream=None, capture_error_mode="global"):
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors might be ...")

    _stand_in_cuda(monkeypatch, decoder, graph=refusing)
    _same(greedy_search(model, src, **LIMITS), greedy_search(decoder, src, **LIMITS))
    for plain, static in zip(beam_search(model, src, 3, **LIMITS), beam_search(decoder, src, 3, **LIMITS)):
        _same(plain, static)  # another bucket of shapes: not captured again
    counts = static_decoding.GRAPH_COUNTS
    assert (counts["failed"], counts["captured"], counts["replayed_steps"]) == (1, 0, 0) and counts["eager_steps"] > 0
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == ["warning: CUDA graph capture failed (operation not permitted when stream is capturing); "
                        "decoding goes on without it"]


def test_under_autocast_the_graph_is_recorded_with_autocasts_cache_off(monkeypatch):
    """A graph outlives the autocast region it was captured in, whose cache of cast weights is
    emptied when the region ends: the recorded step must cast the weights itself."""
    import nmt.static_decoding as static_decoding

    monkeypatch.setattr(static_decoding, "GRAPH_COUNTS", type(static_decoding.GRAPH_COUNTS)())
    monkeypatch.setattr(StaticDecoding, "capture_failed", False)
    model, src = _model(13), _sources(13)
    decoder = _static(model, src)
    cuda, recorded = _stand_in_cuda(monkeypatch, decoder), []
    stand_in_graph = cuda.graph

    @contextlib.contextmanager
    def recording(graph, pool=None, stream=None, capture_error_mode="global"):
        recorded.append((torch.is_autocast_cache_enabled(), torch.get_autocast_dtype("cpu")))
        with stand_in_graph(graph, pool, stream, capture_error_mode):
            yield

    monkeypatch.setattr(torch.cuda, "graph", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        plain, static = greedy_search(model, src, **LIMITS), greedy_search(decoder, src, **LIMITS)
    assert recorded == [(False, torch.bfloat16)]
    assert [h.tokens for h in plain] == [h.tokens for h in static]


def test_translate_decodes_through_the_static_path_when_asked(monkeypatch):
    calls = []
    original = StaticDecoding.decode_step

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(StaticDecoding, "decode_step", counting)
    model = _model(9)
    decode = DecodeConfig(beam=2, **LIMITS)
    translate_ids(model, [[7, 8, 9]], decode, torch.device("cpu"))
    assert not calls
    translate_ids(model, [[7, 8, 9]], dataclasses.replace(decode, static_cache=True), torch.device("cpu"))
    assert calls


def test_out_of_memory_for_a_new_shape_frees_the_others_and_decodes(monkeypatch):
    import nmt.static_decoding as static_decoding

    model = _model(9)
    first, second = _sources(9), _sources(10)[:2]  # 16 and 8 rows of beams: two buckets of shapes
    beam_search(_static(model, first), first, 3, **LIMITS)
    assert len(static_decoding._buffers_of[model]) == 1
    made = static_decoding.Buffers

    def out_of_memory_while_others_are_kept(*args, **kwargs):
        if static_decoding._buffers_of[model]:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return made(*args, **kwargs)

    monkeypatch.setattr(static_decoding, "Buffers", out_of_memory_while_others_are_kept)
    for a, b in zip(beam_search(model, second, 3, **LIMITS), beam_search(_static(model, second), second, 3, **LIMITS)):
        _same(a, b)
    assert len(static_decoding._buffers_of[model]) == 1


def test_the_least_recently_used_buffers_go_and_the_newest_stay(monkeypatch):
    """The buffers of the newest shape stay cached; the least recently used shape goes."""
    import nmt.static_decoding as static_decoding
    from nmt.config import ModelConfig
    from nmt.models import build_model
    from nmt.static_decoding import StaticDecoding
    from nmt.tokenizer import EOS

    monkeypatch.setattr(static_decoding, "CACHED_SHAPES", 2)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY_TRANSFORMER), 14, 14).eval()
    decoder = StaticDecoding(model, 16)

    def buffers(rows):  # 1, 2, 4 rows: three shapes
        src = torch.full((rows, 4), 7)
        src[:, -1] = EOS
        with torch.no_grad():
            return decoder.init_state(decoder.encode(src)).buffers

    first, second = buffers(1), buffers(2)
    assert buffers(1) is first  # reused, and now the most recently used
    third = buffers(4)  # evicts the least recently used: the 2-row buffers
    assert buffers(4) is third and buffers(1) is first
    assert buffers(2) is not second


def test_a_model_decoded_with_fixed_shapes_is_freed_with_its_buffers():
    """The buffers are cached per model, weakly: a model no longer used goes, and its buffers
    (a GPU's graphs and their memory pools) with it."""
    from nmt.static_decoding import _buffers_of

    model, src = _model(5), _sources(5)
    greedy_search(_static(model, src), src, **LIMITS)
    assert model in _buffers_of
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_a_step_past_the_length_decoded_for_is_refused():
    """The buffers hold `length` positions: a further step would write past them (past the
    end of the cache where the length fills its bucket)."""
    model, src = _model(3), _sources(3)
    decoder = StaticDecoding(model, 16)
    memory = decoder.encode(src)
    state, prev = decoder.init_state(memory), torch.full((5,), 2)
    for _ in range(16):
        _, state = decoder.decode_step(prev, memory, state)
    with pytest.raises(ValueError, match="step 17 of outputs decoded for 16 tokens at most"):
        decoder.decode_step(prev, memory, state)


def test_an_ensemble_decodes_its_transformers_with_fixed_shapes_and_gives_the_plain_output(monkeypatch):
    """decode.static_cache reaches the members of an ensemble that can take it (an RNN beside
    them decodes as it always does)."""
    from conftest import TINY_RNN

    from nmt.ensemble import Ensemble

    calls = []
    original = StaticDecoding.decode_step
    monkeypatch.setattr(StaticDecoding, "decode_step", lambda self, *args: calls.append(self.model) or original(self, *args))
    torch.manual_seed(4)
    rnn = build_model(ModelConfig(**TINY_RNN), V, V).eval()
    ensemble = Ensemble([_model(5), rnn, _model(6, "post")])
    sources = [[7, 8, 9, 10], [11, 12], [13, 7, 7, 9, 10, 11, 12, 8], [9]]
    plain = DecodeConfig(beam=3, nbest=2, batch_tokens=12, **LIMITS)
    static = dataclasses.replace(plain, static_cache=True)
    for a, b in zip(translate_ids(ensemble, sources, plain, torch.device("cpu")),
                    translate_ids(ensemble, sources, static, torch.device("cpu"))):
        _same(a, b)
    assert {id(model) for model in calls} == {id(ensemble.models[0]), id(ensemble.models[2])}
