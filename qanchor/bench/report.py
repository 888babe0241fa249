"""Write a benchmark's ``report.md`` and ``results.json``, and format its tables.

Tables are Markdown: one per task (rows = methods, AUC and KS as mean +- std over folds) and one
average over tasks; the best mean of each column is bold. The oracle row (true probability, synthetic
data only) is shown in italics and never competes for bold.

Example:
    >>> print(markdown_table(["method", "AUC"], [["a", "0.7"], ["b", "0.8"]]))
    | method | AUC |
    |---|---|
    | a | 0.7 |
    | b | 0.8 |
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qanchor.bench.journal import labels_of_journal, remove_journal
from qanchor.bench.peers import MethodResult
from qanchor.bench.plots import write_plots
from qanchor.bench.runner import HISTORY_IN_PATH, BenchResult, TaskResult, run_bench
from qanchor.config import BenchConfig
from qanchor.data.io import write_json, write_text
from qanchor.probe import LR_CS

__all__ = ["METHOD_LABELS", "CONTENT_MARGIN", "markdown_table", "task_table", "average_table", "matrix_table", "data_kind_note",
           "write_report", "write_results", "bench_and_report", "labels_of_report"]

METHOD_LABELS = {
    "qanchor_task": "Q-Anchor, task query + LR",
    "qanchor_generic": "Q-Anchor, generic query + LR",
    "qanchor_swapped_query": "control: Q-Anchor under another task's query + LR",
    "qanchor_random_init": "control: same model, no pretraining, task query + LR",
    "qanchor_head": "Q-Anchor, prompt-tuned head (tuned per fold)",
    "qanchor_head_lr": "Q-Anchor, per-fold head's embedding + LR",
    "rfm_lgbm": "RFM + counts + tabular + LightGBM",
    "text_mean_lr": "mean event-text vector + LR",
    "union_lgbm": "RFM + counts + tabular + mean text vector + LightGBM",
    "rfm_lr": "signed-log RFM + counts + tabular + LR",
    "union_lr": "signed-log RFM + counts + tabular + mean text vector + LR",
    "coles": "CoLES (pytorch-lifestream) + LR",
    "no_contrastive": "pretrained without contrastive loss (NTP only), task query + LR",
    "no_ntp": "pretrained without next-token loss (contrastive only), task query + LR",
    "no_summary_tokens": "pretrained without user / modality tokens, task query + LR",
    "no_pretraining": "not pretrained (initial weights), task query + LR",
}


# `text_mean_lr` this far above `rfm_lr` (mean AUC over tasks) marks tasks about what the events are rather than how many
# there are: the ratings world +0.29, against Complete Journey -0.10 and the synthetic world -0.02 (README, "Which tiny
# config for your data").
CONTENT_MARGIN = 0.05


def data_kind_note(result: BenchResult) -> str | None:
    """What the two model-free peers say about the data's kind, and whether the checkpoint's recipe suits it.

    None unless both ``rfm_lr`` and ``text_mean_lr`` ran on a task, or when they are within ``CONTENT_MARGIN`` of each
    other with the text vector ahead (a mixed signal: no advice). Both are averaged over the tasks both ran on: a peer
    skipped on a task (``text_mean_lr`` where no user has event texts) would be compared over other tasks.
    """
    both = [(*t.methods["rfm_lr"].auc_mean_std, *t.methods["text_mean_lr"].auc_mean_std)
            for t in result.tasks.values()
            if t.methods.get("rfm_lr") is not None and t.methods["rfm_lr"].ok
            and t.methods.get("text_mean_lr") is not None and t.methods["text_mean_lr"].ok]
    if not both:
        return None
    counts, counts_spread, content, content_spread = (float(np.mean(x)) for x in zip(*both))
    reads = result.run.get("model_content")
    peers = f"`text_mean_lr` {content:.4f} against `rfm_lr` {counts:.4f} mean AUC"
    # which peer leads says something only where one of them reads the labels at all: on labels neither predicts
    # (random ones: rfm_lr 0.54 against 0.46) the lead is fold noise, and the advice was a recipe for "counts"
    noise = counts_spread if counts >= content else content_spread
    if max(counts, content) - 0.5 <= noise:
        return (f"Neither model-free peer reads these labels clearly above chance ({peers}; the better one's mean "
                f"AUC is within its spread over folds, {noise:.4f}, of 0.5): nothing to say about the data's kind.")
    if content - counts >= CONTENT_MARGIN:
        note = (f"The tasks are about what the events are ({peers}). `configs/pretrain/tiny-ratings.yaml` is the recipe "
                "for such data: it hands the whole history's content to the wide path.")
        if reads is not None and reads != HISTORY_IN_PATH:
            note += (f" This checkpoint reads {reads}; that recipe scored 0.03 AUC below the tiny-ratings one on the "
                     "ratings world and 0.08 below it on Complete Journey's demographics.")
        return note
    if content <= counts:
        note = (f"The tasks are about how many events there are ({peers}). `configs/pretrain/tiny-cj.yaml` and "
                "`tiny-synth.yaml` are the recipes for such data: the kept events' content as profile targets.")
        if reads == HISTORY_IN_PATH:
            note += (" This checkpoint reads the whole history's content in the wide path, which cost Complete Journey "
                     "0.0035 AUC and halved the synthetic world's query effect.")
        return note
    return None


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(mean: float, std: float, bold: bool) -> str:
    text = f"{mean:.4f} ± {std:.4f}"
    return f"**{text}**" if bold else text


def _best(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return max(finite) if finite else float("nan")


def _label(name: str) -> str:
    if name.startswith("prompt_tokens_"):
        return f"head tuned with {name.rsplit('_', 1)[1]} prompt token(s)"
    return METHOD_LABELS.get(name, name)


def task_table(task: TaskResult, ablations: bool = False) -> str:
    """Rows = methods (or ablations), columns AUC and KS mean ± std; best mean per column in bold."""
    results = task.ablations if ablations else task.methods
    ok = {m: r for m, r in results.items() if r.ok}
    best_auc = _best([r.auc_mean_std[0] for r in ok.values()])
    best_ks = _best([r.ks_mean_std[0] for r in ok.values()])
    rows = []
    for name, r in results.items():
        if not r.ok:
            rows.append([f"`{name}`", _label(name), "—", "—", "—", f"skipped: {r.skipped}"])
            continue
        (am, asd), (km, ksd) = r.auc_mean_std, r.ks_mean_std
        rows.append([f"`{name}`", _label(name), _fmt(am, asd, am == best_auc), _fmt(km, ksd, km == best_ks),
                     _test_sizes(r), r.note])
    if task.oracle is not None and task.oracle.ok and not ablations:
        (am, asd), (km, ksd) = task.oracle.auc_mean_std, task.oracle.ks_mean_std
        rows.append(["*oracle*", "*true probability*", f"*{am:.4f} ± {asd:.4f}*", f"*{km:.4f} ± {ksd:.4f}*",
                     _test_sizes(task.oracle), "upper bound, not a method"])
    return markdown_table(["method", "what", "AUC", "KS", "test users / fold", "note"], rows)


def _test_sizes(r: MethodResult) -> str:
    return f"{min(r.n_test)}–{max(r.n_test)}" if min(r.n_test) != max(r.n_test) else str(r.n_test[0])


def average_table(result: BenchResult, ablations: bool = False) -> str:
    """Per method: AUC and KS averaged over tasks (mean of fold means ± mean of fold stds); the best among the methods
    that ran on the most tasks in bold (the "tasks" column says how many each ran on)."""
    avg = result.average(ablations)
    n_tasks = sum(1 for t in result.tasks.values() if t.methods)
    # bold only among the methods that ran on the most tasks: a method skipped on a hard task averages over easier ones
    most = max((a["n_tasks"] for a in avg.values()), default=0)
    best_auc = _best([a["auc_mean"] for a in avg.values() if a["n_tasks"] == most])
    best_ks = _best([a["ks_mean"] for a in avg.values() if a["n_tasks"] == most])
    rows = [[f"`{m}`", _label(m), _fmt(a["auc_mean"], a["auc_std"], a["auc_mean"] == best_auc),
             _fmt(a["ks_mean"], a["ks_std"], a["ks_mean"] == best_ks), f"{a['n_tasks']}/{n_tasks}"]
            for m, a in avg.items()]
    # a method asked for that ran on no task: a row saying why, not a row gone from the table
    for m in dict.fromkeys(m for t in result.tasks.values() for m in (t.ablations if ablations else t.methods)):
        if m not in avg:
            why = next((r.skipped for t in result.tasks.values()
                        if (r := (t.ablations if ablations else t.methods).get(m)) is not None and r.skipped), None)
            rows.append([f"`{m}`", _label(m), "—", "—", f"0/{n_tasks}" + (f" (skipped: {why})" if why else "")])
    oracle = [t.oracle for t in result.tasks.values() if t.oracle is not None and t.oracle.ok]
    if oracle and not ablations:
        stats = np.array([[*r.auc_mean_std, *r.ks_mean_std] for r in oracle]).mean(axis=0)
        rows.append(["*oracle*", "*true probability*", f"*{stats[0]:.4f} ± {stats[1]:.4f}*",
                     f"*{stats[2]:.4f} ± {stats[3]:.4f}*", f"{len(oracle)}/{n_tasks}"])
    return (markdown_table(["method", "what", "AUC (avg)", "KS (avg)", "tasks"], rows) + "\n\n"
            + "AUC (avg), KS (avg): the mean over the tasks a method ran on of its mean over folds, ± the mean of its "
            "per-task std over folds (the fold-to-fold spread, not the spread over tasks).")


def matrix_table(result: BenchResult, metric: str = "auc") -> str:
    """Rows = methods, columns = tasks, cells = mean ``metric`` over folds (best per task in bold)."""
    tasks = [t for t in result.tasks.values() if t.methods]
    methods = list(dict.fromkeys(m for t in tasks for m in t.methods))

    def mean(r: MethodResult | None) -> float:
        return (r.auc_mean_std if metric == "auc" else r.ks_mean_std)[0] if r is not None and r.ok else float("nan")

    def cell(value: float, best: float) -> str:
        if not np.isfinite(value):
            return "—"
        return f"**{value:.3f}**" if value == best else f"{value:.3f}"

    best = {t.name: _best([mean(r) for r in t.methods.values()]) for t in tasks}
    rows = [[f"`{m}`", *(cell(mean(t.methods.get(m)), best[t.name]) for t in tasks)] for m in methods]
    return markdown_table(["method", *(t.name for t in tasks)], rows)


def _seconds(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in d.items()) or "—"


def _header(result: BenchResult, run_name: str) -> list[str]:
    r = result.run
    lines = [f"# Benchmark `{run_name}`: {r['dataset']}", "",
             f"- data: `{r['data_path']}` (inputs strictly before the cutoff {r['cutoff']}; labels after it)",
             f"- checkpoint: `{r['checkpoint'] or '(none: peers only)'}`; heads: `{r['heads_dir'] or '(none)'}`",
             f"- protocol: per task, stratified {r['folds']}-fold cross-validation over users (seed {r['seed']}); every "
             "method sees the same users, folds and cutoff; AUC and KS (max |TPR − FPR|) on each test fold, "
             "mean ± std over folds; best mean per column in **bold**",
             f"- generic query (static-embedding baseline): \"{r['generic_query']}\"",
             f"- wall time: {r.get('seconds', float('nan'))} s; qanchor {r['qanchor_version']}; started {r['started']}",
             f"- time in shared inputs: {_seconds(r.get('shared_seconds', {}))}; per method (fits, incl. the inputs it "
             f"triggered first): {_seconds(r.get('method_seconds', {}))}", ""]
    return lines


_NOTES = """## How to read this

