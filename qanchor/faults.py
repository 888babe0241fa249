"""Deterministic fault injection for the crash-safety tests (``tests/test_faults.py``).

``QANCHOR_FAILPOINT=name:n`` makes the process kill itself with SIGKILL (what ``kill -9`` or an OOM killer
does: no cleanup, no ``finally``) the n-th time execution reaches ``failpoint("name")``. The points sit
where a crash hurts most: between writing a temporary and publishing it, between writing a shard and
marking it done, between a DeepSpeed save and its seal. Unset (always, outside tests) a call is one
environment lookup.

Example:
    $ QANCHOR_FAILPOINT=shard-written:2 qanchor embed ...   # dies right after writing the second shard
"""

from __future__ import annotations

import os
import signal

__all__ = ["failpoint", "FAILPOINTS"]

FAILPOINTS = ("atomic-file", "atomic-dir", "dir-exchanged", "shard-written", "train-step", "ds-saved", "head-saved",
              "bench-row-saved")

# Hits per point in this process. Module state on purpose: the count must survive across call sites, and
# it only ever matters in a test process that set QANCHOR_FAILPOINT.
_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """SIGKILL this process if ``QANCHOR_FAILPOINT`` names this point and this is its n-th hit."""
    spec = os.environ.get("QANCHOR_FAILPOINT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
