"""Finished (task, method) rows of a benchmark run, kept so that a killed run resumes where it stopped.

A bench with per-fold heads, a retrained control and LightGBM peers runs for minutes on the demo datasets and for
hours on a large one; a run killed near its end (a pre-empted node, an OOM kill, Ctrl-C) must not start over::

    <output_dir>/partial/
        key.json               what the rows are valid for (see :func:`journal_key`)
        row-0003-rfm_lr.json   one finished row: task 3 of the run (its name inside), method rfm_lr

Each row is written atomically the moment its method finishes on its task. A re-run with the same key takes the
rows it finds and computes the rest; the methods are deterministic for a given key (same folds, seeds and threads),
so the resumed results equal an uninterrupted run's (``tests/test_faults.py`` kills a bench after its rows and
compares). Any other key (another checkpoint, text encoder, dataset, label set or setting) starts afresh: the old rows are this
run's own files and are removed. :func:`qanchor.bench.report.bench_and_report` removes ``partial/`` once the
report is written. Ablation sub-runs keep their judged rows here too (method ``ablation-<name>``); their
pretraining runs resume on their own.

Example:
    >>> key = journal_key(cfg, ds, tasks, ckpt_hash, heads, text_encoder_digests(ctx))  # doctest: +SKIP
    >>> journal = BenchJournal.open(Path("results/bench"), key)  # doctest: +SKIP
    >>> journal.get(0, "churn", "rfm_lr") or journal.put(0, "churn", "rfm_lr", evaluate_task(...))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import qanchor
from qanchor.bench.methods import TEXT_PEERS, BenchContext
from qanchor.bench.peers import MethodResult
from qanchor.config import BenchConfig, to_yaml
from qanchor.data.dataset import Dataset, Task
from qanchor.data.io import code_digest, local_path, to_plain, write_text
from qanchor.data.labels import task_digest
from qanchor.data.text_cache import SentenceEncoder
from qanchor.faults import failpoint
from qanchor.infer.export import head_digest
from qanchor.logs import log
from qanchor.model.factory import read_meta, resolve_checkpoint_dir, text_encoder_config
from qanchor.probe import LR_CS
from qanchor.train.pretrain import trained_data_id

__all__ = ["BenchJournal", "journal_key", "remove_journal", "text_encoder_digests"]

_DIR = "partial"
_ROW_FIELDS = {f.name for f in fields(MethodResult)}


def journal_key(cfg: BenchConfig, ds: Dataset, tasks: list[Task], checkpoint_hash: str | None,
                heads: dict[str, Any], text_encoders: dict[str, str | None] | None = None) -> str:
    """A hash of everything a row's numbers depend on: every bench setting but ``output_dir``, each task's query,
    users and labels, the dataset's files, the checkpoint's weights, what the text encoders compute
    (``text_encoders``: :func:`text_encoder_digests`), the saved heads, qanchor's version, the LR
    probe's C grid, the code that computes them (:func:`code_digest`) and the text of ``prompt_tune_config`` (the per-fold heads' settings live in that file, not in
    ``cfg``: an edited file must not resume heads tuned under the old one)."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted((text_encoders or {}).items())).encode())
    h.update(to_yaml(_paths_resolved(replace(cfg, output_dir=""))).encode())
    tune_file = Path(cfg.prompt_tune_config) if cfg.prompt_tune_config else None
    h.update(tune_file.read_bytes() if tune_file is not None and tune_file.is_file() else b"")
    h.update(json.dumps([ds.fingerprint, checkpoint_hash, qanchor.__version__, code_digest(), list(LR_CS),
                         sorted((t, head_digest(e.head)) for t, e in heads.items())]).encode())
    h.update(json.dumps([task_digest(t) for t in tasks]).encode())
    # the sub-runs (the ablations, and qanchor_random_init, whose checkpoint standardises its query evidence on the
    # pairs) are made from the UserU pairs, which the dataset's fingerprint leaves out
    if cfg.ablations or "qanchor_random_init" in cfg.methods:
        h.update(trained_data_id(ds).encode())
    return h.hexdigest()


def text_encoder_digests(ctx: BenchContext) -> dict[str, str | None]:
    """What the sentence encoders behind the rows compute (:attr:`SentenceEncoder.digest`: weights, tokenizer and
    settings by content), for :func:`journal_key`: ``"peers"``, the encoder of ``data.text_encoder`` where a text peer
    runs, and ``"model"``, the one the checkpoint reads its events with where a model row or an ablation does. The
    settings name an encoder only by its path: an encoder folder replaced in place, or an upgraded bundled encoder,
    resumed the rows the old encoder made beside new ones. The encoders are the ones the rows then use (loaded once)."""
    digests: dict[str, str | None] = {}
    if set(TEXT_PEERS) & set(ctx.cfg.methods):
        digests["peers"] = ctx.text_encoder.digest
    if ctx.embedder is not None:
        digests["model"] = getattr(ctx.embedder, "text_encoder_digest", None)
    elif ctx.cfg.ablations and ctx.cfg.checkpoint:  # the ablations read the checkpoint without a model row's embedder
        meta = read_meta(resolve_checkpoint_dir(ctx.cfg.checkpoint))
        digests["model"] = SentenceEncoder(text_encoder_config(meta), device="cpu").digest
    return digests


