"""The `embed`, `update` and `index` subcommands end to end, and their one-line errors."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from qanchor.cli import main
from qanchor.data.schema import events_table


def test_embed_index_update_commands(infer_env, tmp_path, capsys):
    common = ["--model", str(infer_env.ckpt), "--quiet"]
    (tmp_path / "q.yaml").write_text("churn: Will this user stop paying?\ncoupon: Will this user redeem a coupon?\n")
    assert main(["embed", *common, "--data", str(infer_env.ds_dir), "--queries", str(tmp_path / "q.yaml"),
                 "--out", str(tmp_path / "emb")]) == 0
    assert json.loads(capsys.readouterr().out)["users"] == infer_env.ds.num_users
    assert main(["index", "build", "--embeddings", str(tmp_path / "emb"), "--query-id", "coupon",
                 "--out", str(tmp_path / "coupon.faiss")]) == 0
    capsys.readouterr()
    assert main(["index", "search", "--index", str(tmp_path / "coupon.faiss"), "--user", "u003", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and "u003" not in {h["user_id"] for h in hits}

    assert main(["update", *common, "--data", str(infer_env.ds_dir), "--queries", "tasks", "--out", str(tmp_path / "s0"),
                 "--cache-dir", str(tmp_path / "text")]) == 0
    day = events_table(infer_env.ds.manifest, {"user_id": ["u004"], "modality": ["app"], "ts": [1719741600000000],
                                               "text": ["Opened Alipay"], "value": [None]})
    pq.write_table(day, tmp_path / "day.parquet")
    capsys.readouterr()
    assert main(["update", *common, "--state", str(tmp_path / "s0"), "--events", str(tmp_path / "day.parquet"),
                 "--out", str(tmp_path / "s1"), "--cache-dir", str(tmp_path / "text")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["users_changed"] == 1 and report["modality_encodings_run"] == 1
    assert main(["index", "build", "--embeddings", str(tmp_path / "s1"), "--query-id", "churn",
                 "--out", str(tmp_path / "churn.faiss")]) == 0

    (tmp_path / "bad.txt").write_text("\n")
    assert main(["embed", *common, "--data", str(infer_env.ds_dir), "--queries", str(tmp_path / "bad.txt"),
                 "--out", str(tmp_path / "e2")]) == 2
    assert "error: " in capsys.readouterr().err
    assert main(["index", "search", "--index", str(tmp_path / "coupon.faiss"), "--user", "nobody"]) == 2
