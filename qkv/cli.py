"""The command line: argument parsing only; every command calls a library module.

One handler (``main``) ends every failure in one line on stderr. Errors the user can fix (bad
files, arguments, configs, run directories, NaN losses: qkv's error types, ValueError, OSError,
argparse's) print ``qkv: error: ...`` and exit with status 2; anything else is a bug and prints
``qkv: internal error: <type>: <message> (rerun with --debug for the traceback)``, status 1.
``--debug`` (before or after the command) or ``QKV_DEBUG=1`` prints the traceback too; ``-v``
turns on debug logging (and tracebacks). A closed pipe (``qkv classify RUN | head``) ends quietly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import traceback
from pathlib import Path

import torch

from qkv.errors import CheckpointError, ConfigError, DataError, TrainingError

log = logging.getLogger("qkv")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    """The one place qkv seeds global generators (library code takes generators instead)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _input_items(path: str | None):
    """(name:LINE, text) pairs of --input (a file, or stdin for None and "-"), read lazily."""
    from qkv.tasks.inference import input_lines

    if path is None or path == "-":
        if sys.stdin is None:
            raise DataError("<stdin>: standard input is closed; give --input FILE")
        yield from input_lines(sys.stdin.buffer, name="<stdin>")
        return
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a text file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    with f:
        yield from input_lines(f, name=str(path))


def _stream(path_in: str | None, path_out: str | None, predict) -> None:
    """Read --input a chunk of lines at a time, predict, and write each chunk's output lines at once.

    ``predict(names, texts) -> lines``. To stdout each chunk is written and flushed as it comes;
    an --output file is written at the end through qkv.fileio (atomically for a regular file, so an
    error half-way leaves it as it was)."""
    from qkv.tasks.inference import chunked

    direct = path_out is None or path_out == "-"
    kept: list[str] = []
    for chunk in chunked(_input_items(path_in)):
        names, texts = [n for n, _ in chunk], [t for _, t in chunk]
        text = "".join(line + "\n" for line in predict(names, texts))
        if direct:
            _stdout().write(text)
            _stdout().flush()
        else:
            kept.append(text)
    if not direct:
        from qkv.fileio import atomic_write_bytes

        atomic_write_bytes(Path(path_out), "".join(kept).encode("utf-8"))


def _stdout():
    if sys.stdout is None:
        raise OSError("standard output is closed; give --output FILE")
    return sys.stdout


