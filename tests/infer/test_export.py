"""Batch export: matches embed(), resumes after a kill without redoing shards, rank split == one rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from qanchor.cli.common import print_record
from qanchor.errors import ConfigError, ModelInputError
from qanchor.infer.export import export_embeddings, read_embeddings, read_queries
from tests.conftest import QUERIES

PAIRS = [(f"q{i}", q) for i, q in enumerate(QUERIES)]


def _export(env, out: Path, **kwargs):
    kwargs.setdefault("rank", 0)
    kwargs.setdefault("world", 1)
    return export_embeddings(env.qa, env.ds, PAIRS, out, shard_users=7, progress=False, **kwargs)


def _table(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))]).sort_by([("user_id", "ascending"), ("query_id", "ascending")])


@pytest.fixture(scope="module")
def full_export(infer_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "full"
    report = _export(infer_env, out)
    return out, report


def test_export_matches_embed(infer_env, full_export):
    out, report = full_export
    assert report.shards_total == 6 and report.shards_written == 6 and report.users == infer_env.ds.num_users
    table = pq.read_table(out / "part-00000.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    assert table.column("query_id").to_pylist()[:3] == ["q0", "q1", "q2"]
    users, queries, vectors = read_embeddings(out, "q1")
    assert list(users) == list(infer_env.ds.user_ids) and set(queries) == {"q1"}
    direct = infer_env.qa.embed(infer_env.ds.users(), QUERIES)  # (U, Q, D)
    assert np.abs(vectors - direct[:, 1]).max() < 1e-5


class Killed(Exception):
    pass


def test_killed_export_resumes_without_redoing_shards(infer_env, full_export, tmp_path):
    out = tmp_path / "resumed"

    def die_after_two(i: int) -> None:
        if i == 1:
            raise Killed  # the process dies right after shard 1 became final

    with pytest.raises(Killed):
        _export(infer_env, out, on_shard_done=die_after_two)
    assert sorted(p.name for p in out.glob("*.done")) == ["part-00000.done", "part-00001.done"]
    # an unfinished export is not read (an index of it lacked 4 of 6 shards' users, silently)
    with pytest.raises(ModelInputError, match=r"the export is unfinished \(2 of 6 shards done\)"):
        read_embeddings(out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-0000[01].parquet")}
    redone: list[int] = []
    report = _export(infer_env, out, on_shard_done=redone.append)
    assert redone == [2, 3, 4, 5] and report.shards_skipped == 2
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("part-0000[01].parquet")}
    assert _table(out).equals(_table(full_export[0]))


def test_rank_split_equals_one_rank(infer_env, full_export, tmp_path):
    out = tmp_path / "ranks"
    reports = [_export(infer_env, out, rank=r, world=2) for r in (1, 0)]
    assert [r.shards_mine for r in reports] == [3, 3]
    assert _table(out).equals(_table(full_export[0]))


def test_rank_0_holds_the_export_until_every_rank_is_done(infer_env, full_export, tmp_path):
    """Under torchrun rank 0 holds the export's lock; it returned after its own shards, so a second export (one with
    overwrite=true) could start while the other ranks still wrote, and mix with them. It now waits for every shard."""
    import threading
    import time

    out = tmp_path / "ranks"
    rank0 = threading.Thread(target=_export, args=(infer_env, out), kwargs={"rank": 0, "world": 2})
    rank0.start()
    while len(list(out.glob("part-*.done"))) < 3:  # rank 0's own three shards
        time.sleep(0.05)
    time.sleep(1.5)
    assert rank0.is_alive()  # waiting for rank 1's shards, its lock held
    _export(infer_env, out, rank=1, world=2)
    rank0.join(timeout=30)
    assert not rank0.is_alive() and _table(out).equals(_table(full_export[0]))


def test_a_rank_without_a_shard_says_how_to_split(infer_env, tmp_path, capsys):
    """Shards never depend on the world size, so a rank beyond the shard count idles: it must say so, not stay silent."""
    users = sum(len(infer_env.ds.partitions.ids_of(p)) for p in range(infer_env.ds.partitions.count))
    report = export_embeddings(infer_env.qa, infer_env.ds, PAIRS[:1], tmp_path / "idle", rank=1, world=2, progress=True)
    assert report.shards_mine == 0 and report.shards_total == 1
    out = capsys.readouterr().err  # a warning: on stderr, never in the export's result on stdout
    assert "warning: embed rank 1/2 has no shard: the export has 1 shard(s)" in out
    assert f"pass shard_users={-(-users // 2)} or fewer" in out


def test_torchrun_two_ranks_equal_one_rank(infer_env, full_export, tmp_path):
    out = tmp_path / "torchrun"
    queries = tmp_path / "q.txt"
    queries.write_text("".join(f"{qid}\t{q}\n" for qid, q in PAIRS))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "qanchor.cli", "embed", f"checkpoint={infer_env.ckpt}",
           f"data.path={infer_env.ds_dir}", f"queries={queries}", f"out={out}", "shard_users=7",
           "batch_size=8", "--quiet"]
    # Unbuffered on purpose (CI's setting): each rank's report must still arrive as one whole line.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(json.loads(line)["rank"] for line in proc.stdout.splitlines() if line.startswith("{"))
    assert ranks == [0, 1]
    assert np.abs(read_embeddings(out)[2] - read_embeddings(full_export[0])[2]).max() < 1e-6
    assert _table(out).column("user_id").equals(_table(full_export[0]).column("user_id"))


def test_other_queries_into_same_dir_refused(infer_env, full_export):
    with pytest.raises(ConfigError, match="different queries"):
        export_embeddings(infer_env.qa, infer_env.ds, PAIRS[:1], full_export[0], rank=0, world=1, shard_users=7, progress=False)


def _refused(tmp_path: Path, name: str, text: str, match: str) -> None:
    """A queries file holding ``text`` is refused with an error matching ``match``."""
    (tmp_path / name).write_text(text)
    with pytest.raises(ModelInputError, match=match):
        read_queries(tmp_path / name)


def test_read_queries_formats(tmp_path):
    (tmp_path / "a.yaml").write_text("- Will this user churn?\n- Will this user pay?\n")
    (tmp_path / "b.yaml").write_text("churn: Will this user churn?\ncoupon: Will this user redeem a coupon?\n")
    (tmp_path / "c.yml").write_text("- {query_id: x, query: 'Is this user rich?'}\n")
    (tmp_path / "d.txt").write_text("# comment\nWill this user churn?\n\ncoupon\tWill this user redeem a coupon?\n")
    pq.write_table(pa.table({"query_id": ["p"], "query": ["Will they pay?"]}), tmp_path / "e.parquet")
    assert read_queries(tmp_path / "a.yaml") == [("q0", "Will this user churn?"), ("q1", "Will this user pay?")]
    assert [i for i, _ in read_queries(tmp_path / "b.yaml")] == ["churn", "coupon"]
    assert read_queries(tmp_path / "c.yml") == [("x", "Is this user rich?")]
    assert read_queries(tmp_path / "d.txt") == [("q0", "Will this user churn?"), ("coupon", "Will this user redeem a coupon?")]
    assert read_queries(tmp_path / "e.parquet") == [("p", "Will they pay?")]
    _refused(tmp_path, "dup.yaml", "- query_id: x\n  query: a?\n- query_id: x\n  query: b?\n", "appears twice")
    _refused(tmp_path, "bad.yaml", "- {a: b?}\n", "not valid YAML")
    _refused(tmp_path, "empty.txt", "# nothing\n", "no queries")
    # "churn<TAB>" is an id whose question is missing, not the question "churn"
    _refused(tmp_path, "tab.txt", "Will this user pay?\nchurn\t\n", r"tab.txt, line 2: 'id<TAB>question' with an empty question")
    # a head's rows are named head:<task>: a query of that id would be the same query id in an export
    _refused(tmp_path, "head.yaml", "head:churn: Will this user churn?\n", "'head:churn' starts with 'head:'")
    _refused(tmp_path, "null.yaml", "- query_id: null\n  query: Will this user churn?\n", "query None is empty")  # not id 'None'
    # ids as written: YAML 1.1 typing read 010 as 8, 007 as 7, yes as True and 1_000 as 1000, so `index build
    # query_id=010` found no such query in the export
    (tmp_path / "ids.yaml").write_text("007: Will it churn?\n010: Will it pay?\nyes: Is it rich?\n1_000: Will it buy?\n")
    assert [i for i, _ in read_queries(tmp_path / "ids.yaml")] == ["007", "010", "yes", "1_000"]
    (tmp_path / "ids2.yaml").write_text("- {query_id: 010, query: 'Will it pay?'}\n- {query_id: on, query: yes}\n")
    assert read_queries(tmp_path / "ids2.yaml") == [("010", "Will it pay?"), ("on", "yes")]
    _refused(tmp_path, "tilde.yaml", "churn: ~\n", "query 'churn' is empty")
    # quoting, anchors and merge keys keep YAML's meaning: "null" quoted is text, a merged entry is one more query
    (tmp_path / "yaml.yaml").write_text('na: "null"\n"null": Will this user buy?\n')
    assert read_queries(tmp_path / "yaml.yaml") == [("na", "null"), ("null", "Will this user buy?")]
    (tmp_path / "merge.yaml").write_text("- &base {query_id: a, query: 'Will it pay?'}\n- <<: *base\n  query_id: b\n")
    assert read_queries(tmp_path / "merge.yaml") == [("a", "Will it pay?"), ("b", "Will it pay?")]
    # a repeated id: YAML keeps the last, so a question was dropped without a word (a CSV's repeat is refused)
    _refused(tmp_path, "twice.yaml", "churn: Will it churn?\nchurn: Will it buy wine?\n",
             r"twice.yaml, line 2: query id 'churn' appears twice")
    # an editor's byte-order mark stayed in the first id ("\ufeffchurn") or question; a list is not an empty question
    (tmp_path / "bom.txt").write_bytes("\ufeffchurn\tWill this user stop paying?\n".encode("utf-8"))
    assert read_queries(tmp_path / "bom.txt") == [("churn", "Will this user stop paying?")]
    _refused(tmp_path, "list.yaml", "a: [1, 2]\n", "query 'a' must be a question in text, got list")


def test_an_export_is_refused_inside_an_output_replaced_whole(infer_env, tmp_path):
    """An export (or a state) written inside another run's checkpoint was deleted by that checkpoint's next save."""
    import shutil

    from qanchor.errors import OutputError

    other = tmp_path / "other-ckpt"
    shutil.copytree(infer_env.ckpt, other)
    with pytest.raises(OutputError, match=r"lies inside .*other-ckpt, a qanchor checkpoint"):
        _export(infer_env, other / "emb")
    assert not (other / "emb").exists()


def test_a_dataset_the_model_cannot_read_is_refused_before_the_folder_is_claimed(infer_env, tmp_path):
    """The folder was claimed and its description written first: the corrected rerun was then told the folder held
    "an export with a different dataset"."""
    from qanchor.data.dataset import load_dataset
    from tests.helpers import copy_dataset

    ds_dir = copy_dataset(infer_env.ds.root, tmp_path / "ds")
    table = pq.read_table(ds_dir / "tabular.parquet")
    pq.write_table(table.append_column("height", pa.array([1.7] * table.num_rows)), ds_dir / "tabular.parquet")
    with pytest.raises(Exception, match="'height' is unknown to the model"):
        export_embeddings(infer_env.qa, load_dataset(ds_dir), PAIRS, tmp_path / "emb", progress=False, rank=0, world=1)
    assert not (tmp_path / "emb").exists()


def test_a_datetime_cutoff_is_recorded_as_text(infer_env, tmp_path):
    """QAnchor.embed takes a datetime; the export put it in its JSON description and failed after the claim."""
    from datetime import datetime, timezone

    _export(infer_env, tmp_path / "a", cutoff=datetime(2024, 6, 30, tzinfo=timezone.utc))
    _export(infer_env, tmp_path / "b", cutoff="2024-06-30T00:00:00+00:00")
    assert _table(tmp_path / "a").equals(_table(tmp_path / "b"))


def test_read_queries_from_a_csv_with_its_header(tmp_path):
    """A CSV is what a spreadsheet or pandas writes; read as text lines, its header became a question and each id
    part of its question, silently."""
    (tmp_path / "q.csv").write_bytes("\ufeffquery_id,query\nchurn,Will this user churn?\n\n"
                                      'spend,"Will this user spend more, or less?"\n'.encode())
    assert read_queries(tmp_path / "q.csv") == [("churn", "Will this user churn?"),
                                                 ("spend", "Will this user spend more, or less?")]
    (tmp_path / "q.tsv").write_text("query\tnote\nWill this user pay?\tfirst\nIs this user rich?\tsecond\n")
    assert read_queries(tmp_path / "q.tsv") == [("q0", "Will this user pay?"), ("q1", "Is this user rich?")]
    _refused(tmp_path, "headless.csv", "Will this user churn?\nWill this user pay?\n", r"headless\.csv: a queries CSV needs a header row naming a 'query' column")
    _refused(tmp_path, "ragged.csv", "query_id,query\nspend,Will this user spend more, or less?\n", r"ragged\.csv, row 2: 3 fields where the header has 2")
    (tmp_path / "blank.csv").write_text("query_id,query\nx, \n")
    with pytest.raises(ModelInputError, match="is empty"):
        read_queries(tmp_path / "blank.csv")


def _head(qa, task: str, query: str, seed: int):
    from qanchor.tune.head import ScenarioHead

    gen = torch.Generator().manual_seed(seed)
    protos = torch.nn.functional.normalize(torch.randn(3, qa.embedding_dim, generator=gen), dim=-1)
    return ScenarioHead(task, query, torch.randn(4, qa.model.hidden_size, generator=gen) * 0.05, protos,
                        torch.tensor([0, 0, 1]), 0.1, qa.checkpoint_hash)


def test_export_with_heads_matches_api_and_cli(infer_env, tmp_path, capsys):
    from qanchor.cli import main

    heads = [_head(infer_env.qa, "churn", QUERIES[0], 1), _head(infer_env.qa, "coupon", QUERIES[2], 2)]
    out = tmp_path / "with_heads"
    export_embeddings(infer_env.qa, infer_env.ds, PAIRS[:1], out, rank=0, world=1, shard_users=7, progress=False,
                      heads=heads)
    table = _table(out)
    assert set(table.column("query_id").to_pylist()) == {"q0", "head:churn", "head:coupon"}
    plain = table.filter(pc.equal(table.column("query_id"), "q0"))
    assert plain.column("score").null_count == len(plain)  # plain queries have no score
    users = list(infer_env.ds.users())
    for head in heads:
        rows = table.filter(pc.equal(table.column("query_id"), f"head:{head.task}"))
        vectors = np.asarray(rows.column("embedding").combine_chunks().flatten()).reshape(len(rows), -1)
        assert np.abs(vectors - infer_env.qa.embed(users, [head.query], head=head)[:, 0]).max() < 1e-5
        assert np.allclose(rows.column("score").to_numpy(), infer_env.qa.score(users, head), atol=1e-4)
    # the CLI loads heads from a prompt-tune style folder and refuses heads of another checkpoint
    for head in heads:
        head.save(tmp_path / "heads" / head.task)
    args = ["embed", f"checkpoint={infer_env.ckpt}", f"data.path={infer_env.ds_dir}", "--quiet",
            f"text_cache_dir={infer_env.ds.text_cache_dir}"]
    assert main([*args, f"heads={tmp_path / 'heads'}", f"out={tmp_path / 'cli'}"]) == 0
    cli = _table(tmp_path / "cli")
    assert set(cli.column("query_id").to_pylist()) == {"head:churn", "head:coupon"}
    assert np.allclose(cli.column("score").to_numpy(), table.filter(pc.invert(
        pc.equal(table.column("query_id"), "q0"))).column("score").to_numpy(), atol=1e-5)
    from qanchor.tune.head import ScenarioHead

    stale = ScenarioHead("old", QUERIES[0], heads[0].prompt, heads[0].prototypes, heads[0].prototype_labels, 0.1, "0" * 64)
    stale.save(tmp_path / "stale" / "old")
    assert main([*args, f"heads={tmp_path / 'stale'}", f"out={tmp_path / 'cli2'}"]) == 2
    assert main([*args, f"out={tmp_path / 'cli3'}"]) == 2
    err = capsys.readouterr().err
    assert "tuned on checkpoint" in err and "queries=" in err


def test_rank_report_is_one_write(monkeypatch):
    """Two ranks share stdout: a report split into two writes (text, then newline) interleaves with the other's."""
    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    print_record('{"rank": 1}')
    assert writes == ['{"rank": 1}\n']


