"""One CLI (issue 21 items 2-3): the global flags on every verb, before or after it; one spelling for
the output path; defaults in help; --version; progress that reads well outside a terminal (plain
lines, no carriage returns) and in the task's unit; several prompts in one batch; column choices."""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qkv import commands, progress
from qkv.cli import build_parser, main
from tests.bad_inputs.conftest import classification_config
from tests.helpers import write_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
GLOBAL = ("--threads", "--device", "--quiet", "--debug", "--verbose")


def verbs() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("verb", sorted(verbs()))
def test_every_verb_takes_the_global_flags_and_spells_its_output_one_way(verb):
    options = flags(verbs()[verb])
    assert set(GLOBAL) <= set(options), verb
    assert "--out" not in options or options["--out"] is options["--output"], verb  # --out: the alias


def test_global_flags_after_the_verb_override_those_before_it():
    args = build_parser().parse_args(["--threads", "3", "plot", "r", "--device", "cuda:1", "--quiet"])
    assert (args.threads, args.device, args.quiet) == (3, "cuda:1", True)
    args = build_parser().parse_args(["--threads", "3", "plot", "r", "--threads", "2"])
    assert args.threads == 2
    args = build_parser().parse_args(["plot", "r"])
    assert (args.threads, args.device, args.quiet, args.debug) == (None, None, False, False)
    assert build_parser().parse_args(["attention", "r", "--out", "a.png"]).output == "a.png"


