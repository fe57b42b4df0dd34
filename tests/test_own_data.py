"""A user's own data (issue 21, item 4): TSV columns by name or index, headerless files, a validation
split carved from the training file (seeded, logged, recorded, reused on resume), errors that name
the key to set, and the example configs of docs/own-data.md on tiny files."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from qkv.cli import main
from qkv.data.classification import read_labelled
from qkv.data.split import VALID_SPLIT, carve
from qkv.errors import DataError
from qkv.run import load_config, load_run
from qkv.tasks.classification import ClassificationData, evaluate_file
from qkv.tasks.classification import read_splits as read_labelled_splits
from qkv.tasks.translation import TranslationData, read_splits
from tests.helpers import WORDS

TINY_MT = ["model.d_model=32", "model.n_heads=4", "model.d_ff=64", "model.n_encoder_layers=1",
           "model.n_decoder_layers=1", "data.vocab_size=80", "data.max_tokens=256", "data.max_len=32",
           "train.max_steps=3", "train.warmup_steps=1", "train.eval_every=3", "train.save_every=3",
           "train.log_every=1", "data.bleu_sentences=4", "train.average_last=0"]
TINY_CLF = ["model.d_model=32", "model.n_heads=4", "model.d_ff=64", "model.n_layers=1", "model.max_len=32",
            "data.max_len=32", "data.vocab_size=80", "data.batch_size=8", "train.max_steps=3",
            "train.warmup_steps=1", "train.eval_every=3", "train.save_every=3", "train.log_every=1"]
TINY_LM = ["model.d_model=32", "model.n_heads=4", "model.n_layers=1", "model.block_size=16", "data.vocab_size=300",
           "data.batch_size=4", "data.eval_batches=2", "train.max_steps=3", "train.warmup_steps=1",
           "train.eval_every=3", "train.save_every=3", "train.log_every=1"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) for _ in range(n)]


def write_pairs(path: Path, n: int = 40, *, header: str | None = None, columns: int = 2) -> Path:
    """Tatoeba-style lines: id<TAB>src<TAB>tgt (columns=3) or src<TAB>tgt; the target is the source reversed."""
    rows = []
    for i, s in enumerate(sentences(n)):
        pair = [s, " ".join(reversed(s.split()))]
        rows.append("\t".join([str(i), *pair] if columns == 3 else pair))
    path.write_text("".join(f"{r}\n" for r in ([header] if header else []) + rows), encoding="utf-8")
    return path


def write_labelled(path: Path, n: int = 40, *, header: str | None = None) -> Path:
    """id<TAB>text<TAB>label rows: 'pos' when the text has 'dog', else 'neg'."""
    rows = [f"{i}\t{s}\t{'pos' if 'dog' in s else 'neg'}" for i, s in enumerate(sentences(n, seed=1))]
    path.write_text("".join(f"{r}\n" for r in ([header] if header else []) + rows), encoding="utf-8")
    return path


# -- the carved split ---------------------------------------------------------------------------------
def test_carve_is_seeded_shuffled_and_never_empty():
    a = carve(100, fraction=0.1, seed=1, source="x")
    assert a == carve(100, fraction=0.1, seed=1, source="x") and len(a.valid) == 10
    assert a.valid != carve(100, fraction=0.1, seed=2, source="x").valid
    assert a.valid != tuple(range(90, 100)) and list(a.valid) == sorted(a.valid)  # shuffled, kept in file order
    assert len(carve(3, fraction=0.01, seed=1, source="x").valid) == 1
    assert len(carve(3, fraction=0.99, seed=1, source="x").valid) == 2  # one row always trains
    with pytest.raises(DataError, match="x: 1 row"):
        carve(1, fraction=0.5, seed=1, source="x")


# -- translation TSVs -----------------------------------------------------------------------------------
def test_headerless_tsv_by_index_carves_validation_not_another_data_set(tmp_path, caplog):
    tsv = write_pairs(tmp_path / "pairs.tsv", columns=3)
    # data.dir points at a folder that does not exist: nothing may be read from it
    data = TranslationData(dir=str(tmp_path / "multi30k"), tsv_train=str(tsv), header=False, src_column=1,
                           tgt_column=2, valid_fraction=0.25)
    with caplog.at_level(logging.INFO, logger="qkv.data.split"):
        train, valid = read_splits(data, tmp_path / "run", seed=3, resume=False)
    assert len(train) == 30 and len(valid) == 10
    assert "10 of the 40 rows" in caplog.text and "data.valid_fraction=0.25" in caplog.text
    everything = [line.split("\t")[1:] for line in tsv.read_text().splitlines()]
    assert sorted(train.pairs + valid.pairs) == sorted(tuple(p) for p in everything)
    assert not set(train.lines) & set(valid.lines)
    record = json.loads((tmp_path / "run" / VALID_SPLIT).read_text())
    assert record["rows"] == 40 and len(record["valid"]) == 10 and record["seed"] == 3
    assert [everything[i - 1] for i in valid.lines] == [list(p) for p in valid.pairs]  # lines are the file's
    # resume: the recorded rows, even with another seed in the config
    again_train, again_valid = read_splits(data, tmp_path / "run", seed=99, resume=True)
    assert again_valid.pairs == valid.pairs and again_train.pairs == train.pairs


def test_a_changed_training_file_on_resume_is_an_error(tmp_path):
    tsv = write_pairs(tmp_path / "pairs.tsv")
    data = TranslationData(tsv_train=str(tsv), header=False, src_column=0, tgt_column=1)
    read_splits(data, tmp_path / "run", seed=1, resume=False)
    write_pairs(tsv, n=41)
    with pytest.raises(DataError, match=r"41 rows, but the validation split was carved from 40"):
        read_splits(data, tmp_path / "run", seed=1, resume=True)


def test_named_columns_with_a_header_and_a_validation_file(tmp_path):
    train = write_pairs(tmp_path / "train.tsv", header="en\tes")
    valid = write_pairs(tmp_path / "valid.tsv", n=5, header="en\tes")
    data = TranslationData(tsv_train=str(train), tsv_valid=str(valid), src_column="en", tgt_column="es")
    got_train, got_valid = read_splits(data, tmp_path / "run", seed=1, resume=False)
    assert len(got_train) == 40 and len(got_valid) == 5 and not (tmp_path / "run" / VALID_SPLIT).exists()


def test_headerless_file_with_column_names_names_the_key(tmp_path):
    tsv = write_pairs(tmp_path / "pairs.tsv")
    data = TranslationData(tsv_train=str(tsv), header=False)
    with pytest.raises(DataError, match=r"data\.src_column='src': .*pairs\.tsv is read without a header; give a "
                                        r"0-based index"):
        read_splits(data, tmp_path / "run", seed=1, resume=False)
    with pytest.raises(DataError, match=r"data\.tgt_column=5: .*pairs\.tsv has 2 columns"):
        read_splits(replace(data, src_column=0, tgt_column=5), tmp_path / "run", seed=1, resume=False)


def test_a_header_is_no_longer_required_and_the_first_pair_is_kept(tmp_path):
    tsv = write_pairs(tmp_path / "pairs.tsv", n=10)
    data = TranslationData(tsv_train=str(tsv), tsv_valid=str(tsv), header=False, src_column=0, tgt_column=1)
    train, _ = read_splits(data, tmp_path / "run", seed=1, resume=False)
    assert train.pairs[0] == tuple(tsv.read_text().splitlines()[0].split("\t")) and train.lines[0] == 1


def test_aligned_folder_with_a_dev_split_names_the_key_to_set(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, n in (("train", 20), ("dev", 4)):
        (folder / f"{split}.en").write_text("".join(f"{s}\n" for s in sentences(n)))
        (folder / f"{split}.es").write_text("".join(f"{s}\n" for s in sentences(n, seed=5)))
    data = TranslationData(dir=str(folder), src_lang="en", tgt_lang="es")
    with pytest.raises(DataError) as info:
        read_splits(data, tmp_path / "run", seed=1, resume=False)
    assert str(info.value).startswith(f"data.valid: no such file {folder / 'val.en'}; {folder} has the split dev: "
                                      "set data.valid=dev, or data.valid=null to carve")
    assert len(read_splits(replace(data, valid="dev"), tmp_path / "run", seed=1, resume=False)[1]) == 4
    train, valid = read_splits(replace(data, valid=None), tmp_path / "run", seed=1, resume=False)
    assert (len(train), len(valid)) == (19, 1)


# -- classification TSVs ----------------------------------------------------------------------------------
def test_classification_columns_by_index_headerless_and_carved(tmp_path):
    path = write_labelled(tmp_path / "rows.tsv")
    texts = read_labelled(path, label_column=2, text_column=1, header=False)
    assert len(texts) == 40 and texts.lines[0] == 1 and set(texts.label_names) == {"neg", "pos"}
    data = ClassificationData(train=str(path), valid=None, label_column=2, text_column=1, header=False,
                              valid_fraction=0.2)
    train, valid = read_labelled_splits(data, tmp_path / "run", seed=1, resume=False)
    assert (len(train), len(valid)) == (32, 8) and valid.label_names == train.label_names
    assert sorted(train.lines + valid.lines) == list(range(1, 41))
    again = read_labelled_splits(data, tmp_path / "run", seed=7, resume=True)[1]
    assert again.texts == valid.texts and again.labels == valid.labels


def test_classification_index_with_a_header_and_errors_that_name_the_key(tmp_path):
    path = write_labelled(tmp_path / "rows.tsv", header="id\tcomment\tverdict")
    texts = read_labelled(path, label_column=2, text_column="comment")
    assert len(texts) == 40 and texts.lines[0] == 2
    with pytest.raises(DataError, match=r"data\.label_column=3: .*rows\.tsv has 3 columns"):
        read_labelled(path, label_column=3, text_column=1)
    with pytest.raises(DataError, match=r"data\.text_column='comment' names a column, but the first line is not a "
                                        r"header"):
        read_labelled(path, label_column=2, text_column="comment", header=False)
    with pytest.raises(DataError, match=r"set data\.label_column and data\.text_column to 0-based indices"):
        read_labelled(path, header=False)


def test_classification_index_columns_load_from_yaml(tmp_path):
    cfg = load_config("configs/tsv-classification.yaml", ["data.label_column=2", "data.text_column=1",
                                                           "data.header=false"])
    assert (cfg.data.label_column, cfg.data.text_column, cfg.data.header, cfg.data.valid) == (2, 1, False, None)
    mt = load_config("configs/tsv-translation.yaml")
    assert (mt.data.src_column, mt.data.tgt_column, mt.data.header, mt.data.tsv_valid) == (0, 1, False, None)


# -- the example configs of docs/own-data.md, end to end on tiny files ---------------------------------------
def _sets(pairs: list[str]) -> list[str]:
    return [arg for item in pairs for arg in ("--set", item)]


def test_tsv_translation_example_trains_and_resumes(tmp_path):
    tsv = write_pairs(tmp_path / "pairs.tsv", n=60)
    run = tmp_path / "run"
    args = ["train", "configs/tsv-translation.yaml", "--out", str(run), "--quiet",
            *_sets([f"data.tsv_train={tsv}", *TINY_MT])]
    assert main(args) == 0
    record = json.loads((run / VALID_SPLIT).read_text())
    assert record["rows"] == 60 and len(record["valid"]) == 3  # 5% of 60
    assert main(["train", "configs/tsv-translation.yaml", "--out", str(run), "--resume", "--quiet",
                 *_sets([f"data.tsv_train={tsv}", *TINY_MT, "train.max_steps=4"])]) == 0
    assert json.loads((run / VALID_SPLIT).read_text()) == record


def test_tsv_classification_example_and_evaluate_on_the_carved_rows(tmp_path):
    path = write_labelled(tmp_path / "reviews.tsv", n=60, header="id\ttext\tlabel")
    run = tmp_path / "run"
    assert main(["train", "configs/tsv-classification.yaml", "--out", str(run), "--quiet",
                 *_sets([f"data.train={path}", *TINY_CLF])]) == 0
    held = json.loads((run / VALID_SPLIT).read_text())
    assert held["rows"] == 60 and len(held["valid"]) == 6
    cfg, model, artifacts = load_run(run)
    before = sorted(p.name for p in run.iterdir())
    result = evaluate_file(cfg, model, artifacts, None, run=run)
    assert result["examples"] == 6 and result["data"].endswith("reviews.tsv (carved)")
    assert sorted(p.name for p in run.iterdir()) == before  # evaluation writes nothing into the run


def test_text_lm_example_trains(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("".join(f"{s}.\n" for s in sentences(200)), encoding="utf-8")
    assert main(["train", "configs/text-lm.yaml", "--out", str(tmp_path / "run"), "--quiet",
                 *_sets([f"data.train=[{text}]", *TINY_LM])]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_every_train_command_of_the_page_loads(tmp_path):
    import shlex

    page = (Path(__file__).resolve().parents[1] / "docs" / "own-data.md").read_text(encoding="utf-8")
    commands = [line.strip() for line in page.splitlines() if line.strip().startswith("qkv train ")]
    assert len(commands) >= 6
    for command in commands:
        words = shlex.split(command)
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        cfg = load_config(words[2], sets)
        for item in sets:
            key, _, value = item.partition("=")
            section, field = key.split(".")
            assert getattr(getattr(cfg, section), field) == yaml.safe_load(value), (command, item)


def test_an_unknown_header_is_an_error_that_lists_it_and_says_how_to_choose(tmp_path):
    path = tmp_path / "eval.tsv"
    path.write_text("verdict\tcomment\npos\ta dog\nneg\ta cat\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"eval\.tsv:1: \['verdict', 'comment'\] was read as data .* 'verdict' is not "
                                        r"a label .* data\.label_column=NAME data\.text_column=NAME"):
        read_labelled(path, label_names=["neg", "pos"])
    named = read_labelled(path, label_column="verdict", text_column="comment", label_names=["neg", "pos"])
    assert named.labels == [1, 0]
