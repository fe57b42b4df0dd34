"""The command line: argument parsing only; every command calls a library module.

One handler (``main``) ends every failure in one line on stderr. Errors the user can fix (bad
files, arguments, configs, run directories, NaN losses: qkv's error types, ValueError, OSError,
argparse's) print ``qkv: error: ...`` and exit with status 2; anything else is a bug and prints
``qkv: internal error: <type>: <message> (rerun with --debug for the traceback)``, status 1.
``--debug`` or ``QKV_DEBUG=1`` prints the traceback too; ``-v`` turns on debug logging (and
tracebacks). A closed pipe (``qkv classify RUN | head``) ends quietly.

Every command takes the global flags ``-v``, ``--debug``, ``--quiet`` (no progress), ``--threads N``
and ``--device D``, before or after its name; what a command writes is named by ``--output``
(``--out`` is the same flag's older spelling, kept); help shows each flag's default; ``qkv --version``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

import torch

from qkv import __version__, commands
from qkv.commands import resolve_device, seed_everything  # noqa: F401 - public helpers, imported from here
from qkv.errors import CheckpointError, ConfigError, DataError, TrainingError
from qkv.progress import LogHandler

log = logging.getLogger("qkv")


class UsageError(ConfigError):
    """A command line argparse refused (a missing argument, a flag's bad value)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        where = "" if self.prog == "qkv" else f"{self.prog}: "
        raise UsageError(f"{where}{message} (see {self.prog} --help)") from None


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse names the flag in its message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value



def _add_ensemble_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ensemble", nargs="+", default=[], metavar="RUN",
                   help="image runs: more runs of the same classes; their class probabilities are averaged "
                        "with RUN_DIR's (e.g. one recipe trained with several seeds)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="image runs: average over the image and its 4 one-pixel shifts (default: the run's "
                        "decode.tta; a note on stderr says when it is on)")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after a flag's help, unless the help already says it or there is no default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _add_global_arguments(p: argparse.ArgumentParser, *, before: bool) -> None:
    """The flags every command takes, before the command (``before``: with their defaults) or after it
    (SUPPRESS: a flag not given after the command keeps what was given before it)."""
    def default(value):
        return value if before else argparse.SUPPRESS

    p.add_argument("-v", "--verbose", action="store_true", default=default(False),
                   help="debug logging (and tracebacks, as --debug)")
    p.add_argument("--debug", action="store_true", default=default(False),
                   help="print the traceback of an error (also: QKV_DEBUG=1)")
    p.add_argument("--quiet", action="store_true", default=default(False),
                   help="no progress (bar in a terminal, periodic lines elsewhere)")
    p.add_argument("--threads", type=positive_int, default=default(None),
                   help="CPU threads for torch (default: torch's choice; cv: in each fold's process)")
    p.add_argument("--device", default=default(None),
                   help="cpu, cuda, cuda:N, auto (default: train/cv the config's train.device, else cpu)")


OUTPUT = ("--output", "--out")  # one spelling: --output; --out, the older one, is kept as its alias


def _add_set(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qkv", description="Attention and the Transformer, end to end. Every command takes "
                     "-v, --debug, --quiet, --threads and --device, before or after it; --output (alias --out) "
                     "names what it writes.", formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"qkv {__version__}")
    _add_global_arguments(parser, before=True)
    common = _Parser(add_help=False)
    _add_global_arguments(common, before=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_parser = sub.add_parser
    sub.add_parser = lambda name, **kw: add_parser(name, parents=[common], formatter_class=_Formatter, **kw)
    _add_run_commands(sub)
    _add_use_commands(sub)
    _add_other_commands(sub)
    return parser


def _add_run_commands(sub) -> None:
    """demo, train, cv: the commands that train."""
    p = sub.add_parser("demo", help="attention as retrieval, then train a small character GPT and sample it")
    p.add_argument(*OUTPUT, dest="output", default="runs/demo", help="folder for the run and pictures")
    p.add_argument("--steps", type=int, default=2000, help="training steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.set_defaults(func=commands.cmd_demo)

    p = sub.add_parser("train", help="train a model from a YAML config or a preset (qkv config list)")
    p.add_argument("config", help="YAML config file or a preset name (qkv config list); with --resume the run's "
                                  "stored config.json is used (change values with --set), and CONFIG must be of "
                                  "the same task. QKV_MAX_STEPS=N caps train.max_steps (quick checks)")
    _add_set(p, "override a config value, e.g. --set train.max_steps=2000 (repeatable; keys: qkv config keys TASK)")
    p.add_argument(*OUTPUT, dest="output", help="run directory (default: runs/<config name>): a new or empty "
                                                "folder, never one qkv did not create")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its newest good checkpoint (refused when it has none)")
    p.add_argument("--restart", action="store_true",
                   help="with --resume (implied): when the run has no checkpoint to resume from, train it again "
                        "from step 0 with its stored config instead of refusing")
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("cv", help="image runs: K-fold cross-validation of a config on the non-test images "
                                  "(choose a recipe without the test set); writes OUTPUT/cv.json")
    p.add_argument("config", help="YAML config of an image_classification or image_embedding run")
    p.add_argument("--folds", type=int, default=5, help="K")
    _add_set(p, "override a config value for every fold (repeatable)")
    p.add_argument(*OUTPUT, dest="output", help="folder for the K runs and cv.json (default: runs/cv-<config name>)")
    p.add_argument("--jobs", type=int, default=1, help="folds trained at once, each in its own process")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help="train every fold once per train.seed (OUTPUT/seed_S/fold_k); scores each seed alone and, "
                        "with several, their ensemble (mean class probability)")
    p.add_argument("--tta", action="store_true",
                   help="also score every variant with test-time augmentation (the image and 4 one-pixel shifts)")
    p.set_defaults(func=commands.cmd_cv)


def _add_use_commands(sub) -> None:
    """translate, evaluate, generate, classify, embed: the commands that use a trained run."""
    p = sub.add_parser("translate", help="translate lines with a trained translation run")
    p.add_argument("run_dir")
    p.add_argument("--input", help="source file, one sentence per line (default: stdin)")
    p.add_argument(*OUTPUT, dest="output", help="output file (default: stdout)")
    p.add_argument("--beam", type=positive_int, help="beam size (default: the run's decode.beam_size; 1 = greedy)")
    p.set_defaults(func=commands.cmd_translate)

    p = sub.add_parser("evaluate", help="score a trained run; prints one JSON object")
    p.add_argument("run_dir")
    p.add_argument("--text", help="language model: a UTF-8 text file to score")
    p.add_argument("--data", help="classification/embedding: a labelled TSV/CSV file; image runs: an .npz or a "
                   "folder of class subfolders (default: the run's recorded test split)")
    _add_set(p, "text runs: how to read --data, e.g. --set data.text_column=review --set data.label_column=stars "
                "--set data.header=true (data.* keys only; repeatable)")
    p.add_argument("--split", choices=["test", "valid"],
                   help="image runs: which recorded split to score (default: test)")
    p.add_argument("--src", help="translation: source file")
    p.add_argument("--ref", help="translation: reference file, aligned with --src")
    p.add_argument("--beam", type=positive_int, help="translation: beam size (default: the run's decode.beam_size)")
    p.add_argument(*OUTPUT, dest="output", help="translation: also write the hypotheses here")
    p.add_argument("--confusion", metavar="FILE",
                   help="classifier runs: also write the confusion matrix here as JSON (it is always in the printed "
                        "JSON; evaluate never writes into the run)")
    _add_ensemble_arguments(p)
    p.set_defaults(func=commands.cmd_evaluate)

    p = sub.add_parser("generate", help="sample text from a trained language model (one prompt: streamed)")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", default=[],
                   help="text to continue (repeatable: several prompts go through as one batch; default: one "
                        "empty prompt, start of text)")
    p.add_argument("--prompt-file", metavar="F",
                   help="one prompt per line (batched); with several prompts each sample is followed by a line "
                        f"{commands.SAMPLE_SEPARATOR!r}")
    p.add_argument(*OUTPUT, dest="output", help="output file (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's decode.max_new_tokens")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the run's decode.temperature)")
    p.add_argument("--top-k", type=int, help="default: the run's decode.top_k")
    p.add_argument("--top-p", type=float, help="default: the run's decode.top_p")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.set_defaults(func=commands.cmd_generate)

    p = sub.add_parser("classify", help="label each input line with a trained classifier: label<TAB>probability")
    p.add_argument("run_dir")
    p.add_argument("--input", help="one text per line (default: stdin); with --set data.text_column=C a TSV/CSV "
                                   "file with a header, column C labelled")
    p.add_argument("--image", nargs="+", metavar="F",
                   help="image run: PNG/JPEG files to label instead; prints file<TAB>label<TAB>probability")
    _add_set(p, "text runs: --set data.text_column=C reads --input as a TSV/CSV with a header and labels column C")
    p.add_argument(*OUTPUT, dest="output", help="default: stdout")
    p.add_argument("--batch-size", type=positive_int, help="inputs per batch (default: the run's decode.batch_size)")
    _add_ensemble_arguments(p)
    p.set_defaults(func=commands.cmd_classify)

    p = sub.add_parser("embed", help="embed each input line with a trained encoder into a .npy matrix")
    p.add_argument("run_dir")
    p.add_argument("--input", help="one text per line (default: stdin)")
    p.add_argument("--image", nargs="+", metavar="F", help="image run: PNG/JPEG files to embed instead")
    p.add_argument(*OUTPUT, dest="output", required=True, help="F.npy: (lines, d_model) float32, unit length")
    p.add_argument("--batch-size", type=positive_int, help="inputs per batch (default: the run's decode.batch_size)")
    p.set_defaults(func=commands.cmd_embed)


def _add_other_commands(sub) -> None:
    """attention, plot, export, study, data, config."""
    p = sub.add_parser("attention", help="draw a trained model's attention: heads of a layer, alignment, "
                                         "image maps and rollout, or an interactive page")
    p.add_argument("run_dir")
    p.add_argument("--image", metavar="F", help="image run: a PNG/JPEG file to draw the attention over")
    p.add_argument("--text", metavar="T", help="text run (translation, lm, classification): the input text")
    p.add_argument(*OUTPUT, dest="output", required=True, metavar="F.png|F.html",
                   help="picture to write, or an interactive page (pick layer and head, hover tokens)")
    p.add_argument("--layer", type=int, help="layer to draw (default: the last; .html: all layers)")
    p.add_argument("--head", type=int, help="one head, drawn large (default: every head and their mean)")
    p.add_argument("--kind", choices=["encoder", "decoder", "cross"],
                   help="which attention (.png; default: cross-attention for translation, else the only one)")
    p.add_argument("--max-tokens", type=positive_int, default=96,
                   help=".png: longer inputs are binned to this many cells")
    p.set_defaults(func=commands.cmd_attention)

    p = sub.add_parser("plot", help="draw a run's training curves: loss, validation metric, learning rate")
    p.add_argument("run_dir")
    p.add_argument(*OUTPUT, dest="output", help="picture to write (default: RUN_DIR/curves.png)")
    p.set_defaults(func=commands.cmd_plot)

    p = sub.add_parser("export", help="write a trained run for another runtime; prints one JSON summary")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, help="hf | onnx | ctranslate2 (what the run's family can export)")
    p.add_argument(*OUTPUT, dest="output", required=True, help="folder to write (new, empty, or one qkv export made)")
    p.set_defaults(func=commands.cmd_export)

    p = sub.add_parser("study", help="train and measure several models; write a Markdown report with plots")
    p.add_argument("name", choices=["rnn-vs-attention", "attention-variants"])
    p.add_argument("--quick", action="store_true",
                   help="small settings, a few minutes on 2 CPU cores: a check that it runs, too small to "
                        "conclude from (the report says so)")
    p.add_argument(*OUTPUT, dest="output", default=None,
                   help="folder for the report and its PNGs (default: runs/studies/<name>; the committed reports "
                        "in docs/studies are rewritten only when named here)")
    p.add_argument("--work", default="runs/studies", help="rnn-vs-attention: folder for its Multi30k runs")
    p.add_argument("--data", default="data/multi30k",
                   help="rnn-vs-attention: Multi30k folder (`qkv data multi30k`); the section is skipped without it")
    p.add_argument("--run", action="append", default=[], metavar="RUN_DIR",
                   help="rnn-vs-attention: also score this trained translation run by length (repeatable)")
    p.add_argument("--multi30k-steps", type=int, metavar="N",
                   help="rnn-vs-attention: train each Multi30k preset N steps (0 = only score the --run dirs)")
    p.add_argument("--part", action="append", choices=["gradients", "synthetic", "speed", "multi30k"],
                   help="rnn-vs-attention: run only this part (repeatable); the report keeps the others' last results")
    p.set_defaults(func=commands.cmd_study)

    p = sub.add_parser("data", help="download a public data set (needs a network)")
    p.add_argument("name", choices=list(commands.DATASETS))
    p.add_argument(*OUTPUT, dest="output", help="folder to write (default: data/NAME)")
    p.add_argument("--url", help="base URL to fetch from (default: upstream)")
    p.set_defaults(func=commands.cmd_data)

    p = sub.add_parser("config", help="the presets shipped with qkv: list, show one, list a task's keys")
    p.add_argument("action", choices=["list", "show", "keys"],
                   help="list: the presets; show NAME: its YAML; keys TASK|CONFIG: every key, default and meaning")
    p.add_argument("name", nargs="?", help="show: a preset name; keys: a task name, a preset or a config file")
    p.set_defaults(func=commands.cmd_config)


