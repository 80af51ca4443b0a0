import math

import pytest
import torch

from nmt.config import ModelConfig
from nmt.models import build_model
from nmt.models.attention import MultiHeadAttention, rnn_attention
from nmt.models.transformer import sinusoidal_positions
from nmt.tokenizer import BOS, EOS, PAD

V_SRC, V_TGT = 40, 50

MODEL_CONFIGS = [
    ModelConfig(arch="transformer", embed_dim=32, ff_dim=64, heads=4, enc_layers=2, dec_layers=2, norm="pre"),
    ModelConfig(arch="transformer", embed_dim=32, ff_dim=64, heads=2, enc_layers=2, dec_layers=2, norm="post", tie_output=False),
] + [
    ModelConfig(arch="rnn", cell=cell, attention=attention, input_feeding=feeding, embed_dim=16,
                hidden_dim=32, enc_layers=2, dec_layers=2, tie_output=False)
    for cell in ("rnn", "gru", "lstm")
    for attention in ("additive", "dot", "general")
    for feeding in (True, False)
]


def _ids(config):
    return f"{config.arch}-{config.norm if config.arch == 'transformer' else config.cell}-{config.attention}-{config.input_feeding}"


def random_batch(B=3, S=7, T=6):
    src = torch.randint(4, V_SRC, (B, S))
    src[:, -1] = 3
    src[0, 4:] = PAD  # a shorter sentence
    src[0, 3] = 3
    tgt_in = torch.randint(4, V_TGT, (B, T))
    tgt_in[:, 0] = BOS
    return src, tgt_in


def test_positional_encoding_formula():
    pe = sinusoidal_positions(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=_ids)
def test_incremental_decoding_equals_teacher_forcing(config):
    model = build_model(config, V_SRC, V_TGT).eval()
    src, tgt_in = random_batch()
    with torch.no_grad():
        expected = torch.log_softmax(model(src, tgt_in), dim=-1)  # (B, T, V)
        memory = model.encode(src)
        state = model.init_state(memory)
        steps = []
        for t in range(tgt_in.shape[1]):
            log_probs, state = model.decode_step(tgt_in[:, t], memory, state)
            steps.append(log_probs)
    assert torch.allclose(torch.stack(steps, dim=1), expected, atol=1e-5)


@pytest.mark.parametrize("config", MODEL_CONFIGS[:2] + MODEL_CONFIGS[-2:], ids=_ids)
def test_padding_does_not_change_a_sentence(config):
    model = build_model(config, V_SRC, V_TGT).eval()
    src, tgt_in = random_batch()
    with torch.no_grad():
        alone = model(src[:1, :4], tgt_in[:1])
        padded = model(src, tgt_in)[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


@pytest.mark.parametrize("config", MODEL_CONFIGS[:2] + MODEL_CONFIGS[-2:], ids=_ids)
def test_state_reorder_selects_rows(config):
    model = build_model(config, V_SRC, V_TGT).eval()
    src, tgt_in = random_batch()
    with torch.no_grad():
        memory = model.encode(src)
        state = model.init_state(memory)
        _, state = model.decode_step(tgt_in[:, 0], memory, state)
        order = torch.tensor([2, 0, 0])
        reordered, _ = model.decode_step(tgt_in[order, 1], memory.reorder(order), state.reorder(order))
        direct, _ = model.decode_step(tgt_in[:, 1], memory, state)
    assert torch.allclose(reordered, direct[order], atol=1e-6)


def test_encoder_ignores_padded_positions():
    model = build_model(MODEL_CONFIGS[0], V_SRC, V_TGT).eval()
    src, _ = random_batch()
    other = src.clone()
    mask = src == PAD
    with torch.no_grad():
        out = model.encode(src).states
        # A model that looked at padding would change when padding is replaced by an all-PAD
        # sentence of different length: compare the real positions of a truncated copy instead.
        shorter = model.encode(other[:1, :4]).states
    assert torch.allclose(out[0, :4], shorter[0], atol=1e-5)
    assert mask[0, 4:].all()


@pytest.mark.parametrize("kind", ["additive", "dot", "general"])
def test_rnn_attention_shapes_and_weights(kind):
    attention = rnn_attention(kind, 8)
    query, keys = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    context, weights = attention(query, keys, attention.project_keys(keys), mask)
    assert context.shape == (2, 3, 8) and weights.shape == (2, 3, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3), atol=1e-6)
    assert (weights[1, :, 2:] == 0).all()


def test_multi_head_attention_shapes_and_mask():
    attention = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])[:, None, None, :]
    out = attention(x, mask)
    assert out.shape == (2, 5, 16)
    # Changing masked key positions does not change the output of the second sentence.
    y = x.clone()
    y[1, 3:] = torch.randn(2, 16)
    assert torch.allclose(attention(y, mask)[1, :3], out[1, :3], atol=1e-6)
    # Causal: position t does not see positions after t.
    causal = attention(x, causal=True)
    z = x.clone()
    z[:, 3:] = torch.randn(2, 2, 16)
    assert torch.allclose(attention(z, causal=True)[:, :3], causal[:, :3], atol=1e-6)


def test_tied_and_shared_embeddings():
    config = ModelConfig(embed_dim=16, ff_dim=32, heads=2, share_embeddings=True, tie_output=True)
    model = build_model(config, 30, 30)
    assert model.src_embed is model.tgt_embed
    assert model.output.weight is model.tgt_embed.weight


@pytest.mark.parametrize("config", [MODEL_CONFIGS[0], MODEL_CONFIGS[-1], MODEL_CONFIGS[-4]], ids=_ids)
def test_forward_and_search_under_bf16_autocast(config):
    from nmt.search import beam_search

    model = build_model(config, V_SRC, V_TGT).eval()
    src, tgt_in = random_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(src, tgt_in)
        hyps = beam_search(model, src, beam_size=3, max_len_b=4)
    assert torch.isfinite(logits.float()).all()
    assert len(hyps) == src.shape[0]


def test_the_decoder_cache_keeps_the_autocast_dtype():
    """Under bf16 autocast the encoder output is fp32 (its final layer norm), while the keys the
    decoder's projections make are bf16: the cache must not be promoted to fp32 at every step."""
    model = build_model(MODEL_CONFIGS[0], V_SRC, V_TGT).eval()
    src, _ = random_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        memory = model.encode(src)
        state = model.init_state(memory)
        for _ in range(2):
            _, state = model.decode_step(torch.full((src.shape[0],), BOS), memory, state)
    assert memory.states.dtype == torch.float32
    assert {k.dtype for kv in state.self_kv for k in kv} == {torch.bfloat16}


def test_int8_quantized_model_stays_close_to_float():
    from nmt.translate import quantize_int8

    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=64, ff_dim=128, heads=4, enc_layers=2, dec_layers=2), 40, 40).eval()
    quantized = quantize_int8(model)
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    assert any(type(m) is torch.nn.Linear for m in model.modules())  # the original is left as it was
    src = torch.randint(4, 40, (3, 6))
    src[:, -1] = EOS
    tgt_in = torch.randint(4, 40, (3, 5))
    with torch.inference_mode():
        exact, approx = model(src, tgt_in).log_softmax(-1), quantized(src, tgt_in).log_softmax(-1)
    error = (exact - approx).abs()
    assert error.mean() < 0.03 and error.max() < 0.3
