"""The `embed`, `update` and `index` subcommands end to end, and their one-line errors."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from qanchor.cli import main
from qanchor.data.schema import events_table


def test_embed_index_update_commands(infer_env, tmp_path, capsys):
    common = [f"checkpoint={infer_env.ckpt}", "--quiet"]
    (tmp_path / "q.yaml").write_text("churn: Will this user stop paying?\ncoupon: Will this user redeem a coupon?\n")
    assert main(["embed", *common, f"data.path={infer_env.ds_dir}", f"queries={tmp_path / 'q.yaml'}",
                 f"out={tmp_path / 'emb'}"]) == 0
    assert json.loads(capsys.readouterr().out)["users"] == infer_env.ds.num_users
    assert main(["index", "build", f"embeddings={tmp_path / 'emb'}", "query_id=coupon",
                 f"out={tmp_path / 'coupon.faiss'}"]) == 0
    capsys.readouterr()
    assert main(["index", "search", f"index={tmp_path / 'coupon.faiss'}", "user=u003", "k=3", "json=true"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and "u003" not in {h["user_id"] for h in hits}

    assert main(["update", *common, f"data.path={infer_env.ds_dir}", "queries=tasks", f"out={tmp_path / 's0'}",
                 f"text_cache_dir={tmp_path / 'text'}"]) == 0
    day = events_table(infer_env.ds.manifest, {"user_id": ["u004"], "modality": ["app"], "ts": [1719741600000000],
                                               "text": ["Opened Alipay"], "value": [None]})
    pq.write_table(day, tmp_path / "day.parquet")
    capsys.readouterr()
    assert main(["update", *common, f"state={tmp_path / 's0'}", f"events={tmp_path / 'day.parquet'}",
                 f"out={tmp_path / 's1'}", f"text_cache_dir={tmp_path / 'text'}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["users_changed"] == 1 and report["modality_encodings_run"] == 1
    assert main(["index", "build", f"embeddings={tmp_path / 's1'}", "query_id=churn",
                 f"out={tmp_path / 'churn.faiss'}"]) == 0

    (tmp_path / "bad.txt").write_text("\n")
    assert main(["embed", *common, f"data.path={infer_env.ds_dir}", f"queries={tmp_path / 'bad.txt'}",
                 f"out={tmp_path / 'e2'}"]) == 2
    assert "error: " in capsys.readouterr().err
    assert main(["index", "search", f"index={tmp_path / 'coupon.faiss'}", "user=nobody"]) == 2


def test_event_caps_set_on_the_command_line_pack_users_and_are_kept(infer_env, tmp_path, capsys):
    """data.max_events / default_max_events on embed, update and ask pack users with those caps (they used to be
    accepted and dropped); an export records them, so resuming it under other caps is refused, and a state's updates
    pack with the caps it was built with."""
    import numpy as np

    from qanchor.config import DataOverrides
    from qanchor.infer.api import QAnchor
    from qanchor.infer.export import read_embeddings

    common = [f"checkpoint={infer_env.ckpt}", "--quiet", f"data.path={infer_env.ds_dir}", "queries=tasks"]
    one = ["data.default_max_events=1"]
    assert main(["embed", *common, f"out={tmp_path / 'full'}"]) == 0
    assert main(["embed", *common, *one, f"out={tmp_path / 'one'}"]) == 0
    users, _, full = read_embeddings(tmp_path / "full")
    _, _, capped = read_embeddings(tmp_path / "one")
    assert np.abs(full - capped).max() > 1e-3  # the caps took effect
    qa = QAnchor.from_pretrained(infer_env.ckpt, text_cache=infer_env.cache)
    qa.use_packing(DataOverrides(default_max_events=1))
    queries = [t.query for t in infer_env.ds.tasks.values()]
    direct = qa.embed(list(infer_env.ds.users()), queries, cutoff=infer_env.ds.manifest.cutoff.isoformat())
    np.testing.assert_allclose(capped, direct.reshape(-1, direct.shape[-1]), atol=1e-5)
    assert json.loads((tmp_path / "one" / "export.json").read_text())["event_caps"] == qa.event_caps
    capsys.readouterr()
    assert main(["embed", *common, f"out={tmp_path / 'one'}"]) == 2  # the same out under other caps: not resumed
    assert "overwrite=true" in capsys.readouterr().err
    assert main(["embed", *common, "data.max_events={nosuch: 3}", f"out={tmp_path / 'typo'}"]) == 2
    assert "data.max_events names ['nosuch']" in capsys.readouterr().err

    assert main(["update", *common, *one, f"out={tmp_path / 's0'}", f"text_cache_dir={tmp_path / 'text'}"]) == 0
    state = json.loads((tmp_path / "s0" / "state.json").read_text())
    assert set(state["caps"].values()) == {1}
    day = events_table(infer_env.ds.manifest, {"user_id": ["u004"], "modality": ["app"], "ts": [1719741600000000],
                                               "text": ["Opened Alipay"], "value": [None]})
    pq.write_table(day, tmp_path / "day.parquet")
    update = ["update", f"checkpoint={infer_env.ckpt}", "--quiet", f"state={tmp_path / 's0'}",
              f"events={tmp_path / 'day.parquet'}", f"text_cache_dir={tmp_path / 'text'}"]
    assert main([*update, f"out={tmp_path / 's1'}"]) == 0  # no caps given: the state's
    assert json.loads((tmp_path / "s1" / "state.json").read_text())["caps"] == state["caps"]
    capsys.readouterr()
    assert main([*update, "data.default_max_events=2", f"out={tmp_path / 's2'}"]) == 2  # other caps: refused
    assert "was built packing" in capsys.readouterr().err and not (tmp_path / "s2").exists()