def test_shards_left_without_their_manifest_are_never_reused(infer_env, full_export, tmp_path):
    """An overwrite killed after it removed export.json and before it removed the shards: the next export under other
    queries must not take those shards (marked done) for its own."""
    import shutil

    out = tmp_path / "export"
    shutil.copytree(full_export[0], out)
    (out / "export.json").unlink()
    report = export_embeddings(infer_env.qa, infer_env.ds, PAIRS[:1], out, rank=0, world=1, shard_users=7, progress=False)
    assert report.shards_skipped == 0
    assert set(_table(out).column("query_id").to_pylist()) == {PAIRS[0][0]}
    with pytest.raises(ConfigError, match="no export.json"):
        (out / "export.json").unlink()
        export_embeddings(infer_env.qa, infer_env.ds, PAIRS[:1], out, rank=0, world=2, shard_users=7, progress=False)


def test_the_head_digest_sees_everything_that_moves_a_score(infer_env):
    """A resumed export keeps the heads it started with only if their digest covers the temperature, the whitening,
    the prototypes' labels and the query too (it covered prompt, prototypes, calibration and look-up)."""
    from qanchor.infer.export import head_digest
    from qanchor.tune.head import ScenarioHead

    qa, d = infer_env.qa, infer_env.qa.embedding_dim
    base = _head(qa, "churn", QUERIES[0], seed=1)

    def variant(**change):
        kw = dict(task="churn", query=QUERIES[0], prompt=base.prompt.detach(), prototypes=base.prototype_weights.detach(),
                  prototype_labels=base.prototype_labels, temperature=0.1, checkpoint_hash=qa.checkpoint_hash)
        return ScenarioHead(**{**kw, **change})

    assert head_digest(variant()) == head_digest(base)
    others = [variant(temperature=0.01), variant(whitening=(torch.zeros(d), -torch.eye(d))),
              variant(prototype_labels=torch.tensor([0, 1, 1])), variant(query=QUERIES[1])]
    digests = {head_digest(h) for h in others}
    assert len(digests) == len(others) and head_digest(base) not in digests


