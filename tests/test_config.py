import pytest

from nmt.config import Config, apply_overrides, config_from_dict, config_to_dict, load_config
from nmt.errors import ConfigError


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arch: rnn\n  embed_dim: 64\n  hidden_dim: 64\ntrain:\n  lr: 0.002\n")
    config = load_config(path, ["train.lr=3e-4", "model.cell=gru", "train.betas=[0.9, 0.99]", "data_dir=d"])
    assert config.model.arch == "rnn" and config.model.cell == "gru"
    assert config.train.lr == 3e-4 and config.train.betas == [0.9, 0.99]  # 3e-4: a string to YAML 1.1
    assert config.data_dir == "d"
    assert config_from_dict(config_to_dict(config)) == config


def test_direction_weights_are_a_mapping_set_from_yaml_or_one_override_each(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  direction_weights: {en-cs: 2, cs-en: 1.5}\n")
    config = load_config(path, ["train.direction_weights.en-cs=3e-1", "train.direction_weights.de-en=2"])
    assert config.train.direction_weights == {"en-cs": 0.3, "cs-en": 1.5, "de-en": 2.0}
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"layers": 3}}, "unknown config key 'model.layers'"),
        ({"trian": {}}, "unknown config key 'trian'"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number"),
        ({"train": {"lr": "nan"}}, "train.lr must be a finite number"),
        ({"train": {"lr": float("inf")}}, "train.lr must be a finite number"),
        ({"train": {"lr": 10**400}}, "train.lr must be a finite number"),
        ({"train": {"max_steps": 2**70}}, "train.max_steps is too large"),
        ({"train": {"betas": [2, 3]}}, "train.betas must be two numbers in"),
        ({"train": {"weight_decay": -1}}, "train.weight_decay must be 0 or more"),
        ({"train": {"threads": -2}}, "train.threads must be 0 or more"),
        ({"train": {"threads": 10**6}}, "train.threads must be between"),
        ({"train": {"valid_beam": 10**9}}, "train.valid_beam must be between"),
        ({"train": {"max_minutes": -1}}, "train.max_minutes must be 0 or more"),
        ({"model": {"attn_dropout": 5}}, r"model.attn_dropout must be in \[0, 1\)"),
        ({"model": []}, "model must be a mapping"),
        ({"train": 0}, "train must be a mapping"),
        ({"decode": {"len_penalty": "nan"}}, "decode.len_penalty must be a finite number"),
        ({"decode": {"max_len_a": 1e300}}, "decode.max_len_a must be between"),
        ({"decode": {"max_len_b": -5}}, "decode.max_len_b must be between"),
        ({"decode": {"temperature": 1e-45}}, "decode.temperature must be between"),
        ({"decode": {"seed": 2**64}}, "decode.seed is too large"),
        ({"decode": {"beam": 10**6}}, "decode.beam must be between"),
        ({"train": {"max_steps": 1.5}}, "train.max_steps must be an integer"),
        ({"train": {"max_steps": True}}, "train.max_steps must be an integer"),  # not 1
        ({"train": {"lr": True}}, "train.lr must be a number"),  # not 1.0
        ({"model": {"tie_output": "yes"}}, "model.tie_output must be true or false"),
        ({"model": {"arch": "lstm"}}, "model.arch must be one of"),
        ({"model": {"embed_dim": 250, "heads": 4, "arch": "transformer"}}, "divisible"),
        ({"model": {"arch": "rnn", "embed_dim": 32, "hidden_dim": 64}}, "tie_output"),
        ({"model": {"enc_layers": 2, "enc_no_residual_layer": 3}}, r"model.enc_no_residual_layer must be between 0 \(none\) and model.enc_layers \(2\)"),
        ({"model": {"enc_no_residual_layer": -1}}, "model.enc_no_residual_layer must be between"),
        ({"model": {"arch": "rnn", "tie_output": False, "enc_no_residual_layer": 1}}, "for Transformers only"),
        ({"train": {"direction_weights": [2.0]}}, "train.direction_weights must be a mapping"),
        ({"train": {"direction_weights": {1: 2.0}}}, "train.direction_weights: the key 1 must be a string"),
        ({"train": {"direction_weights": {"en-cs": "x"}}}, "train.direction_weights.en-cs must be a number"),
        ({"train": {"direction_weights": {"en-cs": 0}}}, "train.direction_weights.en-cs must be a positive number"),
        ({"train": {"seed": -1}}, r"train.seed must be in \[0, 2\*\*32\)"),
        ({"model": {"tie_output": 1}}, "model.tie_output must be true or false"),  # not taken for true
        ({"train": {"betas": ["x", 0.9]}}, r"train.betas\[0\] must be a number"),
    ],
)
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_override_must_have_equals():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_defaults_are_valid():
    Config().validate()


