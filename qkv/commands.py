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
import os
import random
import sys
from pathlib import Path

import torch

from qkv.errors import ConfigError, DataError

log = logging.getLogger("qkv")

DATASETS = ("multi30k", "tinyshakespeare", "sst2")  # as qkv.data.fetch.DATASETS (a test keeps them equal)
#: with several prompts, `qkv generate` ends each sample with this line
SAMPLE_SEPARATOR = "-" * 40
#: QKV_MAX_STEPS=N caps train.max_steps of `qkv train` and `qkv cv`; QKV_SET="KEY=VALUE;KEY=VALUE" adds
#: overrides after the command's own --set (the README test's short runs of the presets)
MAX_STEPS_ENV, SET_ENV = "QKV_MAX_STEPS", "QKV_SET"


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
    from qkv.data.text import open_input

    with open_input(path) as f:
        yield from input_lines(f, name=str(path))


def _count_lines(path: str | None) -> int | None:
    """The number of lines of an --input file (for the ETA); None for stdin or an unreadable file."""
    if path is None or path == "-":
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None  # reading it properly reports the error
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _progress(args: argparse.Namespace, desc: str, unit: str, total: int | None = None):
    """Progress on stderr: a bar in a terminal, a plain line every ~10 s elsewhere, nothing with --quiet."""
    from qkv.progress import Progress

    return Progress(desc=desc, unit=unit, total=total, enabled=not args.quiet, every_s=10.0)


def _stream(path_in: str | None, path_out: str | None, predict, progress=None) -> None:
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
        if progress is not None:
            progress.update(len(chunk))
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
    result = demo.run(args.output, steps=args.steps, seed=args.seed, progress=not args.quiet)
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
    if args.resume and args.output is None:
        raise ConfigError("--resume needs --output RUN_DIR (the run to continue)")
    try:
        args.config = str(_config_file(args.config, strict=not args.resume))  # --resume: CONFIG is checked below
    except ConfigError as err:
        if not args.resume:
            raise
        raise ConfigError(f"{err}; with --resume the run's stored config.json is used, but CONFIG must still "
                          "name an existing file or a preset") from None
    args.set = [*args.set, *_env_overrides()]
    out = Path(args.output) if args.output else Path("runs") / Path(args.config).stem
    # torchrun --max-restarts: a restarted worker continues the run its first attempt started
    restarted = distributed.restart_count() > 0
    args.resume = args.resume or (restarted and run.RunDir(out).config.exists())
    if args.resume:
        cfg = run.read_run_config(out, args.set)
        _check_resume_config(args.config, cfg)
    else:
        cfg = run.load_config(args.config, args.set)
    device = resolve_device(args.device or cfg.train.device)
    with distributed.launch(device) as (world, device):  # joins torchrun's process group, if any
        seed_everything(cfg.train.seed)
        metrics = run.train_run(cfg, out, device=device, resume=args.resume, restart=args.restart or restarted,
                                progress=not args.quiet, world=world)
    if world.is_main:
        print(json.dumps({"run_dir": str(out), **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}))


def _config_file(name_or_path: str, *, strict: bool = True) -> Path:
    """A config file, or the file of a preset shipped with qkv (``qkv config list``); neither is an error
    listing the presets, unless not ``strict`` (then the path as given)."""
    from qkv.presets import resolve_config

    try:
        return resolve_config(name_or_path)
    except ConfigError:
        if strict:
            raise
        return Path(name_or_path)


def _env_overrides() -> list[str]:
    """The overrides QKV_MAX_STEPS=N and QKV_SET ask for (a quick check of a long recipe), each logged."""
    overrides = [item.strip() for item in os.environ.get(SET_ENV, "").split(";") if item.strip()]
    raw = os.environ.get(MAX_STEPS_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"{MAX_STEPS_ENV}={raw!r}: expected an int >= 1")
        overrides.append(f"train.max_steps={int(raw)}")
    if overrides:
        log.info("from the environment (%s, %s): --set %s", MAX_STEPS_ENV, SET_ENV, " --set ".join(overrides))
    return overrides


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

    config = str(_config_file(args.config))
    out = Path(args.output) if args.output else Path("runs") / f"cv-{Path(config).stem}"
    result = cross_validate(config, out, folds=args.folds, overrides=[*args.set, *_env_overrides()],
                            jobs=args.jobs, threads=args.threads, device=args.device, seeds=args.seeds, tta=args.tta)
    print(json.dumps({"cv_dir": str(out), **{k: result[k] for k in ("metric", "folds", "recipe", "mean", "std",
                                                                     "pooled")},
                      "per_fold": [f[result["metric"]] for f in result["per_fold"]],
                      "pooled_by_variant": {k: v["pooled"] for k, v in result["variants"].items()}}))


