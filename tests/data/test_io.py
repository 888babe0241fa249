"""Claiming an output directory: atomic, safe when several processes (torchrun ranks) claim it at once."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys

import pytest

import qanchor.data.io as io
from qanchor.data.io import MARKER_FILE, OutputKind, claim_output_dir, output_kind
from qanchor.errors import OutputError


def test_second_claim_while_first_marker_is_being_written(tmp_path, monkeypatch):
    """The torchrun race CI once hit: rank 1 looked while rank 0's marker was still a temporary."""
    target = tmp_path / "out"
    results: list[bool] = []
    started: list[bool] = []

    def other_rank_claims(name: str) -> None:
        if name == "atomic-file" and not started:
            started.append(True)
            results.append(claim_output_dir(target, OutputKind.EXPORT))

    monkeypatch.setattr(io, "failpoint", other_rank_claims)
    first = claim_output_dir(target, OutputKind.EXPORT)
    assert results == [False] and first is True  # the inner claim won; the outer one found it ready
    assert output_kind(target) == "embedding export"
    assert sorted(p.name for p in target.iterdir()) == [MARKER_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporaries left beside it


def _claim(target: str) -> str:
    try:
        return str(claim_output_dir(target, OutputKind.EXPORT))
    except OutputError as e:
        return f"error: {e}"


def test_many_processes_claim_at_once(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(6) as pool:
        for round_ in range(4):
            target = str(tmp_path / f"out{round_}")
            outcomes = pool.map(_claim, [target] * 12)
            assert not [o for o in outcomes if o.startswith("error")], outcomes
            assert output_kind(target) == "embedding export"
            assert sorted(os.listdir(target)) == [MARKER_FILE]
    assert sorted(os.listdir(tmp_path)) == [f"out{i}" for i in range(4)]


def test_claim_killed_mid_marker_leaves_target_claimable(tmp_path):
    target = tmp_path / "out"
    code = subprocess.run([sys.executable, "-c", "import sys; from qanchor.data.io import OutputKind, claim_output_dir; "
                           "claim_output_dir(sys.argv[1], OutputKind.EXPORT)", str(target)],
                          env={**os.environ, "QANCHOR_FAILPOINT": "atomic-file:1"}).returncode
    assert code == -signal.SIGKILL
    assert not target.exists()  # nothing half-claimed at the target itself
    assert claim_output_dir(target, OutputKind.EXPORT) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the dead claim's temporary was removed


def test_claim_keeps_refusing_foreign_and_other_kinds(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not create.*notes.txt"):
        claim_output_dir(foreign, OutputKind.EXPORT)
    assert (foreign / "notes.txt").read_text() == "mine"
    run = tmp_path / "run"
    assert claim_output_dir(run, OutputKind.RUN) is False
    with pytest.raises(OutputError, match="pretraining run, not an embedding export"):
        claim_output_dir(run, OutputKind.EXPORT)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_output_dir(empty, OutputKind.EXPORT) is False and output_kind(empty) == "embedding export"
    assert claim_output_dir(empty, OutputKind.EXPORT) is True


def test_claim_through_a_link_to_an_empty_directory(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert claim_output_dir(link, OutputKind.EXPORT) is False
    assert link.is_symlink() and output_kind(real) == "embedding export"
    assert claim_output_dir(link, OutputKind.EXPORT) is True


def test_an_empty_directory_made_beforehand_is_claimed_in_place(tmp_path, monkeypatch):
    """A rename over an existing empty directory replaced it: its mode, group and setgid bit were lost (and on a mount
    point the rename fails, EBUSY, with a traceback). ``output_dir=.`` failed on the temporary's empty name."""
    made = tmp_path / "made"
    made.mkdir()
    made.chmod(0o2770)
    inode = made.stat().st_ino
    assert claim_output_dir(made, OutputKind.RUN) is False and output_kind(made) == "pretraining run"
    assert made.stat().st_ino == inode and made.stat().st_mode & 0o7777 == 0o2770
    assert sorted(p.name for p in made.iterdir()) == [MARKER_FILE]  # no temporary left in it
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert claim_output_dir(".", OutputKind.RUN) is False and output_kind(here) == "pretraining run"
    assert claim_output_dir(".", OutputKind.RUN) is True


def test_an_empty_output_path_is_refused_not_read_as_the_working_folder(tmp_path, monkeypatch):
    """`output_dir=$OUT` with $OUT unset gave "", which Path reads as "." : the output was claimed and written in the
    working folder. "." written out stays the working folder (the test above)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="^output_dir is empty; give the directory to write into$"):
        claim_output_dir("", OutputKind.RUN, key="output_dir")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_directory_on_a_file_system_without_hard_links_is_claimed(tmp_path, monkeypatch):
    """vfat, SMB and some FUSE mounts refuse os.link (EPERM, EOPNOTSUPP, ENOSYS): the claim ended in a traceback."""
    import errno

    def no_links(src, dst):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(io.os, "link", no_links)
    target = tmp_path / "mount"
    target.mkdir()
    assert claim_output_dir(target, OutputKind.EXPORT) is False and output_kind(target) == "embedding export"
    assert sorted(p.name for p in target.iterdir()) == [MARKER_FILE]


def test_a_checkpoint_saved_before_its_names_were_recorded_keeps_a_users_files(tmp_path):
    """Only a marker that records its names protected a checkpoint: one saved by an earlier qanchor (no record) was
    still replaced whole, notes and all. A killed writer's temporary in an output is ours, not the user's."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / MARKER_FILE).write_text('{"kind": "checkpoint", "qanchor_version": "0.1.0"}\n')
    for name in ("config.yaml", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "STEP"):
        (ck / name).write_text("x")
    (ck / ".STEP.qanchor-tmp.4000000-host.0badc0de").write_text("half")
    io.check_replaceable(ck, OutputKind.CHECKPOINT)  # its own files (and a temporary): may be replaced
    (ck / "NOTES.md").write_text("mine")
    with pytest.raises(OutputError, match=r"also 'NOTES.md'"):
        io.check_replaceable(ck, OutputKind.CHECKPOINT)
    (ck / "NOTES.md").unlink()
    (ck / "tokenizer_notes.md").write_text("mine")  # named like a tokenizer's file, and not one
    with pytest.raises(OutputError, match=r"also 'tokenizer_notes.md'"):
        io.check_replaceable(ck, OutputKind.CHECKPOINT)


def test_an_output_whose_marker_this_user_cannot_read_is_named_so_not_foreign(tmp_path, monkeypatch):
    """Another user's output written under umask 077 has a marker this user cannot read: it was refused as a folder
    holding "files qanchor did not create", naming the marker itself as the foreign file."""
    import errno
    from pathlib import Path

    out = tmp_path / "theirs"
    assert claim_output_dir(out, OutputKind.EXPORT) is False
    real = Path.read_text

    def denied(self, *args, **kwargs):  # tests run as root, whom chmod 000 does not stop
        if self.name == MARKER_FILE:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    for claim in (io.check_output_dir, claim_output_dir):
        with pytest.raises(OutputError, match=rf"out {out}: its qanchor marker {MARKER_FILE} cannot be read by this "
                                              r"user \(Permission denied\); give a directory of your own or ask its "
                                              "owner") as info:
            claim(out, OutputKind.EXPORT)
        assert "did not create" not in str(info.value)
    assert output_kind(out) is None  # a marker no one can read names no kind, as before


def test_an_output_folder_this_user_cannot_list_is_named_so(tmp_path, monkeypatch):
    """Under a umask of 077 qanchor makes another user's output folder 0700 itself, so this user fails on listing the
    folder, before its marker: that was a raw PermissionError traceback from the Python API."""
    import errno
    from pathlib import Path

    out = tmp_path / "theirs"
    assert claim_output_dir(out, OutputKind.EXPORT) is False
    real = Path.iterdir

    def denied(self):  # tests run as root, whom chmod 700 under another owner does not stop
        if self == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    for claim in (io.check_output_dir, claim_output_dir):
        with pytest.raises(OutputError, match=rf"out {out}: this user cannot list it \(Permission denied\); give a "
                                              "directory of your own or ask its owner"):
            claim(out, OutputKind.EXPORT)


def test_another_claims_temporary_marker_is_not_foreign(tmp_path):
    """Ranks claiming one existing empty directory at once: one's marker, still a temporary inside it, is ours."""
    target = tmp_path / "out"
    target.mkdir()
    (target / f".{MARKER_FILE}.qanchor-tmp.123-host.0badc0de").write_text("{}")
    assert claim_output_dir(target, OutputKind.EXPORT) is False and output_kind(target) == "embedding export"


def test_a_whole_directory_output_through_a_link_replaces_the_directory_and_keeps_the_link(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    real.mkdir()
    for version in ("v1", "v2"):
        with io.atomic_dir(link, OutputKind.DATASET) as tmp:
            (tmp / "a.txt").write_text(version)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "a.txt").read_text() == "v2" and output_kind(real) == "dataset"
    assert not [p for p in tmp_path.iterdir() if p.name not in ("real", "link")]  # no temporaries left


@pytest.mark.parametrize("how", ["check", "atomic_dir", "claim"])
def test_a_link_to_nothing_is_refused_before_any_work(tmp_path, how):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "unmounted" / "data", target_is_directory=True)
    with pytest.raises(OutputError, match="is a link to .* which does not exist"):
        if how == "check":
            io.check_replaceable(link, OutputKind.DATASET)
        elif how == "claim":
            claim_output_dir(link, OutputKind.EXPORT)
        else:
            with io.atomic_dir(link, OutputKind.DATASET):
                raise AssertionError("the work must not start")
    assert link.is_symlink() and not (tmp_path / "unmounted").exists()


def test_a_temporary_of_another_machine_is_left_alone_and_a_dead_local_one_is_removed(tmp_path):
    """On a file system shared by the nodes of a job, a pid says nothing about another machine's writer: removing its
    temporary (a live rank's partition build, say) would break its rename."""
    target = tmp_path / "users-abc"
    dead = 2 ** 22 + 12345  # above the default pid_max: no process of this machine has it
    assert not io._pid_alive(dead)
    other = tmp_path / f".users-abc.qanchor-tmp.{dead}-ffffffff.0a1b2c3d"
    local = tmp_path / f".users-abc.qanchor-tmp.{dead}-{io._host()}.0a1b2c3d"
    older = tmp_path / f".users-abc.qanchor-tmp.{dead}.0a1b2c3d"  # written before names carried the machine
    for p in (other, local, older):
        p.mkdir()
    assert io._host() != "ffffffff"
    io.recover_temporaries(target)
    assert other.exists() and not local.exists() and not older.exists()
    assert io._temp_name(target, "qanchor-tmp").name.split(".")[-2] == f"{os.getpid()}-{io._host()}"


def test_a_second_writer_of_an_output_is_refused_and_the_lock_ends_with_the_command(tmp_path):
    """Two processes writing one output (an export started twice, one with overwrite=true; two benches; a resumed
    pretraining while the first still runs) both finished and left it mixed. The first holds a lock; the second is
    refused at once; the lock ends with the command, not the process (a notebook runs the next one)."""
    import fcntl
    import os

    from qanchor.data.io import hold_output, releasing_outputs
    from qanchor.errors import OutputError

    out = tmp_path / "out"
    out.mkdir()

    def locked_elsewhere() -> bool:  # as another process sees it: a lock of its own on the directory
        fd = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    @releasing_outputs
    def command() -> bool:
        hold_output(out, "benchmark")
        hold_output(out, "benchmark")  # taken twice by one process (a nested step): held once, no self-refusal
        return locked_elsewhere()

    assert command() is True and locked_elsewhere() is False
    other = os.open(out, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(OutputError, match="being written by another running qanchor benchmark"):
            command()
    finally:
        os.close(other)
    assert command() is True


def test_weights_files_get_the_permissions_the_umask_allows(infer_env, tmp_path):
    """safetensors writes 0600: a checkpoint or head in a group's shared folder was unreadable to the rest of the group,
    while every other file beside it was readable."""
    import stat

    from qanchor.data.io import as_umask_allows

    def mode(path) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    umask = os.umask(0o027)
    try:
        weights = tmp_path / "w.safetensors"
        weights.write_bytes(b"x")
        os.chmod(weights, 0o600)
        as_umask_allows(weights)
        assert mode(weights) == 0o640
    finally:
        os.umask(umask)
    assert mode(infer_env.ckpt / "model.safetensors") == mode(infer_env.ckpt / "config.yaml") == 0o666 & ~umask
