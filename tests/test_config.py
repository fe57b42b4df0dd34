import pytest

from qkv.config import TrainConfig, apply_overrides, from_dict
from qkv.errors import ConfigError
from qkv.run import load_config
from tests.helpers import tiny_translation_config, write_config


def test_unknown_key_names_key_and_file(tmp_path):
    cfg = tiny_translation_config(tmp_path)
    cfg["train"]["learning_rate"] = 1.0
    path = write_config(tmp_path / "bad.yaml", cfg)
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train.*'learning_rate'"):
        load_config(path)


def test_unknown_section_and_task(tmp_path):
    cfg = tiny_translation_config(tmp_path)
    with pytest.raises(ConfigError, match="unknown section 'optim'"):
        load_config(write_config(tmp_path / "a.yaml", {**cfg, "optim": {}}))
    with pytest.raises(ConfigError, match="task must be one of"):
        load_config(write_config(tmp_path / "b.yaml", {**cfg, "task": "poetry"}))


def test_wrong_types_are_errors():
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected int"):
        from_dict(TrainConfig, {"max_steps": "many"}, where="train")
    with pytest.raises(ConfigError, match=r"train\.compile: expected bool"):
        from_dict(TrainConfig, {"compile": 1}, where="train")
    with pytest.raises(ConfigError, match=r"betas"):
        from_dict(TrainConfig, {"betas": [0.9]}, where="train")
    assert from_dict(TrainConfig, {"lr": 1}, where="train").lr == 1.0  # ints are fine for floats


def test_invalid_values_are_errors():
    with pytest.raises(ConfigError, match="schedule"):
        from_dict(TrainConfig, {"schedule": "sometimes"}, where="train")
    with pytest.raises(ConfigError, match="average_last"):
        from_dict(TrainConfig, {"average_last": 9, "keep_checkpoints": 3}, where="train")


def test_overrides_parse_yaml_values(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_translation_config(tmp_path))
    cfg = load_config(path, ["train.lr=1e-4", "model.norm_first=false", "train.betas=[0.8, 0.9]"])
    assert cfg.train.lr == 1e-4 and cfg.model.norm_first is False and cfg.train.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_config(path, ["train.nope=1"])


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("task: translation\ntrain: {lr: [1,\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_presets_load():
    for name in ("multi30k-en-de", "multi30k-de-en", "paper-base"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.task == "translation"
    paper = load_config("configs/paper-base.yaml")
    m = paper.model
    assert (m.d_model, m.n_heads, m.d_ff, m.n_encoder_layers, m.n_decoder_layers) == (512, 8, 2048, 6, 6)
    assert paper.model.norm_first is False and paper.model.positional == "sinusoidal"
    assert paper.train.betas == (0.9, 0.98) and paper.train.eps == 1e-9 and paper.train.warmup_steps == 4000
    assert paper.train.label_smoothing == 0.1 and paper.decode.beam_size == 4 and paper.decode.length_penalty == 0.6
    assert abs(paper.train.lr - (512 * 4000) ** -0.5) < 1e-7
