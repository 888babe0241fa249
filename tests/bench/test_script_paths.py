"""The multi-run scripts read their path arguments in the caller's directory but run ``qanchor`` in the repository root
(``cwd=ROOT``): run from elsewhere, a relative ``--pretrain mycfg.yaml`` was "config file not found" in the child, and
an absolute config sent the runs' output_dir under the repository's results/. Each script is run here from a scratch
directory with relative paths, its child processes faked (no pretraining): every path a child is handed must name,
from the child's own directory, the file the caller meant. The same fakes check the scripts' own log lines (their
children run quietly) and that a failed child ends them in one ``error:`` line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qanchor.data.io import file_sha256
from tests.helpers import ROOT, load_benchmark

# the arguments of `qanchor ...` and benchmarks/quality_probe.py that name a file or folder
PATH_FLAGS = ("--config", "--checkpoint", "--data", "--out")
PATH_KEYS = ("data.path", "output_dir", "checkpoint")

PROBE = {row: {"auc": 0.7, "ks": 0.3} for row in ("task", "generic", "swapped", "hidden")} | {
    "geometry_generic": {"top_pc_share": 0.1}}
BENCH = {"tasks": {"a": {"methods": {"m": {"auc_mean": 0.7}}}},
         "average": {"m": {"auc_mean": 0.7, "ks_mean": 0.3, "n_tasks": 1}}}
UQA = {"asked": [{"user_id": "u", "family": "sequence", "topic": "t"}],
       "rows": {"qanchor": {"correct": [True], "prompt_tokens": 10.0}}}
TUNED = {"tasks": {"a": {"frozen_lr": {"test": {"auc": 0.7, "ks": 0.3}}, "frozen_proto": {"test": {"auc": 0.7, "ks": 0.3}},
                         "tuned": {"test": {"auc": 0.7, "ks": 0.3}}, "best_step": 0,
                         "n": {"train": 60, "val": 20, "test": 20}}}}


def _path_arguments(cmd: list[str]) -> list[tuple[str, str]]:
    found = [(flag, value) for flag, value in zip(cmd, cmd[1:]) if flag in PATH_FLAGS]
    return found + [tuple(a.split("=", 1)) for a in cmd if "=" in a and a.split("=", 1)[0] in PATH_KEYS]


class FakeChildren:
    """Stands in for subprocess.run: checks each command's paths as the child reads them, from the directory it runs
    in, and only then writes the file the script reads back next (a wrong path writes nothing into the repository)."""

    def __init__(self, caller_dir: Path):
        self.caller_dir = caller_dir
        self.commands: list[list[str]] = []
        self.failing: str | None = None  # a child ("pretrain", "bench", "quality_probe.py") that exits 2, as on an error

    def __call__(self, cmd, *, cwd=None, check=False, **kwargs):
        child_dir = Path(cwd or os.getcwd())
        self.commands.append(cmd)
        if self.failing == (cmd[3] if cmd[1] == "-m" else Path(cmd[1]).name):
            if check:  # as the real subprocess.run does
                raise subprocess.CalledProcessError(2, cmd)
            return subprocess.CompletedProcess(cmd, 2)
        args = _path_arguments(cmd)
        for name, value in args:
            assert Path(value).is_absolute(), f"{name} {value} is relative: the child, in {child_dir}, reads another path"
            assert (child_dir / value).is_relative_to(self.caller_dir), f"{name} {value} is outside {self.caller_dir}"
        args = dict(args)
        if "--config" in args:
            assert (child_dir / args["--config"]).is_file(), f"the child finds no config at {args['--config']}"
        if "--out" in args:  # benchmarks/quality_probe.py
            self._write(child_dir / args["--out"], PROBE)
        elif cmd[3] == "pretrain":
            self._write(child_dir / args["output_dir"] / "metrics.jsonl", {"loss": 1.0, "loss_contrastive": 0.5})
        else:
            written = {"bench": ("results.json", BENCH), "uqa": ("results.json", UQA), "prompt-tune": ("summary.json", TUNED)}
            name, content = written[cmd[3]]
            self._write(child_dir / args["output_dir"] / name, content)
        return subprocess.CompletedProcess(cmd, 0)

    @staticmethod
    def _write(path: Path, content: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))


@pytest.fixture
def caller_dir(tmp_path, monkeypatch):
    """A scratch working directory holding the configs and dataset folder the scripts are given relatively."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mycfg.yaml").write_text("train:\n  max_steps: 3\n")
    # a relative prompt_tune_config inside a bench config is read by the bench, in the repository root
    (tmp_path / "bench.yaml").write_text("prompt_tune_config: configs/prompt_tune/tiny-cj.yaml\n")
    (tmp_path / "d").mkdir()
    return tmp_path


