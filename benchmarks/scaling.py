"""Does the data side grow linearly with the users? Times the steps every command pays per user, at several sizes.

A step whose cost grows faster than the users is invisible on the demo's 2,500 households and takes hours on a
team's millions. For each size this builds (or reuses) a synthetic dataset, then times:

- ``users_scan``: reading every user, ``ds.users()`` (the export's and the bench's pass);
- ``users_by_id``: reading every user by id, ``ds.users(ids)`` (what an export shard, prompt-tune, the bench's peers
  and ``QAnchor.embed(ds)`` do): it compared object arrays pair by pair and was quadratic (36 s for 40,000 ids);
- ``labels_check``: reading a ``user_id,label`` file of every user, ``custom_task`` (``bench / prompt-tune labels=``);
- ``userU_pairs`` (with ``--pairs``): building the UserU pairs, ``build_userU``.

and prints each figure with its growth per doubling of the users (2.0 is linear). Example (about 4 minutes on 2 idle
cores, most of it building the datasets; kept under ``--root`` for the next run)::

    python benchmarks/scaling.py --users 10000,40000 --root results/scaling --out results/scaling/scaling.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.csv as pacsv  # noqa: E402

from data_tools.synth import build_synthetic  # noqa: E402
from qanchor.data.dataset import load_dataset  # noqa: E402
from qanchor.data.forecast import _fits, _question_tokenizer  # noqa: E402
from qanchor.data.io import write_json  # noqa: E402
from qanchor.data.labels import custom_task  # noqa: E402
from qanchor.data.userU import build_userU  # noqa: E402
from qanchor.logs import log  # noqa: E402

STEPS = ("users_scan", "users_by_id", "labels_check", "userU_pairs")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(root: Path, n_users: int, pairs: bool, seed: int = 0) -> dict[str, float]:
    """Seconds of each step on a synthetic dataset of ``n_users`` users under ``root`` (built once)."""
    ds_dir = root / f"synth-{n_users}"
    if not (ds_dir / "manifest.yaml").exists():
        log(f"scaling: building {ds_dir}")
        build_synthetic(ds_dir, n_users=n_users, seed=seed, progress=False)
    ds = load_dataset(ds_dir)
    ids = ds.user_ids.tolist()
    with tempfile.TemporaryDirectory(dir=root) as scratch:  # the labels file is this run's own, never a user's in --root
        labels = Path(scratch) / f"labels-{n_users}.csv"
        pacsv.write_csv(pa.table({"user_id": ids, "label": (np.arange(len(ids)) % 2).astype(np.int8)}), labels)
        out = {"users_scan": _timed(lambda: sum(1 for _ in ds.users())),
               "users_by_id": _timed(lambda: sum(1 for _ in ds.users(ids))),
               "labels_check": _timed(lambda: custom_task(ds, labels, "Will this user buy a bike?"))}
    if pairs:
        _question_tokenizer()  # loaded once per process: the first size alone would pay it
        _fits.cache_clear()  # each size asks its own questions afresh, not the cache the size before filled
        out["userU_pairs"] = _timed(lambda: build_userU(ds_dir, progress=False))
    return out


def growth(sizes: list[int], seconds: list[float]) -> float:
    """The factor a step's time grows by per doubling of the users (2.0: linear), from the first and last sizes."""
    doublings = np.log2(sizes[-1] / sizes[0])
    return float((seconds[-1] / max(seconds[0], 1e-9)) ** (1 / doublings)) if doublings > 0 else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", default="10000,40000", help="comma-separated dataset sizes (at least two)")
    ap.add_argument("--root", required=True, help="folder for the synthetic datasets (reused when already built)")
    ap.add_argument("--pairs", action="store_true", help="also time building the UserU pairs")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    try:
        sizes = sorted({int(s) for s in args.users.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--users {args.users}: give whole numbers of users, e.g. 10000,40000")
    if len(sizes) < 2 or sizes[0] < 20:
        ap.error(f"--users {args.users}: give at least two sizes of 20 users or more, e.g. 10000,40000 (a labels file "
                 "needs both classes)")
    root = Path(args.root)
    if root.exists() and not root.is_dir():
        ap.error(f"--root {root} is a file; give a folder for the datasets")
    root.mkdir(parents=True, exist_ok=True)
    rows = {n: measure(root, n, args.pairs) for n in sizes}
    steps = [s for s in STEPS if s in rows[sizes[0]]]
    print(f"{'step':<14}" + "".join(f"{n:>12,}" for n in sizes) + f"{'x per doubling':>16}")
    for step in steps:
        seconds = [rows[n][step] for n in sizes]
        print(f"{step:<14}" + "".join(f"{s:>11.2f}s" for s in seconds) + f"{growth(sizes, seconds):>16.2f}")
    if args.out:
        write_json({"sizes": sizes, "seconds": {str(n): rows[n] for n in sizes},
                    "growth_per_doubling": {s: growth(sizes, [rows[n][s] for n in sizes]) for s in steps}}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
