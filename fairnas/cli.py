"""The ``fairnas`` command: one subcommand per stage, each in a module of ``fairnas.commands``.

Every module in that package defines ``register(subparsers)``; the CLI discovers them, so a new
command is one new file. Errors the user can fix (bad config, bad architecture, bad file) end
with a one-line message and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any

import fairnas.commands
from fairnas.config import ConfigError
from fairnas.io import CheckpointError, OutputWriteError
from fairnas.training import NonFiniteError

logger = logging.getLogger(__name__)

# A full disk and a diverged run are fixable too (free space; lower the learning rate or skip
# such steps), and their messages name the file or the step: one line serves better than a trace.
USER_ERRORS = (ConfigError, CheckpointError, ValueError, FileNotFoundError, NotADirectoryError,
               OutputWriteError, NonFiniteError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairnas",
        description="FairNAS: strict-fairness supernet training, search, retraining, models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_info in sorted(pkgutil.iter_modules(fairnas.commands.__path__),
                              key=lambda m: m.name):
        module = importlib.import_module(f"fairnas.commands.{module_info.name}")
        module.register(subparsers)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``, repeated ``--set key=value``, ``--out-dir`` and ``--json``."""
    parser.add_argument("--config", help="YAML file whose values replace the defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one config key, e.g. search.seed=3")
    parser.add_argument("--out-dir", help="where outputs go (config key out_dir)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def config_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "out_dir", None):
        overrides.append(f"out_dir={args.out_dir}")
    return overrides


def emit(result: dict[str, Any], as_json: bool, text: str | None = None) -> None:
    """Print a command's result: one JSON object, or readable text."""
    if as_json:
        print(json.dumps(result))
    else:
        print(text if text is not None else "\n".join(f"{k}: {v}" for k, v in result.items()))


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        print(f"fairnas {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fairnas {args.command}: interrupted; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
