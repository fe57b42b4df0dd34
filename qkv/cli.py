"""The command line: argument parsing only; every command calls a library module.

Errors the user can fix (bad files, bad arguments, bad configs, NaN losses) print one line
``qkv: error: ...`` and exit with status 2, without a traceback (``-v`` shows it).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
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


def _read_input(path: str | None) -> list[str]:
    from qkv.data.text import read_lines

    if path is None or path == "-":
        data = sys.stdin.buffer.read()
        from qkv.data.text import parse_lines

        return parse_lines(data, name="<stdin>", allow_empty=True) if data else []
    return read_lines(path, allow_empty=True)


def _write_output(path: str | None, lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    if path is None or path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
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

    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    # torchrun --max-restarts: a restarted worker continues the run its first attempt started
    args.resume = args.resume or (distributed.restart_count() > 0 and (out / "config.json").exists())
    if args.resume:
        cfg = run.read_run_config(out, args.set)
    else:
        cfg = run.load_config(args.config, args.set)
    device = resolve_device(args.device or cfg.train.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    with distributed.launch(device) as (world, device):  # joins torchrun's process group, if any
        seed_everything(cfg.train.seed)
        metrics = run.train_run(cfg, out, device=device, resume=args.resume, progress=not args.quiet, world=world)
    if world.is_main:
        print(json.dumps({"run_dir": str(out), **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}))


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
    if args.beam is not None and args.beam < 1:
        raise ConfigError(f"--beam must be >= 1, got {args.beam}")
    run = _load(args)
    run.require("translate")
    lines = _read_input(args.input)
    source = args.input if args.input not in (None, "-") else "<stdin>"
    names = [f"{source}:{i + 1}" for i in range(len(lines))]
    _write_output(args.output, run.translate(lines, beam=args.beam, names=names))


EVALUATE_OPTIONS = ("text", "data", "split", "src", "ref", "beam", "output", "ensemble", "tta")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    run = _load(args)
    options = {name: getattr(args, name) for name in EVALUATE_OPTIONS if getattr(args, name) not in (None, [])}
    print(json.dumps({"run_dir": str(args.run_dir), "task": run.cfg.task, **run.evaluate(**options)}))


def _cmd_generate(args: argparse.Namespace) -> None:
    run = _load(args)
    run.require("generate")
    pieces = run.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed)  # checked before the first token
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


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
    labelled = run.classify(_read_input(args.input), **options)
    _write_output(args.output, [f"{label}\t{prob:.4f}" for label, prob in labelled])


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

    if not args.output.endswith(".npy"):
        raise ConfigError(f"--output {args.output}: embeddings are written as a .npy file")
    run = _load(args)
    run.require("embed")
    _check_inputs(run, args)
    options = {"batch_size": args.batch_size} if args.batch_size is not None else {}
    vectors = run.embed(args.image if args.image else _read_input(args.input), **options)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkv", description="Attention and the Transformer, end to end.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="attention as retrieval, then train a small character GPT and sample it")
    p.add_argument("--out", default="runs/demo", help="folder for the run and pictures (default: runs/demo)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=2000 (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
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
    p.add_argument("--beam", type=int, help="beam size (default: the run's decode.beam_size; 1 = greedy)")
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
    p.add_argument("--beam", type=int)
    p.add_argument("--output", help="also write the hypotheses here")
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
    p.add_argument("--batch-size", type=int, help="inputs per batch (default: the run's decode.batch_size)")
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
    p.add_argument("--max-tokens", type=int, default=96, help=".png: longer inputs are binned to this many cells")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_attention)

    p = sub.add_parser("plot", help="draw a run's training curves: loss, validation metric, learning rate")
    p.add_argument("run_dir")
    p.add_argument("--out", help="picture to write (default: RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("embed", help="embed each input line with a trained encoder into a .npy matrix")
    p.add_argument("run_dir")
    p.add_argument("--input", help="one text per line (default: stdin)")
    p.add_argument("--image", nargs="+", metavar="F", help="image run: PNG/JPEG files to embed instead")
    p.add_argument("--output", required=True, help="F.npy: (lines, d_model) float32, unit length")
    p.add_argument("--batch-size", type=int, help="inputs per batch (default: the run's decode.batch_size)")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("qkv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except (DataError, ConfigError, CheckpointError, TrainingError, ValueError, OSError) as err:
        if args.verbose:
            raise
        message = " ".join(getattr(err, "cli_message", str(err)).split("\n"))  # an option named as its --flag
        print(f"qkv: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
