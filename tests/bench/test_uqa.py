"""qanchor uqa: held-out users, verified questions, text-prefix rows, the report; the text-prefix model itself."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch

from qanchor.bench.uqa import (
    FAMILIES,
    N_OPTIONS,
    UqaResult,
    asked_record,
    build_questions,
    held_out_users,
    run_uqa,
    score,
    topic_table,
    wilson,
    write_uqa,
)
from qanchor.cli import main
from qanchor.config import DataOverrides, UqaConfig
from qanchor.data.dataset import EventSeq, UserRecord, load_dataset
from qanchor.data.packing import event_lines, numeric_stats, tabular_stats
from qanchor.data.userU import summarize_future
from qanchor.data.userU_topics import TOPICS, History, verify
from qanchor.errors import ConfigError
from qanchor.infer.api import QAnchor, events_before
from qanchor.model.factory import ModelMeta, build_model, save_checkpoint
from qanchor.train.pairs import PretrainStream, is_held_out
from qanchor.train.pretrain import fit_input_stats
from tests.model.helpers import encoder, model_and_stream, tiny_cfg


@pytest.fixture(scope="module")
def env(tiny_dataset, tmp_path_factory):
    """The tiny dataset with UserU pairs, and a saved (untrained) checkpoint whose recipe holds 30% of users out."""
    root = tmp_path_factory.mktemp("uqa")
    ds_dir = root / "ds"
    shutil.copytree(tiny_dataset, ds_dir, ignore=shutil.ignore_patterns(".qanchor_cache"))
    cfg = tiny_cfg(["train.holdout_users=0.3", "train.max_steps=2", "model.max_answer_tokens=24"])
    model, tokenizer, _, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    meta = ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, {}, list(ds.tabular_columns))
    ckpt = save_checkpoint(root / "ckpt", model, tokenizer, cfg, meta)
    return root, ds_dir, ckpt


def test_holdout_is_a_fixed_share_and_never_reaches_pretraining(env):
    _, ds_dir, _ = env
    ids = [f"user{i}" for i in range(20_000)]
    assert abs(np.mean([is_held_out(u, 0.1) for u in ids]) - 0.1) < 0.01
    assert not any(is_held_out(u, 0.0) for u in ids)
    assert all(is_held_out(u, 0.3) for u in ids if is_held_out(u, 0.1))  # nested: a larger share keeps the smaller
    ds = load_dataset(ds_dir)
    model, tokenizer, _, _, pipe, cfg = model_and_stream(ds_dir)
    full = PretrainStream(ds, pipe, tokenizer, model.token_ids, cfg.model, seed=0)
    kept = PretrainStream(ds, pipe, tokenizer, model.token_ids, cfg.model, seed=0, holdout_users=0.3)
    held = {u for u in ds.user_ids.tolist() if is_held_out(u, 0.3)}
    assert held and not held & set(kept.user_ids.tolist())
    assert len(kept.user_ids) == sum(u not in held for u in full.user_ids.tolist())


def test_held_out_users_do_not_shape_the_input_statistics(env):
    """The standardisation a checkpoint stores comes from training users only (inputs of held-out users are
    what the uqa benchmark asks about)."""
    _, ds_dir, _ = env
    model, _, _, ds, pipe, _ = model_and_stream(ds_dir)
    training = [r for r in ds.users() if not is_held_out(r.user_id, 0.3)]
    assert 0 < len(training) < ds.num_users
    fit_input_stats(model, ds, pipe, holdout_users=0.3)
    got = {n: (a.numeric_mean.clone(), a.numeric_std.clone()) for n, a in model.user_encoder.event_adapters.items()}
    want = numeric_stats((pipe.packer.pack(r) for r in training), ds.manifest)
    assert want and got.keys() == want.keys()
    for name, (mean, std) in want.items():
        assert torch.allclose(got[name][0], torch.from_numpy(mean).to(got[name][0].dtype))
        assert torch.allclose(got[name][1], torch.from_numpy(std).to(got[name][1].dtype))
    if model.user_encoder.tabular is not None:
        mean, _ = tabular_stats(training, len(ds.tabular_columns))
        assert torch.allclose(model.user_encoder.tabular.mean, torch.from_numpy(mean).to(model.user_encoder.tabular.mean.dtype))
    fit_input_stats(model, ds, pipe)  # every user: different numbers, so the split above was real
    assert any(not torch.allclose(got[n][0], a.numeric_mean) for n, a in model.user_encoder.event_adapters.items())


def test_questions_are_verified_and_fair(env):
    _, ds_dir, _ = env
    ds = load_dataset(ds_dir)
    users = ds.user_ids.tolist()
    questions = build_questions(ds, users, seed=0)
    assert questions == build_questions(ds, users, seed=0)
    assert {q.family for q in questions} == set(FAMILIES)
    cutoff = (ds.manifest.cutoff - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
    extra = {m.name: m.numeric_columns for m in ds.manifest.sequence_modalities}
    records = {r.user_id: r for r in ds.users()}
    by_topic = Counter(q.topic for q in questions)
    assert by_topic["future"] > 0 and by_topic["recency"] > 0
    for q in questions:
        assert len(set(q.options)) == N_OPTIONS and 0 <= q.answer < N_OPTIONS
        h = History(events_before(records[q.user_id].events, cutoff), cutoff, extra)
        if q.topic == "future":
            assert q.cutoff_us < cutoff and (cutoff - q.cutoff_us) == 30 * 86_400_000_000
            truth = summarize_future(h, q.cutoff_us, 30)
            assert q.options[q.answer] == truth and sum(o == truth for o in q.options) == 1
            continue
        # the right option recomputes; each distractor is some other user's answer that does not hold here
        for k, option in enumerate(q.options):
            claims = _claims_of_option(q.topic, option, records, cutoff, extra, q.user_id if k == q.answer else None)
            assert claims is not None, option
            assert verify(claims, h, option) == (k == q.answer), (q.topic, option)


def _claims_of_option(topic, option, records, cutoff, extra, user=None):
    """The claims behind an option: recompute the topic's answer for every user until one writes ``option``."""
    ids = [user] if user else list(records)
    for u in ids:
        h = History(events_before(records[u].events, cutoff), cutoff, extra)
        qa = TOPICS[topic](h, np.random.default_rng(0)) if len(h.all) else None  # the draw picks only the wording
        if qa is not None and qa.answer == option:
            return qa.claims
    return None


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_topic_table_splits_a_family_by_topic():
    asked = [{"user_id": u, "family": "interest", "topic": t} for u, t in
             [("a", "categories"), ("b", "categories"), ("a", "time_of_day"), ("b", "time_of_day"), ("c", "time_of_day")]]
    asked.append({"user_id": "a", "family": "sequence", "topic": "activity"})
    rows = {"qanchor": {"correct": [True, True, False, True, False, True]}, "prior": {"correct": [0, 1, 0, 0, 0, 0]},
            "random": {"correct": None}}
    table = topic_table(UqaResult({}, len(asked), {}, rows, asked)).splitlines()
    # topics in family order (sequence before interest), each with its question count
    assert table[0] == "| row | sequence: activity (n=1) | interest: categories (n=2) | interest: time_of_day (n=3) |"
    assert table[2] == "| Q-Anchor user tokens | 1.000 | 1.000 | 0.333 |"
    assert table[3] == "| prior: same recipe, no user | 0.000 | 0.500 | 0.000 |"
    assert table[4] == "| random (1 in 4) | 0.250 | 0.250 | 0.250 |"


