"""Prompt tuning end to end on the hand-written dataset: frozen weights, parity, determinism, files, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qanchor.cli import main
from qanchor.config import PromptTuneConfig, load_config
from qanchor.data.dataset import load_dataset
from qanchor.data.pipeline import UserPipeline
from qanchor.errors import CheckpointError, ConfigError, DataValidationError
from qanchor.infer.api import QAnchor
from qanchor.metrics import auc_ks
from qanchor.model.factory import ModelMeta, checkpoint_hash, load_checkpoint, save_checkpoint
from qanchor.model.layout import tokenize_query
from qanchor.model.prefix_cache import anchor_hidden_uncached
from qanchor.probe import LR_CS, logistic_probe
from qanchor.tune.head import ScenarioHead, query_prompt_init
from qanchor.tune.prompt_tune import encode_users, run_prompt_tune
from qanchor.tune.trainer import fold_split, frozen_logistic, head_scores, split_users, tune_task
from tests.model.helpers import encoder, model_and_stream, tiny_cfg

FAST = ["steps=6", "eval_every=3", "batch_size=8", "prefix_chunk=16", "prototypes_per_class=2"]


@pytest.fixture(scope="module")
def ckpt(tiny_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """A saved tiny checkpoint (random weights) and its dataset copy with a filled text cache."""
    root = tmp_path_factory.mktemp("tune")
    ds_dir = root / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    model, tokenizer, _, ds, packer, cfg = model_and_stream(ds_dir)
    meta = ModelMeta(ds.manifest.to_dict(), packer.cache.dim, {}, list(ds.tabular_columns))
    save_checkpoint(root / "ck", model, tokenizer, cfg, meta)
    return root / "ck", ds_dir


@pytest.fixture(scope="module")
def loaded(ckpt):
    """Frozen model, tokenizer, prefix store of every user, dataset."""
    model, tokenizer, meta, run_cfg = load_checkpoint(ckpt[0])
    model.requires_grad_(False)
    ds = load_dataset(ckpt[1])
    pipe = UserPipeline.for_dataset(ds, run_cfg.data, encoder())
    store = encode_users(model, ds, pipe, list(ds.user_ids), chunk=16, progress=False)
    return model, tokenizer, store, ds, pipe


def _task_inputs(loaded, name: str = "churn"):
    model, tokenizer, store, ds, _ = loaded
    task = ds.tasks[name]
    rows = np.array([store.user_ids.index(u) for u in task.user_ids])
    split = split_users(rows, task.labels.astype(np.int64), 0.2, 0.2, seed=0)
    query_ids = torch.tensor(tokenize_query(tokenizer, task.spec.query, 32))
    cfg = load_config(None, FAST, schema=PromptTuneConfig)
    return model, store, query_ids, split, cfg, task


def test_store_matches_uncached_forward_with_prompt(loaded):
    model, tokenizer, store, ds, pipe = loaded
    query_ids = torch.tensor(tokenize_query(tokenizer, "Will this user stop paying?", 32))
    prompt = torch.randn(6, model.hidden_size, requires_grad=True)
    idx = torch.tensor([0, 7, 3, 7, 39])  # user 0 has no events; repeats allowed
    suffix = model.suffix(query_ids, prompt)
    cached = store.hidden(model, [suffix] * len(idx), idx)  # (5, H)
    users = pipe.collate([pipe.packer.pack(ds.user(store.user_ids[int(i)])) for i in idx])
    uncached = anchor_hidden_uncached(model, users, torch.arange(len(idx)), [suffix] * len(idx))
    assert (cached - uncached).abs().max() < 1e-4
    (g_cached,) = torch.autograd.grad(cached.sum(), prompt)
    (g_uncached,) = torch.autograd.grad(uncached.sum(), prompt)
    assert torch.allclose(g_cached, g_uncached, atol=1e-4)  # the prompt learns the same through the cache


def test_pretrained_weights_bit_identical_and_tuning_deterministic(loaded):
    model, store, query_ids, split, cfg, task = _task_inputs(loaded)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = tune_task(model, store, query_ids, split, cfg, "churn", task.spec.query, "h")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    second = tune_task(model, store, query_ids, split, cfg, "churn", task.spec.query, "h")
    assert torch.equal(first.head.prompt, second.head.prompt)
    assert torch.equal(first.head.prototypes, second.head.prototypes)
    assert first.metrics == second.metrics and first.best_step == second.best_step
    assert [h["step"] for h in first.history] == [0, 3, 6]


def test_tuning_a_trainable_model_trains_only_the_head(loaded):
    """The benchmark tunes heads on a model opened for inference, whose weights still require gradients: the
    backward pass must not reach them (no gradient kept), the result must equal the frozen model's, and every
    parameter's flag must be as it was afterwards."""
    model, store, query_ids, split, cfg, task = _task_inputs(loaded)
    reference = tune_task(model, store, query_ids, split, cfg, "churn", task.spec.query, "h")
    flags = [i % 2 == 0 for i, _ in enumerate(model.parameters())]  # a mix, to see each one restored
    try:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        result = tune_task(model, store, query_ids, split, cfg, "churn", task.spec.query, "h")
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.requires_grad_(False)
    assert torch.equal(result.head.prompt, reference.head.prompt)
    assert result.metrics == reference.metrics and result.best_step == reference.best_step


