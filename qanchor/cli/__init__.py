"""The ``qanchor`` command line: one convention for every command.

    qanchor <command> [--config FILE] [--quiet] key=value ...

``--config`` is an optional YAML file of the command's typed config (its dataclass in ``qanchor.config``
is the command's signature; defaults there), ``key=value`` settings override it. Commands that act on
one dataset in place take its directory as a positional argument (``qanchor data validate DIR``).
Every user error ends as one line ``error: ...`` on stderr and exit code 2; ``--quiet`` prints only the
result. Long jobs show a progress bar on a terminal and log lines in a log file.

    qanchor data synth out=data/synth users=2000 seed=1
    qanchor data completejourney out=data/completejourney
    qanchor data validate data/completejourney
    qanchor data userU data/completejourney
    qanchor pretrain --config configs/pretrain/tiny-cj.yaml data.path=data/completejourney output_dir=runs/cj
    qanchor prompt-tune --config configs/prompt_tune/tiny-cj.yaml checkpoint=runs/cj output_dir=runs/cj-heads
    qanchor bench --config configs/bench/tiny-cj.yaml checkpoint=runs/cj heads_dir=runs/cj-heads
    qanchor embed checkpoint=runs/cj data.path=data/completejourney queries=tasks out=emb/cj
    qanchor update checkpoint=runs/cj state=state/d0 events=[day1.parquet] out=state/d1
    qanchor index build embeddings=emb/cj query_id=churn out=churn.faiss

Layer: the top (its commands import every other package; nothing imports it). Only the module of the command being
run is imported (`qanchor.cli.common.COMMANDS`).
"""

from __future__ import annotations

import errno
import importlib
import os
import select
import sys
import warnings

from qanchor.cli.common import COMMANDS, EXIT_USER_ERROR, Parser, parse
from qanchor.errors import QAnchorError
from qanchor.logs import quiet_third_party, warn

__all__ = ["main", "build_parser", "EXIT_USER_ERROR"]


def _command_word(argv: list[str]) -> str | None:
    """The command ``argv`` names (its first word that is not a flag), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> Parser:
    """The ``qanchor`` parser, with full sub-parsers for the command ``argv`` names (every command if ``argv`` is None).

    Commands ``argv`` does not name get a help-only stub, so ``qanchor --help`` lists them all without importing their
    stacks (see :data:`~qanchor.cli.common.COMMANDS`).
    """
    parser = Parser(prog="qanchor", description="Query-conditioned user embeddings (Q-Anchor).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    if argv is None:
        modules = list(dict.fromkeys(module for module, _ in COMMANDS.values()))
    else:
        named = _command_word(argv)
        modules = [COMMANDS[named][0]] if named in COMMANDS else []
    for module in modules:
        importlib.import_module(module).register(sub)
    for name, (_, help_text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text)
    return parser


# What the machine refused, not a bug of qanchor's: one error line saying what to do, not a traceback. Every write
# is atomic, so what was there before is intact.
_ENVIRONMENT_ERRORS = {
    errno.EACCES: "check the permissions of that path, or choose another one",
    errno.EPERM: "check the permissions of that path, or choose another one",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.ENOSPC: "free some disk space (or choose a path on another disk) and run the command again",
    errno.EDQUOT: "the disk quota is used up: free some space and run the command again",
    errno.ENOTDIR: "a folder on that path is a file: choose another path",
    errno.EEXIST: "a file is in the way on that path: choose another path",
    errno.ENAMETOOLONG: "the name is too long for the file system: give a shorter path (a question goes in a file)",
}


def _refuse_flags_before_the_command(argv: list[str]) -> None:
    """`qanchor --quiet data synth ...` or `qanchor --config c.yaml pretrain`: argparse called the flag unknown, or the
    config file an invalid command; both belong after the command's name."""
    first = next((i for i, a in enumerate(argv) if a in COMMANDS), len(argv))
    early = [a for a in argv[:first] if a in ("--quiet", "--config") or a.startswith("--config=")]
    if early:
        print(f"error: qanchor: {early[0].split('=')[0]} goes after the command's name, e.g. `qanchor pretrain "
              "--config FILE --quiet key=value` (see `qanchor --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _as_log_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as the project's own ``warning:`` line: under the CLI, the caller's line a library warning names
    is the console script's, which tells a user nothing."""
    warn(str(message))


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    shown_as, warnings.showwarning = warnings.showwarning, _as_log_line
    try:
        return _run(argv)
    finally:  # on every way out, --help and usage errors included: a caller's own warnings show as before
        warnings.showwarning = shown_as


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has closed it (the cause of a BrokenPipeError, or another pipe's:
    a socket, a subprocess). Its write end then polls as an error."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a stdout without a descriptor (a notebook, a buffer)
        return False
    if not hasattr(select, "poll"):  # no poll on this system: most likely the pipe is stdout
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _run(argv: list[str] | None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        # The `deepspeed` launcher hands each rank `--local_rank=N` (before the command under --module); the rank is in
        # LOCAL_RANK as well, which is what qanchor reads, so the flag is dropped rather than refused.
        argv = [a for i, a in enumerate(argv) if not a.startswith("--local_rank=")
                and not (a == "--local_rank" or (i > 0 and argv[i - 1] == "--local_rank"))]
        _refuse_flags_before_the_command(argv)
        args = parse(build_parser(argv), argv)
        if not hasattr(args, "func"):  # the command was not the first plain word: parse again with every command
            args = parse(build_parser(), argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    try:
        args.func(args)
    except QAnchorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe (a socket, a subprocess): a bug or the machine's, with its traceback
        # the reader of stdout has gone (`qanchor data validate DIR | head`, a log pipe that died): the command stopped
        # there, which is said, not passed off as success; stdout then points at /dev/null, since Python's flush at exit
        # would raise again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # a stdout without a descriptor (a notebook, a redirect to a buffer)
            pass
        print("error: standard output was closed before the command finished (a pipe's reader stopped reading); the "
              "command stopped there", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRORS:
            raise  # anything else is a bug: keep its traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror}; {_ENVIRONMENT_ERRORS[exc.errno]}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
