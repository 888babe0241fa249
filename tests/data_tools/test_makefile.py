"""What the Makefile runs, read from the file and checked with ``make -n`` in a copy of the repository (no build)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.code_stamp import ROOT

needs_make = pytest.mark.skipif(shutil.which("make") is None or shutil.which("python3") is None,
                                reason="needs GNU make and python3")


def _copy_repo(tmp_path: Path, venv: bool = True) -> Path:
    """The Makefile and the code it runs, copied; with ``venv``, a .venv whose python is this one (the copy's qanchor
    first on its path) and whose ``qanchor`` says what it ran and writes the files make checks, byte-identical each
    time, instead of building anything."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for part in ("Makefile", "pyproject.toml", "qanchor", "data_tools", "configs"):
        source = ROOT / part
        (shutil.copytree(source, repo / part, ignore=shutil.ignore_patterns("__pycache__")) if source.is_dir()
         else shutil.copy2(source, repo / part))
    if venv:
        bin_dir = repo / ".venv" / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "python").write_text(f'#!/bin/bash\nexec {sys.executable} "$@"\n')
        (bin_dir / "qanchor").write_text(
            '#!/bin/bash\necho "ran $*"\n'
            'if [ "$1 $2" = "data userU" ]; then printf pairs > "$3/userU.parquet"; '
            'elif [ "$1" = data ]; then mkdir -p "${3#out=}" && printf manifest > "${3#out=}/manifest.yaml"; fi\n')
        for tool in bin_dir.iterdir():
            tool.chmod(0o755)
        (repo / ".venv" / ".installed").touch()
        (repo / ".venv" / ".coles").touch()
    return repo


def _make(repo: Path, *args: str) -> str:
    done = subprocess.run(["make", "--no-print-directory", *args], cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


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


@needs_make
def test_make_n_works_on_a_fresh_clone(tmp_path):
    """The code stamps run under make -n, with .venv/bin/python, which a fresh clone does not have: `make -n demo`
    (and every data, demo and uqa target) failed with 'No such file or directory', Error 127."""
    repo = _copy_repo(tmp_path, venv=False)
    for target in ("demo", "demo-synth", "uqa", "data"):
        out = _make(repo, "-n", target)
        assert "python3 -m venv .venv" in out and ".venv/bin/qanchor data " in out, out
    assert "qanchor pretrain --config configs/pretrain/tiny-cj.yaml" in _make(repo, "-n", "demo")
    assert not (repo / ".venv").exists() and not (repo / "data").exists()



def _pretrain_mode(repo: Path, target: str = "demo-synth") -> str:
    lines = [line for line in _make(repo, "-n", target).splitlines() if "qanchor pretrain" in line]
    assert len(lines) == 1, lines
    modes = re.findall(r"\b(resume|overwrite)=true\b", lines[0])
    assert len(modes) == 1, lines[0]
    return modes[0]


@needs_make
def test_a_demo_run_starts_over_only_when_its_data_changed_in_content(tmp_path):
    """The demos passed overwrite=true whenever the dataset's userU.parquet was newer than the run's checkpoint: a
    rebuild that wrote the same bytes (the builder's code changed, its output did not) discarded a finished run."""
    repo = _copy_repo(tmp_path)
    assert "ran pretrain" in _make(repo, "demo-synth")  # a first run (the stand-in writes no checkpoint)
    checkpoint = repo / "runs" / "synth" / "pretrain" / "checkpoint" / "model.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.touch()
    assert _pretrain_mode(repo) == "resume"
    with (repo / "qanchor" / "logs.py").open("a") as out:  # read by the world's builder: the data is rebuilt ...
        out.write("\n_CHANGED = 1\n")
    assert _make(repo, "data-synth").count("ran data") == 2
    pairs = repo / "data" / "synth" / "userU.parquet"
    assert pairs.stat().st_mtime_ns > checkpoint.stat().st_mtime_ns
    assert _pretrain_mode(repo) == "resume"  # ... byte-identical: the run is kept
    pairs.write_text("other pairs")
    assert _pretrain_mode(repo) == "overwrite"  # other data: it starts over
    _make(repo, "demo-synth")  # and, trained on it, is kept from then on
    assert _pretrain_mode(repo) == "resume"


@needs_make
def test_a_demo_run_without_a_record_of_its_data_is_judged_by_times(tmp_path):
    """A run pretrained before the demos recorded their data: older than its dataset's pairs, it starts over."""
    repo = _copy_repo(tmp_path)
    _make(repo, "data-synth")
    checkpoint = repo / "runs" / "synth" / "pretrain" / "checkpoint" / "model.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.touch()
    assert not (repo / ".make" / "trained-on").exists() and _pretrain_mode(repo) == "resume"
    later = checkpoint.stat().st_mtime + 10
    os.utime(repo / "data" / "synth" / "userU.parquet", (later, later))
    assert _pretrain_mode(repo) == "overwrite"


@needs_make
def test_make_n_uqa_runs_nothing_but_the_sub_makes(tmp_path):
    """The uqa recipe was one shell line that called $(MAKE), so `make -n uqa` ran all of it: `qanchor uqa` for real,
    and the demos printed 'took 0 s'."""
    repo = _copy_repo(tmp_path)
    _make(repo, "data-cj")
    out = _make(repo, "-n", "uqa")
    assert "ran " not in out, out  # the stand-in says what it ran
    assert ".venv/bin/qanchor uqa --config configs/uqa/tiny-cj.yaml" in out  # printed, not run
    assert "train.max_steps=6000" in out and "resume=true" in out  # the pretraining's sub-make prints its command
    assert not (repo / ".make" / "trained-on").exists()
    demo = _make(repo, "-n", "demo")
    assert "ran " not in demo and "took 0 s" not in demo and ".venv/bin/qanchor bench --config" in demo


@needs_make
def test_make_clean_removes_only_the_folders_it_emptied(tmp_path):
    """`make clean` ran `rmdir runs/* runs results`: an empty folder of the user's own under runs/ went with qanchor's."""
    repo = _copy_repo(tmp_path)
    for folder in ("runs/demo/pretrain", "runs/archive/cj-6000", "results/demo"):
        (repo / folder).mkdir(parents=True)
        (repo / folder / ".qanchor-output").write_text(json.dumps({"kind": "pretraining run"}))
    (repo / "runs" / "my-empty-experiment").mkdir()
    out = _make(repo, "clean")
    assert "rm -rf runs/demo/pretrain" in out and "rmdir runs/demo" in out, out
    assert sorted(p.name for p in (repo / "runs").iterdir()) == ["archive", "my-empty-experiment"]
    assert not (repo / "results").exists()  # emptied by the clean, and a folder the targets write into
    assert not any((repo / "runs" / "archive").iterdir())  # a folder of the user's own, emptied: kept
