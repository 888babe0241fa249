"""``qanchor pretrain``: contrastive + next-token pretraining on UserU pairs under DeepSpeed.

Output directory (a marked qanchor "pretraining run")::

    metrics.jsonl     one JSON line per logged step: step, loss, loss_contrastive, loss_ntp, lr, samples_per_s
    checkpoint/       the latest model checkpoint (safetensors; see qanchor.model.factory), replaced atomically
    ds_state/         DeepSpeed's own state (optimizer, scheduler, step, RNG) for ``resume=true``, sealed per tag

Everything a run needs is checked before any long work (dataset, UserU pairs, batch vs pair count, query
lengths, output directory, device, resume state), so a mistake costs seconds. When stdout is not a
terminal (a cluster log file) the run prints a start line, a line every ``train.log_every`` steps and a
summary; on a terminal it shows a progress bar.

Example:
    $ qanchor pretrain --config configs/pretrain/tiny-synth.yaml data.path=data/synth output_dir=runs/synth
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import replace
from functools import cache
from itertools import islice
from pathlib import Path

import pyarrow.compute as pc
import torch

from qanchor.config import PretrainConfig, load_run_config, require, require_file, to_container
from qanchor.data.dataset import Dataset, content_digests, legacy_fingerprint, load_dataset
from qanchor.data.io import (
    OutputKind,
    check_output_dir,
    check_replaceable,
    claim_output_dir,
    file_sha256,
    hold_output,
    releasing_outputs,
    write_text,
)
from qanchor.data.packing import numeric_stats, tabular_stats
from qanchor.data.pipeline import UserPipeline, batched, check_caps
from qanchor.data.schema import USERU_FILE
from qanchor.data.text_cache import SentenceEncoder, TextVectorCache, default_encoder_path, refuse_cut
from qanchor.data.userU import stale_userU
from qanchor.errors import CheckpointError, ConfigError, DataValidationError
from qanchor.faults import failpoint
from qanchor.logs import Progress, format_seconds, interactive, log, progress_lines, warn
from qanchor.model.backbone import check_backbone_weights, check_device, load_tokenizer, local_path
from qanchor.model.factory import ModelMeta, build_model, save_checkpoint
from qanchor.model.layout import tokenize_query
from qanchor.model.qanchor_model import AnswerBank, shrunk_whitening
from qanchor.train.distributed import all_reduce_sum, gather_with_grad, global_mean_loss
from qanchor.train.engine import (
    deepspeed_config,
    device_of,
    gathered_parameters,
    init_distributed,
    initialize,
)
from qanchor.train.pairs import PretrainStream, check_profile_sources, is_held_out
from qanchor.train.seal import clear_saving, mark_saving, resume_key, saving_marked, seal_tag, verify_tag

__all__ = ["run_pretrain", "prepare_inputs", "preflight", "MetricsLog"]

_KEEP_DS_TAGS = 2


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the resumed step are dropped (they will be redone)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            records = self._records(path)
            kept = [line for line, record in records if record["step"] <= resume_step]
            write_text("".join(line + "\n" for line in kept), path)
        elif path.exists():
            path.unlink()

    @staticmethod
    def _records(path: Path) -> list[tuple[str, dict]]:
        """(line, record) of each line. A killed writer (a preempted node, a power loss) can leave the last lines torn
        or filled with NUL bytes: those are dropped with a warning, as the steps they logged are redone. A damaged
        line before a whole one is not a torn tail: refused, naming it."""
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        parsed: list[tuple[str, dict | None]] = []
        for line in lines:
            try:
                record = json.loads(line) if line.strip("\x00 \t") else None
            except json.JSONDecodeError:
                record = None
            parsed.append((line, record if isinstance(record, dict) and isinstance(record.get("step"), int) else None))
        torn = 0
        while parsed and parsed[-1][1] is None:
            parsed.pop()
            torn += 1
        if torn:
            warn(f"{path}: dropped {torn} torn line(s) at its end (a run killed while writing); their steps are "
                 "trained again")
        bad = next((i for i, (_, record) in enumerate(parsed) if record is None), None)
        if bad is not None:
            raise CheckpointError(f"{path}, line {bad + 1}: not a metrics record ({parsed[bad][0][:80]!r}) though whole "
                                  "lines follow it; the file is damaged: move it away to resume without the old metrics")
        return parsed  # type: ignore[return-value]

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # a step's line reaches the disk with it, not minutes later in a lost page cache


def preflight(cfg: PretrainConfig, world: int = 1, rank: int = 0):
    """Every check that needs no model and no text encoder: refuse a mistake in seconds, touching nothing. Every rank
    runs it (each must stop on a mistake); only ``rank`` 0 says its warnings, once per run and not once per process.
    Returns the backbone's tokenizer as loaded, before the model's special tokens are added: the run builds its model
    with it rather than loading it again (a Qwen2.5 tokenizer takes seconds to build)."""
    require(cfg.data.path, "data.path", "<dataset dir>")
    require(cfg.output_dir, "output_dir", "runs/pretrain")  # empty (an unset $OUT): the run went into the working folder
    require_file(cfg.train.deepspeed_config, "train.deepspeed_config")
    check_device("cuda" if torch.cuda.is_available() else "cpu", cfg.train.precision)
    deepspeed_config(cfg.train, world)  # a damaged or conflicting deepspeed_config file fails here, not after setup
    if not Path(cfg.data.path).is_dir():  # a mistyped path: said at once, not after a tokenizer's load (or a hub's timeout)
        raise DataValidationError(str(cfg.data.path), "dataset directory not found")
    # the weights before the data: validating a paper-scale dataset takes minutes on every rank
    tokenizer = load_tokenizer(cfg.model.backbone)
    check_backbone_weights(cfg.model.backbone, len(tokenizer))
    ds = load_dataset(cfg.data.path, cfg.data.cache_dir)
    check_caps(cfg.data, ds.manifest)
    if not (ds.root / USERU_FILE).exists():
        if not ds.report.n_events:  # `data userU` writes no pairs then: naming it would send the user round
            raise DataValidationError(str(ds.root), "the dataset has no sequence events, so there is nothing to pretrain "
                                      "on (UserU pairs are asked about events); its tabular features can still be "
                                      f"benchmarked with the peers: `qanchor bench checkpoint=null data.path={ds.root}`")
        raise DataValidationError(str(ds.root / USERU_FILE), f"pretraining needs UserU pairs; build them with "
                                  f"`qanchor data userU {ds.root}`")
    if rank == 0 and (stale := stale_userU(ds.root / USERU_FILE, ds)) is not None:
        warn(stale)  # the pairs are still valid training pairs: say so, and train on them
    pairs = ds.userU()
    if cfg.loss.profile_weight > 0 and cfg.loss.profile_sources is not None:
        check_profile_sources(pairs, cfg.loss.profile_sources, ds.root / USERU_FILE)
    if pairs.num_rows < cfg.train.batch_size * world:
        raise ConfigError(f"{ds.root / USERU_FILE} holds {pairs.num_rows} pairs, fewer than one global batch "
                          f"(train.batch_size={cfg.train.batch_size} x {world} rank(s)); lower train.batch_size")
    if cfg.train.holdout_users > 0:  # users held out of pretraining: some must be left to train on
        pair_users = pc.unique(pairs.column("user_id")).to_pylist()
        if not any(not is_held_out(u, cfg.train.holdout_users) for u in pair_users):
            raise ConfigError(f"train.holdout_users={cfg.train.holdout_users} holds out every one of the "
                              f"{len(pair_users)} users with pretraining pairs; lower it (0.1 keeps a tenth aside)")
    _check_run_dir(cfg, ds, world, rank, tokenizer)
    resume_key()  # the first save seals with it: a key that is refused must stop the run now, not after save_every steps
    SentenceEncoder.check(cfg.data.text_encoder)  # before the questions, which its tokenizer may read
    _check_queries(cfg, tokenizer, sorted(set(pairs.column("query").to_pylist())))
    return tokenizer


# Settings that say where and how often a run writes, not what it trains: a run may be resumed (or a retrained
# sub-run reused) with other values of these. Any other difference would mix two recipes in one run.
BOOKKEEPING_KEYS = frozenset({"output_dir", "resume", "overwrite", "train.log_every", "train.save_every",
                              "data.cache_dir", "train.dist_timeout_minutes"})


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def recipe_differences(saved: PretrainConfig, new: PretrainConfig) -> list[str]:
    """``"key: saved -> new"`` for each setting that differs between two run configs and shapes what is trained
    (every key but :data:`BOOKKEEPING_KEYS`; ``data.path`` compared as a resolved path)."""
    a, b = (_flatten(to_container(c)) for c in (saved, new))
    for flat in (a, b):
        if flat.get("data.path"):
            flat["data.path"] = str(Path(flat["data.path"]).resolve())
    ignored = set(BOOKKEEPING_KEYS)
    if a.get("train.schedule") == b.get("train.schedule") == "constant":
        ignored.add("train.max_steps")  # a constant rate does not depend on the budget: extending a run is sound
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if k not in ignored and a.get(k) != b.get(k)]


DATA_FILE = "DATA"  # in a run's checkpoint: trained_data_id of the data it was trained on


def trained_data_id(ds: Dataset) -> str:
    """Which data a run trains on: the dataset's fingerprint (event, tabular and task files, the manifest) and its
    ``userU.parquet``, which the fingerprint leaves out, both by content: a dataset rebuilt byte for byte, or copied
    without its file times, is the same data. Stored in each checkpoint (:data:`DATA_FILE`) so that reusing or resuming
    a run on data changed since can be told apart."""
    pairs = ds.root / USERU_FILE
    pairs_digest = content_digests([pairs], ds.cache_dir)[0] if pairs.exists() else "-"
    return hashlib.sha256(f"{ds.fingerprint}:{pairs_digest}".encode()).hexdigest()[:16]


def legacy_trained_data_id(ds: Dataset) -> str:
    """:func:`trained_data_id` as runs made before it went by content (2026-12-07) recorded it: the files' names,
    sizes and times. Accepted by :func:`same_trained_data`, so that upgrading qanchor does not make every earlier run
    read as trained on other data (resumed with a warning, its sub-runs retrained, uqa recording a mismatch)."""
    pairs = ds.root / USERU_FILE
    st = pairs.stat() if pairs.exists() else None
    blob = f"{legacy_fingerprint(ds.root)}:{st.st_size if st else '-'}:{st.st_mtime_ns if st else '-'}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def same_trained_data(recorded: str | None, ds: Dataset) -> bool | None:
    """Whether ``recorded`` (a checkpoint's :data:`DATA`, a script's record) names the data ``ds`` holds: by today's
    id, or by the one recorded before ids went by content, which still matches while the files keep their times.
    None when nothing was recorded."""
    if recorded is None:
        return None
    return recorded == trained_data_id(ds) or recorded == legacy_trained_data_id(ds)


DEEPSPEED_FILE = "DEEPSPEED"  # in a run's checkpoint: deepspeed_file_digest of the train.deepspeed_config it used


def deepspeed_file_digest(cfg: PretrainConfig) -> str:
    """SHA-256 of the ``train.deepspeed_config`` file's contents ("-" without one): what a run trained with, whatever
    path named it."""
    path = cfg.train.deepspeed_config
    return file_sha256(path) if path and Path(path).is_file() else "-"


BACKBONE_FILE = "BACKBONE"  # in a run's checkpoint: backbone_digests of the weights and tokenizer it started from


@cache  # a paper-scale weights folder is a gigabyte or more: read once per process, not at each check
def _folder_digest(folder: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for name, *_ in stamp:
        h.update(f"{name}:{file_sha256(Path(folder) / name)}\n".encode())
    return h.hexdigest()


def backbone_digests(cfg: PretrainConfig, tokenizer=None) -> dict[str, str]:
    """What a run's backbone starts from, whatever path named it: a local weights folder by the contents of its
    config.json and safetensors files (a hub id, the bundled model or random weights by name), the tokenizer by its
    vocabulary. A run moved with its weights to node-local storage resumes; weights edited since do not.
    ``tokenizer``: the backbone's tokenizer already loaded under ``cfg``, before any special token was added
    (:func:`preflight`'s); None loads it."""
    import json

    bb = cfg.model.backbone
    weights = local_path(bb.name_or_path) if bb.name_or_path else None
    if weights is not None and weights.is_dir():
        files = sorted(p for p in weights.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        weights_id = _folder_digest(str(weights.resolve()), stamp)
    else:
        weights_id = f"name:{bb.name_or_path}"
    tok = load_tokenizer(bb) if tokenizer is None else tokenizer
    vocab = json.dumps([sorted(tok.get_vocab().items()), tok.eos_token, tok.pad_token, tok.bos_token])
    return {"model.backbone.name_or_path": weights_id,
            "model.backbone.tokenizer": hashlib.sha256(vocab.encode()).hexdigest()}


def with_files_compared(diffs: list[str], checkpoint_dir: Path, cfg: PretrainConfig, tokenizer=None) -> list[str]:
    """:func:`recipe_differences`' ``diffs`` with the files a run names compared by what they hold, not by their paths:
    ``train.deepspeed_config`` by the file's contents (:data:`DEEPSPEED_FILE`), the backbone's weights folder and
    tokenizer by :func:`backbone_digests` (:data:`BACKBONE_FILE`). The same file named from another working directory,
    or weights copied to another disk, are the same recipe; a file edited since is another. A checkpoint saved before
    qanchor recorded one keeps the paths'."""
    try:
        recorded = (checkpoint_dir / DEEPSPEED_FILE).read_text().strip()
    except OSError:
        recorded = None
    if recorded is not None:
        diffs = [d for d in diffs if not d.startswith("train.deepspeed_config:")]
        if recorded != deepspeed_file_digest(cfg):
            diffs.append(f"train.deepspeed_config: {cfg.train.deepspeed_config} holds other DeepSpeed settings than the "
                         "run trained with (the file was edited, or another one is named)")
    try:
        backbone = dict(line.split(" ", 1) for line in (checkpoint_dir / BACKBONE_FILE).read_text().splitlines() if line)
    except (OSError, ValueError):
        return diffs
    now = backbone_digests(cfg, tokenizer)
    for key, digest in backbone.items():
        diffs = [d for d in diffs if not d.startswith(f"{key}:")]
        if now.get(key) != digest:
            what = "weights" if key.endswith("name_or_path") else "vocabulary"
            diffs.append(f"{key}: {cfg.model.backbone.name_or_path if what == 'weights' else cfg.model.backbone.tokenizer} "
                         f"holds other {what} than the run started from")
    return diffs


def backbone_file_text(cfg: PretrainConfig, tokenizer=None) -> str:
    """:data:`BACKBONE_FILE`'s contents: one ``key digest`` line per :func:`backbone_digests` entry."""
    return "".join(f"{key} {digest}\n" for key, digest in backbone_digests(cfg, tokenizer).items())


def checkpoint_data_id(checkpoint_dir: Path) -> str | None:
    """The :func:`trained_data_id` a checkpoint was saved with, or None (saved before qanchor recorded it)."""
    try:
        return (checkpoint_dir / DATA_FILE).read_text().strip() or None
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def checkpoint_step(checkpoint_dir: Path) -> int | None:
    """The step a pretraining run's checkpoint was saved at (its ``STEP`` file), or None if it has none."""
    try:
        return int((checkpoint_dir / "STEP").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _check_run_dir(cfg: PretrainConfig, ds: Dataset, world: int = 1, rank: int = 0, tokenizer=None) -> None:
    out = Path(cfg.output_dir)
    held = check_output_dir(out, OutputKind.RUN, {"data.path": cfg.data.path}, key="output_dir")
    started = held and any(p.name != ".qanchor-output" for p in out.iterdir())
    if started:  # before any work: each save replaces checkpoint/ whole, and would take a user's files in it along
        check_replaceable(out / "checkpoint", OutputKind.CHECKPOINT)
    if started and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"output_dir {out} already holds a pretraining run; pass resume=true to continue it, "
                          "overwrite=true to start it afresh, or choose another output_dir")
    if cfg.resume:
        tag = resume_tag(out / "ds_state")  # refuses resume state this user did not write, before any work
        reached = checkpoint_step(out / "checkpoint")
        if rank == 0 and tag is None and reached:  # a first save killed before its seal, or ds_state removed: said
            warn(f"{out} holds a checkpoint at step {reached} but no complete resume state in {out / 'ds_state'}: "
                 "the run starts again from step 0 and will replace that checkpoint (stop now and copy it away to keep it)")
        saved_world = None if tag is None else sharded_world(out / "ds_state" / tag)
        if saved_world is not None and saved_world != world:  # ZeRO refuses it too, in a traceback after the setup
            raise ConfigError(f"{out / 'ds_state' / tag} was saved by a run of {saved_world} process(es) and this one "
                              f"has {world}: resume it with {saved_world} (torchrun --nproc_per_node={saved_world}), or "
                              "start a new run")
        if tag is not None and not (out / "checkpoint" / "config.yaml").exists():
            # every sealed tag was saved with its checkpoint/ (the seal comes after it): without its config there is no
            # recipe, data or step to compare this run with, and resuming would mix whatever settings it is given
            raise ConfigError(f"output_dir {out} holds resume state ({out / 'ds_state' / tag}) but not the checkpoint/ "
                              "saved with it, whose config.yaml says how it was trained: put the run's checkpoint/ back to "
                              "resume it, or pass resume=false overwrite=true to start it afresh")
        if reached is not None and reached > cfg.train.max_steps:
            raise ConfigError(f"output_dir {out} is already at step {reached}, past train.max_steps={cfg.train.max_steps}: "
                              f"nothing to resume; pass train.max_steps above {reached} to train it further")
        saved = out / "checkpoint" / "config.yaml"
        if saved.exists():  # a longer train.max_steps, say, would continue a schedule built for the shorter run
            diffs = with_files_compared(recipe_differences(load_run_config(saved), cfg), out / "checkpoint", cfg,
                                        tokenizer)
            if same_trained_data(checkpoint_data_id(out / "checkpoint"), ds):
                # the very data it trained on, named by another path (a relative data.path given from another
                # working directory): not another recipe
                diffs = [d for d in diffs if not d.startswith("data.path:")]
            if diffs:
                raise ConfigError(f"output_dir {out} holds a run trained with other settings ({'; '.join(diffs)}): "
                                  "resuming it would mix two recipes in one run. Pass resume=false overwrite=true to "
                                  "start it afresh with these settings, or choose another output_dir")


def _check_queries(cfg: PretrainConfig, tokenizer, queries: list[str]) -> None:
    limit = cfg.model.max_query_tokens
    lengths = {q: len(tokenize_query(tokenizer, q, 1 << 30)) for q in queries}
    longest = max(lengths, key=lengths.__getitem__, default=None)
    if longest is not None and (n := lengths[longest]) > limit:
        # the pairs' questions are the dataset's, not the user's to shorten: the limit is what to change
        raise ConfigError(f"a pretraining pair's question has {n} tokens under this tokenizer, more than "
                          f"model.max_query_tokens={limit}: {longest[:80]!r}; raise model.max_query_tokens to at least {n} "
                          "(questions served later must fit it too)")
    if cfg.model.query_evidence:  # the questions' sentence vectors must read them whole, as serving will
        from transformers import AutoTokenizer

        encoder_tokenizer = AutoTokenizer.from_pretrained(str(cfg.data.text_encoder.path or default_encoder_path()))
        refuse_cut(encoder_tokenizer, cfg.data.text_encoder.max_length, [q.strip() for q in queries],
                   "a pretraining pair's question")


def prepare_inputs(cfg: PretrainConfig, rank: int, progress: bool = True) -> tuple[Dataset, UserPipeline]:
    """Open the dataset and fill the text-vector cache (rank 0 first; the others then read its shards)."""
    barrier = torch.distributed.barrier if torch.distributed.is_initialized() else (lambda: None)
    if rank == 0:
        ds = load_dataset(cfg.data.path, cfg.data.cache_dir)
        _ = ds.partitions  # built once, by rank 0
        pipe = UserPipeline.for_dataset(ds, cfg.data)
        pipe.prime(ds.users(), progress=progress, all_events=True, total=ds.num_users)
    barrier()
    if rank != 0:
        ds = load_dataset(cfg.data.path, cfg.data.cache_dir)
        pipe = UserPipeline.for_dataset(ds, cfg.data)
    return ds, pipe


@releasing_outputs
def run_pretrain(cfg: PretrainConfig, progress: bool = True, print_result: bool = False) -> Path:
    """Pretrain under ``cfg``; return the output directory. ``print_result`` (``qanchor pretrain --quiet``): without
    ``progress``, still print the summary line, the command's result; a quiet pretraining inside another command (the
    bench's ``qanchor_random_init``, an ablation, uqa's variants) prints nothing."""
    started = time.perf_counter()
    tokenizer = preflight(cfg, int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)))
    # the checkpoint's config.yaml names the dataset by an absolute path (not through links: a folder's name labels
    # results): a relative one was read from whichever folder a later command ran in (prompt-tune without data.path)
    cfg = replace(cfg, data=replace(cfg.data, path=os.path.abspath(cfg.data.path)))
    rank, world = init_distributed(cfg.train.dist_timeout_minutes)
    out = Path(cfg.output_dir)
    if rank == 0:
        claim_output_dir(out, OutputKind.RUN, {"data.path": cfg.data.path}, key="output_dir")
        hold_output(out, "pretraining run")  # before overwrite=true clears anything: another live run is refused
    ds, pipe = prepare_inputs(cfg, rank, progress and rank == 0)
    data_id = trained_data_id(ds)
    notes = {DATA_FILE: f"{data_id}\n", DEEPSPEED_FILE: f"{deepspeed_file_digest(cfg)}\n",  # in every checkpoint
             BACKBONE_FILE: backbone_file_text(cfg, tokenizer)}  # the tokenizer before build_model adds tokens
    saved_on = checkpoint_data_id(out / "checkpoint") if cfg.resume else None
    if rank == 0 and same_trained_data(saved_on, ds) is False:
        warn(f"{out} was trained so far on other data than {ds.root} holds now (its files or UserU pairs "
             "changed since); the resumed steps train on the data as it is now. Pass resume=false overwrite=true to "
             "train on it from the start")
    if rank == 0 and progress:  # minutes on a large dataset: said, not silent
        log(f"pretrain: setup: building the model and fitting its input statistics on {ds.num_users:,} users")
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model, tokenizer = build_model(cfg.model, ds.manifest, pipe.cache.dim, ds.tabular_columns, tokenizer=tokenizer,
                                   training_aids=cfg.loss)
    fit_input_stats(model, ds, pipe, holdout_users=cfg.train.holdout_users)
    meta = ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, cfg.data.text_encoder.__dict__, list(ds.tabular_columns),
                     text_encoder_digest=pipe.cache.encoder.digest)
    stream = PretrainStream.for_run(ds, pipe, tokenizer, model.token_ids, cfg)
    if len(stream) < cfg.train.batch_size * world:  # preflight counted every pair; held-out users and balancing take some
        raise ConfigError(f"only {len(stream)} pretraining pairs per epoch (train.holdout_users={cfg.train.holdout_users}, "
                          f"train.uqa_fraction={cfg.train.uqa_fraction}), fewer than one global batch "
                          f"(train.batch_size={cfg.train.batch_size} x {world} rank(s)); lower train.batch_size")
    if model.future_decoder is not None:
        fit_future_stats(model, stream, cfg.train.batch_size * world)
    tc = cfg.train
    if cfg.model.answer_tower == "text_encoder":  # only that tower reads answer vectors
        stream.answer_cache = answer_cache(cfg, ds, rank, progress, stream.answers_for_steps(
            tc.max_steps * tc.grad_accum_steps, tc.batch_size * world))
    if cfg.model.query_evidence:  # the run's questions, encoded up front and stored with the event texts
        questions = stream.queries_for_steps(tc.max_steps * tc.grad_accum_steps, tc.batch_size * world)
        if rank == 0:  # one writer (as for the event texts); the other ranks then read its shard
            stream.encode_queries(questions, progress)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            pipe.cache.refresh()
        fit_evidence_stats(model, stream, tc.batch_size * world)
    engine, _ = initialize(model, cfg.train, world)
    if rank == 0 and cfg.overwrite and output_has_run(out):
        # only now, after every check of the setup has passed: a run refused on the way leaves the old one whole
        _clear_run(out)
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # dropout streams differ per rank
    bank = AnswerBank(cfg.loss.answer_bank) if cfg.loss.answer_bank else None
    start = _maybe_resume(engine, bank, out, cfg.resume, rank, world)
    metrics = MetricsLog(out / "metrics.jsonl", start if cfg.resume else None) if rank == 0 else None
    if rank == 0 and progress:
        _log_start(cfg, model, ds, stream, world, start, time.perf_counter() - started)
    last = _train_loop(cfg, engine, stream, start, rank, world, metrics, progress, bank,
                       save=lambda step: _save(cfg, engine, model, tokenizer, meta, out, step, rank, world, bank,
                                                 notes))
    if rank == 0:
        summary = (f"pretrain: done, {cfg.train.max_steps - start} steps in "
                   f"{format_seconds(time.perf_counter() - started)}"
                   + (f"; last step loss {last['loss']:.4f} (contrastive {last['loss_contrastive']:.4f}, ntp "
                      f"{last['loss_ntp']:.4f}" + (f", profile {last['loss_profile']:.4f}" if "loss_profile" in last else "")
                      + (f", future {last['loss_future']:.4f}" if "loss_future" in last else "")
                      + (f", path-free {last['loss_path_free']:.4f}" if "loss_path_free" in last else "") + ")"
                      if last else "") + f"; checkpoint {out / 'checkpoint'}")
        if progress:
            log(summary)
        elif print_result:  # --quiet prints the result alone, as `data userU --quiet` prints its `wrote ...` line
            print(summary, flush=True)
    return out