def _load(args: argparse.Namespace):
    """The run named on the command line, as its family object (qkv.load)."""
    from qkv.run import load

    run = load(args.run_dir, device=resolve_device(args.device or "cpu"))
    if getattr(args, "set", None):
        _read_data_as(run, args.set)
    return run


def _read_data_as(run, overrides: list[str]) -> None:
    """--set data.KEY=VALUE on a trained run: how evaluate and classify read their files (columns, header)."""
    from qkv.config import apply_overrides, to_dict
    from qkv.run import from_mapping

    for item in overrides:
        if not item.strip().startswith("data."):
            raise ConfigError(f"--set {item!r}: a trained run takes only data.* keys here (how to read the "
                              "input file, e.g. --set data.text_column=review)")
    run.cfg = from_mapping(apply_overrides(to_dict(run.cfg), overrides), source=f"{run.run_dir} with --set")


def cmd_translate(args: argparse.Namespace) -> None:
    run = _load(args)
    run.require("translate")
    with _progress(args, "translate", "sentence", _count_lines(args.input)) as progress:
        _stream(args.input, args.output, lambda names, texts: run.translate(texts, beam=args.beam, names=names),
                progress)


EVALUATE_OPTIONS = ("text", "data", "split", "src", "ref", "beam", "output", "ensemble", "tta", "confusion")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from qkv import progress

    run = _load(args)
    options = {name: getattr(args, name) for name in EVALUATE_OPTIONS if getattr(args, name) not in (None, [])}
    _note_tta(run, options.get("tta"))
    with progress.active(_progress(args, "evaluate", run.unit)):  # the family's loops tick it
        result = run.evaluate(**options)
    print(json.dumps({"run_dir": str(args.run_dir), "task": run.cfg.task, **result}))


def _note_tta(run, tta: bool | None, *, used: bool = True) -> None:
    """Say on stderr when test-time augmentation is on (it changes the probabilities), or when it is not used."""
    on = tta if tta is not None else bool(getattr(run.cfg.decode, "tta", False))
    if on and used:
        log.info("note: test-time augmentation is on (the image and its 4 one-pixel shifts are averaged; --no-tta "
                 "turns it off)")
    elif on:
        log.info("note: these probabilities are the plain image's, without the test-time augmentation that classify "
                 "and evaluate use for this run (decode.tta)")


def cmd_export(args: argparse.Namespace) -> None:
    from qkv.run import load

    print(json.dumps(load(args.run_dir).export(args.format, args.output)))


def cmd_generate(args: argparse.Namespace) -> None:
    """One prompt streams to stdout as it is sampled; several (--prompt repeated, --prompt-file) go
    through in batches, each sample followed by SAMPLE_SEPARATOR."""
    run = _load(args)
    run.require("generate")
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "seed": args.seed}
    if args.prompt_file is None and len(args.prompt) <= 1 and args.output is None:
        prompt = args.prompt[0] if args.prompt else ""
        pieces = run.stream(prompt, **settings)  # checked before the first token
        out = _stdout()
        out.write(prompt)
        for piece in pieces:
            out.write(piece)
            out.flush()
        out.write("\n")
        return
    from qkv.tasks.inference import chunked

    prompts = [("--prompt", p) for p in args.prompt] + (list(_input_items(args.prompt_file)) if args.prompt_file
                                                        else [])
    samples = []
    with _progress(args, "generate", "prompt", len(prompts)) as progress:
        for chunk in chunked(prompts, 64):  # one batch per chunk: memory stays bounded
            samples += run.generate([p for _, p in chunk], **settings)
            progress.update(len(chunk))
    _write_output(args.output, [f"{sample}\n{SAMPLE_SEPARATOR}" for sample in samples])


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
        _note_tta(run, args.tta)
        with _progress(args, "classify", run.unit, len(args.image)) as progress:
            labelled = run.classify(args.image, **options)
            progress.update(len(args.image))
        _write_output(args.output, [f"{f}\t{label}\t{prob:.4f}" for f, (label, prob) in zip(args.image, labelled)])
        return
    column = getattr(run.cfg.data, "text_column", None) if args.set else None
    if column is not None:  # a TSV/CSV with a header: label its column
        texts = _column_texts(args.input, column)
        with _progress(args, "classify", run.unit, len(texts)) as progress:
            labelled = run.classify(texts, **options)
            progress.update(len(texts))
        _write_output(args.output, [f"{label}\t{prob:.4f}" for label, prob in labelled])
        return
    with _progress(args, "classify", run.unit, _count_lines(args.input)) as progress:
        _stream(args.input, args.output,
                lambda names, texts: [f"{label}\t{prob:.4f}" for label, prob in run.classify(texts, **options)],
                progress)


