"""The `colbert-jax` command line: one subcommand per job, each a thin shim over the library.

Exit codes: 0 success, 1 failure while running, 2 bad usage or bad input (missing file, bad config key).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _convert(args: argparse.Namespace) -> int:
    import colbert_jax
    from colbert_jax.checkpoint import JAX_PARAMS

    src_is_jax = (Path(args.src) / JAX_PARAMS).is_file()
    target = args.to or ("torch" if src_is_jax else "jax")
    model = colbert_jax.load_checkpoint(args.src)
    out = model.save(args.dst, format=target, overwrite=args.overwrite)
    print(f"wrote {target} checkpoint: {out}  ({model})")
    return EXIT_OK


def _quickstart(args: argparse.Namespace) -> int:
    from colbert_jax import quickstart

    return quickstart.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colbert-jax", description="ColBERTv2 + PLAID in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between the PyTorch ColBERTv2 layout and ours",
        description="Convert a checkpoint. SRC is a PyTorch ColBERTv2 directory (model.safetensors "
        "or pytorch_model.bin, read without torch), a Hub id, or a colbert-jax directory. "
        "By default the other layout is written.",
    )
    p.add_argument("src", help="checkpoint directory or Hub id")
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--to", choices=["torch", "jax"], help="output layout (default: the other one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_convert)

    p = sub.add_parser("quickstart", help="the default model on the built-in corpus", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    from colbert_jax.checkpoint import CheckpointError
    from colbert_jax.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ConfigError, CheckpointError, ValueError, TypeError) as e:
        print(f"colbert-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
