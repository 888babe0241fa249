"""A quality claim is a mean over pretraining seeds: pretrain a recipe under several seeds, bench each one.

For each seed: ``qanchor pretrain`` (resumed if a run already exists) into ``<root>/seed<k>``, then
``qanchor bench`` (every method on the same users and folds, seed-independent) into
``<root>/bench-seed<k>``. The summary gives, per method, the mean and the standard deviation over seeds of
its task-averaged AUC and KS, plus the per-task means; it is printed as a Markdown table and written to
``<root>/summary.json`` and ``<root>/summary.md``. Peers do not depend on the pretraining seed, so their
spread is 0: it is the model's run-to-run noise that the seeds measure. The spread is the population standard
deviation over the seeds (numpy's default, ddof=0; the sample one is 1.22x larger for three seeds), as in every
"± over seeds" the README and docs/quality.md quote.

A finished seed (its ``probe.json`` or ``results.json``) is reused, so an interrupted root resumes; beside it a
``.settings.json`` records what produced it (the pretrain and bench config files' contents, ``--set``,
``--bench-set``, ``--generic-query``, the dataset's identity, the seed), and a root whose results came from other
settings is refused rather than mixed into the summary.

Example (about 25 minutes on 2 CPU cores for Complete Journey)::

    python benchmarks/quality_seeds.py --pretrain configs/pretrain/tiny-cj.yaml --bench configs/bench/tiny-cj.yaml \\
        --data data/completejourney --seeds 0,1,2 --root results/seeds/cj
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qanchor.config import BenchConfig, load_config  # noqa: E402
from qanchor.data.dataset import load_dataset  # noqa: E402
from qanchor.data.io import file_sha256, write_json, write_text  # noqa: E402
from qanchor.logs import format_seconds, log  # noqa: E402
from qanchor.train.pretrain import legacy_trained_data_id, trained_data_id  # noqa: E402


def _checked(cmd: list[str], name: str, **kwargs) -> None:
    """Run ``cmd`` in the repository root; a failure ends this script with one ``error:`` line (SystemExit) naming
    ``name``: the child said why on stderr (its one error line), so no traceback of this script on top."""
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)
    if done.returncode:
        raise SystemExit(f"error: `{name}` failed (exit code {done.returncode}); its message is above")


def _qanchor(*args: str) -> None:
    _checked([sys.executable, "-m", "qanchor.cli", *args], f"qanchor {args[0]}")


def _probe(*args: str, **kwargs) -> None:
    """``benchmarks/quality_probe.py`` with ``args``, checked as :func:`_qanchor` checks a command."""
    _checked([sys.executable, str(ROOT / "benchmarks/quality_probe.py"), *args], "quality_probe.py", **kwargs)


def absolute_paths(args: argparse.Namespace, *names: str) -> argparse.Namespace:
    """``args`` with each named path argument (a str or Path, a list of them, or None) made absolute against the
    caller's working directory, keeping its type. The scripts read these paths here but run ``qanchor`` in the
    repository root (``cwd=ROOT``), where a relative path names another file: a config not found, or runs written
    under the repository's ``results/``. Not resolved through symlinks: a dataset's folder name labels the results."""
    def absolute(value):
        if value is None:
            return None
        if isinstance(value, list):
            return [absolute(v) for v in value]
        return type(value)(os.path.abspath(value))

    return argparse.Namespace(**{**vars(args), **{name: absolute(getattr(args, name)) for name in names}})


def summarise(results: list[dict]) -> dict:
    """Per method: mean / std over seeds of the task-averaged AUC and KS, and per-task AUC means."""
    methods = list(dict.fromkeys(m for r in results for m in r["average"]))
    out = {}
    for m in methods:
        rows = [r["average"][m] for r in results if m in r["average"]]
        auc, ks = [x["auc_mean"] for x in rows], [x["ks_mean"] for x in rows]
        tasks = {}
        for t in results[0]["tasks"]:  # a task the method was skipped on (auc null) has no mean to take
            ran = [r["tasks"][t]["methods"][m]["auc_mean"] for r in results if m in r["tasks"][t]["methods"]]
            if any(a is not None for a in ran):
                tasks[t] = float(np.mean([a for a in ran if a is not None]))
        # how many tasks each seed's average covers (a method skipped on a hard task averages over easier ones);
        # results written before the bench counted them give None
        n_tasks = min((x.get("n_tasks", -1) for x in rows), default=-1)
        out[m] = {"auc_mean": float(np.mean(auc)), "auc_std_over_seeds": float(np.std(auc)), "ks_mean": float(np.mean(ks)),
                  "ks_std_over_seeds": float(np.std(ks)), "seeds": len(rows), "auc_per_seed": auc, "ks_per_seed": ks,
                  "auc_by_task": tasks, "n_tasks": None if n_tasks < 0 else n_tasks}
    return out


def probe_summary(probes: list[dict]) -> dict:
    """quality_probe results over seeds, in the shape of :func:`summarise` (rows: task / generic / swapped ...)."""
    out = {}
    for key in ("task", "generic", "swapped", "hidden", "seen_text_mean", "input_profile", "all_inputs", "peer_rfm",
                "peer_rfm_widened", "deep_part", "path_part", "statistics"):
        if not all(key in p for p in probes):  # probes written before the key existed
            continue
        # null: a row with nothing to probe (no other task's question where every task asks the same)
        auc, ks = ([float("nan") if p[key][m] is None else p[key][m] for p in probes] for m in ("auc", "ks"))
        out[f"probe_{key}"] = {"auc_mean": float(np.mean(auc)), "auc_std_over_seeds": float(np.std(auc)),
                               "ks_mean": float(np.mean(ks)), "ks_std_over_seeds": float(np.std(ks)),
                               "seeds": len(probes), "auc_per_seed": auc, "ks_per_seed": ks}
    return out


def top_directions_summary(probes: list[dict]) -> dict:
    """quality_probe's few-directions rows over seeds: k -> query -> AUC mean, std over seeds, per seed (only probes
    that have them)."""
    probes = [p for p in probes if "top_directions" in p]
    if not probes:
        return {}
    out: dict = {}
    for k in probes[0]["top_directions"]:
        out[k] = {}
        for query in probes[0]["top_directions"][k]:
            # null: no other task's question to swap in (NaN, as probe_summary reads it)
            auc = [float("nan") if p["top_directions"][k][query] is None else p["top_directions"][k][query] for p in probes]
            out[k][query] = {"auc_mean": float(np.mean(auc)), "auc_std_over_seeds": float(np.std(auc)), "auc_per_seed": auc}
    return out


def top_directions_table(summary: dict) -> str:
    queries = list(next(iter(summary.values())))
    lines = ["| top principal directions | " + " | ".join(f"{q} query AUC" for q in queries) + " |",
             "|---" * (len(queries) + 1) + "|"]
    for k, row in summary.items():
        lines.append(f"| {k} | " + " | ".join(f"{row[q]['auc_mean']:.4f} ± {row[q]['auc_std_over_seeds']:.4f}"
                                               for q in queries) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def _working_directory(path: Path):
    """contextlib.chdir, which Python 3.10 lacks."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def settings_of(args: argparse.Namespace, seed: int, data_id: str) -> dict:
    """What a seed's result depends on: a result made under any other is not reused."""
    out = {"seed": seed, "probe": bool(args.probe), "pretrain_config": file_sha256(args.pretrain), "set": list(args.set),
           "data": data_id}
    if args.probe:
        out["generic_query"] = args.generic_query
    else:
        out.update(bench_config=file_sha256(args.bench), bench_set=list(args.bench_set))
        # the per-fold heads' recipe lives in the file the bench config names: an edit there changes their rows
        # found as the bench finds it: it runs in the repository root (cwd=ROOT), where a relative path is read from the
        # root first and then from the bench config's folder and those above it
        with _working_directory(ROOT):
            heads = load_config(args.bench, list(args.bench_set), schema=BenchConfig).prompt_tune_config
            heads_file = Path(heads).resolve() if heads else None
        out["prompt_tune_config"] = file_sha256(heads_file) if heads_file and heads_file.is_file() else None
    return out


