"""Pretraining killed and resumed: the same losses as an uninterrupted run, on one rank and two, and the resume state
kept sound (its tags, its metrics). Split from test_pretrain.py so that the two slow files run on different workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from qanchor.cli import main
from qanchor.data.dataset import load_dataset
from qanchor.train.pretrain import checkpoint_data_id, resume_tag, trained_data_id
from tests.train.test_pretrain import ENV, ROOT, _metrics, _pretrain_cmd, _torchrun_pretrain


def _refused(capsys, ds_dir, out, *extra: str) -> str:
    """A run refused before any work (by the checks every rank makes before it joins the others), run in this
    process: a process of its own spends seconds importing to print one line. Its error, after asserting the refusal."""
    capsys.readouterr()
    code = main(_pretrain_cmd(ds_dir, out, *extra)[3:])  # the arguments after `python -m qanchor.cli`
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    return err


def test_kill_and_resume(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen(_pretrain_cmd(prepared, out, "train.max_steps=40", "train.save_every=3"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "ds_state" / "step-0000006").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint at step 6 within 4 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # a hard kill, as a preempted node would see
    proc.wait()
    killed_at = max(r["step"] for r in _metrics(out))
    assert 6 <= killed_at < 40
    assert "resume=true" in _refused(capsys, prepared, out, "train.max_steps=10")  # never silently overwrites a run
    resumed = subprocess.run(_pretrain_cmd(prepared, out, "train.max_steps=10", "train.save_every=3", "resume=true"),
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [r["step"] for r in _metrics(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # no step logged twice, ends at max_steps
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _metrics(out))
    assert (out / "checkpoint" / "STEP").read_text().strip() == "10"
    assert checkpoint_data_id(out / "checkpoint") == trained_data_id(load_dataset(prepared))  # what it trained on
    assert (out / "checkpoint" / "DEEPSPEED").read_text() == "-\n"  # no train.deepspeed_config file: none to compare
    assert {"step", "loss", "loss_contrastive", "loss_ntp", "loss_profile", "lr", "samples_per_s"} <= set(_metrics(out)[-1])
    # Weights, optimizer, schedule, data position and RNG all resume: the losses equal an uninterrupted run's.
    straight = tmp_path / "straight"
    done = subprocess.run(_pretrain_cmd(prepared, straight, "train.max_steps=10", "train.save_every=3"),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed_losses = {r["step"]: r["loss"] for r in _metrics(out)}
    assert {r["step"]: r["loss"] for r in _metrics(straight)} == resumed_losses
    # the rate each step used (warm-up 1/2, 2/2, then constant), not the next step's, which engine.step had set
    assert [r["lr"] for r in _metrics(straight)][:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    # Resuming under another recipe would mix two in one run: refused before any work, naming what differs.
    other = _refused(capsys, prepared, out, "train.max_steps=12", "train.lr=0.01", "resume=true")
    assert "train.lr: 0.001 -> 0.01" in other and "overwrite=true" in other
    assert (out / "checkpoint" / "STEP").read_text().strip() == "10"  # untouched
    # The same data named by a relative path from another working directory is not another recipe; a budget below
    # the step the run has reached is refused, not answered with "done, -2 steps".
    # (the run as if started from the dataset's parent with data.path=<its name>: what its config then records)
    saved = out / "checkpoint" / "config.yaml"
    saved.write_text(saved.read_text().replace(f"path: {prepared}\n", f"path: {prepared.name}\n", 1))
    assert f"path: {prepared.name}\n" in saved.read_text()
    resumed_elsewhere = subprocess.run(_pretrain_cmd(prepared, out, "train.max_steps=10", "resume=true"),
                                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed_elsewhere.returncode == 0, resumed_elsewhere.stderr[-2000:]
    shorter = _refused(capsys, prepared, out, "train.max_steps=8", "resume=true")
    assert "already at step 10, past train.max_steps=8" in shorter, shorter
    # overwrite=true removes the old run only once the new one's setup has passed every check: a run refused on the
    # way (here: no pair has the future window the future loss asks for) leaves it whole
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = subprocess.run(_pretrain_cmd(prepared, out, "train.max_steps=10", "overwrite=true", "loss.future_weight=1",
                                           "loss.future_days=100000"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "loss.future_days" in refused.stderr, refused.stderr[-2000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # a file of the user's own in checkpoint/ (each save replaces it whole): refused before any work, kept
    (out / "checkpoint" / "NOTES.md").write_text("mine")
    for flag in ("resume=true", "overwrite=true"):
        kept = _refused(capsys, prepared, out, "train.max_steps=12", flag)
        assert "also 'NOTES.md'" in kept, kept[-2000:]
    assert (out / "checkpoint" / "NOTES.md").read_text() == "mine"


def test_two_ranks_killed_and_resumed_equal_an_uninterrupted_run(prepared, tmp_path, capsys):
    """Each rank has its own dropout stream; rank 0 alone writes the resume state, so it must carry every rank's
    random state (it carried rank 0's, which every rank then took). A resumed run logs only its log_every steps,
    and resuming with another number of processes (another slice of every batch) is refused."""
    straight = _torchrun_pretrain(2, prepared, tmp_path / "straight", "train.log_every=4")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _torchrun_pretrain(2, prepared, tmp_path / "run", "train.log_every=4", failpoint="train-step:3")
    assert killed.returncode != 0 and (tmp_path / "run" / "ds_state" / "step-0000002").is_dir()
    resumed = _torchrun_pretrain(2, prepared, tmp_path / "run", "train.log_every=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 4]  # a resumed run logged its first step too
    drop = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert drop(_metrics(tmp_path / "run")) == drop(_metrics(tmp_path / "straight"))  # losses and lr, bit for bit
    one = _refused(capsys, prepared, tmp_path / "straight", "train.max_steps=6", "train.save_every=2", "resume=true")
    assert "saved by a run of 2 process(es) and this one has 1" in one, one[-2000:]


def test_a_first_save_killed_before_its_seal_restarts_the_run(prepared, tmp_path):
    """Killed after DeepSpeed wrote the first tag and before qanchor sealed it: the run announced that save, so the
    tag is its own, incomplete; resume starts afresh (it read nothing unsealed), and ends as an uninterrupted run."""
    out = tmp_path / "run"
    env = {**ENV, "QANCHOR_FAILPOINT": "ds-saved:1"}
    args = ("train.max_steps=4", "train.save_every=2", "resume=true")
    killed = subprocess.run(_pretrain_cmd(prepared, out, *args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL and (out / "ds_state" / "step-0000002").is_dir()
    again = subprocess.run(_pretrain_cmd(prepared, out, *args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    straight = subprocess.run(_pretrain_cmd(prepared, tmp_path / "straight", *args), cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0
    drop = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert drop(_metrics(out)) == drop(_metrics(tmp_path / "straight"))
    assert not list((out / "ds_state").glob("saving-*"))  # every announced save was sealed
    # Tags past the step a run resumed from are attempts a killed run abandoned. Pruning kept "the newest two" by
    # name, so two such tags outlived, and deleted, every tag the resumed run sealed: the next resume restarted at 0.
    from qanchor.train.seal import mark_saving

    for abandoned in ("step-0000008", "step-0000010"):  # saves announced and never sealed, as a kill leaves them
        mark_saving(out / "ds_state", abandoned)
        (out / "ds_state" / abandoned).mkdir()
    resumed = subprocess.run(_pretrain_cmd(prepared, out, "train.max_steps=6", "train.save_every=2", "resume=true"),
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(p.name for p in (out / "ds_state").glob("step-*")) == ["step-0000004", "step-0000006"]
    assert resume_tag(out / "ds_state") == "step-0000006"  # where the next resume starts


def test_metrics_of_a_killed_run_resume_past_a_torn_tail_and_refuse_damage_inside(tmp_path, capsys):
    """A preempted node can leave metrics.jsonl's last line half written or NUL-filled: resume drops it (its step is
    trained again) instead of failing with a JSON traceback after minutes of setup. Damage before whole lines is not
    a torn tail: refused, naming the line."""
    from qanchor.errors import CheckpointError
    from qanchor.train.pretrain import MetricsLog

    path = tmp_path / "metrics.jsonl"
    whole = [json.dumps({"step": k, "loss": 1.0 / k}) for k in (1, 2, 3)]
    path.write_text("\n".join(whole) + '\n{"step": 4, "lo' + "\n\x00\x00\x00\x00")
    MetricsLog(path, resume_step=2)
    assert path.read_text().splitlines() == whole[:2]
    assert "dropped 2 torn line(s)" in capsys.readouterr().err
    path.write_text(whole[0] + "\n{garbage\n" + whole[2] + "\n")
    with pytest.raises(CheckpointError, match=r"metrics.jsonl, line 2: not a metrics record"):
        MetricsLog(path, resume_step=3)
    assert path.read_text() == whole[0] + "\n{garbage\n" + whole[2] + "\n"  # left as it was



def test_a_zero_run_resumed_by_another_world_or_with_a_changed_tag_is_refused_before_any_work(prepared, tmp_path, capsys,
                                                                                               monkeypatch):
    """Under ZeRO 1-3 DeepSpeed refused another number of processes inside load_checkpoint, in a traceback after the
    whole setup (qanchor's own line was reached under ZeRO-0 only). And a sealed tag whose files changed since was
    passed over for an older one without a word: the steps between were trained again and the next save deleted it."""
    out = tmp_path / "run"
    first = subprocess.run(_pretrain_cmd(prepared, out, "train.max_steps=2", "train.save_every=1", "train.zero_stage=2"),
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert list((out / "ds_state" / "step-0000002").glob("zero_pp_rank_0_*optim_states.pt"))
    args = ("train.max_steps=3", "train.save_every=1", "train.zero_stage=2", "resume=true")
    with monkeypatch.context() as world_of_two:  # as torchrun sets it for each of two ranks
        world_of_two.setenv("WORLD_SIZE", "2")
        wider = _refused(capsys, prepared, out, *args)
    assert "saved by a run of 1 process(es) and this one has 2" in wider, wider[-2000:]
    shard = next((out / "ds_state" / "step-0000002").glob("zero_pp_rank_0_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes() + b"x")  # damage (or an edit) after the seal
    changed = _refused(capsys, prepared, out, *args)
    assert "its files changed after they were sealed" in changed and "(step-0000001), move" in changed
    assert (out / "ds_state" / "step-0000002").is_dir() and [r["step"] for r in _metrics(out)] == [1, 2]  # untouched
