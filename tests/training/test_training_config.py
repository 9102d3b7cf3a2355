"""Training recipes: YAML and overrides build typed configs; typos and wrong types are named errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llada.training.config import TrainConfig, config_to_dict, load_config


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_overrides_and_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path, {"objective": "sft", "steps": 50, "data": {"path": "d", "seq_len": 64},
                            "optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "model": {"overrides": {"n_layers": 1}}})
    config = load_config(path, ["optim.lr=3e-4", "steps=20", "model.preset=small", "micro_batch_size=4"])
    assert isinstance(config, TrainConfig)
    assert (config.objective, config.steps, config.optim.lr, config.optim.betas) == ("sft", 20, 3e-4, (0.9, 0.99))
    assert config.model.preset == "small" and config.model.overrides == {"n_layers": 1}
    again = load_config(write(tmp_path, config_to_dict(config)))
    assert again == config


@pytest.mark.parametrize("data,message", [
    ({"stepz": 3, "data": {"path": "d"}}, "unknown config key stepz"),
    ({"data": {"path": "d", "seqlen": 3}}, "unknown config key data.seqlen"),
    ({"steps": "many", "data": {"path": "d"}}, "steps: expected int"),
    ({"objective": "rl", "data": {"path": "d"}}, "objective: 'rl' is not one of"),
    ({"optim": {"betas": [0.9]}, "data": {"path": "d"}}, "optim.betas"),
    ({}, "data.path is required"),
    ({"data": {"path": "d"}, "batch_size": 6, "micro_batch_size": 4}, "multiple of micro_batch_size"),
    ({"data": {"path": "d"}, "save_every": -1}, "save_every must be >= 0"),
    ({"data": {"path": "d"}, "optim": {"warmup_steps": -3}}, "optim.warmup_steps must be >= 0, got -3"),
    ({"data": {"path": "d"}, "optim": {"lr": 0}}, "optim.lr must be positive"),
    ({"data": {"path": "d"}, "log_every": 0}, "log_every must be >= 1"),
    ({"data": {"path": "d"}, "model": {"overrides": {"d_modle": 64}}}, "model.overrides: unknown field 'd_modle'"),
])
def test_errors_name_the_key(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path, data))


def test_bad_override_and_yaml(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["steps"])
    path = tmp_path / "broken.yaml"
    path.write_text("steps: [1,\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("recipe", sorted(Path(__file__).parents[2].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe: Path) -> None:
    assert load_config(recipe).steps > 0
