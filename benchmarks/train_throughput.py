"""Pretraining throughput and memory per model preset, and the text-encoder work the unique-text cache saves.

Builds a synthetic dataset (``data_tools.synth`` + UserU pairs), then for each preset runs a few real
pretraining steps -- the model, ``PretrainStream`` and DeepSpeed engine are built exactly as
``qanchor.train.pretrain.run_pretrain`` builds them, and each step is the same micro-step as its
``_train_loop`` (forward both towers, ``engine.backward``, ``engine.step``). Every preset runs in its own
process: the RSS high-water mark (``getrusage``) cannot be reset, so a shared process would report the
largest preset's peak for all of them.

Tokens per step are counted where the backbone reads them (a pre-hook on its decoder): the anchor tower's
prefix + suffix + answer tokens plus the semantic tower's answer tokens, real (attention-mask) tokens and
padded positions separately.

Text-encoder accounting: the authors' code runs the event-text BERT over every kept event of every user
at every step; qanchor encodes each unique text once per dataset (``TextVectorCache.encoded_count``) and
only gathers cached rows while training. Both counts are turned into seconds with the measured per-text
time of ``SentenceEncoder`` on this machine (forward only, MiniLM: a lower bound for the paper's
GTE-base with LoRA, whose encoder also runs backward).

Example (about 10 minutes on 2 CPU cores; smollm2 is the slow part)::

    python benchmarks/train_throughput.py --presets tiny,smollm2-135m --steps tiny=20,smollm2-135m=4 \
        --batch-size tiny=16,smollm2-135m=4 --users 300 --out results/bench/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark must never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qanchor.config import PretrainConfig, load_config  # noqa: E402
from qanchor.data.io import write_text  # noqa: E402

PAPER_SAMPLES = 102_400_000  # the paper's pretraining: 50k steps x global batch 2,048


def _rss_mb() -> float:
    """This process's resident-set high-water mark in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _config(preset: str | None, data: Path, steps: int, batch: int, sets: list[str]) -> PretrainConfig:
    base = [f"data.path={data}", f"train.max_steps={steps}", f"train.batch_size={batch}", "train.warmup_steps=1"]
    if preset:
        base.append(f"model.preset={preset}")
    return load_config(None, base + sets, schema=PretrainConfig)


