"""``qanchor prompt-tune``: one scenario head per task on a frozen pretrained checkpoint.

Output directory::

    <task>/head.safetensors, <task>/head.yaml    the head (see qanchor.tune.head)
    <task>/split.json                            user ids of its train / val / test users
    <task>/record.json                           its summary record; written last, so it marks the task done
    summary.json                                 per task: val/test AUC and KS of the frozen baselines and
                                                 the tuned head, best step, tuning seconds

The prefixes of every user of the chosen tasks are encoded once and shared by all tasks: a task then
costs only suffix forwards, whatever the users' history lengths. A re-run (after an interruption, or of
``make demo``) reuses every task whose head was tuned with the same checkpoint, dataset files, packing
and settings, and tunes the rest: heads are deterministic, so a reused head is the one it would redo.

``labels=`` + ``query=`` tune one head for the user's own scenario instead (a ``user_id,label`` file, read by
:func:`qanchor.data.labels.custom_task`); its re-run key holds the labels themselves, not the file's path.

Example:
    $ qanchor prompt-tune --config configs/prompt_tune/tiny-cj.yaml checkpoint=runs/demo/pretrain \\
          data.path=data/completejourney task=all output_dir=runs/demo/heads
    $ qanchor prompt-tune checkpoint=runs/demo/pretrain data.path=data/completejourney labels=wine.csv \\
          query="Will this household buy wine next month?" output_dir=runs/wine-head
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qanchor.config import (
    DataConfig,
    DataOverrides,
    PromptTuneConfig,
    TextEncoderConfig,
    require,
    to_container,
)
from qanchor.data.dataset import Dataset, Task, UserRecord, load_dataset, warn_tasks_without_data
from qanchor.data.io import (
    OutputKind,
    check_replaceable,
    claim_output_dir,
    code_digest,
    hold_output,
    recover_temporaries,
    releasing_outputs,
    write_text,
)
from qanchor.data.labels import custom_task, task_digest
from qanchor.data.pipeline import UserPipeline, batched
from qanchor.errors import CheckpointError, ConfigError, DataValidationError
from qanchor.faults import failpoint
from qanchor.logs import log, warn
from qanchor.metrics import auc_ks
from qanchor.model.backbone import check_device
from qanchor.model.factory import ModelMeta, check_encoder_digest, load_checkpoint, resolve_checkpoint_dir
from qanchor.model.layout import tokenize_query
from qanchor.model.prefix_cache import PrefixStore
from qanchor.model.qanchor_model import QAnchorModel
from qanchor.train.pretrain import checkpoint_data_id, same_trained_data
from qanchor.tune.head import HEAD_FOLDER_FILES, HEAD_META, HEAD_RECORD, HEAD_WEIGHTS, SPLIT_FILE, find_heads
from qanchor.tune.trainer import frozen_logistic, split_users, tune_task

__all__ = ["run_prompt_tune", "resolve_data_config", "select_tasks", "chosen_tasks", "check_splittable", "encode_users", "format_summary"]


def resolve_data_config(overrides: DataOverrides, checkpoint_data: DataConfig, meta: ModelMeta) -> DataConfig:
    """The checkpoint's data section with only the ``data`` keys the user set replacing its own.

    Event caps must match pretraining unless deliberately changed, and the text encoder must be the
    checkpoint's (its vectors are what the event adapters were trained on), so it is not overridable.
    """
    data = overrides.apply(checkpoint_data)
    data.text_encoder = TextEncoderConfig(**meta.text_encoder) if meta.text_encoder else checkpoint_data.text_encoder
    require(data.path, "data.path", "<dataset dir>")
    return data


def _check_implied_data(ds: Dataset, checkpoint: str) -> None:
    """Warn when the dataset a checkpoint's config names by a relative path (no ``data.path`` given; pretraining
    records an absolute one since 2026-12-07) holds other data than the model was pretrained on: that path is read
    from this working directory, where another dataset of the same name tuned and reported heads without a word. A
    warning, not a refusal: the record also changes with the dataset (a task added, a file changed)."""
    trained_on = checkpoint_data_id(resolve_checkpoint_dir(checkpoint))
    if same_trained_data(trained_on, ds) is False:
        warn(f"no data.path given, so prompt tuning reads {ds.root} (the relative data.path {checkpoint}'s config "
             f"names, read from {Path.cwd()}), which holds other data than the model was pretrained on: another "
             "dataset of that name, or the same one changed since (a task added, a file changed); pass "
             "data.path=<dataset> to name the dataset to tune on")


def select_tasks(ds: Dataset, task: str) -> list[str]:
    """``all``, one task name, or a comma-separated list -> task names (unknown names raise ConfigError)."""
    if task == "all" and not ds.tasks:
        raise ConfigError(f"dataset {ds.root} declares no tasks; tune a head for your own scenario with "
                          "labels=<user_id,label file> query=<text>")
    names = list(ds.tasks) if task == "all" else [t.strip() for t in task.split(",") if t.strip()]
    unknown = [t for t in names if t not in ds.tasks]
    if unknown or not names:
        raise ConfigError(f"task={task}: unknown task(s) {unknown}; dataset {ds.root} has {sorted(ds.tasks)} (or use task=all)")
    return names


def chosen_tasks(ds: Dataset, cfg: PromptTuneConfig) -> dict[str, Task]:
    """The tasks to tune: the dataset's (``task``), or the one scenario of ``labels`` + ``query``."""
    if cfg.labels is not None:
        task = custom_task(ds, cfg.labels, cfg.query or "")
        if task.name in ds.tasks:  # its head would replace the dataset task's, and be served under that task's name
            raise ConfigError(f"labels={cfg.labels} names its head '{task.name}', the name of the dataset's own task "
                              f"{task.name} (asked as {ds.tasks[task.name].query!r}); rename the labels file, or tune "
                              f"the dataset's task with task={task.name}")
        return {task.name: task}
    return {name: ds.tasks[name] for name in select_tasks(ds, cfg.task)}


