"""The resume key must be this user's alone: whoever can write it can seal a pickle that resume=true then loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qanchor.errors import CheckpointError
from qanchor.train.seal import key_path, resume_key, seal_tag, verify_tag


@pytest.fixture
def tag(tmp_path, monkeypatch):
    monkeypatch.setenv("QANCHOR_RESUME_KEY", str(tmp_path / "private" / "resume.key"))
    out = tmp_path / "run" / "ds_state" / "step-0000002"
    out.mkdir(parents=True)
    (out / "mp_rank_00_model_states.pt").write_bytes(b"state")
    return out


def test_a_key_in_a_shared_cache_is_never_used(tmp_path, monkeypatch):
    """The key lived under $QANCHOR_CACHE, which a group may share: a member who planted resume.key there sealed a
    pickle of their own, and the victim's resume ran it."""
    monkeypatch.setenv("QANCHOR_CACHE", str(tmp_path / "shared"))
    monkeypatch.delenv("QANCHOR_RESUME_KEY", raising=False)
    assert key_path() == Path.home() / ".cache" / "qanchor" / "keys" / "resume.key"


def test_the_default_key_gets_a_private_folder_under_a_group_writable_cache(tmp_path, monkeypatch):
    """Under umask 002 ~/.cache/qanchor is 0775 (the serving text cache and converted weights create it): a key kept
    there was refused at the first save, after save_every steps of training. It has a folder of its own, made 0700;
    a private key from before that folder existed is taken over, so runs it sealed still resume."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QANCHOR_RESUME_KEY", raising=False)
    cache = tmp_path / "home" / ".cache" / "qanchor"
    cache.mkdir(parents=True)
    earlier = cache / "resume.key"
    earlier.write_bytes(b"K" * 32)
    earlier.chmod(0o600)
    old = os.umask(0o002)
    try:
        cache.chmod(0o700)  # the earlier key's folder was private: its key is this user's, taken over
        assert resume_key() == b"K" * 32 and key_path().parent.stat().st_mode & 0o777 == 0o700
        key_path().unlink()
        cache.chmod(0o775)  # group-writable: the earlier key could have been swapped, so a new one is made
        key = resume_key()
        assert key != b"K" * 32 and len(key) == 32 and resume_key() == key
        assert (key_path().stat().st_mode & 0o777, key_path().parent.stat().st_mode & 0o777) == (0o600, 0o700)
    finally:
        os.umask(old)


def test_a_key_others_could_read_or_replace_is_refused(tag, tmp_path):
    seal_tag(tag)  # creates the key, private
    key = key_path()
    assert (key.stat().st_mode & 0o777, key.parent.stat().st_mode & 0o077) == (0o600, 0)
    verify_tag(tag)
    key.chmod(0o644)  # readable by others: they can forge seals
    with pytest.raises(CheckpointError, match=r"the resume key .* is open to other users \(mode 0o644\)"):
        verify_tag(tag)
    key.chmod(0o600)
    key.parent.chmod(0o777)  # a folder others can write: the key could be swapped for theirs
    with pytest.raises(CheckpointError, match=r"the folder of the resume key .* is open to other users"):
        resume_key()
    key.parent.chmod(0o700)
    try:
        os.chown(key, os.getuid() + 1, -1)  # someone else's key, private to them
    except PermissionError:  # only root can give a file away; elsewhere the modes above are what is checked
        pass
    else:
        with pytest.raises(CheckpointError, match=r"the resume key .* is owned by another user"):
            resume_key()
    planted = tmp_path / "planted.key"
    planted.write_bytes(b"A" * 32)
    planted.chmod(0o600)
    key.unlink()
    key.symlink_to(planted)  # a link to a file someone else knows
    with pytest.raises(CheckpointError, match="cannot read the resume key .*a symbolic link is refused"):
        verify_tag(tag)