def check_reusable(done: Path, wanted: dict, redo: list[Path] | None = None, also: dict | None = None) -> None:
    """Refuse a finished result made under other settings than ``wanted`` (SystemExit naming what differs and
    ``redo``, the folders to delete to make it again: by default the result's own). ``also``: a value each key may
    hold as an older qanchor recorded the same setting (the data's id before it went by content)."""
    record = done.with_name(done.name + ".settings.json")
    if not record.exists():
        print(f"warning: {done} has no record of the settings that produced it (made before quality_seeds.py kept "
              "one); reused as it is", file=sys.stderr)
        return
    had = json.loads(record.read_text())
    unknown = sorted(k for k in wanted if k not in had)  # recorded before the key was kept: not known to differ
    if unknown:
        print(f"warning: {record} does not record {', '.join(unknown)} (written before quality_seeds.py kept it); "
              "the result is reused as it is", file=sys.stderr)
    differ = [f"{k}: {had.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(had) | set(wanted))
              if k not in unknown and had.get(k) != wanted.get(k) and not (also and k in also and had.get(k) == also[k])]
    if differ:
        folders = " and ".join(str(f) for f in (redo or [done.parent]))
        raise SystemExit(f"{done} was made with other settings ({'; '.join(differ)}); use another --root, or delete "
                         f"{folders} to redo that seed")


