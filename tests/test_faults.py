"""kill -9 at many points of every writing command: a re-run resumes to the uninterrupted result, inputs untouched.

Each command runs as a real process. ``QANCHOR_FAILPOINT=name:n`` (``qanchor.faults``) makes it SIGKILL
itself at the riskiest moments (a temporary written but not yet published, a shard written but not yet
marked done, a DeepSpeed save not yet sealed, a directory half swapped); a few more runs are killed at a
random moment from outside. After each kill the same command is run again to completion, and its output
must equal a run that was never interrupted (bit for bit for files and embeddings, equal losses for
pretraining), with no temporary left behind, and the inputs byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qanchor.infer.export import read_embeddings
from qanchor.tune.head import find_heads
from tests.helpers import copy_dataset

ROOT = Path(__file__).resolve().parent.parent
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "QANCHOR_FAILPOINT")},
       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(args: list[str], failpoint: str | None = None, kill_after: float | None = None) -> int:
    env = {**ENV, **({"QANCHOR_FAILPOINT": failpoint} if failpoint else {})}
    cmd = [sys.executable, "-m", "qanchor.cli", *args, "--quiet"]
    if kill_after is None:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
        return done.returncode
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def _digest(path: Path, skip: tuple[str, ...] = (".qanchor_cache",)) -> dict[str, str]:
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_file() and not (rel.parts and rel.parts[0] in skip):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _no_temporaries(*dirs: Path) -> None:
    for d in dirs:
        left = [p for p in d.parent.rglob("*qanchor-tmp*")] + [p for p in d.parent.rglob("*qanchor-old*")]
        assert not left, f"temporaries left behind: {left[:3]}"


def _kill_then_finish(args: list[str], failpoint: str | None = None, kill_after: float | None = None) -> None:
    code = _run(args, failpoint=failpoint, kill_after=kill_after)
    assert code in (0, -signal.SIGKILL), code
    if failpoint is not None:
        assert code == -signal.SIGKILL, f"{failpoint} was never reached"
    assert _run(args) == 0


@pytest.fixture(scope="module")
def env(infer_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    ds = root / "ds"
    copy_dataset(infer_env.ds_dir, ds, with_userU=True)
    return type("E", (), {"root": root, "ds": ds, "ckpt": infer_env.ckpt,
                          "inputs": {"ds": _digest(ds), "ckpt": _digest(infer_env.ckpt)}})


def _inputs_untouched(env) -> None:
    assert _digest(env.ds) == env.inputs["ds"] and _digest(env.ckpt) == env.inputs["ckpt"]


@pytest.fixture(scope="module")
def refs(env):
    """The uninterrupted outputs, computed once."""
    out = env.root / "refs"
    assert _run(["data", "synth", f"out={out / 'synth'}", "users=300", "seed=3"]) == 0
    assert _run(_pretrain_args(env, out / "pretrain")) == 0
    assert _run(_embed_args(env, out / "embed")) == 0
    return out


@pytest.mark.parametrize("point", ["atomic-file:2", "dir-exchanged:1"])
def test_synth(env, refs, tmp_path, point):
    ref, out = refs / "synth", tmp_path / "out"
    if point.startswith("dir-exchanged"):  # the swap only happens when replacing an existing dataset
        assert _run(["data", "synth", f"out={out}", "users=300", "seed=4"]) == 0
    _kill_then_finish(["data", "synth", f"out={out}", "users=300", "seed=3"], failpoint=point)
    assert _digest(out) == _digest(ref)
    _no_temporaries(out)


def _pretrain_args(env, out: Path) -> list[str]:
    return ["pretrain", "--config", "configs/pretrain/tiny-synth.yaml", f"data.path={env.ds}", f"output_dir={out}",
            "data.default_max_events=8", "train.batch_size=4", "train.max_steps=6", "train.save_every=2",
            "train.log_every=1", "train.warmup_steps=2", "train.schedule=constant", "resume=true"]


@pytest.mark.parametrize("point", ["ds-saved:2", "atomic-dir:2"])
def test_pretrain(env, refs, tmp_path, point):
    ref, out = refs / "pretrain", tmp_path / "out"
    _kill_then_finish(_pretrain_args(env, out), failpoint=point)
    def losses(run: Path) -> list[dict]:  # every logged number but the wall-clock rate
        return [{k: v for k, v in json.loads(ln).items() if k != "samples_per_s"}
                for ln in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(out) == losses(ref)
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == (ref / "checkpoint" / "model.safetensors").read_bytes()
    _no_temporaries(out)
    _inputs_untouched(env)


def _embed_args(env, out: Path) -> list[str]:
    return ["embed", f"checkpoint={env.ckpt}", f"data.path={env.ds}", "queries=tasks", f"out={out}", "shard_users=7",
            f"text_cache_dir={env.ds / '.qanchor_cache' / 'text'}"]


@pytest.mark.parametrize("point", ["shard-written:2", "atomic-file:3", None])
def test_embed(env, refs, tmp_path, point):
    ref, out = refs / "embed", tmp_path / "out"
    kill_after = None if point else random.Random(str(tmp_path)).uniform(2.0, 8.0)  # a random moment, from outside
    _kill_then_finish(_embed_args(env, out), failpoint=point, kill_after=kill_after)
    a, b = read_embeddings(ref), read_embeddings(out)
    assert list(a[0]) == list(b[0]) and list(a[1]) == list(b[1]) and np.array_equal(a[2], b[2])
    _no_temporaries(out)
    _inputs_untouched(env)


def test_update(env, tmp_path):
    args = lambda out: ["update", f"checkpoint={env.ckpt}", f"data.path={env.ds}", "queries=tasks",  # noqa: E731
                        f"out={out}", f"text_cache_dir={env.ds / '.qanchor_cache' / 'text'}"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _run(args(ref)) == 0
    _kill_then_finish(args(out), failpoint="atomic-file:2")
    assert _digest(out, skip=("state.json",)) == _digest(ref, skip=("state.json",))  # state.json logs wall time
    _no_temporaries(out)
    _inputs_untouched(env)


def test_prompt_tune(env, tmp_path):
    args = lambda out: ["prompt-tune", f"checkpoint={env.ckpt}", f"data.path={env.ds}", f"output_dir={out}",  # noqa: E731
                        "steps=4", "eval_every=2", "batch_size=8", "prefix_chunk=16", "prototypes_per_class=1"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _run(args(ref)) == 0
    _kill_then_finish(args(out), failpoint="head-saved:1")
    for task in ("churn", "coupon"):
        for name in ("head.safetensors", "head.yaml", "split.json"):
            assert (out / task / name).read_bytes() == (ref / task / name).read_bytes(), (task, name)
    _no_temporaries(out)
    _inputs_untouched(env)


def test_a_head_reused_after_a_killed_retune_leaves_no_second_head(env, tmp_path):
    """A retune killed mid-swap, then a rerun under the first settings: the first head is reused (never rewritten),
    and the killed write's hidden copy, a whole head, is cleared rather than loaded as a second head."""
    out = tmp_path / "heads"
    args = lambda steps: ["prompt-tune", f"checkpoint={env.ckpt}", f"data.path={env.ds}", f"output_dir={out}",  # noqa: E731
                          "task=churn", f"steps={steps}", "eval_every=2", "batch_size=8", "prefix_chunk=16"]
    assert _run(args(4)) == 0
    first = (out / "churn" / "head.safetensors").stat()
    assert _run(args(6), failpoint="atomic-dir:1") == -signal.SIGKILL  # the retuned head written, not yet swapped in
    left = [p for p in out.iterdir() if p.name.startswith(".churn.")]
    assert left and find_heads(out) == {"churn": out / "churn"}  # what the kill left is no second head
    assert _run(args(4)) == 0  # the first settings again: that head is reused, not rewritten
    assert (out / "churn" / "head.safetensors").stat().st_ino == first.st_ino
    _no_temporaries(out)