def test_event_lines_are_the_most_recent_events_as_text():
    from qanchor.data.dataset import EventSeq

    day = 86_400_000_000
    kept = {"bill": EventSeq(np.array([1, 5]) * day, ["Coffee", "Rent"], np.array([4.5, np.nan], np.float32),
                             np.zeros((2, 0), np.float32)),
            "app": EventSeq(np.array([3]) * day, ["Opened bank app"], np.array([np.nan], np.float32), np.zeros((1, 0), np.float32))}
    assert event_lines(kept, 6 * day, 2) == ["3d ago app: Opened bank app", "1d ago bill: Rent"]
    assert event_lines(kept, 6 * day, 5) == ["5d ago bill: Coffee (4.50)", "3d ago app: Opened bank app", "1d ago bill: Rent"]


def test_text_prefix_model_reads_the_event_lines(env, tmp_path):
    _, ds_dir, _ = env
    ds = load_dataset(ds_dir)
    cfg = tiny_cfg(["model.user_input=text", "data.text_events=3"])
    model, tokenizer = build_model(cfg.model, ds.manifest, encoder().dim, ds.tabular_columns)
    meta = ModelMeta(ds.manifest.to_dict(), encoder().dim, {}, list(ds.tabular_columns))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer, cfg, meta)
    qa = QAnchor.from_pretrained(ckpt, text_cache_dir=ds.text_cache_dir)
    user = max(ds.users(), key=lambda u: sum(len(s) for s in u.events.values()))
    packed = qa.pack([user], qa.cutoff_us(None))[0]
    assert len(packed.event_lines) == 3
    with torch.inference_mode():
        prefix = qa.model.prefixes(qa.pipeline.collate([packed]))[0]
        ids = qa.model.token_ids
        expected = [ids.bos] if ids.bos is not None else []
        expected += [ids.user]
        for line in packed.event_lines:
            expected += tokenizer(f"{line} ;", add_special_tokens=False)["input_ids"]
        assert torch.equal(prefix, qa.model.embed_tokens(torch.tensor(expected)))
    assert qa.answer(user, ["How recently was this user active?"], max_new_tokens=6) == \
        qa.answer(user, ["How recently was this user active?"], max_new_tokens=6, use_cache=False)
    assert qa.prefix_lengths([user])[0] == len(expected)
    # a caller's user may list its modalities in any order: events at one time keep the manifest's order
    first, second = [m.name for m in ds.manifest.sequence_modalities if m.name in user.events][:2]
    at = int(user.events[first].ts[-1])
    last = {m: user.events[m] for m in (first, second)}
    last = {m: EventSeq(np.array([at]), s.text[-1:], s.value[-1:], s.extras[-1:]) for m, s in last.items()}
    lines = [qa.pack([UserRecord("x", dict(order), None)], qa.cutoff_us(None))[0].event_lines
             for order in (last.items(), reversed(last.items()))]
    assert lines[0] == lines[1] and lines[0][0].split(": ")[0].endswith(first)


