"""Run under torchrun (1 or 2 processes): one DeepSpeed step of the tiny model on a global batch of 4.

Writes the global loss and every averaged gradient to ``<out>.<mode>`` (safetensors) from rank 0, for two modes
in one process (each launch costs seconds): ``plain`` (the backbone answer tower) and ``bank`` (the text answer
tower with an answer bank holding an earlier global batch, the profile loss on the uqa pairs only and the future
loss on the pairs with a complete window: row-masked means that each rank holds a different share of).
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from qanchor.config import DataConfig, LossConfig, ModelConfig, TrainConfig, load_config
from qanchor.data.dataset import load_dataset
from qanchor.data.pipeline import UserPipeline
from qanchor.model.factory import build_model
from qanchor.model.qanchor_model import AnswerBank
from qanchor.train.distributed import all_reduce_sum, gather_with_grad, global_mean_loss
from qanchor.train.engine import init_distributed, initialize
from qanchor.train.pairs import PretrainStream


def main(dataset_dir: str, out: str) -> None:
    rank, world = init_distributed()
    ds = load_dataset(dataset_dir)
    pipe = UserPipeline.for_dataset(ds, DataConfig(default_max_events=8))
    for mode in ("plain", "bank"):
        one_step(ds, pipe, rank, world, mode, f"{out}.{mode}")


def one_step(ds, pipe: UserPipeline, rank: int, world: int, mode: str, out: str) -> None:
    tower = ["answer_tower=text_encoder"] if mode == "bank" else []
    model_cfg: ModelConfig = load_config("configs/model/tiny.yaml", ["user_encoder.dropout=0.0", *tower])
    torch.manual_seed(0)
    model, tokenizer = build_model(model_cfg, ds.manifest, pipe.cache.dim, ds.tabular_columns,
                                   training_aids=LossConfig(profile_weight=1.0, future_weight=1.0) if mode == "bank" else None)
    model.eval()  # no dropout anywhere: the two runs must see the same function
    stream = PretrainStream(ds, pipe, tokenizer, model.token_ids, model_cfg, seed=0,
                            answer_cache=pipe.cache if mode == "bank" else None,
                            profile_sources=["uqa"] if mode == "bank" else None, future_days=20 if mode == "bank" else None)
    per_rank = 4 // world
    engine, _ = initialize(model, TrainConfig(batch_size=per_rank, max_steps=1, warmup_steps=0), world)
    batch = stream.batch(0, per_rank, rank, world)
    bank = None
    if mode == "bank":  # every rank holds the same bank: an earlier global batch, as training leaves it
        earlier = stream.batch(1, 4, 0, 1)
        bank = AnswerBank(8)
        bank.push(earlier.answer_vec, earlier.answer_hash)
    loss_cfg = (LossConfig(profile_weight=2.0, profile_sources=["uqa"], future_weight=1.5, future_days=20) if mode == "bank"
                else LossConfig())
    output = engine(batch, loss_cfg, gather=gather_with_grad, normalise=global_mean_loss, rank=rank,
                    answer_bank=bank)
    engine.backward(output.loss)
    terms = [output.loss, output.loss_contrastive, output.loss_ntp, output.loss_profile, output.loss_future]
    losses = all_reduce_sum(torch.stack(terms).detach()) / world
    if rank == 0:
        grads = {f"grad.{n}": p.grad.detach().clone().contiguous() for n, p in model.named_parameters() if p.grad is not None}
        extra = {}
        if mode == "bank":  # which rows of the global batch the masked losses read (the test checks they are mixed)
            whole = stream.batch(0, 4, 0, 1)
            extra = {"profile_rows": whole.profile_rows.to(torch.uint8), "future_rows": whole.future_rows.to(torch.uint8)}
        save_file({"losses": losses.contiguous(), **grads, **extra}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
