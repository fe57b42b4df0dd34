"""The catalogue of bad inputs (issue 11): each case goes through the CLI and must end with exit
status 2 and one line ``qkv: error: ...`` that names the file and line (1-based), the config key
or the argument at fault, with no traceback. docs/reliability.md lists the same cases.

A case is ``(name, build)``: ``build(tmp, runs)`` writes what it needs under ``tmp`` and returns
``(argv, expected)``, where every string of ``expected`` must occur in the message.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from qkv.cli import main
from tests.bad_inputs.conftest import classification_config, lm_config
from tests.helpers import tiny_translation_config, write_config, write_copy_corpus


# -- builders ------------------------------------------------------------------------------------
def translation_train(tmp: Path, *, src: bytes | None = None, tgt: bytes | None = None, **changes):
    """argv to train the tiny translation config, with train.src / train.tgt replaced by raw bytes."""
    data = write_copy_corpus(tmp / "data", n_train=30, n_valid=4)
    if src is not None:
        (data / "train.src").write_bytes(src)
    if tgt is not None:
        (data / "train.tgt").write_bytes(tgt)
    cfg = tiny_translation_config(data, max_steps=1)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    return ["train", str(write_config(tmp / "c.yaml", cfg)), "--out", str(tmp / "run"), "--quiet"]


def good_lines(n: int = 30) -> list[bytes]:
    return [f"the red dog {i}".encode() for i in range(n)]


def with_line(line: bytes, at: int = 2, n: int = 30) -> bytes:
    """30 good lines with line ``at`` (0-based) replaced: the bad line is line at + 1 in messages."""
    lines = good_lines(n)
    lines[at] = line
    return b"\n".join(lines) + b"\n"


def classification_train(tmp: Path, train: str | None = None, valid: str | None = None, **data):
    cfg = classification_config(tmp)
    if train is not None:
        (tmp / "train.tsv").write_text(train, encoding="utf-8")
    if valid is not None:
        (tmp / "valid.tsv").write_text(valid, encoding="utf-8")
    cfg["data"].update(data)
    return ["train", str(write_config(tmp / "c.yaml", cfg)), "--out", str(tmp / "run"), "--quiet"]


def raw_config(tmp: Path, text: str) -> list[str]:
    path = tmp / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return ["train", str(path), "--out", str(tmp / "run"), "--quiet"]


def copy_run(runs, family: str, tmp: Path) -> Path:
    return Path(shutil.copytree(runs[family], tmp / "run"))


def weights_file(run: Path) -> Path:
    return next(run.glob("**/model.safetensors"))


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


class Boom:
    """A pickle payload: unpickling it would create the file ``Boom.marker``."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_payload(tmp, runs):
    run = copy_run(runs, "translation", tmp)
    Boom.marker = tmp / "pwned"
    for state in run.glob("**/train_state.pt"):
        state.write_bytes(pickle.dumps({"step": Boom()}))
    config = next(run.glob("config.*"))
    return ["train", str(config), "--out", str(run), "--resume", "--quiet"], ["train_state.pt"]


def lines_file(tmp: Path, data: bytes, name: str = "input.txt") -> str:
    path = tmp / name
    path.write_bytes(data)
    return str(path)