def test_help_shows_defaults_and_version(capsys):
    assert main(["cv", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 5)" in out and "(default: 1)" in out  # --folds, --jobs
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("qkv ")


def test_bad_threads_names_the_flag(capsys):
    assert main(["plot", "r", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


# -- progress -------------------------------------------------------------------------------------------
def records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "qkv.progress"]


def test_plain_lines_every_n_with_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="qkv.progress")
    with progress.Progress(desc="train", unit="step", total=10, every_n=4, every_s=None, bar=False) as p:
        for _ in range(10):
            p.set(loss="1.000", **{"tokens/s": "12.3k"})
            p.update()
    lines = records(caplog)
    assert [line.split(" | ")[0] for line in lines] == ["train 4/10 steps (40%)", "train 8/10 steps (80%)",
                                                         "train 10/10 steps (100%)"]
    assert "loss 1.000" in lines[0] and "12.3k tokens/s" in lines[0] and "ETA" in lines[0]
    assert "ETA" not in lines[-1]


def test_a_quick_job_by_time_alone_says_nothing_and_quiet_says_nothing(caplog):
    caplog.set_level(logging.INFO, logger="qkv.progress")
    with progress.Progress(desc="translate", unit="sentence", total=3, bar=False) as p:
        p.update(3)
    with progress.Progress(desc="train", unit="step", total=3, every_n=1, enabled=False) as p:
        p.update(3)
    assert records(caplog) == []


def test_tick_moves_the_active_progress_only(caplog):
    caplog.set_level(logging.INFO, logger="qkv.progress")
    progress.tick(5)  # nothing active: nothing happens
    with progress.active(progress.Progress(desc="evaluate", unit="sentence", every_n=2, every_s=None,
                                           bar=False)) as p:
        progress.expect(4)
        progress.tick(2)
        progress.tick(2)
    assert p.done == 4 and records(caplog)[0].startswith("evaluate 2/4 sentences (50%)")


def test_a_terminal_gets_a_bar_and_log_lines_above_it():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    handler = progress.LogHandler(stream)
    with progress.Progress(desc="train", unit="step", total=4, stream=stream) as p:
        p.update(2)
        handler.emit(logging.LogRecord("qkv", logging.INFO, "", 0, "step 2: loss=1", None, None))
        p.update(2)
    text = stream.getvalue()
    assert "\r" in text and "step 2: loss=1\n" in text and "4/4" in text


def test_train_with_stderr_to_a_file_writes_plain_short_lines(tmp_path):
    config = write_config(tmp_path / "c.yaml", classification_config(tmp_path))
    log = tmp_path / "train.log"
    with open(log, "wb") as err:
        done = subprocess.run([sys.executable, "-m", "qkv", "train", str(config), "--output", str(tmp_path / "run"),
                               "--set", "train.max_steps=4", "--set", "train.log_every=2"], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=err, timeout=300)
    text = log.read_text(encoding="utf-8")
    assert done.returncode == 0, text
    assert "\r" not in text and all(len(line) < 200 for line in text.splitlines())
    train_lines = [line for line in text.splitlines() if line.startswith("train ")]
    assert [line.split(" | ")[0] for line in train_lines] == ["train 2/4 steps (50%)", "train 4/4 steps (100%)"]
    assert all("sentences/s" in line for line in train_lines)  # the classifier's unit, not tokens/s


# -- commands -------------------------------------------------------------------------------------------
class FakeLM:
    """Records what cmd_generate asks of a language-model run."""

    def __init__(self):
        self.batches = []

    def require(self, method):
        assert method == "generate"

    def generate(self, prompts, **settings):
        self.batches.append(list(prompts))
        return [p + "!" for p in prompts]


def test_several_prompts_and_a_prompt_file_generate_in_one_batch(tmp_path, monkeypatch, capsys):
    fake = FakeLM()
    monkeypatch.setattr(commands, "_load", lambda args: fake)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("c\nd\n", encoding="utf-8")
    assert main(["generate", "run", "--prompt", "a", "--prompt", "b", "--prompt-file", str(prompts)]) == 0
    assert fake.batches == [["a", "b", "c", "d"]]
    out = capsys.readouterr().out
    assert out == "".join(f"{p}!\n{commands.SAMPLE_SEPARATOR}\n" for p in "abcd")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cls")
    config = write_config(tmp / "c.yaml", classification_config(tmp))
    assert main(["train", str(config), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp / "run"


def test_evaluate_and_classify_take_column_choices(classifier, tmp_path, capsys):
    data = tmp_path / "dev.tsv"
    data.write_text("id\tstars\treview\n" + "".join(f"{i}\t{'pos' if i % 2 else 'neg'}\tgood film {i}\n"
                                                      for i in range(6)), encoding="utf-8")
    assert main(["evaluate", str(classifier), "--data", str(data), "--set", "data.text_column=review",
                 "--set", "data.label_column=stars"]) == 0
    assert '"examples": 6' in capsys.readouterr().out
    assert main(["classify", str(classifier), "--input", str(data), "--set", "data.text_column=review"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6
    assert main(["classify", str(classifier), "--input", str(data), "--set", "data.text_column=body"]) == 2
    err = capsys.readouterr().err
    assert "['id', 'stars', 'review']" in err and "--set data.text_column=NAME" in err
    assert main(["evaluate", str(classifier), "--data", str(data), "--set", "model.d_model=8"]) == 2
    assert "only data.* keys" in capsys.readouterr().err


def test_tta_is_stated_where_used(caplog):
    class Run:
        class cfg:
            class decode:
                tta = True

    caplog.set_level(logging.INFO, logger="qkv")
    commands._note_tta(Run(), None)
    commands._note_tta(Run(), False)
    commands._note_tta(Run(), None, used=False)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "test-time augmentation is on" in said[0] and "without" in said[1]


def test_qkv_max_steps_and_qkv_set_shorten_training(monkeypatch):
    monkeypatch.setenv(commands.MAX_STEPS_ENV, "2")
    monkeypatch.setenv(commands.SET_ENV, "data.batch_size=4; model.n_layers=1")
    assert commands._env_overrides() == ["data.batch_size=4", "model.n_layers=1", "train.max_steps=2"]
    monkeypatch.setenv(commands.MAX_STEPS_ENV, "x")
    with pytest.raises(Exception, match="QKV_MAX_STEPS"):
        commands._env_overrides()


def test_qkv_data_offers_every_fetcher_and_config_lists_the_presets(capsys):
    from qkv.data.fetch import DATASETS
    from qkv.presets import list_presets

    assert commands.DATASETS == DATASETS
    assert main(["config", "list"]) == 0
    names = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [name for name, _ in list_presets()] and "shakespeare-char" in names
    assert main(["config", "show", "shakespeare-char"]) == 0
    assert "task: lm" in capsys.readouterr().out
    assert main(["config", "keys", "shakespeare-char", "--quiet"]) == 0
    assert any(line.startswith("train.max_steps\t") for line in capsys.readouterr().out.splitlines())
    assert main(["train", "no-such-preset"]) == 2
    assert "shakespeare-char" in capsys.readouterr().err  # the error lists the presets
