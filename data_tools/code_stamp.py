"""A stamp file whose time says when the code that builds a dataset last changed in what it does.

    python3 -m data_tools.code_stamp .make/synth.code data_tools.synth qanchor/cli/data.py

The Makefile rebuilds a dataset when the code that writes it is newer than the dataset. Listing that code by hand missed
files (the validator, the dataset reader and ``qanchor.data.io`` all shape what a builder writes), and file times change
on a checkout or a branch switch that leaves the code as it was. This stamp holds a SHA-256 of every file the given
modules import, directly or not, within this repository (the ``qanchor`` and ``data_tools`` packages; imports inside
functions count too), and of each ``.py`` file named as it is. It is rewritten, and its time moves, only when a digest
changes, so a dataset is rebuilt exactly when what builds it reads differently.

A Python file's digest is that of its syntax tree without docstrings (:func:`code_digest`), not of its bytes: an edited
comment, docstring or line break does not rebuild every dataset (nor restart the demos' pretraining on it). The tree's
printed form can differ between Python versions, so the Makefile writes and checks the stamp with one interpreter,
``python3`` (not the virtual environment's, which may be another version); a new ``python3`` may rebuild them once.

Only the standard library is used: the stamp is checked on every ``make``, before any virtual environment exists
(``make -n`` on a fresh clone), and must not import torch.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: the folder that holds qanchor/ and data_tools/
PACKAGES = ("qanchor", "data_tools")


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None  # a name imported from a module (a function, a class), not a module of its own


def _imported(module: str, source: Path) -> list[str]:
    """The repository's modules ``source`` imports (``from x import y`` may name module ``x.y``, so it is tried too)."""
    package = module if source.name == "__init__.py" else module.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"), filename=str(source))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package ``level - 1`` above this module's own
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return [name for name in found if name.split(".")[0] in PACKAGES]


def code_files(roots: list[str]) -> list[Path]:
    """Every repository file the ``roots`` (module names, or ``.py`` paths taken alone) import, directly or not, sorted.

    A module's packages count too (``import a.b`` runs ``a/__init__.py``).
    """
    files: set[Path] = set()
    pending = [root for root in roots if not root.endswith(".py")]
    for root in roots:
        if root.endswith(".py"):
            path = (ROOT / root).resolve()
            if not path.is_file():
                raise SystemExit(f"code_stamp: no file {root} under {ROOT}")
            files.add(path)
    seen: set[str] = set()
    for module in pending:
        if _module_file(module) is None:
            raise SystemExit(f"code_stamp: no module {module} under {ROOT}")
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        source = _module_file(module)
        if source is None:
            continue
        files.add(source)
        parts = module.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts))]
        pending += _imported(module, source)
    return sorted(files)


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def code_digest(path: Path) -> str:
    """SHA-256 of what a file does: a ``.py`` file's syntax tree with its docstrings left out (comments, blank lines
    and line numbers are not in the tree), any other file's bytes.

    (A docstring can be read at run time, as ``__doc__``: the builders read theirs only for ``--help``.)
    """
    if path.suffix != ".py":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if (isinstance(node, _DOCUMENTED) and node.body and isinstance(node.body[0], ast.Expr)
                and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)):
            node.body = node.body[1:]
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


def stamp_text(roots: list[str]) -> str:
    """The stamp's contents: one ``sha256  path`` line per file, the digest :func:`code_digest`'s."""
    return "".join(f"{code_digest(path)}  {path.relative_to(ROOT).as_posix()}\n" for path in code_files(roots))


def write_if_changed(stamp: Path, text: str) -> bool:
    """Write ``text`` to ``stamp`` (atomically) unless it already holds it; True when it was written."""
    try:
        if stamp.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    write_atomically(stamp, text)
    return True


def write_atomically(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` through a temporary file renamed into place, with the mode a plain write would
    give (0666 less the umask): mkstemp's 0600 kept another user of a shared checkout from reading the stamp."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m data_tools.code_stamp STAMP MODULE|FILE.py [MODULE|FILE.py ...]", file=sys.stderr)
        return 2
    write_if_changed(Path(argv[0]), stamp_text(argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
