"""Batch export: every user of a dataset x every query -> Parquet shards of embeddings.

Output directory::

    export.json            checkpoint hash, dataset fingerprint, queries, heads, shard layout, event caps (checked on resume)
    part-00000.parquet     user_id:string, query_id:string, embedding:fixed_size_list<float32>[D],
                           score:float32 (the head's score on rows ``head:<task>``; null for plain queries)
    part-00000.done        JSON marker written after its shard: a shard with a marker is never redone

Users stream one dataset partition at a time (bounded memory). A shard is a slice of one partition
(``shard_users``; default the whole partition) and is written atomically, so a killed export resumes
where it stopped. Under ``torchrun --nproc_per_node N`` rank r takes shards r, r+N, ...; shards and
their batches do not depend on N, so any N writes the same embeddings.

Scenario heads (``heads=``, a ``qanchor prompt-tune`` output) add one row per user and head, query id
``head:<task>``, embedded under the head's query with its soft prompt on the same cached prefix.

Example:
    $ qanchor embed checkpoint=runs/synth data.path=data/synth queries=queries.yaml out=emb/
    $ qanchor embed checkpoint=runs/demo/pretrain data.path=data/completejourney heads=runs/demo/heads out=scores/
    $ torchrun --nproc_per_node 2 -m qanchor.cli embed checkpoint=runs/synth data.path=data/synth queries=q.txt out=emb/
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import yaml

from qanchor.data.dataset import Dataset
from qanchor.data.io import (
    OutputKind,
    RepeatedKeyError,
    UniqueKeyLoader,
    claim_output_dir,
    hold_output,
    releasing_outputs,
    write_parquet,
    write_text,
)
from qanchor.data.manifest import Manifest
from qanchor.errors import ConfigError, ModelInputError
from qanchor.faults import failpoint
from qanchor.infer.api import Head, QAnchor, head_scores
from qanchor.infer.user_input import record_adapter
from qanchor.logs import Progress, log, warn
from qanchor.model.factory import same_model

__all__ = ["head_name", "head_digest", "ExportReport", "read_queries", "task_queries", "rank_and_world", "embeddings_table", "read_embeddings",
           "plan_shards", "export_embeddings", "report_json"]

FORMAT = 2  # 2: a score column (scenario heads)


@dataclass
class ExportReport:
    rank: int
    world: int
    shards_total: int
    shards_mine: int
    shards_skipped: int  # already done by an earlier (killed) run
    shards_written: int
    users: int  # users embedded by this run
    seconds: float

    @property
    def users_per_s(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else 0.0


def _check_queries(pairs: list[tuple[str, str]], source: str) -> list[tuple[str, str]]:
    if not pairs:
        raise ModelInputError(f"{source}: no queries found")
    for qid, q in pairs:
        if q is not None and not isinstance(q, str):  # a YAML list or number where a question belongs
            raise ModelInputError(f"{source}: query {qid!r} must be a question in text, got {type(q).__name__}")
        if not isinstance(q, str) or not q.strip() or qid is None or not str(qid).strip():  # null is no id, not "None"
            raise ModelInputError(f"{source}: query {qid!r} is empty; every entry needs an id and a question")
    ids = [str(qid).strip() for qid, _ in pairs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ModelInputError(f"{source}: query id {dup[0]!r} appears twice; ids must be unique")
    reserved = next((i for i in ids if i.startswith("head:")), None)
    if reserved is not None:  # a head's rows are named head:<task>: the two would be one query id in the export
        raise ModelInputError(f"{source}: query id {reserved!r} starts with 'head:', which names a scenario head's rows; "
                              "rename it")
    return [(qid, q.strip()) for qid, (_, q) in zip(ids, pairs)]


class _TextLoader(UniqueKeyLoader):
    """YAML as written: a plain scalar stays text (YAML 1.1 typing read the id 010 as 8, 007 as 7, yes as True, and
    ``index build query_id=010`` then found nothing); null, quoting, anchors and merge keys keep their meaning. A key
    given twice is refused (YAML keeps the last, so one question was dropped without a word)."""


_TextLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                           "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def read_queries(path: str | Path) -> list[tuple[str, str]]:
    """Read (query_id, query) pairs from YAML, CSV, Parquet or a text file.

    YAML: a list of questions (ids q0, q1, ...), a list of {query_id, query}, or a mapping id -> question.
    CSV (``.csv``, ``.tsv``): a header row naming a ``query`` column and optionally ``query_id`` (else ids q0, q1,
    ...); a question holding the separator is quoted. Parquet: columns query_id, query. Text (any other suffix): one
    question per line (``id<TAB>question`` names it; blank lines and ``#`` comments are skipped).

    Example:
        >>> read_queries("queries.yaml")  # doctest: +SKIP
        [('churn', 'Will this user stop using the app?'), ('coupon', 'Will this user redeem a coupon?')]
    """
    path = Path(path)
    try:
        found = path.is_file()
    except OSError:  # a name the file system cannot hold: a question given where a file is asked for
        found = False
    if not found:
        raise ModelInputError(f"queries file {str(path)[:80]!r}{'...' if len(str(path)) > 80 else ''} not found; "
                              "queries= takes a file of questions (or tasks): write the questions into one")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise ModelInputError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:100]}); give a "
                                  "Parquet with columns query_id, query, or a .yaml / .txt file") from None
        if not {"query_id", "query"} <= set(table.column_names):
            raise ModelInputError(f"{path}: a queries Parquet needs columns query_id and query")
        return _check_queries(list(zip(table.column("query_id").to_pylist(), table.column("query").to_pylist())), str(path))
    if path.suffix in (".yaml", ".yml"):
        text = _utf8_text(path)
        try:
            raw = yaml.load(text, Loader=_TextLoader)
        except RepeatedKeyError as exc:
            raise ModelInputError(f"{path}, line {exc.line}: query id {exc.key!r} appears twice; ids must be "
                                  "unique") from None
        except yaml.YAMLError as exc:
            raise ModelInputError(f"{path}: not valid YAML ({exc.__class__.__name__}); quote questions that contain ':' or '?'") from None
        if isinstance(raw, dict):
            return _check_queries(list(raw.items()), str(path))
        if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            return _check_queries([(f"q{i}", q) for i, q in enumerate(raw)], str(path))
        if isinstance(raw, list) and all(isinstance(x, dict) and {"query_id", "query"} <= set(x) for x in raw):
            return _check_queries([(x["query_id"], x["query"]) for x in raw], str(path))
        raise ModelInputError(f"{path}: expected a list of questions, a list of {{query_id, query}} or a mapping id -> question")
    if path.suffix in (".csv", ".tsv"):
        return _read_csv_queries(path)
    pairs, n = [], 0
    for number, line in enumerate(_utf8_text(path).splitlines(), start=1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        if "\t" in line:  # split before stripping: "churn<TAB>" is an id without its question, not the question "churn"
            qid, question = line.split("\t", 1)
            if not question.strip() or not qid.strip():
                raise ModelInputError(f"{path}, line {number}: 'id<TAB>question' with an empty "
                                      f"{'question' if qid.strip() else 'id'}; give both, or the question alone")
            pairs.append((qid.strip(), question))
        else:
            pairs.append((f"q{n}", line))
        n += 1
    return _check_queries(pairs, str(path))


def _utf8_text(path: Path) -> str:
    """A queries file's text, without the byte-order mark an editor or a spreadsheet may put first; one error line for
    a file saved in another encoding (a spreadsheet's Latin-1 CSV ended in a UnicodeDecodeError traceback)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelInputError(f"{path}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); save it as "
                              "UTF-8") from None
    return text.removeprefix("\ufeff")


def _read_csv_queries(path: Path) -> list[tuple[str, str]]:
    """A CSV / TSV of queries with a header row (read as text lines, its header would become a question)."""
    # newline="": a quoted question may hold a line break, which the csv module reads as part of it
    rows = list(csv.reader(io.StringIO(_utf8_text(path), newline=""), delimiter="\t" if path.suffix == ".tsv" else ","))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    header = [cell.strip() for cell in rows[0]] if rows else []
    if "query" not in header:
        raise ModelInputError(f"{path}: a queries {path.suffix[1:].upper()} needs a header row naming a 'query' column "
                              f"(and optionally 'query_id'); its first row is {header!r}")
    q = header.index("query")
    qid = header.index("query_id") if "query_id" in header else None
    pairs = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ModelInputError(f"{path}, row {line}: {len(row)} fields where the header has {len(header)}; quote a "
                                  "question that holds the separator")
        pairs.append((row[qid].strip() if qid is not None else f"q{line - 2}", row[q]))
    return _check_queries(pairs, str(path))


def task_queries(manifest: Manifest) -> list[tuple[str, str]]:
    """The dataset's task queries, named by task: ``queries=tasks``."""
    if not manifest.tasks:
        raise ModelInputError(f"queries=tasks: dataset '{manifest.name}' declares no tasks; give queries=<a YAML, CSV, "
                              "text or Parquet file of questions>")
    return _check_queries([(t.name, t.query) for t in manifest.tasks], "manifest tasks")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed if initialised, else RANK / WORLD_SIZE."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def embeddings_table(user_ids: list[str], query_ids: list[str], emb: np.ndarray,
                     scores: np.ndarray | None = None) -> pa.Table:
    """``emb`` float32 [U, Q, D] (and ``scores`` [U, Q], NaN = none) -> rows (user_id, query_id, embedding, score)."""
    u, q, d = emb.shape
    flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1), pa.float32())  # (U*Q*D,)
    score = np.full((u, q), np.nan, np.float32) if scores is None else scores.astype(np.float32)
    return pa.table({
        "user_id": pa.array(np.repeat(np.asarray(user_ids, dtype=object), q).tolist(), pa.string()),
        "query_id": pa.array(list(query_ids) * u, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, d),
        "score": pa.array(score.reshape(-1), pa.float32(), mask=np.isnan(score.reshape(-1))),
    })


