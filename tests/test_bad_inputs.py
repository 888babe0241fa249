"""The bad-input corpus: every user mistake ends in one ``error:`` line, exit 2, and touches nothing.

Each case builds what a user might hand qanchor (a wrong path, a damaged file, an output inside an input,
a directory full of someone else's files) and runs the real command line. The contract, checked for
every case: exit code 2; stderr is exactly one line starting with ``error:`` and naming what is wrong;
no traceback; the dataset, the checkpoint and every file the case marks as protected are byte-identical
afterwards (qanchor's own ``.qanchor_cache`` inside a dataset is the only thing it may add there).
A new command inherits the contract by adding rows here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qanchor.cli import main
from qanchor.data.io import OutputKind, claim_output_dir
from qanchor.infer.export import export_embeddings
from qanchor.infer.index import LookalikeIndex
from qanchor.tune.head import ScenarioHead
from tests.helpers import copy_dataset


@dataclass
class Case:
    name: str
    argv: Callable[[Path, object], list[str]]  # (case dir, workspace) -> arguments after `qanchor`
    match: str  # a fragment the one error line must contain
    protect: Callable[[Path, object], list[Path]] = field(default=lambda d, w: [])  # extra paths that must not change


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if rel.parts and rel.parts[0] == ".qanchor_cache":
            continue  # qanchor's own cache inside a dataset: allowed to grow
        h.update(str(rel).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ws(infer_env, tmp_path_factory):
    """Dataset (with UserU pairs), checkpoint, a head, an export and an index of the tiny model."""
    root = tmp_path_factory.mktemp("bad")
    ds = root / "ds"
    copy_dataset(infer_env.ds_dir, ds, with_userU=True)
    ckpt = infer_env.ckpt
    head = ScenarioHead("churn", "Will this user stop paying?", torch.zeros(2, infer_env.qa.model.hidden_size),
                        torch.nn.functional.normalize(torch.randn(2, 128), dim=-1), torch.tensor([0, 1]), 0.1,
                        infer_env.qa.checkpoint_hash)
    head.save(root / "heads" / "churn")
    export_embeddings(infer_env.qa, infer_env.ds, [("churn", "Will this user stop paying?")], root / "emb", progress=False)
    LookalikeIndex.from_embeddings(root / "emb", "churn").save(root / "churn.faiss")
    foreign = root / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my own work\n")
    (root / "a_file").write_text("not a directory\n")
    return type("W", (), {"root": root, "ds": ds, "ckpt": ckpt, "foreign": foreign, "file": root / "a_file",
                          "heads": root / "heads", "emb": root / "emb", "index": root / "churn.faiss"})


def _copy_ckpt(d: Path, w) -> Path:
    out = d / "ckpt"
    shutil.copytree(w.ckpt, out)
    return out


def _damaged_ckpt(how: str) -> Callable[[Path, object], list[str]]:
    def argv(d: Path, w) -> list[str]:
        ck = _copy_ckpt(d, w)
        weights = ck / "model.safetensors"
        if how == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif how == "random":
            weights.write_bytes(np.random.default_rng(0).bytes(4096))
        elif how == "meta":
            (ck / "qanchor.json").write_text("{not json")
        elif how == "no-tokenizer-json":  # a tokenizer rebuilt without its vocabulary loaded and numbered every token anew
            (ck / "tokenizer.json").unlink()
        elif how == "no-tokenizer-config":
            (ck / "tokenizer_config.json").unlink()
        elif how == "foreign-tokenizer":  # the sentence encoder's tokenizer: same words, none of qanchor's tokens
            from qanchor.data.text_cache import default_encoder_path
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(default_encoder_path() / name, ck / name)
        return ["embed", f"checkpoint={ck}", f"data.path={w.ds}", "queries=tasks", f"out={d / 'e'}"]
    return argv


def _damaged_head(how: str) -> Callable[[Path, object], list[str]]:
    def argv(d: Path, w) -> list[str]:
        heads = d / "heads"
        shutil.copytree(w.heads, heads)
        if how == "yaml":
            (heads / "churn" / "head.yaml").write_text("task: [unclosed\n")
        else:
            f = heads / "churn" / "head.safetensors"
            f.write_bytes(f.read_bytes()[:100])
        return ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}", f"heads={heads}", f"out={d / 'e'}"]
    return argv


def _damaged_index(how: str) -> Callable[[Path, object], list[str]]:
    def argv(d: Path, w) -> list[str]:
        idx = d / "x.faiss"
        for suffix in ("", ".users.parquet", ".json"):
            shutil.copy(f"{w.index}{suffix}", f"{idx}{suffix}")
        if how == "truncated":
            idx.write_bytes(idx.read_bytes()[:64])
        else:  # users of another (shorter) index
            pq.write_table(pa.table({"user_id": ["u001", "u002"]}), f"{idx}.users.parquet")
        return ["index", "search", f"index={idx}", "user=u001"]
    return argv


def _dataset_in_a_cache(d: Path, w) -> list[str]:
    """A qanchor output inside another dataset's cache folder (built there before such a place was refused):
    rebuilding the outer dataset replaced the directory whole, the inner one and its notes with it."""
    from data_tools.synth import build_synthetic
    from qanchor.data.io import OutputKind, mark_output

    build_synthetic(d / "outer", n_users=5, seed=0, progress=False)
    inner = d / "outer" / ".qanchor_cache" / "mine"
    inner.mkdir(parents=True)
    mark_output(inner, OutputKind.DATASET)
    (inner / "NOTES.txt").write_text("mine\n")
    return ["data", "synth", f"out={d / 'outer'}", "users=5", "seed=2"]


def _npy_file(d: Path, array: np.ndarray) -> Path:
    np.save(d / "vector.npy", array)
    return d / "vector.npy"


def _other_checkpoint(d: Path, w) -> Path:
    """A copy of the workspace's checkpoint with other weights (one changed number): another model."""
    from safetensors.torch import load_file, save_file

    other = d / "other-ckpt"
    shutil.copytree(w.ckpt, other)
    weights = load_file(other / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1.0
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    return other


def _json_file(d: Path, content: object) -> Path:
    path = d / "settings.json"
    path.write_text(json.dumps(content))
    return path


# prompt-tune settings under which a head's first step overflows its weights
_DIVERGING = {"lr": 1e30, "prototype_lr": 1e30, "temperature": 1e-30}


def _latin1_queries(d: Path) -> Path:
    """A spreadsheet's CSV saved in Latin-1: 'é' is byte 0xe9, at offset 18."""
    path = d / "latin.csv"
    path.write_bytes("query\nWill the café customer churn?\n".encode("latin-1"))
    return path


def _queries_file(d: Path, text: str, name: str) -> Path:
    path = d / name
    path.write_text(text)
    return path


def _labels_one_positive(d: Path, w) -> list[str]:
    ids = [f"u{u:03d}" for u in range(1, 30)]
    pq.write_table(pa.table({"user_id": ids, "label": [1] + [0] * 28}), d / "labels.parquet")
    return ["bench", f"data.path={w.ds}", f"labels={d / 'labels.parquet'}", "query=Will it?", "methods=[rfm_lgbm]",
            f"output_dir={d / 'b'}"]


def _labels_with_two_label_columns(d: Path, w) -> list[str]:
    (d / "labels.csv").write_text("user_id,label,label\n" + "".join(f"u{u:03d},{u % 2},1\n" for u in range(1, 30)))
    return ["bench", f"data.path={w.ds}", f"labels={d / 'labels.csv'}", "query=Will it?", "methods=[rfm_lgbm]",
            f"output_dir={d / 'b'}"]


def _bad_event_value(bad: float):
    """A dataset whose 4th event value is ``bad``, in a float64 column (1e300 is finite there, not in float32)."""
    def make(d: Path, w) -> list[str]:
        ds = d / "ds"
        shutil.copytree(w.ds, ds, ignore=shutil.ignore_patterns(".qanchor_cache"))
        part = sorted((ds / "events").glob("*.parquet"))[0]
        table = pq.read_table(part)
        value = table.column("value").to_numpy(zero_copy_only=False).astype(np.float64)
        value[3] = bad
        pq.write_table(table.set_column(table.schema.get_field_index("value"), "value", pa.array(value)), part)
        return ["data", "validate", str(ds)]
    return make


def _forged_resume(d: Path, w) -> list[str]:
    run = d / "run"
    claim_output_dir(run, OutputKind.RUN)
    tag = run / "ds_state" / "step-0000002"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"pickled by someone else")
    (run / "ds_state" / "latest").write_text("step-0000002")
    (run / "metrics.jsonl").write_text('{"step": 2}\n')
    return ["pretrain", "--config", "configs/pretrain/tiny-synth.yaml", f"data.path={w.ds}", f"output_dir={run}",
            "resume=true", "train.batch_size=4"]