# ------------------------------------------------------------------------------------------- worker
def run_worker(preset: str, data: Path, steps: int, batch: int, warmup: int, sets: list[str]) -> dict:
    """Train ``steps`` steps of ``preset`` in this process and measure them (the first ``warmup`` untimed)."""
    from qanchor.model.factory import build_model
    from qanchor.train.distributed import gather_with_grad, global_mean_loss
    from qanchor.train.engine import device_of, init_distributed, initialize
    from qanchor.train.pairs import PretrainStream
    from qanchor.train.pretrain import answer_cache, fit_input_stats, prepare_inputs

    cfg = _config(preset, data, steps, batch, sets)
    if cfg.train.grad_accum_steps != 1:  # one step = one micro-batch here, so per-step counts stay exact
        raise SystemExit("train_throughput measures train.grad_accum_steps=1 only; raise --batch-size instead")
    rank, world = init_distributed()
    ds, pipe = prepare_inputs(cfg, rank, progress=False)  # the parent already filled the text cache
    encoded_before = pipe.cache.encoded_count
    rss_data = _rss_mb()
    tick = time.perf_counter()
    torch.manual_seed(cfg.train.seed)  # the same set-up sequence as run_pretrain
    model, tokenizer = build_model(cfg.model, ds.manifest, pipe.cache.dim, ds.tabular_columns,
                                   training_aids=cfg.loss)
    fit_input_stats(model, ds, pipe)
    stream = PretrainStream.for_run(ds, pipe, tokenizer, model.token_ids, cfg)
    stream.answer_cache = answer_cache(cfg, ds, rank, False, stream.answers_for_steps(
        cfg.train.max_steps * cfg.train.grad_accum_steps, cfg.train.batch_size * world))
    engine, _ = initialize(model, cfg.train, world)
    build_s = time.perf_counter() - tick
    rss_model = _rss_mb()

    calls: list[tuple[int, int]] = []  # (real tokens, padded positions) per decoder call

    def count(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        calls.append((int(mask.sum()), mask.numel()))

    hook = model.backbone.get_decoder().register_forward_pre_hook(count, with_kwargs=True)
    device = device_of()
    # CUDA runs asynchronously: without a sync each phase's clock would stop at its last launch, not its end.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for step in range(steps):
        calls.clear()
        sync()
        t0 = time.perf_counter()
        b = stream.batch(step, batch, rank, world)
        t1 = time.perf_counter()
        out = engine(b.to(device), cfg.loss, gather=gather_with_grad, normalise=global_mean_loss, rank=rank)
        sync()
        t2 = time.perf_counter()
        engine.backward(out.loss)
        sync()
        t3 = time.perf_counter()
        engine.step()  # gradient clipping + AdamW: on CPU a full pass over 4 fp32 copies of the weights
        sync()
        t4 = time.perf_counter()
        suffix = int(b.queries.lengths.sum()) + len(b.queries.lengths)  # query tokens + <|user_emb|>, soft prompt none
        answer = int(b.answers.lengths.sum()) if cfg.loss.mode != "contrastive" else 0
        anchor_real, anchor_padded = calls[0]
        semantic_real, semantic_padded = calls[1] if len(calls) > 1 else (0, 0)
        rows.append({
            "step": step + 1, "data_s": t1 - t0, "forward_s": t2 - t1, "backward_s": t3 - t2, "optimizer_s": t4 - t3,
            "total_s": t4 - t0,
            "loss": float(out.loss.detach()), "prefix_tokens": anchor_real - suffix - answer, "suffix_tokens": suffix,
            "answer_tokens": answer, "semantic_tokens": semantic_real, "tokens": anchor_real + semantic_real,
            "padded_tokens": anchor_padded + semantic_padded,
            "events": int(sum(int(m.mask.sum()) for m in b.users.modalities.values())),
        })
    hook.remove()
    timed = rows[warmup:] or rows  # the first steps pay one-off allocations and lazy initialisation
    secs = sum(r["total_s"] for r in timed)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in timed]))

    return {
        "preset": preset, "batch_size": batch, "steps": steps, "timed_steps": len(timed), "world": world,
        "torch_threads": torch.get_num_threads(), "zero_stage": cfg.train.zero_stage,
        "gradient_checkpointing": cfg.model.backbone.gradient_checkpointing, "hidden_size": model.hidden_size,
        "params_m": params / 1e6, "trainable_m": trainable / 1e6,
        # fp32 weights + gradients + two AdamW moments: what the optimiser state alone must hold
        "weights_grads_adam_mb": (params * 4 + trainable * 12) / 2**20,
        "build_s": build_s, "s_per_step": secs / len(timed),
        # the median resists a step slowed by other load on a shared machine; the rates use the mean
        "median_s_per_step": float(np.median([r["total_s"] for r in timed])), "samples_per_s": batch * world * len(timed) / secs,
        "tokens_per_s": sum(r["tokens"] for r in timed) / secs,
        "padded_tokens_per_s": sum(r["padded_tokens"] for r in timed) / secs,
        "tokens_per_step": mean("tokens"), "prefix_tokens_per_sample": mean("prefix_tokens") / batch,
        "suffix_tokens_per_sample": mean("suffix_tokens") / batch, "answer_tokens_per_sample": mean("answer_tokens") / batch,
        **{f"share_{k}": sum(r[f"{k}_s"] for r in timed) / secs for k in ("data", "forward", "backward", "optimizer")},
        "rss_after_data_mb": rss_data, "rss_after_build_mb": rss_model, "peak_rss_mb": _rss_mb(),
        "encoded_during_training": pipe.cache.encoded_count - encoded_before,  # 0: training never runs the encoder
        "per_step": rows,
    }