def table(summary: dict) -> str:
    """Per method: AUC and KS over seeds and the tasks averaged; as the bench's own table, the best in bold only among
    the methods that ran on the most tasks."""
    lines = ["| method | AUC (mean over seeds ± population std) | KS (mean ± std) | tasks | seeds |",
             "|---|---|---|---|---|"]
    most = max((v.get("n_tasks") or 0 for v in summary.values()), default=0)
    full = [v for v in summary.values() if (v.get("n_tasks") or 0) == most]
    best_auc, best_ks = max(v["auc_mean"] for v in full), max(v["ks_mean"] for v in full)
    for m, v in summary.items():
        auc = f"{v['auc_mean']:.4f} ± {v['auc_std_over_seeds']:.4f}"
        ks = f"{v['ks_mean']:.4f} ± {v['ks_std_over_seeds']:.4f}"
        bold = (v.get("n_tasks") or 0) == most
        tasks = "?" if v.get("n_tasks") is None else str(v["n_tasks"])
        lines.append(f"| `{m}` | {'**' + auc + '**' if bold and v['auc_mean'] == best_auc else auc} | "
                     f"{'**' + ks + '**' if bold and v['ks_mean'] == best_ks else ks} | {tasks} | {v['seeds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain", required=True, help="configs/pretrain/*.yaml")
    ap.add_argument("--bench", required=True, help="configs/bench/*.yaml")
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--set", action="append", default=[], help="key=value pretraining setting (repeatable)")
    ap.add_argument("--bench-set", action="append", default=[], help="key=value bench setting (repeatable)")
    ap.add_argument("--probe", action="store_true", help="quick look: benchmarks/quality_probe.py instead of the bench")
    ap.add_argument("--generic-query", default="What kind of user is this?", help="with --probe")
    ap.add_argument("--log", action="store_true", help="pretraining log lines (start, every log_every steps, summary)")
    ap.add_argument("--probe-device", default="cpu", help="with --probe: where the checkpoint embeds (cpu, cuda)")
    args = absolute_paths(ap.parse_args(argv), "pretrain", "bench", "data", "root")
    results = []
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    # the children run quietly (pretraining's lines with --log): without lines of its own the script was silent for
    # minutes per seed in a job's log
    log(f"quality_seeds: start, seeds {args.seeds} ({'probe' if args.probe else 'bench'}), root {args.root}")
    dataset = load_dataset(args.data)
    data_id = trained_data_id(dataset)  # the dataset's files and its UserU pairs
    older = {"data": legacy_trained_data_id(dataset)}  # what a seed finished before ids went by content recorded
    for k, seed in enumerate(seeds, 1):
        run = args.root / f"seed{seed}"
        bench = args.root / f"bench-seed{seed}"  # beside the run: an output inside its checkpoint is refused
        done = run / "probe.json" if args.probe else bench / "results.json"
        wanted = settings_of(args, seed, data_id)
        if done.exists():  # in bench mode the seed's pretraining run is a folder of its own, made with the settings too
            check_reusable(done, wanted, [run] if args.probe else [run, bench], also=older)
            log(f"quality_seeds: seed {seed} ({k}/{len(seeds)}): reusing {done}")
        else:
            log(f"quality_seeds: seed {seed} ({k}/{len(seeds)}): pretraining -> {run}")
            _qanchor("pretrain", "--config", args.pretrain, *([] if args.log else ["--quiet"]), f"data.path={args.data}",
                     f"output_dir={run}", f"train.seed={seed}", "resume=true", *args.set)
            if args.probe:
                log(f"quality_seeds: seed {seed}: probing")
                _probe("--checkpoint", str(run), "--data", args.data, "--generic-query", args.generic_query,
                       "--device", args.probe_device, "--out", str(done))
            else:
                log(f"quality_seeds: seed {seed}: benching -> {bench}")
                _qanchor("bench", "--config", args.bench, "--quiet", f"checkpoint={run}", f"data.path={args.data}",
                         f"output_dir={bench}", "heads_dir=null", *args.bench_set)
            write_json(wanted, done.with_name(done.name + ".settings.json"))
        results.append(json.loads(done.read_text()))
        log(f"quality_seeds: seed {seed}: done ({_aucs(results[-1], args.probe)})")
    summary = probe_summary(results) if args.probe else summarise(results)
    few = top_directions_summary(results) if args.probe else {}
    write_json({"seeds": args.seeds, "pretrain": args.pretrain, "set": args.set, "methods": summary,
                **({"top_directions": few} if few else {})}, args.root / "summary.json", indent=1)
    text = table(summary) + ("\n\n" + top_directions_table(few) if few else "")
    write_text(text + "\n", args.root / "summary.md")
    log(f"quality_seeds: done, {len(seeds)} seed(s) in {format_seconds(time.perf_counter() - started)}; wrote "
        f"{args.root / 'summary.json'} and {args.root / 'summary.md'}")
    print(text)
    return 0


def _aucs(result: dict, probe: bool) -> str:
    """One seed's AUCs for its log line: the probe's task / generic / swapped rows, or every benched method's
    task-averaged AUC, best first."""
    if probe:
        return ", ".join(f"{row} AUC {_shown(result[row]['auc'])}" for row in ("task", "generic", "swapped")
                         if row in result)  # a probe written before the row existed
    methods = sorted(result["average"].items(), key=lambda m: 1.0 if m[1]["auc_mean"] is None else -m[1]["auc_mean"])
    return "AUC " + ", ".join(f"{name} {_shown(row['auc_mean'])}" for name, row in methods)


def _shown(value: float | None) -> str:
    """An AUC in a log line; ``-`` where there is none (a row with nothing to probe, a method skipped)."""
    return "-" if value is None or value != value else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
