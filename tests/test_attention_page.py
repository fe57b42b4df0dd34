"""The attention page (qkv.attention_page), the PNG pictures (qkv.viz) and `qkv attention` / `qkv plot`."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from qkv.attention_maps import AttentionGroup, AttentionSet
from qkv.attention_page import encode_matrix, page_data, page_html, write_page
from qkv.cli import main
from qkv.data.tokenizer import TextTokenizer
from qkv.viz import bin_tokens, plot_attention, plot_training, readable
from tests.helpers import tiny_translation_config, write_config, write_copy_corpus


def random_weights(H, T, S, seed=0):
    return torch.softmax(torch.randn(H, T, S, generator=torch.Generator().manual_seed(seed)) * 3, dim=-1)


def synthetic(T=6, S=5, layers=2, heads=3, labels=None) -> AttentionSet:
    queries = labels or [f"q{i}" for i in range(T)]
    keys = [f"k{j}" for j in range(S)]
    return AttentionSet("synthetic", [
        AttentionGroup("encoder", keys, keys, {i: random_weights(heads, S, S, i) for i in range(layers)}),
        AttentionGroup("cross", queries, keys, {i: random_weights(heads, T, S, 10 + i) for i in range(layers)})])


def decode(entry: dict, T: int, S: int) -> np.ndarray:
    """The page's decoding of one matrix, in Python."""
    val = np.frombuffer(base64.b64decode(entry["val"]), dtype="<u2").astype(np.float64) / 65535
    if entry["idx"] is None:
        return val.reshape(T, S)
    idx = np.frombuffer(base64.b64decode(entry["idx"]), dtype="<u2").reshape(T, entry["k"])
    out = np.zeros((T, S))
    np.put_along_axis(out, idx, val.reshape(T, entry["k"]), axis=1)
    return out


def test_small_matrices_are_stored_whole_to_16_bits():
    w = random_weights(1, 7, 9)[0]
    entry = encode_matrix(w, 64)
    assert entry["idx"] is None
    np.testing.assert_allclose(decode(entry, 7, 9), w.numpy(), atol=1 / 65535)


def test_long_rows_keep_their_largest_weights():
    w = random_weights(1, 50, 300)[0]
    entry = encode_matrix(w, 20)
    got = decode(entry, 50, 300)
    top = torch.topk(w, 20, dim=-1)
    np.testing.assert_allclose(np.take_along_axis(got, top.indices.numpy(), 1), top.values.numpy(), atol=1 / 65535)
    assert (got > 0).sum(axis=1).max() <= 20


def test_page_data_holds_every_group_layer_and_head():
    aset = synthetic()
    data = page_data(aset)
    assert [g["kind"] for g in data["groups"]] == ["encoder", "cross"]
    cross = data["groups"][1]
    assert cross["layers"] == [0, 1] and cross["heads"] == 3 and cross["queries"][0] == "q0"
    np.testing.assert_allclose(decode(cross["maps"]["1"][2], 6, 5), aset.groups[1].layers[1][2].numpy(),
                               atol=1 / 65535)


def test_page_is_self_contained_and_safe_from_its_labels(tmp_path):
    aset = synthetic(labels=["</script>", "<!--", "a\"b", "é", "\n", "x"])
    text = write_page(aset, tmp_path / "p.html").read_text(encoding="utf-8")
    assert text.count("</script>") == 2  # the two tags of the page itself, none from the data
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)  # nothing fetched at view time
    assert "http://" not in text and "https://" not in text
    data = json.loads(re.search(r'<script type="application/json" id="qkv-data">(.*?)</script>', text, re.S).group(1))
    assert data["groups"][1]["queries"][:3] == ["</script>", "<!--", "a\"b"]


def test_a_thousand_tokens_make_a_page_of_a_few_megabytes():
    labels = [f"t{i}" for i in range(1000)]
    w = {i: random_weights(4, 1000, 1000, i) for i in range(4)}
    aset = AttentionSet("long", [AttentionGroup("decoder", labels, labels, w)])
    html = page_html(aset)
    assert len(html) < 12e6
    data = page_data(aset)
    assert 16 <= data["groups"][0]["kept"] < 1000 and "long input" in data["notes"][-1]


def test_image_goes_into_the_page_as_a_data_url():
    labels = ["[class]"] + [f"({r},{c})" for r in range(2) for c in range(2)]
    group = AttentionGroup("encoder", labels, labels, {0: random_weights(2, 5, 5)}, grid=(2, 2), n_special=1)
    data = page_data(AttentionSet("img", [group], image=torch.rand(1, 8, 8)))
    assert data["image"].startswith("data:image/png;base64,") and data["groups"][0]["grid"] == [2, 2]