USER_ERRORS = (DataError, ConfigError, CheckpointError, TrainingError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; every exception ends in one line on stderr (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("QKV_DEBUG", "") not in ("", "0") or "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        debug = debug or args.debug or args.verbose
        handler = LogHandler(sys.stderr or open(os.devnull, "w"))  # log lines land above a progress bar
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        args.func(args)
    except KeyboardInterrupt:
        _say("qkv: interrupted")
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly, and keep Python's exit flush quiet
        _silence_stdout()
        return 1
    except SystemExit as done:  # --help, or a library calling sys.exit
        return done.code if isinstance(done.code, int) else 0
    except USER_ERRORS as err:
        return _report(err, debug, "qkv: error: " + _one_line(getattr(err, "cli_message", str(err))), 2)
    except Exception as err:  # a bug: say so briefly
        detail = f"{type(err).__name__}: {_one_line(str(err))}"
        return _report(err, debug, f"qkv: internal error: {detail} (rerun with --debug for the traceback)", 1)
    return 0


def _one_line(message: str) -> str:
    return " ".join(message.split("\n"))  # an option named as its --flag stays as it is


def _report(err: BaseException, debug: bool, line: str, code: int) -> int:
    if debug and sys.stderr is not None:
        traceback.print_exception(err, file=sys.stderr)
    _say(line)
    return code


def _say(line: str) -> None:
    """One line to stderr, if there is a stderr to write to."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
