"""Pretraining runs end to end under DeepSpeed: metrics, checkpoints, kill + resume, rank parity."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qanchor.cli import main
from qanchor.data.dataset import load_dataset

ROOT = Path(__file__).resolve().parents[2]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")},
       "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _pretrain_cmd(ds_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qanchor.cli", "pretrain", "--config", str(ROOT / "configs/pretrain/tiny-synth.yaml"),
            f"data.path={ds_dir}", f"output_dir={out}", "data.default_max_events=8", "data.max_events={}",
            "train.batch_size=4", "train.log_every=1", "train.warmup_steps=2",
            "train.schedule=constant", "loss.answer_bank=8",  # the bank (2 batches) is part of the resume state
            *extra]  # constant LR: the schedule must not depend on max_steps here


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


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


def test_zero3_trains_as_zero0_and_saves_whole_weights(prepared, tmp_path, capsys):
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
    # ZeRO-3 had partitioned the weights to empty tensors when they were counted: "parameters 0 trainable / 0 total"
    counts = {stage: done.stdout.split("parameters ")[1].split(";")[0] for stage, done in runs.items()}
    assert counts[3] == counts[0] and not counts[0].startswith("0 "), counts
    w0, w3 = (load_file(tmp_path / f"z{s}" / "checkpoint" / "model.safetensors") for s in (0, 3))
    assert w0.keys() == w3.keys() and all(w0[k].shape == w3[k].shape for k in w0)
    assert max((w0[k].float() - w3[k].float()).abs().max().item() for k in w0) < 1e-4
    capsys.readouterr()  # refused by the checks before any work: in this process (a process of its own imports for seconds)
    code = main(_pretrain_cmd(prepared, tmp_path / "mm", "train.max_steps=2",
                              f"train.deepspeed_config={ROOT / 'configs/deepspeed/zero3.json'}")[3:])
    assert code == 2 and "asks for ZeRO stage 3 and train.zero_stage is 0" in capsys.readouterr().err


def test_a_checkpoint_saved_before_the_empty_tokens_had_a_module_still_loads(tmp_path):
    """The empty tokens were saved as ``user_encoder.empty``; they are ``user_encoder.empty.weight`` now."""
    import torch
    from safetensors.torch import load_file, save_file

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
    assert "s of setup;" in start[0]  # the setup before it is said, then timed
    setup = [ln.split(" ", 2)[2] for ln in lines if "pretrain: setup" in ln]
    assert len(setup) == 1 and setup[0].startswith("pretrain: setup: building the model and fitting its input "
                                                   "statistics on ") and setup[0].endswith(" users")
    steps = [ln for ln in lines if "pretrain: step " in ln]
    assert [ln.split("pretrain: step ")[1].split()[0] for ln in steps] == ["1/4", "2/4", "4/4"]
    assert all("loss" in ln and "samples/s" in ln and "ETA" in ln for ln in steps)
    assert any("pretrain: done, 4 steps" in ln for ln in lines)
    assert "\r" not in done.stdout + done.stderr  # no progress bar redrawn into the log
    assert "Warning" not in done.stdout + done.stderr and "Loading weights" not in done.stdout + done.stderr
    # the checkpoint records what its text encoder computes, so that a cache on a moved copy of it is recognised
    from qanchor.data.text_cache import SentenceEncoder
    from qanchor.model.factory import read_meta

    assert read_meta(out / "checkpoint").text_encoder_digest == SentenceEncoder().digest


def test_quiet_prints_only_the_result_line(prepared, tmp_path):
    """`--quiet` is documented to print only the result, but every line, the final one with the checkpoint too,
    depended on the progress switch: a quiet run printed nothing at all."""
    out = tmp_path / "run"
    done = subprocess.run([*_pretrain_cmd(prepared, out, "train.max_steps=1"), "--quiet"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain: done, 1 steps in "), done.stdout
    assert lines[0].endswith(f"; checkpoint {out / 'checkpoint'}") and (out / "checkpoint").is_dir()


def test_a_quiet_pretraining_inside_another_command_prints_nothing(prepared, tmp_path):
    """The result line of `pretrain --quiet` was printed by every quiet pretraining, so `bench --quiet` (whose
    qanchor_random_init pretrains a sub-run), an ablation and uqa's variants put a 'pretrain: done' line before their
    own result."""
    out = tmp_path / "sub"
    settings = _pretrain_cmd(prepared, out, "train.max_steps=1")[6:]  # the key=value settings after --config FILE
    code = ("import sys; from qanchor.config import PretrainConfig, load_config; from qanchor.train.pretrain import "
            "run_pretrain; run_pretrain(load_config(sys.argv[1], sys.argv[2:], schema=PretrainConfig), progress=False)")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "configs/pretrain/tiny-synth.yaml"), *settings],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "" and (out / "checkpoint").is_dir()


def test_a_run_reads_its_backbone_tokenizer_once_and_records_it_as_loaded(prepared, tmp_path):
    """Setup loaded the backbone's tokenizer three times (the checks, the BACKBONE record, the model): seconds each for
    Qwen2.5's. The checks' tokenizer now serves the other two; the record still reads the vocabulary before the model
    adds its special tokens, as a fresh load does (a resume compares it with one)."""
    out = tmp_path / "once"
    settings = _pretrain_cmd(prepared, out, "train.max_steps=1")[6:]
    code = ("import sys; import qanchor.model.factory as factory, qanchor.train.pretrain as pretrain; "
            "from qanchor.config import PretrainConfig, load_config; loads = []; real = pretrain.load_tokenizer; "
            "counted = lambda cfg: loads.append(1) or real(cfg); pretrain.load_tokenizer = factory.load_tokenizer = counted; "
            "cfg = load_config(sys.argv[1], sys.argv[2:], schema=PretrainConfig); pretrain.run_pretrain(cfg, progress=False); "
            "print('loads', len(loads)); print(pretrain.backbone_file_text(cfg), end='')")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "configs/pretrain/tiny-synth.yaml"), *settings],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first, fresh = done.stdout.split("\n", 1)
    assert first == "loads 1"  # the run's one (the BACKBONE text printed after it loads its own: not counted above)
    assert (out / "checkpoint" / "BACKBONE").read_text() == fresh and "model.backbone.tokenizer " in fresh


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
    steps = [ln for ln in done.stdout.splitlines() if "pretrain: step " in ln]  # the term the loss holds, shown each step
    assert steps and all("path-free " in ln for ln in steps)
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