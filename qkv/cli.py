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
        from qkv.checkpoint import atomic_write_bytes

        atomic_write_bytes(Path(path), text.encode("utf-8"))


# -- commands -------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> None:
    from qkv import demo

    torch.manual_seed(args.seed)
    result = demo.run(args.out, seed=args.seed)
    r = result["retrieval"]
    print("Attention as retrieval: one query compared with four keys")
    print(f"  query q = {r['query'].tolist()}")
    for i, (k, v, s, a) in enumerate(zip(r["keys"], r["values"], r["scores"], r["weights"]), start=1):
        k, v = [round(x, 3) for x in k.tolist()], [round(x, 3) for x in v.tolist()]
        print(f"  k{i} = {k}  v{i} = {v}  s{i} = q.k{i}/sqrt(d_k) = {s:.3f}  a{i} = {a:.3f}")
    print(f"  output = sum_i a_i v_i = {[round(x, 3) for x in r['output'].tolist()]}")
    print(f"Multi-head attention weights written to {result['picture']}")


def _cmd_train(args: argparse.Namespace) -> None:
    from qkv import run

    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if args.resume:
        cfg = run.read_run_config(out, args.set)
    else:
        cfg = run.load_config(args.config, args.set)
    device = resolve_device(args.device or cfg.train.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    seed_everything(cfg.train.seed)
    metrics = run.train_run(cfg, out, device=device, resume=args.resume, progress=not args.quiet)
    print(json.dumps({"run_dir": str(out), **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}))


def _cmd_translate(args: argparse.Namespace) -> None:
    from qkv.decode import translate
    from qkv.run import load_run

    device = resolve_device(args.device)
    cfg, model, (src_tok, tgt_tok) = load_run(args.run_dir, device=device, task="translation")
    lines = _read_input(args.input)
    beam = args.beam if args.beam is not None else cfg.decode.beam_size
    if beam < 1:
        raise ConfigError(f"--beam must be >= 1, got {beam}")
    keep = [i for i, line in enumerate(lines) if line.strip()]
    hyps = translate(model, src_tok, tgt_tok, [lines[i] for i in keep], beam_size=beam,
                     length_penalty=cfg.decode.length_penalty, batch_size=cfg.decode.batch_size, device=device)
    out = [""] * len(lines)
    for i, hyp in zip(keep, hyps):
        out[i] = hyp
    _write_output(args.output, out)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from qkv.decode import translate
    from qkv.metrics import corpus_scores
    from qkv.run import load_run

    if not args.src or not args.ref:
        raise ConfigError("evaluate on a translation run needs --src FILE and --ref FILE")
    from qkv.data.parallel import read_parallel

    device = resolve_device(args.device)
    cfg, model, (src_tok, tgt_tok) = load_run(args.run_dir, device=device, task="translation")
    corpus = read_parallel(args.src, args.ref)
    beam = args.beam if args.beam is not None else cfg.decode.beam_size
    hyps = translate(model, src_tok, tgt_tok, corpus.src, beam_size=beam, length_penalty=cfg.decode.length_penalty,
                     batch_size=cfg.decode.batch_size, device=device)
    if args.output:
        _write_output(args.output, hyps)
    print(json.dumps({"run_dir": str(args.run_dir), "sentences": len(hyps), "beam": beam,
                      **corpus_scores(hyps, corpus.tgt)}))


def _cmd_data(args: argparse.Namespace) -> None:
    from qkv.data.fetch import fetch_multi30k

    kwargs = {"base_url": args.url} if args.url else {}
    written = fetch_multi30k(args.out, **kwargs)
    print(json.dumps({"dataset": args.name, "dir": str(args.out), "files": [str(p) for p in written]}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkv", description="Attention and the Transformer, end to end.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="attention as retrieval, and a heatmap of multi-head attention")
    p.add_argument("--out", default="runs/demo", help="folder for the pictures (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0)
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

    p = sub.add_parser("translate", help="translate lines with a trained translation run")
    p.add_argument("run_dir")
    p.add_argument("--input", help="source file, one sentence per line (default: stdin)")
    p.add_argument("--output", help="output file (default: stdout)")
    p.add_argument("--beam", type=int, help="beam size (default: the run's decode.beam_size; 1 = greedy)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_translate)

    p = sub.add_parser("evaluate", help="score a trained run; prints one JSON object")
    p.add_argument("run_dir")
    p.add_argument("--src", help="translation: source file")
    p.add_argument("--ref", help="translation: reference file, aligned with --src")
    p.add_argument("--beam", type=int)
    p.add_argument("--output", help="also write the hypotheses here")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_evaluate)

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
        message = " ".join(str(err).split("\n"))
        print(f"qkv: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
