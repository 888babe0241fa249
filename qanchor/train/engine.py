"""DeepSpeed in every setting: the same code path on a laptop CPU and on GPU clusters.

The only module that imports ``deepspeed``. On a machine without CUDA it selects DeepSpeed's CPU
accelerator with the gloo backend; under ``deepspeed`` / ``torchrun`` launchers it reads the rank from
the environment; started as a plain process it acts as a world of one.
"""

from __future__ import annotations

import atexit
import json
import math
import os
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from qanchor.config import TrainConfig, require_file
from qanchor.errors import ConfigError

__all__ = ["init_distributed", "deepspeed_config", "lr_lambda", "initialize", "device_of", "gathered_parameters"]


def init_distributed(timeout_minutes: float = 120.0) -> tuple[int, int]:
    """Initialise torch.distributed (nccl on CUDA, gloo on CPU) and DeepSpeed's view of it; return (rank, world).
    ``timeout_minutes``: how long a collective (a barrier while rank 0 prepares the data) may wait."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported
    import deepspeed

    # A plain `python` / `qanchor` process: a world of one. Launchers (torchrun, deepspeed) set RANK and WORLD_SIZE; a
    # job script may export MASTER_ADDR alone, which does not make a run distributed.
    world_size = os.environ.get("WORLD_SIZE", "1")
    alone = world_size == "1" and os.environ.get("RANK", "0") == "0"
    if not alone and "RANK" not in os.environ:
        raise ConfigError(f"WORLD_SIZE={world_size} but RANK is not set: start a multi-process run with a launcher "
                          "(torchrun, deepspeed) that sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process")
    if alone:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    if not cuda:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (used only for inference all-reduce,
        # never by gloo training) under a file lock in ~/.cache/torch_extensions. A process killed mid-compile
        # (a preempted job, Ctrl-C) leaves that lock behind and every later run then waits on it forever.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    device = device_of() if cuda else None  # after LOCAL_RANK is set for a world of one
    if device is not None:
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        if alone:
            # A world of one needs no rendezvous at all: an in-process store cannot collide with another job the
            # way a "free" TCP port picked before binding can (two jobs starting together once got the same port),
            # and unlike a file store it leaves nothing behind in /tmp when the process is killed.
            where = {"store": torch.distributed.HashStore(), "rank": 0, "world_size": 1}
        else:
            where = {"init_method": "env://"}  # the launcher's MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE
        # device_id binds NCCL to this rank's GPU up front; without it every barrier warns that it guesses the device.
        torch.distributed.init_process_group("nccl" if cuda else "gloo", device_id=device,
                                             timeout=timedelta(minutes=timeout_minutes), **where)
        atexit.register(_destroy_process_group)  # NCCL warns at exit about a group nobody destroyed
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device_of() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")


# DeepSpeed's batch-shape keys and the train settings they come from
_BATCH_SHAPE = {"train_micro_batch_size_per_gpu": "train.batch_size",
                "gradient_accumulation_steps": "train.grad_accum_steps",
                "train_batch_size": "train.batch_size x train.grad_accum_steps x world size"}


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, nested objects key by key; ``"auto"`` at any depth keeps the value
    derived from the train section (or leaves the key out where there is none)."""
    out = dict(base)
    for key, value in overrides.items():
        if value == "auto":
            continue
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else (
            _without_auto(value) if isinstance(value, dict) else value)
    return out


def _without_auto(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_auto(v) if isinstance(v, dict) else v for k, v in tree.items() if v != "auto"}


