"""GPU-only paths: bf16 training under DeepSpeed, flash-attention 2, cached == uncached on CUDA.

Skipped without CUDA (see tests/conftest.py). Run on a GPU node with `pytest -m gpu`.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from qanchor.config import LossConfig, TrainConfig
from qanchor.model.prefix_cache import anchor_hidden, anchor_hidden_uncached, encode_prefixes
from tests.model.helpers import model_and_stream, tiny_cfg

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ds_dir(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "ds"
    shutil.copytree(tiny_dataset, out, ignore=shutil.ignore_patterns(".qanchor_cache"))
    return out


def test_bf16_deepspeed_step_is_finite(ds_dir):
    from qanchor.train.distributed import gather_with_grad, global_mean_loss
    from qanchor.train.engine import init_distributed, initialize

    _, world = init_distributed()
    model, _, stream, *_ = model_and_stream(ds_dir, tiny_cfg(["model.backbone.dtype=bfloat16"]))
    engine, _ = initialize(model.cuda(), TrainConfig(batch_size=4, max_steps=2, warmup_steps=0, precision="bf16"), world)
    for step in range(2):
        out = engine(stream.batch(step, 4).to("cuda"), LossConfig(), gather=gather_with_grad, normalise=global_mean_loss)
        engine.backward(out.loss)
        engine.step()
        assert torch.isfinite(out.loss)


def test_cached_equals_uncached_on_cuda(ds_dir):
    model, tokenizer, stream, ds, pipe, _ = model_and_stream(ds_dir)
    model = model.cuda().eval()
    users = pipe.collate(pipe.pack_many([ds.user(u) for u in ("u001", "u002", "u003")])).to("cuda")
    query = torch.tensor(tokenizer("will this user churn?", add_special_tokens=False)["input_ids"], device="cuda")
    index = torch.tensor([0, 1, 2, 1], device="cuda")
    with torch.no_grad():
        suffixes = [model.suffix(query, None)] * 4
        cached = anchor_hidden(model, encode_prefixes(model, users), index, suffixes)
        full = anchor_hidden_uncached(model, users, index, suffixes)
    assert (cached - full).abs().max() < 1e-3


def test_flash_attention_backbone_builds():
    pytest.importorskip("flash_attn")
    from qanchor.config import BackboneConfig
    from qanchor.model.backbone import build_backbone, resolve_attn_implementation

    cfg = BackboneConfig(dtype="bfloat16", attn_implementation="auto")
    assert resolve_attn_implementation(cfg) == "flash_attention_2"
    model = build_backbone(cfg, vocab_size=1000).cuda()
    out = model(input_ids=torch.randint(0, 1000, (2, 16), device="cuda"))
    assert torch.isfinite(out.logits.float()).all()


def test_prompt_tune_on_cuda_matches_cpu(ds_dir, tmp_path):
    """`qanchor prompt-tune device=cuda`: prefixes, prototypes, calibration and batches all on the GPU; the
    step-0 head scores as on the CPU and the tuned head saves and loads on the host."""
    from qanchor.config import PromptTuneConfig, load_config
    from qanchor.model.factory import ModelMeta, save_checkpoint
    from qanchor.tune.head import ScenarioHead
    from qanchor.tune.prompt_tune import run_prompt_tune

    model, tokenizer, _, ds, packer, cfg = model_and_stream(ds_dir)
    save_checkpoint(tmp_path / "ck", model, tokenizer, cfg,
                    ModelMeta(ds.manifest.to_dict(), packer.cache.dim, {}, list(ds.tabular_columns)))
    records = {}
    for device in ("cpu", "cuda"):
        args = [f"checkpoint={tmp_path / 'ck'}", f"data.path={ds_dir}", f"output_dir={tmp_path / device}", "task=churn",
                f"device={device}", "steps=6", "eval_every=3", "batch_size=8", "prefix_chunk=16"]
        records[device] = run_prompt_tune(load_config(None, args, schema=PromptTuneConfig), progress=False)["tasks"]["churn"]
    assert abs(records["cpu"]["frozen_proto"]["test"]["auc"] - records["cuda"]["frozen_proto"]["test"]["auc"]) < 1e-3
    head = ScenarioHead.load(tmp_path / "cuda" / "churn")
    assert head.prompt.device.type == "cpu" and torch.isfinite(head.prototypes).all()
