"""The `splice` command. Each subcommand lives in a small function; heavy imports happen lazily."""

from __future__ import annotations

import argparse
import sys

from splice.errors import SpliceError


def _cmd_modular(args: argparse.Namespace) -> int:
    from splice.modular.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splice", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("modular", help="flatten modular_*.py files into standalone modeling files")
    p.add_argument("paths", nargs="+", help="modular_<name>.py files or folders holding them")
    p.add_argument("--output-dir", default=None, help="where to write (default: beside each modular file)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 with a diff if files on disk are stale")
    p.add_argument("--jobs", type=int, default=1, help="files converted in parallel")
    p.set_defaults(func=_cmd_modular)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpliceError as exc:
        print(f"splice {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"splice {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