def deepspeed_config(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """DeepSpeed's JSON config from the train section; a ``deepspeed_config`` file's keys win."""
    if cfg.precision == "bf16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=bf16 needs CUDA; use train.precision=fp32 on CPU")
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.batch_size * cfg.grad_accum_steps * world,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        # torch's AdamW on every device: DeepSpeed's FusedAdam is JIT-built with nvcc at the first step, which a
        # runtime-only CUDA image lacks, and on an H200 image (TORCH_CUDA_ARCH_LIST with "9.0a") DeepSpeed 0.19
        # failed to parse the architectures before building anything. A deepspeed_config file can still ask for it.
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps,
                                                   "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10**9,  # qanchor logs its own metrics
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed_config:
        require_file(cfg.deepspeed_config, "train.deepspeed_config")
        path = Path(cfg.deepspeed_config)
        try:
            overrides = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"train.deepspeed_config {path}: not valid JSON ({exc}); fix the file") from None
        if not isinstance(overrides, dict):
            raise ConfigError(f"train.deepspeed_config {path}: must hold a JSON object of DeepSpeed settings, got "
                              f"{type(overrides).__name__}")
        if "scheduler" in overrides:  # qanchor passes its own schedule, which DeepSpeed prefers: the file's would be dropped
            raise ConfigError(f"train.deepspeed_config {path}: a \"scheduler\" section would be ignored (qanchor steps the "
                              "learning rate itself); remove it and set train.schedule (cosine or constant), "
                              "train.warmup_steps and train.lr instead")
        for key, option in _BATCH_SHAPE.items():  # the training loop counts steps and micro-batches by the train section
            value = overrides.get(key, "auto")
            if value != "auto" and value != ds[key]:
                raise ConfigError(f"train.deepspeed_config {path}: {key}={value!r}, and the train section gives "
                                  f"{ds[key]} ({option}); qanchor's loop steps by the train section, so a different "
                                  f"value would change how many optimizer steps a run takes. Set {option} instead and "
                                  f'write "{key}": "auto" (or leave it out)')
        for name in ("optimizer", "zero_optimization", "bf16", "fp16"):  # each read as a section below
            if name in overrides and overrides[name] != "auto" and not isinstance(overrides[name], dict):  # "auto": ours
                raise ConfigError(f"train.deepspeed_config {path}: \"{name}\" must be a JSON object of settings, got "
                                  f"{json.dumps(overrides[name])}")
        optimizer = overrides.get("optimizer")
        if optimizer is not None and not isinstance(optimizer.get("params", {}), dict):
            raise ConfigError(f"train.deepspeed_config {path}: \"optimizer\".\"params\" must be a JSON object of "
                              f"settings, got {json.dumps(optimizer['params'])}")
        # DeepSpeed reads the type case-blind; Adam and AdamW (torch's or its FusedAdam, by torch_adam) take the train
        # section's betas, eps and weight decay as every record of the run says them
        adam = str((optimizer or {}).get("type", "AdamW")).lower() in ("adam", "adamw")
        if optimizer is not None and not adam:
            # Another optimizer (Lamb, OneBitAdam...) takes the file's params as given, with the train section's lr and
            # weight decay where the file names none: AdamW's own settings (torch_adam, betas, eps) would be keywords
            # it does not take. "auto" still reads the train section.
            ours, given = ds["optimizer"]["params"], optimizer.get("params", {})
            params = {k: ours[k] for k in ("lr", "weight_decay") if k not in given}
            params.update({k: ours[k] for k, v in given.items() if v == "auto" and k in ours})
            params.update(_without_auto(given))
            overrides = {**overrides, "optimizer": {**optimizer, "params": params}}
            ds = {**ds, "optimizer": {"type": ds["optimizer"]["type"]}}
        ds = _merged(ds, overrides)
        # the start line, metrics' lr column and the saved config.yaml (which a resume is checked against) say the train
        # section's values: a file that sets others would train with a rate and a clip no record of the run shows
        given_params = ds.get("optimizer", {}).get("params", {})
        used = [("optimizer.params.lr", "train.lr", cfg.lr, given_params.get("lr", cfg.lr)),
                ("gradient_clipping", "train.grad_clip", cfg.grad_clip, ds.get("gradient_clipping", cfg.grad_clip)),
                ("optimizer.params.weight_decay", "train.weight_decay", cfg.weight_decay,
                 given_params.get("weight_decay", cfg.weight_decay))]
        if adam:  # (another optimizer's betas and eps are its own: no train setting describes them)
            used += [("optimizer.params.betas", "train.betas", list(cfg.betas), given_params.get("betas", list(cfg.betas))),
                     ("optimizer.params.eps", "train.eps", cfg.eps, given_params.get("eps", cfg.eps))]
        for key, option, ours, value in used:
            if value != ours:
                shown = json.dumps(value) if isinstance(value, list) else value
                raise ConfigError(f"train.deepspeed_config {path}: {key}={value!r}, and {option} is {ours}; the run's "
                                  f"records (start line, config.yaml) would say {ours}. Set {option}={shown} instead and "
                                  f'write "{key.split(".")[-1]}": "auto" (or leave it out)')
        # the precision likewise: the file's bf16 section won over train.precision, past the CUDA check, and every record
        # said fp32; fp16 (not a qanchor precision) failed after setup in DeepSpeed
        half = {name: section.get("enabled") if isinstance(section := ds.get(name) or {}, dict) else section
                for name in ("bf16", "fp16", "torch_autocast", "amp")}
        for name in ("fp16", "torch_autocast", "amp"):  # other ways DeepSpeed trains in half precision
            if half[name] not in (None, False, "auto"):
                raise ConfigError(f"train.deepspeed_config {path}: {name} is enabled, which qanchor does not train with "
                                  f"(its records would say {cfg.precision}); remove the \"{name}\" section and use "
                                  "train.precision=bf16 (on CUDA) or fp32")
        if half["bf16"] not in (None, "auto") and bool(half["bf16"]) != (cfg.precision == "bf16"):
            raise ConfigError(f"train.deepspeed_config {path}: bf16.enabled={half['bf16']!r}, and train.precision is "
                              f"{cfg.precision}; the run's records would say {cfg.precision}. Set train.precision="
                              f"{'bf16' if half['bf16'] else 'fp32'} instead and write \"enabled\": \"auto\" (or leave it out)")
        stage = ds.get("zero_optimization", {}).get("stage", cfg.zero_stage)
        if isinstance(stage, str) and stage.strip().isdigit():  # "2": DeepSpeed's own config reads it as the number
            stage = int(stage)
        if stage != cfg.zero_stage:  # qanchor gathers ZeRO-3's partitioned weights to save them by train.zero_stage
            raise ConfigError(f"train.deepspeed_config {cfg.deepspeed_config} asks for ZeRO stage {stage} and "
                              f"train.zero_stage is {cfg.zero_stage}; set train.zero_stage={stage} (or \"stage\": \"auto\")")
    return ds


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then cosine decay to 10% of the peak (or constant)."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(cfg.warmup_steps, 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def initialize(model: torch.nn.Module, cfg: TrainConfig, world: int):
    """Wrap ``model`` in a DeepSpeed engine with AdamW and the warm-up/cosine schedule."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=deepspeed_config(cfg, world),
                                                   lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    return engine, optimizer


def gathered_parameters(model: torch.nn.Module, zero_stage: int):
    """Context in which every parameter is whole on every rank (only ZeRO-3 partitions weights)."""
    if zero_stage < 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
