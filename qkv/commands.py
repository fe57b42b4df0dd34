"""What each ``qkv`` command does, once ``qkv.cli`` has parsed its arguments.

Every command loads what it needs through a library interface (``qkv.load`` and the family
object for trained runs, ``qkv.run`` for training, ``qkv.cv``, ``qkv.studies``); none names a task.
Inputs stream through ``qkv.tasks.inference.input_lines`` a chunk at a time; outputs go to stdout as
they come or to a file through ``qkv.fileio``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

import torch

from qkv.errors import ConfigError, DataError

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
def cmd_demo(args: argparse.Namespace) -> None:
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


def cmd_train(args: argparse.Namespace) -> None:
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


def cmd_cv(args: argparse.Namespace) -> None:
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


def cmd_translate(args: argparse.Namespace) -> None:
    run = _load(args)
    run.require("translate")
    _stream(args.input, args.output, lambda names, texts: run.translate(texts, beam=args.beam, names=names))


EVALUATE_OPTIONS = ("text", "data", "split", "src", "ref", "beam", "output", "ensemble", "tta", "confusion")


def cmd_evaluate(args: argparse.Namespace) -> None:
    run = _load(args)
    options = {name: getattr(args, name) for name in EVALUATE_OPTIONS if getattr(args, name) not in (None, [])}
    print(json.dumps({"run_dir": str(args.run_dir), "task": run.cfg.task, **run.evaluate(**options)}))


def cmd_export(args: argparse.Namespace) -> None:
    from qkv.run import load

    print(json.dumps(load(args.run_dir).export(args.format, args.out)))


def cmd_generate(args: argparse.Namespace) -> None:
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


def cmd_classify(args: argparse.Namespace) -> None:
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


def cmd_attention(args: argparse.Namespace) -> None:
    from qkv.attention_maps import draw_run_attention  # --image F --out F.png goes on to qkv.viz_image

    print(json.dumps(draw_run_attention(args.run_dir, args.out, text=args.text, image=args.image, kind=args.kind,
                                        layer=args.layer, head=args.head, max_tokens=args.max_tokens,
                                        device=resolve_device(args.device))))


def cmd_plot(args: argparse.Namespace) -> None:
    from qkv.viz import plot_run

    print(json.dumps({"out": str(plot_run(args.run_dir, args.out))}))


def cmd_embed(args: argparse.Namespace) -> None:
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


def cmd_data(args: argparse.Namespace) -> None:
    from qkv.data.fetch import fetch_multi30k

    kwargs = {"base_url": args.url} if args.url else {}
    written = fetch_multi30k(args.out, **kwargs)
    print(json.dumps({"dataset": args.name, "dir": str(args.out), "files": [str(p) for p in written]}))


def cmd_study(args: argparse.Namespace) -> None:
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
