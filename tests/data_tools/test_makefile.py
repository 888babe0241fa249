"""What the Makefile runs, read from the file and checked with ``make -n`` in a copy of the repository (no build)."""

from __future__ import annotations

import re

from data_tools.code_stamp import ROOT


def _minimum(requirement: str) -> tuple[int, ...]:
    found = re.search(r">=\s*([0-9.]+)", requirement)
    assert found, requirement
    return tuple(int(part) for part in found.group(1).split("."))


def _dev_requirement(package: str) -> str:
    """The dev extra's requirement of ``package``, read from pyproject.toml (tomllib is 3.11's; qanchor runs on 3.10)."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    dev = re.search(r"^dev\s*=\s*\[(.*?)\]", pyproject, re.M | re.S)
    assert dev, "no dev extra in pyproject.toml"
    return next(req for req in re.findall(r'"([^"]+)"', dev.group(1)) if re.match(rf"{re.escape(package)}(?![\w-])", req))


def test_the_dev_extra_requires_an_xdist_that_knows_the_options_make_test_passes():
    """`make test` passes --no-loadscope-reorder, which pytest-xdist added in 3.8.0, while the dev extra allowed 3.6:
    an install with xdist 3.6 or 3.7 failed every `make test` with 'unrecognized arguments'."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    xdist = _dev_requirement("pytest-xdist")
    if "--no-loadscope-reorder" in makefile or "--loadscope-reorder" in makefile:
        assert _minimum(xdist) >= (3, 8), xdist
