"""``qanchor pretrain``: contrastive + next-token pretraining on UserU pairs under DeepSpeed.

Output directory::

    metrics.jsonl     one JSON line per logged step: step, loss, loss_contrastive, loss_ntp, lr, samples_per_s
    checkpoint/       the latest model checkpoint (safetensors; see qanchor.model.factory), replaced atomically
    ds_state/         DeepSpeed's own state (optimizer, scheduler, step, RNG) for ``resume=true``

Example:
    $ qanchor pretrain --config configs/pretrain/tiny-synth.yaml data.path=data/synth output_dir=runs/synth
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qanchor.config import PretrainConfig, load_config
from qanchor.data.dataset import Dataset, load_dataset
from qanchor.data.io import write_text
from qanchor.data.packing import tabular_stats
from qanchor.data.pipeline import UserPipeline
from qanchor.errors import ConfigError
from qanchor.model.factory import ModelMeta, build_model, save_checkpoint
from qanchor.train.distributed import all_reduce_sum, gather_with_grad, global_mean_loss
from qanchor.train.engine import device_of, gathered_parameters, init_distributed, initialize
from qanchor.train.pairs import PretrainStream

__all__ = ["run_pretrain", "prepare_inputs", "MetricsLog"]

_KEEP_DS_TAGS = 2


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the resumed step are dropped (they will be redone)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            write_text("".join(line + "\n" for line in kept), path)
        elif path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def prepare_inputs(cfg: PretrainConfig, rank: int, progress: bool = True) -> tuple[Dataset, UserPipeline]:
    """Open the dataset and fill the text-vector cache (rank 0 first; the others then read its shards)."""
    if not cfg.data.path:
        raise ConfigError("data.path is empty; pass data.path=<dataset dir>")
    barrier = torch.distributed.barrier if torch.distributed.is_initialized() else (lambda: None)
    if rank == 0:
        ds = load_dataset(cfg.data.path, cfg.data.cache_dir)
        _ = ds.partitions  # built once, by rank 0
        pipe = UserPipeline.for_dataset(ds, cfg.data)
        pipe.prime(ds.users(), progress=progress, all_events=True)
    barrier()
    if rank != 0:
        ds = load_dataset(cfg.data.path, cfg.data.cache_dir)
        pipe = UserPipeline.for_dataset(ds, cfg.data)
    return ds, pipe


def _check_output_dir(out: Path, resume: bool) -> None:
    if not resume and (out / "metrics.jsonl").exists():
        raise ConfigError(f"output_dir {out} already holds a run; pass resume=true to continue it, or choose another output_dir")


def run_pretrain(config_path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), progress: bool = True) -> Path:
    """Pretrain from a config file plus ``key=value`` overrides; return the output directory."""
    cfg = load_config(config_path, list(overrides), schema=PretrainConfig)
    out = Path(cfg.output_dir)
    _check_output_dir(out, cfg.resume)
    rank, world = init_distributed()
    ds, pipe = prepare_inputs(cfg, rank, progress and rank == 0)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model, tokenizer = build_model(cfg.model, ds.manifest, pipe.cache.dim, ds.tabular_columns)
    if model.user_encoder.tabular is not None:
        mean, std = tabular_stats(ds.users(), len(ds.tabular_columns))
        model.user_encoder.tabular.set_stats(torch.from_numpy(mean), torch.from_numpy(std))
    meta = ModelMeta(ds.manifest.to_dict(), pipe.cache.dim, cfg.data.text_encoder.__dict__, list(ds.tabular_columns))
    stream = PretrainStream(ds, pipe, tokenizer, model.token_ids, cfg.model, cfg.train.seed, cfg.train.uqa_fraction)
    engine, _ = initialize(model, cfg.train, world)
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # dropout streams differ per rank
    start = _maybe_resume(engine, out, cfg.resume)
    metrics = MetricsLog(out / "metrics.jsonl", start if cfg.resume else None) if rank == 0 else None
    out.mkdir(parents=True, exist_ok=True)
    _train_loop(cfg, engine, stream, start, rank, world, metrics, progress,
                save=lambda step: _save(cfg, engine, model, tokenizer, meta, out, step, rank))
    return out


def _maybe_resume(engine, out: Path, resume: bool) -> int:
    state = out / "ds_state"
    if not resume or not (state / "latest").exists():
        return 0
    _, client = engine.load_checkpoint(str(state), load_optimizer_states=True, load_lr_scheduler_states=True)
    torch.set_rng_state(client["torch_rng"])  # dropout continues exactly where the killed run was
    return int(client["step"])


def _train_loop(cfg: PretrainConfig, engine, stream: PretrainStream, start: int, rank: int, world: int,
                metrics: MetricsLog | None, progress: bool, save) -> None:
    device = device_of()
    tc = cfg.train
    bar = tqdm(total=tc.max_steps, initial=start, desc="pretrain", disable=not (progress and rank == 0) or None, unit="step")
    for step in range(start, tc.max_steps):
        tick = time.perf_counter()
        sums = torch.zeros(3)
        for micro in range(tc.grad_accum_steps):
            batch = stream.batch(step * tc.grad_accum_steps + micro, tc.batch_size, rank, world).to(device)
            out = engine(batch, cfg.loss, gather=gather_with_grad, normalise=global_mean_loss, rank=rank)
            engine.backward(out.loss)
            engine.step()
            sums += torch.stack([out.loss.detach(), out.loss_contrastive.detach(), out.loss_ntp.detach()]).float().cpu()
        # Each rank's loss is its share of the global mean scaled by world: their average is the global loss.
        loss, cl, ntp = (all_reduce_sum(sums) / (world * tc.grad_accum_steps)).tolist()
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower train.lr or check the data")
        elapsed = time.perf_counter() - tick
        record = {"step": step + 1, "loss": loss, "loss_contrastive": cl, "loss_ntp": ntp,
                  "lr": engine.get_lr()[0], "samples_per_s": tc.batch_size * tc.grad_accum_steps * world / elapsed}
        if metrics is not None and ((step + 1) % tc.log_every == 0 or step == start or step + 1 == tc.max_steps):
            metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", cl=f"{cl:.3f}", ntp=f"{ntp:.3f}")
        if (step + 1) % tc.save_every == 0 or step + 1 == tc.max_steps:
            save(step + 1)
    bar.close()


def _save(cfg: PretrainConfig, engine, model, tokenizer, meta: ModelMeta, out: Path, step: int, rank: int) -> None:
    state = out / "ds_state"
    engine.save_checkpoint(str(state), tag=f"step-{step:07d}", client_state={"step": step, "torch_rng": torch.get_rng_state()})
    with gathered_parameters(model, cfg.train.zero_stage):
        if rank == 0:
            save_checkpoint(out / "checkpoint", model, tokenizer, cfg, meta, extra_files={"STEP": f"{step}\n"})
    if rank == 0:
        tags = sorted(p for p in state.glob("step-*") if p.is_dir())
        for old in tags[:-_KEEP_DS_TAGS]:
            shutil.rmtree(old, ignore_errors=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