def _paths_resolved(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` with its paths made absolute: the same bench given the same inputs by a relative path, from another
    working directory or with a trailing slash keeps its journal (what the paths hold is hashed apart: the dataset's
    files, the checkpoint's weights, the heads, the labels, the prompt-tune file). Resolved whether or not they exist
    yet (a cache folder the first run creates); the text encoder's only where it is a local folder, not a hub id."""
    def resolved(value: str | None) -> str | None:
        return str(local_path(value).resolve()) if value else value

    encoder = cfg.data.text_encoder.path
    data = replace(cfg.data, path=resolved(cfg.data.path), cache_dir=resolved(cfg.data.cache_dir),
                   text_encoder=replace(cfg.data.text_encoder, path=resolved(encoder) if encoder and
                                        local_path(encoder).exists() else encoder))
    return replace(cfg, data=data, checkpoint=resolved(cfg.checkpoint), heads_dir=resolved(cfg.heads_dir),
                   labels=resolved(cfg.labels), prompt_tune_config=resolved(cfg.prompt_tune_config))


def labels_of_journal(out_dir: str | Path) -> str | None:
    """The labels file recorded by the unfinished bench run under ``out_dir`` (None: no journal, or none recorded)."""
    try:
        labels = json.loads((Path(out_dir) / _DIR / "key.json").read_text()).get("labels")
    except (OSError, ValueError, AttributeError):
        return None
    return labels if isinstance(labels, str) else None


class BenchJournal:
    """The finished rows of one bench run under ``<output_dir>/partial/``."""

    def __init__(self, directory: Path | None, key: str, rows: dict[tuple[int, str, str], MethodResult]):
        self.directory, self.key, self._rows = directory, key, rows

    @classmethod
    def disabled(cls) -> BenchJournal:
        """A journal that keeps nothing: for a run whose model no key can name (an embedder passed in code)."""
        return cls(None, "", {})

    @classmethod
    def open(cls, out_dir: str | Path, key: str, labels: str | None = None) -> BenchJournal:
        """The journal under ``out_dir`` (a claimed bench output): its rows if they were made under ``key``, else
        an empty one (rows made under another key are removed). ``labels``: the custom task's labels file, recorded
        beside the key so that a folder an interrupted run left is known as that file's (:func:`labels_of_journal`)."""
        directory = Path(out_dir) / _DIR
        rows: dict[tuple[int, str, str], MethodResult] = {}
        if directory.is_dir():
            try:
                same = json.loads((directory / "key.json").read_text())["key"] == key
            except (OSError, ValueError, KeyError, TypeError):
                same = False  # no key, or a damaged one: the rows cannot be trusted
            if same:
                rows = _read_rows(directory)
            else:
                stale = len(list(directory.glob("row-*.json")))
                remove_journal(out_dir)  # rows of another run of this bench output
                if stale > 0:
                    log(f"bench: {out_dir} held {stale} finished rows of a run with other settings or inputs; "
                        "they are computed again")
        if not rows:
            directory.mkdir(parents=True, exist_ok=True)
            write_text(json.dumps({"key": key, "labels": labels}) + "\n", directory / "key.json")
        return cls(directory, key, rows)

    def __len__(self) -> int:
        return len(self._rows)

    def finished(self, methods: list[str]) -> int:
        """How many of the rows are of ``methods`` (the rest: ablation sub-runs' rows)."""
        return sum(1 for _, _, method in self._rows if method in methods)

    def get(self, index: int, task: str, method: str) -> MethodResult | None:
        """The finished row of ``method`` on task ``index`` (named ``task``), or None."""
        return self._rows.get((index, task, method))

    def put(self, index: int, task: str, method: str, result: MethodResult) -> MethodResult:
        """Keep ``result`` (atomically) and return it. A skipped row is not kept: why a method did not run (a package
        not installed, say) may have changed by the next run, and a skip costs nothing to find again."""
        if self.directory is None or result.skipped is not None:
            return result
        row = {"task": task, "method": method, "result": to_plain(asdict(result))}
        write_text(json.dumps(row) + "\n", self.directory / f"row-{index:04d}-{method}.json")
        self._rows[(index, task, method)] = result
        failpoint("bench-row-saved")
        return result


def remove_journal(out_dir: str | Path) -> None:
    """Drop ``out_dir``'s journal (the run's results are written, or its rows are stale): only the files it writes,
    and the folder once empty; anything else a person put there stays."""
    directory = Path(out_dir) / _DIR
    if not directory.is_dir():
        return
    for path in [directory / "key.json", *directory.glob("row-*.json"), *directory.glob("*.qanchor-tmp*")]:
        path.unlink(missing_ok=True)
    if not any(directory.iterdir()):
        directory.rmdir()


def _read_rows(directory: Path) -> dict[tuple[int, str, str], MethodResult]:
    rows = {}
    for path in sorted(directory.glob("row-*.json")):
        try:
            index = int(path.name.split("-")[1])
            row = json.loads(path.read_text())
            result = MethodResult(**{k: v for k, v in row["result"].items() if k in _ROW_FIELDS})
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue  # an unreadable row is recomputed
        rows[(index, row["task"], row["method"])] = result
    return rows
