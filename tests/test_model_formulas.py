"""Each model computes the formula its paper and docstring give, spelled out by hand on tiny
sizes: embeddings, sublayers and norms, attention scores, the RNN's bridge and attentional
vector, and the masked LM's heads."""

import math

import pytest
import torch
import torch.nn.functional as F

from nmt.config import ModelConfig
from nmt.models import build_model
from nmt.models.attention import AdditiveAttention, AttentionChoice, DotAttention, GeneralAttention, rnn_attention
from nmt.models.masked_lm import MaskedLM
from nmt.models.transformer import chosen_weights, sinusoidal_positions
from nmt.tokenizer import BOS, CLS, EOS, PAD

V = 30
TRANSFORMER = dict(arch="transformer", embed_dim=16, ff_dim=32, heads=2, enc_layers=2, dec_layers=2, dropout=0.0)
RNN = dict(arch="rnn", cell="gru", embed_dim=16, hidden_dim=16, enc_layers=1, dec_layers=2, dropout=0.0, tie_output=False)


def _tokens(seed: int, B: int = 2, S: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, V, (B, S), generator=generator)
    tokens[:, -1] = EOS
    return tokens


def _normalized(x: torch.Tensor) -> bool:  # mean 0, variance 1 at each position (LayerNorm's initial weights)
    return bool(torch.allclose(x.mean(-1), torch.zeros(x.shape[:-1]), atol=1e-4)
                and torch.allclose(x.var(-1, unbiased=False), torch.ones(x.shape[:-1]), atol=1e-3))


@pytest.mark.parametrize("masked_lm", [False, True], ids=["transformer", "masked-lm"])
def test_embeddings_are_scaled_by_the_root_of_their_size_plus_sinusoidal_positions(masked_lm):
    model = MaskedLM(ModelConfig(**TRANSFORMER), V) if masked_lm else build_model(ModelConfig(**TRANSFORMER), V, V)
    tokens = _tokens(0)
    expected = model.src_embed(tokens) * math.sqrt(16) + sinusoidal_positions(6, 16)
    assert torch.allclose(model.eval()._embed(model.src_embed, tokens), expected, atol=1e-6)
    later = model._embed(model.src_embed, tokens[:, :1], offset=4)  # one incremental step at position 4
    assert torch.allclose(later[:, 0], model.src_embed(tokens[:, 0]) * 4.0 + sinusoidal_positions(6, 16)[4], atol=1e-6)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_a_decoder_layer_is_three_sublayers_with_the_norm_where_the_config_says(norm):
    model = build_model(ModelConfig(**{**TRANSFORMER, "norm": norm}), V, V).eval()
    layer = model.decoder_layers[0]
    torch.manual_seed(1)
    x, memory = torch.randn(2, 4, 16), torch.randn(2, 5, 16)  # (B, T, D), (B, S, D)
    visible = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    kv = layer.cross_attn.keys_values(memory)
    sublayers = [(layer.norm1, lambda h: layer.self_attn(h, causal=True)),
                 (layer.norm2, lambda h: layer.cross_attn.attend(h, *kv, mask=visible)),
                 (layer.norm3, layer.ff)]
    expected = x
    for layer_norm, sublayer in sublayers:
        expected = expected + sublayer(layer_norm(expected)) if norm == "pre" else layer_norm(expected + sublayer(expected))
    with torch.no_grad():
        assert torch.allclose(layer(x, kv, visible)[0], expected, atol=1e-5)


def test_the_feed_forward_sublayer_is_relu_between_two_linear_maps():
    ff = build_model(ModelConfig(**TRANSFORMER), V, V).eval().encoder_layers[0].ff
    x = torch.randn(3, 16)
    assert torch.allclose(ff(x), ff.fc2(F.relu(ff.fc1(x))), atol=1e-6)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_dropout_acts_on_the_embeddings_each_sublayers_output_and_the_feed_forwards_hidden_units(norm, monkeypatch):
    from nmt.models.dropout import Dropout

    model = build_model(ModelConfig(**{**TRANSFORMER, "norm": norm, "dropout": 0.1}), V, V).train()
    monkeypatch.setattr(Dropout, "forward", lambda self, x: torch.zeros_like(x))  # every unit dropped
    torch.manual_seed(1)
    for module in model.modules():  # biases made nonzero: a sublayer whose hidden units are dropped still adds one
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias)
    x, memory = torch.randn(2, 4, 16), torch.randn(2, 5, 16)  # (B, T, D), (B, S, D)
    visible = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    encoder, decoder = model.encoder_layers[0], model.decoder_layers[0]
    with torch.no_grad():
        assert torch.equal(model._embed(model.src_embed, _tokens(0)), torch.zeros(2, 6, 16))
        assert torch.allclose(encoder.ff(x), encoder.ff.fc2.bias.expand_as(x))  # ReLU units dropped: fc2's bias
        # With each sublayer's output dropped, only the residual path (and post-norm's norms) remains.
        kept = x if norm == "pre" else encoder.norm2(encoder.norm1(x))
        assert torch.allclose(encoder(x, visible[..., :4]), kept, atol=1e-6)
        kept = x if norm == "pre" else decoder.norm3(decoder.norm2(decoder.norm1(x)))
        assert torch.allclose(decoder(x, decoder.cross_attn.keys_values(memory), visible)[0], kept, atol=1e-6)