- `qanchor_task` / `qanchor_generic`: the pretrained model's 128-d embedding under the task's own query /
  under one generic query, then a logistic regression fitted on the training folds.
- `qanchor_swapped_query`: a control: each task scored with the embedding under *another* task's query. If it
  matches `qanchor_task`, the query does not condition the embedding.
- `qanchor_random_init`: a control, the floor: the same architecture and recipe with pretraining skipped
  (initial weights, built by the same code), task query + logistic regression.
- `qanchor_head`: a scenario head (soft prompt + class prototypes, DESIGN section 5) tuned per fold on that
  fold's training users only (its best step chosen on a validation split of them), then its own score on the
  fold's test users: the same users and folds as every other row, so AUC and KS compare directly.
- `qanchor_head_lr`: the same per-fold heads, but their embedding (soft prompt + task query) scored by the
  logistic regression every LR row uses, fitted on the fold's training users: whether prompt tuning improves
  the representation, separately from the prototype scorer.
- `rfm_lgbm`: recency / frequency / monetary statistics and counts per modality (plus tabular columns) with
  LightGBM; `text_mean_lr`: the mean event-text vector (frozen sentence encoder) with logistic regression;
  `union_lgbm`: LightGBM on the union of the RFM / count / tabular features and the mean text vector;
  `rfm_lr` and `union_lr`: the same features through the logistic regression every embedding row uses, after a
  signed log (sign(x) log(1 + |x|): counts and amounts are heavy-tailed);
  `coles`: CoLES (contrastive self-supervised GRU over the event sequence, pytorch-lifestream) trained on
  every user's events before the cutoff without labels, then logistic regression.
