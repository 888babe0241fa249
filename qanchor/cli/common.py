"""What every command shares: the parser that fails in one line, and ``[--config FILE] key=value`` settings."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Any, NoReturn

from qanchor.config import load_config

__all__ = ["COMMANDS", "EXIT_USER_ERROR", "Parser", "add_command", "add_settings", "parse", "settings", "print_record"]

EXIT_USER_ERROR = 2

# command -> (the module that implements it, its one-line help). The command line imports only the module of
# the command it runs: each module pulls its own stack (torch, transformers, scikit-learn: about 5 s for all of
# them on 2 CPU cores), which `qanchor --help` or `qanchor data validate` should not wait for.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("qanchor.cli.data", "build, check and prepare datasets"),
    "pretrain": ("qanchor.cli.train", "pretrain Q-Anchor under DeepSpeed (resumable)"),
    "prompt-tune": ("qanchor.cli.tune", "soft prompt tuning of scenario heads with class prototypes (one per task)"),
    "embed": ("qanchor.cli.infer", "export embeddings of every user x query to Parquet shards (resumable)"),
    "update": ("qanchor.cli.infer", "daily incremental update of a state (or build the first one)"),
    "ask": ("qanchor.cli.infer", "the model's answer to a question about one user (or its pick of options=[...])"),
    "describe": ("qanchor.cli.infer", "a short profile of one user; every statement verified against its events"),
    "index": ("qanchor.cli.infer", "faiss look-alike search over exported embeddings"),
    "uqa": ("qanchor.cli.bench", "multiple-choice questions about held-out users: Q-Anchor vs TextN vs prior"),
    "bench": ("qanchor.cli.bench", "AUC / KS benchmark of Q-Anchor against peers (k-fold over users)"),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line (exit 2) pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        hint = ""
        if "unrecognized arguments: --" in message:
            hint = "; settings are key=value (e.g. checkpoint=DIR), not --flags"
        print(f"error: {self.prog}: {message}{hint} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def add_command(subparsers: Any, name: str) -> argparse.ArgumentParser:
    """The sub-parser of one top-level command, with its help from :data:`COMMANDS`."""
    return subparsers.add_parser(name, help=COMMANDS[name][1])


def add_settings(p: argparse.ArgumentParser, schema: type, example: str) -> None:
    """``--config FILE``, ``--quiet`` and ``key=value`` settings of ``schema`` (the command's typed config)."""
    p.add_argument("--config", default=None, help=f"a YAML file of {schema.__name__} settings (optional)")
    p.add_argument("--quiet", action="store_true", help="print only the result: no progress, no log lines")
    p.set_defaults(schema=schema)
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # the settings list keeps its lines
    p.epilog = (f"settings: key=value ... of {schema.__name__} (qanchor.config), anywhere on the line, e.g.\n  {example}\n\n"
                "every setting, with its default (before a --config file):\n" + "\n".join(f"  {key}={value}" for key, value in settings_listing(schema)))


def settings_listing(schema: type, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, default)`` for every setting of a config dataclass, sections flattened (``train.lr``)."""
    out = []
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = "(required)"
        if dataclasses.is_dataclass(value):
            out += settings_listing(type(value), f"{prefix}{f.name}.")
        else:
            text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            out.append((f"{prefix}{f.name}", text))
    return out


# A key=value setting: a dotted name, then "=". Text with an "=" elsewhere ("Did this user spend >= 100?") is not one.
_SETTING = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*=")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse flags and positionals; every remaining word must be a ``key=value`` setting of the command."""
    args, extras = parser.parse_known_args(argv)
    words = [e for e in extras if not e.startswith("-") and not _SETTING.match(e)]
    if getattr(args, "positional", None) and len(words) == 1:  # a command's one free-text argument (ask's question)
        setattr(args, args.positional, words[0])
        extras = [e for e in extras if e is not words[0]]
    bad = [e for e in extras if e.startswith("-") or not _SETTING.match(e)]
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