def test_a_pre_norm_model_normalizes_the_last_layers_output_once():
    model = build_model(ModelConfig(**{**TRANSFORMER, "norm": "pre"}), V, V).eval()
    src, tgt_in = _tokens(2), _tokens(3, S=4)
    tgt_in[:, 0] = BOS
    with torch.no_grad():
        memory = model.encode(src)
        assert _normalized(memory.states)
        x = model._embed(model.tgt_embed, tgt_in)
        for layer, kv in zip(model.decoder_layers, memory.cross_kv):
            x = layer(x, kv, memory.mask[:, None, None, :])[0]
        assert torch.allclose(model.decode(tgt_in, memory), model.output(F.layer_norm(x, (16,))), atol=1e-5)


def test_a_chosen_head_is_that_head_counted_from_one():
    weights = torch.rand(2, 3, 1, 5)  # (B, H, 1, S)
    for head in (1, 2, 3):
        assert torch.equal(chosen_weights(weights, AttentionChoice(1, head)), weights[:, head - 1, 0])
    assert torch.allclose(chosen_weights(weights, AttentionChoice(1, None)), weights[:, :, 0].mean(1))


def test_rnn_attention_scores_are_bahdanaus_and_luongs():
    torch.manual_seed(4)
    query, keys = torch.randn(2, 3, 8), torch.randn(2, 5, 8)  # (B, T, D), (B, S, D)
    assert [type(rnn_attention(kind, 8)) for kind in ("additive", "dot", "general")] == [
        AdditiveAttention, DotAttention, GeneralAttention]
    additive = AdditiveAttention(8)
    expected = additive.v(torch.tanh(additive.query_proj(query)[:, :, None] + additive.key_proj(keys)[:, None])).squeeze(-1)
    assert torch.allclose(additive.score(query, additive.project_keys(keys)), expected, atol=1e-6)
    general = GeneralAttention(8)
    expected = query @ general.key_proj(keys).transpose(1, 2)  # q^T W k
    assert torch.allclose(general.score(query, general.project_keys(keys)), expected, atol=1e-6)
    dot = DotAttention()
    assert torch.allclose(dot.score(query, dot.project_keys(keys)), query @ keys.transpose(1, 2), atol=1e-6)


def test_the_rnn_encoder_reads_both_ways_and_the_bridge_starts_from_the_mean_state():
    model = build_model(ModelConfig(**RNN), V, V).eval()
    src = _tokens(5)
    src[1, 4:] = PAD  # a shorter sentence
    src[1, 3] = EOS
    with torch.no_grad():
        memory = model.encode(src)
        changed = src.clone()
        changed[0, -2] = 5 if src[0, -2] != 5 else 6  # a later token: seen from the first by the backward half
        assert not torch.allclose(model.encode(changed).states[0, 0], memory.states[0, 0])
        state = model.init_state(memory)
        visible = memory.mask[:, :, None].float()
        mean = (memory.states * visible).sum(1) / visible.sum(1)  # (B, D) over the real tokens only
        expected = torch.tanh(model.bridge(mean)).view(2, 2, 16).transpose(0, 1)  # (L, B, D)
        assert torch.allclose(state.hidden, expected, atol=1e-6)


def test_the_rnn_attentional_vector_is_tanh_of_the_state_and_its_context():
    model = build_model(ModelConfig(**RNN), V, V).eval()
    with torch.no_grad():
        memory = model.encode(_tokens(6))
        dec_out = torch.randn(2, 1, 16)
        context, weights = model.attention(dec_out, memory.states, memory.projected_keys, memory.mask)
        attentional, _ = model._attentional(dec_out, memory)
        assert torch.allclose(attentional, torch.tanh(model.combine(torch.cat([dec_out, context], -1))), atol=1e-6)


def test_an_rnn_shares_and_ties_its_embeddings_as_asked():
    shared = build_model(ModelConfig(**{**RNN, "share_embeddings": True, "tie_output": True}), V, V)
    assert shared.src_embed is shared.tgt_embed and shared.output.weight is shared.tgt_embed.weight
    apart = build_model(ModelConfig(**RNN), V, V)
    assert apart.src_embed is not apart.tgt_embed and apart.output.weight is not apart.tgt_embed.weight


def test_the_masked_lm_ignores_padding_and_reads_segments_and_cls():
    model = MaskedLM(ModelConfig(**{**TRANSFORMER, "norm": "pre"}), V, next_sentence=True).eval()
    tokens = _tokens(7)
    tokens[:, 0] = CLS
    padded = torch.cat([tokens, torch.full((2, 3), PAD)], dim=1)
    with torch.no_grad():
        hidden = model.encode(tokens, torch.zeros_like(tokens))
        assert _normalized(hidden)  # the final norm of a pre-norm stack
        assert torch.allclose(model.encode(padded, torch.zeros_like(padded))[:, :6], hidden, atol=1e-5)
        assert not torch.allclose(model.encode(tokens, torch.ones_like(tokens)), hidden, atol=1e-3)
        logits, nsp_logits = model(tokens, torch.zeros_like(tokens), torch.tensor([1, 8]))
        flat = hidden.reshape(-1, 16)[[1, 8]]
        assert torch.allclose(logits, F.linear(model.mlm_transform(flat), model.src_embed.weight, model.mlm_bias), atol=1e-5)
        assert torch.allclose(nsp_logits, model.nsp_head(hidden[:, 0]), atol=1e-5)