def test_training_moves_the_prompt_and_lowers_the_loss(loaded):
    model, store, query_ids, split, cfg, task = _task_inputs(loaded)
    cfg.steps, cfg.eval_every, cfg.lr, cfg.prototype_lr = 60, 20, 1e-2, 1e-2
    result = tune_task(model, store, query_ids, split, cfg, "churn", task.spec.query, "h")
    losses = [h["loss"] for h in result.history[1:]]  # mean batch loss over steps 1-20, 21-40, 41-60
    assert losses[-1] < losses[0] - 0.05, losses
    init = query_prompt_init(model.embed_tokens(query_ids).detach().float(), cfg.num_prompt_tokens)
    # The head keeps the best-validation step: the initial prompt exactly when that is step 0.
    assert torch.equal(result.head.prompt.detach(), init) == (result.best_step == 0)


def test_run_writes_heads_that_reload_and_score_identically(ckpt, loaded, tmp_path):
    ck, ds_dir = ckpt
    out = tmp_path / "heads"
    file_hash = checkpoint_hash(ck)
    cfg = load_config(None, [f"checkpoint={ck}", f"data.path={ds_dir}", f"output_dir={out}", "task=all", *FAST],
                      schema=PromptTuneConfig)
    summary = run_prompt_tune(cfg, progress=False)
    assert checkpoint_hash(ck) == file_hash  # the checkpoint on disk is untouched
    assert set(summary["tasks"]) == {"churn", "coupon"}
    on_disk = json.loads((out / "summary.json").read_text())
    for rec in on_disk["tasks"].values():
        assert {"frozen_lr", "frozen_proto", "tuned"} <= set(rec) and rec["tune_seconds"] > 0
        assert 0 <= rec["tuned"]["test"]["auc"] <= 1 and 0 <= rec["frozen_lr"]["test"]["ks"] <= 1
    assert "oracle" in on_disk["tasks"]["coupon"]  # the coupon task has a `prob` column
    head = ScenarioHead.load(out / "churn", checkpoint_hash=file_hash)
    split = json.loads((out / "churn" / "split.json").read_text())
    model, tokenizer, store, ds, _ = loaded
    rows = torch.tensor([store.user_ids.index(u) for u in split["test"]])
    query_ids = torch.tensor(tokenize_query(tokenizer, head.query, 32))
    emb = store.embed(model, model.suffix(query_ids, head.prompt.detach()), rows)

    labels = ds.tasks["churn"].labels[[list(ds.tasks["churn"].user_ids).index(u) for u in split["test"]]]
    assert auc_ks(labels, head.score(emb).detach().numpy())["auc"] == pytest.approx(on_disk["tasks"]["churn"]["tuned"]["test"]["auc"])
    # The serving API scores the saved head as tuning did (its own prefix encoding, no PrefixStore).

    served = QAnchor.from_pretrained(ck, text_cache_dir=ds.text_cache_dir).score(
        [ds.user(u) for u in split["test"]], head, cutoff=ds.manifest.cutoff)
    assert np.abs(served - head.score(emb).detach().numpy()).max() < 1e-4
    with pytest.raises(CheckpointError, match="tuned on checkpoint"):
        ScenarioHead.load(out / "churn", checkpoint_hash="0" * 64)
    # the head records how its users were packed; served with other caps its readout would read other embeddings
    caps = head.extra["event_caps"]
    assert caps == QAnchor.from_pretrained(ck, text_cache_dir=ds.text_cache_dir).event_caps
    head.extra["event_caps"] = {m: n + 1 for m, n in caps.items()}
    with pytest.raises(CheckpointError, match="tuned on users packed with"):
        QAnchor.from_pretrained(ck, text_cache_dir=ds.text_cache_dir).score([ds.user(split["test"][0])], head)