def test_binning_keeps_rows_distributions_and_labels():
    w = random_weights(2, 1000, 1000)
    binned, queries, keys, note = bin_tokens(w, [f"t{i}" for i in range(1000)], [f"t{i}" for i in range(1000)], 96)
    assert binned.shape == (2, 91, 91) and queries[1] == "11:t11" and "11 queries x 11 keys" in note
    torch.testing.assert_close(binned.sum(-1), torch.ones(2, 91))
    torch.testing.assert_close(binned[0, 0, 0], w[0, :11, :11].sum(-1).mean())
    same = bin_tokens(w[:, :5, :5], list("abcde"), list("abcde"), 96)
    assert same[3] == "" and same[1] == list("abcde")


def test_labels_are_safe_for_matplotlib():
    assert readable("$x$") == r"\$x\$" and readable(" ") == "␣" and readable("\n") == "\\n"


@pytest.mark.parametrize("head", [None, 1])
def test_png_for_a_thousand_tokens(tmp_path, head):
    labels = [f"t{i}" for i in range(1000)]
    aset = AttentionSet("long", [AttentionGroup("decoder", labels, labels, {3: random_weights(2, 1000, 1000)})])
    path = plot_attention(aset, tmp_path / "a.png", head=head)
    width, height = Image.open(path).size
    assert 300 < width < 4000 and 300 < height < 4000


def test_png_options_are_checked(tmp_path):
    aset = synthetic()
    plot_attention(aset, tmp_path / "cross.png", layer=0)
    with pytest.raises(ValueError, match="layer 5 was not collected"):
        plot_attention(aset, tmp_path / "x.png", layer=5)
    with pytest.raises(ValueError, match="head 3 does not exist"):
        plot_attention(aset, tmp_path / "x.png", head=3)


def test_training_curves_draw_all_three_panels(tmp_path):
    records = [{"step": s, "split": "train", "loss": 3 / s, "lr": 1e-3 * s} for s in range(1, 5)]
    records.append({"step": 4, "split": "valid", "loss": 1.0, "bleu": 12.0})
    assert Image.open(plot_training(records, tmp_path / "c.png")).size[0] > 800


# -- the commands, on tiny runs trained here ---------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("att")
    data = write_copy_corpus(root / "data", n_train=40, n_valid=4)
    config = tiny_translation_config(data, max_steps=2, save_every=2)
    assert main(["train", str(write_config(root / "tr.yaml", config)), "--out", str(root / "tr"), "--quiet",
                 "--threads", "1"]) == 0
    (root / "text.txt").write_text("the red dog runs on the ball and the cat sits under the house. " * 200)
    lm = {"task": "lm", "data": {"train": [str(root / "text.txt")], "tokenizer": "char", "batch_size": 4,
                                 "eval_batches": 1},
          "model": {"block_size": 1024, "d_model": 16, "n_heads": 2, "n_layers": 2, "dropout": 0.0},
          "train": {"max_steps": 1, "eval_every": 100, "save_every": 1, "log_every": 1}}
    assert main(["train", str(write_config(root / "lm.yaml", lm)), "--out", str(root / "lm"), "--quiet",
                 "--threads", "1"]) == 0
    return root


def test_translation_alignment_png_and_page(runs, capsys):
    capsys.readouterr()
    out = runs / "align.png"
    assert main(["attention", str(runs / "tr"), "--text", "the red dog", "--out", str(out), "--head", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["attention"]) == {"encoder", "decoder", "cross"}
    source = len(TextTokenizer.load(runs / "tr" / "src_tokenizer.json").encode("the red dog")) + 1  # and </s>
    assert report["attention"]["cross"]["keys"] == report["attention"]["encoder"]["queries"] == source
    assert Image.open(out).size[0] > 200
    page = runs / "tr.html"
    assert main(["attention", str(runs / "tr"), "--text", "the red dog", "--out", str(page), "--layer", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["attention"]["cross"]["layers"] == [0]
    assert "cross-attention" in page.read_text(encoding="utf-8")


def test_lm_on_a_thousand_characters(runs, capsys):
    text = ("the red dog runs on the ball. " * 40)[:1000]
    for out in ("lm.png", "lm.html"):
        assert main(["attention", str(runs / "lm"), "--text", text, "--out", str(runs / out)]) == 0
        assert json.loads(capsys.readouterr().out)["attention"]["decoder"]["queries"] == 1000


def test_plot_command(runs, capsys):
    assert main(["plot", str(runs / "tr")]) == 0
    assert json.loads(capsys.readouterr().out)["out"].endswith("curves.png")
    assert (runs / "tr" / "curves.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--text", "the", "--out", "x.txt"], "write a .png picture or an .html page"),
    (["--out", "x.png"], "needs one input"),
    (["--image", "x.png", "--out", "x.html"], "needs an image run"),
    (["--text", "  ", "--out", "x.png"], "--text is empty"),
    (["--text", "the", "--out", "x.png", "--kind", "decoder", "--layer", "3"], "layers [3], but the stack has 1"),
    (["--text", "the", "--out", "x.png", "--head", "9"], "head 9 does not exist"),
])
def test_attention_command_errors_are_one_line(runs, capsys, args, message):
    capsys.readouterr()
    assert main(["attention", str(runs / "tr"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv: error:") and message in err and "Traceback" not in err


def test_plot_command_without_metrics(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
