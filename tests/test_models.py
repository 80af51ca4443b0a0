import math

import pytest
import torch

from nmt.config import ModelConfig
from nmt.models import build_model
from nmt.models.attention import MultiHeadAttention, rnn_attention
from nmt.models.masked_lm import MaskedLM
from nmt.models.transformer import sinusoidal_positions, training_flops
from nmt.tokenizer import BOS, EOS, PAD

V_SRC, V_TGT = 40, 50

MODEL_CONFIGS = [
    ModelConfig(arch="transformer", embed_dim=32, ff_dim=64, heads=4, enc_layers=2, dec_layers=2, norm="pre"),
    ModelConfig(arch="transformer", embed_dim=32, ff_dim=64, heads=2, enc_layers=2, dec_layers=2, norm="post", tie_output=False),
    ModelConfig(arch="transformer", embed_dim=32, ff_dim=64, heads=4, enc_layers=2, dec_layers=2, enc_no_residual_layer=2),
] + [
    ModelConfig(arch="rnn", cell=cell, attention=attention, input_feeding=feeding, embed_dim=16,
                hidden_dim=32, enc_layers=2, dec_layers=2, tie_output=False)
    for cell in ("rnn", "gru", "lstm")
    for attention in ("additive", "dot", "general")
    for feeding in (True, False)
]


def _ids(config):
    residual = f"-no-residual-{config.enc_no_residual_layer}" if config.enc_no_residual_layer else ""
    return f"{config.arch}-{config.norm if config.arch == 'transformer' else config.cell}-{config.attention}-{config.input_feeding}{residual}"


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


@pytest.mark.parametrize("config", MODEL_CONFIGS[:3] + MODEL_CONFIGS[-2:], ids=_ids)
def test_padding_does_not_change_a_sentence(config):
    model = build_model(config, V_SRC, V_TGT).eval()
    src, tgt_in = random_batch()
    with torch.no_grad():
        alone = model(src[:1, :4], tgt_in[:1])
        padded = model(src, tgt_in)[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


@pytest.mark.parametrize("config", MODEL_CONFIGS[:3] + MODEL_CONFIGS[-2:], ids=_ids)
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


@pytest.mark.parametrize("feeding", [True, False])
def test_the_recurrence_runs_in_fp32_under_cpu_autocast_without_bf16_instructions(monkeypatch, feeding):
    """On such CPUs oneDNN can't build a training-mode bf16 LSTM ("could not create a primitive
    descriptor"): the recurrent layers run in fp32 there, the rest under autocast."""
    import nmt.models.rnn

    monkeypatch.setattr(nmt.models.rnn, "cpu_multiplies_natively", lambda dtype: False)
    config = ModelConfig(arch="rnn", cell="lstm", input_feeding=feeding, embed_dim=16, hidden_dim=32,
                         enc_layers=2, dec_layers=1, dropout=0.0, tie_output=False)
    model = build_model(config, V_SRC, V_TGT).train()
    src, tgt_in = random_batch()
    with torch.no_grad():
        fp32_states = model.encode(src).states
    with torch.autocast("cpu", dtype=torch.bfloat16):
        memory = model.encode(src)
        logits = model(src, tgt_in)
        _, state = model.decode_step(tgt_in[:, 0], memory, model.init_state(memory))
    assert memory.states.dtype == torch.float32 and torch.equal(memory.states, fp32_states)
    assert state.hidden.dtype == state.cell.dtype == torch.float32
    assert logits.dtype == torch.bfloat16  # the output projection still runs under autocast
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.decoder.parameters())


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