def _column_texts(path: str | None, column: str) -> list[str]:
    """Column ``column`` of a TSV/CSV file with a header (--input); an unknown name lists the header."""
    from qkv.data.text import read_tsv

    if path is None or path == "-":
        raise ConfigError(f"--set data.text_column={column}: give the TSV/CSV file as --input FILE")
    table = read_tsv(path, header=True, delimiter="," if str(path).endswith(".csv") else "\t")
    if column not in table.columns:
        raise DataError(f"{path}:1: header {list(table.columns)} has no column {column!r}; choose one with "
                        "--set data.text_column=NAME")
    i = table.columns.index(column)
    return [row[i] for row in table.rows]


def cmd_attention(args: argparse.Namespace) -> None:
    from qkv.attention_maps import draw_run_attention  # --image F --out F.png goes on to qkv.viz_image

    if args.image is not None:
        from qkv.run import load

        _note_tta(load(args.run_dir), None, used=False)
    print(json.dumps(draw_run_attention(args.run_dir, args.output, text=args.text, image=args.image, kind=args.kind,
                                        layer=args.layer, head=args.head, max_tokens=args.max_tokens,
                                        device=resolve_device(args.device or "cpu"))))


def cmd_plot(args: argparse.Namespace) -> None:
    from qkv.viz import plot_run

    print(json.dumps({"out": str(plot_run(args.run_dir, args.output))}))


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
    total = len(args.image) if args.image else _count_lines(args.input)
    with _progress(args, "embed", run.unit, total) as progress:
        if args.image:
            vectors = run.embed(args.image, **options)
            progress.update(len(args.image))
        else:  # a chunk of lines at a time: only the (N, D) result grows
            parts = []
            for chunk in chunked(_input_items(args.input)):
                parts.append(run.embed([t for _, t in chunk], **options))
                progress.update(len(chunk))
            vectors = np.concatenate(parts) if parts else run.embed([], **options)
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    atomic_write_bytes(Path(args.output), buffer.getvalue())
    print(json.dumps({"output": args.output, "shape": list(vectors.shape)}))


def cmd_data(args: argparse.Namespace) -> None:
    from qkv.data.fetch import fetch

    out = Path(args.output) if args.output else Path("data") / args.name
    written = fetch(args.name, out, url=args.url)
    print(json.dumps({"dataset": args.name, "dir": str(out), "files": [str(p) for p in written]}))


def cmd_config(args: argparse.Namespace) -> None:
    """list: name<TAB>description per preset; show NAME: its YAML; keys TASK|CONFIG: key<TAB>default<TAB>meaning."""
    from qkv import presets

    if args.action == "list":
        _write_output(None, [f"{name}\t{about}" for name, about in presets.list_presets()])
        return
    if not args.name:
        raise ConfigError(f"qkv config {args.action} needs a NAME (qkv config list shows the presets)")
    if args.action == "show":
        _stdout().write(presets.preset_text(args.name))
        return
    _write_output(None, [f"{key}\t{default}\t{meaning}" for key, default, meaning in presets.config_keys(args.name)])


def cmd_study(args: argparse.Namespace) -> None:
    """Both studies write a Markdown report with PNGs into --output (default runs/studies/NAME); see qkv/studies/.

    Quick mode says, on stderr and in the report, that its settings are too small to conclude from."""
    from qkv.studies import QUICK_NOTE, default_out

    seed_everything(0)
    out = args.output if args.output is not None else default_out(args.name)
    if args.quick:
        log.warning("%s", QUICK_NOTE)
    command = " ".join(["qkv study", *sys.argv[2:]]) if sys.argv[1:2] == ["study"] else f"qkv study {args.name}"
    if args.name == "rnn-vs-attention":
        import dataclasses

        from qkv.studies import rnn_vs_attention as study

        settings = study.settings_for(args.quick)
        if args.multi30k_steps is not None:
            settings = dataclasses.replace(settings, multi30k_steps=args.multi30k_steps)
        report = study.run_study(out, args.work, settings=settings, data_dir=args.data,
                                 extra_runs=tuple(args.run), command=command, parts=tuple(args.part or study.PARTS))
    else:
        from qkv.studies import attention_variants as study

        report = study.run_study(out, settings=study.settings_for(args.quick), command=command)
    print(json.dumps({"study": args.name, "report": str(report)}))
