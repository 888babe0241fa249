"""The runner end to end on the tiny dataset with a fake embedder and head: same folds for every method,
honest head evaluation, oracle rows, report, results and plots."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from qanchor.bench.features import extract_features, signed_log
from qanchor.bench.peers import Classifier, MethodInput, MethodResult, evaluate_folds, stratified_folds
from qanchor.bench.plots import _pyplot, save_figure, write_plots
from qanchor.bench.report import HISTORY_IN_PATH, average_table, data_kind_note, write_report, write_results
from qanchor.bench.runner import BenchResult, TaskResult, content_reading, prepare, run_bench
from qanchor.config import BenchConfig, DataConfig, PretrainConfig, load_config
from qanchor.data.dataset import load_dataset
from qanchor.data.io import OutputKind
from qanchor.errors import ConfigError
from qanchor.tune.head import HeadEntry
from tests.bench.helpers import FakeEmbedder, FakeHead


def _cfg(tiny_dataset, tmp_path, **kw) -> BenchConfig:
    base = dict(data=DataConfig(path=str(tiny_dataset)), folds=3, output_dir=str(tmp_path / "out"),
                methods=["qanchor_task", "qanchor_generic", "qanchor_swapped_query", "qanchor_head", "rfm_lgbm",
                         "rfm_lr", "union_lgbm", "union_lr", "coles"])
    return BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def bench(tiny_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    cfg = _cfg(tiny_dataset, tmp, coles_epochs=1)
    _, tasks = prepare(cfg)
    churn = next(t for t in tasks if t.name == "churn")
    held_out = churn.user_ids[::2]  # the head "saw" the other half while tuning
    embedder = FakeEmbedder(tasks)
    heads = {"churn": HeadEntry(FakeHead("churn", churn.query), held_out)}
    result = run_bench(cfg, embedder=embedder, heads=heads, progress=False)
    return cfg, result, embedder, held_out


def test_every_method_same_folds_and_users(bench, tiny_dataset, tmp_path):
    cfg, result, _, _ = bench
    for task in result.tasks.values():
        sizes = {m: r.n_test for m, r in task.methods.items() if r.ok and m != "qanchor_head"}
        assert len(set(map(tuple, sizes.values()))) == 1, sizes  # identical test folds for every fitted method
        assert sum(next(iter(sizes.values()))) == task.n_users and task.folds == 3
    # equal sizes are not equal users (stratified folds always have the same sizes): LightGBM refitted on the
    # bench's own split of each task reproduces the row fold by fold, as the LR peers do in the next test
    _, tasks = prepare(cfg)
    for t in tasks:
        feats = extract_features(load_dataset(tiny_dataset, cache_dir=tmp_path / "cache"), t.user_ids, None)
        folds = stratified_folds(t.labels, 3, cfg.seed)
        lgbm = evaluate_folds(MethodInput(features=feats.rfm[feats.rows(t.user_ids)], classifier=Classifier.LGBM),
                              t.labels, folds, cfg.seed)
        assert result.tasks[t.name].methods["rfm_lgbm"].auc == pytest.approx(lgbm.auc, abs=1e-12), t.name


def test_one_embedding_call_for_all_queries_and_heads(bench):
    _, _, embedder, _ = bench
    assert embedder.calls == [(40, 4)]  # two task queries + generic + one head: one prefix pass per user


def test_task_query_beats_generic_and_swapped_and_head_needs_a_model(bench):
    _, result, _, _ = bench
    churn = result.tasks["churn"]
    task = churn.methods["qanchor_task"].auc_mean_std[0]
    assert task > churn.methods["qanchor_generic"].auc_mean_std[0] + 0.1
    assert task > churn.methods["qanchor_swapped_query"].auc_mean_std[0] + 0.1  # the fake's signal is in its own query
    assert churn.methods["qanchor_head"].skipped.startswith("per-fold heads need a real checkpoint")
    assert churn.methods["union_lgbm"].ok


def test_linear_peers_are_the_lr_probe_on_signed_log_features(bench, tiny_dataset, tmp_path):
    """rfm_lr / union_lr: exactly the LR probe on signed-log RFM features (and the text mean), same folds."""
    cfg, result, _, _ = bench
    _, tasks = prepare(cfg)
    churn = next(t for t in tasks if t.name == "churn")
    feats = extract_features(load_dataset(tiny_dataset, cache_dir=tmp_path / "cache"), churn.user_ids, None)
    rows = feats.rows(churn.user_ids)
    folds = stratified_folds(churn.labels, 3, cfg.seed)
    rfm = evaluate_folds(MethodInput(features=signed_log(feats.rfm[rows]), classifier=Classifier.LR), churn.labels, folds,
                         cfg.seed)
    got = result.tasks["churn"].methods
    assert got["rfm_lr"].auc == pytest.approx(rfm.auc) and got["rfm_lr"].ks == pytest.approx(rfm.ks)
    assert got["union_lr"].ok and len(got["union_lr"].auc) == 3
    assert got["rfm_lr"].auc != pytest.approx(got["rfm_lgbm"].auc)  # a different classifier, not an alias


def test_coles_runs_or_says_why(bench):
    coles = bench[1].tasks["churn"].methods["coles"]
    assert coles.ok or "pip install --no-deps pytorch-lifestream" in coles.skipped


def test_the_coles_row_is_the_lr_probe_on_the_coles_vectors(tiny_dataset, tmp_path, monkeypatch):
    """Without pytorch-lifestream the row above is only ever skipped: with known vectors in place of CoLES's, the row
    is exactly the LR probe on each task user's own vector, on the bench's folds."""
    from qanchor.bench import methods

    cfg = _cfg(tiny_dataset, tmp_path, methods=["coles"], tasks=["churn"])
    seen = {}

    def vectors(ds, user_ids, cfg, progress=False):
        seen["ids"] = list(user_ids)
        return np.random.default_rng(0).normal(size=(len(user_ids), 6)).astype(np.float32)

    monkeypatch.setattr(methods, "coles_embeddings", vectors)
    result = run_bench(cfg, progress=False)
    _, tasks = prepare(cfg)
    churn = tasks[0]
    x = vectors(None, seen["ids"], cfg)[[seen["ids"].index(u) for u in churn.user_ids]]
    expected = evaluate_folds(MethodInput(features=x, classifier=Classifier.LR), churn.labels,
                              stratified_folds(churn.labels, 3, cfg.seed), cfg.seed)
    assert result.tasks["churn"].methods["coles"].auc == pytest.approx(expected.auc, abs=1e-12)


def test_oracle_only_where_prob_exists(bench):
    _, result, _, _ = bench
    coupon, churn = result.tasks["coupon"], result.tasks["churn"]
    assert churn.oracle is None and churn.oracle_auc is None
    assert coupon.oracle.ok and 0 <= coupon.oracle_auc <= 1 and len(coupon.oracle.auc) == 3
    _, tasks = prepare(bench[0])
    task = next(t for t in tasks if t.name == "coupon")
    from qanchor.metrics import auc_score

    assert coupon.oracle_auc == pytest.approx(auc_score(task.labels, task.prob), abs=1e-12)  # the generator's own P
    folds = stratified_folds(task.labels, 3, bench[0].seed)
    assert coupon.oracle.auc == pytest.approx(evaluate_folds(MethodInput(scores=task.prob), task.labels, folds, 0).auc,
                                              abs=1e-12)


def test_results_json_report_and_plots(bench, tmp_path):
    _, result, _, _ = bench
    plots = write_plots(result, tmp_path)
    assert {p.name for p in plots} == {"auc_ks.png", "pca_churn.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    data = json.loads(write_results(result, tmp_path).read_text())
    task = data["tasks"]["churn"]["methods"]["qanchor_task"]
    assert len(task["auc"]) == 3 and len(task["ks"]) == 3 and task["auc_mean"] == pytest.approx(np.mean(task["auc"]))
    assert data["run"]["folds"] == 3 and "qanchor_task" in data["average"]
    report = write_report(result, tmp_path, [str(p) for p in plots]).read_text()
    assert report.count("## Task `") == 2 and "## Average over tasks" in report and "![auc_ks](auc_ks.png)" in report
    assert "*oracle*" in report and "**" in report and "skipped: per-fold heads need a real checkpoint" in report
    table = average_table(result)
    best = max(a["auc_mean"] for a in result.average().values())
    assert f"**{best:.4f}" in table  # the best average AUC is bold
    assert "± the mean of its per-task std over folds (the fold-to-fold spread, not the spread over tasks)" in table
    # a method that ran on no task keeps its row, saying why (it was dropped from the table and from results.json's
    # average, said only on the terminal)
    assert "| `qanchor_head` | Q-Anchor, prompt-tuned head (tuned per fold) | — | — | 0/2 (skipped: per-fold heads need a " \
           "real checkpoint" in table


def test_a_method_skipped_on_a_task_cannot_take_the_bold(bench, monkeypatch):
    """Averaged over fewer (easier) tasks, a method could out-score those that ran on all of them."""
    _, result, _, _ = bench
    row = lambda auc, ks, n: {"auc_mean": auc, "auc_std": 0.01, "ks_mean": ks, "ks_std": 0.01, "n_tasks": n}  # noqa: E731
    monkeypatch.setattr(result, "average", lambda ablations=False: {"qanchor_head": row(0.95, 0.9, 1),
                                                                   "rfm_lr": row(0.70, 0.3, 2), "union_lr": row(0.69, 0.4, 2)})
    table = average_table(result)
    assert "**0.7000" in table and "**0.4000" in table and "**0.95" not in table and "**0.9000" not in table


def test_a_figure_replaces_the_last_good_one_whole_or_not_at_all(tmp_path, monkeypatch):
    plt = _pyplot()
    path = tmp_path / "auc_ks.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    assert save_figure(fig, path) == path and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    good = path.read_bytes()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])

    def dies_mid_write(self, fname, **kwargs):  # a run killed half way through the PNG
        Path(fname).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(fig), "savefig", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, path)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["auc_ks.png"]


def test_peers_only_without_model(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path, methods=["qanchor_task", "rfm_lgbm"], tasks=["coupon"])
    result = run_bench(cfg, progress=False)
    assert result.tasks["coupon"].methods["rfm_lgbm"].ok
    assert "no model given" in result.tasks["coupon"].methods["qanchor_task"].skipped


def test_unknown_method_and_missing_data(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="unknown"):
        run_bench(_cfg(tiny_dataset, tmp_path, methods=["gpt5"]), progress=False)
    with pytest.raises(ConfigError, match="data.path"):
        run_bench(BenchConfig(), progress=False)


# ------------------------------------------------------------------------------------------- data kind
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"


@pytest.mark.parametrize(("config", "reads"), [("tiny-ratings.yaml", HISTORY_IN_PATH),
                                               ("tiny-cj.yaml", "the kept events' content as profile targets")])
def test_content_reading_names_the_checkpoints_content_settings(config, reads):
    run_cfg = load_config(str(CONFIGS / config), schema=PretrainConfig)
    assert content_reading(SimpleNamespace(model=SimpleNamespace(run_cfg=run_cfg))) == reads
    assert content_reading(None) is None


def _peers_only(text_mean_auc: float, rfm_auc: float, model_content: str | None) -> BenchResult:
    def peer(auc: float) -> MethodResult:
        return MethodResult(auc=[auc - 0.01, auc + 0.01], ks=[0.2, 0.2], n_test=[50, 50])

    run = {"dataset": "d", "data_path": "d", "cutoff": "2024-01-01", "checkpoint": "ckpt", "heads_dir": None, "folds": 2,
           "seed": 0, "generic_query": "q?", "qanchor_version": "0", "started": "now", "model_content": model_content}
    task = TaskResult("t", "q?", 100, 0.5, 2, methods={"rfm_lr": peer(rfm_auc), "text_mean_lr": peer(text_mean_auc)})
    return BenchResult(run, {"t": task})


def test_data_kind_note_tells_content_from_count_data_and_names_a_mismatched_recipe(tmp_path):
    kept = "the kept events' content as profile targets"
    content = data_kind_note(_peers_only(0.86, 0.57, kept))  # the ratings world's peers
    assert "about what the events are" in content and "tiny-ratings.yaml" in content
    assert f"This checkpoint reads {kept}" in content
    assert "This checkpoint" not in data_kind_note(_peers_only(0.86, 0.57, HISTORY_IN_PATH))
    counts = data_kind_note(_peers_only(0.62, 0.725, HISTORY_IN_PATH))  # Complete Journey's peers
    assert "how many events" in counts and "tiny-cj.yaml" in counts and "This checkpoint reads the whole" in counts
    assert "This checkpoint" not in data_kind_note(_peers_only(0.62, 0.725, kept))
    assert "This checkpoint" not in data_kind_note(_peers_only(0.86, 0.57, None))  # peers only: no checkpoint to judge
    assert data_kind_note(_peers_only(0.60, 0.57, kept)) is None  # the text ahead by less than the margin: no advice
    # labels neither peer reads (random ones gave rfm_lr 0.54 ± 0.08 against 0.46): no kind, and no recipe, is named
    result = _peers_only(0.46, 0.54, kept)
    result.tasks["t"].methods["rfm_lr"] = MethodResult(auc=[0.46, 0.62], ks=[0.1, 0.2], n_test=[50, 50])
    noise = data_kind_note(result)
    assert noise.startswith("Neither model-free peer reads these labels clearly above chance") and ".yaml" not in noise
    assert "how many events" in data_kind_note(_peers_only(0.46, 0.58, kept))  # 0.08 above chance, folds 0.014 apart
    report = write_report(_peers_only(0.86, 0.57, kept), tmp_path).read_text()
    assert "**Data kind.** The tasks are about what the events are (`text_mean_lr` 0.8600 against `rfm_lr` 0.5700" in report


def test_the_data_kind_note_compares_the_peers_on_the_tasks_both_ran_on():
    """`text_mean_lr` is skipped on a task without event texts; averaged over the tasks each ran on, the note read
    0.66 against 0.61 (content data) where on the one task both ran the counts won 0.70 to 0.66."""
    result = _peers_only(0.66, 0.70, None)
    result.tasks["u"] = TaskResult("u", "q?", 100, 0.5, 2, methods={
        "rfm_lr": MethodResult(auc=[0.51, 0.53], ks=[0.1, 0.1], n_test=[50, 50]),
        "text_mean_lr": MethodResult(auc=[], ks=[], n_test=[], skipped="no user has event texts")})
    note = data_kind_note(result)
    assert "how many events" in note and "`text_mean_lr` 0.6600 against `rfm_lr` 0.7000" in note


def test_no_data_kind_note_without_both_peers(bench):
    _, result, _, _ = bench  # rfm_lr ran, text_mean_lr did not
    assert "rfm_lr" in result.average() and data_kind_note(result) is None


def test_a_missing_checkpoint_is_refused_before_the_output_dir_is_claimed(tiny_dataset, tmp_path, capsys):
    from qanchor.cli import main

    out = tmp_path / "results"
    argv = ["bench", f"data.path={tiny_dataset}", f"checkpoint={tmp_path / 'nothere'}", f"output_dir={out}",
            "methods=[qanchor_task,rfm_lr]"]
    assert main(argv) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert not out.exists()  # a failed start leaves no empty results directory behind
    # peers alone need no checkpoint: the same setting is not an error there
    cfg = load_config(None, [f"data.path={tiny_dataset}", f"checkpoint={tmp_path / 'nothere'}", "methods=[rfm_lr]"],
                      schema=BenchConfig)
    assert prepare(cfg)[1]


def test_a_prompt_tune_config_is_required_only_where_heads_are_tuned(tiny_dataset, tmp_path):
    missing = f"prompt_tune_config={tmp_path / 'none.yaml'}"
    peers = load_config(None, [f"data.path={tiny_dataset}", missing, "methods=[rfm_lr]"], schema=BenchConfig)
    assert prepare(peers)[1]  # a copied bench config whose tuning file is elsewhere still runs the peers
    for needs in (["methods=[qanchor_head]"], ["methods=[rfm_lr]", "ablations=true"]):
        cfg = load_config(None, [f"data.path={tiny_dataset}", missing, *needs], schema=BenchConfig)
        with pytest.raises(ConfigError, match="prompt_tune_config: .*none.yaml not found"):
            prepare(cfg)


def test_per_fold_heads_are_skipped_not_crashed_where_a_fold_trains_on_one_user_of_a_class(tiny_dataset, tmp_path):
    """Two positives give two folds, each training on one: a head's validation split cannot be stratified then, and
    the row says so instead of stopping the whole bench with a traceback."""
    from dataclasses import replace

    from qanchor.bench import methods
    from qanchor.bench.peers import Skip

    _, tasks = prepare(_cfg(tiny_dataset, tmp_path))
    labels = np.zeros(len(tasks[0].labels), np.int8)
    labels[:2] = 1
    task = replace(tasks[0], labels=labels)
    folds = stratified_folds(labels, 2, 0)
    with pytest.raises(Skip, match=f"a fold of task {task.name} has 1"):
        methods._fold_heads(SimpleNamespace(fold_heads={}), task, folds)


def test_per_fold_heads_are_skipped_where_a_fold_has_too_few_users_for_a_validation_split(tiny_dataset, tmp_path):
    """Six labelled users in three folds: each trains on four, and val_fraction=0.2 of four is one validation user,
    which cannot hold both classes (sklearn raised a traceback and the bench lost every later row)."""
    from dataclasses import replace

    from qanchor.bench import methods
    from qanchor.bench.peers import Skip

    _, tasks = prepare(_cfg(tiny_dataset, tmp_path))
    task = replace(tasks[0], user_ids=tasks[0].user_ids[:6], labels=np.array([1, 0, 1, 0, 1, 0], np.int8))
    folds = stratified_folds(task.labels, 3, 0)
    ctx = SimpleNamespace(fold_heads={}, tune_config=SimpleNamespace(val_fraction=0.2))
    with pytest.raises(Skip, match=r"val_fraction=0.2.*trains on 4 users"):
        methods._fold_heads(ctx, task, folds)


def test_per_fold_heads_are_skipped_where_a_folds_validation_split_holds_one_class(tiny_dataset, tmp_path):
    """Three positives among 40 users: a fold trains on two, and a 20% stratified validation split rounds them to none;
    every evaluation's AUC was NaN and the head silently kept its untuned step 0."""
    from dataclasses import replace

    from qanchor.bench import methods
    from qanchor.bench.peers import Skip

    _, tasks = prepare(_cfg(tiny_dataset, tmp_path))
    labels = np.zeros(len(tasks[0].labels), np.int8)
    labels[:3] = 1
    task = replace(tasks[0], labels=labels)
    folds = stratified_folds(labels, 3, 0)
    ctx = SimpleNamespace(fold_heads={}, tune_config=SimpleNamespace(val_fraction=0.2, seed=0),
                          store_rows=lambda ids: np.arange(len(ids)))
    with pytest.raises(Skip, match=r"fold 1's val users .* hold one class"):
        methods._fold_heads(ctx, task, folds)