def test_progress_moves_per_batch_not_per_shard(infer_env, tmp_path, monkeypatch):
    """The counter moved only when a whole shard (a partition of up to 4,096 users) was done: on a cluster log a long
    shard ran silent for minutes, which reads as a hang."""
    from qanchor.infer import export as export_mod

    steps = []

    class Counting(export_mod.Progress):
        def update(self, n: int = 1) -> None:
            steps.append(n)
            super().update(n)

    monkeypatch.setattr(export_mod, "Progress", Counting)
    report = export_embeddings(infer_env.qa, infer_env.ds, PAIRS, tmp_path / "one", rank=0, world=1, shard_users=1000,
                               progress=False)
    assert report.shards_written == 1 and sum(steps) == report.users  # every user counted once
    assert len(steps) >= report.users // infer_env.qa.batch_size > 1  # in batches, within the one shard


def test_events_past_the_cutoff_are_said_once_per_export_not_per_shard(infer_env, tmp_path):
    """Each shard's embedding loop said it again (four lines with shard_users=30 on 120 users)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_embeddings(infer_env.qa, infer_env.ds, PAIRS[:1], tmp_path / "early", shard_users=7, progress=False,
                          cutoff="2024-03-01")
    late = [w for w in caught if "at or after the cutoff" in str(w.message)]
    assert len(late) == 1 and infer_env.ds.num_users > 7


def test_an_export_written_inside_an_exports_folder_is_not_read_as_its_embeddings(infer_env, full_export, tmp_path):
    """read_embeddings went into any embeddings/ folder (as into a state's), so an export written into an export's
    folder named embeddings/ was read in its place, and an index of it recorded the outer export's model."""
    import shutil

    out = tmp_path / "e"
    shutil.copytree(full_export[0], out)
    export_embeddings(infer_env.qa, infer_env.ds, [("other", "Is this user rich?")], out / "embeddings", rank=0, world=1,
                      progress=False)
    users, queries, vectors = read_embeddings(out)
    own_users, own_queries, own_vectors = read_embeddings(full_export[0])
    assert set(queries) == {qid for qid, _ in PAIRS} and list(queries) == list(own_queries)
    assert list(users) == list(own_users) and np.array_equal(vectors, own_vectors)
    assert set(read_embeddings(out / "embeddings")[1]) == {"other"}  # named itself, the inner export is read


def test_a_damaged_shard_or_export_description_is_one_error_line(infer_env, full_export, tmp_path):
    """A truncated shard ended `index build` in a pyarrow traceback; a damaged export.json was told on resume as "an
    export with a different format (None != 2)"."""
    import shutil

    out = tmp_path / "e"
    shutil.copytree(full_export[0], out)
    shard = out / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ModelInputError, match=r"part-00002\.parquet: damaged, not a readable Parquet file .*; delete it "
                                              r"and part-00002\.done, then re-run the export"):
        read_embeddings(out)
    shutil.copytree(full_export[0], tmp_path / "f")
    (tmp_path / "f" / "export.json").write_text('{"format": 2, "checkpoint": "unterminated')
    with pytest.raises(ConfigError, match=r"export\.json: damaged .*pass overwrite=true to replace the export"):
        _export(infer_env, tmp_path / "f")
    assert _export(infer_env, tmp_path / "f", overwrite=True).shards_written == 6
    assert _table(tmp_path / "f").equals(_table(full_export[0]))