@pytest.fixture
def children(caller_dir, monkeypatch):
    fake = FakeChildren(caller_dir)
    monkeypatch.setattr(subprocess, "run", fake)
    return fake


def _no_dataset(module, monkeypatch) -> list:
    """The dataset's identity without a dataset: the paths it is loaded from are kept for the test."""
    loaded = []
    monkeypatch.setattr(module, "load_dataset", lambda path: loaded.append(path) or path)
    monkeypatch.setattr(module, "trained_data_id", lambda ds: "data-id")
    monkeypatch.setattr(module, "legacy_trained_data_id", lambda ds: "legacy-data-id")
    return loaded


def test_absolute_paths_keeps_types_and_names(tmp_path, monkeypatch):
    import argparse

    qs = load_benchmark("quality_seeds")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "d").symlink_to(tmp_path / "elsewhere")
    args = argparse.Namespace(data="d", root=Path("results/x"), many=["a", "/abs/b"], none=None, seeds="0,1")
    out = qs.absolute_paths(args, "data", "root", "many", "none")
    assert out.data == str(tmp_path / "d")  # the link's own name, not its target's: a folder name labels results
    assert out.root == tmp_path / "results/x" and isinstance(out.root, Path)
    assert out.many == [str(tmp_path / "a"), "/abs/b"] and out.none is None and out.seeds == "0,1"
    assert args.data == "d"  # the parsed arguments are left as they were


@pytest.mark.parametrize("probe", [False, True], ids=["bench", "probe"])
def test_quality_seeds_from_another_directory(caller_dir, children, monkeypatch, probe):
    qs = load_benchmark("quality_seeds")
    loaded = _no_dataset(qs, monkeypatch)
    argv = ["--pretrain", "mycfg.yaml", "--bench", "bench.yaml", "--data", "d", "--seeds", "0", "--root", "results/seeds"]
    assert qs.main(argv + (["--probe"] if probe else [])) == 0
    assert [c[3] if c[1] == "-m" else Path(c[1]).name for c in children.commands] == (
        ["pretrain", "quality_probe.py"] if probe else ["pretrain", "bench"])
    assert dict(_path_arguments(children.commands[0]))["output_dir"] == str(caller_dir / "results/seeds/seed0")
    assert loaded == [str(caller_dir / "d")]
    assert (caller_dir / "results/seeds/summary.md").is_file()
    if not probe:  # the heads' file hashed is the one the bench reads, from the repository root
        record = json.loads((caller_dir / "results/seeds/bench-seed0/results.json.settings.json").read_text())
        assert record["prompt_tune_config"] == file_sha256(ROOT / "configs/prompt_tune/tiny-cj.yaml")


def test_a_prompt_tune_file_beside_the_callers_bench_config_is_the_one_hashed(caller_dir, children, monkeypatch):
    """`prompt_tune_config: mypt.yaml` next to the caller's own bench config: the bench (run in the repository root)
    finds it from the config's folder, and the record must hash that file, or an edit to it reuses stale heads' rows."""
    qs = load_benchmark("quality_seeds")
    _no_dataset(qs, monkeypatch)
    (caller_dir / "mypt.yaml").write_text("steps: 7\n")
    (caller_dir / "bench.yaml").write_text("prompt_tune_config: mypt.yaml\n")
    assert qs.main(["--pretrain", "mycfg.yaml", "--bench", "bench.yaml", "--data", "d", "--seeds", "0",
                    "--root", "results/seeds"]) == 0
    record = json.loads((caller_dir / "results/seeds/bench-seed0/results.json.settings.json").read_text())
    assert record["prompt_tune_config"] == file_sha256(caller_dir / "mypt.yaml")


def test_uqa_seeds_from_another_directory(caller_dir, children, monkeypatch):
    us = load_benchmark("uqa_seeds")
    _no_dataset(us, monkeypatch)
    assert us.main(["--pretrain", "mycfg.yaml", "--uqa", "mycfg.yaml", "--data", "d", "--seeds", "0",
                    "--root", "results/uqa"]) == 0
    assert [c[3] for c in children.commands] == ["pretrain", "uqa"]
    assert dict(_path_arguments(children.commands[1]))["checkpoint"] == str(caller_dir / "results/uqa/seed0")
    assert (caller_dir / "results/uqa/summary.json").is_file()


