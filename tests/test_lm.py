"""Decoder-only language models end to end: data, training, evaluate and generate through the CLI."""

import json

import pytest
import torch

from qkv.cli import main
from qkv.data.lm import RandomBlocks, read_text, split_ids
from qkv.errors import DataError
from qkv.models.decoder_only import DecoderOnly, DecoderOnlyConfig
from qkv.record import AttentionRecord
from tests.helpers import write_config

TEXT = "".join(f"{name}:\nTo be, or not to be, that is the question {i}.\n\n"
               for i, name in enumerate(["HAMLET", "OPHELIA", "KING", "QUEEN"] * 40))


def lm_config(path, **model):
    return {
        "task": "lm",
        "data": {"train": [str(path)], "tokenizer": "char", "batch_size": 8, "eval_batches": 4},
        "model": {"block_size": 32, "d_model": 32, "n_heads": 4, "n_layers": 2, "dropout": 0.0, **model},
        "train": {"optimizer": "adamw", "lr": 3e-3, "schedule": "cosine", "warmup_steps": 10, "max_steps": 150,
                  "label_smoothing": 0.0, "eval_every": 150, "save_every": 150, "log_every": 50},
        "decode": {"max_new_tokens": 40, "temperature": 0.8, "top_k": 10},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    (tmp / "text.txt").write_text(TEXT, encoding="utf-8")
    path = write_config(tmp / "lm.yaml", lm_config(tmp / "text.txt"))
    assert main(["train", str(path), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp


def test_model_learns_the_text(trained, capsys):
    records = [json.loads(line) for line in (trained / "run" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["split"] == "valid"][-1]
    assert valid["loss"] < 1.2, valid  # a uniform guess over ~30 characters is 3.4 nats
    assert main(["evaluate", str(trained / "run"), "--text", str(trained / "text.txt")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "lm" and result["tokens"] > 1000
    assert result["bits_per_char"] == pytest.approx(result["loss"] / 0.6931471805599453, rel=1e-6)
    assert result["perplexity"] == pytest.approx(2.718281828459045 ** result["loss"], rel=1e-6)


def test_generate_streams_seeded_text(trained, capsys):
    args = ["generate", str(trained / "run"), "--prompt", "HAMLET:\n", "--max-new-tokens", "30", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert first.startswith("HAMLET:\n") and len(first) > len("HAMLET:\n") + 5


def test_generate_rejects_unknown_characters_and_wrong_family(trained, capsys):
    assert main(["generate", str(trained / "run"), "--prompt", "Zebra §"]) == 2
    err = capsys.readouterr().err
    assert "qkv: error:" in err and "§" in err and "Traceback" not in err
    assert main(["translate", str(trained / "run")]) == 2
    assert "language-model run (task 'lm'): it cannot translate (it can: generate" in capsys.readouterr().err


def test_bpe_tokenizer_and_rope_train(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    cfg = lm_config(tmp_path / "text.txt", positional="rope", norm="rmsnorm")
    cfg["data"].update(tokenizer="bpe", vocab_size=300)
    cfg["train"]["max_steps"] = 20
    path = write_config(tmp_path / "bpe.yaml", cfg)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    tok = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert tok["pre_tokenizer"]["type"] == "ByteLevel"


def test_separate_validation_file_and_too_short_text(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "valid.txt").write_text("HAMLET:\nshort\n", encoding="utf-8")
    cfg = lm_config(tmp_path / "train.txt")
    cfg["data"]["valid"] = str(tmp_path / "valid.txt")
    path = write_config(tmp_path / "c.yaml", cfg)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "validation text" in capsys.readouterr().err  # 15 tokens < block_size + 1


def test_random_blocks_are_deterministic_shifted_and_in_range():
    ids = torch.arange(1000)
    a = RandomBlocks(ids, block_size=16, batch_size=4, n_batches=3, seed=1, epoch=2)
    b = RandomBlocks(ids, block_size=16, batch_size=4, n_batches=3, seed=1, epoch=2)
    c = RandomBlocks(ids, block_size=16, batch_size=4, n_batches=3, seed=1, epoch=3)
    assert torch.equal(a[1]["x"], b[1]["x"]) and not torch.equal(a[1]["x"], c[1]["x"])
    assert torch.equal(a[0]["y"][:, :-1], a[0]["x"][:, 1:])
    assert a[2]["x"].shape == (4, 16) and int(a[2]["y"].max()) < 1000
    with pytest.raises(IndexError):
        a[3]


def test_split_matches_nanogpt():
    ids = torch.arange(100)
    train, valid = split_ids(ids, 0.1)
    assert torch.equal(train, ids[:90]) and torch.equal(valid, ids[90:])
    with pytest.raises(DataError, match="val_fraction"):
        split_ids(ids, 1.5)


def test_read_text_errors_name_the_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"t\.txt:3"):
        read_text(path)
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match="no text"):
        read_text(path)


@pytest.mark.parametrize("positional", ["learned", "rope", "alibi"])
def test_future_tokens_do_not_change_the_past(positional):
    model = DecoderOnly(DecoderOnlyConfig(vocab_size=20, block_size=16, d_model=32, n_heads=4, n_layers=2,
                                          dropout=0.0, positional=positional)).eval()
    x = torch.randint(3, 20, (2, 10))
    y = x.clone()
    y[:, 6:] = torch.randint(3, 20, (2, 4))
    torch.testing.assert_close(model(x)[:, :6], model(y)[:, :6])


def test_tied_embeddings_and_attention_on_request():
    model = DecoderOnly(DecoderOnlyConfig(vocab_size=20, block_size=16, d_model=32, n_heads=4, n_layers=3,
                                          dropout=0.0)).eval()
    assert model.output.weight is model.embed.weight
    x = torch.randint(3, 20, (1, 8))
    record = AttentionRecord(layers=[1])
    logits = model(x, record=record)
    attention = record.weights["decoder"]
    assert list(record.weights) == ["decoder"] and set(attention) == {1} and attention[1].shape == (1, 4, 8, 8)
    torch.testing.assert_close(logits, model(x))
    assert torch.all(attention[1].triu(1) == 0)  # causal: nothing above the diagonal


def test_a_character_outside_the_vocabulary_is_named_by_file_line_and_column():
    from qkv.data.tokenizer import CharTokenizer
    from qkv.errors import DataError
    from qkv.tasks.lm import encode_file_text

    tok = CharTokenizer.from_text("abc \n")
    assert encode_file_text(tok, "abc\ncab\n", name="held.txt") == tok.encode("abc\ncab\n")
    with pytest.raises(DataError, match=r"^held\.txt:3:2: 1 characters not in the vocabulary: '€'") as info:
        encode_file_text(tok, "abc\nab c\na€c\n", name="held.txt")
    assert "index" not in str(info.value)