@pytest.mark.parametrize("name", ["latin.csv", "latin.tsv", "latin.yaml", "latin.txt"])
def test_a_queries_file_not_in_utf8_is_one_error_line(tmp_path, name):
    """A spreadsheet's Latin-1 CSV (or a YAML or text file in another encoding) ended in a UnicodeDecodeError
    traceback."""
    text = {"latin.csv": "query\nWill the café customer churn?\n", "latin.tsv": "query\nWill the café customer churn?\n",
            "latin.yaml": "churn: Will the café customer churn?\n", "latin.txt": "Will the café customer churn?\n"}[name]
    offset = text.encode("latin-1").index(b"\xe9")
    (tmp_path / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(ModelInputError, match=rf"{name}: not UTF-8 text \(byte 0xe9 at offset {offset}\); save it as UTF-8"):
        read_queries(tmp_path / name)
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # the same in UTF-8, with an editor's BOM
    assert [q for _, q in read_queries(tmp_path / name)] == ["Will the café customer churn?"]


def test_a_repeated_head_or_row_id_is_refused_before_the_folder_is_claimed(infer_env, tmp_path):
    """Two heads of one task (or a query id that names a head's rows) were exported as two indistinguishable rows
    head:<task> per user; the query ids given in code were not checked for repeats either."""
    churn, again = _head(infer_env.qa, "churn", QUERIES[0], 1), _head(infer_env.qa, "churn", QUERIES[2], 2)
    out = tmp_path / "e"
    with pytest.raises(ModelInputError, match=r"^two heads for task 'churn'; give each head once$"):
        export_embeddings(infer_env.qa, infer_env.ds, PAIRS[:1], out, rank=0, world=1, progress=False,
                          heads=[churn, again])
    with pytest.raises(ModelInputError, match=r"query id 'head:churn' names the rows of the head for task 'churn' too"):
        export_embeddings(infer_env.qa, infer_env.ds, [("head:churn", QUERIES[1])], out, rank=0, world=1,
                          progress=False, heads=[churn])
    with pytest.raises(ModelInputError, match=r"query id 'q0' appears twice; ids must be unique"):
        export_embeddings(infer_env.qa, infer_env.ds, [PAIRS[0], ("q0", QUERIES[1])], out, rank=0, world=1,
                          progress=False)
    assert not out.exists()