def test_learning_curve_from_another_directory(caller_dir, children, monkeypatch):
    lc = load_benchmark("learning_curve")
    _no_dataset(lc, monkeypatch)
    plotted = []
    monkeypatch.setattr(lc, "_plot", lambda rows, peers, path, title: plotted.append((path, title)))
    assert lc.main(["--pretrain", "mycfg.yaml", "--data", "d", "--steps", "3", "--root", "results/curve"]) == 0
    assert len(children.commands) == 2  # pretrain, then the probe
    assert plotted == [(caller_dir / "results/curve/curve.png", "d")]
    assert json.loads((caller_dir / "results/curve/curve.json").read_text())["rows"][0]["task_auc"] == 0.7


def test_prompt_tune_scale_from_another_directory(caller_dir, children, monkeypatch):
    pts = load_benchmark("prompt_tune_scale")
    (caller_dir / "ckpt").mkdir()
    monkeypatch.setattr(pts, "plot", lambda results, path: None)
    assert pts.main(["--config", "mycfg.yaml", "--data", "d", "--checkpoint", "ckpt", "--root", "results/scale"]) == 0
    assert [c[3] for c in children.commands] == ["prompt-tune"]
    assert dict(_path_arguments(children.commands[0]))["output_dir"] == str(caller_dir / "results/scale/d/ckpt0")
    assert list(json.loads((caller_dir / "results/scale/scale.json").read_text())["results"]) == ["d"]


def test_learning_curve_refuses_a_bad_peer_before_any_run_and_reads_a_null_swapped_row(caller_dir, children,
                                                                                       monkeypatch, capsys):
    """`--peer rfm_lgbm` (no value) was read only after every budget had been pretrained and probed (an hour on the
    real data); and a one-task dataset's probe, whose swapped row is null (no other question to swap in), crashed the
    table after all the work, every rerun again."""
    lc = load_benchmark("learning_curve")
    _no_dataset(lc, monkeypatch)
    monkeypatch.setattr(lc, "_plot", lambda *a: None)
    argv = ["--pretrain", "mycfg.yaml", "--data", "d", "--steps", "3", "--root", "results/curve"]
    for bad in (["--peer", "rfm_lgbm"], ["--peer", "rfm_lgbm=abc"], ["--steps", "3,x"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            lc.main(argv + bad)
        assert children.commands == []
    assert "give name=AUC" in capsys.readouterr().err
    monkeypatch.setitem(PROBE, "swapped", {"auc": None, "ks": None})
    assert lc.main(argv + ["--peer", "rfm_lgbm=0.73"]) == 0
    assert "| 3 | 0.7000 | 0.7000 | - |" in (caller_dir / "results/curve/curve.md").read_text()


def test_quality_seeds_reads_null_rows_and_names_every_folder_to_redo(caller_dir, children, monkeypatch):
    """top_directions_summary took np.mean of [None, ...] for a one-task dataset's swapped rows; and in bench mode the
    advice for a seed made with other settings named only its bench folder, whose deletion then met the seed's old
    pretraining run (refused, in a traceback of this script)."""
    qs = load_benchmark("quality_seeds")
    _no_dataset(qs, monkeypatch)
    probe = {"top_directions": {"1": {"task": 0.7, "generic": 0.6, "swapped": None}}}
    summary = qs.top_directions_summary([probe, probe])["1"]
    assert summary["task"]["auc_mean"] == pytest.approx(0.7) and np.isnan(summary["swapped"]["auc_mean"])
    argv = ["--pretrain", "mycfg.yaml", "--bench", "bench.yaml", "--data", "d", "--seeds", "0", "--root", "results/s"]
    assert qs.main(argv) == 0
    with pytest.raises(SystemExit, match=r"delete .*results/s/seed0 and .*results/s/bench-seed0 to redo that seed"):
        qs.main([*argv, "--set", "train.warmup_steps=2"])
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 2))  # a child's error
    with pytest.raises(SystemExit, match=r"`qanchor pretrain` failed \(exit code 2\); its message is above"):
        qs.main([*argv[:-1], "results/other"])


def _logged(out: str) -> list[str]:
    """The script's own log lines, without their timestamps."""
    return [ln.split(" ", 2)[2] for ln in out.splitlines() if ln[:2] == "20" and ": " in ln]