- Every logistic regression standardises its inputs and picks its L2 strength (C in {grid}) by a 3-fold
  inner cross-validation on the training folds only. Peers read every event before the cutoff; the model reads
  each modality's most recent events up to the caps it was pretrained with. The grid reaches down to the
  regression's most regularised form (its ranking is then the classes' mean difference); each fold's pick is in
  results.json (`probe_c`). Every LightGBM row likewise picks its capacity (stumps, 4-leaf or 15-leaf trees, each
  with its own learning rate and number of trees) on the training folds only, by AUC on a held-out third of them
  (`tree_setting` in results.json: the index of the pick).
- Ablation rows (when run) come from models retrained under `ablations/` and are judged on the same folds.
"""


def write_report(result: BenchResult, out_dir: str | Path, plots: list[str] | None = None) -> Path:
    """Write ``report.md`` into ``out_dir`` and return its path."""
    out_dir = Path(out_dir)
    lines = _header(result, out_dir.name)
    lines += ["## Average over tasks", "", average_table(result), ""]
    if (kind := data_kind_note(result)) is not None:
        lines += [f"**Data kind.** {kind}", ""]
    if len(result.tasks) > 1:
        lines += ["### AUC by task", "", matrix_table(result, "auc"), "", "### KS by task", "", matrix_table(result, "ks"), ""]
    if any(t.ablations for t in result.tasks.values()):
        lines += ["## Ablations (average over tasks)", "", average_table(result, ablations=True), ""]
    for task in result.tasks.values():
        lines += [f"## Task `{task.name}`", "", f"Query: \"{task.query}\"  ", f"Users: {task.n_users}, positive rate "
                  f"{task.positive_rate:.1%}, {task.folds} folds" + (f"; oracle AUC (all users) {task.oracle_auc:.4f}"
                                                                    if task.oracle_auc is not None else ""), ""]
        if task.note:
            lines += [f"*{task.note}*", ""]
        if task.methods:
            lines += [task_table(task), ""]
        if task.ablations:
            lines += [f"Ablations on `{task.name}`:", "", task_table(task, ablations=True), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    lines += [_NOTES.replace("{grid}", ", ".join(f"{c:g}" for c in LR_CS))]
    path = out_dir / "report.md"
    write_text("\n".join(lines), path)
    return path


def write_results(result: BenchResult, out_dir: str | Path) -> Path:
    """Write ``results.json``: run info and every method x task with per-fold values."""
    path = Path(out_dir) / "results.json"
    write_json(result.to_dict(), path)
    return path


def labels_of_report(out_dir: str | Path) -> str | None:
    """The labels file (resolved path) whose custom task the bench in ``out_dir`` scores: its report's, or that of
    the unfinished run whose rows wait there; None where neither names one (a dataset's own tasks, or a report
    written before qanchor recorded it)."""
    try:
        run = json.loads((Path(out_dir) / "results.json").read_text()).get("run", {})
    except (OSError, ValueError, AttributeError):
        run = {}
    labels = run.get("labels") if isinstance(run, dict) else None
    return labels_of_journal(out_dir) or (labels if isinstance(labels, str) else None)


def bench_and_report(cfg: BenchConfig, progress: bool = True) -> tuple[BenchResult, Path]:
    """Run the benchmark; write ``report.md``, ``results.json`` and the plots into ``cfg.output_dir``.

    A run killed before its report resumes from its finished (task, method) rows (:mod:`qanchor.bench.journal`),
    which are dropped once the report is written."""
    result = run_bench(cfg, progress=progress)
    out = Path(cfg.output_dir)
    plots = write_plots(result, out)
    write_results(result, out)
    write_report(result, out, [str(p) for p in plots])
    remove_journal(out)
    return result, out
