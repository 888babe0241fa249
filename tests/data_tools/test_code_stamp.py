"""The Makefile rebuilds a dataset exactly when the code that builds it changed in content."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from data_tools.code_stamp import ROOT, code_digest, code_files, write_if_changed


def test_the_code_of_a_builder_is_everything_it_imports():
    """The Makefile listed a builder's code by hand and missed the files it reads through others (io.py, the
    manifest writer): a change there left a dataset built by the old code in place."""
    synth = {path.relative_to(ROOT).as_posix() for path in code_files(["data_tools.synth"])}
    assert {"data_tools/synth.py", "data_tools/__init__.py", "qanchor/__init__.py", "qanchor/data/schema.py",
            "qanchor/data/io.py", "qanchor/data/manifest.py"} <= synth
    assert "qanchor/model/qanchor_model.py" not in synth  # what the builder never reads does not rebuild it
    pairs = {path.relative_to(ROOT).as_posix() for path in code_files(["qanchor.data.userU", "qanchor/cli/data.py"])}
    assert {"qanchor/data/userU.py", "qanchor/data/forecast.py", "qanchor/data/validate.py",
            "qanchor/data/dataset.py", "qanchor/cli/data.py"} <= pairs
    with pytest.raises(SystemExit, match="no module data_tools.nosuch"):
        code_files(["data_tools.nosuch"])


def test_the_stamp_moves_only_when_its_text_changes(tmp_path):
    stamp = tmp_path / "stamps" / "synth-builder"
    assert write_if_changed(stamp, "a  x.py\n")
    os.utime(stamp, (1_000_000, 1_000_000))
    assert not write_if_changed(stamp, "a  x.py\n") and stamp.stat().st_mtime == 1_000_000
    assert write_if_changed(stamp, "b  x.py\n") and stamp.read_text() == "b  x.py\n"
    assert stamp.stat().st_mtime > 1_000_000 and [p.name for p in stamp.parent.iterdir()] == ["synth-builder"]


def test_a_comment_or_docstring_does_not_change_the_digest_of_code(tmp_path):
    """The stamp hashed the files' bytes: a comment or docstring edited in any of the ~20 files a builder imports
    (logs.py, errors.py) rebuilt every dataset and restarted the demos' pretraining."""
    code = tmp_path / "m.py"

    def digest(text: str) -> str:
        code.write_text(text)
        return code_digest(code)

    base = digest('"""Doc."""\nimport os\n\n\nclass A:\n    """Doc."""\n\n    def f(self):\n        """Doc."""\n        return 1\n')
    assert digest('"""Other doc."""\nimport os  # why\n\n# a comment\nclass A:\n    """More."""\n    def f(self):\n'
                  '        return 1  # one\n') == base
    assert digest('"""Doc."""\nimport os\n\n\nclass A:\n    """Doc."""\n\n    def f(self):\n        """Doc."""\n        return 2\n') != base
    assert digest('import os\n\n\nclass A:\n    def f(self):\n        "a string, not first"\n        "x"\n        return 1\n') != base
    data = tmp_path / "table.csv"  # a file that is not Python: its bytes
    data.write_text("a,b\n# 1\n")
    assert code_digest(data) == hashlib.sha256(b"a,b\n# 1\n").hexdigest()


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("python3") is None, reason="needs GNU make, python3")
def test_make_rebuilds_a_dataset_when_its_code_changes_not_when_a_file_is_touched(tmp_path):
    """File times change on a checkout that leaves the code as it was (a rebuild for nothing) and stay put on one that
    changes only a file the old list missed (a stale dataset benchmarked): the stamp follows content (what the code
    does: a comment alone rebuilt every dataset, before the stamp hashed syntax trees)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for part in ("Makefile", "pyproject.toml", "qanchor", "data_tools"):
        source = ROOT / part
        (shutil.copytree(source, repo / part, ignore=shutil.ignore_patterns("__pycache__")) if source.is_dir()
         else shutil.copy2(source, repo / part))
    venv = repo / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "qanchor").write_text(  # stands in for the builders: says what it ran and writes the file make checks
        '#!/bin/bash\necho "ran $2"\nif [ "$2" = userU ]; then touch "$3/userU.parquet"; '
        'else mkdir -p "${3#out=}" && touch "${3#out=}/manifest.yaml"; fi\n')
    (venv / "qanchor").chmod(0o755)
    (repo / ".venv" / ".installed").touch()

    def make() -> list[str]:
        done = subprocess.run(["make", "--no-print-directory", "data-synth"], cwd=repo, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return [line.removeprefix("ran ") for line in done.stdout.splitlines() if line.startswith("ran ")]

    assert make() == ["synth", "userU"]
    assert make() == []
    dry = subprocess.run(["make", "-n", "--no-print-directory", "data-synth"], cwd=repo, capture_output=True, text=True)
    assert "qanchor data" not in dry.stdout, dry.stdout  # -n runs the stamps, so it lists no rebuild that would not run
    (repo / "qanchor" / "data" / "validate.py").touch()  # newer, same content
    assert make() == []
    with (repo / "qanchor" / "data" / "io.py").open("a") as out:  # read by both, but a comment changes nothing
        out.write("\n# a comment\n")
    assert make() == []
    with (repo / "qanchor" / "data" / "validate.py").open("a") as out:  # read by the pairs' builder, not the world's
        out.write("\n_CHANGED = 1\n")
    assert make() == ["userU"]
    with (repo / "qanchor" / "data" / "io.py").open("a") as out:  # read by both, through the manifest writer
        out.write("\n_CHANGED = 1\n")
    assert make() == ["synth", "userU"]
    with (repo / "qanchor" / "model" / "qanchor_model.py").open("a") as out:  # read by neither
        out.write("\n_CHANGED = 1\n")
    assert make() == []
