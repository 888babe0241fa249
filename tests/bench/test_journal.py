"""The bench journal: finished rows come back only under the key they were made with; damaged rows are recomputed."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

import qanchor.bench.ablations as ablations_module
import qanchor.bench.journal as journal_module
from qanchor.bench.embedder import QAnchorEmbedder
from qanchor.bench.journal import BenchJournal, remove_journal, text_encoder_digests
from qanchor.bench.methods import BenchContext
from qanchor.bench.peers import MethodResult
from qanchor.bench.runner import run_bench
from qanchor.config import BenchConfig, TextEncoderConfig
from qanchor.data.dataset import load_dataset
from qanchor.data.text_cache import default_encoder_path
from qanchor.infer.api import QAnchor


def test_rows_come_back_under_their_key_only(tmp_path):
    row = MethodResult(auc=[0.61, 0.7234567890123], ks=[0.2, 0.31], n_test=[50, 49], note="probe C=1", seconds=1.25)
    journal = BenchJournal.open(tmp_path, "key-a")
    assert len(journal) == 0 and journal.get(0, "churn", "rfm_lr") is None
    journal.put(0, "churn", "rfm_lr", row)
    skip = MethodResult(skipped="pytorch-lifestream not importable")
    assert journal.put(1, "coupon", "coles", skip) is skip
    again = BenchJournal.open(tmp_path, "key-a")
    assert len(again) == 1 and again.get(0, "churn", "rfm_lr") == row  # floats round-trip exactly
    # a skip is found again, not replayed: its cause (a package not installed) may be gone by the next run
    assert again.get(1, "coupon", "coles") is None
    assert again.get(0, "coupon", "rfm_lr") is None  # the index and the name must both match
    other = BenchJournal.open(tmp_path, "key-b")  # another checkpoint, dataset or setting: start afresh
    assert len(other) == 0 and not list((tmp_path / "partial").glob("row-*.json"))
    assert json.loads((tmp_path / "partial" / "key.json").read_text()) == {"key": "key-b", "labels": None}
    remove_journal(tmp_path)
    assert not (tmp_path / "partial").exists()


def test_a_damaged_row_or_key_is_not_trusted(tmp_path):
    journal = BenchJournal.open(tmp_path, "k")
    journal.put(0, "churn", "rfm_lr", MethodResult(auc=[0.6], ks=[0.2], n_test=[10]))
    journal.put(0, "churn", "text_mean_lr", MethodResult(auc=[0.7], ks=[0.3], n_test=[10]))
    (tmp_path / "partial" / "row-0000-text_mean_lr.json").write_text('{"task": "churn", "meth')  # torn by hand
    assert [m for m in ("rfm_lr", "text_mean_lr") if BenchJournal.open(tmp_path, "k").get(0, "churn", m)] == ["rfm_lr"]
    (tmp_path / "partial" / "key.json").write_text("not json")
    assert len(BenchJournal.open(tmp_path, "k")) == 0


def test_removal_keeps_what_the_journal_did_not_write(tmp_path):
    journal = BenchJournal.open(tmp_path, "k")
    journal.put(0, "churn", "rfm_lr", MethodResult(auc=[0.6], ks=[0.2], n_test=[10]))
    (tmp_path / "partial" / "notes.txt").write_text("mine")
    BenchJournal.open(tmp_path, "other")  # stale rows go, the note stays
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == ["key.json", "notes.txt"]
    remove_journal(tmp_path)
    assert [p.name for p in (tmp_path / "partial").iterdir()] == ["notes.txt"]



def test_the_key_changes_with_the_probe_grid(tiny_dataset, monkeypatch):
    # Rows made with another C grid (an upgraded qanchor) must not be mixed with this run's.
    ds = load_dataset(tiny_dataset)
    key = journal_module.journal_key(BenchConfig(), ds, [], "ckpt-hash", {})
    assert journal_module.journal_key(BenchConfig(), ds, [], "ckpt-hash", {}) == key
    monkeypatch.setattr(journal_module, "LR_CS", (0.01, 0.1, 1.0))
    assert journal_module.journal_key(BenchConfig(), ds, [], "ckpt-hash", {}) != key


def test_the_key_changes_with_the_code_that_computes_the_rows(tiny_dataset, monkeypatch):
    """qanchor's version string stays 0.1.0 between commits: a changed peer, feature or probe (or an upgraded
    scikit-learn) must not resume rows the old code made."""
    ds = load_dataset(tiny_dataset)
    key = journal_module.journal_key(BenchConfig(), ds, [], "ckpt-hash", {})
    digest = journal_module.code_digest()
    assert len(digest) == 64 and journal_module.code_digest() == digest
    monkeypatch.setattr(journal_module, "code_digest", lambda: "other code")
    assert journal_module.journal_key(BenchConfig(), ds, [], "ckpt-hash", {}) != key


def test_the_key_changes_with_the_prompt_tune_files_text(tiny_dataset, tmp_path):
    # The per-fold heads' settings are in the prompt-tune YAML that cfg only names: editing it must start afresh.
    ds = load_dataset(tiny_dataset)
    tune = tmp_path / "tune.yaml"
    tune.write_text("steps: 100\n")
    cfg = BenchConfig(prompt_tune_config=str(tune))
    key = journal_module.journal_key(cfg, ds, [], "ckpt-hash", {})
    assert journal_module.journal_key(cfg, ds, [], "ckpt-hash", {}) == key
    tune.write_text("steps: 200\n")
    assert journal_module.journal_key(cfg, ds, [], "ckpt-hash", {}) != key


@pytest.mark.parametrize("methods, follows", [(["rfm_lr"], False), (["rfm_lr", "qanchor_random_init"], True)])
def test_the_key_follows_the_pairs_when_a_row_is_trained_on_them(tiny_dataset, monkeypatch, methods, follows):
    """qanchor_random_init's checkpoint standardises its query evidence on the UserU pairs: after `data userU` rebuilt
    them, a resumed bench reused the row made on the old pairs beside rows made on the new ones."""
    ds = load_dataset(tiny_dataset)
    cfg = BenchConfig(methods=methods)
    key = journal_module.journal_key(cfg, ds, [], "ckpt-hash", {})
    monkeypatch.setattr(journal_module, "trained_data_id", lambda ds: "other pairs")
    assert (journal_module.journal_key(cfg, ds, [], "ckpt-hash", {}) != key) == follows


def test_ablation_rows_go_into_a_journal_that_is_still_empty(tmp_path, monkeypatch):
    # A journal with no rows yet (every main row skipped, or none run) has len 0; it must still keep ablation rows.
    calls = []
    monkeypatch.setattr(ablations_module, "pretrain_ablation", lambda cfg, name, out, progress: out)
    monkeypatch.setattr(ablations_module, "QAnchorEmbedder", SimpleNamespace(open=lambda ckpt, ds: None))
    monkeypatch.setattr(ablations_module, "BenchContext", lambda *a, **k: None)
    monkeypatch.setattr(ablations_module, "evaluate_task",
                        lambda ctx, task, method, folds: calls.append(task.name) or MethodResult(auc=[0.6], ks=[0.2], n_test=[10]))
    journal = BenchJournal.open(tmp_path, "k")
    assert len(journal) == 0
    cfg = BenchConfig(checkpoint="ck", output_dir=str(tmp_path), ablation_prompt_tokens=[])
    result = SimpleNamespace(tasks={"churn": SimpleNamespace(ablations={})})
    tasks = [SimpleNamespace(name="churn")]
    ablations_module.run_ablations(cfg, None, tasks, {"churn": []}, result, progress=False, journal=journal)
    names = set(result.tasks["churn"].ablations)
    assert names and len(calls) == len(names)
    assert sorted(p.name for p in (tmp_path / "partial").glob("row-*.json")) == sorted(
        f"row-0000-ablation-{n}.json" for n in names)



def test_the_key_is_the_same_for_the_same_inputs_named_by_other_paths(tiny_dataset, tmp_path, monkeypatch):
    """The key hashed the settings' text: the same bench re-run with a relative data.path, from another working
    directory or with a trailing slash dropped every finished row without a word."""
    import os
    from dataclasses import replace

    ds = load_dataset(tiny_dataset)
    tune = tmp_path / "tune.yaml"
    tune.write_text("steps: 10\n")

    def cfg(path: str, tune_file: str, checkpoint: str, **kw) -> BenchConfig:
        return BenchConfig(data=replace(BenchConfig().data, path=path), prompt_tune_config=tune_file,
                           checkpoint=checkpoint, **kw)

    key = journal_module.journal_key(cfg(str(tiny_dataset), str(tune), str(tmp_path)), ds, [], "ckpt-hash", {})
    monkeypatch.chdir(tiny_dataset.parent)
    relative = cfg(tiny_dataset.name + "/", os.path.relpath(tune), os.path.relpath(tmp_path) + "/")
    assert journal_module.journal_key(relative, ds, [], "ckpt-hash", {}) == key
    other = cfg(str(tiny_dataset), str(tune), str(tmp_path), folds=3)
    assert journal_module.journal_key(other, ds, [], "ckpt-hash", {}) != key  # a setting is still a setting
    # a relative cache folder the first run creates: the same key before and after it exists
    cached = replace(relative, data=replace(relative.data, cache_dir="vcache"))
    first = journal_module.journal_key(cached, ds, [], "ckpt-hash", {})
    (tiny_dataset.parent / "vcache").mkdir()
    try:
        assert journal_module.journal_key(cached, ds, [], "ckpt-hash", {}) == first
    finally:
        (tiny_dataset.parent / "vcache").rmdir()


def test_with_ablations_the_key_follows_the_pretraining_pairs_and_stale_rows_are_said(tiny_dataset, tmp_path, capsys):
    """Ablation sub-runs pretrain on userU.parquet, which the dataset's fingerprint leaves out: rows of sub-runs trained
    on the old pairs were mixed with sub-runs retrained on the new ones."""
    import os

    from qanchor.data.userU import build_userU
    from qanchor.train.pretrain import trained_data_id
    from tests.helpers import copy_dataset

    ds_dir = tmp_path / "ds"
    copy_dataset(tiny_dataset, ds_dir)
    build_userU(ds_dir, progress=False)
    ds = load_dataset(ds_dir)
    with_ablations, without = BenchConfig(ablations=True), BenchConfig(methods=["rfm_lr", "qanchor_task"])
    keys = [journal_module.journal_key(c, ds, [], "ckpt-hash", {}) for c in (with_ablations, without)]
    before = trained_data_id(ds)
    pairs = ds_dir / "userU.parquet"
    os.utime(pairs, ns=(pairs.stat().st_atime_ns, pairs.stat().st_mtime_ns + 10**9))  # the same pairs written again
    assert trained_data_id(ds) == before
    table = pq.read_table(pairs)
    pq.write_table(table.slice(0, table.num_rows - 1), pairs)  # the pairs rebuilt, one fewer
    assert trained_data_id(ds) != before
    assert journal_module.journal_key(with_ablations, ds, [], "ckpt-hash", {}) != keys[0]
    assert journal_module.journal_key(without, ds, [], "ckpt-hash", {}) == keys[1]  # no sub-run reads them
    journal = BenchJournal.open(tmp_path / "out", "k1")
    journal.put(0, "churn", "rfm_lr", MethodResult(auc=[0.6], ks=[0.2], n_test=[10]))
    journal.put(0, "churn", "ablation-no_ntp", MethodResult(auc=[0.6], ks=[0.2], n_test=[10]))
    assert journal.finished(["rfm_lr", "text_mean_lr"]) == 1 and len(journal) == 2
    capsys.readouterr()
    BenchJournal.open(tmp_path / "out", "k2")
    assert "held 2 finished rows of a run with other settings or inputs; they are computed again" in capsys.readouterr().out


def _encoder_copy(folder: Path) -> Path:
    shutil.copytree(default_encoder_path(), folder)
    return folder


def _change_one_weight(folder: Path) -> None:
    """The encoder in ``folder`` replaced in place by one that differs in a single number."""
    weights = load_file(folder / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.ndim == 2)
    weights[name][0, 0] += 0.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _with_encoder(cfg: BenchConfig, folder: Path) -> BenchConfig:
    return replace(cfg, data=replace(cfg.data, text_encoder=TextEncoderConfig(path=str(folder))))


def test_the_key_follows_what_the_peers_text_encoder_computes(tiny_dataset, tmp_path):
    """The key named the text encoder by its path only: after the encoder folder changed in place, a resumed bench
    kept text_mean_lr rows made with the old encoder beside rows made with the new one."""
    ds = load_dataset(tiny_dataset)
    folder = _encoder_copy(tmp_path / "minilm")
    text, plain = _with_encoder(BenchConfig(methods=["text_mean_lr"]), folder), _with_encoder(BenchConfig(methods=["rfm_lr"]), folder)

    def key(cfg: BenchConfig) -> str:
        return journal_module.journal_key(cfg, ds, [], "ckpt-hash", {}, text_encoder_digests(BenchContext(cfg, ds, [])))

    before = key(text), key(plain)
    assert key(text) == before[0]  # the same encoder: the same key
    assert text_encoder_digests(BenchContext(plain, ds, [])) == {}  # no row reads the texts: the encoder is not loaded
    _change_one_weight(folder)
    assert key(text) != before[0]
    assert key(plain) == before[1]


def test_the_key_follows_what_the_checkpoints_text_encoder_computes(infer_env, tiny_dataset, tmp_path):
    """The key held only the checkpoint's weights: the encoder the checkpoint reads its events with (at the path it
    records, or the installed package) replaced since kept the qanchor_* rows made with the old one."""
    ds = load_dataset(tiny_dataset)
    folder = _encoder_copy(tmp_path / "minilm")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(infer_env.ckpt, ckpt)
    meta = json.loads((ckpt / "qanchor.json").read_text())
    (ckpt / "qanchor.json").write_text(json.dumps({**meta, "text_encoder": {"path": str(folder)}}))
    cfg = BenchConfig(methods=["qanchor_task"])

    def digests() -> dict:
        embedder = QAnchorEmbedder(QAnchor.from_pretrained(ckpt, text_cache_dir=tmp_path / "text"), ds)
        return text_encoder_digests(BenchContext(cfg, ds, [], embedder))

    before = digests()
    assert set(before) == {"model"} and digests() == before
    _change_one_weight(folder)
    after = digests()
    assert after != before
    key = lambda d: journal_module.journal_key(cfg, ds, [], "ckpt-hash", {}, d)  # noqa: E731
    assert key(after) != key(before)


def test_a_resumed_bench_starts_afresh_after_its_text_encoder_changed(tiny_dataset, tmp_path, monkeypatch, capsys):
    """A bench killed after its first row and re-run once the encoder folder had been overwritten resumed ("1 of 2 rows
    were finished") and reported the old encoder's text_mean_lr AUCs beside the new one's."""
    folder = _encoder_copy(tmp_path / "minilm")
    data = replace(BenchConfig().data, path=str(tiny_dataset), cache_dir=str(tmp_path / "cache"))
    cfg = _with_encoder(BenchConfig(data=data, methods=["text_mean_lr"], folds=3, output_dir=str(tmp_path / "out")), folder)

    class Killed(Exception):
        pass

    def kill(name: str) -> None:
        raise Killed(name)

    monkeypatch.setattr(journal_module, "failpoint", kill)  # the run stops right after its first finished row
    with pytest.raises(Killed):
        run_bench(cfg, progress=False)
    assert len(list((tmp_path / "out" / "partial").glob("row-*.json"))) == 1
    monkeypatch.setattr(journal_module, "failpoint", lambda name: None)
    _change_one_weight(folder)
    capsys.readouterr()
    resumed = run_bench(cfg, progress=True)
    out = capsys.readouterr().out
    assert "resuming" not in out and "held 1 finished rows of a run with other settings or inputs" in out
    fresh = run_bench(replace(cfg, output_dir=str(tmp_path / "fresh")), progress=False)

    def rows(result) -> dict:
        return {t: {k: v for k, v in vars(r.methods["text_mean_lr"]).items() if k != "seconds"}
                for t, r in result.tasks.items()}

    assert rows(resumed) == rows(fresh)
