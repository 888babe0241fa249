"""Helpers shared by the suites: a writable copy of a dataset, a benchmark script loaded as a module."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the scripts are not a package), so a test can call its functions."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_dataset(src: Path, dst: Path, *, with_userU: bool = False) -> Path:
    """Copy a dataset without its cache; with ``with_userU`` also build its UserU pairs and reuse the source's
    encoded text vectors (built before the copy so the pairs' own texts are encoded on first use)."""
    from qanchor.data.userU import build_userU

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".qanchor_cache"))
    if with_userU:
        build_userU(dst, progress=False)
        text = Path(src) / ".qanchor_cache" / "text"
        if text.is_dir():
            shutil.copytree(text, dst / ".qanchor_cache" / "text", dirs_exist_ok=True)
    return dst


def add_users_without_data(dataset: Path, task: str) -> int:
    """Append to ``task``'s labels twice as many users as it has, none of them with an event or a tabular row (labels
    keyed by other ids than the events'); return the task's labelled users now."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(dataset) / "tasks" / f"{task}.parquet"
    labels = pq.read_table(path)
    strangers = pa.table({"user_id": [f"x{i:03d}" for i in range(2 * labels.num_rows)],
                          "label": pa.array([i % 2 for i in range(2 * labels.num_rows)], pa.int8())})
    pq.write_table(pa.concat_tables([labels, strangers.cast(labels.schema)]), path)
    return 3 * labels.num_rows


def flip_a_byte_unnoticed(path: Path) -> int:
    """Flip one bit of the Parquet file ``path`` (a disk fault) where a reader that verifies no page checksum reads
    another table without an error; return the byte's offset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = Path(path).read_bytes()
    expected = pq.read_table(pa.BufferReader(good))
    for at in range(4, len(good) - 8):
        flipped = bytearray(good)
        flipped[at] ^= 0x10
        try:
            unnoticed = not pq.read_table(pa.BufferReader(bytes(flipped))).equals(expected)
        except Exception:  # pyarrow raises several types for a file it cannot decode: noticed
            unnoticed = False
        if unnoticed:
            Path(path).write_bytes(bytes(flipped))
            return at
    raise AssertionError(f"{path}: no byte flips unnoticed")