def _resume_state_without_its_checkpoint(d: Path, w) -> list[str]:
    """Sealed resume state whose checkpoint/ was moved away (to serve it), or that overwrite=true, killed between the
    two removals, left: resumed under any settings, since only checkpoint/config.yaml was compared."""
    from qanchor.train.seal import seal_tag

    argv = _forged_resume(d, w)
    seal_tag(d / "run" / "ds_state" / "step-0000002")
    return [*argv, "train.lr=0.5"]


def _existing_export(d: Path, w) -> list[str]:
    out = d / "emb"
    shutil.copytree(w.emb, out)
    return ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "queries=tasks", f"out={out}"]


def _no_tasks(d: Path, w) -> list[str]:
    import yaml

    ds = copy_dataset(w.ds, d / "ds")
    manifest = yaml.safe_load((ds / "manifest.yaml").read_text())
    manifest.pop("tasks", None)
    (ds / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    shutil.rmtree(ds / "tasks")
    return ["embed", f"checkpoint={w.ckpt}", f"data.path={ds}", "queries=tasks", f"out={d / 'e'}"]


def _foreign_userU(d: Path, w) -> list[str]:
    ds = d / "ds"
    shutil.copytree(w.ds, ds, ignore=shutil.ignore_patterns(".qanchor_cache", "userU.parquet"))
    pq.write_table(pq.read_table(w.ds / "userU.parquet").replace_schema_metadata({}), ds / "userU.parquet")
    return ["data", "userU", str(ds)]


def _synth_over_own_pairs(d: Path, w) -> list[str]:
    """A qanchor dataset holding pairs of the user's own: rebuilding it would replace the directory, pairs and all."""
    _foreign_userU(d, w)
    return ["data", "synth", f"out={d / 'ds'}", "users=20"]


def _synth_over_own_files(d: Path, w) -> list[str]:
    """A qanchor dataset holding a labels file, a task file and notes of the user's own: a rebuild replaced the
    directory whole and they were gone."""
    ds = copy_dataset(w.ds, d / "ds")
    (ds / "wine_labels.csv").write_text("user_id,label\nu001,1\n")
    (ds / "tasks" / "my_task.parquet").write_bytes((ds / "tasks" / "churn.parquet").read_bytes())
    (ds / "notes").mkdir()
    (ds / "notes" / "README.txt").write_text("mine")
    return ["data", "synth", f"out={ds}", "users=20"]


def _manifest_not_utf8(d: Path, w) -> list[str]:
    ds = copy_dataset(w.ds, d / "ds")
    (ds / "manifest.yaml").write_bytes("# Caf\u00e9 data\n".encode("latin-1") + (ds / "manifest.yaml").read_bytes())
    return ["data", "validate", str(ds)]


def _head_with_bad_value(d: Path, w) -> list[str]:
    import yaml

    heads = d / "heads"
    shutil.copytree(w.heads, heads)
    meta = yaml.safe_load((heads / "churn" / "head.yaml").read_text())
    (heads / "churn" / "head.yaml").write_text(yaml.safe_dump({**meta, "temperature": "abc"}))
    return ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}", f"heads={heads}", f"out={d / 'e'}"]