# ---------------------------------------------------------------------------------- text encoder
def text_encoder_savings(data: Path, sets: list[str], plans: dict[str, tuple[int, int]], sample: int, seed: int) -> dict:
    """Encoder passes of the per-event approach vs the unique-text cache, for an epoch and for each run plan."""
    from qanchor.data.dataset import load_dataset
    from qanchor.data.pipeline import UserPipeline
    from qanchor.model.backbone import add_special_tokens, load_tokenizer
    from qanchor.model.layout import TokenIds, special_token_names
    from qanchor.train.pairs import PretrainStream

    cfg = _config(None, data, 1, 2, sets)
    ds = load_dataset(data)
    pipe = UserPipeline.for_dataset(ds, cfg.data)
    encoder, cache, packer = pipe.cache.encoder, pipe.cache, pipe.packer
    tick = time.perf_counter()
    n_events = pipe.prime(ds.users(), progress=False, all_events=True)
    prime_s = time.perf_counter() - tick
    # The stream only decides which pairs a step holds; a tokenizer is needed to build it, not to order pairs.
    tokenizer = load_tokenizer(cfg.model.backbone)
    modalities = [m.name for m in ds.manifest.modalities]
    add_special_tokens(tokenizer, None, special_token_names(modalities))
    stream = PretrainStream(ds, pipe, tokenizer, TokenIds.from_tokenizer(tokenizer, modalities), cfg.model,
                            cfg.train.seed, cfg.train.uqa_fraction)
    records = {r.user_id: r for r in ds.users()}

    def kept(pair: int) -> list[str]:
        seqs = packer.recent(records[stream.user_ids[pair]], int(stream.cutoff_us[pair])).values()
        return [t for s in seqs for t in s.text]

    epoch = stream.epoch_order(0)
    per_pair = np.array([len(kept(int(i))) for i in epoch])
    # Time the encoder on what the per-event approach would feed it: kept event texts, repeats included.
    rng = np.random.default_rng(seed)
    pool = [t for i in rng.choice(epoch, size=min(len(epoch), 64), replace=False) for t in kept(int(i))]
    texts = [pool[i] for i in rng.integers(0, len(pool), size=sample)]
    encoder.encode(texts[: encoder.cfg.batch_size])  # warm-up: first-call allocations
    tick = time.perf_counter()
    encoder.encode(texts)
    per_text_s = (time.perf_counter() - tick) / len(texts)

    unique = cache.encoded_count or len(cache)  # a reused dataset dir found its cache already full
    scopes = {"epoch": (int(per_pair.sum()), len(epoch))}
    for preset, (steps, batch) in plans.items():
        ids = np.concatenate([stream.pair_ids(s, batch) for s in range(steps)])
        scopes[f"{preset}: {steps} steps x {batch}"] = (sum(len(kept(int(i))) for i in ids), len(ids))
    table = {name: {"samples": samples, "paper_encodings": enc, "qanchor_encodings": unique,
                    "ratio": enc / max(unique, 1), "paper_encoder_s": enc * per_text_s,
                    "qanchor_encoder_s": unique * per_text_s, "saved_s": (enc - unique) * per_text_s}
             for name, (enc, samples) in scopes.items()}
    # The per-event side scales with samples seen; the unique-text side depends on the data's vocabulary,
    # unknown at the paper's scale, so only the former is extrapolated (at this dataset's kept events/sample).
    paper_scale = per_pair.mean() * PAPER_SAMPLES
    return {"users": ds.num_users, "events": n_events, "unique_texts": len(cache), "qanchor_encoded": unique,
            "pairs_per_epoch": len(epoch), "mean_kept_events_per_sample": float(per_pair.mean()),
            "encoder": encoder.key.rsplit("-", 1)[0], "encoder_batch_size": encoder.cfg.batch_size,
            "timed_texts": len(texts), "per_text_ms": per_text_s * 1e3, "prime_s": prime_s, "scopes": table,
            "paper_scale_per_event": {"samples": PAPER_SAMPLES, "encodings": float(paper_scale),
                                      "cpu_hours": float(paper_scale * per_text_s / 3600)}}


# ------------------------------------------------------------------------------------------- driver
def _per_preset(spec: str, presets: list[str], flag: str) -> dict[str, int]:
    """'8' -> every preset 8; 'tiny=16,smollm2-135m=4' -> per preset (a bare number sets the rest)."""
    out, default = {}, None
    for item in filter(None, spec.split(",")):
        name, _, value = item.rpartition("=")
        if name:
            out[name] = int(value)
        else:
            default = int(value)
    missing = [p for p in presets if p not in out and default is None]
    if missing:
        raise SystemExit(f"{flag}: no value for {', '.join(missing)} (give N or preset=N,...)")
    return {p: out.get(p, default) for p in presets}


