"""Console output of long jobs: progress bars on a terminal, plain log lines everywhere else.

A cluster job writes to a file: a tqdm bar there is one growing line of carriage returns, and silence
for minutes looks like a hang. So on a terminal long loops show a bar; otherwise they print a start
line, a line every ``every_s`` seconds (done / total, rate, ETA) and a last line when done. Third-party
chatter (transformers' weight-loading bars and notices, DeepSpeed's info logs) is kept out of our
output by :func:`quiet_third_party` (the CLI) and, for a library caller, by :func:`hf_bars_off_terminal` around
every model qanchor loads itself; warnings and errors still pass.

Example:
    >>> for record in progress(ds.users(), total=ds.num_users, desc="embed", unit="user"):  # doctest: +SKIP
    ...     ...
    >>> log("pretrain: start")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

__all__ = ["interactive", "progress_lines", "log", "warn", "caller_stacklevel", "results_on_stdout", "progress", "Progress", "quiet_third_party", "hf_bars_off_terminal", "format_seconds"]

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")


def interactive() -> bool:
    """True when progress bars make sense: stderr (where bars go) is a terminal."""
    return sys.stderr.isatty() and os.environ.get("QANCHOR_NO_BARS") is None


def progress_lines() -> bool:
    """True when long work should write progress lines: no bar shows it, or stdout (where lines go) is a file, as in
    ``qanchor pretrain ... > train.log`` run from a terminal (the bar then shows on the terminal, the lines go to the
    file)."""
    return not interactive() or not sys.stdout.isatty()


@contextmanager
def hf_bars_off_terminal() -> Iterator[None]:
    """Off a terminal, no transformers progress bars (weight loading, shard writing) inside this block.

    The CLI silences them for the whole process (:func:`quiet_third_party`), but a pipeline that calls
    ``QAnchor.from_pretrained`` from Python got a "Loading weights" bar in its job log for the sentence encoder
    qanchor loads on its behalf. Only the models qanchor loads itself are wrapped, and transformers' switch is
    restored afterwards, so the caller's own loads keep the bars they chose.
    """
    if interactive():
        yield
        return
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


_LOG_TO_STDERR = False  # while a command whose stdout carries its result runs (results_on_stdout)


def log(message: str) -> None:
    """One timestamped line, flushed (a log file shows it at once): on stdout, or on stderr while a command whose
    stdout is its result runs (:func:`results_on_stdout`)."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=sys.stderr if _LOG_TO_STDERR else sys.stdout,
          flush=True)


def caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that names the first caller outside qanchor (the user's own line,
    whichever public function it called), counted from the function that calls this one."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str) -> None:
    """A timestamped ``warning:`` line on stderr, always: a warning must never land in a result read from stdout
    (``qanchor ask ... json=true``, a library caller's own output)."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} warning: {message}", file=sys.stderr, flush=True)


def results_on_stdout(command: Callable[P, R]) -> Callable[P, R]:
    """Run ``command`` with every log line on stderr: its stdout carries only its result (JSON that a script reads,
    ``> report.json`` from cron)."""
    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        global _LOG_TO_STDERR
        before, _LOG_TO_STDERR = _LOG_TO_STDERR, True
        try:
            return command(*args, **kwargs)
        finally:
            _LOG_TO_STDERR = before

    return run


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``1m15s``; ``3725`` -> ``1h02m``.

        >>> format_seconds(75.2), format_seconds(3725)
        ('1m15s', '1h02m')
    """
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """A bar on a terminal, log lines elsewhere; ``update(n)`` as work is done, ``close()`` at the end.

    Where its lines would land in a file (stdout not a terminal, even with a bar on the terminal's stderr; for a
    :func:`results_on_stdout` command, stderr not a terminal) it logs when it starts, then at most every ``every_s``
    seconds, and when closed.
    ``enabled=False`` is silent (``--quiet``); ``lines=False`` never writes lines (the caller writes its own).
    """

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
                 every_s: float = 30.0, initial: int = 0, lines: bool = True):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n, self.postfix = initial, ""
        self._start = self._last = time.perf_counter()
        self._initial = initial
        self._bar = None
        # Where the lines go decides when they are written. A command whose stdout is its log (`qanchor data userU ...
        # > run.log` from a terminal) writes them whenever stdout is a file, as pretraining does (progress_lines()): the
        # bar shows on the terminal (stderr), the file gets start, progress and summary. A command whose stdout is its
        # result (`qanchor update ... > report.json`, results_on_stdout) logs on stderr, so only where no bar shows.
        self._logging = enabled and lines and (not interactive() if _LOG_TO_STDERR else progress_lines())
        if enabled and interactive():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        if self._logging:
            log(f"{desc}: start" + (f", {total} {unit}" if total is not None else ""))

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        if self._logging and time.perf_counter() - self._last >= self.every_s:
            self._last = time.perf_counter()
            log(self._line())

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def _line(self, done: bool = False, stopped: bool = False) -> str:
        elapsed = time.perf_counter() - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        where = f"{self.n}/{self.total}" if self.total else str(self.n)
        eta = ""
        if not done and not stopped and self.total and rate > 0:
            eta = f", ETA {format_seconds((self.total - self.n) / rate)}"
        head = f"{self.desc}: {'stopped, ' if stopped else 'done, ' if done else ''}{where} {self.unit}"
        return f"{head} in {format_seconds(elapsed)} ({rate:.1f} {self.unit}/s{eta})" + (f"; {self.postfix}" if self.postfix else "")

    def close(self, stopped: bool = False) -> None:
        """End the bar; ``stopped``: the work was cut short (an error, Ctrl-C), so the last line must not say done."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._logging:
            self._logging = False
            log(self._line(done=not stopped, stopped=stopped))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(stopped=exc_type is not None)


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
             every_s: float = 30.0) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Progress` (bar on a terminal, log lines elsewhere, nothing if disabled)."""
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = Progress(total, desc, unit, enabled, every_s)
    finished = False
    try:
        for item in items:
            yield item
            bar.update(1)
        finished = True
    finally:
        bar.close(stopped=not finished)  # an exception, or a consumer that stopped early


class _UnseenOutputsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "unknown inputs or outputs type" not in record.getMessage()


def quiet_third_party() -> None:
    """Keep transformers / DeepSpeed / tokenizers notices and weight-loading bars out of our output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers reads these two when it is first imported; setting them instead of importing it here keeps
    # commands that never load a model (``qanchor --help``, ``qanchor data validate``) from paying ~1 s for it.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # already imported (a library caller): set it directly
        transformers = sys.modules["transformers"]
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "lightning", "pytorch_lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # ZeRO-3: DeepSpeed calls collectives torch has deprecated, and warns that its hooks cannot see into the user
    # encoder's dataclass outputs, which is harmless (every weight of the encoder sits in a submodule that returns
    # tensors, qanchor.model.user_encoder.EmptyTokens): nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                            "deprecated", category=FutureWarning)
    for name in ("DeepSpeed", "deepspeed"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UnseenOutputsFilter) for f in logger.filters):
            logger.addFilter(_UnseenOutputsFilter())
