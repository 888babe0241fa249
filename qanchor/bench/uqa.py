"""``qanchor uqa``: a UQABench-style multiple-choice benchmark on held-out users, read from user tokens or text.

Questions (:func:`build_questions`) are asked only about users whose pairs never entered pretraining
(``train.holdout_users`` of the checkpoint), in the three UQABench families:

- ``sequence`` (sequence understanding): what the history holds: activity counts, recency per modality,
  most frequent items, modality mix, largest single amount;
- ``interest`` (interest perception): top categories, time-of-day and weekend habits, rising or falling;
- ``action`` (action prediction): what the user does in the 30 days after an internal cutoff, the model
  reading only events before it (the dataset holds no events after its own cutoff).

Each question has 4 options: the user's own answer, recomputed from the events (claims verified with
:func:`~qanchor.data.userU_topics.verify`; a future window summarised from the events in it), and 3 answers
of other held-out users to the same question that are verified *wrong* for this user: every option is
written in the dataset's own vocabulary, so a model that knows nothing of the user is at chance (25%).

Rows, each scored by :meth:`QAnchor.choose` (mean log-probability of an option's tokens):
``qanchor`` (the checkpoint, reading user tokens); ``text<N>`` (the same recipe, pairs, budget and seed,
retrained to read the user's last N events as plain text: UQABench's TextN); ``prior`` (the same, retrained
with no user at all); ``random`` (25%). Accuracy per family with a 95% Wilson interval, and the prompt
positions each row spends per question.

Example:
    >>> result = run_uqa(UqaConfig(checkpoint="runs/uqa/pretrain", data=DataOverrides(path="data/completejourney")))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import qanchor
from qanchor.bench.plots import _pyplot, save_figure
from qanchor.bench.report import markdown_table
from qanchor.bench.retrain import checkpoint_run_config, pretrain_variant
from qanchor.config import ModelConfig, PretrainConfig, UqaConfig, require, to_yaml
from qanchor.data.dataset import Dataset, UserRecord, load_dataset
from qanchor.data.io import (
    OutputKind,
    claim_output_dir,
    hold_output,
    mark_output,
    output_kind,
    releasing_outputs,
    write_json,
    write_text,
)
from qanchor.data.userU import FUTURE_QUERY, summarize_future
from qanchor.data.userU_topics import DAY_US, QA, TOPICS, History, verify
from qanchor.errors import ConfigError, DataValidationError
from qanchor.infer.api import QAnchor, events_before
from qanchor.logs import format_seconds, log, warn
from qanchor.model.factory import resolve_checkpoint_dir
from qanchor.train.pairs import is_held_out
from qanchor.train.pretrain import checkpoint_data_id, same_trained_data

__all__ = ["FAMILIES", "Question", "UqaResult", "asked_record", "build_questions", "held_out_users", "merge_results", "run_uqa",
           "same_asked", "same_questions", "topic_table", "wilson", "write_uqa"]

FAMILIES: dict[str, tuple[str, ...]] = {
    "sequence": ("activity", "recency", "favourites", "mix", "largest"),
    "interest": ("categories", "time_of_day", "weekend", "trend"),
    "action": ("future",),
}
N_OPTIONS = 4


@dataclass(frozen=True)
class Question:
    user_id: str
    family: str
    topic: str
    question: str
    options: tuple[str, ...]
    answer: int  # index of the right option
    cutoff_us: int  # the model reads only events before this moment


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (stays inside [0, 1] for small n and extreme rates)."""
    if n == 0:
        return math.nan, math.nan
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def held_out_users(ds: Dataset, fraction: float, limit: int | None, seed: int) -> list[str]:
    """The dataset's held-out users (sorted), at most ``limit`` of them drawn with ``seed``."""
    users = [u for u in ds.user_ids.tolist() if is_held_out(u, fraction)]
    if limit is not None and len(users) > limit:
        users = sorted(np.random.default_rng(seed).choice(users, limit, replace=False).tolist())
    return users


