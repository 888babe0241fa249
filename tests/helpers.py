"""Helpers shared by the suites that need a writable dataset of their own."""

from __future__ import annotations

import shutil
from pathlib import Path


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
