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


# -- the real checkpoints' layouts: GPT-2's one <|endoftext|>, opus-mt's </s>=0, <unk>=1, <pad>=last ------------
def _gpt2_tokenizer():
    """Byte-level BPE with no special token but <|endoftext|>, the last id (as in GPT-2's 50257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def _opus_tokenizer():
    """A SentencePiece-style Unigram with opus-mt's ids: </s>=0, <unk>=1, <pad>=last; sources end in </s>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT, "not to be"], trainers.UnigramTrainer(
        vocab_size=60, special_tokens=["</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    tok.add_special_tokens(["<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 0)])
    return tok


@pytest.fixture(scope="module")
def real_gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real-gpt2")
    tok = _gpt2_tokenizer()
    end = tok.token_to_id("<|endoftext|>")
    assert end == tok.get_vocab_size() - 1
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                         unk_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=end + 1, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=end, eos_token_id=end)  # GPT-2's: no pad_token_id
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return folder, model, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def real_marian(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real-marian")
    tok = _opus_tokenizer()
    pad = tok.get_vocab_size() - 1
    assert (tok.token_to_id("</s>"), tok.token_to_id("<unk>"), tok.token_to_id("<pad>")) == (0, 1, pad)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                         clean_up_tokenization_spaces=False).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.MarianConfig(  # opus-mt-en-de's layout, tiny
        vocab_size=pad + 1, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        activation_function="swish", scale_embedding=True, pad_token_id=pad, eos_token_id=0, bos_token_id=0,
        decoder_start_token_id=pad, forced_eos_token_id=0)
    model = transformers.MarianMTModel(config).eval()
    model.save_pretrained(folder)
    return folder, model, transformers.AutoTokenizer.from_pretrained(folder)


def test_real_gpt2_layout_imports_with_endoftext_as_bos_eos_and_pad(real_gpt2, tmp_path, capsys):
    from qkv.data.tokenizer import TextTokenizer, specials_path
    from qkv.generate import SamplingConfig, generate_ids

    folder, hf, hf_tok = real_gpt2
    run_dir = import_hf(folder, tmp_path / "run")
    end = hf.config.eos_token_id
    assert specials_path(run_dir / "tokenizer.json").is_file()
    tok = TextTokenizer.load(run_dir / "tokenizer.json")
    assert tok.special_ids == {"pad": end, "bos": end, "eos": end, "unk": None}
    run = qkv.load(run_dir)
    assert (run.cfg.model.pad_id, run.cfg.model.bos_id, run.cfg.model.eos_id) == (end, end, end)
    prompt = SENTENCES[0]
    ids = run.artifacts.encode(prompt)
    assert ids == hf_tok(prompt).input_ids
    x = torch.tensor([ids])  # (1, T)
    with torch.no_grad():
        torch.testing.assert_close(run.model(x), hf(x).logits, atol=1e-4, rtol=0)
        # pad = eos = <|endoftext|>: qkv may generate it (and stops there, as HF does)
        theirs = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1, max_new_tokens=12,
                             pad_token_id=end)[0]
    ours = generate_ids(run.model, [ids], SamplingConfig(max_new_tokens=12, temperature=0))[0]
    new = theirs[len(ids):].tolist()
    assert ours == (new[:-1] if new and new[-1] == end else new)  # qkv's ids leave out the final eos
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == hf_tok.decode(theirs, skip_special_tokens=True)


def test_left_padding_with_pad_equal_to_eos_leaves_each_prompt_as_alone(real_gpt2, tmp_path):
    folder, _, _ = real_gpt2
    run = qkv.load(import_hf(folder, tmp_path / "run"))
    prompts = ["To be", "that is the question, or not"]
    together = run.generate(prompts, max_new_tokens=6, temperature=0)
    assert together == [run.generate([p], max_new_tokens=6, temperature=0)[0] for p in prompts]


def test_real_marian_layout_imports_swish_and_opus_special_ids(real_marian, tmp_path, capsys):
    from qkv.decode import greedy_decode

    folder, hf, hf_tok = real_marian
    pad = hf.config.pad_token_id
    run_dir = import_hf(folder, tmp_path / "run")
    run = qkv.load(run_dir)
    src_tok, tgt_tok = run.artifacts
    assert run.cfg.model.activation == "silu"
    assert tgt_tok.special_ids == {"pad": pad, "bos": pad, "eos": 0, "unk": 1}
    assert (run.cfg.model.pad_id, run.cfg.model.bos_id, run.cfg.model.eos_id) == (pad, pad, 0)
    batch = hf_tok(SENTENCES, return_tensors="pt", padding=True)  # tokens + </s>, right-padded with <pad>
    for row, sentence in zip(batch.input_ids.tolist(), SENTENCES):
        assert [t for t in row if t != pad] == src_tok.encode(sentence) + [src_tok.eos_id]
    tgt = torch.tensor([[pad] + tgt_tok.encode("not to be")] * len(SENTENCES))  # (B, T): starts at pad
    with torch.no_grad():
        theirs = hf(**batch, decoder_input_ids=tgt).logits
        torch.testing.assert_close(run.model(batch.input_ids, tgt), theirs, atol=1e-4, rtol=0)
    limits = [len(src_tok.encode(s)) + run.cfg.decode.max_len_b for s in SENTENCES]  # qkv translate's length limit
    want = []
    for i, sentence in enumerate(SENTENCES):
        one = hf_tok([sentence], return_tensors="pt")
        with torch.no_grad():  # opus-mt forces </s> at max_length; qkv's limit counts tokens without it
            out = hf.generate(**one, do_sample=False, num_beams=1, max_new_tokens=limits[i], forced_eos_token_id=None,
                              suppress_tokens=[pad])[0, 1:].tolist()
        assert greedy_decode(run.model, one.input_ids)[0] == (out[:out.index(0)] if 0 in out else out)
        want.append(hf_tok.decode(out, skip_special_tokens=True))
    assert run.translate(SENTENCES, beam=1) == want
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n")
    capsys.readouterr()
    assert main(["translate", str(run_dir), "--input", str(tmp_path / "in.txt"), "--beam", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == want


def test_a_sidecar_of_another_vocabulary_is_refused(real_gpt2, tmp_path):
    import shutil

    from qkv.errors import DataError

    run_dir = import_hf(real_gpt2[0], tmp_path / "run")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run_dir / "tokenizer.specials.json", other / "tokenizer.specials.json")
    train_bpe([TEXT], 120, byte_level=True).save(other / "tokenizer.json")
    assert (other / "tokenizer.specials.json").exists() is False  # default ids: save removes qkv's stale sidecar
    shutil.copy(run_dir / "tokenizer.specials.json", other / "tokenizer.specials.json")
    from qkv.data.tokenizer import TextTokenizer

    with pytest.raises(DataError, match=r"tokenizer.specials.json: pad is '<\|endoftext\|>' at id \d+, but the "
                                        r"tokenizer has None there"):
        TextTokenizer.load(other / "tokenizer.json")