def _truths(record: UserRecord, cutoff_us: int, extra: dict, seed: int, window_days: int
            ) -> tuple[dict[str, QA], History, int]:
    """The user's verified answers per topic (and the histories they are checked against)."""
    h = History(events_before(record.events, cutoff_us), cutoff_us, extra)
    rng = np.random.default_rng([seed, zlib.crc32(record.user_id.encode())])
    out: dict[str, QA] = {}
    for topic in (t for topics in FAMILIES.values() for t in topics):
        if topic == "future" or not len(h.all):
            continue
        qa = TOPICS[topic](h, rng)
        if qa is not None and verify(qa.claims, h, qa.answer):
            out[topic] = qa
    start = (cutoff_us - window_days * DAY_US) // DAY_US * DAY_US  # a whole UTC day, the window ends by the cutoff
    if events_before(record.events, start):  # the model must have something to read before the window
        future = summarize_future(h, start, window_days)
        if future is not None:
            out["future"] = QA(FUTURE_QUERY.format(days=window_days), future, [])
    return out, h, start


def build_questions(ds: Dataset, user_ids: list[str], seed: int = 0, window_days: int = 30,
                    scored_as: Callable[[str], object] = str) -> list[Question]:
    """4-option questions about ``user_ids`` (see the module doc); the same list for the same inputs and seed.

    ``scored_as`` maps an option to what a model scores of it (e.g. its first answer-length tokens): a distractor
    that would be scored the same as the right option or another distractor is not used.
    """
    cutoff_us = ds.manifest.cutoff_us
    extra = {m.name: m.numeric_columns for m in ds.manifest.sequence_modalities}
    truths: dict[str, dict[str, QA]] = {t: {} for ts in FAMILIES.values() for t in ts}
    histories: dict[str, History] = {}
    future_start = cutoff_us
    for record in ds.users(user_ids):
        answers, h, future_start = _truths(record, cutoff_us, extra, seed, window_days)
        histories[record.user_id] = h
        for topic, qa in answers.items():
            truths[topic][record.user_id] = qa
    family_of = {t: f for f, ts in FAMILIES.items() for t in ts}
    out = []
    for topic, by_user in truths.items():
        pool = sorted(by_user)
        for user in pool:
            rng = np.random.default_rng([seed, zlib.crc32(f"{topic}/{user}".encode())])
            true = by_user[user]
            distractors: list[str] = []
            seen = {scored_as(true.answer)}
            for other in rng.permutation(pool).tolist():
                text = by_user[other].answer
                if other == user or scored_as(text) in seen:
                    continue
                wrong = (summarize_future(histories[user], future_start, window_days) != text if topic == "future"
                         else not verify(by_user[other].claims, histories[user], text))
                if wrong:
                    distractors.append(text)
                    seen.add(scored_as(text))
                if len(distractors) == N_OPTIONS - 1:
                    break
            if len(distractors) < N_OPTIONS - 1:
                continue  # too few other users with a different answer: no fair question
            options = [true.answer, *distractors]
            order = rng.permutation(N_OPTIONS)
            out.append(Question(user, family_of[topic], topic, true.question, tuple(options[i] for i in order),
                                int(np.flatnonzero(order == 0)[0]), future_start if topic == "future" else cutoff_us))
    return sorted(out, key=lambda q: (q.user_id, list(family_of).index(q.topic)))


@dataclass
class UqaResult:
    run: dict[str, Any]
    questions: int
    by_family: dict[str, int]  # questions per family
    rows: dict[str, dict[str, Any]]  # row -> {"accuracy": {family: [acc, lo, hi]}, "prompt_tokens": mean, ...}
    # per question, in the order of each row's "correct": who and what was asked (pools seeds, resamples users)
    asked: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_time(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc)


