"""The command line: argument parsing only; every command calls a library module.

Errors the user can fix (bad files, bad arguments, bad configs) print one line
``qkv: error: ...`` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

log = logging.getLogger("qkv")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkv", description="Attention and the Transformer, end to end.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="attention as retrieval, and a heatmap of multi-head attention")
    p.add_argument("--out", default="runs/demo", help="folder for the picture (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
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
    except (ValueError, OSError, KeyError) as err:
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"qkv: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
