"""Importing Hugging Face GPT-2 and Marian folders into qkv runs (qkv.convert.import_hf).

Randomly initialised HF models saved to a temp folder (no hub access here) with qkv-layout
tokenizers: the imported run's logits equal transformers' within 1e-4, and its greedy tokens
equal HF generate's (do_sample=False, num_beams=1); ``qkv generate`` / ``qkv translate`` run on it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qkv
from qkv.cli import main
from qkv.convert import import_hf, resolve_hf
from qkv.data.tokenizer import train_bpe
from qkv.errors import CheckpointError
from tests.bad_inputs.conftest import TEXT

transformers = pytest.importorskip("transformers")
SENTENCES = ["To be, or not", "that is the question"]


def _tokenizer(folder: Path, *, byte_level: bool):
    tok = train_bpe([TEXT], 120, byte_level=byte_level)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(folder / "tokenizer.json")
    return tok


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("gpt2")
    tok = _tokenizer(folder, byte_level=True)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     activation_function="gelu_new", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def marian(tmp_path_factory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("marian")
    tok = _tokenizer(folder, byte_level=False)
    torch.manual_seed(0)
    config = transformers.MarianConfig(
        vocab_size=tok.vocab_size, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        activation_function="relu", scale_embedding=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, forced_eos_token_id=None)
    model = transformers.MarianMTModel(config).eval()
    model.save_pretrained(folder)
    return folder, model


def test_gpt2_import_gives_transformers_logits_and_greedy_tokens(gpt2, tmp_path, capsys):
    folder, hf = gpt2
    run_dir = import_hf(folder, tmp_path / "run")
    run = qkv.load(run_dir)
    assert run.kind == "language-model" and run.cfg.model.activation == "gelu_tanh"
    ids = run.artifacts.encode(SENTENCES[0])
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(run.model(x), hf(x).logits, atol=1e-4, rtol=0)
        generated = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                                max_new_tokens=10, suppress_tokens=[0])[0, len(ids):].tolist()
    assert run.generate(SENTENCES[:1], max_new_tokens=10, temperature=0) == [
        SENTENCES[0] + run.artifacts.decode(generated)]
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", SENTENCES[0], "--max-new-tokens", "10",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == SENTENCES[0] + run.artifacts.decode(generated)


def test_marian_import_gives_transformers_logits_and_greedy_tokens(marian, tmp_path):
    from qkv.decode import greedy_decode

    folder, hf = marian
    run = qkv.load(import_hf(folder, tmp_path / "run"))
    src_tok, tgt_tok = run.artifacts
    assert run.kind == "translation" and src_tok is not None
    ids = [src_tok.encode(s) + [src_tok.eos_id] for s in SENTENCES]
    width = max(map(len, ids))
    src = torch.tensor([i + [0] * (width - len(i)) for i in ids])  # (B, S)
    tgt = torch.tensor([[1] + tgt_tok.encode("not to be")] * len(ids))  # (B, T)
    with torch.no_grad():
        theirs = hf(input_ids=src, attention_mask=src != 0, decoder_input_ids=tgt).logits
        torch.testing.assert_close(run.model(src, tgt), theirs, atol=1e-4, rtol=0)
        generated = hf.generate(input_ids=src, attention_mask=src != 0, do_sample=False, num_beams=1,
                                max_new_tokens=8, suppress_tokens=[0, 1])  # qkv never emits pad or bos
    for row, want in zip(generated.tolist(), greedy_decode(run.model, src, max_len=8)):
        row = row[1:]
        assert (row[:row.index(2)] if 2 in row else row) == want
    assert len(run.translate(SENTENCES, beam=2)) == 2


def test_export_then_import_is_the_same_marian(marian, tmp_path):
    folder, _ = marian
    run = qkv.load(import_hf(folder, tmp_path / "run"))
    run.export("hf", tmp_path / "hf")
    again = qkv.load(import_hf(tmp_path / "hf", tmp_path / "again"))
    for (name, a), b in zip(run.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_unsupported_folders_are_refused_naming_the_field(marian, gpt2, tmp_path):
    import json
    import shutil

    folder = tmp_path / "tanh"
    shutil.copytree(marian[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "activation_function": "tanh"}))
    with pytest.raises(CheckpointError, match=r"activation_function=.tanh. is not supported"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(CheckpointError, match=r"model_type='t5': import_hf reads 'gpt2' and 'marian'"):
        import_hf(folder, tmp_path / "out")
    folder = tmp_path / "gpt2-no-tokenizer"
    shutil.copytree(gpt2[0], folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer.json: not found"):
        import_hf(folder, tmp_path / "out")


def test_hub_ids_resolve_through_the_local_cache_only(gpt2, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"someone/tiny-gpt2: not a folder, and not in the local Hugging "
                                              r"Face cache .*huggingface-cli download someone/tiny-gpt2"):
        resolve_hf("someone/tiny-gpt2")
    repo = tmp_path / "cache" / "models--someone--tiny-gpt2"
    commit = "0" * 40
    shutil.copytree(gpt2[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_hf("someone/tiny-gpt2") == repo / "snapshots" / commit
    assert qkv.load(import_hf("someone/tiny-gpt2", tmp_path / "run")).kind == "language-model"