def is_legacy_uqa_output(directory: Path) -> bool:
    """Whether ``directory`` is a uqa (or uqa_merge) output marked before uqa had an output kind of its own: marked as
    benchmark results, with a uqa ``results.json`` (its ``asked`` / ``by_family`` keys; a bench's has neither)."""
    if output_kind(directory) != OutputKind.RESULTS.value:
        return False
    try:
        saved = json.loads((Path(directory) / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"by_family", "rows"} <= set(saved)


def score(model: QAnchor, ds: Dataset, questions: list[Question]) -> tuple[np.ndarray, np.ndarray]:
    """Whether ``model`` picks the right option of each question, and the prompt positions it spends on each
    (user prefix + question + the two markers an answer follows). Each user is read once per cutoff and all their
    questions at it are scored on that reading (:meth:`QAnchor.choose_many`)."""
    correct = np.zeros(len(questions), bool)
    tokens = np.zeros(len(questions), np.int64)
    # in the model's column layout (by name), and without a time_varying tabular snapshot at an earlier cutoff (it
    # describes the window an action question asks about), as pretraining pairs are read
    records = {r.user_id: r for r in model.dataset_records(ds, sorted({q.user_id for q in questions}))}
    for cutoff in sorted({q.cutoff_us for q in questions}):
        asked: dict[str, list[int]] = {}  # user -> their questions at this cutoff: each user is read once for all
        for i, q in enumerate(questions):
            if q.cutoff_us == cutoff:
                asked.setdefault(q.user_id, []).append(i)
        readable = ds.manifest.tabular_readable_at(cutoff)
        users = [UserRecord(u, events_before(records[u].events, cutoff), records[u].tabular if readable else None)
                 for u in asked]
        when = _as_time(cutoff)
        choices = model.choose_many(users, [[(questions[i].question, list(questions[i].options)) for i in idx]
                                            for idx in asked.values()], cutoff=when, truncate=True)
        prefix = model.prefix_lengths(users, cutoff=when)
        for k, idx in enumerate(asked.values()):
            for choice, i in zip(choices[k], idx):
                correct[i] = choice.option == questions[i].options[questions[i].answer]
                n_question = len(model.tokenizer(questions[i].question, add_special_tokens=False,
                                                     split_special_tokens=True)["input_ids"])
                tokens[i] = prefix[k] + n_question + 2
    return correct, tokens


def _text_variant(n_events: int):
    """The checkpoint's recipe reading the last ``n_events`` events as text (0 = no user: the prior)."""
    def change(cfg: PretrainConfig) -> PretrainConfig:
        caps = {m: max(c, n_events) for m, c in cfg.data.max_events.items()}
        data = replace(cfg.data, text_events=n_events, max_events=caps,
                       default_max_events=max(cfg.data.default_max_events, n_events))
        # a text-prefix model reads lines of event text: no user encoder, so none of its statistics or text vectors
        # (the wide statistics path, query evidence), whichever the checkpoint's recipe used
        encoder = cfg.model.user_encoder
        if encoder.content_use == "path":  # content components join the profile loss's targets instead
            encoder = replace(encoder, content_use="target")
        return replace(cfg, data=data, model=replace(cfg.model, user_input="text", query_evidence=False,
                                                     statistics_path="none", user_encoder=encoder,
                                                     statistics_path_init=ModelConfig().statistics_path_init))
    return change


@releasing_outputs
def run_uqa(cfg: UqaConfig, progress: bool = True) -> UqaResult:
    """Build the questions, train (or reuse) the text rows, score every row; nothing is written here."""
    start = time.perf_counter()
    require(cfg.checkpoint, "checkpoint", "<checkpoint dir pretrained with train.holdout_users > 0>")
    require(cfg.data.path, "data.path", "<dataset dir>")
    require(cfg.output_dir, "output_dir", "results/uqa")  # empty (an unset $OUT): the results went into the working folder
    base = checkpoint_run_config(cfg.checkpoint)
    if base.model.user_input != "tokens":
        raise ConfigError(f"{cfg.checkpoint} reads users as text (model.user_input=text); give a Q-Anchor checkpoint")
    if base.train.holdout_users <= 0:
        raise ConfigError(f"{cfg.checkpoint} was pretrained on every user's pairs (train.holdout_users=0), so no user is "
                          "held out to ask about; pretrain with train.holdout_users=0.1 (make uqa does)")
    ds = load_dataset(cfg.data.path, cfg.data.cache_dir)
    # The TextN and prior rows are pretrained on data.path; the Q-Anchor row was pretrained on whatever the checkpoint
    # recorded. Compared by the files' contents: another dataset, or this one changed since, is said, not refused.
    trained_on = checkpoint_data_id(resolve_checkpoint_dir(cfg.checkpoint))
    same_data = same_trained_data(trained_on, ds)
    if same_data is False:
        warn(f"{cfg.checkpoint} was pretrained on other data than {cfg.data.path} (another dataset, or its files or "
             "UserU pairs were changed or rewritten since): the TextN and prior rows are pretrained on "
             f"{cfg.data.path}, so the rows may not share their pairs; give the data the checkpoint was trained on")
    users = held_out_users(ds, base.train.holdout_users, cfg.max_users, cfg.seed)
    reference = QAnchor.from_pretrained(cfg.checkpoint, text_cache_dir=ds.text_cache_dir)  # every row shares its tokenizer
    reference.check_language_head()  # a contrastive-only checkpoint: refused before the TextN and prior rows are trained
    questions = build_questions(ds, users, cfg.seed, cfg.window_days,
                                scored_as=lambda text: tuple(reference.option_ids(text, truncate=True)))
    if not questions:
        raise DataValidationError(cfg.data.path, f"none of the {len(users)} held-out users yields a question with "
                                  f"{N_OPTIONS} distinct options; the dataset needs more users with events")
    if progress:
        log(f"uqa: {len(questions)} questions about {len(users)} held-out users "
            f"({', '.join(f'{f} {sum(q.family == f for q in questions)}' for f in FAMILIES)})")
    out = Path(cfg.output_dir)
    if is_legacy_uqa_output(out):
        mark_output(out, OutputKind.UQA_RESULTS)
    claim_output_dir(out, OutputKind.UQA_RESULTS, {"data.path": cfg.data.path, "checkpoint": cfg.checkpoint}, key="output_dir")
    hold_output(out, "multiple-choice evaluation")
    models = {"qanchor": cfg.checkpoint}
    for n in sorted(set(cfg.text_events)):
        models[f"text{n}"] = str(pretrain_variant(cfg.checkpoint, cfg.data.path, _text_variant(n), out / "variants" / f"text{n}",
                                                  progress))
    if cfg.prior:
        models["prior"] = str(pretrain_variant(cfg.checkpoint, cfg.data.path, _text_variant(0), out / "variants" / "prior",
                                               progress))
    families = {f: np.array([q.family == f for q in questions]) for f in FAMILIES}
    rows: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        t0 = time.perf_counter()
        if progress:  # a row takes about a minute on Complete Journey's held-out users, more for long TextN prompts
            log(f"uqa: {name}: scoring {len(questions)} questions")
        model = QAnchor.from_pretrained(path, text_cache_dir=ds.text_cache_dir, batch_size=cfg.batch_size)
        correct, tokens = score(model, ds, questions)
        rows[name] = _row(correct, tokens, families, time.perf_counter() - t0)
        if progress:
            log(f"uqa: {name}: accuracy {correct.mean():.3f} over {len(correct)} questions, {tokens.mean():.0f} prompt "
                f"positions per question ({format_seconds(time.perf_counter() - t0)})")
    n_all = len(questions)
    rows["random"] = {"accuracy": {f: [1 / N_OPTIONS, *wilson(round(m.sum() / N_OPTIONS), int(m.sum()))]
                                   for f, m in {**families, "all": np.ones(n_all, bool)}.items()},
                      "prompt_tokens": 0.0, "seconds": 0.0, "correct": None}
    run = {"dataset": ds.manifest.name, "data_path": cfg.data.path, "checkpoint": cfg.checkpoint,
           "held_out_users": len(users), "holdout_fraction": base.train.holdout_users, "seed": cfg.seed,
           "qanchor_version": qanchor.__version__, "seconds": time.perf_counter() - start, "config_yaml": to_yaml(cfg),
           "pretrain_steps": base.train.max_steps, "pretrain_batch": base.train.batch_size,
           "checkpoint_data_matches": same_data}
    return UqaResult(run, n_all, {f: int(m.sum()) for f, m in families.items()}, rows, asked_record(questions))


def asked_record(questions: list[Question]) -> list[dict[str, str]]:
    """What ``results.json`` keeps of each question (``UqaResult.asked``): enough to pair runs and split by topic, and a
    digest of what was asked (the question, its options in their order, the right one's place, the moment it reads up
    to): the question seed changes the options and their order, not the user, family or topic."""
    def digest(q: Question) -> str:
        blob = json.dumps([q.question, list(q.options), q.answer, q.cutoff_us], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    return [{"user_id": q.user_id, "family": q.family, "topic": q.topic, "digest": digest(q)} for q in questions]


def same_asked(first: list[dict[str, str]] | None, other: list[dict[str, str]] | None) -> bool:
    """Whether two runs' per-question records (``asked``) are of the same questions. A record written before the digest
    was kept (qanchor before 2026-12-07) is compared by user, family and topic alone, which cannot see another question
    seed."""
    if not first or not other or len(first) != len(other):
        return False
    if all("digest" in a for a in (*first, *other)):
        return first == other
    keys = ("user_id", "family", "topic")
    return all(all(a.get(k) == b.get(k) for k in keys) for a, b in zip(first, other))


def same_questions(results: list[dict[str, Any]], names: list[str]) -> list[dict[str, str]]:
    """The per-question record (``asked``) that every run (``results.json`` dicts, named ``names``) shares; ValueError
    when the first has none or a run asked other questions (another dataset, holdout share or question seed)."""
    asked = results[0].get("asked") if results else None
    if not asked:
        raise ValueError(f"{names[0] if names else 'no run'}/results.json has no per-question record ('asked'); rerun "
                         "it with this version of qanchor uqa")
    for result, name in zip(results[1:], names[1:]):
        if not same_asked(asked, result.get("asked")):
            raise ValueError(f"{name} asked other questions than {names[0]} (another dataset, holdout share or question "
                             "seed): runs can only be compared on the same questions")
    return asked


def merge_results(results: list[dict[str, Any]], names: list[str]) -> tuple[UqaResult, dict[str, int]]:
    """The rows of several ``qanchor uqa`` runs (``results.json`` dicts, named ``names``) asked the same questions,
    as one result: rows trained on another machine (TextN-128 on a GPU, say) beside the rest of a table.

    Runs that asked other questions (:func:`same_questions`), or trained their rows for another budget (steps x
    pairs), are refused (ValueError). A row scored by several runs (each run scores its checkpoint's ``qanchor`` row)
    is kept from the first run that has it; the second value counts, per such row, the questions on which a later copy
    picked differently from the kept one (0 when the runs agree). Rows come out in the report's order: Q-Anchor, TextN
    by N, the prior, random.
    """
    asked = same_questions(results, names)
    budget_keys = ("pretrain_steps", "pretrain_batch")
    first_budget = {k: results[0]["run"].get(k) for k in budget_keys}
    rows: dict[str, dict[str, Any]] = {}
    differ: dict[str, int] = {}
    for result, name in zip(results, names):
        budget = {k: result["run"].get(k) for k in budget_keys}
        if budget != first_budget:  # a 3,000-step TextN row beside 6,000-step rows would not be a fair comparison
            raise ValueError(f"{name} trained its rows for {budget['pretrain_steps']} steps x {budget['pretrain_batch']} "
                             f"pairs, {names[0]} for {first_budget['pretrain_steps']} x {first_budget['pretrain_batch']}: "
                             "rows can only be merged at the same budget")
        for row, value in result["rows"].items():
            if row not in rows:
                rows[row] = value
            elif value.get("correct") is not None and rows[row].get("correct") is not None:
                kept = rows[row]["correct"]
                differ[row] = differ.get(row, 0) + sum(a != b for a, b in zip(kept, value["correct"]))

    def order(row: str) -> tuple[int, int]:
        if row.startswith("text") and row[4:].isdigit():
            return 1, int(row[4:])
        return {"qanchor": 0, "prior": 2, "random": 3}.get(row, 4), 0

    first = results[0]
    run = {**first["run"], "merged_from": list(names)}
    matches = [r["run"].get("checkpoint_data_matches") for r in results]  # a row pretrained on other data taints them all
    run["checkpoint_data_matches"] = False if False in matches else (None if None in matches else True)
    merged = UqaResult(run, first["questions"], first["by_family"], {r: rows[r] for r in sorted(rows, key=order)}, asked)
    return merged, differ


def _row(correct: np.ndarray, tokens: np.ndarray, families: dict[str, np.ndarray], seconds: float) -> dict[str, Any]:
    acc = {}
    for f, m in {**families, "all": np.ones(len(correct), bool)}.items():
        k, n = int(correct[m].sum()), int(m.sum())
        acc[f] = [k / n if n else math.nan, *wilson(k, n)]
    return {"accuracy": acc, "prompt_tokens": float(tokens.mean()), "seconds": seconds, "correct": correct.tolist()}


_LABELS = {"qanchor": "Q-Anchor user tokens", "prior": "prior: same recipe, no user", "random": "random (1 in 4)"}


def _label(row: str) -> str:
    return _LABELS.get(row, f"TextN: last {row[4:]} events as text" if row.startswith("text") else row)


def uqa_table(result: UqaResult) -> str:
    """Accuracy per family (95% interval) and prompt positions per question, one line per row."""
    header = ["row", *[f"{f} (n={result.by_family[f]})" for f in FAMILIES], f"all (n={result.questions})", "prompt tokens"]
    lines = []
    for name, row in result.rows.items():
        cells = [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in (row["accuracy"][f] for f in [*FAMILIES, "all"])]
        lines.append([_label(name), *cells, f"{row['prompt_tokens']:.0f}" if name != "random" else "-"])
    return markdown_table(header, lines)


def topic_table(result: UqaResult) -> str:
    """Accuracy per question topic, one line per row (random: chance): which questions a row can answer at all.

    Needs the per-question record (``asked``) and each row's ``correct``; a family's accuracy can hide a topic at
    chance behind others far above it.
    """
    topics = [t for ts in FAMILIES.values() for t in ts if any(a["topic"] == t for a in result.asked)]
    masks = {t: np.array([a["topic"] == t for a in result.asked]) for t in topics}
    family_of = {t: f for f, ts in FAMILIES.items() for t in ts}
    header = ["row", *[f"{family_of[t]}: {t} (n={int(masks[t].sum())})" for t in topics]]
    lines = []
    for name, row in result.rows.items():
        if row["correct"] is None:
            lines.append([_label(name), *[f"{1 / N_OPTIONS:.3f}" for _ in topics]])
            continue
        correct = np.asarray(row["correct"], dtype=float)
        lines.append([_label(name), *[f"{correct[masks[t]].mean():.3f}" for t in topics]])
    return markdown_table(header, lines)


def uqa_plot(result: UqaResult, path: Path) -> Path:
    """Accuracy per family, one bar per row, 95% intervals; the dashed line is chance."""
    plt = _pyplot()
    rows = [r for r in result.rows if r != "random"]
    fams = [*FAMILIES, "all"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(fams))
    for j, r in enumerate(rows):
        acc = np.array([result.rows[r]["accuracy"][f] for f in fams], dtype=float)  # (F, 3)
        err = np.stack([acc[:, 0] - acc[:, 1], acc[:, 2] - acc[:, 0]])
        ax.bar(x + (j - (len(rows) - 1) / 2) * width, acc[:, 0], width, yerr=err, capsize=2, label=_label(r))
    ax.axhline(1 / N_OPTIONS, color="black", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, [f"{f}\n(n={result.by_family.get(f, result.questions)})" for f in fams])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (4 options)")
    ax.set_title(f"{result.run['dataset']}: multiple choice about {result.run['held_out_users']} held-out users")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def uqa_cost_plot(result: UqaResult, path: Path) -> Path:
    """Accuracy against prompt positions per question (log scale), one marker per row and family: what each way of
    giving the model the user costs (UQABench's efficiency view). The dashed line is chance."""
    plt = _pyplot()
    rows = [r for r in result.rows if r != "random"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for f, marker in zip([*FAMILIES, "all"], ["o", "s", "^", "D"]):
        tokens = [result.rows[r]["prompt_tokens"] for r in rows]
        acc = [result.rows[r]["accuracy"][f][0] for r in rows]
        ax.plot(tokens, acc, marker=marker, linestyle="none", label=f, markersize=7 if f == "all" else 5,
                color="black" if f == "all" else None)
    for r in rows:
        ax.annotate(_label(r).replace("TextN: last ", "Text-").replace(" events as text", ""),
                    (result.rows[r]["prompt_tokens"], result.rows[r]["accuracy"]["all"][0]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.axhline(1 / N_OPTIONS, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    spent = [result.rows[r]["prompt_tokens"] for r in rows]
    ticks = [t for t in (10, 30, 100, 300, 1000, 3000, 10000) if spent and min(spent) / 2 <= t <= max(spent) * 2]
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(lambda *_: "")
    ax.set_xlabel("prompt positions per question (user + question)")
    ax.set_ylabel("accuracy (4 options)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result.run['dataset']}: accuracy against prompt cost")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def write_uqa(result: UqaResult, out_dir: str | Path, questions: list[Question] | None = None) -> Path:
    """``report.md``, ``results.json``, ``uqa.png`` and ``uqa_cost.png`` into ``out_dir``; returns the report's path."""
    out = Path(out_dir)
    plot = uqa_plot(result, out / "uqa.png")
    cost = uqa_cost_plot(result, out / "uqa_cost.png")
    write_json(result.to_dict(), out / "results.json")
    r = result.run
    lines = [f"# UQA benchmark: {r['dataset']}", "",
             f"Checkpoint `{r['checkpoint']}`, {r['held_out_users']} held-out users (share {r['holdout_fraction']} of the "
             f"dataset, never in pretraining pairs), {result.questions} questions of {N_OPTIONS} options; every row "
             f"pretrained with the same recipe: {r['pretrain_steps']} steps x {r['pretrain_batch']} pairs. "
             + (f"Rows merged from {len(r['merged_from'])} runs on the same questions: "
                f"{', '.join(f'`{m}`' for m in r['merged_from'])}." if r.get("merged_from") else
                f"This run took {format_seconds(r['seconds'])} (rows an earlier run trained in `variants/` are reused)."),
             *(["", f"**Warning**: the checkpoint was pretrained on other data than `{r['data_path']}`, on which the "
                  "other rows were pretrained (or the data's files were rewritten since): the rows may not share their "
                  "pairs."] if r.get("checkpoint_data_matches") is False else []),
             "",
             "## Accuracy (95% Wilson interval) and prompt positions per question", "", uqa_table(result), "",
             f"![accuracy per family]({plot.name}) ![accuracy against prompt cost]({cost.name})", "",
             "## Accuracy per topic", "", topic_table(result), "", _NOTES]
    path = out / "report.md"
    write_text("\n".join(lines), path)
    return path


_NOTES = """## How to read this

- Families (UQABench): *sequence* = what the history holds (activity counts, recency, most frequent items,
  modality mix, largest amount); *interest* = top categories, time-of-day and weekend habits, trend; *action* =
  what the user does in the 30 days after an internal cutoff, the model reading only the events before it.
- Options: the user's own answer, recomputed from the events, and 3 other held-out users' answers to the same
  question that are verified wrong for this user; every option is in the dataset's own words, so a row that
  ignores the user is at chance. The row picks the option whose tokens it finds most likely (mean log-probability).
- Rows: *TextN* is the same recipe, pairs, budget and seed, pretrained to read the user's last N events as plain
  text instead of user tokens; *prior* is the same with no user at all. Prompt tokens: the positions the user
  prefix and the question take in the LLM (Q-Anchor: user, modality and event tokens; TextN: the event lines).
"""