@pytest.mark.parametrize("failing", ["pretrain", "quality_probe.py", "bench"])
def test_quality_seeds_says_each_step_and_a_failed_child_is_one_error_line(caller_dir, children, monkeypatch, capsys,
                                                                            failing):
    """The children run quietly and the script said nothing of its own: minutes of silence per seed in a job's log. And
    a failed probe (`--probe-device cuda` on a CPU machine) ended in a CalledProcessError traceback under the probe's
    own error line."""
    qs = load_benchmark("quality_seeds")
    _no_dataset(qs, monkeypatch)
    argv = ["--pretrain", "mycfg.yaml", "--bench", "bench.yaml", "--data", "d", "--seeds", "0,1", "--root", "results/s"]
    assert qs.main([*argv, "--probe"]) == 0
    lines = _logged(capsys.readouterr().out)
    assert lines[0] == f"quality_seeds: start, seeds 0,1 (probe), root {caller_dir / 'results/s'}"
    assert lines[1:7] == [f"quality_seeds: seed 0 (1/2): pretraining -> {caller_dir / 'results/s/seed0'}",
                          "quality_seeds: seed 0: probing",
                          "quality_seeds: seed 0: done (task AUC 0.7000, generic AUC 0.7000, swapped AUC 0.7000)",
                          f"quality_seeds: seed 1 (2/2): pretraining -> {caller_dir / 'results/s/seed1'}",
                          "quality_seeds: seed 1: probing",
                          "quality_seeds: seed 1: done (task AUC 0.7000, generic AUC 0.7000, swapped AUC 0.7000)"]
    assert lines[7].startswith("quality_seeds: done, 2 seed(s) in ") and len(lines) == 8
    assert qs.main(argv) == 0  # bench mode
    assert _logged(capsys.readouterr().out)[2:4] == [
        f"quality_seeds: seed 0: benching -> {caller_dir / 'results/s/bench-seed0'}", "quality_seeds: seed 0: done (AUC m 0.7000)"]
    children.failing = failing
    with pytest.raises(SystemExit) as stop:
        qs.main([*argv[:-1], "results/other", *(["--probe"] if failing == "quality_probe.py" else [])])
    name = "quality_probe.py" if failing == "quality_probe.py" else f"qanchor {failing}"
    assert str(stop.value.code) == f"error: `{name}` failed (exit code 2); its message is above"


@pytest.mark.parametrize("failing", ["pretrain", "quality_probe.py"])
def test_learning_curve_says_each_budget_and_a_failed_child_is_one_error_line(caller_dir, children, monkeypatch, capsys,
                                                                              failing):
    """The script printed nothing until its final table (an hour in its example: pretraining quiet, the probe's output
    dropped), and a failed pretraining or probe ended in a CalledProcessError traceback."""
    lc = load_benchmark("learning_curve")
    _no_dataset(lc, monkeypatch)
    monkeypatch.setattr(lc, "_plot", lambda *a: None)
    argv = ["--pretrain", "mycfg.yaml", "--data", "d", "--steps", "3,5", "--root", "results/curve"]
    assert lc.main(argv) == 0
    lines = _logged(capsys.readouterr().out)
    assert lines[:-1] == [f"learning_curve: start, budgets 3, 5 steps, seed 0, root {caller_dir / 'results/curve'}",
                          f"learning_curve: steps 3 (1/2): pretraining -> {caller_dir / 'results/curve/steps3'}",
                          "learning_curve: steps 3: probing",
                          "learning_curve: steps 3: probe AUC task 0.7000, generic 0.7000, swapped 0.7000",
                          f"learning_curve: steps 5 (2/2): pretraining -> {caller_dir / 'results/curve/steps5'}",
                          "learning_curve: steps 5: probing",
                          "learning_curve: steps 5: probe AUC task 0.7000, generic 0.7000, swapped 0.7000"]
    assert lines[-1].startswith("learning_curve: done, 2 budget(s) in ")
    assert lc.main(argv) == 0  # finished budgets: reused, and said so
    assert _logged(capsys.readouterr().out)[1] == (f"learning_curve: steps 3 (1/2): reusing "
                                                   f"{caller_dir / 'results/curve/steps3/probe.json'}")
    children.failing = failing
    with pytest.raises(SystemExit) as stop:
        lc.main([*argv[:-1], "results/other"])
    name = "quality_probe.py" if failing == "quality_probe.py" else "qanchor pretrain"
    assert str(stop.value.code) == f"error: `{name}` failed (exit code 2); its message is above"
