"""benchmarks/quality_probe.py: the few-directions probe reads only the embedding's leading variation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def qp():
    return load_benchmark("quality_probe")


def _folds(n: int, k: int, rng) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.setdiff1d(np.arange(n), t), t) for t in np.array_split(rng.permutation(n), k)]


def test_top_directions_are_the_principal_components(qp):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1]) + 7.0
    z = qp.top_directions(x, 2)
    assert z.shape == (200, 2)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-9)
    # The projection's variances are the covariance's top eigenvalues, its columns uncorrelated.
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.diag(eigenvalues[:2]), atol=1e-8)
    assert eigenvalues[0] > 20  # the loud axis, not a quiet one


def test_few_directions_miss_a_signal_in_a_quiet_direction(qp):
    """A label carried by a low-variance direction: the full probe reads it, the top direction does not."""
    rng = np.random.default_rng(1)
    n = 400
    y = rng.integers(0, 2, n)
    x = np.column_stack([rng.normal(size=n) * 10.0, y + 0.3 * rng.normal(size=n)])
    folds = _folds(n, 4, rng)
    full_auc, _ = qp.probe(x, y, folds)
    top_auc, _ = qp.probe(qp.top_directions(x, 1), y, folds)
    assert full_auc > 0.9 and top_auc < 0.6
    both_auc, _ = qp.probe(qp.top_directions(x, 2), y, folds)
    assert both_auc == pytest.approx(full_auc, abs=0.01)  # 2 of 2 directions: everything again


def test_widened_appends_fixed_noise_up_to_the_width(qp):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    w = qp.widened(x, 7, seed=3)
    assert w.shape == (4, 7) and w.dtype == x.dtype
    np.testing.assert_array_equal(w[:, :3], x)
    np.testing.assert_array_equal(w, qp.widened(x, 7, seed=3))  # one draw per seed
    assert not np.array_equal(w[:, 3:], qp.widened(x, 7, seed=4)[:, 3:])
    assert qp.widened(x, 3, seed=0) is x and qp.widened(x, 2, seed=0) is x  # already as wide: unchanged


def test_noise_columns_cost_the_probe_at_a_small_label_budget(qp):
    """What ``peer_rfm_widened`` measures: the same signal, read by the same probe, scores lower with 125 columns of
    pure noise beside it when only a few hundred users are labelled, and the same with no noise to add."""
    rng = np.random.default_rng(2)
    n = 300
    signal = rng.normal(size=(n, 3))
    y = (signal @ np.array([1.0, 0.5, 0.25]) + rng.normal(size=n) > 0).astype(int)
    folds = _folds(n, 5, rng)
    alone, _ = qp.probe(signal, y, folds)
    wide, _ = qp.probe(qp.widened(signal, 128, seed=0), y, folds)
    assert alone - wide > 0.01, (alone, wide)


def test_run_reports_few_directions_for_every_query(qp, infer_env, tmp_path):
    out = tmp_path / "probe.json"
    assert qp.main(["--checkpoint", str(infer_env.ckpt), "--data", str(infer_env.ds_dir), "--folds", "2",
                    "--shuffle-batches", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["top_directions"]) == {str(k) for k in qp.TOP_DIRECTIONS}
    for k, row in result["top_directions"].items():
        assert set(row) == {"task", "generic", "swapped"}
        assert all(0.0 <= v <= 1.0 for v in row.values()), (k, row)
    for task in result["tasks"]:
        assert set(result["per_task"][task]["top_directions"]) == {str(k) for k in qp.TOP_DIRECTIONS}
    assert "path_part" not in result and "path_to_deep_norm_ratio" not in result  # no statistics path here
    assert "statistics" not in result and "statistics" not in result["widths"]
    for task in result["tasks"]:  # no path, no evidence: every input of this model is its input profile
        assert result["per_task"][task]["all_inputs"] == result["per_task"][task]["input_profile"]
    # the rows read what they say: the probe on the top-k principal directions of the task query's embedding
    from qanchor.bench.peers import stratified_folds
    from qanchor.bench.tasks import dataset_tasks, fold_count
    from qanchor.data.dataset import load_dataset
    from qanchor.infer.api import QAnchor

    ds = load_dataset(infer_env.ds_dir)
    tasks = [t for t in dataset_tasks(ds, [], None, 0) if fold_count(t.labels, 2) >= 2]
    user_ids = sorted({u for t in tasks for u in t.user_ids})
    q = QAnchor.from_pretrained(infer_env.ckpt, text_cache_dir=ds.text_cache_dir)
    q.model.eval()
    emb = qp.embed_all(q, ds, user_ids, [t.query for t in tasks] + ["What kind of user is this?"])[1]
    row = {u: i for i, u in enumerate(user_ids)}
    t = tasks[0]
    r = np.array([row[u] for u in t.user_ids])
    folds = stratified_folds(t.labels, fold_count(t.labels, 2), 0)
    got = {k: result["per_task"][t.name]["top_directions"][str(k)]["task"] for k in (1, 8)}
    for k in (1, 8):
        assert got[k] == pytest.approx(qp.probe(qp.top_directions(emb[r, 0], k), t.labels, folds)[0], abs=1e-6), k


def test_peer_rows_probe_the_rfm_peer_features_and_their_widened_copy(qp, infer_env, tmp_path):
    """``peer_rfm`` is the bench's RFM features on the same folds and probe (recomputed here task by task), and
    ``peer_rfm_widened`` the same plus noise columns up to the embedding's width."""
    from qanchor.bench.features import extract_features
    from qanchor.bench.peers import stratified_folds
    from qanchor.bench.tasks import dataset_tasks, fold_count
    from qanchor.data.dataset import load_dataset

    out = tmp_path / "probe.json"
    assert qp.main(["--checkpoint", str(infer_env.ckpt), "--data", str(infer_env.ds_dir), "--folds", "2",
                    "--shuffle-batches", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    ds = load_dataset(infer_env.ds_dir)
    tasks = [t for t in dataset_tasks(ds, [], None, 0) if fold_count(t.labels, 2) >= 2]
    assert [t.name for t in tasks] == result["tasks"]
    user_ids = sorted({u for t in tasks for u in t.user_ids})
    peers = extract_features(ds, user_ids, None)
    width = result["widths"]["embedding"]
    assert result["widths"]["peer_rfm"] == peers.rfm.shape[1]
    assert result["widths"]["noise_columns"] == width - peers.rfm.shape[1] > 0
    for i, t in enumerate(tasks):
        rfm = peers.rfm_log[peers.rows(t.user_ids)]
        folds = stratified_folds(t.labels, fold_count(t.labels, 2), 0)
        assert result["per_task"][t.name]["peer_rfm"] == list(qp.probe(rfm, t.labels, folds))
        draws = [qp.probe(qp.widened(rfm, width, qp.widening_seed(i, d)), t.labels, folds) for d in range(qp.WIDENING_DRAWS)]
        assert qp.WIDENING_DRAWS >= 2 and len({qp.widening_seed(i, d) for d in range(qp.WIDENING_DRAWS)}) == qp.WIDENING_DRAWS
        assert result["per_task"][t.name]["peer_rfm_widened"] == pytest.approx(np.mean(draws, axis=0).tolist(), abs=1e-12)


def test_seed_summary_of_few_directions():
    qs = load_benchmark("quality_seeds")
    probes = [{"top_directions": {"1": {"task": 0.6, "generic": 0.5}, "8": {"task": 0.7, "generic": 0.7}}},
              {"top_directions": {"1": {"task": 0.8, "generic": 0.5}, "8": {"task": 0.7, "generic": 0.9}}},
              {"task": {"auc": 0.7, "ks": 0.3}}]  # written before the rows existed: left out
    few = qs.top_directions_summary(probes)
    assert few["1"]["task"] == {"auc_mean": pytest.approx(0.7), "auc_std_over_seeds": pytest.approx(0.1),
                                "auc_per_seed": [0.6, 0.8]}
    assert few["8"]["generic"]["auc_mean"] == pytest.approx(0.8)
    table = qs.top_directions_table(few).splitlines()
    assert table[0] == "| top principal directions | task query AUC | generic query AUC |"
    assert table[2] == "| 1 | 0.7000 ± 0.1000 | 0.5000 ± 0.0000 |"
    assert qs.top_directions_summary(probes[2:]) == {}


def test_task_query_replaces_the_question_a_task_row_asks(qp, infer_env, tmp_path):
    """Asked the generic question, a task's row is the generic row exactly; the other tasks keep their own."""
    from qanchor.data.dataset import load_dataset

    ds = load_dataset(infer_env.ds_dir)
    name = sorted(ds.tasks)[0]
    generic = "What kind of user is this?"
    out = tmp_path / "probe.json"
    assert qp.main(["--checkpoint", str(infer_env.ckpt), "--data", str(infer_env.ds_dir), "--folds", "2",
                    "--shuffle-batches", "0", "--generic-query", generic, "--task-query", f"{name}={generic}",
                    "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["queries"][name] == generic
    assert all(result["queries"][t] == ds.tasks[t].query for t in result["tasks"] if t != name)
    assert result["per_task"][name]["task"] == result["per_task"][name]["generic"]
    with pytest.raises(SystemExit, match="unknown task"):
        qp.main(["--checkpoint", str(infer_env.ckpt), "--data", str(infer_env.ds_dir), "--task-query", "no_such_task=Why?"])


def test_a_seed_result_made_under_other_settings_is_refused_not_mixed_in(tmp_path, capsys):
    """quality_seeds.py reuses a finished seed (an interrupted root resumes); a result another --set, config or
    dataset produced was reused too, and the summary labelled with today's settings."""
    import argparse

    qs = load_benchmark("quality_seeds")
    config = tmp_path / "pretrain.yaml"
    config.write_text("train:\n  max_steps: 3\n")
    args = argparse.Namespace(probe=True, pretrain=str(config), bench=str(config), set=["loss.profile_weight=0"],
                              bench_set=[], generic_query="What kind of user is this?")
    done = tmp_path / "seed0" / "probe.json"
    done.parent.mkdir()
    done.write_text("{}")
    wanted = qs.settings_of(args, 0, "data-a")
    qs.check_reusable(done, wanted)  # no record (an older root): reused, with a warning
    assert "no record of the settings" in capsys.readouterr().err
    (done.parent / "probe.json.settings.json").write_text(json.dumps(wanted))
    qs.check_reusable(done, qs.settings_of(args, 0, "data-a"))  # the same settings: reused
    for changed in (argparse.Namespace(**{**vars(args), "set": []}), ):
        with pytest.raises(SystemExit, match=r"other settings \(set: \['loss.profile_weight=0'\] -> \[\]\)"):
            qs.check_reusable(done, qs.settings_of(changed, 0, "data-a"))
    with pytest.raises(SystemExit, match=r"data: 'data-a' -> 'data-b'"):
        qs.check_reusable(done, qs.settings_of(args, 0, "data-b"))
    config.write_text("train:\n  max_steps: 30\n")  # the config file edited in place
    with pytest.raises(SystemExit, match="pretrain_config"):
        qs.check_reusable(done, qs.settings_of(args, 0, "data-a"))


def test_a_bench_seed_is_redone_when_the_heads_prompt_tune_file_changes(tmp_path):
    """The per-fold heads' recipe is the prompt-tune file the bench config names; editing it left finished seeds'
    head rows reused as if they were the new recipe's."""
    import argparse

    qs = load_benchmark("quality_seeds")
    tune = tmp_path / "tune.yaml"
    tune.write_text("lr: 0.01\n")
    bench = tmp_path / "bench.yaml"
    bench.write_text(f"prompt_tune_config: {tune}\n")
    args = argparse.Namespace(probe=False, pretrain=str(bench), bench=str(bench), set=[], bench_set=[], generic_query=None)
    done = tmp_path / "bench-seed0" / "results.json"
    done.parent.mkdir()
    done.write_text("{}")
    (done.parent / "results.json.settings.json").write_text(json.dumps(qs.settings_of(args, 0, "d")))
    qs.check_reusable(done, qs.settings_of(args, 0, "d"))
    tune.write_text("lr: 0.5\n")
    with pytest.raises(SystemExit, match="prompt_tune_config"):
        qs.check_reusable(done, qs.settings_of(args, 0, "d"))
    older = {k: v for k, v in qs.settings_of(args, 0, "d").items() if k != "prompt_tune_config"}
    (done.parent / "results.json.settings.json").write_text(json.dumps(older))  # recorded before the key was kept
    qs.check_reusable(done, qs.settings_of(args, 0, "d"))  # not known to differ: reused, with a warning


def test_the_seed_summary_bolds_only_among_methods_that_ran_on_every_task():
    """A method skipped on a hard task averages over easier ones: the summary bolded it as the winner, with no task
    count, and its skipped task's mean was a mean of nothing."""
    qs = load_benchmark("quality_seeds")

    def result(head: float) -> dict:
        tasks = {"a": {"methods": {"qanchor_head": {"auc_mean": head}, "rfm_lr": {"auc_mean": 0.70}}},
                 "b": {"methods": {"qanchor_head": {"auc_mean": None}, "rfm_lr": {"auc_mean": 0.60}}}}
        return {"tasks": tasks, "average": {"qanchor_head": {"auc_mean": head, "ks_mean": 0.5, "n_tasks": 1},
                                            "rfm_lr": {"auc_mean": 0.65, "ks_mean": 0.3, "n_tasks": 2}}}

    summary = qs.summarise([result(0.80), result(0.90)])
    assert summary["qanchor_head"]["n_tasks"] == 1 and summary["rfm_lr"]["n_tasks"] == 2
    assert summary["qanchor_head"]["auc_by_task"] == {"a": pytest.approx(0.85)}  # b: skipped, no mean of nothing
    lines = qs.table(summary).splitlines()
    assert lines[0] == "| method | AUC (mean over seeds ± population std) | KS (mean ± std) | tasks | seeds |"
    assert lines[2] == "| `qanchor_head` | 0.8500 ± 0.0500 | 0.5000 ± 0.0000 | 1 | 2 |"
    assert lines[3] == "| `rfm_lr` | **0.6500 ± 0.0000** | **0.3000 ± 0.0000** | 2 | 2 |"


def test_with_one_question_for_every_task_there_is_no_other_tasks_query(qp, infer_env, tmp_path):
    """The swapped row fell back to the generic query's column when no task asked another question, and reported the
    generic query's numbers as another task's; now it is left empty, as the bench leaves out the method."""
    import math

    from qanchor.data.dataset import load_dataset

    same = "Will this user be active next month?"
    out = tmp_path / "probe.json"
    argv = ["--checkpoint", str(infer_env.ckpt), "--data", str(infer_env.ds_dir), "--folds", "2", "--shuffle-batches",
            "0", "--out", str(out)]
    for task in sorted(load_dataset(infer_env.ds_dir).tasks):
        argv += ["--task-query", f"{task}={same}"]
    assert qp.main(argv) == 0
    result = json.loads(out.read_text())
    empty = lambda x: x is None or math.isnan(x)  # noqa: E731  (written as null or NaN)
    assert empty(result["swapped"]["auc"]) and not empty(result["generic"]["auc"])
    assert all(empty(row["swapped"]) and not empty(row["generic"]) for row in result["top_directions"].values())