def _finished_shards(directory: str | Path) -> list[Path]:
    """The finished ``part-*.parquet`` shards of an export (or ``embeddings/`` of an update state)."""
    directory = Path(directory)
    # a state's embeddings lie in its embeddings/ folder; an export's own shards lie beside its export.json, and a
    # folder named embeddings in it (another export written there) is not its vectors (embeddings_maker reads the
    # outer export.json, so the index recorded the wrong model too)
    if (directory / "state.json").is_file():
        directory = directory / "embeddings"
    files = sorted(directory.glob("part-*.parquet"))
    if (directory / "export.json").exists():  # an export: only shards whose marker says they are final
        files = [p for p in files if p.with_suffix(".done").exists()]
        try:
            planned = len(json.loads((directory / "export.json").read_text())["shards"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ModelInputError(f"{directory / 'export.json'}: damaged; re-run `qanchor embed` into a new out=") from None
        if len(files) < planned:  # killed, or other ranks still writing: an index of it would lack users, silently
            raise ModelInputError(f"{directory}: the export is unfinished ({len(files)} of {planned} shards done); re-run "
                                  "the same `qanchor embed` command to finish it")
    if not files:
        raise ModelInputError(f"{directory}: no finished embedding shards (part-*.parquet)")
    return files


def embeddings_maker(directory: str | Path) -> str | None:
    """The weights id (``QAnchor.weights_id``) of the model that wrote an export's (or an update state's) embeddings,
    as its export.json or state.json records it; None where neither says."""
    directory = Path(directory)
    for record in (directory / "export.json", directory / "state.json"):
        try:
            maker = json.loads(record.read_text()).get("checkpoint")
        except (OSError, ValueError, AttributeError):
            continue
        return maker if isinstance(maker, str) else None
    return None


def stored_query_ids(directory: str | Path) -> list[str]:
    """The query ids an export (or update state) holds: every shard holds every query of its users."""
    return sorted(set(pq.read_table(_finished_shards(directory)[0], columns=["query_id"]).column("query_id").to_pylist()))


def read_embeddings(directory: str | Path, query_id: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Finished shards of an export (or ``embeddings/`` of an update state) -> (user_ids, query_ids, [N, D])."""
    files = _finished_shards(directory)
    users, queries, vecs = [], [], []
    for path in files:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:  # a shard truncated or overwritten after its marker was written
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            reason = reason.split("': ", 1)[-1]  # pyarrow names the file first ("Could not open ... '<path>': "): said
            raise ModelInputError(f"{path}: damaged, not a readable Parquet file ({reason[:100]}); "
                                  f"{_how_to_rewrite(path)}") from None
        missing = [c for c in ("user_id", "query_id", "embedding") if c not in table.column_names]
        if missing or not pa.types.is_fixed_size_list(table.schema.field("embedding").type):
            lacks = ", ".join(missing) or "a fixed-size embedding column"
            raise ModelInputError(f"{path}: not an embedding shard (it lacks {lacks}); give the folder `qanchor embed` "
                                  "wrote (or a state's embeddings/)")
        if query_id is not None:
            table = table.filter(pc.equal(table.column("query_id"), query_id))
        dim = table.schema.field("embedding").type.list_size
        users.append(table.column("user_id").to_numpy(zero_copy_only=False))
        queries.append(table.column("query_id").to_numpy(zero_copy_only=False))
        vecs.append(np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, dim))  # (rows, D)
    return np.concatenate(users).astype(object), np.concatenate(queries).astype(object), np.concatenate(vecs)


def _how_to_rewrite(shard: Path) -> str:
    """What writes a damaged embedding shard again: an export's resume skips a shard marked done."""
    if (shard.parent / "export.json").is_file():
        return (f"delete it and {shard.with_suffix('.done').name}, then re-run the export (the same `qanchor embed` "
                "command) to write it again")
    if (shard.parent.parent / "state.json").is_file():
        return "rebuild the state (`qanchor update checkpoint=... data.path=... queries=... out=...`)"
    return "write the embeddings again"


def head_name(head: Head) -> str:
    """A head's task name (``ScenarioHead.task``), else its query."""
    return str(getattr(head, "task", None) or head.query)


def head_digest(head: Head) -> str:
    """A short hash of everything in a head that moves its embedding or score, so that a resumed export uses the very
    heads it started with: its query, every tensor it holds (prompt, prototypes and their labels, calibration, whitening,
    look-up) and its base temperature."""
    h = hashlib.sha256(str(head.query).encode())
    tensors = head.state_dict() if hasattr(head, "state_dict") else {"prompt": head.prompt}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    h.update(repr(getattr(head, "base_temperature", None)).encode())
    return h.hexdigest()[:16]


def plan_shards(ds: Dataset, shard_users: int | None = None) -> list[tuple[int, int, int]]:
    """Shards as (partition, start, stop) slices of the dataset's user partitions, in id order."""
    if shard_users is not None and shard_users < 1:
        raise ConfigError("shard_users must be >= 1")
    parts = ds.partitions
    shards = []
    for p in range(parts.count):
        n = len(parts.ids_of(p))
        step = shard_users or max(n, 1)
        shards += [(p, lo, min(lo + step, n)) for lo in range(0, n, step)]
    return shards


def _row_ids(queries: list[tuple[str, str]], heads: Sequence[Head]) -> list[str]:
    """The query id of each request's rows: the queries' own ids, then ``head:<task>`` per head; a repeat is refused
    (ModelInputError), since its rows could not be told apart in the export (nor in an index built from it)."""
    ids = [qid for qid, _ in queries] + [f"head:{head_name(h)}" for h in heads]
    seen: set[str] = set()
    for i, row_id in enumerate(ids):
        if row_id not in seen:
            seen.add(row_id)
            continue
        if i < len(queries):
            raise ModelInputError(f"query id {row_id!r} appears twice; ids must be unique")
        task = row_id.removeprefix("head:")
        if row_id in ids[:len(queries)]:
            raise ModelInputError(f"query id {row_id!r} names the rows of the head for task {task!r} too; rename the "
                                  "query (a head's rows are named head:<task>)")
        raise ModelInputError(f"two heads for task {task!r}; give each head once")
    return ids


def _recorded_model(out: Path) -> str | None:
    """The model id an export begun in ``out`` recorded (None: none begun, or its record is unreadable)."""
    try:
        found = json.loads((out / "export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found.get("checkpoint") if isinstance(found, dict) and isinstance(found.get("checkpoint"), str) else None


def _check_manifest(out: Path, expected: dict, overwrite: bool, world: int) -> None:
    path = out / "export.json"
    # done markers first: a kill part-way through a removal never leaves a shard marked done beside a new manifest
    shard_files = [*out.glob("part-*.done"), *out.glob("part-*.parquet")]
    if not path.exists() and shard_files:
        # shards without a manifest (an overwrite killed after removing it): what they hold is unknown, never reused
        if world > 1:
            raise ConfigError(f"{out} holds shards but no export.json (a replacement killed part-way?); run the export "
                              "once without torchrun to clear them")
        for p in shard_files:
            p.unlink()
    if path.exists():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:  # UnicodeDecodeError is one
            found = None
        if not isinstance(found, dict):  # it was told as "a different format (None != 2)"
            if not overwrite:
                raise ConfigError(f"{path}: damaged (not the JSON object `qanchor embed` writes), so what the shards "
                                  f"beside it hold is unknown; pass overwrite=true to replace the export, or choose "
                                  "another out=")
            found = {}
        diff = [k for k in expected if found.get(k) != expected[k]]
        if diff and not overwrite:
            raise ConfigError(f"{out} holds an export with a different {diff[0]} ({found.get(diff[0])!r} != "
                              f"{expected[diff[0]]!r}); choose another out=, or pass overwrite=true to replace it")
        if diff:
            if world > 1:
                raise ConfigError("overwrite=true replaces an export from a single process; run it without torchrun first")
            for p in [*shard_files, path]:  # the manifest last (above); only the export's own files: a marked export
                p.unlink()
        else:
            return
    write_text(json.dumps(expected, indent=2), path)  # every rank writes identical content: the race is benign


@releasing_outputs
def export_embeddings(model: QAnchor, ds: Dataset, queries: list[tuple[str, str]], out_dir: str | Path,
                      rank: int | None = None, world: int | None = None, shard_users: int | None = None,
                      use_cache: bool = True, cutoff: str | datetime | None = None, progress: bool = True,
                      on_shard_done: Callable[[int], None] | None = None, heads: Sequence[Head] = (),
                      overwrite: bool = False) -> ExportReport:
    """Embed every user of ``ds`` under ``queries`` (and ``heads``) into Parquet shards under ``out_dir``; resumable.

    ``cutoff`` defaults to the dataset's own cutoff (ages count from there). ``on_shard_done(i)`` is
    called after shard ``i`` is final (tests use it to simulate a kill).

    Example:
        >>> export_embeddings(QAnchor.from_pretrained("runs/synth"), load_dataset("data/synth"),
        ...                   read_queries("q.yaml"), "emb/")  # doctest: +SKIP
    """
    if rank is None or world is None:
        rank, world = rank_and_world()
    out = Path(out_dir)
    shards = plan_shards(ds, shard_users)
    if not queries and not heads:
        raise ModelInputError("nothing to embed: give queries and/or scenario heads")
    query_ids = _row_ids(queries, heads)
    requests = [(q, None) for _, q in queries] + [(h.query, h) for h in heads]
    # a bad cutoff, query, head or dataset layout fails before anything is written (a claimed folder holding only the
    # export's description was then "an export with a different dataset" to the corrected rerun)
    model.suffixes(requests)
    # recorded as ISO text (a datetime, as QAnchor.embed takes, was not JSON and failed after the claim)
    cutoff = ds.manifest.cutoff.isoformat() if not cutoff else (
        cutoff.isoformat() if isinstance(cutoff, datetime) else cutoff)
    model.cutoff_us(cutoff)
    adapt = record_adapter(ds.manifest, ds.tabular_columns, model.manifest, model.tabular_columns)
    claim_output_dir(out, OutputKind.EXPORT, {"data.path": ds.root, "checkpoint": model.checkpoint_dir}, key="out")
    if rank == 0:  # one export at a time (its ranks share it): another, say with overwrite=true, would mix the two
        hold_output(out, "embedding export")
    maker, recorded = model.weights_id(), _recorded_model(out)
    if recorded != maker and same_model(recorded, maker, f"the export {out}"):
        maker = recorded  # begun before model ids covered the config, by these weights: resumed as it was begun
    _check_manifest(out, {"format": FORMAT, "checkpoint": maker, "dataset": ds.partitions.directory.name,
                          "queries": [list(q) for q in queries], "heads": [[head_name(h), head_digest(h)] for h in heads],
                          "shards": [list(s) for s in shards], "cutoff": cutoff, "embedding_dim": model.embedding_dim,
                          "use_cache": use_cache, "event_caps": model.event_caps}, overwrite, world)
    mine = list(range(rank, len(shards), world))
    if not mine and progress:  # shards never depend on the world size, so extra ranks idle: say how to split
        n_users = sum(hi - lo for _, lo, hi in shards)
        warn(f"embed rank {rank}/{world} has no shard: the export has {len(shards)} shard(s) (by default one "
             f"per dataset partition); pass shard_users={max(1, -(-n_users // world))} or fewer to give every rank work")
    done = [i for i in mine if (out / f"part-{i:05d}.done").exists()]
    size = lambda i: shards[i][2] - shards[i][1]  # noqa: E731
    bar = Progress(sum(size(i) for i in mine), f"embed rank {rank}/{world}", "user", enabled=progress,
                   initial=sum(size(i) for i in done))
    start, users = time.perf_counter(), 0
    late_said = [False]  # events past the cutoff are said once per export, not once per shard
    for i in mine:
        if i in done:
            continue
        part, lo, hi = shards[i]
        records = (adapt(r) for r in ds.users(ds.partitions.ids_of(part)[lo:hi]))
        ids, chunks = [], []
        for chunk_ids, chunk in model.iter_embed(records, requests, use_cache, cutoff, late_said):
            ids += chunk_ids
            chunks.append(chunk)
            bar.update(len(chunk_ids))  # per batch: a shard is a whole partition, minutes at the paper's width
        emb = np.concatenate(chunks) if chunks else np.zeros((0, len(requests), model.embedding_dim), np.float32)  # (U, Q, D)
        scores = np.full(emb.shape[:2], np.nan, np.float32)  # (U, Q + n_heads)
        scores[:, len(queries):] = head_scores(heads, emb[:, len(queries):])
        write_parquet(embeddings_table(ids, query_ids, emb, scores), out / f"part-{i:05d}.parquet")
        failpoint("shard-written")
        write_text(json.dumps({"users": len(ids), "rows": len(ids) * len(requests)}), out / f"part-{i:05d}.done")
        users += len(ids)
        if on_shard_done is not None:
            on_shard_done(i)
    bar.close()
    if rank == 0 and world > 1:
        _await_other_ranks(out, len(shards), progress)
    return ExportReport(rank, world, len(shards), len(mine), len(done), len(mine) - len(done), users,
                        time.perf_counter() - start)


def _await_other_ranks(out: Path, n_shards: int, progress: bool, poll_s: float = 1.0) -> None:
    """Rank 0 holds the export's lock, and the other ranks write on after rank 0's own shards: were it released then,
    a second export (one with overwrite=true) could start and mix with them. So rank 0 returns once every shard is
    done (under torchrun a failing rank stops every rank, rank 0 too)."""
    said = time.monotonic()
    while left := [i for i in range(n_shards) if not (out / f"part-{i:05d}.done").exists()]:
        if progress and time.monotonic() - said >= 60:
            log(f"embed rank 0: waiting for the other ranks ({n_shards - len(left)} of {n_shards} shards done); the "
                "export stays locked until they finish")
            said = time.monotonic()
        time.sleep(poll_s)


def report_json(report: ExportReport) -> str:
    return json.dumps({**asdict(report), "users_per_s": round(report.users_per_s, 2)})
