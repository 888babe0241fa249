"""Pretraining runs end to end under DeepSpeed: metrics, checkpoints, kill + resume, rank parity."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qanchor.data.dataset import load_dataset
from qanchor.train.pretrain import checkpoint_data_id, resume_tag, trained_data_id
from tests.model.helpers import model_and_stream

ROOT = Path(__file__).resolve().parents[2]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")},
       "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def prepared(tiny_dataset, tmp_path_factory) -> Path:
    """A copy of the tiny dataset with UserU pairs and a full text cache."""
    ds_dir = tmp_path_factory.mktemp("pt") / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    model_and_stream(ds_dir)
    # A stale JIT-build lock, as a process killed while DeepSpeed compiled an op leaves behind: training on CPU
    # must not wait on it (it once hung every later run).
    extensions = tmp_path_factory.mktemp("torch_extensions")
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    ENV["TORCH_EXTENSIONS_DIR"] = str(extensions)
    return ds_dir


def _pretrain_cmd(ds_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qanchor.cli", "pretrain", "--config", str(ROOT / "configs/pretrain/tiny-synth.yaml"),
            f"data.path={ds_dir}", f"output_dir={out}", "data.default_max_events=8", "data.max_events={}",
            "train.batch_size=4", "train.log_every=1", "train.warmup_steps=2",
            "train.schedule=constant", "loss.answer_bank=8",  # the bank (2 batches) is part of the resume state
            *extra]  # constant LR: the schedule must not depend on max_steps here


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kill_and_resume(prepared, tmp_path):
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
    refused = subprocess.run(_pretrain_cmd(prepared, out, "train.max_steps=10"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert refused.returncode == 2 and "resume=true" in refused.stderr  # never silently overwrites a run
    resumed = subprocess.run(_pretrain_cmd(prepared, out, "train.max_steps=10", "train.save_every=3", "resume=true"),
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [r["step"] for r in _metrics(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # no step logged twice, ends at max_steps
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _metrics(out))
    assert (out / "checkpoint" / "STEP").read_text().strip() == "10"
    assert checkpoint_data_id(out / "checkpoint") == trained_data_id(load_dataset(prepared))  # what it trained on
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
    other = subprocess.run(_pretrain_cmd(prepared, out, "train.max_steps=12", "train.lr=0.01", "resume=true"),
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "train.lr: 0.001 -> 0.01" in other.stderr and "overwrite=true" in other.stderr
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
    shorter = subprocess.run(_pretrain_cmd(prepared, out, "train.max_steps=8", "resume=true"), cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=120)
    assert shorter.returncode == 2 and "already at step 10, past train.max_steps=8" in shorter.stderr, shorter.stderr
    # overwrite=true removes the old run only once the new one's setup has passed every check: a run refused on the
    # way (here: no pair has the future window the future loss asks for) leaves it whole
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = subprocess.run(_pretrain_cmd(prepared, out, "train.max_steps=10", "overwrite=true", "loss.future_weight=1",
                                           "loss.future_days=100000"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "loss.future_days" in refused.stderr, refused.stderr[-2000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _torchrun(n: int, ds_dir: Path, out: Path) -> None:
    with socket.socket() as sock:  # torchrun's static rendezvous needs a real free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}",
           str(ROOT / "tests/train/parity_worker.py"), str(ds_dir), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_ranks_match_one_rank(prepared, tmp_path):
    _torchrun(1, prepared, tmp_path / "one")
    _torchrun(2, prepared, tmp_path / "two")
    # plain: the backbone answer tower; bank: the text tower with an answer bank of extra negatives, the profile
    # loss on the uqa pairs only and the future loss on the pairs with a complete window (their decoders' gradients
    # and their means over the rows they keep must be the global batch's, however the rows fall across the ranks)
    for mode in ("plain", "bank"):
        one, two = load_file(tmp_path / f"one.{mode}"), load_file(tmp_path / f"two.{mode}")
        assert torch.allclose(one["losses"], two["losses"], atol=1e-5), (mode, one["losses"], two["losses"])
        assert (one["losses"][3] > 0) == (mode == "bank") and (one["losses"][4] > 0) == (mode == "bank")
        assert ("grad.profile_decoder.linear.weight" in one) == (mode == "bank")
        assert ("grad.future_decoder.linear.weight" in one) == (mode == "bank")
        assert one.keys() == two.keys() and len(one) > 20
        if mode == "bank":  # the row masks are exercised: each keeps some rows and drops others
            for rows in (one["profile_rows"], one["future_rows"]):
                assert 0 < int(rows.sum()) < 4, rows
            # and the two ranks hold different shares of one of them, so a mean of per-rank means would differ
            assert any(int(r[:2].sum()) != int(r[2:].sum()) for r in (one["profile_rows"], one["future_rows"]))
        masks = ("losses", "profile_rows", "future_rows")
        worst = max((one[k] - two[k]).abs().max().item() / (one[k].abs().max().item() + 1e-8) for k in one if k not in masks)
        assert worst < 1e-4, (mode, worst)


def _torchrun_pretrain(n: int, ds_dir: Path, out: Path, *extra: str, failpoint: str | None = None):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}",
           *_pretrain_cmd(ds_dir, out, "train.max_steps=4", "train.save_every=2", "resume=true", *extra)[1:]]
    env = {**ENV, "OMP_NUM_THREADS": "1", **({"QANCHOR_FAILPOINT": failpoint} if failpoint else {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_ranks_killed_and_resumed_equal_an_uninterrupted_run(prepared, tmp_path):
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
    one = subprocess.run(_pretrain_cmd(prepared, tmp_path / "straight", "train.max_steps=6", "train.save_every=2",
                                       "resume=true"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 2 and "saved by a run of 2 process(es) and this one has 1" in one.stderr, one.stderr[-2000:]


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


def test_zero3_trains_as_zero0_and_saves_whole_weights(prepared, tmp_path):
    """ZeRO-3 partitions every weight and gathers a module's around its forward and backward: the encoder's empty
    tokens, a bare parameter of a module whose outputs are dataclasses, failed in the first backward. One process:
    the same losses as ZeRO-0, whole weights in the checkpoint, no third-party warnings. And a DeepSpeed config file
    whose stage disagrees with train.zero_stage (which decides how the weights are gathered to save) is refused."""
    from safetensors.torch import load_file

    runs = {}
    for stage in (0, 3):
        done = subprocess.run(_pretrain_cmd(prepared, tmp_path / f"z{stage}", "train.max_steps=2", "train.save_every=2",
                                            f"train.zero_stage={stage}"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Warning" not in done.stdout + done.stderr and "WARNING" not in done.stdout + done.stderr, done.stderr[-2000:]
        runs[stage] = done
    for a, b in zip(_metrics(tmp_path / "z0"), _metrics(tmp_path / "z3")):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(a["loss"]), (a, b)
    w0, w3 = (load_file(tmp_path / f"z{s}" / "checkpoint" / "model.safetensors") for s in (0, 3))
    assert w0.keys() == w3.keys() and all(w0[k].shape == w3[k].shape for k in w0)
    assert max((w0[k].float() - w3[k].float()).abs().max().item() for k in w0) < 1e-4
    mismatch = subprocess.run(_pretrain_cmd(prepared, tmp_path / "mm", "train.max_steps=2",
                                            f"train.deepspeed_config={ROOT / 'configs/deepspeed/zero3.json'}"),
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert mismatch.returncode == 2 and "asks for ZeRO stage 3 and train.zero_stage is 0" in mismatch.stderr


def test_a_checkpoint_saved_before_the_empty_tokens_had_a_module_still_loads(tmp_path):
    """The empty tokens were saved as ``user_encoder.empty``; they are ``user_encoder.empty.weight`` now."""
    import torch
    from safetensors.torch import load_file, save_file

    from qanchor.data.dataset import load_dataset
    from qanchor.infer.api import QAnchor
    from qanchor.model.factory import ModelMeta, build_model, save_checkpoint
    from tests.conftest import build_tiny_dataset
    from tests.model.helpers import encoder, tiny_cfg

    ds = load_dataset(build_tiny_dataset(tmp_path / "ds", n_users=6))
    cfg = tiny_cfg([])
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg.model, ds.manifest, encoder().dim, ds.tabular_columns)
    ckpt = save_checkpoint(tmp_path / "ck", model, tokenizer, cfg, ModelMeta(ds.manifest.to_dict(), encoder().dim, {},
                                                                              list(ds.tabular_columns)))
    weights = load_file(ckpt / "model.safetensors")
    weights["user_encoder.empty"] = weights.pop("user_encoder.empty.weight")
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    loaded = QAnchor.from_pretrained(ckpt).model.user_encoder.empty.weight
    assert torch.equal(loaded, model.user_encoder.empty.weight)


def test_log_file_gets_start_step_and_summary_lines_and_no_warnings(prepared, tmp_path):
    """Redirected to a file (no terminal), a run logs like a cluster job: start, every log_every steps, summary."""
    out = tmp_path / "run"
    done = subprocess.run(_pretrain_cmd(prepared, out, "train.max_steps=4", "train.log_every=2"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    start = [ln for ln in lines if "pretrain: start" in ln]
    assert len(start) == 1 and "ZeRO-0" in start[0] and "world size 1" in start[0] and "trainable" in start[0]
    steps = [ln for ln in lines if "pretrain: step " in ln]
    assert [ln.split("pretrain: step ")[1].split()[0] for ln in steps] == ["1/4", "2/4", "4/4"]
    assert all("loss" in ln and "samples/s" in ln and "ETA" in ln for ln in steps)
    assert any("pretrain: done, 4 steps" in ln for ln in lines)
    assert "\r" not in done.stdout + done.stderr  # no progress bar redrawn into the log
    assert "Warning" not in done.stdout + done.stderr and "Loading weights" not in done.stdout + done.stderr


def test_a_principal_path_and_the_path_free_loss_train_under_deepspeed(prepared, tmp_path):
    """The engine takes the principal path's one-element gain (a 0-d parameter broke its parameter broadcast), the
    fitted map reaches the checkpoint, and the path-free loss is logged every step and in the summary."""
    out = tmp_path / "run"
    done = subprocess.run(_pretrain_cmd(prepared, out, "train.max_steps=3", "model.statistics_path=principal",
                                        "loss.path_free_weight=1"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss_path_free"] > 0 for r in records)
    assert any("path-free" in ln for ln in done.stdout.splitlines() if "pretrain: done" in ln)
    weights = load_file(out / "checkpoint" / "model.safetensors")
    assert weights["statistics_path.basis"].abs().sum() > 0 and weights["statistics_path.gain"].shape == (1,)
    assert "statistics_path.linear.weight" not in weights


@pytest.mark.parametrize("gain", ["learned", "fixed"])
def test_query_evidence_trains_under_deepspeed(prepared, tmp_path, gain):
    """A run with query evidence encodes its questions up front, fits the evidence's reference and standardisation
    before the first step, trains a learned gain through the engine (a fixed one stays at 1: a buffer the engine
    never optimises), and the checkpoint keeps all of it."""
    out = tmp_path / "run"
    done = subprocess.run(_pretrain_cmd(prepared, out, "train.max_steps=3", "model.query_evidence=true",
                                        f"model.query_evidence_gain={gain}"), cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    weights = load_file(out / "checkpoint" / "model.safetensors")
    assert weights["query_evidence.text_cov"].abs().sum() > 0 and weights["query_evidence.feature_mean"].abs().sum() > 0
    assert not torch.equal(weights["query_evidence.feature_std"], torch.ones_like(weights["query_evidence.feature_std"]))
    assert weights["query_evidence.gain"].shape == (1,)
    assert (float(weights["query_evidence.gain"]) != 1.0) == (gain == "learned")  # a learned gain trained


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
    assert "dropped 2 torn line(s)" in capsys.readouterr().out
    path.write_text(whole[0] + "\n{garbage\n" + whole[2] + "\n")
    with pytest.raises(CheckpointError, match=r"metrics.jsonl, line 2: not a metrics record"):
        MetricsLog(path, resume_step=3)
    assert path.read_text() == whole[0] + "\n{garbage\n" + whole[2] + "\n"  # left as it was
