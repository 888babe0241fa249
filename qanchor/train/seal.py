"""Seal DeepSpeed resume state so that ``resume=true`` only ever unpickles state this user wrote.

DeepSpeed saves optimizer and scheduler state with ``torch.save`` and reads it back with pickle, which
can execute code. Model weights never travel that way in qanchor (they are safetensors), but resuming
a run reads ``ds_state/``. A run directory received from someone else must not be resumed, so each
saved tag gets a seal: the SHA-256 of every file in it, authenticated with an HMAC keyed by a secret
that only this user can read or write (``~/.cache/qanchor/keys/resume.key``, mode 0600 in a folder of mode 0700, or
``$QANCHOR_RESUME_KEY``; never under a shared ``$QANCHOR_CACHE``, and refused when others could read or replace it). On resume, a tag
whose seal is missing, forged or stale (a file changed) is refused before DeepSpeed touches it.

Example:
    >>> seal_tag(Path("runs/x/ds_state/step-0000100"))  # doctest: +SKIP
    >>> verify_tag(Path("runs/x/ds_state/step-0000100"))  # raises CheckpointError if not ours  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path

from qanchor.data.io import write_text
from qanchor.errors import CheckpointError

__all__ = ["SEAL_FILE", "seal_tag", "verify_tag", "resume_key", "key_path", "mark_saving", "saving_marked", "clear_saving"]

SEAL_FILE = "qanchor-seal.json"


def key_path() -> Path:
    """Where this user's resume key lives: ``$QANCHOR_RESUME_KEY``, else ``~/.cache/qanchor/keys/resume.key``. Never
    under ``$QANCHOR_CACHE``, which a group may share: whoever could write a key there could seal a pickle of their own.
    The default has a folder of its own, which qanchor creates private: ``~/.cache/qanchor`` also holds the serving
    text cache and converted weights, made with the user's umask (group-writable under the common 002)."""
    given = os.environ.get("QANCHOR_RESUME_KEY")
    return Path(given).expanduser() if given else _qanchor_home() / "keys" / "resume.key"


def _qanchor_home() -> Path:
    return Path.home() / ".cache" / "qanchor"


def _adopt_earlier_key(path: Path) -> None:
    """Runs sealed before the key had its own folder were sealed with ``~/.cache/qanchor/resume.key``: take that key
    over (linked, so both name one file) when it is still private to this user, so those runs keep resuming. One
    that others could have replaced is left alone (its runs can then only be restarted)."""
    earlier = _qanchor_home() / "resume.key"
    if os.environ.get("QANCHOR_RESUME_KEY") or path.exists():
        return
    try:
        folder, st = earlier.parent.stat(), os.lstat(earlier)
    except OSError:
        return
    private = (folder.st_uid == st.st_uid == os.getuid() and not folder.st_mode & 0o022 and stat.S_ISREG(st.st_mode)
               and not st.st_mode & 0o077)
    if private:
        try:
            os.link(earlier, path)
        except OSError:  # another process adopted it first, or no hard links here: a new key then
            pass


def _refuse_unless_private(path: Path, st: os.stat_result, what: str, bits: int) -> None:
    if st.st_uid != os.getuid() or st.st_mode & bits:
        raise CheckpointError(f"{what} {path} is {'owned by another user' if st.st_uid != os.getuid() else 'open to other users'} "
                              f"(mode {oct(st.st_mode & 0o777)}): anyone who can write the resume key can make this "
                              "user unpickle their files. Fix it (chmod go-rwx on the key, go-w on its folder) or point "
                              "QANCHOR_RESUME_KEY at a private path (runs sealed with another key can then only be restarted)")


def resume_key() -> bytes:
    """This user's secret (created on first use, readable by this user only; refused when it is not private)."""
    path = key_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _adopt_earlier_key(path)
    if not path.exists():
        # written whole under a temporary name, then linked into place: a kill never leaves an empty (forgeable) key,
        # and of several processes creating it at once the first link wins and every one reads that key
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    # the folder first: in a folder others can write, the key could be swapped after it was checked
    _refuse_unless_private(path.parent, path.parent.stat(), "the folder of the resume key", 0o022)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # a link to someone else's file is not this user's key
    except OSError as exc:
        raise CheckpointError(f"cannot read the resume key {path} ({exc.strerror}; a symbolic link is refused)") from None
    with os.fdopen(fd, "rb") as fh:
        _refuse_unless_private(path, os.fstat(fh.fileno()), "the resume key", 0o077)
        key = fh.read()
    if len(key) < 32:
        raise CheckpointError(f"{path} holds {len(key)} bytes, not a 32-byte key (damaged); remove it: runs sealed with it "
                              "can then no longer be resumed, only restarted")
    return key


def _digests(tag: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in tag.rglob("*") if p.is_file() and p.name != SEAL_FILE):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[path.relative_to(tag).as_posix()] = h.hexdigest()
    return out


def _mac(files: dict[str, str]) -> str:
    return hmac.new(resume_key(), json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def seal_tag(tag: Path) -> None:
    """Write ``tag/qanchor-seal.json``: the digest of every file in the tag, authenticated for this user."""
    files = _digests(tag)
    write_text(json.dumps({"files": files, "mac": _mac(files)}, indent=1), tag / SEAL_FILE)


def verify_tag(tag: Path) -> None:
    """Raise CheckpointError unless ``tag`` carries this user's valid seal over exactly its current files."""
    path = tag / SEAL_FILE
    why = None
    try:
        seal = json.loads(path.read_text())
        files = seal["files"]
        if not hmac.compare_digest(str(seal["mac"]), _mac(files)):
            why = "its seal was not made by this user"
        elif files != _digests(tag):
            why = "its files changed after they were sealed"
    except (OSError, ValueError, KeyError, TypeError):
        why = "it carries no valid qanchor seal"
    if why:
        raise CheckpointError(
            f"refusing to resume from {tag}: {why}. DeepSpeed reads resume state with pickle, which can run code, so "
            "qanchor only resumes runs this user wrote on this machine. Use the run's checkpoint/ (safetensors) for "
            "inference or prompt tuning, or start a new run (resume=false in a new output_dir)")


def _saving_note(state: Path, tag: str) -> Path:
    return state / f"saving-{tag}.json"


def mark_saving(state: Path, tag: str) -> None:
    """Before DeepSpeed writes ``tag`` into ``state``: a note, authenticated for this user, that the save is this
    run's own. A save killed before its seal is then known as ours and incomplete (skipped on resume, the run starting
    afresh if it was the first), not taken for state someone else put there (refused)."""
    write_text(json.dumps({"tag": tag, "mac": _mac({"saving": tag})}), _saving_note(state, tag))


def saving_marked(state: Path, tag: str) -> bool:
    """Whether ``state`` holds this user's valid :func:`mark_saving` note for ``tag``."""
    try:
        note = json.loads(_saving_note(state, tag).read_text())
        return note["tag"] == tag and hmac.compare_digest(str(note["mac"]), _mac({"saving": tag}))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def clear_saving(state: Path, tag: str) -> None:
    _saving_note(state, tag).unlink(missing_ok=True)