def _spawn_worker(preset: str, data: Path, steps: int, batch: int, args, work: Path) -> dict:
    result, log = work / f"{preset}.json", work / f"{preset}.log"
    cmd = [sys.executable, __file__, "--worker", preset, "--data", str(data), "--steps", str(steps),
           "--batch-size", str(batch), "--warmup", str(args.warmup), "--result", str(result)]
    cmd += [x for s in args.set for x in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    tick = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not result.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return {"preset": preset, "batch_size": batch, "steps": steps, "error": " | ".join(tail)}
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - tick
    return out


def markdown(report: dict) -> str:
    enc = report["text_encoder"]
    lines = ["| preset | params (M) | batch | timed steps | s/step (median) | samples/s | tokens/step | tokens/s | padded tokens/s "
             "| prefix / suffix / answer tokens per sample | data / fwd / bwd / optim | peak RSS (MiB) | per-event encoder would add |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['preset']} | failed: {r['error'][:300]} |" + " |" * 11)
            continue
        events_per_step = np.mean([x["events"] for x in r["per_step"]])
        extra = events_per_step * enc["per_text_ms"] / 1e3  # seconds the per-event encoder would add per step
        lines.append(
            f"| {r['preset']} | {r['params_m']:.1f} | {r['batch_size']} | {r['timed_steps']} "
            f"| {r['s_per_step']:.3f} ({r['median_s_per_step']:.3f}) "
            f"| {r['samples_per_s']:.2f} | {r['tokens_per_step']:.0f} | {r['tokens_per_s']:.0f} | {r['padded_tokens_per_s']:.0f} "
            f"| {r['prefix_tokens_per_sample']:.0f} / {r['suffix_tokens_per_sample']:.1f} / {r['answer_tokens_per_sample']:.1f} "
            f"| {r['share_data']:.0%} / {r['share_forward']:.0%} / {r['share_backward']:.0%} / {r['share_optimizer']:.0%} | {r['peak_rss_mb']:.0f} | +{extra:.2f} s/step ({extra / r['s_per_step']:.0%}) |")
    lines += ["", f"Text encoder ({enc['encoder']}, batch {enc['encoder_batch_size']}): "
              f"{enc['per_text_ms']:.3f} ms/text over {enc['timed_texts']} kept event texts; dataset {enc['users']} users, "
              f"{enc['events']} events, {enc['unique_texts']} unique texts, {enc['pairs_per_epoch']} pairs/epoch, "
              f"{enc['mean_kept_events_per_sample']:.1f} kept events/sample.", "",
              "| scope | samples | per-event encodings (paper) | unique-text encodings (qanchor) | ratio "
              "| paper encoder s | qanchor encoder s | saved s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in enc["scopes"].items():
        lines.append(f"| {name} | {s['samples']:,} | {s['paper_encodings']:,} | {s['qanchor_encodings']:,} | {s['ratio']:,.3g}x "
                     f"| {s['paper_encoder_s']:,.1f} | {s['qanchor_encoder_s']:,.2f} | {s['saved_s']:,.1f} |")
    big = enc["paper_scale_per_event"]
    lines += ["", f"At the paper's {big['samples'] / 1e6:.1f}M pretraining samples the per-event approach would run "
              f"{big['encodings']:.3g} encoder passes: {big['cpu_hours']:,.0f} hours at this machine's rate (forward only)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,smollm2-135m", help="comma-separated model presets (configs/model/)")
    ap.add_argument("--steps", default="tiny=20,smollm2-135m=4", help="steps per preset: N or preset=N,...")
    ap.add_argument("--batch-size", default="tiny=16,smollm2-135m=4", help="per-step batch: N or preset=N,...")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the rates")
    ap.add_argument("--users", type=int, default=300, help="synthetic users to generate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, help="a dataset dir with userU.parquet (default: a synthetic world built in a "
                    "temporary folder)")
    ap.add_argument("--encoder-texts", type=int, default=2048, help="event texts to time the sentence encoder on")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="pretrain config override for every run, e.g. data.default_max_events=24 (repeatable)")
    ap.add_argument("--out", type=Path, help="write the full results (per-step rows included) as JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one preset in this process
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = run_worker(args.worker, args.data, int(args.steps), int(args.batch_size), args.warmup, args.set)
        write_text(json.dumps(res), args.result)
        return 0

    presets = [p for p in args.presets.split(",") if p]
    steps = _per_preset(args.steps, presets, "--steps")
    batches = _per_preset(args.batch_size, presets, "--batch-size")
    load_before = os.getloadavg()[0]
    if load_before > (os.cpu_count() or 1) / 2:  # wall-clock rates on a shared machine: say so up front
        print(f"warning: load average {load_before:.1f} on {os.cpu_count()} CPUs; timings will be slowed", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="qanchor-bench-") as tmp:
        work = Path(tmp)
        data = args.data or work / "synth"
        if args.data is not None and not (data / "userU.parquet").exists():  # never build into a folder the user named
            print(f"error: --data {data} holds no userU.parquet; run `qanchor data userU {data}` first (or leave --data "
                  "out: a synthetic world is built in a temporary folder)", file=sys.stderr)
            return 2
        if not (data / "userU.parquet").exists():
            from data_tools.synth import build_synthetic
            from qanchor.data.userU import build_userU

            print(f"building {args.users} synthetic users in {data}", file=sys.stderr)
            build_synthetic(data, args.users, args.seed)
            build_userU(data, seed=args.seed, progress=False)
        # Fills the dataset's text cache too, so the workers below start with it full (as pretraining does
        # after its one-off priming) and their step times hold no encoding.
        print("text-encoder accounting", file=sys.stderr)
        savings = text_encoder_savings(data, args.set, {p: (steps[p], batches[p]) for p in presets},
                                       args.encoder_texts, args.seed)
        runs = []
        for p in presets:
            print(f"training {p}: {steps[p]} steps x batch {batches[p]}", file=sys.stderr)
            runs.append(_spawn_worker(p, data, steps[p], batches[p], args, work))
    report = {"argv": sys.argv[1:], "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                                "cpus": os.cpu_count(), "torch": torch.__version__,
                                                # 1-min load average: other work on the CPUs inflates every time
                                                "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]},
              "users": args.users, "overrides": args.set, "runs": runs, "text_encoder": savings}
    print(markdown(report))
    print(f"\n1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs.")
    if args.out:
        write_text(json.dumps(report, indent=1), args.out)
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
