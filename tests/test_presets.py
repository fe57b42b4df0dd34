"""The presets inside the package (qkv.presets): listing, text, name-or-path resolution, config keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qkv.errors import ConfigError
from qkv.presets import PRESETS, config_keys, list_presets, preset_text, resolve_config
from qkv.run import load_config
from qkv.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_configs_folder_is_the_package_folder():
    # configs/ is a symlink to qkv/configs: one set of files, named both ways
    assert (ROOT / "configs").resolve() == PRESETS
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) == sorted(p.name for p in PRESETS.glob("*.yaml"))


def test_the_presets_are_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    package_data = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"configs/*.yaml"' in package_data


def test_list_presets_names_every_file_with_its_header_line():
    presets = dict(list_presets())
    assert set(presets) == {p.stem for p in PRESETS.glob("*.yaml")}
    assert "paper-base" in presets and "shakespeare-char" in presets
    assert presets["shakespeare-char"].startswith("Character-level GPT on Tiny Shakespeare")
    assert all(description and "\n" not in description for description in presets.values())


@pytest.mark.parametrize("name", [name for name, _ in list_presets()])
def test_every_preset_resolves_and_loads(name):
    path = resolve_config(name)
    assert path == PRESETS / f"{name}.yaml"
    assert preset_text(name) == path.read_text(encoding="utf-8")
    assert load_config(path).task in TASKS


def test_a_path_wins_over_a_preset_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("paper-base").write_text("task: lm\n")
    assert resolve_config("paper-base") == Path("paper-base")
    assert resolve_config("shakespeare-char.yaml") == PRESETS / "shakespeare-char.yaml"


def test_unknown_names_list_the_presets():
    with pytest.raises(ConfigError, match=r"'nope' is neither a config file nor a preset; presets: .*paper-base"):
        resolve_config("nope")
    with pytest.raises(ConfigError, match=r"missing/x\.yaml: config file not found .*shakespeare-char"):
        resolve_config("missing/x.yaml")
    with pytest.raises(ConfigError, match="presets: "):
        preset_text("../configs/paper-base")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_config_keys_cover_every_field_of_every_section(task):
    from qkv.config import TrainConfig

    spec = TASKS[task]
    keys = config_keys(task)
    expected = [f"{section}.{f.name}" for section, cls in (("data", spec.data_config), ("model", spec.model_config),
                                                           ("train", TrainConfig), ("decode", spec.decode_config))
                for f in dataclasses.fields(cls)]
    assert [key for key, _, _ in keys] == expected
    defaults = {key: default for key, default, _ in keys}
    assert defaults["train.seed"] == repr(TrainConfig().seed)


def test_config_keys_read_meanings_from_the_source_and_accept_a_config():
    keys = {key: (default, meaning) for key, default, meaning in config_keys("configs/shakespeare-char.yaml")}
    assert keys["train.clip_grad_norm"][0] == "0.0"
    assert keys["train.clip_grad_norm"][1].startswith("0 = no clipping")
    assert keys["data.train"][0] == "['data/input.txt']"
    translation = {key: meaning for key, _, meaning in config_keys("translation")}
    assert "TSV" in translation["data.tsv_train"]
    with pytest.raises(ConfigError, match="is not a task"):
        config_keys("no-such-task")