# -- the cases -------------------------------------------------------------------------------------
UTF16 = "the red dog\n".encode("utf-16")
CASES = {
    # text files (a parallel corpus)
    "empty_file": lambda t, r: (translation_train(t, src=b""), ["train.src", "empty"]),
    "empty_line": lambda t, r: (translation_train(t, src=with_line(b"")), ["train.src:3", "empty line"]),
    "whitespace_line": lambda t, r: (translation_train(t, src=with_line(b"  \t ")), ["train.src:3", "whitespace"]),
    "bad_utf8": lambda t, r: (translation_train(t, src=with_line(b"the \xff\xfe dog")), ["train.src:3", "UTF-8"]),
    "latin1_file": lambda t, r: (translation_train(t, src=with_line("caf\u00e9 au lait".encode("latin-1"), at=6)),
                                 ["train.src:7", "UTF-8"]),
    "utf16_bom": lambda t, r: (translation_train(t, src=UTF16), ["train.src:1", "UTF-16"]),
    "lone_cr": lambda t, r: (translation_train(t, src=with_line(b"the red\rdog", at=4)), ["train.src:5", "carriage"]),
    "old_mac_line_ends": lambda t, r: (translation_train(t, src=b"\r".join(good_lines()) + b"\r"),
                                       ["train.src:1", "carriage"]),
    "line_separator": lambda t, r: (translation_train(t, tgt=with_line("the red\u2028dog".encode(), at=9)),
                                    ["train.tgt:10", "U+2028"]),
    "nul_byte": lambda t, r: (translation_train(t, src=with_line(b"the\x00dog", at=1)), ["train.src:2", "NUL"]),
    "ten_mb_line": lambda t, r: (translation_train(t, src=with_line(b"dog " * 2_600_000, at=3)), ["train.src:4"]),
    "misaligned": lambda t, r: (translation_train(t, src=b"\n".join(good_lines(29)) + b"\n"),
                                ["train.src", "train.tgt", "29", "30"]),
    "missing_file": lambda t, r: (translation_train(t, src=b"x\n") + ["--set", "data.src_lang=xx"], ["train.xx"]),
    # labelled files
    "tsv_missing_column": lambda t, r: (classification_train(t, train="label\ttext\npos\tgood one\nneg\n"),
                                        ["train.tsv:3"]),
    "tsv_extra_column": lambda t, r: (classification_train(t, train="label\ttext\npos\tgood\tone\nneg\tbad one\n"),
                                      ["train.tsv:2"]),
    "unknown_label": lambda t, r: (classification_train(t, valid="label\ttext\npos\tgood\nmaybe\tso so\n"),
                                   ["valid.tsv:3", "maybe"]),
    "missing_header_column": lambda t, r: (classification_train(t, label_column="sentiment"),
                                           ["train.tsv:1", "sentiment"]),
    "empty_label": lambda t, r: (classification_train(t, train="label\ttext\npos\tgood one\n\tbad one\n"),
                                 ["train.tsv:3"]),
    "header_only": lambda t, r: (classification_train(t, train="label\ttext\n"), ["train.tsv"]),
    # configs
    "unknown_key": lambda t, r: (translation_train(t, model__d_modle=32), ["d_modle"]),
    "unknown_section": lambda t, r: (raw_config(t, "task: lm\nmodle: {}\n"), ["modle"]),
    "wrong_type": lambda t, r: (translation_train(t, train__lr="fast"), ["train.lr"]),
    "wrong_type_list": lambda t, r: (translation_train(t, train__betas=0.9), ["train.betas"]),
    "bad_value": lambda t, r: (translation_train(t, train__max_steps=0), ["train.max_steps"]),
    "heads_do_not_divide": lambda t, r: (translation_train(t, model__n_heads=5), ["n_heads"]),
    "unknown_task": lambda t, r: (raw_config(t, "task: summarise\n"), ["summarise"]),
    "family_mismatch": lambda t, r: (raw_config(t, json.dumps({**lm_config(t / "x.txt"), "task": "translation"})),
                                     ["c.yaml", "data", "unknown key"]),
    "yaml_syntax": lambda t, r: (raw_config(t, "task: lm\ndata: {train: [a.txt\n"), ["c.yaml"]),
    "config_not_a_mapping": lambda t, r: (raw_config(t, "- 1\n- 2\n"), ["c.yaml"]),
    "missing_config": lambda t, r: (["train", str(t / "nope.yaml")], ["nope.yaml"]),
    "set_unknown_key": lambda t, r: (translation_train(t) + ["--set", "train.speed=3"], ["train", "'speed'"]),
    "set_without_equals": lambda t, r: (translation_train(t) + ["--set", "train.lr"], ["--set", "train.lr"]),
    "set_bad_value": lambda t, r: (translation_train(t) + ["--set", "train.max_steps=many"], ["train.max_steps"]),
    # run directories and checkpoints
    "not_a_run_dir": lambda t, r: (["translate", str(t), "--input", lines_file(t, b"a\n")], [str(t)]),
    "missing_run_dir": lambda t, r: (["generate", str(t / "nowhere")], ["nowhere"]),
    "other_family": lambda t, r: (["generate", str(r["translation"])], ["translation"]),
    "other_family_translate": lambda t, r: (["translate", str(r["lm"]), "--input", lines_file(t, b"a\n")], ["lm"]),
    "truncated_safetensors": lambda t, r: (["generate", str(_truncated(copy_run(r, "lm", t)))],
                                           ["model.safetensors"]),
    "malformed_safetensors_header": lambda t, r: (
        ["classify", str(_malformed(copy_run(r, "classification", t))), "--input", lines_file(t, b"good\n")],
        ["model.safetensors"]),
    "pickle_payload": pickle_payload,
    "missing_tokenizer": lambda t, r: (["translate", str(_without_tokenizer(copy_run(r, "translation", t))),
                                        "--input", lines_file(t, b"a\n")], ["tokenizer"]),
    "corrupt_run_config": lambda t, r: (["generate", str(_corrupt_config(copy_run(r, "lm", t)))], ["config"]),
    # images
    "corrupt_image": lambda t, r: (["classify", str(r["image"]), "--image",
                                    str(_file(t, "digit.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40))], ["digit.png"]),
    "not_an_image": lambda t, r: (["classify", str(r["image"]), "--image", str(_file(t, "notes.png", b"hello"))],
                                  ["notes.png"]),
    "missing_image": lambda t, r: (["classify", str(r["image"]), "--image", str(t / "gone.png")], ["gone.png"]),
    "wrong_size_image_rejected": lambda t, r: (_image_train(t, _png(t, (12, 9)), resize=False), ["12x9"]),
    "wrong_channels_image_rejected": lambda t, r: (_image_train(t, _png(t, (8, 8), mode="RGB"), resize=False),
                                                   ["channel"]),
    "npz_without_labels": lambda t, r: (_npz_train(t, x=_pixels(10)), ["images.npz", "'y'"]),
    "npz_misaligned": lambda t, r: (_npz_train(t, x=_pixels(10), y=[0] * 9), ["images.npz", "y must have shape"]),
    "npz_float_pixels_out_of_range": lambda t, r: (_npz_train(t, x=_pixels(10) * 3.0, y=[0, 1] * 5),
                                                   ["images.npz", "[0, 1]"]),
    "image_folder_without_classes": lambda t, r: (["evaluate", str(r["image"]), "--data", str(_dir(t, "empty"))],
                                                  ["empty", "class subfolders"]),
    "image_on_text_run": lambda t, r: (["classify", str(r["classification"]), "--image", str(_png(t, (8, 8)))],
                                       ["image"]),
    "ensemble_of_another_task": lambda t, r: (["evaluate", str(r["image"]), "--ensemble", str(r["classification"])],
                                              ["'classification' run"]),
    "ensemble_run_missing": lambda t, r: (["evaluate", str(r["image"]), "--ensemble", str(t / "gone-run")],
                                          ["gone-run"]),
    "tta_on_text_run": lambda t, r: (["classify", str(r["classification"]), "--tta", "--input",
                                      lines_file(t, b"good\n")], ["--tta"]),
    # inputs at inference
    "prompt_outside_vocab": lambda t, r: (["generate", str(r["lm"]), "--prompt", "\u6c34"], ["--prompt", "\u6c34"]),
    "bad_top_p": lambda t, r: (["generate", str(r["lm"]), "--top-p", "1.5"], ["--top-p"]),
    "negative_max_new_tokens": lambda t, r: (["generate", str(r["lm"]), "--max-new-tokens", "-1"],
                                             ["--max-new-tokens"]),
    "bad_temperature": lambda t, r: (["generate", str(r["lm"]), "--temperature", "-1"], ["--temperature"]),
    "beam_zero": lambda t, r: (["translate", str(r["translation"]), "--beam", "0", "--input",
                                lines_file(t, b"a\n")], ["--beam"]),
    "input_bad_utf8": lambda t, r: (["classify", str(r["classification"]), "--input",
                                     lines_file(t, b"good\n\xe9t\xe9\n")], ["input.txt:2"]),
    "input_missing": lambda t, r: (["classify", str(r["classification"]), "--input", str(t / "gone.txt")],
                                   ["gone.txt"]),
    "input_too_long": lambda t, r: (["translate", str(_learned_positions_run(t)), "--input",
                                     lines_file(t, b"the red dog\n" + b"dog " * 600 + b"\n")], ["input.txt:2"]),
    "evaluate_without_reference": lambda t, r: (["evaluate", str(r["translation"]), "--src", lines_file(t, b"a\n")],
                                                ["--ref"]),
    "evaluate_misaligned": lambda t, r: (["evaluate", str(r["translation"]), "--src", lines_file(t, b"a\nb\n", "s"),
                                          "--ref", lines_file(t, b"a\n", "r")], ["2", "1"]),
    "embed_output_under_a_file": lambda t, r: (["embed", str(r["classification"]), "--input",
                                                lines_file(t, b"good\n"), "--output",
                                                str(Path(lines_file(t, b"x", "plain")) / "e.npy")], ["e.npy"]),
    "unavailable_device": lambda t, r: (["generate", str(r["lm"]), "--device", "cuda:7"], ["--device"])
    if not torch.cuda.is_available() else (["generate", str(r["lm"]), "--device", "nonsense"], ["--device"]),
    "zero_threads": lambda t, r: (translation_train(t) + ["--threads", "0"], ["--threads"]),
}


def _file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _dir(tmp: Path, name: str) -> Path:
    (tmp / name).mkdir()
    return tmp / name


def _png(tmp: Path, size: tuple[int, int], *, mode: str = "L") -> Path:
    from PIL import Image

    path = tmp / f"img_{size[0]}x{size[1]}_{mode}.png"
    Image.new(mode, size).save(path)
    return path


def _pixels(n: int):
    import numpy as np

    return np.random.default_rng(0).random((n, 8, 8))


def _npz_train(tmp: Path, **arrays) -> list[str]:
    import numpy as np

    from tests.bad_inputs.conftest import image_config

    cfg = image_config(tmp / "ok.npz")
    np.savez(tmp / "images.npz", **{k: np.asarray(v) for k, v in arrays.items()})
    cfg["data"]["source"] = str(tmp / "images.npz")
    return ["train", str(write_config(tmp / "c.yaml", cfg)), "--out", str(tmp / "run"), "--quiet"]


def _image_train(tmp: Path, odd_one: Path, *, resize: bool) -> list[str]:
    """A folder of 8x8 grey PNGs in classes a/ and b/, plus ``odd_one`` in class a/."""
    from tests.bad_inputs.conftest import image_config

    for label in ("a", "b"):
        (tmp / "imgs" / label).mkdir(parents=True)
        for i in range(6):
            _png(tmp, (8, 8)).rename(tmp / "imgs" / label / f"{i}.png")
    odd_one.rename(tmp / "imgs" / "a" / odd_one.name)
    cfg = image_config(tmp / "ok.npz")
    cfg["data"].update(source=str(tmp / "imgs"), resize=resize)
    return ["train", str(write_config(tmp / "c.yaml", cfg)), "--out", str(tmp / "run"), "--quiet"]


def _learned_positions_run(tmp: Path) -> Path:
    """A translation run whose positions stop at model.max_len = 512 (learned embeddings)."""
    argv = translation_train(tmp, model__positional="learned")
    assert main(argv) == 0
    return tmp / "run"


def _truncated(run: Path) -> Path:
    truncate(weights_file(run))
    return run


def _malformed(run: Path) -> Path:
    path = weights_file(run)
    data = path.read_bytes()
    path.write_bytes((len(data)).to_bytes(8, "little") + b"{not json" + data[20:])  # header length past the end
    return run


def _without_tokenizer(run: Path) -> Path:
    found = [p for p in run.iterdir() if "token" in p.name or p.name.startswith("vocab")]
    assert found, list(run.iterdir())
    for p in found:
        p.unlink()
    return run


def _corrupt_config(run: Path) -> Path:
    for p in run.glob("config.*"):
        p.write_text("{ this is not", encoding="utf-8")
    return run


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, runs, tmp_path, capsys):
    argv, expected = CASES[name](tmp_path, runs)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}; stderr: {err}"
    assert err.startswith("qkv: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for piece in expected:
        assert piece in err, f"{piece!r} not in {err!r}"
    if name == "pickle_payload":
        assert not (tmp_path / "pwned").exists(), "the pickle payload ran"


# -- inputs that are not errors: what qkv does instead, documented in docs/reliability.md ------------
def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    """A UTF-8 byte-order mark is dropped and CRLF line ends read as LF (Windows editors write both)."""
    lines = good_lines()
    src = b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n"
    assert main(translation_train(tmp_path, src=src)) == 0


def test_over_long_texts_are_truncated_for_classification(runs, tmp_path, capsys):
    """Classifiers read the first data.max_len tokens, as BERT tools do (and say so in the log)."""
    long = " ".join(["good"] * 200).encode()
    assert main(["classify", str(runs["classification"]), "--input", lines_file(tmp_path, long + b"\n")]) == 0
    label, probability = capsys.readouterr().out.strip().split("\t")
    assert label in ("pos", "neg") and 0.0 <= float(probability) <= 1.0


def test_long_inputs_extend_sinusoidal_positions(runs, tmp_path, capsys):
    """Sinusoidal (and RoPE, ALiBi) positions have no table to run off: a line 3x longer than any in training
    (data.max_len 32 here, the position table's size) still translates; 4x is the refusal limit
    (test_translation_cli.py::test_a_source_far_longer_than_training_is_refused_naming_its_line)."""
    assert main(["translate", str(runs["translation"]), "--beam", "1", "--input",
                 lines_file(tmp_path, b"dog " * 100 + b"\n")]) == 0
    assert capsys.readouterr().out.count("\n") == 1


def test_catalogue_is_large_enough():
    assert len(CASES) >= 40