def test_text_peer_is_skipped_without_event_texts(tiny_dataset, tmp_path):
    """Every user's text vector is the no-events zero: 0.5000 would read as a result (and feed the data-kind note)."""
    from qanchor.bench import methods
    from qanchor.bench.peers import Skip

    _, tasks = prepare(_cfg(tiny_dataset, tmp_path))
    task = tasks[0]
    feats = SimpleNamespace(text_mean=np.zeros((len(task.user_ids), 4), np.float32),
                            rows=lambda ids: np.arange(len(ids)))
    with pytest.raises(Skip, match="no user of this task has an event text"):
        methods._text_mean_lr(SimpleNamespace(peer_features=feats), task)
    feats.text_mean[1, 2] = 0.5
    assert methods._text_mean_lr(SimpleNamespace(peer_features=feats), task).features.shape == (len(task.user_ids), 4)


def test_a_heads_dir_without_heads_is_refused_before_the_output_dir_is_claimed(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path, heads_dir=str(tmp_path / "heads-typo"), methods=["rfm_lr"])
    with pytest.raises(ConfigError, match=r"heads_dir=.*heads-typo: no prompt-tuned heads there.*heads_dir=null"):
        run_bench(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_bench_and_uqa_refuse_data_caps_they_would_ignore(tiny_dataset):
    """`data.max_events={bil: 3}` (a typo, and caps the bench never uses) was accepted in silence."""
    from qanchor.config import DataConfig, DataOverrides, UqaConfig

    with pytest.raises(ConfigError, match="data.max_events: the bench packs users as the checkpoint was pretrained"):
        BenchConfig(data=DataConfig(path=str(tiny_dataset), max_events={"bil": 3}))
    with pytest.raises(ConfigError, match="data.default_max_events"):
        BenchConfig(data=DataConfig(path=str(tiny_dataset), default_max_events=1))
    with pytest.raises(ConfigError, match="data.max_events: uqa reads users as the checkpoint was pretrained"):
        UqaConfig(checkpoint="c", data=DataOverrides(path="d", max_events={"bil": 3}))
    BenchConfig(data=DataConfig(path=str(tiny_dataset)))  # path (and cache_dir) are what it reads


def test_a_bad_ablation_override_is_refused_before_any_work(infer_env, tmp_path):
    cfg = _cfg(infer_env.ds_dir, tmp_path, checkpoint=str(infer_env.ckpt), methods=["qanchor_task", "qanchor_random_init"],
               ablation_pretrain_overrides=["train.max_stepz=1"])
    with pytest.raises(ConfigError, match="ablation_pretrain_overrides: .*unknown key 'train.max_stepz'"):
        prepare(cfg)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_recipe_a_new_run_may_not_use_is_said_before_any_work(infer_env, tmp_path):
    """A model saved before a training check was added loads and serves, but qanchor_random_init pretrains its recipe
    again: the refusal came after the main rows, worded as if the user had given the setting."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(infer_env.ckpt, ckpt)
    saved = (ckpt / "config.yaml").read_text()
    (ckpt / "config.yaml").write_text(saved.replace("  margin: ", "  margin: -1.0 #", 1))
    cfg = _cfg(infer_env.ds_dir, tmp_path, checkpoint=str(ckpt), methods=["qanchor_task", "qanchor_random_init"])
    with pytest.raises(ConfigError, match=r"the checkpoint's recipe .*loss.margin must be >= 0.*ablation_pretrain_overrides"):
        prepare(cfg)
    prepare(_cfg(infer_env.ds_dir, tmp_path, checkpoint=str(ckpt), methods=["qanchor_task"]))  # nothing retrained: fine


def test_a_custom_task_with_a_shipped_config_gets_its_own_folder(tiny_dataset, tmp_path, monkeypatch):
    """`--config configs/bench/tiny-cj.yaml labels=wine.csv` wrote into the config's output_dir, replacing the demo's
    report with the wine task's."""
    from qanchor.cli import bench as bench_cli
    from qanchor.cli import main

    seen = {}

    def stop(cfg, progress):
        seen["out"] = cfg.output_dir
        raise SystemExit(0)

    monkeypatch.setattr(bench_cli, "bench_and_report", stop)
    config = Path(__file__).resolve().parents[2] / "configs/bench/tiny-synth.yaml"
    common = ["bench", "--config", str(config), f"data.path={tiny_dataset}", f"labels={tmp_path / 'wine.csv'}", "query=Q?"]
    with pytest.raises(SystemExit):
        main(common)
    assert seen["out"] == str(Path("results") / "custom-wine")
    with pytest.raises(SystemExit):
        main([*common, f"output_dir={tmp_path / 'mine'}"])
    assert seen["out"] == str(tmp_path / "mine")
    # A config file of the user's own that sets labels and output_dir together: its folder is this task's.
    own = tmp_path / "mybench.yaml"
    own.write_text(f"labels: {tmp_path / 'wine.csv'}\noutput_dir: {tmp_path / 'my-wine-bench'}\nquery: Q?\n")
    with pytest.raises(SystemExit):
        main(["bench", "--config", str(own), f"data.path={tiny_dataset}"])
    assert seen["out"] == str(tmp_path / "my-wine-bench")
    # ...but not for other labels named on the command line: those would replace the wine report
    with pytest.raises(SystemExit):
        main(["bench", "--config", str(own), f"data.path={tiny_dataset}", f"labels={tmp_path / 'beer.csv'}"])
    assert seen["out"] == str(Path("results") / "custom-beer")


def test_two_label_files_of_one_name_get_two_folders(tiny_dataset, tmp_path, monkeypatch):
    """`labels=wine.csv`, then `labels=alt/wine.csv`: both went to results/custom-wine, and the second replaced the
    first's report without a word. Another file of the same name now gets the next free folder; the same file its own."""
    import json

    from qanchor.cli import bench as bench_cli
    from qanchor.cli import main

    seen = []

    def report(cfg, progress):  # what the report records of its labels, written where the run was sent
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"run": {"labels": str(Path(cfg.labels).resolve())}}))
        seen.append(cfg.output_dir)
        raise SystemExit(0)

    monkeypatch.setattr(bench_cli, "bench_and_report", report)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alt").mkdir()
    for labels in ("wine.csv", "alt/wine.csv", "wine.csv", str(tmp_path / "alt" / "wine.csv"), "beer.csv"):
        with pytest.raises(SystemExit):
            main(["bench", f"data.path={tiny_dataset}", f"labels={labels}", "query=Q?"])
    custom = str(Path("results") / "custom-wine")
    assert seen == [custom, f"{custom}-2", custom, f"{custom}-2", str(Path("results") / "custom-beer")]
    # a folder an interrupted run left (its rows in partial/, no report yet) is that run's labels file's too
    from qanchor.bench.journal import BenchJournal

    BenchJournal.open(tmp_path / "results" / "custom-cider", "some-key", labels=str(tmp_path / "alt" / "cider.csv"))
    with pytest.raises(SystemExit):
        main(["bench", f"data.path={tiny_dataset}", "labels=cider.csv", "query=Q?"])
    assert seen[-1] == str(Path("results") / "custom-cider-2")


