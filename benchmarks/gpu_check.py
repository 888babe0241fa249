"""The day a GPU is lent: one short check of the paper-scale path, with numbers, that fails loudly.

1. the ``gpu``-marked tests (bf16 DeepSpeed step, cached == uncached on CUDA, flash-attention build);
2. pretraining of Qwen2.5-0.5B's shape (random weights, the real Qwen2.5 tokenizer, LoRA r64 / a32, ZeRO-2 from
   ``configs/pretrain/qwen2.5-0.5b.yaml``; bf16 + flash-attention 2 when installed) for ``--steps`` steps on a
   synthetic world: samples/s, peak GPU memory, and upper bounds of tokens/s and MFU (model FLOPs utilisation: 6 x
   parameters x tokens per second over the device's peak bf16 FLOP/s) that count every event cap as filled;
3. embedding ``--users`` synthetic users x ``--queries`` queries with the prefix cache: users/s, and the ratio
   of the cached to the uncached time on a sample (the uncached reference re-runs every prefix per query);
   the cached and uncached embeddings must agree within ``--tolerance`` (bf16 on GPU).

Everything lands in one JSON file (``--out``). Any failure or mismatch ends the run with a non-zero exit and
one ``gpu-check FAILED: ...`` line. ``DEVICE=cpu`` (or ``--device cpu``) runs the same path on the CPU with tiny
sizes and the tiny preset, which is how it is tested without a GPU::

    bash benchmarks/gpu_check.sh                         # on a GPU machine: ~5 minutes
    DEVICE=cpu SMALL=1 bash benchmarks/gpu_check.sh      # anywhere: ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qanchor.config import load_run_config  # noqa: E402
from qanchor.data.io import write_text  # noqa: E402
from qanchor.logs import quiet_third_party  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUERIES = ["Will this user stop using the app?", "Will this user redeem a coupon?", "Will this user default?",
           "Will this user buy a fund?", "Will this user travel abroad?", "Will this user overdraw?",
           "Will this user upgrade the card?", "Will this user subscribe to premium?", "Is this user active?",
           "What kind of user is this?"]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


class CheckFailed(Exception):
    pass


def _run(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise CheckFailed(f"{' '.join(cmd[2:5])} exited {done.returncode}: {tail[0][:300]}")
    return done


def gpu_tests(env: dict) -> dict:
    done = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"], env, 900)
    return {"summary": done.stdout.strip().splitlines()[-1]}


def pretrain(work: Path, device: str, small: bool, steps: int, env: dict) -> dict:

    from data_tools.synth import build_synthetic
    from qanchor.data.userU import build_userU

    ds = build_synthetic(work / "ds", n_users=64 if small else 2000, seed=0, progress=False)
    build_userU(ds, progress=False)
    out = work / "run"
    common = [f"data.path={ds}", f"output_dir={out}", f"train.max_steps={steps}", f"train.save_every={steps}",
              "train.log_every=1", "train.warmup_steps=1", "--quiet"]
    if small:  # the CPU check: the tiny preset, short caps; the same engine and code path
        cmd = ["pretrain", "--config", "configs/pretrain/tiny-synth.yaml", "train.batch_size=8", "data.default_max_events=8",
               "data.max_events={}", *common]
    else:
        cmd = ["pretrain", "--config", "configs/pretrain/qwen2.5-0.5b.yaml", "model.backbone.name_or_path=null",
               "model.backbone.tokenizer=qwen2.5", "train.grad_accum_steps=1", "train.batch_size=16", *common]
        if device == "cpu":
            cmd += ["model.backbone.dtype=float32", "train.precision=fp32", "model.backbone.attn_implementation=sdpa"]
    start = time.perf_counter()
    _run([sys.executable, "-m", "qanchor.cli", *cmd], env, 1800)
    seconds = time.perf_counter() - start
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = metrics[1:] or metrics  # the first step pays for warm-up
    sps = sum(m["samples_per_s"] for m in timed) / len(timed)
    with open(out / "checkpoint" / "backbone_config.json") as fh:
        n_params = _param_count(json.load(fh))
    run_cfg = load_run_config(out / "checkpoint" / "config.yaml")
    # Upper bounds: every event cap filled. A synthetic user keeps about a tenth of the caps' 660 events, so the real
    # token rate is several times lower (benchmarks/train_throughput.py counts the tokens the backbone reads).
    tokens_per_sample = _tokens_per_sample(run_cfg)
    tps = sps * tokens_per_sample
    peak = _peak_flops(device)
    result = {"steps": steps, "seconds": round(seconds, 1), "samples_per_s": round(sps, 2),
              "tokens_per_s_upper_bound": round(tps), "tokens_per_sample_upper_bound": tokens_per_sample,
              "backbone_parameters": n_params, "final_loss": metrics[-1]["loss"],
              "peak_gpu_memory_gb": None, "mfu_upper_bound": None}
    if peak:
        result["mfu_upper_bound"] = round(6 * n_params * tps / peak, 4)
    if not all(isinstance(m["loss"], float) and m["loss"] == m["loss"] for m in metrics):
        raise CheckFailed("pretraining loss is not finite")
    if any("gpu_memory_gb" in m for m in metrics):
        result["peak_gpu_memory_gb"] = max(m.get("gpu_memory_gb", 0.0) for m in metrics)
    result["checkpoint"] = str(out)
    return result


def _param_count(cfg: dict) -> int:
    h, layers, inter, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter
    return per_layer * layers + vocab * h


def _tokens_per_sample(cfg) -> int:
    caps = sum(cfg.data.max_events.values()) if cfg.data.max_events else 5 * cfg.data.default_max_events
    return caps + 30 + cfg.model.max_query_tokens // 2 + 2 * cfg.model.max_answer_tokens // 2  # prefix + suffix + 2 towers


def _peak_flops(device: str) -> float | None:
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return tflops * 1e12 if tflops else None


def compare(cached, uncached, tolerance: float) -> float:
    """Max |cached - uncached|; CheckFailed beyond ``tolerance``."""
    import numpy as np

    diff = float(np.abs(cached - uncached).max())
    if not diff <= tolerance:
        raise CheckFailed(f"cached vs uncached embeddings differ by {diff:.2e} > tolerance {tolerance:.0e}")
    return diff


def embed(checkpoint: str, device: str, users: int, queries: int, tolerance: float, work: Path) -> dict:
    import torch

    from data_tools.synth import build_synthetic
    from qanchor.data.dataset import load_dataset
    from qanchor.infer.api import QAnchor

    ds = load_dataset(build_synthetic(work / "embed_ds", n_users=users, seed=1, progress=False))
    qa = QAnchor.from_pretrained(checkpoint, device=device, text_cache_dir=ds.text_cache_dir, batch_size=64)
    qa.pipeline.prime(ds.users(), all_events=False)  # texts encoded before the clock starts
    qs = QUERIES[:queries]
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    done = sum(len(ids) for ids, _ in qa.iter_embed(ds, [(q, None) for q in qs]))
    cached_s = time.perf_counter() - start
    sample = [r for _, r in zip(range(min(64, users)), ds.users())]
    t0 = time.perf_counter()
    a = qa.embed(sample, qs)
    t1 = time.perf_counter()
    b = qa.embed(sample, qs, use_cache=False)
    t2 = time.perf_counter()
    diff = compare(a, b, tolerance)
    return {"users": done, "queries": len(qs), "users_per_s": round(done / cached_s, 1),
            "cached_over_uncached_time": round((t1 - t0) / (t2 - t1), 3), "max_abs_diff_cached_uncached": diff,
            "tolerance": tolerance}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=os.environ.get("DEVICE", "cuda"))
    ap.add_argument("--small", action="store_true", default=os.environ.get("SMALL", "0").lower() not in ("", "0", "false", "no"),
                    help="tiny preset, tiny sizes (SMALL=1)")
    ap.add_argument("--steps", type=int, default=int(os.environ.get("STEPS", 20)))
    ap.add_argument("--users", type=int, default=int(os.environ.get("USERS", 10_000)))
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--tolerance", type=float, default=None, help="cached vs uncached (default 2e-2 bf16, 1e-4 fp32)")
    # GPU_CHECK_OUT, not OUT: a generic name a job environment may already hold (a folder, on the lent GPU machines)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT", "results/gpu_check.json")),
                    help="the report (a folder: gpu_check.json inside it)")
    args = ap.parse_args(argv)
    if args.out.is_dir():
        args.out = args.out / "gpu_check.json"
    quiet_third_party()
    # The commands it runs are worlds of their own: no rank variables of a process that started this one.
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                               "MASTER_PORT")}, "HF_HUB_OFFLINE": "1"}
    report: dict = {"device": args.device, "small": args.small}
    try:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            raise CheckFailed("DEVICE=cuda but torch sees no GPU; run with DEVICE=cpu SMALL=1 to check the path on CPU")
        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        if args.device == "cuda":
            report["gpu_tests"] = gpu_tests(env)
        with tempfile.TemporaryDirectory(prefix="qanchor-gpu-check-") as tmp:
            work = Path(tmp)
            report["pretrain"] = pretrain(work, args.device, args.small, args.steps, env)
            bf16 = args.device == "cuda" and not args.small
            tolerance = args.tolerance if args.tolerance is not None else (2e-2 if bf16 else 1e-4)
            report["embed"] = embed(report["pretrain"]["checkpoint"], args.device, args.users, args.queries, tolerance,
                                    work)
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        report["failed"] = str(exc)
        _write(args.out, report)
        print(f"gpu-check FAILED: {exc}", file=sys.stderr)
        return 1
    _write(args.out, report)
    p, e = report["pretrain"], report["embed"]
    print(f"gpu-check ok ({report['gpu'] or args.device}): pretrain {p['samples_per_s']} samples/s, at most "
          f"{p['tokens_per_s_upper_bound']} tokens/s, peak GPU memory {p['peak_gpu_memory_gb']} GB, MFU at most "
          f"{p['mfu_upper_bound']}; embed {e['users']} users x "
          f"{e['queries']} queries at {e['users_per_s']} users/s, cached / uncached time {e['cached_over_uncached_time']}, "
          f"max |cached - uncached| {e['max_abs_diff_cached_uncached']:.1e}; report {args.out}")
    return 0


def _write(path: Path, report: dict) -> None:
    write_text(json.dumps(report, indent=1, default=str), path)


if __name__ == "__main__":
    sys.exit(main())
