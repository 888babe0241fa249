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