def test_uqa_results_are_a_kind_of_their_own(tmp_path):
    """uqa replaced a bench's report.md and results.json in a folder the bench had marked as its own."""
    from qanchor.data.io import check_output_dir, claim_output_dir
    from qanchor.errors import OutputError

    claim_output_dir(tmp_path / "bench", OutputKind.RESULTS)
    with pytest.raises(OutputError):
        check_output_dir(tmp_path / "bench", OutputKind.UQA_RESULTS)


def test_a_task_whose_users_mostly_have_no_data_is_said_by_the_bench_and_prompt_tune(tiny_dataset, tmp_path, capsys):
    """Labels keyed by other ids than the events' scored most users alike (AUC near 0.5) without a word: only
    `qanchor data validate` counted the users without an event or a tabular row."""
    from qanchor.bench.runner import prepare
    from qanchor.config import BenchConfig, load_config
    from tests.helpers import add_users_without_data, copy_dataset

    ds = copy_dataset(tiny_dataset, tmp_path / "ds")
    labelled = add_users_without_data(ds, "churn")
    args = [f"data.path={ds}", "checkpoint=null", "methods=[rfm_lr]", f"output_dir={tmp_path / 'b'}"]
    capsys.readouterr()
    prepare(load_config(None, [*args, "tasks=[churn]"], schema=BenchConfig))
    said = capsys.readouterr().err
    assert f"task churn: {labelled * 2 // 3} of its {labelled} labelled users have no event" in said
    prepare(load_config(None, [*args, "tasks=[coupon]"], schema=BenchConfig))  # a task with data: nothing said
    assert "labelled users have no event" not in capsys.readouterr().err
