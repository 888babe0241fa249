"""The paper's setting takes real steps on CPU: Qwen2.5-0.5B's shape (random weights), the real Qwen2.5 tokenizer,
LoRA r64 / a32 and DeepSpeed ZeRO-2 from ``configs/pretrain/qwen2.5-0.5b.yaml``, fp32 and no flash-attention.

Only sequence caps, batch and step counts are shortened here (on the command line, not in the config): two
pretraining steps on a few synthetic users, then the checkpoint reloads through ``QAnchor.from_pretrained`` and
embeds with the prefix cache exactly as without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from data_tools.synth import build_synthetic
from qanchor.data.dataset import load_dataset
from qanchor.data.userU import build_userU
from qanchor.infer.api import QAnchor

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_qwen25_05b_shape_pretrains_two_steps_and_serves(tmp_path):
    ds = build_synthetic(tmp_path / "ds", n_users=24, seed=0, progress=False)
    build_userU(ds, progress=False)
    out = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
           "HF_HUB_OFFLINE": "1", "QANCHOR_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "qanchor.cli", "pretrain", "--config", "configs/pretrain/qwen2.5-0.5b.yaml",
           f"data.path={ds}", f"output_dir={out}", "model.backbone.name_or_path=null", "model.backbone.tokenizer=qwen2.5",
           "model.backbone.dtype=float32", "model.backbone.attn_implementation=sdpa", "train.precision=fp32",
           "data.max_events={}", "data.default_max_events=3", "model.max_answer_tokens=24", "model.max_query_tokens=24",
           "train.batch_size=2", "train.grad_accum_steps=1", "train.max_steps=2", "train.warmup_steps=1",
           "train.save_every=2", "train.log_every=1", "model.user_encoder.tabular_tokens=2"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ZeRO-2" in done.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) and m["loss_ntp"] > 0 for m in metrics)
    cfg = json.loads((out / "checkpoint" / "backbone_config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"]) == (896, 24, 14, 2, 4864)
    with safe_open(out / "checkpoint" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    qa = QAnchor.from_pretrained(out, text_cache_dir=ds / ".qanchor_cache" / "text")
    trainable = {n for n, p in qa.model.backbone.named_parameters() if p.requires_grad}
    # LoRA adapters and the added special-token rows (peft's trainable_token_indices) are all the backbone trains
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable), sorted(trainable)[:5]
    assert any("trainable_tokens" in n for n in trainable) and len(qa.tokenizer) >= 151665 + 5
    users = [r for _, r in zip(range(3), load_dataset(ds).users())]
    queries = ["Will this user stop using the app?", "Will this user redeem a coupon?"]
    cached, plain = qa.embed(users, queries), qa.embed(users, queries, use_cache=False)
    assert cached.shape == (len(users), 2, 128) and np.abs(cached - plain).max() < 1e-4