def _bench_args(env, out: Path) -> list[str]:
    return ["bench", f"checkpoint={env.ckpt}", f"data.path={env.ds}", f"output_dir={out}", "folds=2",
            "methods=[rfm_lr,qanchor_task,qanchor_generic]"]


def test_bench(env, tmp_path):
    """A bench killed after its second finished (task, method) row resumes from its journal: the finished rows are
    read back, not recomputed, and the results equal an uninterrupted run's."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _run(_bench_args(env, ref)) == 0
    assert _run(_bench_args(env, out), failpoint="bench-row-saved:2") == -signal.SIGKILL
    assert len(list((out / "partial").glob("row-*.json"))) == 2
    kept = {p.name: json.loads(p.read_text())["result"]["seconds"] for p in (out / "partial").glob("row-*.json")}
    done = subprocess.run([sys.executable, "-m", "qanchor.cli", *_bench_args(env, out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bench: resuming: 2 of 6 (task, method) rows" in done.stdout
    assert not (out / "partial").exists() and not (ref / "partial").exists()  # dropped once the report is written

    def rows(run: Path) -> dict:
        tasks = json.loads((run / "results.json").read_text())["tasks"]
        return {(t, m): {k: v for k, v in r.items() if k != "seconds"} for t, task in tasks.items()
                for m, r in task["methods"].items()}

    assert rows(out) == rows(ref) and len(rows(ref)) == 6
    tasks = json.loads((out / "results.json").read_text())["tasks"]
    first = sorted(kept)  # row-0000-rfm_lr, row-0000-qanchor_task: their times are the killed run's, read back
    assert [tasks[next(iter(tasks))]["methods"][name.split("-", 2)[2][:-5]]["seconds"] for name in first] == \
        [kept[name] for name in first]
    _no_temporaries(out)
    _inputs_untouched(env)

