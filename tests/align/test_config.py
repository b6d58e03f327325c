"""align/config.py: TrainConfig validation, TOML/JSON configuration files, and the JSON form a
run directory stores (config_dict), read back unchanged."""

from __future__ import annotations

import json

import pytest

from sotalign.align.config import ConfigError, TrainConfig, build_configs, config_dict, load_config
from sotalign.data import DataSpec


def test_defaults_are_the_papers():
    """The paper's settings, with its α converted to our mass-1 KLOT units (KLOT_paper =
    n · KLOT_ours, so α = 1e-4 at its ~10k-row batches is ≈ 1 here) and the heads starting
    from the teacher (the documented departures of TrainConfig)."""
    config = TrainConfig()
    assert (config.method, config.lr, config.weight_decay, config.steps, config.out_dim) == (
        "sotalign",
        1e-4,
        1e-5,
        2000,
        1024,
    )
    assert (config.eps, config.eps_teacher, config.n_iters) == (0.05, 0.01, 100)
    assert config.alpha == pytest.approx(1e-4 * config.paired_batch_size, rel=0)
    assert config.head_init == "auto"


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(lr=-1.0), "lr must be > 0"),
        (dict(alpha=-0.1), "alpha must be >= 0"),
        (dict(method="nope"), "unknown method 'nope'"),
        (dict(steps=0), "steps must be > 0"),
        (dict(steps=10, warmup_steps=10), "warmup_steps must be < steps"),
        (dict(steps="10"), "steps must be int"),
        (dict(device="tpu"), "device must be"),
        (dict(method="structure", method_options={"lamda": 1}), "no option.*lamda"),
    ],
)
def test_bad_configuration_values_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


def test_toml_unknown_keys_and_bad_values_name_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('method = "sail"\nstepz = 10\nlearning_rate = 1\n')
    with pytest.raises(ConfigError, match=r"run\.toml: unknown option\(s\) learning_rate, stepz"):
        load_config(path)
    path.write_text("alpha = -1e-4\n")
    with pytest.raises(ConfigError, match=r"run\.toml: TrainConfig\.alpha must be >= 0"):
        load_config(path)
    path.write_text('steps = 5\n[data]\nimages = "a.npy"\ntexts = "b.npy"\nn_pairs = 10\nn_vall = 3\n')
    with pytest.raises(ConfigError, match=r"\[data\]: unknown option\(s\) n_vall"):
        load_config(path)
    path.write_text('steps = 5\n[data]\nimages = "a.npy"\ntexts = "b.npy"\nn_pairs = 10\n[method_options]\n')
    config, spec = load_config(path)
    assert config.steps == 5 and spec.n_pairs == 10 and spec.aligned
    path.write_text("steps = = 5")
    with pytest.raises(ConfigError, match=r"run\.toml: not valid TOML"):
        load_config(path)


@pytest.mark.parametrize("value", [True, "1e-3", None])
def test_field_types_are_checked_exactly(value):
    with pytest.raises(ConfigError, match="TrainConfig.lr must be"):
        TrainConfig(lr=value)


def test_integers_are_accepted_where_floats_are_expected():
    assert TrainConfig(lr=1, alpha=0).lr == 1


def test_method_applies_method_options():
    method = TrainConfig(method="structure", method_options={"weight": 2.5}).training_method()
    assert method.name == "structure" and method.weight == 2.5


def test_build_configs_without_and_with_data():
    config, spec = build_configs({"steps": 7})
    assert config.steps == 7 and spec is None
    with pytest.raises(ConfigError, match=r"cfg: \[data\] must be a table"):
        build_configs({"data": 3}, "cfg")


def test_config_dict_round_trips_through_a_json_file(tmp_path):
    config = TrainConfig(method="nnclr", method_options={"k": 3}, steps=40, head_hidden_dim=None)
    spec = DataSpec(paired_images="a.npy", paired_texts="b.npy", val_images="c.npy", val_texts="d.npy")
    stored = config_dict(config, spec)
    assert "head_hidden_dim" not in stored and "unpaired_images" not in stored["data"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(stored))
    assert load_config(path) == (config, spec)


def test_unreadable_and_invalid_json_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read"):
        load_config(tmp_path / "missing.toml")
    path = tmp_path / "config.json"
    path.write_text("{")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_config(path)