def _write_output(path: str | None, lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    if path is None or path == "-":
        _stdout().write(text)
        _stdout().flush()
    else:
        from qkv.fileio import atomic_write_bytes

        atomic_write_bytes(Path(path), text.encode("utf-8"))


# -- commands -------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> None:
    from qkv import demo

    seed_everything(args.seed)
    r = demo.retrieval_example()
    print("1. Attention as retrieval: one query compared with four keys")
    print(f"   query q = {r['query'].tolist()}")
    for i, (k, v, s, a) in enumerate(zip(r["keys"], r["values"], r["scores"], r["weights"]), start=1):
        k, v = [round(x, 3) for x in k.tolist()], [round(x, 3) for x in v.tolist()]
        print(f"   k{i} = {k}  v{i} = {v}  s{i} = q.k{i}/sqrt(d_k) = {s:.3f}  a{i} = {a:.3f}")
    print(f"   output = sum_i a_i v_i = {[round(x, 3) for x in r['output'].tolist()]}")
    print("2. Training a character-level GPT (nanoGPT's CPU recipe) ...", flush=True)
    result = demo.run(args.out, steps=args.steps, seed=args.seed, progress=not args.quiet)
    source = "a ~40 KB excerpt shipped with qkv" if result["excerpt"] else result["text"]
    m = result["metrics"]
    print(f"   text: {source}")
    print(f"   validation loss {m['loss']:.3f} nats/char ({m['bits_per_char']:.3f} bits/char, "
          f"perplexity {m['perplexity']:.2f})")
    print("3. A sample (temperature 0.8, top-k 200):\n")
    print(result["sample"])
    print()
    for picture in result["pictures"]:
        print(f"   picture: {picture}")
    print(f"   trained model: {result['run_dir']} (try: qkv generate {result['run_dir']} --prompt 'JULIET:')")


def _cmd_train(args: argparse.Namespace) -> None:
    from qkv import distributed, run

    if args.restart:
        args.resume = True
    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    # torchrun --max-restarts: a restarted worker continues the run its first attempt started
    restarted = distributed.restart_count() > 0
    args.resume = args.resume or (restarted and run.RunDir(out).config.exists())
    if args.resume:
        cfg = run.read_run_config(out, args.set)
        _check_resume_config(args.config, cfg)
    else:
        cfg = run.load_config(args.config, args.set)
    device = resolve_device(args.device or cfg.train.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    with distributed.launch(device) as (world, device):  # joins torchrun's process group, if any
        seed_everything(cfg.train.seed)
        metrics = run.train_run(cfg, out, device=device, resume=args.resume, restart=args.restart or restarted,
                                progress=not args.quiet, world=world)
    if world.is_main:
        print(json.dumps({"run_dir": str(out), **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}))


def _check_resume_config(path: str, stored) -> None:
    """--resume trains with the run's stored config.json; CONFIG must exist and be of the same task."""
    from qkv.config import read_yaml

    if not Path(path).is_file():
        raise ConfigError(f"{path}: config file not found (with --resume the run's stored config.json is used, "
                          "but CONFIG must still name an existing file)")
    given = read_yaml(path)
    task = given.get("task") if isinstance(given, dict) else None
    if task != stored.task:
        raise ConfigError(f"{path}: task {task!r}, but the run to resume is a {stored.task!r} run; with --resume "
                          "the run's stored config.json is used (change values with --set)")


def _cmd_cv(args: argparse.Namespace) -> None:
    from qkv.cv import cross_validate

    out = Path(args.out) if args.out else Path("runs") / f"cv-{Path(args.config).stem}"
    result = cross_validate(args.config, out, folds=args.folds, overrides=args.set, jobs=args.jobs,
                            threads=args.threads, device=args.device, seeds=args.seeds, tta=args.tta)
    print(json.dumps({"cv_dir": str(out), **{k: result[k] for k in ("metric", "folds", "recipe", "mean", "std",
                                                                     "pooled")},
                      "per_fold": [f[result["metric"]] for f in result["per_fold"]],
                      "pooled_by_variant": {k: v["pooled"] for k, v in result["variants"].items()}}))


def _load(args: argparse.Namespace):
    """The run named on the command line, as its family object (qkv.load)."""
    from qkv.run import load

    return load(args.run_dir, device=resolve_device(args.device))


def _cmd_translate(args: argparse.Namespace) -> None:
    run = _load(args)
    run.require("translate")
    _stream(args.input, args.output, lambda names, texts: run.translate(texts, beam=args.beam, names=names))


EVALUATE_OPTIONS = ("text", "data", "split", "src", "ref", "beam", "output", "ensemble", "tta", "confusion")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    run = _load(args)
    options = {name: getattr(args, name) for name in EVALUATE_OPTIONS if getattr(args, name) not in (None, [])}
    print(json.dumps({"run_dir": str(args.run_dir), "task": run.cfg.task, **run.evaluate(**options)}))


def _cmd_export(args: argparse.Namespace) -> None:
    from qkv.run import load

    print(json.dumps(load(args.run_dir).export(args.format, args.out)))


def _cmd_generate(args: argparse.Namespace) -> None:
    run = _load(args)
    run.require("generate")
    pieces = run.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed)  # checked before the first token
    out = _stdout()
    out.write(args.prompt)
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")


def _check_inputs(run, args: argparse.Namespace) -> None:
    """--image files for image runs, --input text for the others."""
    if args.image and run.inputs != "image":
        raise ConfigError(f"{args.run_dir} is {run.a_kind} run: it reads text (--input), not --image files")
    if not args.image and run.inputs == "image":
        raise ConfigError(f"{args.run_dir} is {run.a_kind} run: give --image F... (it reads image files)")


def _cmd_classify(args: argparse.Namespace) -> None:
    run = _load(args)
    run.require("classify")
    _check_inputs(run, args)
    options = {"tta": args.tta, "ensemble": args.ensemble or None, "batch_size": args.batch_size}
    options = {k: v for k, v in options.items() if v is not None}
    if args.image:
        labelled = run.classify(args.image, **options)
        _write_output(args.output, [f"{f}\t{label}\t{prob:.4f}" for f, (label, prob) in zip(args.image, labelled)])
        return
    _stream(args.input, args.output,
            lambda names, texts: [f"{label}\t{prob:.4f}" for label, prob in run.classify(texts, **options)])


def _cmd_attention(args: argparse.Namespace) -> None:
    from qkv.attention_maps import draw_run_attention  # --image F --out F.png goes on to qkv.viz_image

    print(json.dumps(draw_run_attention(args.run_dir, args.out, text=args.text, image=args.image, kind=args.kind,
                                        layer=args.layer, head=args.head, max_tokens=args.max_tokens,
                                        device=resolve_device(args.device))))


def _cmd_plot(args: argparse.Namespace) -> None:
    from qkv.viz import plot_run

    print(json.dumps({"out": str(plot_run(args.run_dir, args.out))}))


def _cmd_embed(args: argparse.Namespace) -> None:
    import io

    import numpy as np

    from qkv.fileio import atomic_write_bytes
    from qkv.tasks.inference import chunked

    if not args.output.endswith(".npy"):
        raise ConfigError(f"--output {args.output}: embeddings are written as a .npy file")
    run = _load(args)
    run.require("embed")
    _check_inputs(run, args)
    options = {"batch_size": args.batch_size} if args.batch_size is not None else {}
    if args.image:
        vectors = run.embed(args.image, **options)
    else:  # a chunk of lines at a time: only the (N, D) result grows
        parts = [run.embed([t for _, t in chunk], **options) for chunk in chunked(_input_items(args.input))]
        vectors = np.concatenate(parts) if parts else run.embed([], **options)
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    atomic_write_bytes(Path(args.output), buffer.getvalue())
    print(json.dumps({"output": args.output, "shape": list(vectors.shape)}))


def _cmd_data(args: argparse.Namespace) -> None:
    from qkv.data.fetch import fetch_multi30k

    kwargs = {"base_url": args.url} if args.url else {}
    written = fetch_multi30k(args.out, **kwargs)
    print(json.dumps({"dataset": args.name, "dir": str(args.out), "files": [str(p) for p in written]}))


def _cmd_study(args: argparse.Namespace) -> None:
    """Both studies write a Markdown report with PNGs into --out; see qkv/studies/."""
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    seed_everything(0)
    command = " ".join(["qkv study", *sys.argv[2:]]) if sys.argv[1:2] == ["study"] else f"qkv study {args.name}"
    if args.name == "rnn-vs-attention":
        import dataclasses

        from qkv.studies import rnn_vs_attention as study

        settings = study.settings_for(args.quick)
        if args.multi30k_steps is not None:
            settings = dataclasses.replace(settings, multi30k_steps=args.multi30k_steps)
        report = study.run_study(args.out, args.work, settings=settings, data_dir=args.data,
                                 extra_runs=tuple(args.run), command=command, parts=tuple(args.part or study.PARTS))
    else:
        from qkv.studies import attention_variants as study

        report = study.run_study(args.out, settings=study.settings_for(args.quick), command=command)
    print(json.dumps({"study": args.name, "report": str(report)}))


def _add_ensemble_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ensemble", nargs="+", default=[], metavar="RUN",
                   help="image runs: more runs of the same classes; their class probabilities are averaged "
                        "with RUN_DIR's (e.g. one recipe trained with several seeds)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="image runs: average over the image and its 4 one-pixel shifts (default: the run's "
                        "decode.tta)")


def _add_global_arguments(p: argparse.ArgumentParser, *, default) -> None:
    """-v and --debug, before the command (``default`` False) or after it (SUPPRESS: keep the first's)."""
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="debug logging (and tracebacks, as --debug)")
    p.add_argument("--debug", action="store_true", default=default,
                   help="print the traceback of an error (also: QKV_DEBUG=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qkv", description="Attention and the Transformer, end to end.")
    _add_global_arguments(parser, default=False)
    common = _Parser(add_help=False)
    _add_global_arguments(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_parser = sub.add_parser
    sub.add_parser = lambda name, **kw: add_parser(name, parents=[common], **kw)  # every command takes -v, --debug

    p = sub.add_parser("demo", help="attention as retrieval, then train a small character GPT and sample it")
    p.add_argument("--out", default="runs/demo", help="folder for the run and pictures (default: runs/demo)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config (see configs/); with --resume the run's stored config.json is used "
                                  "(change values with --set), and CONFIG must exist and be of the same task")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=2000 (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/<config name>): a new or empty folder, never one "
                                 "qkv did not create")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest good checkpoint (refused when it has none)")
    p.add_argument("--restart", action="store_true",
                   help="with --resume (implied): when the run has no checkpoint to resume from, train it again "
                        "from step 0 with its stored config instead of refusing")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the config's train.device)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("cv", help="image runs: K-fold cross-validation of a config on the non-test images "
                                  "(choose a recipe without the test set); writes OUT/cv.json")
    p.add_argument("config", help="YAML config of an image_classification or image_embedding run")
    p.add_argument("--folds", type=int, default=5, help="K (default: 5)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every fold (repeatable)")
    p.add_argument("--out", help="folder for the K runs and cv.json (default: runs/cv-<config name>)")
    p.add_argument("--jobs", type=int, default=1, help="folds trained at once, each in its own process (default: 1)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help="train every fold once per train.seed (OUT/seed_S/fold_k); scores each seed alone and, "
                        "with several, their ensemble (mean class probability)")
    p.add_argument("--tta", action="store_true",
                   help="also score every variant with test-time augmentation (the image and 4 one-pixel shifts)")
    p.add_argument("--threads", type=int, help="CPU threads for torch in each fold's process")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the config's train.device)")
    p.set_defaults(func=_cmd_cv)

    p = sub.add_parser("translate", help="translate lines with a trained translation run")
    p.add_argument("run_dir")
    p.add_argument("--input", help="source file, one sentence per line (default: stdin)")
    p.add_argument("--output", help="output file (default: stdout)")
    p.add_argument("--beam", type=positive_int, help="beam size (default: the run's decode.beam_size; 1 = greedy)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_translate)

    p = sub.add_parser("evaluate", help="score a trained run; prints one JSON object")
    p.add_argument("run_dir")
    p.add_argument("--text", help="language model: a UTF-8 text file to score")
    p.add_argument("--data", help="classification/embedding: a labelled TSV/CSV file; image runs: an .npz or a "
                   "folder of class subfolders (default: the run's recorded test split)")
    p.add_argument("--split", choices=["test", "valid"],
                   help="image runs: which recorded split to score (default: test)")
    p.add_argument("--src", help="translation: source file")
    p.add_argument("--ref", help="translation: reference file, aligned with --src")
    p.add_argument("--beam", type=positive_int)
    p.add_argument("--output", help="also write the hypotheses here")
    p.add_argument("--confusion", metavar="FILE",
                   help="classifier runs: also write the confusion matrix here as JSON (it is always in the printed "
                        "JSON; evaluate never writes into the run)")
    _add_ensemble_arguments(p)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("generate", help="sample text from a trained language model, streaming it")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, start of text)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("classify", help="label each input line with a trained classifier: label<TAB>probability")
    p.add_argument("run_dir")
    p.add_argument("--input", help="one text per line (default: stdin)")
    p.add_argument("--image", nargs="+", metavar="F",
                   help="image run: PNG/JPEG files to label instead; prints file<TAB>label<TAB>probability")
    p.add_argument("--output", help="default: stdout")
    p.add_argument("--batch-size", type=positive_int, help="inputs per batch (default: the run's decode.batch_size)")
    _add_ensemble_arguments(p)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser("attention", help="draw a trained model's attention: heads of a layer, alignment, "
                                         "image maps and rollout, or an interactive page")
    p.add_argument("run_dir")
    p.add_argument("--image", metavar="F", help="image run: a PNG/JPEG file to draw the attention over")
    p.add_argument("--text", metavar="T", help="text run (translation, lm, classification): the input text")
    p.add_argument("--out", required=True, metavar="F.png|F.html",
                   help="picture to write, or an interactive page (pick layer and head, hover tokens)")
    p.add_argument("--layer", type=int, help="layer to draw (default: the last; .html: all layers)")
    p.add_argument("--head", type=int, help="one head, drawn large (default: every head and their mean)")
    p.add_argument("--kind", choices=["encoder", "decoder", "cross"],
                   help="which attention (.png; default: cross-attention for translation, else the only one)")
    p.add_argument("--max-tokens", type=positive_int, default=96,
                   help=".png: longer inputs are binned to this many cells")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_attention)

    p = sub.add_parser("plot", help="draw a run's training curves: loss, validation metric, learning rate")
    p.add_argument("run_dir")
    p.add_argument("--out", help="picture to write (default: RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("export", help="write a trained run for another runtime; prints one JSON summary")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, help="hf | onnx | ctranslate2 (what the run's family can export)")
    p.add_argument("--out", required=True, help="folder to write (new, empty, or one qkv export made)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("embed", help="embed each input line with a trained encoder into a .npy matrix")
    p.add_argument("run_dir")
    p.add_argument("--input", help="one text per line (default: stdin)")
    p.add_argument("--image", nargs="+", metavar="F", help="image run: PNG/JPEG files to embed instead")
    p.add_argument("--output", required=True, help="F.npy: (lines, d_model) float32, unit length")
    p.add_argument("--batch-size", type=positive_int, help="inputs per batch (default: the run's decode.batch_size)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("study", help="train and measure several models; write a Markdown report with plots")
    p.add_argument("name", choices=["rnn-vs-attention", "attention-variants"])
    p.add_argument("--quick", action="store_true", help="small settings: a few minutes on 2 CPU cores")
    p.add_argument("--out", default="docs/studies", help="folder for the report and its PNGs (default: docs/studies)")
    p.add_argument("--work", default="runs/studies", help="rnn-vs-attention: folder for its Multi30k runs")
    p.add_argument("--data", default="data/multi30k",
                   help="rnn-vs-attention: Multi30k folder (`qkv data multi30k`); the section is skipped without it")
    p.add_argument("--run", action="append", default=[], metavar="RUN_DIR",
                   help="rnn-vs-attention: also score this trained translation run by length (repeatable)")
    p.add_argument("--multi30k-steps", type=int, metavar="N",
                   help="rnn-vs-attention: train each Multi30k preset N steps (0 = only score the --run dirs)")
    p.add_argument("--part", action="append", choices=["gradients", "synthetic", "speed", "multi30k"],
                   help="rnn-vs-attention: run only this part (repeatable); the report keeps the others' last results")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("data", help="download a public data set")
    p.add_argument("name", choices=["multi30k"])
    p.add_argument("--out", default="data/multi30k")
    p.add_argument("--url", help="base URL to fetch from (default: upstream)")
    p.set_defaults(func=_cmd_data)
    return parser


USER_ERRORS = (DataError, ConfigError, CheckpointError, TrainingError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; every exception ends in one line on stderr (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("QKV_DEBUG", "") not in ("", "0") or "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        debug = debug or args.debug or args.verbose
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                            stream=sys.stderr or open(os.devnull, "w"))
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