@pytest.mark.slow
def test_every_recipe_loads_and_builds():
    from pathlib import Path

    from nmt.config import load_config
    from nmt.models import build_model

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/*.yaml"))
    assert len(recipes) >= 14
    for path in recipes:
        config = load_config(path)  # unknown keys would be errors
        model = build_model(config.model, 1000, 1000)
        assert sum(p.numel() for p in model.parameters()) > 0, path


def test_every_recipe_is_bound_by_updates_or_epochs_and_its_readme_names_the_budget():
    """The same number of updates on any machine; max_minutes may only be a safety limit."""
    from pathlib import Path

    from nmt.config import load_config

    for path in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/*.yaml")):
        tc = load_config(path).train
        assert tc.max_steps or tc.max_epochs, f"{path}: no train.max_steps or train.max_epochs"
        readme = (path.parent / "README.md").read_text()
        budget = f"{tc.max_steps:,} updates" if tc.max_steps else f"{tc.max_epochs} epochs"
        assert budget in readme, f"{path.parent.name}/README.md does not name {path.name}'s budget ({budget})"


@pytest.mark.parametrize("data, key", [
    ({"model": {"dropout": 1.0}}, "model.dropout"),
    ({"train": {"seed": 2**32}}, "train.seed"),
    ({"decode": {"beam": 2, "nbest": 3}}, "decode.nbest"),
    ({"decode": {"sampling": True, "topp": 0.0}}, "decode.topp"),
    ({"train": {"lr": 0}}, "train.lr"),
    ({"train": {"batch_tokens": 0}}, "train.batch_tokens"),
    ({"model": {"arch": "rnn", "embed_dim": 63, "hidden_dim": 63}}, "hidden_dim"),
    ({"train": {"word_dropout": 1.0}}, "train.word_dropout"),
    ({"pretrain": {"mask_prob": 1.0}}, "pretrain.mask_prob"),
    ({"pretrain": {"mask_prob": 0.0}}, "pretrain.mask_prob"),
])
def test_boundary_values_are_refused(data, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict(data)


def test_boundary_values_just_inside_are_accepted():
    config_from_dict({"decode": {"beam": 3, "nbest": 3}, "model": {"dropout": 0.99}, "train": {"seed": 2**32 - 1}})


def test_an_empty_section_means_its_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\ntrain:\n  lr: 0.001\n")
    config = load_config(path)
    assert config.model == Config().model and config.train.lr == 0.001


def test_an_override_value_may_hold_an_equals_sign():
    assert apply_overrides({}, ["save_dir=runs/lr=3e-4"]) == {"save_dir": "runs/lr=3e-4"}


def test_an_override_below_a_value_is_a_one_line_error():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": {"lr": 0.1}}, ["train.lr.x=1"])


def test_a_key_given_twice_in_a_config_file_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  embed_dim: 64\n  embed_dim: 32\n")  # the last would win unseen
    with pytest.raises(ConfigError, match="'embed_dim' is given twice"):
        load_config(path)
    path.write_text("model:\n  embed_dim: 64\ntrain:\n  lr: 0.002\nmodel:\n  heads: 2\n")
    with pytest.raises(ConfigError, match=r"'model' is given twice \(line 5\)"):
        load_config(path)
    path.write_text("model:\n  <<: {embed_dim: 64, heads: 2}\n  heads: 4\n")  # a merge is no repeated key
    assert (load_config(path).model.embed_dim, load_config(path).model.heads) == (64, 4)


def test_an_override_fills_a_section_left_empty_in_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\ntrain:\n")  # empty sections: YAML's null
    assert load_config(path, ["train.lr=1e-3"]).train.lr == 1e-3


def test_the_floor_of_the_learning_rate_is_not_above_its_peak():
    with pytest.raises(ConfigError, match="train.min_lr must be at most train.lr"):
        config_from_dict({"train": {"lr": 5e-4, "min_lr": 1e-2}})
    assert config_from_dict({"train": {"lr": 5e-4, "min_lr": 5e-4}}).train.min_lr == 5e-4


def test_mask_and_random_token_shares_may_add_up_to_exactly_one():
    config = config_from_dict({"pretrain": {"mask_token_prob": 0.5, "random_token_prob": 0.5}})
    assert (config.pretrain.mask_token_prob, config.pretrain.random_token_prob) == (0.5, 0.5)
    with pytest.raises(ConfigError, match="add up to at most 1"):
        config_from_dict({"pretrain": {"mask_token_prob": 0.75, "random_token_prob": 0.5}})


def test_label_smoothing_of_one_is_refused():
    """A label smoothing of 1 would train towards a uniform target."""
    with pytest.raises(ConfigError, match=r"train.label_smoothing must be in \[0, 1\)"):
        config_from_dict({"train": {"label_smoothing": 1.0}})
    assert config_from_dict({"train": {"label_smoothing": 0.99}}).train.label_smoothing == 0.99


def test_overrides_are_read_as_a_user_types_them(tmp_path):
    """`--set` values: list items checked and converted one by one (YAML 1.1 reads 3e-1 as a
    string), an empty value clears a setting, text that is not YAML stays text, and spaces
    around the key do not matter."""
    assert load_config(None, ["train.betas=[3e-1, 0.9]"]).train.betas == [0.3, 0.9]
    assert load_config(None, ["train.init="]).train.init == "" and load_config(None, ["data_dir= "]).data_dir == ""
    assert load_config(None, ["save_dir=@runs/x"]).save_dir == "@runs/x"
    assert load_config(None, ["train.lr = 0.002"]).train.lr == 0.002 and load_config(None, [" data_dir=d"]).data_dir == "d"


def test_a_config_file_of_comments_only_means_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert load_config(path) == Config()
    assert load_config(path, ["data_dir=d"]).data_dir == "d"
