"""Every model, wrapper, task and batch fits the contracts in nmt.interfaces."""

import inspect

import torch
from conftest import prepare_toy_data

from nmt.batches import Batch
from nmt.config import ModelConfig, config_from_dict
from nmt.ensemble import Ensemble
from nmt.interfaces import DecoderState, Reorderable, StepDecoder, TrainingBatch, TrainingTask, TranslationModel
from nmt.models import build_model
from nmt.models.masked_lm import MaskedLM
from nmt.pretrain import MaskedBatch, MaskedLMTask
from nmt.search import FullPrefixDecoding
from nmt.static_decoding import StaticDecoding
from nmt.tokenizer import EOS
from nmt.translate import quantize_int8
from nmt.translation_task import TranslationTask

CONFIGS = [ModelConfig(embed_dim=16, ff_dim=32, heads=2, enc_layers=1, dec_layers=1),
           ModelConfig(arch="rnn", embed_dim=16, hidden_dim=16, enc_layers=1, dec_layers=1, tie_output=False)]


def test_models_and_their_memory_and_state_fit_the_search_contract():
    src = torch.tensor([[5, 6, EOS]])
    for config in CONFIGS:
        model = build_model(config, 20, 20).eval()
        assert isinstance(model, TranslationModel)
        memory = model.encode(src)
        state = model.init_state(memory)
        assert isinstance(memory, Reorderable) and isinstance(state, DecoderState)
        _, state = model.decode_step(torch.tensor([1]), memory, state)
        assert isinstance(state.reorder(torch.tensor([0, 0])), DecoderState)
        for wrapped in (FullPrefixDecoding(model), quantize_int8(model), Ensemble([model, model])):
            assert isinstance(wrapped, StepDecoder)
            assert isinstance(wrapped.init_state(wrapped.encode(src)), DecoderState)
    masked_lm = MaskedLM(CONFIGS[0], 20)
    assert not isinstance(masked_lm, StepDecoder)  # an encoder alone does not translate


def _parameters(method) -> list[str]:
    return [name for name in inspect.signature(method).parameters if name != "self"]


def test_every_step_decoder_takes_the_contracts_parameters():
    """isinstance checks only the names of the methods: their parameters must match too, since
    search calls them all the same way."""
    models = [build_model(config, 20, 20) for config in CONFIGS]
    step_decoders = [*(type(model) for model in models), FullPrefixDecoding, Ensemble, StaticDecoding]
    for protocol in (StepDecoder, TranslationModel):
        for name in ("encode", "init_state", "decode_step", "decode", "forward"):
            if name not in vars(protocol):
                continue
            wanted = _parameters(vars(protocol)[name])
            for implementation in step_decoders if protocol is StepDecoder else [type(m) for m in models]:
                assert _parameters(getattr(implementation, name)) == wanted, (implementation.__name__, name)


def test_tasks_and_batches_fit_the_training_contract(tmp_path):
    data_dir = prepare_toy_data(tmp_path, train=20)
    config = config_from_dict({"data_dir": str(data_dir), "save_dir": str(tmp_path / "m")})
    from nmt.files import Manifest

    assert isinstance(TranslationTask(config, data_dir, Manifest.read(data_dir)), TrainingTask)
    methods = [name for name, value in vars(TrainingTask).items() if callable(value) and not name.startswith("_")]
    assert "validate" in methods and all(callable(getattr(MaskedLMTask, name, None)) for name in methods)
    for batch_type in (Batch, MaskedBatch):
        assert callable(batch_type.to) and callable(batch_type.halves)
    batch = Batch(torch.tensor([[5, EOS]]), torch.tensor([[1, 6]]), torch.tensor([[6, EOS]]), num_tgt_tokens=2)
    assert isinstance(batch, TrainingBatch)
