"""``data.init_from: RUN_DIR``: lm and translation runs that start from another run's weights and tokenizers
(an imported GPT-2, a trained qkv run); architectures or vocabularies that differ are refused, naming the fields."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qkv
from qkv.cli import main
from qkv.errors import ConfigError
from qkv.run import from_mapping
from qkv.tasks import TASKS
from tests.bad_inputs.conftest import TEXT, lm_config
from tests.helpers import tiny_translation_config, write_config, write_copy_corpus

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory) -> Path:
    """A tiny GPT-2 with GPT-2's token layout (<|endoftext|> last), imported as a qkv run."""
    from qkv.convert import import_hf
    from tests.test_import_hf import _gpt2_tokenizer

    folder = tmp_path_factory.mktemp("gpt2")
    tok = _gpt2_tokenizer()
    end = tok.get_vocab_size() - 1
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=end + 1, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=end, eos_token_id=end)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return import_hf(folder, tmp_path_factory.mktemp("imported") / "run")


def _lm_config(tmp_path: Path, source: Path, **model) -> dict:
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    config = lm_config(tmp_path / "text.txt")
    config["data"] = {**config["data"], "init_from": str(source)}
    del config["data"]["tokenizer"]
    config["model"] = {"dropout": 0.0, **model}
    return config


def test_a_fine_tune_from_an_imported_gpt2_starts_from_its_weights_and_trains(gpt2_run, tmp_path):
    source = qkv.load(gpt2_run)
    config = _lm_config(tmp_path, gpt2_run)
    cfg = from_mapping(config, source="test")
    task = TASKS["lm"].make_task(cfg, tmp_path / "probe")
    start = task.build_model().state_dict()  # step 0
    for name, tensor in source.model.state_dict().items():
        assert torch.equal(start[name], tensor), name
    assert task.cfg.model == source.cfg.model.__class__(**{**vars(source.cfg.model), "dropout": 0.0})

    path = write_config(tmp_path / "config.yaml", config)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    tuned = qkv.load(tmp_path / "run")
    assert tuned.artifacts.special_ids == source.artifacts.special_ids  # <|endoftext|> as bos, eos and pad
    assert (tmp_path / "run" / "tokenizer.specials.json").is_file()
    changed = [n for n, t in source.model.state_dict().items() if not torch.equal(tuned.model.state_dict()[n], t)]
    assert changed  # two AdamW steps moved the weights
    assert tuned.generate(["To be"], max_new_tokens=3, temperature=0)[0].startswith("To be")


def test_a_different_architecture_or_vocabulary_is_refused_naming_the_fields(gpt2_run, tmp_path):
    config = _lm_config(tmp_path, gpt2_run, d_model=60, n_layers=3)
    config["data"]["vocab_size"] = 100
    path = write_config(tmp_path / "config.yaml", config)
    with pytest.raises(ConfigError, match=r"model\.d_model=60 \(the source has 16\), model\.n_layers=3 \(the source "
                                          r"has 1\), data\.vocab_size=100 \(the source has 301\)"):
        TASKS["lm"].make_task(from_mapping(config, source=str(path)), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("translation")
    data = write_copy_corpus(root / "data", n_train=60, n_valid=8)
    path = write_config(root / "config.yaml", tiny_translation_config(data, max_steps=2, save_every=2))
    assert main(["train", str(path), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run", data


def test_a_translation_run_starts_from_another_runs_weights_and_tokenizers(translation_run, tmp_path):
    source_dir, data = translation_run
    source = qkv.load(source_dir)
    config = tiny_translation_config(data, max_steps=2, save_every=2)
    config["data"] = {"dir": str(data), "src_lang": "src", "tgt_lang": "tgt", "max_tokens": 256, "max_len": 32,
                      "init_from": str(source_dir)}
    config["model"] = {"dropout": 0.0}
    task = TASKS["translation"].make_task(from_mapping(config, source="test"), tmp_path / "probe")
    start = task.build_model().state_dict()
    for name, tensor in source.model.state_dict().items():
        assert torch.equal(start[name], tensor), name
    path = write_config(tmp_path / "config.yaml", config)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    tuned = qkv.load(tmp_path / "run")
    assert tuned.cfg.model.d_model == source.cfg.model.d_model and tuned.cfg.model.dropout == 0.0
    assert (tmp_path / "run" / "src_tokenizer.json").read_text() == (source_dir / "src_tokenizer.json").read_text()


def test_init_from_another_task_or_no_run_is_refused(gpt2_run, translation_run, tmp_path):
    _, data = translation_run
    config = tiny_translation_config(data)
    config["data"]["init_from"] = str(gpt2_run)
    with pytest.raises(ConfigError, match=r"is a 'lm' run; a 'translation' run can start only from a 'translation'"):
        TASKS["translation"].make_task(from_mapping(config, source="test"), tmp_path / "run")
    config["data"]["init_from"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"data\.init_from=.*nowhere: no such run directory"):
        TASKS["translation"].make_task(from_mapping(config, source="test"), tmp_path / "run")