def test_head_refuses_a_different_checkpoint(ckpt, tmp_path):
    """A checkpoint with one weight changed has another hash: the head will not load onto it."""
    from safetensors.torch import load_file, save_file

    ck, _ = ckpt
    other = tmp_path / "other"
    shutil.copytree(ck, other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(other / "model.safetensors"))
    head = ScenarioHead("t", "q", torch.zeros(2, 4), torch.eye(4)[:2], torch.tensor([0, 1]), 0.1, checkpoint_hash(ck))
    head.save(tmp_path / "h")
    ScenarioHead.load(tmp_path / "h", checkpoint_hash=checkpoint_hash(ck))
    with pytest.raises(CheckpointError):
        ScenarioHead.load(tmp_path / "h", checkpoint_hash=checkpoint_hash(other))


def test_cli_runs_and_reports_unknown_task(ckpt, tmp_path, capsys):
    ck, ds_dir = ckpt
    args = ["prompt-tune", "--quiet", f"checkpoint={ck}", f"data.path={ds_dir}", f"output_dir={tmp_path / 'o'}", *FAST]
    assert main([*args, "task=churn", "steps=2", "eval_every=1"]) == 0
    assert (tmp_path / "o" / "churn" / "head.safetensors").exists()
    assert main([*args, "task=nope"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_tuning_says_when_its_encoder_is_not_the_one_the_checkpoint_was_trained_with(ckpt, tmp_path, capsys):
    """Serving said it; tuning read the other encoder's vectors and wrote a head without a word."""
    import json

    ck, ds_dir = ckpt
    other = tmp_path / "ck"
    shutil.copytree(ck, other)
    meta = json.loads((other / "qanchor.json").read_text())
    (other / "qanchor.json").write_text(json.dumps({**meta, "text_encoder_digest": "0" * 12}))
    capsys.readouterr()
    assert main(["prompt-tune", "--quiet", f"checkpoint={other}", f"data.path={ds_dir}", f"output_dir={tmp_path / 'o'}",
                 *FAST, "task=churn", "steps=2", "eval_every=1"]) == 0
    assert f"does not compute what {other} recorded of the encoder it was trained with" in capsys.readouterr().err


def test_a_head_with_a_nan_is_refused_naming_the_tensor(ckpt, tmp_path):
    """Such a head wrote NaN embeddings and scores for every user of an export without a word."""
    from safetensors.torch import load_file, save_file

    from qanchor.errors import CheckpointError
    from qanchor.tune.head import HEAD_WEIGHTS, ScenarioHead

    ck, ds_dir = ckpt
    assert main(["prompt-tune", "--quiet", f"checkpoint={ck}", f"data.path={ds_dir}", f"output_dir={tmp_path / 'o'}",
                 *FAST, "task=churn", "steps=2", "eval_every=1"]) == 0
    weights = load_file(tmp_path / "o" / "churn" / HEAD_WEIGHTS)
    weights["prompt"][0, 0] = float("nan")
    save_file(weights, tmp_path / "o" / "churn" / HEAD_WEIGHTS)
    with pytest.raises(CheckpointError, match="the tensor prompt holds NaN or infinite values"):
        ScenarioHead.load(tmp_path / "o" / "churn")
    import yaml

    from qanchor.tune.head import HEAD_META

    weights["prompt"][0, 0] = 0.0
    save_file(weights, tmp_path / "o" / "churn" / HEAD_WEIGHTS)
    described = yaml.safe_load((tmp_path / "o" / "churn" / HEAD_META).read_text())
    for temperature in (".nan", ".inf", "0.0", "-1.0"):  # NaN scores, or every score 0: all unsaid before
        (tmp_path / "o" / "churn" / HEAD_META).write_text(
            yaml.safe_dump({k: v for k, v in described.items() if k != "temperature"}) + f"temperature: {temperature}\n")
        with pytest.raises(CheckpointError, match="is not a positive number"):
            ScenarioHead.load(tmp_path / "o" / "churn")
    (tmp_path / "o" / "churn" / HEAD_META).write_text(yaml.safe_dump(described))
    assert ScenarioHead.load(tmp_path / "o" / "churn").task == "churn"


def test_rerun_reuses_finished_heads_and_retunes_changed_or_unfinished(ckpt, tmp_path, monkeypatch):
    import qanchor.tune.prompt_tune as prompt_tune_module

    ck, ds_dir = ckpt
    out = tmp_path / "heads"
    args = [f"checkpoint={ck}", f"data.path={ds_dir}", f"output_dir={out}", "task=all", *FAST]
    first = run_prompt_tune(load_config(None, args, schema=PromptTuneConfig), progress=False)
    weights = {t: (out / t / "head.safetensors").read_bytes() for t in ("churn", "coupon")}
    again = run_prompt_tune(load_config(None, args, schema=PromptTuneConfig), progress=False)
    assert again["n_users"] == 0  # nothing re-encoded: both tasks were reused
    assert again["tasks"] == first["tasks"]  # the same records, tuning seconds included
    (out / "coupon" / "record.json").unlink()  # as if killed before coupon finished
    redo = run_prompt_tune(load_config(None, args, schema=PromptTuneConfig), progress=False)
    assert redo["tasks"]["churn"] == first["tasks"]["churn"]
    assert redo["tasks"]["coupon"]["tune_seconds"] != first["tasks"]["coupon"]["tune_seconds"]  # tuned again...
    assert (out / "coupon" / "head.safetensors").read_bytes() == weights["coupon"]  # ...to the same head
    changed = run_prompt_tune(load_config(None, [*args, "steps=4", "eval_every=2"], schema=PromptTuneConfig),
                              progress=False)  # other settings: retune all
    assert changed["n_users"] > 0 and all(r["history"][-1]["step"] == 4 for r in changed["tasks"].values())
    monkeypatch.setattr(prompt_tune_module, "code_digest", lambda: "other code")  # after a pull that changed tuning
    pulled = run_prompt_tune(load_config(None, [*args, "steps=4", "eval_every=2"], schema=PromptTuneConfig),
                             progress=False)
    assert pulled["n_users"] > 0  # tuned again: heads of other code are not reused


def test_a_head_tuned_beside_other_tasks_is_reused_only_beside_them(ckpt, tmp_path, capsys):
    """The prefix store holds every chosen task's users, which moves a head's float rounding: a head tuned alone is
    not reused for a run of every task (it was, and came out a few ulp away from the one that run would tune). A run
    that leaves heads of other tasks in output_dir says so, since `heads=` loads them too."""
    ck, ds_dir = ckpt
    out = tmp_path / "heads"
    base = [f"checkpoint={ck}", f"data.path={ds_dir}", f"output_dir={out}", *FAST]
    alone = run_prompt_tune(load_config(None, [*base, "task=coupon"], schema=PromptTuneConfig), progress=False)
    both = run_prompt_tune(load_config(None, [*base, "task=all"], schema=PromptTuneConfig), progress=False)
    assert both["tasks"]["coupon"]["key"] != alone["tasks"]["coupon"]["key"]  # tuned again, beside churn
    fresh = run_prompt_tune(load_config(None, [*base, f"output_dir={tmp_path / 'fresh'}", "task=all"],
                                        schema=PromptTuneConfig), progress=False)
    assert (out / "coupon" / "head.safetensors").read_bytes() == (tmp_path / "fresh" / "coupon" / "head.safetensors").read_bytes()
    assert fresh["tasks"]["coupon"]["key"] == both["tasks"]["coupon"]["key"]
    capsys.readouterr()
    run_prompt_tune(load_config(None, [*base, "task=churn"], schema=PromptTuneConfig), progress=True)
    assert "also holds heads of coupon from an earlier run" in capsys.readouterr().out


def test_a_foreign_folder_under_output_dir_is_refused_before_any_tuning(ckpt, tmp_path, monkeypatch):
    ck, ds_dir = ckpt
    out = tmp_path / "heads"
    (out / "coupon").mkdir(parents=True)
    (out / "coupon" / "my_notes.txt").write_text("mine")
    import qanchor.tune.prompt_tune as prompt_tune_module

    monkeypatch.setattr(prompt_tune_module, "encode_users", lambda *a, **k: pytest.fail("encoded before refusing"))
    args = [f"checkpoint={ck}", f"data.path={ds_dir}", f"output_dir={out}", "task=all", *FAST]
    with pytest.raises(Exception, match="qanchor did not create"):
        run_prompt_tune(load_config(None, args, schema=PromptTuneConfig), progress=False)
    assert (out / "coupon" / "my_notes.txt").read_text() == "mine" and not (out / "churn").exists()


def test_notes_in_a_head_folder_stop_the_retune_and_are_kept(ckpt, tmp_path, monkeypatch):
    """A head's folder was replaced whole by the next tuning (other settings, data or code): a user's notes or plots
    in it were deleted without a word."""
    import qanchor.tune.prompt_tune as prompt_tune_module

    ck, ds_dir = ckpt
    out = tmp_path / "heads"
    args = [f"checkpoint={ck}", f"data.path={ds_dir}", f"output_dir={out}", "task=churn", *FAST]
    run_prompt_tune(load_config(None, args, schema=PromptTuneConfig), progress=False)
    (out / "churn" / "NOTES.md").write_text("mine")
    monkeypatch.setattr(prompt_tune_module, "encode_users", lambda *a, **k: pytest.fail("encoded before refusing"))
    with pytest.raises(Exception, match=r"also 'NOTES.md'"):
        run_prompt_tune(load_config(None, [*args, "steps=4", "eval_every=2"], schema=PromptTuneConfig), progress=False)
    assert (out / "churn" / "NOTES.md").read_text() == "mine"


def test_an_over_long_question_is_refused_before_any_work(ckpt, tmp_path, monkeypatch):
    """The question was tokenized in the task's tuning, after the output folder was claimed and every user's prefix
    encoded (minutes on a real dataset)."""
    import qanchor.tune.prompt_tune as prompt_tune_module

    ck, ds_dir = ckpt
    labels = tmp_path / "wine.csv"
    users = load_dataset(ds_dir).tasks["churn"].user_ids[:20]
    labels.write_text("user_id,label\n" + "".join(f"{u},{i % 2}\n" for i, u in enumerate(users)))
    monkeypatch.setattr(prompt_tune_module, "encode_users", lambda *a, **k: pytest.fail("encoded before refusing"))
    question = "Will this household buy wine " + "and cheese " * 40 + "next month?"
    args = [f"checkpoint={ck}", f"data.path={ds_dir}", f"output_dir={tmp_path / 'heads'}", f"labels={labels}",
            f"query={question}", *FAST]
    with pytest.raises(Exception, match="max_query_tokens"):
        run_prompt_tune(load_config(None, args, schema=PromptTuneConfig), progress=False)
    assert not (tmp_path / "heads").exists()


@pytest.mark.parametrize("damage", [b"\xff\xfe garbage", b"[1, 2]"])
def test_a_damaged_record_is_tuned_again(ckpt, tmp_path, damage):
    """A record.json that is not UTF-8, or JSON but not an object, ended the run in a traceback."""
    ck, ds_dir = ckpt
    out = tmp_path / "heads"
    args = [f"checkpoint={ck}", f"data.path={ds_dir}", f"output_dir={out}", "task=churn", *FAST]
    first = run_prompt_tune(load_config(None, args, schema=PromptTuneConfig), progress=False)
    weights = (out / "churn" / "head.safetensors").read_bytes()
    (out / "churn" / "record.json").write_bytes(damage)
    again = run_prompt_tune(load_config(None, args, schema=PromptTuneConfig), progress=False)
    assert again["n_users"] > 0 and again["tasks"]["churn"]["key"] == first["tasks"]["churn"]["key"]
    assert (out / "churn" / "head.safetensors").read_bytes() == weights
    assert json.loads((out / "churn" / "record.json").read_text())["key"] == first["tasks"]["churn"]["key"]


def test_a_question_vector_does_not_depend_on_the_other_questions(tiny_dataset, tmp_path):
    """Encoded in one batch, each question's sentence vector moved by ~1e-7 with the others' lengths: a head reused
    from a run of other questions differed from the one this run would tune."""
    shutil.copytree(tiny_dataset, tmp_path / "ds", ignore=shutil.ignore_patterns(".qanchor_cache"))
    model, _, _, ds, pipe, _ = model_and_stream(tmp_path / "ds", tiny_cfg(["model.query_evidence=true"]))
    model.eval()
    users = list(ds.user_ids)[:4]
    short = "Will this user churn?"
    alone = encode_users(model, ds, pipe, users, chunk=4, progress=False, queries=[short])
    beside = encode_users(model, ds, pipe, users, chunk=4, progress=False,
                          queries=[short, "Will this user " + "really and truly " * 12 + "redeem a coupon?"])
    assert torch.equal(alone.query_vector(short), beside.query_vector(short))  # where a head's look-up starts
    assert torch.equal(alone.evidence[short], beside.evidence[short])


def test_a_head_for_your_own_labels(ckpt, tmp_path):
    """labels= + query= tune one head for a scenario the dataset does not declare; it is named after the file, keeps
    the question, equals the dataset task's head when the labels and question are the same, and a re-run retunes it
    only when the file's content changes."""
    ck, ds_dir = ckpt
    ds = load_dataset(ds_dir)
    churn = ds.tasks["churn"]
    labels = tmp_path / "My Churn.csv"
    labels.write_text("user_id,label\n" + "".join(f"{u},{int(y)}\n" for u, y in zip(churn.user_ids, churn.labels)))
    base = [f"checkpoint={ck}", f"data.path={ds_dir}", *FAST]
    own = [*base, f"output_dir={tmp_path / 'own'}", f"labels={labels}", f"query={churn.query}"]
    summary = run_prompt_tune(load_config(None, own, schema=PromptTuneConfig), progress=False)
    assert list(summary["tasks"]) == ["my_churn"]
    head = ScenarioHead.load(tmp_path / "own" / "my_churn", checkpoint_hash=checkpoint_hash(ck))
    assert head.query == churn.query
    run_prompt_tune(load_config(None, [*base, f"output_dir={tmp_path / 'ds'}", "task=churn"], schema=PromptTuneConfig),
                    progress=False)
    ref = ScenarioHead.load(tmp_path / "ds" / "churn", checkpoint_hash=checkpoint_hash(ck))
    assert torch.equal(head.prompt, ref.prompt)  # same users, labels and question: the same head
    again = run_prompt_tune(load_config(None, own, schema=PromptTuneConfig), progress=False)
    assert again["n_users"] == 0  # reused
    flipped = labels.read_text().splitlines()
    flipped[1] = flipped[1][:-1] + ("0" if flipped[1].endswith("1") else "1")
    labels.write_text("\n".join(flipped) + "\n")  # same path, other labels: tuned again
    assert run_prompt_tune(load_config(None, own, schema=PromptTuneConfig), progress=False)["n_users"] > 0
    with pytest.raises(ConfigError, match="both labels"):
        load_config(None, [*base, f"labels={labels}"], schema=PromptTuneConfig)
    # a file named after a dataset task would have replaced that task's head, served under its name with another question
    shadow = tmp_path / "churn.csv"
    shadow.write_text(labels.read_text())
    with pytest.raises(ConfigError, match=r"names its head 'churn', the name of the dataset's own task churn .*rename"):
        run_prompt_tune(load_config(None, [*base, f"output_dir={tmp_path / 'ds'}", f"labels={shadow}", "query=Wine?"],
                                    schema=PromptTuneConfig), progress=False)
    assert ScenarioHead.load(tmp_path / "ds" / "churn", checkpoint_hash=checkpoint_hash(ck)).query == churn.query


def test_a_task_too_small_to_split_is_refused_before_any_work(ckpt, tmp_path):
    """Tuning picks its step by validation AUC and reports test AUC: a split part holding one class made them NaN and
    saved a head anyway. Now the run stops first, naming the task, the split and what to give."""
    ck, ds_dir = ckpt
    ds = load_dataset(ds_dir)
    churn = ds.tasks["churn"]
    pos, neg = churn.user_ids[churn.labels == 1], churn.user_ids[churn.labels == 0]
    small = tmp_path / "few.csv"
    small.write_text("user_id,label\n" + "".join(f"{u},1\n" for u in pos[:2]) + "".join(f"{u},0\n" for u in neg[:8]))
    args = [f"checkpoint={ck}", f"data.path={ds_dir}", f"labels={small}", "query=Will they leave?",
            f"output_dir={tmp_path / 'out'}", *FAST]
    with pytest.raises(DataValidationError, match=r"task few: its (train|val|test) split \(\d+ users\) holds one class only: "
                                                  r"2 user\(s\) of its smaller class among 10 labelled"):
        run_prompt_tune(load_config(None, args, schema=PromptTuneConfig), progress=False)
    assert not (tmp_path / "out").exists()


def test_fold_split_keeps_the_fold_test_users_out_of_tuning():
    labels = np.array([0, 1] * 20)
    rows = np.arange(100, 140)
    train, test = np.arange(0, 30), np.arange(30, 40)
    split = fold_split(rows, labels, train, test, 0.25, seed=0)
    tuned = set(split.rows["train"].tolist()) | set(split.rows["val"].tolist())
    assert set(split.rows["test"].tolist()) == set(rows[test].tolist()) and not tuned & set(rows[test].tolist())
    assert tuned == set(rows[train].tolist()) and not set(split.rows["train"].tolist()) & set(split.rows["val"].tolist())
    assert split.labels["val"].sum() > 0  # stratified: both classes in validation


def test_logistic_prototype_init_starts_from_the_regression_on_step0_embeddings(loaded):
    model, store, query_ids, split, cfg, task = _task_inputs(loaded)
    cfg.prototype_init, cfg.steps, cfg.refit_readout = "logistic", 0, False  # the start itself, before any refit
    result = tune_task(model, store, query_ids, split, cfg, "churn", task.spec.query, "h")
    head = result.head
    assert head.prototype_labels.tolist() == [0, 1] and head.extra["prototype_init"] == "logistic"
    # The step-0 head ranks the training users as the regression on their unit embeddings does.
    with torch.no_grad():
        emb = store.embed(model, model.suffix(query_ids, head.prompt.detach()), split.rows["train"], 16)
    points = torch.nn.functional.normalize(head.transform(emb), dim=-1).numpy().astype(np.float64)
    y = split.labels["train"].numpy()
    # The benchmark's probe, exactly (the same C choice as logistic_prototypes makes).
    ref = logistic_probe(y, seed=0).fit(points, y)
    decision = ref.decision_function(points)
    score = head.score(emb).detach().numpy()
    assert np.corrcoef(np.argsort(np.argsort(score)), np.argsort(np.argsort(decision)))[0, 1] > 0.999
    # ...and, with the learned calibration (the default), at the regression's own logits, shifted by the prior
    # correction for class-balanced batches: the loss starts at the regression's optimum, not below it.
    assert cfg.learn_calibration and cfg.balanced and head.extra["learn_calibration"]
    slope, offset = np.polyfit(decision, score, 1)
    assert abs(slope - 1.0) < 0.01 and abs(offset - np.log((y == 0).sum() / (y == 1).sum())) < 0.02, (slope, offset)
    cfg.learn_calibration = False  # the paper's form: fixed temperature, no bias
    plain = tune_task(model, store, query_ids, split, cfg, "churn", task.spec.query, "h").head
    assert plain.log_scale.item() == 0.0 and plain.bias.item() == 0.0 and torch.equal(plain.prototypes, head.prototypes)


def test_refit_readout_fits_the_chosen_prompts_readout_on_train_and_val_users(loaded):
    """After the step is chosen, the kept head is the regression on the train + val users under the chosen prompt,
    at their own base rate; "tuned" keeps the chosen step's held-out validation AUC, "before_refit" the head before."""
    model, store, query_ids, split, cfg, task = _task_inputs(loaded)
    cfg.steps, cfg.eval_every = 6, 2
    assert cfg.refit_readout  # the default
    result = tune_task(model, store, query_ids, split, cfg, "churn", task.spec.query, "h")
    head = result.head
    cfg.refit_readout = False
    unrefit = tune_task(model, store, query_ids, split, cfg, "churn", task.spec.query, "h")
    # Same tuning, same chosen step and prompt: only the readout differs.
    assert result.best_step == unrefit.best_step and torch.equal(head.prompt, unrefit.head.prompt)
    assert result.metrics["before_refit"] == unrefit.metrics["tuned"]
    assert result.metrics["tuned"]["val"] == unrefit.metrics["tuned"]["val"]  # held out when the step was chosen
    assert head.extra["val_auc"] == unrefit.head.extra["val_auc"] and head.extra["refit_readout"]
    fit_rows = torch.cat([split.rows["train"], split.rows["val"]])
    y = torch.cat([split.labels["train"], split.labels["val"]]).numpy()
    with torch.no_grad():
        emb = store.embed(model, model.suffix(query_ids, head.prompt.detach()), fit_rows, 16)
    points = torch.nn.functional.normalize(head.transform(emb), dim=-1).numpy().astype(np.float64)
    decision = logistic_probe(y, seed=0).fit(points, y).decision_function(points)
    score = head.score(emb).detach().numpy()
    slope, offset = np.polyfit(decision, score, 1)  # the regression's own logits: no prior-shift offset
    assert abs(slope - 1.0) < 0.01 and abs(offset) < 0.02, (slope, offset)
    assert not torch.equal(head.prototypes, unrefit.head.prototypes)
    # The test users are scored by the refit head.
    test_score = head_scores(model, store, query_ids, head, split.rows["test"], 16)
    assert result.metrics["tuned"]["test"] == auc_ks(split.labels["test"].numpy(), test_score)


def test_refit_readout_needs_logistic_prototypes():
    with pytest.raises(ConfigError, match="refit_readout needs prototype_init: logistic"):
        PromptTuneConfig(prototype_init="kmeans")
    assert PromptTuneConfig(prototype_init="kmeans", refit_readout=False).prototype_init == "kmeans"


def test_frozen_logistic_picks_c_on_val_then_fits_train_and_val(loaded):
    """The frozen baseline gets the labelled users a refit head gets: C chosen on the validation users, the test
    scored by the regression at that C fitted on the train + val users."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model, store, query_ids, split, _, _ = _task_inputs(loaded)
    out = frozen_logistic(model, store, query_ids, split, seed=0, chunk=16)
    assert out["C"] in LR_CS  # the benchmark probe's grid
    x = {k: store.embed(model, model.suffix(query_ids, None), split.rows[k], 16).float().numpy() for k in ("train", "val", "test")}
    y = {k: split.labels[k].numpy() for k in ("train", "val", "test")}
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=out["C"], max_iter=2000, random_state=0))
    clf.fit(np.concatenate([x["train"], x["val"]]), np.concatenate([y["train"], y["val"]]))
    assert out["test"] == auc_ks(y["test"], clf.decision_function(x["test"]))
    only_train = make_pipeline(StandardScaler(), LogisticRegression(C=out["C"], max_iter=2000, random_state=0))
    only_train.fit(x["train"], y["train"])
    assert out["val"] == auc_ks(y["val"], only_train.decision_function(x["val"]))  # the held-out number C was chosen by


def test_the_advice_to_leave_a_task_out_names_only_tasks_that_pass(ckpt, tmp_path, monkeypatch):
    """`task=all` with one task too small said "or leave it out: task=<every other>", though those failed too: the
    user went round, one refusal at a time. The advice now names only tasks that pass, and counts the others."""
    from qanchor.tune import prompt_tune as pt

    ck, ds_dir = ckpt
    real = pt.check_splittable

    def failing(names: set[str]):
        def check(task, cfg):
            if task.name in names:
                raise DataValidationError(f"task {task.name}", "too few users to split")
            return real(task, cfg)
        return check

    args = [f"checkpoint={ck}", f"data.path={ds_dir}", "task=all", f"output_dir={tmp_path / 'out'}", *FAST]
    monkeypatch.setattr(pt, "check_splittable", failing({"coupon"}))
    with pytest.raises(DataValidationError, match=r"task coupon: too few users to split; or leave it out: task=churn$"):
        run_prompt_tune(load_config(None, args, schema=PromptTuneConfig), progress=False)
    monkeypatch.setattr(pt, "check_splittable", failing({"churn", "coupon"}))
    with pytest.raises(DataValidationError, match=r"task churn: too few users to split \(1 more task\(s\) too small: "
                                                  r"coupon\); no task of this run can be split$"):
        run_prompt_tune(load_config(None, args, schema=PromptTuneConfig), progress=False)
    assert not (tmp_path / "out").exists()


def test_tuning_without_a_data_path_says_when_the_checkpoints_path_holds_other_data(ckpt, tmp_path, capsys, monkeypatch):
    """Without data.path, prompt-tune reads the data.path the checkpoint's config names, as written: a relative one
    from the working directory, where another dataset of the same name was tuned on and reported without a word."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from qanchor.train.pretrain import DATA_FILE, trained_data_id

    ck, ds_dir = ckpt
    other = tmp_path / "ck"
    shutil.copytree(ck, other)
    (other / DATA_FILE).write_text(f"{trained_data_id(load_dataset(ds_dir))}\n")  # pretrained on ds_dir
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["data"]["path"] = ds_dir.name  # as a run started beside its data records it
    (other / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    another = tmp_path / "elsewhere" / ds_dir.name  # a dataset of the same name with other labels
    shutil.copytree(ds_dir, another, ignore=shutil.ignore_patterns(".qanchor_cache"))
    churn = pq.read_table(another / "tasks" / "churn.parquet")
    pq.write_table(churn.set_column(1, "label", pa.array(1 - churn.column("label").to_numpy(), pa.int8())),
                   another / "tasks" / "churn.parquet")
    args = ["prompt-tune", "--quiet", f"checkpoint={other}", *FAST, "task=churn", "steps=2", "eval_every=1"]
    for cwd, said in ((tmp_path / "elsewhere", True), (ds_dir.parent, False), ("absolute", False)):
        if cwd == "absolute":  # as pretraining records it now: the dataset it names, changed since or not, is the one
            config["data"]["path"] = str(another)
            (other / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            cwd = tmp_path
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        assert main([*args, f"output_dir={tmp_path / cwd.name / 'heads'}"]) == 0
        err = capsys.readouterr().err
        assert ("no data.path given, so prompt tuning reads" in err and "holds other data than the model was pretrained "
                "on" in err) == said, err


def test_tuning_a_task_whose_users_mostly_have_no_data_says_so(ckpt, tmp_path, capsys):
    """As the bench does: a head tuned on labels most of whose users have no data was reported without a word."""
    from tests.helpers import add_users_without_data, copy_dataset

    ck, ds_dir = ckpt
    ds = copy_dataset(ds_dir, tmp_path / "ds")
    add_users_without_data(ds, "churn")
    capsys.readouterr()
    assert main(["prompt-tune", "--quiet", f"checkpoint={ck}", f"data.path={ds}", f"output_dir={tmp_path / 'o'}", *FAST,
                 "task=churn", "steps=2", "eval_every=1"]) == 0
    assert "task churn: " in (err := capsys.readouterr().err) and "labelled users have no event" in err
