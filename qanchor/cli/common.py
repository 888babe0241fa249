"""What every command shares: the parser that fails in one line, and ``[--config FILE] key=value`` settings."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from qanchor.config import load_config

__all__ = ["EXIT_USER_ERROR", "Parser", "add_settings", "parse", "settings", "print_record"]

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line (exit 2) pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        hint = ""
        if "unrecognized arguments: --" in message:
            hint = "; settings are key=value (e.g. checkpoint=DIR), not --flags"
        print(f"error: {self.prog}: {message}{hint} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def add_settings(p: argparse.ArgumentParser, schema: type, example: str) -> None:
    """``--config FILE``, ``--quiet`` and ``key=value`` settings of ``schema`` (the command's typed config)."""
    p.add_argument("--config", default=None, help=f"a YAML file of {schema.__name__} settings (optional)")
    p.add_argument("--quiet", action="store_true", help="print only the result: no progress, no log lines")
    p.set_defaults(schema=schema)
    p.epilog = f"settings: key=value ... of {schema.__name__} (qanchor.config), anywhere on the line, e.g. {example}"


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse flags and positionals; every remaining word must be a ``key=value`` setting of the command."""
    args, extras = parser.parse_known_args(argv)
    words = [e for e in extras if not e.startswith("-") and "=" not in e]
    if getattr(args, "positional", None) and len(words) == 1:  # a command's one free-text argument (ask's question)
        setattr(args, args.positional, words[0])
        extras = [e for e in extras if e is not words[0]]
    bad = [e for e in extras if e.startswith("-") or "=" not in e]
    if bad or (extras and not hasattr(args, "schema")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extras)}")
    args.settings = extras
    return args


def settings(args: argparse.Namespace) -> Any:
    """The command's typed config: defaults, then ``--config``, then ``key=value`` settings."""
    return load_config(args.config, list(args.settings), schema=args.schema)


def print_record(line: str) -> None:
    """Print one machine-read line in a single write, so the lines of torchrun ranks sharing stdout never interleave.

    ``print`` writes the text and its newline separately, and unbuffered (``PYTHONUNBUFFERED``, ``-u``) each is
    its own system call: two ranks then produce ``{rank 0}{rank 1}`` on one line. One write of a line shorter than
    the pipe's atomic size (4 KiB on Linux) reaches the reader whole.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