def fit_input_stats(model, ds: Dataset, pipe: UserPipeline, sample: int = 4096, holdout_users: float = 0.0) -> None:
    """Store the standardisation of the tabular features (every training user), of each modality's numeric
    event features (the kept events of the first ``sample`` training users), of the modality tokens' RFM
    statistics and of the profile decoder's targets (same users) in the model, as inference will apply them; a
    ``principal`` statistics path fits its fixed map, query evidence its reference of event texts and the content
    components (``content_components``) their principal directions, on the same users.
    Users held out (``train.holdout_users``) are left out: nothing of theirs shapes the model."""
    def training_users():
        return (r for r in ds.users() if not is_held_out(r.user_id, holdout_users))

    if model.user_encoder.tabular is not None:
        mean, std = tabular_stats(training_users(), len(ds.tabular_columns))
        model.user_encoder.tabular.set_stats(torch.from_numpy(mean), torch.from_numpy(std))
    enc = model.user_encoder
    packed = (pipe.packer.pack(r) for r in islice(training_users(), sample))
    principal = model.statistics_path is not None and model.statistics_path.principal
    evidence = model.query_evidence
    content = enc.content_components > 0
    if enc.summary_stats != "basic" or model.profile_decoder is not None or principal or evidence is not None or content:
        # the same users, several passes
        packed = list(packed)
    for name, (mean, std) in numeric_stats(packed, ds.manifest).items():
        enc.event_adapters[name].set_stats(torch.from_numpy(mean), torch.from_numpy(std))
    if enc.summary_stats != "basic":  # one modal adapter for every modality: pooled over modalities with events
        with torch.no_grad():
            rows = []
            for chunk in batched(packed, 256):
                users = pipe.collate(chunk)
                for name in enc.sequence_names:
                    stats = enc.summary_inputs(name, users)[1]
                    rows.append(stats[users.modalities[name].mask.any(1)].double())
        rows = torch.cat(rows) if rows else torch.zeros(0, enc.summary_width, dtype=torch.float64)
        if len(rows):
            std = rows.std(0, unbiased=False)
            enc.modal_adapter.set_stats(rows.mean(0).float(), torch.where(std > 1e-6, std, 1.0).float())
    if content:  # before the profile's standardisation: the profile ends with the content components
        means = {name: [] for name in enc.sequence_names}
        with torch.no_grad():
            for chunk in batched(packed, 256):
                users = pipe.collate(chunk)
                for name in enc.sequence_names:
                    means[name].append(enc.summary_text_mean(name, users)[users.modalities[name].mask.any(1)])
        for name, parts in means.items():
            enc.set_content_basis(name, torch.cat(parts) if parts else torch.zeros(0, pipe.cache.dim))
    if principal:  # after the other stats: the path reads them standardised
        with torch.no_grad():
            stats = torch.cat([enc.statistics(pipe.collate(chunk)) for chunk in batched(packed, 256)])
        model.statistics_path.set_principal(stats)
    if evidence is not None:  # each modality's kept event texts: what a query's relevance is measured against
        kept = {name: [] for name in evidence.names}
        for chunk in batched(packed, 256):
            users = pipe.collate(chunk)
            for name in evidence.names:
                kept[name].append(users.modalities[name].text_vec[users.modalities[name].mask])
        for name, parts in kept.items():
            evidence.set_reference(name, torch.cat(parts) if parts else torch.zeros(0, pipe.cache.dim))
    if model.profile_decoder is not None:  # after the other stats: the profile uses them
        with torch.no_grad():
            profiles = torch.cat([enc.profile(pipe.collate(chunk)) for chunk in batched(packed, 256)]).double()
        mean, std = profiles.mean(0), profiles.std(0, unbiased=False)
        std = torch.where(std > 1e-6, std, 1.0)
        whiten = shrunk_whitening((profiles - mean) / std) if model.profile_decoder.whitening else None
        model.profile_decoder.set_stats(mean.float(), std.float(), whiten)