@pytest.mark.parametrize("layers", [(1, 1, "pre"), (3, 2, "post")])
def test_training_flops_are_every_matrix_product_of_a_training_pass(layers):
    """The model FLOPs that `nmt bench` divides by the peak: on sentences without padding they
    are what torch's counter counts for a forward and backward pass (attention by its plain
    kernel, which the counter sees on every device)."""
    import numpy as np
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    enc_layers, dec_layers, norm = layers
    config = ModelConfig(arch="transformer", embed_dim=32, ff_dim=48, heads=2, enc_layers=enc_layers,
                         dec_layers=dec_layers, norm=norm, dropout=0.0)
    model = build_model(config, 23, 29)
    src, tgt_in = torch.randint(4, 23, (3, 7)), torch.randint(4, 29, (3, 5))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(src, tgt_in).sum().backward()
    assert training_flops(config, 29, np.full(3, 7), np.full(3, 5)) == counter.get_total_flops()
    # sentence by sentence: a short sentence counts its own lengths, not its batch's padding
    assert training_flops(config, 29, np.array([7, 2]), np.array([5, 3])) < training_flops(config, 29, np.full(2, 7), np.full(2, 5))


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_layer_norm_sits_where_the_config_says(norm):
    """Post-norm: each layer's output is layer-normalized (mean 0, variance 1 per position with
    the initial weights); pre-norm: the residual stream passes through untouched, offset included."""
    model = build_model(ModelConfig(arch="transformer", embed_dim=32, ff_dim=64, heads=2, enc_layers=1, dec_layers=1,
                                    norm=norm, dropout=0.0), V_SRC, V_TGT).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32) + 5.0  # (B, T, D) far from normalized
    visible = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    decoder = model.decoder_layers[0]
    outputs = {"encoder": model.encoder_layers[0](x, visible),
               "decoder": decoder(x, decoder.cross_attn.keys_values(x), visible)[0]}
    for name, out in outputs.items():
        normalized = bool(torch.allclose(out.mean(-1), torch.zeros(2, 5), atol=1e-4)
                          and torch.allclose(out.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3))
        assert normalized == (norm == "post"), name


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_an_encoder_layer_without_its_residual_passes_on_only_what_attention_gathered(norm):
    config = ModelConfig(arch="transformer", embed_dim=32, ff_dim=64, heads=2, enc_layers=3, dec_layers=1, norm=norm,
                         dropout=0.0, enc_no_residual_layer=2)
    model = build_model(config, V_SRC, V_TGT).eval()
    assert [layer.attn_residual for layer in model.encoder_layers] == [True, False, True]
    assert [layer.attn_residual for layer in MaskedLM(config, V_SRC).encoder_layers] == [True, False, True]
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)  # (B, S, D)
    visible = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    for layer in model.encoder_layers:
        if norm == "pre":
            h = layer.self_attn(layer.norm1(x), visible)
            expected = h + layer.ff(layer.norm2(h))
        else:
            h = layer.norm1(layer.self_attn(x, visible))
            expected = layer.norm2(h + layer.ff(h))
        assert torch.allclose(layer(x, visible), expected, atol=1e-5) == (not layer.attn_residual)
    plain = build_model(ModelConfig(**{**config.__dict__, "enc_no_residual_layer": 0}), V_SRC, V_TGT).eval()
    plain.load_state_dict(model.state_dict())  # the same weights by the same names
    src, tgt_in = random_batch()
    assert not torch.allclose(plain(src, tgt_in), model(src, tgt_in), atol=1e-3)


@pytest.mark.parametrize("feeding", [True, False])
def test_input_feeding_gives_the_decoder_its_last_attentional_vector(feeding):
    """With input feeding, the next step depends on the attentional vector the state carries;
    without it, not at all."""
    import dataclasses

    model = build_model(ModelConfig(arch="rnn", cell="lstm", input_feeding=feeding, embed_dim=16, hidden_dim=32,
                                    enc_layers=1, dec_layers=1, tie_output=False, dropout=0.0), V_SRC, V_TGT).eval()
    src, _ = random_batch()
    memory = model.encode(src)
    state = model.init_state(memory)
    prev = torch.full((src.shape[0],), BOS)
    plain, _ = model.decode_step(prev, memory, state)
    other, _ = model.decode_step(prev, memory, dataclasses.replace(state, att_vec=torch.randn_like(state.att_vec)))
    assert torch.equal(plain, other) != feeding


def test_attention_dropout_is_off_outside_training():
    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=32, ff_dim=64, heads=4, attn_dropout=0.3), V_SRC, V_TGT).eval()
    src, tgt_in = random_batch()
    with torch.no_grad():
        assert torch.equal(model(src, tgt_in), model(src, tgt_in))
    model.train()
    assert not torch.equal(model(src, tgt_in), model(src, tgt_in))  # and on in training