def check_splittable(task: Task, cfg: PromptTuneConfig) -> None:
    """DataValidationError unless ``task``'s train / val / test split holds both classes in each part: tuning keeps
    the step with the best validation AUC and reports test AUC, and neither exists for one class."""
    labels = task.labels.astype(np.int64)
    smaller = int(min(labels.sum(), len(labels) - labels.sum()))
    advice = (f"{smaller} user(s) of its smaller class among {len(labels)} labelled; give more labelled users (at least "
              f"{int(np.ceil(1 / min(cfg.val_fraction, cfg.test_fraction)))} of each class), or raise val_fraction / "
              "test_fraction")
    try:
        split = split_users(np.arange(len(labels)), labels, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    except ValueError:  # scikit-learn: a class too small to stratify
        raise DataValidationError(f"task {task.name}", f"too few users to split into train / val / test: {advice}") from None
    for part, y in split.labels.items():
        if len(y) == 0 or int(y.min()) == int(y.max()):
            raise DataValidationError(f"task {task.name}", f"its {part} split ({len(y)} users) holds one class only: "
                                      f"{advice}")


def _check_compatible(ds: Dataset, model: QAnchorModel, meta: ModelMeta) -> None:
    ours = [(m.name, m.kind) for m in model.manifest.modalities]
    theirs = [(m.name, m.kind) for m in ds.manifest.modalities]
    # the extra numeric columns too: the packed events are read by position
    same_extras = [m.numeric_columns for m in model.manifest.modalities] == [m.numeric_columns for m in ds.manifest.modalities]
    if ours != theirs or not same_extras or list(ds.tabular_columns) != list(meta.tabular_columns):
        raise CheckpointError(f"dataset {ds.root} has modalities {theirs} and tabular columns {ds.tabular_columns[:5]}..., "
                              f"but the checkpoint was pretrained on {ours} / {meta.tabular_columns[:5]}...; "
                              "tune on a dataset with the checkpoint's layout")


def encode_users(model: QAnchorModel, ds: Dataset, pipe: UserPipeline, user_ids: list[str], chunk: int,
                 progress: bool, queries: list[str] | None = None,
                 adapt: Callable[[UserRecord], UserRecord] | None = None) -> PrefixStore:
    """Pack, collate and encode the prefixes of ``user_ids`` (sorted), ``chunk`` users at a time, at ``ds``'s cutoff
    (``pipe`` may be a checkpoint's, whose own cutoff is another dataset's). A model with ``model.query_evidence``
    keeps each user's evidence for each of ``queries`` (``store.at_query`` picks one). ``adapt``
    remaps a dataset's records into the checkpoint's column layout (``record_adapter``; the bench's datasets may order
    their columns otherwise)."""
    adapt = adapt or (lambda record: record)
    pipe.prime(ds.users(user_ids), progress=progress, total=len(user_ids))  # any missing event text, once, in big batches
    device = next(model.parameters()).device  # the store lives where the model runs
    vectors = None
    if model.query_evidence is not None:
        texts = sorted(set(queries or []))
        # one question at a time: in a batch, padding to the longest question moves each vector by ~1e-7, so a head
        # tuned beside other questions would differ from the same head tuned alone (and be reused as if it did not)
        encoded = [torch.from_numpy(pipe.cache.encoder.encode([q.strip()])[0]).to(device) for q in texts]
        vectors = dict(zip(texts, encoded))
    batches = (pipe.collate(pipe.pack_many(records, ds.manifest.cutoff_us)).to(device)
               for records in batched(map(adapt, ds.users(user_ids)), chunk))
    return PrefixStore.encode(model, batches, progress=progress, queries=vectors, total=-(-len(user_ids) // chunk))


@releasing_outputs
def run_prompt_tune(cfg: PromptTuneConfig, progress: bool = True) -> dict:
    """Tune the configured task(s); write heads and ``summary.json`` under ``output_dir``; return the summary."""
    require(cfg.checkpoint, "checkpoint", "<pretrained checkpoint dir>")
    require(cfg.output_dir, "output_dir", "runs/heads")  # empty (an unset $OUT): the heads went into the working folder
    started = time.perf_counter()
    torch.set_grad_enabled(True)
    model, tokenizer, meta, run_cfg = load_checkpoint(cfg.checkpoint, device=check_device(cfg.device))
    model.requires_grad_(False)  # frozen: only the head's prompt and prototypes get gradients
    ckpt_hash = model.checkpoint_id  # of the checkpoint loaded above, not of files replaced since
    data_cfg = resolve_data_config(cfg.data, run_cfg.data, meta)
    ds = load_dataset(data_cfg.path, data_cfg.cache_dir)
    _check_compatible(ds, model, meta)
    if not cfg.data.path and not Path(run_cfg.data.path).is_absolute():  # the checkpoint's own, relative to... where?
        _check_implied_data(ds, cfg.checkpoint)
    views = chosen_tasks(ds, cfg)
    tasks = list(views)
    if cfg.labels is None:  # (a labels file of one's own is checked as it is read)
        warn_tasks_without_data(ds, tasks)
    refused = {}  # before any encoding: a task too small to split fails the run at once
    for task in views.values():
        try:
            check_splittable(task, cfg)
        except DataValidationError as exc:
            refused[task.name] = exc
    if refused:
        first = next(iter(refused.values()))
        if len(views) == 1:
            raise first
        fit = [t for t in views if t not in refused]  # only tasks that would pass: naming failing ones sends users round
        rest = f"or leave it out: task={','.join(fit)}" if fit else "no task of this run can be split"
        also = f" ({len(refused) - 1} more task(s) too small: {', '.join(list(refused)[1:])})" if len(refused) > 1 else ""
        raise DataValidationError(first.file, f"{first.rule}{also}; {rest}")
    for name in tasks:  # a question too long for the model: refused before the output folder and the prefixes
        tokenize_query(tokenizer, views[name].spec.query, model.cfg.max_query_tokens)
    pipe = UserPipeline.for_dataset(ds, data_cfg)
    check_encoder_digest(pipe.cache.encoder, meta.text_encoder_digest, cfg.checkpoint)  # as serving does
    out = Path(cfg.output_dir)
    claim_output_dir(out, OutputKind.HEADS, {"checkpoint": cfg.checkpoint, "data.path": data_cfg.path,
                                             "labels": cfg.labels}, key="output_dir")
    hold_output(out, "prompt tuning")  # a second run there would pair one run's head with the other's record
    for name in tasks:
        # a head reused below is never rewritten, so the temporaries of its write killed earlier are cleared here (and
        # an old head a kill left between the two renames of a swap put back): none is left to sit beside the head
        recover_temporaries(out / name)
        # a folder of someone else's (or notes in a head's) is refused before the work, not after it
        check_replaceable(out / name, OutputKind.HEAD, HEAD_FOLDER_FILES)
    fingerprint = ds.fingerprint  # stats every dataset file: once, not per task
    # The store holds every chosen task's users, not only the unfinished ones': the same store as an uninterrupted run,
    # so a task tuned after a restart comes out bit-identical. Batch composition moves float rounding, so a head tuned
    # beside other tasks is reused only beside the same ones (the users are part of its key).
    user_ids = sorted(set().union(*(views[t].user_ids.tolist() for t in tasks)))
    cohort = hashlib.sha256(json.dumps(user_ids).encode()).hexdigest()[:16]
    keys = {name: _task_key(cfg, data_cfg, ckpt_hash, fingerprint, views[name], cohort) for name in tasks}
    caps = {m.name: data_cfg.cap(m.name) for m in ds.manifest.sequence_modalities}  # how its users are packed
    finished = {name: rec for name in tasks if (rec := _finished(out / name, keys[name])) is not None}
    if finished and progress:
        log(f"reusing {len(finished)} head(s) already tuned in {out} with the same checkpoint, data and "
            f"settings: {', '.join(finished)}")
    todo = [t for t in tasks if t not in finished]
    store, row_of = None, {}
    if todo:
        store = encode_users(model, ds, pipe, user_ids, cfg.prefix_chunk, progress, [views[t].query for t in tasks])
        row_of = {u: i for i, u in enumerate(store.user_ids)}
    summary = {"checkpoint": str(cfg.checkpoint), "checkpoint_hash": ckpt_hash, "dataset": str(ds.root),
               "n_users": len(store) if store else 0, "prefix_mb": store.nbytes / 2**20 if store else 0.0,
               "prepare_seconds": time.perf_counter() - started,
               "config": to_container(cfg), "tasks": {}}
    for name in tasks:
        if name in finished:
            summary["tasks"][name] = finished[name]
            continue
        record = _tune_one(model, tokenizer, store, row_of, views[name], cfg, ckpt_hash, out, progress, caps, keys[name])
        failpoint("head-saved")
        summary["tasks"][name] = record
        write_text(json.dumps(summary, indent=2), out / "summary.json")
    summary["total_seconds"] = time.perf_counter() - started
    write_text(json.dumps(summary, indent=2), out / "summary.json")
    others = sorted(set(find_heads(out)) - set(tasks))
    if others and progress:
        log(f"note: {out} also holds heads of {', '.join(others)} from an earlier run (not in this run's summary.json); "
            f"`heads={out}` loads them too: move them out, or tune them again with task={','.join([*tasks, *others])}")
    return summary


def _task_key(cfg: PromptTuneConfig, data: DataConfig, ckpt_hash: str, dataset_fingerprint: str, task: Task,
              cohort: str = "") -> str:
    """What a task's head depends on: checkpoint, dataset files, the task's question, users and labels, packing and
    tuning settings (not paths/device: a custom labels file is keyed by what it holds), and the code and libraries
    that tune it."""
    settings = to_container(cfg)
    for k in ("checkpoint", "output_dir", "task", "device", "data", "labels", "query"):
        settings.pop(k, None)
    packing = to_container(data)
    packing.pop("path", None)
    packing.pop("cache_dir", None)
    # code_digest: a head tuned by other code (a pull that changed tuning) is tuned again, as the bench redoes its rows
    blob = json.dumps([ckpt_hash, dataset_fingerprint, task.name, task_digest(task), settings, packing, cohort,
                       code_digest()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _finished(task_dir: Path, key: str) -> dict | None:
    """A task's record if ``task_dir`` holds a head tuned under ``key``, else None (it is tuned again)."""
    path = task_dir / HEAD_RECORD
    if not (path.exists() and (task_dir / HEAD_META).exists() and (task_dir / HEAD_WEIGHTS).exists()):
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):  # damaged (not JSON, not UTF-8) or unreadable: tuned again
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def _tune_one(model, tokenizer, store: PrefixStore, row_of: dict, task: Task, cfg: PromptTuneConfig,
              ckpt_hash: str, out: Path, progress: bool, caps: dict[str, int], key: str) -> dict:
    name = task.name
    store = store.at_query(task.spec.query)
    rows = np.array([row_of[u] for u in task.user_ids])
    split = split_users(rows, task.labels.astype(np.int64), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    query_ids = torch.tensor(tokenize_query(tokenizer, task.spec.query, model.cfg.max_query_tokens), device=cfg.device)
    if progress:  # the frozen readout and the step-0 evaluation come before the step bar: seconds to minutes
        log(f"tune {name}: fitting the frozen readout on {len(rows):,} users")
    lr = frozen_logistic(model, store, query_ids, split, cfg.seed, cfg.prefix_chunk)
    result = tune_task(model, store, query_ids, split, cfg, name, task.spec.query, ckpt_hash, progress)
    result.head.extra["event_caps"] = caps  # serving must pack its users alike (QAnchor refuses other caps)
    record = {"query": task.spec.query, "n": {k: len(v) for k, v in split.rows.items()},
              "positive_rate": float(task.labels.mean()), "frozen_lr": lr, **result.metrics,
              "best_step": result.best_step, "tune_seconds": result.seconds, "history": result.history}
    if task.prob is not None:  # synthetic data: the best achievable AUC on the same test users
        pos = {r: i for i, r in enumerate(rows)}
        test = [pos[int(r)] for r in split.rows["test"]]
        record["oracle"] = {"test": auc_ks(task.labels[test], task.prob[test])}
    record["key"] = key
    # the head, its split and its record are published in one swap; the record (and its key) marks the task finished
    ids = {k: [store.user_ids[int(r)] for r in v] for k, v in split.rows.items()}
    result.head.save(out / name, beside={SPLIT_FILE: json.dumps(ids), HEAD_RECORD: json.dumps(record)})
    return record


def format_summary(summary: dict) -> str:
    """A markdown table: per task, test AUC / KS of frozen-LR, frozen prototypes and the tuned head."""
    head = ("| task | frozen LR AUC | frozen proto AUC | tuned AUC | oracle AUC | oracle - tuned | frozen LR KS | tuned KS "
            "| best step | s |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, r in summary["tasks"].items():
        # Only synthetic tasks know the true P(y=1); the gap is what the tuned head leaves on the table.
        oracle, gap = "-", "-"
        if "oracle" in r:
            oracle, gap = f"{r['oracle']['test']['auc']:.3f}", f"{r['oracle']['test']['auc'] - r['tuned']['test']['auc']:.3f}"
        lines.append(f"| {name} | {r['frozen_lr']['test']['auc']:.3f} | {r['frozen_proto']['test']['auc']:.3f} | "
                     f"{r['tuned']['test']['auc']:.3f} | {oracle} | {gap} | {r['frozen_lr']['test']['ks']:.3f} | "
                     f"{r['tuned']['test']['ks']:.3f} | {r['best_step']} | {r['tune_seconds']:.1f} |")
    means = {k: np.nanmean([r[k]["test"]["auc"] for r in summary["tasks"].values()]) for k in ("frozen_lr", "frozen_proto", "tuned")}
    lines.append(f"| **mean** | {means['frozen_lr']:.3f} | {means['frozen_proto']:.3f} | {means['tuned']:.3f} | | | | | | |")
    return "\n".join(lines)