def _damaged_state(d: Path, w) -> list[str]:
    state = d / "state"
    claim_output_dir(state, OutputKind.STATE)
    (state / "state.json").write_text('{"format": 1, "checkpoint": "unterminated')
    return ["update", f"checkpoint={w.ckpt}", f"state={state}", f"out={d / 's1'}"]


def _state_described(d: Path, w) -> Path:
    """A state folder whose state.json is whole (its shards are not needed by the checks that come first)."""
    state = d / "state"
    claim_output_dir(state, OutputKind.STATE)
    (state / "state.json").write_text(json.dumps({"checkpoint": None, "as_of": "2024-06-30T00:00:00+00:00",
                                                  "queries": [["q", "Will it?"]], "bounds": [], "caps": {"bill": 8},
                                                  "n_users": 0, "history": [], "format": 2}))
    return state


def _damaged_export(what: str) -> Callable[[Path, object], list[str]]:
    def argv(d: Path, w) -> list[str]:
        out = d / "emb"
        shutil.copytree(w.emb, out)
        if what == "shard":
            shard = out / "part-00000.parquet"
            shard.write_bytes(shard.read_bytes()[:100])
            return ["index", "build", f"embeddings={out}", "query_id=churn", f"out={d / 'churn.faiss'}", "--quiet"]
        (out / "export.json").write_text('{"format": 2, "checkpoint": "unterminated')
        return ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}", f"queries={_queries_file(d, CSV, 'q.csv')}",
                f"out={out}"]
    return argv


