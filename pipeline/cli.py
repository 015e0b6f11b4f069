"""``latentpipe``: the command line. Each subcommand is a thin module in ``latentpipe.pipeline.commands``.

A subcommand module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Errors the user can fix (bad arguments, bad config, missing inputs)
are ``UserError``/``ConfigError`` and print one line; anything else prints one line too
unless ``-v`` asks for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn, TypeVar

from latentpipe.preprocessing.config import ConfigError, dump_yaml, load_config

# Order is the order shown by --help.
SUBCOMMANDS = (
    "latentpipe.pipeline.commands.synth",
    "latentpipe.pipeline.commands.shard",
    "latentpipe.pipeline.commands.encode",
    "latentpipe.pipeline.commands.train",
    "latentpipe.pipeline.commands.sample",
    "latentpipe.pipeline.commands.eval",
    "latentpipe.pipeline.commands.demo",
    "latentpipe.pipeline.commands.verify",
)

T = TypeVar("T")
log = logging.getLogger("latentpipe")


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """A YAML config file and dotted ``key=value`` overrides as positionals, plus --print-config."""
    p.add_argument("items", nargs="*", metavar="[config.yaml] [key=value ...]",
                   help="an optional YAML config, then dotted overrides such as train.lr=1e-4")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def resolve_config(cls: type[T], args: argparse.Namespace, flags: dict[str, Any] | None = None) -> T:
    """Defaults <- YAML file <- explicit flags (those not None) <- dotted overrides."""
    path: str | None = None
    overrides: list[str] = []
    for item in getattr(args, "items", []) or []:
        if "=" in item:
            overrides.append(item)
        elif path is None and (item.endswith((".yaml", ".yml")) or Path(item).is_file()):
            path = item
        else:
            raise ConfigError(f"unexpected argument {item!r}: expected one config.yaml and key=value overrides")
    base: dict[str, Any] = {}
    if path is not None:
        from latentpipe.preprocessing.config import read_yaml

        base = read_yaml(path)
    for key, value in (flags or {}).items():
        if value is None:
            continue
        node = base
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = str(value) if isinstance(value, Path) else value
    return load_config(cls, None, overrides, base=base)


def print_config_and_exit(cfg: Any, args: argparse.Namespace) -> bool:
    if getattr(args, "print_config", False):
        sys.stdout.write(dump_yaml(cfg))
        return True
    return False


def _load(name: str) -> ModuleType:
    return importlib.import_module(name)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; its subcommand parsers are kept in ``parser.subcommands`` (name -> parser)."""
    parser = _Parser(
        prog="latentpipe",
        description="Shard image-caption data, precompute latents, and train text-to-image priors.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and full tracebacks")
    from latentpipe.preprocessing import __version__

    parser.add_argument("--version", action="version", version=f"latentpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subcommands: dict[str, argparse.ArgumentParser] = {}
    parser.set_defaults(_subcommands=subcommands)
    for modname in SUBCOMMANDS:
        mod = _load(modname)
        p = subcommands[mod.NAME] = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.__doc__)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logs and full tracebacks")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; a subcommand's positionals (``key=value`` overrides) may follow or sit among
    its flags (``train cfg.yaml --nproc 2 steps=100``): argparse's intermixed parsing, per subcommand
    (``parse_intermixed_args`` does not take a parser with subcommands itself)."""
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    command = getattr(args, "command", None)
    if command is None:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    tokens = list(sys.argv[1:] if argv is None else argv)
    sub_args = args._subcommands[command].parse_intermixed_args(tokens[tokens.index(command) + 1:])
    vars(args).update(vars(sub_args))
    return args


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    level = logging.DEBUG if verbose else logging.INFO
    for name in ("latentpipe", "pipeline", "preprocessing", "training"):
        logging.getLogger(name).setLevel(level)


def _ray_cause(e: BaseException) -> str | None:
    if "ray" not in sys.modules:
        return None
    from latentpipe.preprocessing.local_ray import ray_root_cause

    return ray_root_cause(e)


def one_line(e: BaseException) -> str:
    """``Type: first line``; for a failed Ray task or actor, that of the exception that really failed it."""
    if (cause := _ray_cause(e)) is not None:
        return cause
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch weights at run time
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # quiet by default
    parser = build_parser()
    args = parse_args(parser, argv)
    verbose = bool(getattr(args, "verbose", False))
    setup_logging(verbose)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (UserError, ConfigError, FileNotFoundError) as e:
        if verbose:
            raise
        print(f"latentpipe {args.command}: error: {_ray_cause(e) or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latentpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if verbose:
            raise
        print(f"latentpipe {args.command}: {one_line(e)} (rerun with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # `python -m latentpipe.pipeline.cli`: run the imported module, whose UserError the commands raise
    from latentpipe.pipeline.cli import main as _main

    sys.exit(_main())