def test_text_events_need_a_text_model():
    with pytest.raises(ConfigError, match="user_input=text"):
        tiny_cfg(["data.text_events=8"])


def test_uqa_end_to_end(env, tmp_path, capsys):
    _, ds_dir, ckpt = env
    cfg = UqaConfig(checkpoint=str(ckpt), data=DataOverrides(path=str(ds_dir)), text_events=[4], output_dir=str(tmp_path / "u"))
    result = run_uqa(cfg, progress=False)
    write_uqa(result, cfg.output_dir)
    assert list(result.rows) == ["qanchor", "text4", "prior", "random"]
    ds = load_dataset(ds_dir)
    held = held_out_users(ds, 0.3, None, 0)
    assert result.run["held_out_users"] == len(held) >= N_OPTIONS
    for name in ("qanchor", "text4", "prior"):
        acc = result.rows[name]["accuracy"]
        assert acc["all"][1] <= acc["all"][0] <= acc["all"][2]
        assert sum(result.by_family.values()) == result.questions == len(result.rows[name]["correct"])
    # prompt cost: the prior reads [bos] <|user|> only, TextN its lines, Q-Anchor its user and event tokens
    assert result.rows["prior"]["prompt_tokens"] < result.rows["text4"]["prompt_tokens"]
    # the scored picks are what the public API picks, question by question
    model = QAnchor.from_pretrained(ckpt, text_cache_dir=ds.text_cache_dir)
    questions = build_questions(ds, held, 0, 30, scored_as=lambda t: tuple(model.option_ids(t, True)))
    correct, _ = score(model, ds, questions[:6])
    assert correct.tolist() == result.rows["qanchor"]["correct"][:6]
    assert [{k: a[k] for k in ("user_id", "family", "topic")} for a in result.asked] == \
        [{"user_id": q.user_id, "family": q.family, "topic": q.topic} for q in questions]
    # and what was asked: another question seed asks the same users about the same topics with other options
    assert result.asked == asked_record(questions) != asked_record(build_questions(
        ds, held, 1, 30, scored_as=lambda t: tuple(model.option_ids(t, True))))
    assert result.run["checkpoint_data_matches"] is None  # a checkpoint saved in code records no data
    # the sub-runs were pretrained with the checkpoint's recipe: text rows, same steps and holdout
    sub = json.loads((tmp_path / "u" / "results.json").read_text())
    assert sub["rows"]["text4"]["accuracy"]["all"][0] == result.rows["text4"]["accuracy"]["all"][0]
    report = (tmp_path / "u" / "report.md").read_text()
    assert "TextN: last 4 events as text" in report and "## Accuracy per topic" in report and (tmp_path / "u" / "uqa.png").stat().st_size > 1000
    assert (tmp_path / "u" / "uqa_cost.png").stat().st_size > 1000 and "uqa_cost.png" in report
    # a uqa folder marked before uqa results had a kind of their own (as benchmark results) is recognised by its
    # results.json (and re-marked by run_uqa before it claims the folder); a bench's is not
    from qanchor.bench.uqa import is_legacy_uqa_output
    from qanchor.data.io import OutputKind, mark_output

    assert not is_legacy_uqa_output(tmp_path / "u")  # marked as uqa's own already
    mark_output(tmp_path / "u", OutputKind.RESULTS)
    assert is_legacy_uqa_output(tmp_path / "u")
    (tmp_path / "b").mkdir()
    mark_output(tmp_path / "b", OutputKind.RESULTS)
    (tmp_path / "b" / "results.json").write_text(json.dumps({"tasks": {}, "run": {}}))
    assert not is_legacy_uqa_output(tmp_path / "b")
    # a checkpoint pretrained on every user is refused in one line
    open_cfg = tiny_cfg()
    model0, tok0 = build_model(open_cfg.model, ds.manifest, encoder().dim, ds.tabular_columns)
    plain = save_checkpoint(tmp_path / "plain", model0, tok0, open_cfg,
                            ModelMeta(ds.manifest.to_dict(), encoder().dim, {}, list(ds.tabular_columns)))
    capsys.readouterr()
    assert main(["uqa", f"checkpoint={plain}", f"data.path={ds_dir}", f"output_dir={tmp_path / 'v'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holdout_users" in err[0]


def test_a_checkpoint_pretrained_on_other_data_is_said_and_recorded(env, tmp_path, capsys):
    """The TextN and prior rows are pretrained on data.path; a checkpoint pretrained on other data ran to the end with a
    report that says every row shared the recipe's pairs."""
    from qanchor.train.pretrain import DATA_FILE, trained_data_id

    _, ds_dir, ckpt = env
    other = tmp_path / "ckpt"
    shutil.copytree(ckpt, other)
    (other / DATA_FILE).write_text("0" * 16)
    cfg = UqaConfig(checkpoint=str(other), data=DataOverrides(path=str(ds_dir)), text_events=[], prior=False,
                    output_dir=str(tmp_path / "u"))
    capsys.readouterr()
    result = run_uqa(cfg, progress=False)
    assert "was pretrained on other data than" in capsys.readouterr().err
    assert result.run["checkpoint_data_matches"] is False
    assert "**Warning**: the checkpoint was pretrained on other data" in write_uqa(result, cfg.output_dir).read_text()
    (other / DATA_FILE).write_text(trained_data_id(load_dataset(ds_dir)))
    assert run_uqa(cfg, progress=False).run["checkpoint_data_matches"] is True
    assert "pretrained on other data" not in capsys.readouterr().err


def test_score_reads_users_by_column_name_and_withholds_a_time_varying_snapshot_before_the_cutoff(env, tmp_path):
    """uqa's scoring built records straight from the dataset: columns by position, and a time_varying tabular snapshot
    (taken at the dataset's cutoff) handed to the model for questions asked 30 days earlier."""
    from types import SimpleNamespace

    import yaml

    from qanchor.bench.uqa import Question

    _, ds_dir, _ = env
    varying = tmp_path / "ds"
    shutil.copytree(ds_dir, varying, ignore=shutil.ignore_patterns(".qanchor_cache"))
    manifest = yaml.safe_load((varying / "manifest.yaml").read_text())
    next(m for m in manifest["modalities"] if m["kind"] == "tabular")["time_varying"] = True
    (varying / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    ds = load_dataset(varying)
    user = next(r.user_id for r in ds.users() if r.tabular is not None)
    seen, remapped = [], []

    def choose_many(users, asked, cutoff, truncate):
        seen.extend((cutoff, u.tabular) for u in users)
        return [[SimpleNamespace(option=q[1][0]) for q in per_user] for per_user in asked]

    def dataset_records(d, ids):
        remapped.append(list(ids))
        return d.users(ids)

    model = SimpleNamespace(dataset_records=dataset_records, choose_many=choose_many,
                            prefix_lengths=lambda users, cutoff: [0] * len(users),
                            tokenizer=lambda text, **kw: {"input_ids": [1]})
    day = 86_400_000_000
    questions = [Question(user, "action", "t", "Will it?", ("yes", "no"), 0, ds.manifest.cutoff_us - 30 * day),
                 Question(user, "profile", "t", "What?", ("a", "b"), 0, ds.manifest.cutoff_us)]
    correct, _ = score(model, ds, questions)
    assert correct.tolist() == [True, True] and remapped == [[user]]  # read through the model's layout
    by_cutoff = dict((c.timestamp(), t) for c, t in seen)
    earlier, at_cutoff = sorted(by_cutoff)
    assert by_cutoff[earlier] is None and by_cutoff[at_cutoff] is not None


@pytest.mark.parametrize("config", ["tiny-cj", "tiny-synth", "tiny-ratings", "qwen2.5-0.5b"])
def test_the_text_rows_can_be_built_from_every_shipped_recipe(config):
    """A text-prefix variant kept the recipe's query evidence and statistics path, which a text model cannot have:
    `make uqa` failed after its 17-minute pretraining."""
    from pathlib import Path

    from qanchor.bench.uqa import _text_variant
    from qanchor.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / f"configs/pretrain/{config}.yaml", ["train.holdout_users=0.1"])
    for n in (0, 8):
        variant = _text_variant(n)(cfg)
        assert variant.model.user_input == "text" and variant.data.text_events == n
        assert not variant.model.query_evidence and variant.model.statistics_path == "none"
        assert variant.train == cfg.train and variant.loss == cfg.loss  # the same recipe otherwise


def test_a_checkpoint_without_a_language_head_is_refused_before_any_row_is_trained(env, tmp_path, monkeypatch):
    """loss.mode=contrastive: every TextN and prior row was pretrained (hours at the default budgets) before the
    refusal came, from the first row's scoring."""
    import qanchor.bench.uqa as uqa_module

    root, ds_dir, _ = env
    cfg = tiny_cfg(["train.holdout_users=0.3", "train.max_steps=2", "loss.mode=contrastive"])
    model, tokenizer, _, ds, pipe, _ = model_and_stream(ds_dir, cfg)
    meta = ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, {}, list(ds.tabular_columns))
    ckpt = save_checkpoint(tmp_path / "contrastive", model, tokenizer, cfg, meta)
    monkeypatch.setattr(uqa_module, "pretrain_variant", lambda *a, **k: pytest.fail("a row was trained first"))
    uqa = UqaConfig(checkpoint=str(ckpt), data=DataOverrides(path=str(ds_dir)), text_events=[4],
                    output_dir=str(tmp_path / "u"))
    with pytest.raises(Exception, match="contrastive"):
        run_uqa(uqa, progress=False)
    assert not (tmp_path / "u").exists()