def _first_state(w, d: Path, *extra: str) -> list[str]:
    return ["update", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "queries=tasks", f"out={d / 's0'}", *extra]


CSV = "query_id,query\nq,Will it?\n"


def _pretrain(w, *extra: str) -> list[str]:
    return ["pretrain", "--config", "configs/pretrain/tiny-synth.yaml", f"data.path={w.ds}", "train.batch_size=4", *extra]


CASES = [
    # data loss: outputs inside inputs, inputs inside outputs, someone else's directory
    Case("update-out-is-dataset", lambda d, w: ["update", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "queries=tasks",
                                               f"out={w.ds}"], "is inside the input data.path"),
    Case("update-out-contains-state", lambda d, w: ["update", f"checkpoint={w.ckpt}", f"state={d / 'parent' / 'state0'}",
                                                   f"out={d / 'parent'}"], "contains the input state"),
    Case("synth-into-foreign-dir", lambda d, w: ["data", "synth", f"out={w.foreign}", "users=20"], "qanchor did not create",
         lambda d, w: [w.foreign]),
    Case("synth-inside-another-dataset", lambda d, w: ["data", "synth", f"out={w.ds / '.qanchor_cache' / 'mine'}",
                                                       "users=5"], "lies inside"),
    Case("synth-over-a-dataset-holding-another-in-its-cache", _dataset_in_a_cache, ".qanchor_cache/mine",
         protect=lambda d, w: [d / "outer"]),
    Case("synth-negative-seed", lambda d, w: ["data", "synth", f"out={d / 's'}", "users=5", "seed=-1"], "seed must be >= 0"),
    Case("completejourney-cutoff-with-a-time-of-day", lambda d, w: ["data", "completejourney", f"out={d / 'cj'}",
                                                                    "cutoff=2017-09-30T18:00"], "is a date (midnight UTC)"),
    Case("completejourney-into-foreign-dir", lambda d, w: ["data", "completejourney", f"out={w.foreign}"],
         "qanchor did not create", lambda d, w: [w.foreign]),
    Case("embed-out-inside-dataset", lambda d, w: ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "queries=tasks",
                                                  f"out={w.ds / 'events'}"], "inside the input data.path"),
    Case("embed-into-foreign-dir", lambda d, w: ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "queries=tasks",
                                                f"out={w.foreign}"], "qanchor did not create", lambda d, w: [w.foreign]),
    Case("bench-mistyped-method", lambda d, w: ["bench", "methods=[rfm_lr, qanchor_taks]"], "methods: unknown ['qanchor_taks']"),
    Case("bench-out-is-dataset", lambda d, w: ["bench", f"data.path={w.ds}", "methods=[rfm_lgbm]", f"output_dir={w.ds}"],
         "inside the input data.path"),
    Case("prompt-tune-missing-checkpoint", lambda d, w: ["prompt-tune", f"checkpoint={d / 'no-such-run'}", f"data.path={w.ds}",
                                                        f"output_dir={d / 'heads'}"], "no such checkpoint directory"),
    Case("prompt-tune-out-is-checkpoint", lambda d, w: ["prompt-tune", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                                       f"output_dir={w.ckpt / 'heads'}"], "inside the input checkpoint"),
    # a question in bytes that are not UTF-8 (Python decodes argv with surrogates): a TypeError deep in the tokenizer
    # after the output folder was claimed (prompt-tune), a UnicodeEncodeError writing the journal's key (bench)
    Case("prompt-tune-query-not-unicode", lambda d, w: ["prompt-tune", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                                       f"labels={_labels_one_positive(d, w)[2].split('=', 1)[1]}",
                                                       "query=Will it \udcff?", f"output_dir={d / 'heads'}"],
         "query: the value given is not valid Unicode text (character 8)"),
    Case("bench-query-not-unicode", lambda d, w: [*_labels_one_positive(d, w)[:3], "query=Will it \udcff?",
                                                 "methods=[rfm_lgbm]", f"output_dir={d / 'b'}"],
         "query: the value given is not valid Unicode text"),
    Case("pretrain-out-is-foreign", lambda d, w: _pretrain(w, f"output_dir={w.foreign}"), "qanchor did not create",
         lambda d, w: [w.foreign]),
    Case("userU-over-foreign-pairs", _foreign_userU, "was not written by `qanchor data userU`"),
    Case("dataset-rebuild-over-own-pairs", _synth_over_own_pairs, "was not written by `qanchor data userU`",
         lambda d, w: [d / "ds"]),
    Case("dataset-rebuild-over-own-files", _synth_over_own_files,
         "holds files a dataset build does not write ('notes', 'tasks/my_task.parquet', 'wine_labels.csv')",
         lambda d, w: [d / "ds"]),
    Case("manifest-not-utf8", _manifest_not_utf8, "not UTF-8 text (byte 0xe9", lambda d, w: [d / "ds"]),
    Case("embed-over-other-export", _existing_export, "overwrite=true"),
    Case("embed-task-queries-of-a-dataset-without-tasks", _no_tasks, "declares no tasks; give queries="),
    Case("embed-out-inside-a-head", lambda d, w: ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                                  f"heads={w.heads / 'churn'}", f"out={w.heads / 'churn' / 'emb'}"],
         "is inside the input heads[0]"),
    Case("embed-head-with-a-bad-value", _head_with_bad_value, "temperature 'abc' is not a positive number"),
    Case("update-damaged-state", _damaged_state, "not valid JSON; the state is damaged"),
    Case("index-build-of-an-export-with-a-damaged-shard", _damaged_export("shard"),
         "part-00000.parquet: damaged, not a readable Parquet file (Parquet magic bytes not found in footer."),
    Case("embed-resumed-over-a-damaged-export-description", _damaged_export("description"),
         "export.json: damaged (not the JSON object `qanchor embed` writes)"),
    Case("queries-not-utf8", lambda d, w: ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                          f"queries={_latin1_queries(d)}",
                                          f"out={d / 'e'}"], "latin.csv: not UTF-8 text (byte 0xe9 at offset 18)"),
    # a first state reads the dataset's events: these were dropped without a word (a missing events file too)
    Case("update-first-state-with-events", lambda d, w: _first_state(w, d, f"events=[{d / 'no-such-day.parquet'}]"),
         "events= applies to an update (state=...)"),
    Case("update-first-state-full", lambda d, w: _first_state(w, d, "full=true"), "full=true applies to an update"),
    Case("update-task-queries-of-a-state", lambda d, w: ["update", f"checkpoint={w.ckpt}", f"state={_state_described(d, w)}",
                                                        "queries=tasks", f"out={d / 's1'}"],
         "task queries come from a dataset's manifest, so they exist only when building a first state"),
    # checked before any long work
    Case("pretrain-missing-dataset", lambda d, w: ["pretrain", f"data.path={w.ds / 'missing'}"],
         "dataset directory not found"),
    Case("pretrain-without-pairs", lambda d, w: (shutil.copytree(w.ds, d / "ds", ignore=shutil.ignore_patterns(
        "userU.parquet", ".qanchor_cache")), _pretrain(w, f"data.path={d / 'ds'}"))[1], "needs UserU pairs"),
    Case("pretrain-batch-bigger-than-pairs", lambda d, w: _pretrain(w, "train.batch_size=100000"), "fewer than one global batch"),
    Case("pretrain-future-window-past-the-data", lambda d, w: _pretrain(w, "loss.future_weight=1", "loss.future_days=100000",
                                                                       f"output_dir={d / 'p'}"), "lower loss.future_days"),
    Case("pretrain-out-is-file", lambda d, w: _pretrain(w, f"output_dir={w.file}"), "is a file", lambda d, w: [w.file]),
    Case("pretrain-out-under-a-file", lambda d, w: _pretrain(w, f"output_dir={w.file / 'run'}"),
         "is a file, not a directory; give a path under a directory", lambda d, w: [w.file]),
    Case("pretrain-unknown-modality-cap", lambda d, w: _pretrain(w, "data.max_events={purchase: 48}"), "does not have"),
    Case("pretrain-bad-encoder-path", lambda d, w: _pretrain(w, "data.text_encoder.path=/nonexistent/encoder"),
         "cannot load a sentence encoder"),
    Case("pretrain-bf16-on-cpu", lambda d, w: _pretrain(w, "train.precision=bf16"), "needs CUDA"),
    Case("pretrain-forged-resume-state", _forged_resume, "refusing to resume"),
    Case("pretrain-resume-state-without-its-checkpoint", _resume_state_without_its_checkpoint,
         "but not the checkpoint/ saved with it"),
    Case("labels-column-twice", _labels_with_two_label_columns, "column 'label' appears 2 times"),
    Case("prompt-tune-device-gpu", lambda d, w: ["prompt-tune", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                                f"output_dir={d / 'heads'}", "device=gpu"], "device"),
    Case("prompt-tune-device-cuda", lambda d, w: ["prompt-tune", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                                 f"output_dir={d / 'heads'}", "device=cuda"], "no CUDA GPU"),
    Case("embed-device-cuda", lambda d, w: ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "queries=tasks",
                                           f"out={d / 'e'}", "device=cuda"], "no CUDA GPU"),
    Case("embed-bad-cutoff", lambda d, w: ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "queries=tasks",
                                          f"out={d / 'e'}", "cutoff=tomorrow"], "not an ISO datetime"),
    Case("embed-out-is-file", lambda d, w: ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "queries=tasks",
                                           f"out={w.file}"], "is a file", lambda d, w: [w.file]),
    Case("embed-out-under-a-file", lambda d, w: ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "queries=tasks",
                                                f"out={w.file / 'e'}"], "is a file, not a directory", lambda d, w: [w.file]),
    Case("queries-a-question-too-long-for-a-file-name", lambda d, w: ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                                                     "queries=" + "word " * 400, f"out={d / 'e'}"],
         "queries= takes a file of questions"),
    Case("queries-csv-named-parquet", lambda d, w: ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                                   "queries=" + str(_queries_file(d, CSV, "q.parquet")),
                                                   f"out={d / 'e'}"], "not a readable Parquet file"),
    Case("query-too-long", lambda d, w: ["embed", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                        f"queries={_queries_file(d, 'word ' * 5000, 'q.txt')}", f"out={d / 'e'}"],
         "more than model.max_query_tokens"),
    # damaged files
    Case("checkpoint-truncated-weights", _damaged_ckpt("truncated"), "truncated"),
    Case("checkpoint-random-weights", _damaged_ckpt("random"), "not a safetensors file"),
    Case("checkpoint-garbage-meta", _damaged_ckpt("meta"), "not valid JSON"),
    Case("checkpoint-without-tokenizer-vocabulary", _damaged_ckpt("no-tokenizer-json"), "the tokenizer's vocabulary is missing"),
    Case("checkpoint-without-tokenizer-config", _damaged_ckpt("no-tokenizer-config"), "tokenizer_config.json is missing"),
    Case("checkpoint-with-another-models-tokenizer", _damaged_ckpt("foreign-tokenizer"), "the model was saved with"),
    Case("head-garbage-yaml", _damaged_head("yaml"), "not valid YAML"),
    Case("head-truncated-weights", _damaged_head("weights"), "truncated"),
    Case("index-truncated", _damaged_index("truncated"), "not a faiss index"),
    Case("index-mismatched-files", _damaged_index("mismatched"), "do not belong together"),
    Case("index-build-out-is-dir", lambda d, w: ["index", "build", f"embeddings={w.emb}", "query_id=churn",
                                                f"out={w.foreign}"], "is a directory", lambda d, w: [w.foreign]),
    Case("index-build-over-foreign-file", lambda d, w: ["index", "build", f"embeddings={w.emb}", "query_id=churn",
                                                       f"out={w.file}"], "not part of a qanchor index",
         lambda d, w: [w.file]),
    Case("inf-event-value", _bad_event_value(np.inf), "infinite value"),
    Case("event-value-beyond-float32", _bad_event_value(1e300), "beyond float32 range"),
    # silent or surprising results made loud
    Case("bench-single-positive", _labels_one_positive, "fewer than 2 users in its minority class"),
    Case("index-search-matrix-vector", lambda d, w: ["index", "search", f"index={w.index}",
                                                    f"vector={_npy_file(d, np.ones((2, 128), np.float32))}"],
         "give one vector (a 1-d array or one row)"),
    Case("index-search-other-models-vector", lambda d, w: ["index", "search", f"index={w.index}", "vector=" + ",".join(["1"] * 128),
                                                          f"checkpoint={_other_checkpoint(d, w)}"],
         "the vector was embedded by model"),
    Case("ask-empty-options", lambda d, w: ["ask", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "user=u001", "Which?",
                                           "options=[]"], "at least 2"),
    Case("index-search-k0", lambda d, w: ["index", "search", f"index={w.index}", "user=u001", "k=0"], "k must be >= 1"),
    Case("index-search-nan-vector", lambda d, w: ["index", "search", f"index={w.index}", "vector=" + ",".join(["nan"] * 128)],
         "NaN"),
    Case("synth-zero-users", lambda d, w: ["data", "synth", f"out={d / 's'}", "users=0"], "users must be >= 1"),
    Case("completejourney-bad-cutoff", lambda d, w: ["data", "completejourney", f"out={d / 'c'}", "cutoff=notadate"],
         "not an ISO date"),
    # asking the model in words
    Case("ask-unknown-user", lambda d, w: ["ask", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "user=nobody", "Why?"],
         "not in dataset"),
    Case("ask-empty-question", lambda d, w: ["ask", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "user=u001", "question= "],
         "no question given"),
    Case("ask-one-option", lambda d, w: ["ask", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "user=u001", "Which?",
                                        "options=[only]"], "at least 2"),
    Case("describe-unknown-aspect", lambda d, w: ["describe", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "user=u001",
                                                 "aspects=[horoscope]"], "unknown profile aspects"),
    Case("uqa-checkpoint-without-holdout", lambda d, w: ["uqa", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                                        f"output_dir={d / 'u'}"], "train.holdout_users=0"),
    # an empty output folder (`output_dir=$OUT`, $OUT unset) was the working folder
    Case("pretrain-empty-output-dir", lambda d, w: _pretrain(w, "output_dir="), "output_dir is not set"),
    Case("bench-empty-output-dir", lambda d, w: ["bench", f"data.path={w.ds}", "methods=[rfm_lgbm]", "output_dir="],
         "output_dir is not set"),
    Case("prompt-tune-empty-output-dir", lambda d, w: ["prompt-tune", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                                      "output_dir="], "output_dir is not set"),
    Case("uqa-empty-output-dir", lambda d, w: ["uqa", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "output_dir="],
         "output_dir is not set"),
    Case("pretrain-text-events-for-token-model", lambda d, w: _pretrain(w, "data.text_events=8"), "model.user_input=text"),
    # a setting that names another config file
    Case("bench-missing-prompt-tune-config", lambda d, w: ["bench", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                                          f"prompt_tune_config={d / 'none.yaml'}", f"output_dir={d / 'b'}"],
         "prompt_tune_config:"),
    Case("bench-prompt-tune-config-with-caps",  # the per-fold heads pack as the checkpoint: the cap would be ignored
         lambda d, w: ["bench", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "methods=[qanchor_head]",
                       f"prompt_tune_config={_json_file(d, {'data': {'default_max_events': 1}, 'steps': 2})}",
                       f"output_dir={d / 'b'}"], "data.default_max_events is set"),
    # settings under which a head's weights overflow: its scores turn NaN, and the AUC refused them with a traceback
    Case("bench-per-fold-head-diverges", lambda d, w: ["bench", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                                      "methods=[qanchor_head]", "tasks=[churn]", "head_steps=2",
                                                      f"prompt_tune_config={_json_file(d, _DIVERGING)}", f"output_dir={d / 'b'}"],
         "task churn, fold 1 of 5: tuning the head diverged"),
    Case("prompt-tune-head-diverges", lambda d, w: ["prompt-tune", f"checkpoint={w.ckpt}", f"data.path={w.ds}", "task=churn",
                                                   "steps=2", "eval_every=2", "batch_size=8", "prefix_chunk=16",
                                                   *(f"{k}={v}" for k, v in _DIVERGING.items()), f"output_dir={d / 'heads'}"],
         "(the training loss at step 2 is not finite) under lr=1e+30, prototype_lr=1e+30, temperature=1e-30; lower lr"),
    Case("bench-zero-prompt-tokens-ablation", lambda d, w: ["bench", f"checkpoint={w.ckpt}", f"data.path={w.ds}",
                                                           "ablations=true", "ablation_prompt_tokens=[2,0]",
                                                           f"output_dir={d / 'b'}"], "ablation_prompt_tokens: 0"),
    Case("pretrain-holding-out-every-user", lambda d, w: _pretrain(w, "train.holdout_users=0.999999", f"output_dir={d / 'p'}"),
         "holds out every one"),
    Case("pretrain-deepspeed-config-with-other-accumulation",
         lambda d, w: _pretrain(w, f"train.deepspeed_config={_json_file(d, {'gradient_accumulation_steps': 2})}",
                                f"output_dir={d / 'p'}"), "gradient_accumulation_steps=2"),
    Case("pretrain-missing-deepspeed-config", lambda d, w: _pretrain(w, f"train.deepspeed_config={d / 'none.json'}",
                                                                    f"output_dir={d / 'p'}"), "train.deepspeed_config:"),
    # the convention itself
    Case("flags-instead-of-settings", lambda d, w: ["embed", "--model", str(w.ckpt)], "key=value"),
    Case("unknown-setting", lambda d, w: ["embed", f"checkpoint={w.ckpt}", "queriez=tasks"], "unknown key 'queriez'"),
    Case("missing-required-setting", lambda d, w: ["embed", f"data.path={w.ds}", f"out={d / 'e'}"], "checkpoint is not set"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_error_line_and_touches_nothing(case: Case, ws, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # configs/ paths resolve from the repository
    argv = case.argv(tmp_path, ws)
    protected = [ws.ds, ws.ckpt, ws.heads, ws.emb, *case.protect(tmp_path, ws)]
    before = {p: _tree_digest(p) for p in protected}
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, f"exit {code}, stderr: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert "Traceback" not in err and case.match in lines[0], lines[0]
    assert {p: _tree_digest(p) for p in protected} == before, "an input or foreign file changed"


def test_a_resume_key_others_could_replace_stops_pretraining_before_it_trains(ws, tmp_path, capsys, monkeypatch):
    """The key is read at the first save: a refused one stopped the run after save_every steps (1,000 in the paper's
    config) and the training was lost. Preflight reads it first."""
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("QANCHOR_RESUME_KEY", str(shared / "resume.key"))
    capsys.readouterr()
    assert main(_pretrain(ws, f"output_dir={tmp_path / 'run'}", "train.max_steps=2")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the folder of the resume key") and "open to other users" in err, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_failed_embed_does_not_block_its_corrected_rerun(ws, tmp_path, capsys):
    base = ["embed", f"checkpoint={ws.ckpt}", f"data.path={ws.ds}", "queries=tasks", f"out={tmp_path / 'e'}", "--quiet"]
    assert main([*base, "cutoff=tomorrow"]) == 2
    assert main(base) == 0
    capsys.readouterr()
