"""The `splice` command. Each subcommand lives in a small function; heavy imports happen lazily."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from splice.errors import SpliceError


def _cmd_modular(args: argparse.Namespace) -> int:
    from splice.modular.cli import run

    return run(args)


def _cmd_convert(args: argparse.Namespace) -> int:
    from splice.convert import run

    return run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from splice.demo import run

    return run(args)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from splice.inspection import run

    return run(args)


def _cmd_consolidate(args: argparse.Namespace) -> int:
    from splice.parallel import dcp_consolidate

    if args.config is not None or dcp_consolidate.is_dcp_dir(args.shards_dir):
        return dcp_consolidate.run(args)
    from splice.parallel.consolidate import run

    return run(args)


def _positive_int(text: str) -> int:
    """An argparse type for counts such as ``--repeat`` (0 repeats have no median)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splice", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build a small Llama locally, load it fused, check, time and save it")
    p.add_argument("--workdir", default=None, help="where to put the checkpoints (default: a temp dir)")
    p.add_argument("--repeat", type=_positive_int, default=3, help="timing repeats (median is reported)")
    p.add_argument("--tokens", type=int, default=32, help="tokens to decode when timing")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("inspect", help="show what each fusion family would do to a model (no weights loaded)")
    p.add_argument("path", help="a Transformers model directory (config.json)")
    p.add_argument("--fusion", default=None, help="families (qkv,gate_up) or a JSON fusion config")
    p.add_argument(
        "--save-map", default=None, metavar="MAP.json", help="write the checkpoint -> fused weight map"
    )
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("modular", help="flatten modular_*.py files into standalone modeling files")
    p.add_argument("paths", nargs="+", help="modular_<name>.py files or folders holding them")
    p.add_argument("--output-dir", default=None, help="where to write (default: beside each modular file)")
    p.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 with a diff if files on disk are stale"
    )
    p.add_argument("--jobs", type=int, default=1, help="files converted in parallel")
    p.set_defaults(func=_cmd_modular)

    p = sub.add_parser("convert", help="convert a safetensors checkpoint to another layout with a weight map")
    p.add_argument("src", help="checkpoint directory, .safetensors file or .index.json")
    p.add_argument("dst", help="output directory (replaced atomically; must not overlap SRC)")
    p.add_argument("--map", default=None, metavar="MAP.json", help="the weight map (JSON)")
    p.add_argument("--reverse", action="store_true", help="undo a conversion (no --map: the one SRC records)")
    p.add_argument("--max-shard-size", metavar="SIZE", help="default 5GB; --reverse: the source split")
    p.add_argument("--strict", action="store_true", help="make unclaimed keys and unused rules errors")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "consolidate", help="rebuild the original checkpoint from TP shards or a DCP checkpoint (offline)"
    )
    p.add_argument(
        "shards_dir", metavar="SHARDS_DIR", help="written by splice.parallel.save_shards, or a DCP directory"
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (replaced atomically)")
    p.add_argument(
        "--config", metavar="DIR", help="for a DCP checkpoint: the config.json with its fusion_config"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_consolidate)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``kill``, a scheduler), unwound like Ctrl-C so staging directories are removed."""


def _on_sigterm(pid: int) -> Any:
    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != pid:  # a worker process forked from this one: die as SIGTERM would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise _Terminated()

    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm(os.getpid()))
    try:
        return int(args.func(args) or 0)
    except SpliceError as exc:
        print(f"splice {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except _Terminated:
        print(f"splice {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"splice {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