def fit_future_stats(model, stream: PretrainStream, global_batch: int, sample: int = 4096) -> None:
    """Standardise the future decoder's targets on the first ``sample`` pairs with a complete window in the run's
    order (the first epoch's; the stream leaves held-out users out), whatever its budget: a run resumed or extended
    with another ``max_steps`` (sound under a constant schedule) standardises as it did, and trains as a straight run."""
    per_epoch = len(stream) // global_batch
    steps = min(per_epoch, -(-sample // global_batch))
    while True:  # the order's prefix, grown until it holds ``sample`` complete pairs or the epoch ends
        ids = stream.pair_ids_for_steps(steps, global_batch)
        ids = ids[stream.future_complete[ids]]
        if len(ids) >= sample or steps >= per_epoch:
            break
        steps = min(per_epoch, steps * 4)
    ids = ids[:sample]
    if not len(ids):
        raise ConfigError(f"loss.future_weight > 0, but no pretraining pair has {stream.future_days} days of data after "
                         "its cutoff (forecast and future pairs do); lower loss.future_days or set future_weight 0")
    targets = stream.future_targets(ids)[0].double()
    mean, std = targets.mean(0), targets.std(0, unbiased=False)
    model.future_decoder.set_stats(mean.float(), torch.where(std > 1e-6, std, 1.0).float())


def fit_evidence_stats(model, stream: PretrainStream, global_batch: int, sample: int = 4096) -> None:
    """Standardise the query evidence (``model.query_evidence``) on the first ``sample`` pairs of the run's order
    (whatever its budget, so a run resumed with another ``max_steps`` standardises as it did): each pair's user
    packed at the pair's cutoff, under the pair's question."""
    ids = stream.pair_ids_for_steps(-(-sample // global_batch), global_batch)[:sample]
    if not len(ids):
        raise ConfigError("model.query_evidence: the run trains on no pairs to standardise the evidence on")
    features, packed = [], {}
    with torch.no_grad():
        for start in range(0, len(ids), 256):
            chunk = ids[start : start + 256]
            if len(packed) > 1024:  # a bound on memory (long histories at paper scale), not on what is reused
                packed.clear()
            users = stream.pipe.collate(stream.pack_pairs(chunk, packed))
            vectors = torch.from_numpy(stream.encode_queries([stream.queries[i] for i in chunk]))
            features.append(model.evidence(users, torch.arange(len(chunk)), vectors))
    model.query_evidence.set_feature_stats(torch.cat(features))


def answer_cache(cfg: PretrainConfig, ds: Dataset, rank: int, progress: bool,
                 answers: list[str] | None = None) -> TextVectorCache | None:
    """The text tower's answer vectors, cached on disk; rank 0 encodes ``answers`` before training (the distinct
    answers of the pairs a run will use, :meth:`PretrainStream.answers_for_steps`: the demo's 300 steps use 4,800
    of Complete Journey's 69,516 pairs). A batch meeting an answer not yet cached encodes it then."""
    if cfg.model.answer_tower != "text_encoder":
        return None
    enc = replace(cfg.data.text_encoder, max_length=cfg.model.answer_max_length)
    cache = TextVectorCache(ds.text_cache_dir, SentenceEncoder(enc))
    if rank == 0 and answers:
        cache.ensure(answers, progress=progress, what="answers")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        cache = TextVectorCache(ds.text_cache_dir, cache.encoder)  # the other ranks read rank 0's shards
    return cache


def output_has_run(out: Path) -> bool:
    return (out / "metrics.jsonl").exists() or (out / "ds_state").exists() or (out / "checkpoint").exists()


def _clear_run(out: Path) -> None:
    """overwrite=true: remove what a previous run left in a directory marked as a qanchor run (nothing else)."""
    # the resume state first: a kill part-way leaves a checkpoint without resume state (a restart, said as such), never
    # resume state without the checkpoint whose config a resume is checked against
    check_replaceable(out / "checkpoint", OutputKind.CHECKPOINT)  # a user's notes in it: refused, not deleted
    for name in ("ds_state", "metrics.jsonl", "checkpoint"):
        path = out / name
        if path.is_symlink():  # the link goes, what it points at stays (rmtree refuses a link with a traceback)
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _log_start(cfg: PretrainConfig, model, ds: Dataset, stream: PretrainStream, world: int, start: int,
               setup_s: float) -> None:
    def size(p: torch.Tensor) -> int:  # ZeRO-3 has partitioned each weight to an empty tensor by now
        return getattr(p, "ds_numel", None) or p.numel()

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    tc = cfg.train
    log(f"pretrain: start{' (resumed at step ' + str(start) + ')' if start else ''} after {format_seconds(setup_s)} of "
        f"setup; engine DeepSpeed ZeRO-{tc.zero_stage}, "
        f"world size {world}, device {device_of()}, dtype {tc.precision}, parameters {trainable:,} trainable / "
        f"{total:,} total; data {ds.root}: {ds.num_users:,} users, {len(stream):,} pairs per epoch; "
        f"{tc.max_steps} steps x {tc.batch_size * tc.grad_accum_steps * world} samples, lr {tc.lr:g}; "
        f"output {cfg.output_dir}")


def resume_tag(state: Path) -> str | None:
    """The newest DeepSpeed tag in ``state`` that carries this user's seal; None when there is no state.

    A newer tag that fails its seal is skipped only where this run announced its save (:func:`mark_saving`) and never
    sealed it: a save killed before it finished (ours, incomplete); with nothing older sealed, None, and the run starts
    afresh (nothing unsealed is ever read). Any other tag that fails is refused (CheckpointError), not passed over for
    an older one: a sealed tag whose files changed since (damage, an edit) or state this user did not write. Skipped,
    it went unsaid, up to ``save_every`` steps were trained again, and the next save deleted it as abandoned.
    """
    tags = sorted((p for p in state.glob("step-*") if p.is_dir()), reverse=True)
    for tag in tags:
        try:
            verify_tag(tag)
            return tag.name
        except CheckpointError as exc:
            if saving_marked(state, tag.name):
                continue
            older = [t.name for t in tags if t.name < tag.name]
            if older:
                raise CheckpointError(f"{exc}; or, to resume from the tag saved before it ({older[0]}), move {tag} out "
                                      f"of {state} (nothing is deleted)") from None
            raise
    return None


_ZERO_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")


def sharded_world(tag: Path) -> int | None:
    """How many processes saved ``tag``, read from its ZeRO optimizer shards (one per data-parallel rank, ZeRO stage
    1 to 3, named ``[bf16_]zero_pp_rank_<r>_mp_rank_<m>_optim_states.pt``); None for a stage-0 tag, which has none
    (its world is in the client state, read once DeepSpeed has loaded it)."""
    ranks = {int(m.group(1)) for f in tag.iterdir() if (m := _ZERO_SHARD.search(f.name))}
    return max(ranks) + 1 if ranks else None


def _maybe_resume(engine, bank: AnswerBank | None, out: Path, resume: bool, rank: int, world: int) -> int:
    state = out / "ds_state"
    tag = resume_tag(state) if resume else None
    if tag is None:
        return 0
    # only sealed state reaches DeepSpeed's pickle-based loader
    _, client = engine.load_checkpoint(str(state), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    saved_world = client.get("world", world)  # states saved before the world was recorded: unknown, accepted
    if saved_world != world:  # each rank reads its own slice of every global batch: another world reads other pairs
        raise ConfigError(f"{state / tag} was saved by a run of {saved_world} process(es) and this one has {world}: "
                          f"resume it with {saved_world} (torchrun --nproc_per_node={saved_world}), or start a new run")
    # dropout continues exactly where the killed run was, on every rank (states saved before there were per-rank ones:
    # rank 0's, the only one those kept)
    rng = client.get("rng_by_rank", [{"cpu": client["torch_rng"]}] * world)[rank]
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if bank is not None and client.get("answer_bank") is not None:  # the negatives the killed run had collected
        bank.load_state_dict(client["answer_bank"])
    return int(client["step"])


def _train_loop(cfg: PretrainConfig, engine, stream: PretrainStream, start: int, rank: int, world: int,
                metrics: MetricsLog | None, progress: bool, bank: AnswerBank | None, save) -> dict | None:
    device = device_of()
    tc = cfg.train
    bar = Progress(tc.max_steps, "pretrain", "step", enabled=progress and rank == 0 and interactive(), initial=start,
                   lines=False)
    lines = progress and rank == 0 and progress_lines()  # a log file gets step lines (a terminal's bar may show too)
    loop_start = time.perf_counter()
    record = None
    for step in range(start, tc.max_steps):
        tick = time.perf_counter()
        lr = engine.get_lr()[0]  # the rate this step uses (engine.step advances the schedule)
        sums = torch.zeros(6, device=device)  # on the device: NCCL reduces CUDA tensors only
        for micro in range(tc.grad_accum_steps):
            batch = stream.batch(step * tc.grad_accum_steps + micro, tc.batch_size, rank, world).to(device)
            out = engine(batch, cfg.loss, gather=gather_with_grad, normalise=global_mean_loss, rank=rank, answer_bank=bank)
            engine.backward(out.loss)
            engine.step()
            sums += torch.stack([out.loss.detach(), out.loss_contrastive.detach(), out.loss_ntp.detach(),
                                 out.loss_profile.detach(), out.loss_future.detach(),
                                 out.loss_path_free.detach()]).float()
        # Each rank's loss is its share of the global mean scaled by world: their average is the global loss.
        loss, cl, ntp, prof, fut, path_free = (all_reduce_sum(sums) / (world * tc.grad_accum_steps)).tolist()
        if not torch.isfinite(torch.tensor(loss)):
            raise ConfigError(f"loss became {loss} at step {step + 1}; lower train.lr (now {tc.lr:g}) and start the run again "
                              "(overwrite=true), or check the data")
        elapsed = time.perf_counter() - tick
        record = {"step": step + 1, "loss": loss, "loss_contrastive": cl, "loss_ntp": ntp,
                  **({"loss_profile": prof} if cfg.loss.profile_weight > 0 else {}),
                  **({"loss_future": fut} if cfg.loss.future_weight > 0 else {}),
                  **({"loss_path_free": path_free} if cfg.loss.path_free_weight > 0 else {}),
                  "lr": lr, "samples_per_s": tc.batch_size * tc.grad_accum_steps * world / elapsed}
        if device.type == "cuda":  # peak since the start of the run, this rank
            record["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        logged = (step + 1) % tc.log_every == 0 or step == 0 or step + 1 == tc.max_steps
        if metrics is not None and logged:
            metrics.write(record)
        bar.update(1)
        bar.set_postfix(f"loss {loss:.3f} cl {cl:.3f} ntp {ntp:.3f}")
        if logged and lines:
            remaining = (tc.max_steps - step - 1) * (time.perf_counter() - loop_start) / max(step + 1 - start, 1)
            log(f"pretrain: step {step + 1}/{tc.max_steps} loss {loss:.4f} contrastive {cl:.4f} ntp {ntp:.4f} "
                + (f"profile {prof:.4f} " if cfg.loss.profile_weight > 0 else "")
                + (f"future {fut:.4f} " if cfg.loss.future_weight > 0 else "")
                + (f"path-free {path_free:.4f} " if cfg.loss.path_free_weight > 0 else "")
                + f"lr {record['lr']:.3g} {record['samples_per_s']:.1f} samples/s ETA {format_seconds(remaining)}")
        if (step + 1) % tc.save_every == 0 or step + 1 == tc.max_steps:
            save(step + 1)
        failpoint("train-step")
    bar.close()
    return record


def _save(cfg: PretrainConfig, engine, model, tokenizer, meta: ModelMeta, out: Path, step: int, rank: int, world: int,
          bank: AnswerBank | None, notes: dict[str, str]) -> None:
    state = out / "ds_state"
    tag = f"step-{step:07d}"
    # every rank's random state: rank 0 alone writes the client state, and each rank's dropout stream differs
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rng_by_rank = [rng]
    if torch.distributed.is_initialized():
        rng_by_rank = [None] * world
        torch.distributed.all_gather_object(rng_by_rank, rng)
    if rank == 0:
        state.mkdir(parents=True, exist_ok=True)
        mark_saving(state, tag)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the note is down before any rank writes the tag
    engine.save_checkpoint(str(state), tag=tag, client_state={"step": step, "torch_rng": rng["cpu"], "world": world,
                                                              "rng_by_rank": rng_by_rank,
                                                              "answer_bank": None if bank is None else bank.state_dict()})
    failpoint("ds-saved")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's shard of the tag is on disk before it is sealed
    with gathered_parameters(model, cfg.train.zero_stage):
        if rank == 0:
            save_checkpoint(out / "checkpoint", model, tokenizer, cfg, meta,
                            extra_files={"STEP": f"{step}\n", **notes})
    if rank == 0:
        seal_tag(state / tag)
        clear_saving(state, tag)
        # keep this tag and the newest older ones; a tag past this step is an attempt a killed run abandoned (this run
        # resumed from an older one): it would otherwise outlive, and crowd out, the tags this run seals
        tags = sorted(p for p in state.glob("step-*") if p.is_dir())  # names sort by step
        older, newer = [t for t in tags if t.name < tag], [t for t in tags if t.name > tag]
        for old in newer + older[: max(len(older) - (_KEEP_DS_TAGS - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
            clear_saving(state, old.name)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
