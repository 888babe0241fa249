"""Which data a demo's pretraining run was trained on, by content (data_tools/run_data.py, the Makefile's RUN_MODE)."""

from __future__ import annotations

import shutil

from data_tools import run_data
from qanchor.data.io import MARKER_FILE, is_temporary
from qanchor.data.schema import CACHE_DIR


def test_the_digest_of_a_dataset_is_its_data_not_its_caches_marker_or_times(tmp_path):
    """The demos told a rebuilt dataset by its userU.parquet's time: the same bytes written again discarded a run."""
    data = tmp_path / "data"
    (data / "events").mkdir(parents=True)
    (data / "events" / "part-00000.parquet").write_bytes(b"events")
    (data / "userU.parquet").write_bytes(b"pairs")
    digest = run_data.dataset_digest(data)
    shutil.copytree(data, tmp_path / "copy")  # new times, another folder: the same data
    assert run_data.dataset_digest(tmp_path / "copy") == digest
    (data / CACHE_DIR).mkdir()
    (data / CACHE_DIR / "text.bin").write_bytes(b"vectors")
    (data / MARKER_FILE).write_text('{"kind": "dataset", "qanchor_version": "9"}')
    temporary = data / ".userU.parquet.qanchor-tmp.1-host.ab12"
    temporary.write_bytes(b"half")
    assert is_temporary(temporary) and run_data.dataset_digest(data) == digest
    (data / "userU.parquet").write_bytes(b"other pairs")
    assert run_data.dataset_digest(data) != digest
    (data / "userU.parquet").write_bytes(b"pairs")
    (data / "events" / "part-00000.parquet").rename(data / "events" / "part-00001.parquet")  # names count too
    assert run_data.dataset_digest(data) != digest
    assert run_data.dataset_digest(tmp_path / "none") == "-"
    assert (run_data.CACHE_DIR, run_data.MARKER_FILE) == (CACHE_DIR, MARKER_FILE)  # named apart from qanchor's


def test_the_run_mode_follows_the_record(tmp_path):
    data, run, record = tmp_path / "data", tmp_path / "run", tmp_path / ".make" / "trained-on" / "run"
    data.mkdir()
    (data / "userU.parquet").write_bytes(b"pairs")
    assert run_data.run_mode(data, run, record) == "resume=true"  # no checkpoint: nothing to keep
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "model.safetensors").write_bytes(b"w")
    run_data.write_record(data, record)
    assert record.read_text() == run_data.dataset_digest(data) + "\n"
    assert [p.name for p in record.parent.iterdir()] == ["run"]  # written aside and renamed: no temporary left
    assert run_data.run_mode(data, run, record) == "resume=true"
    (data / "userU.parquet").write_bytes(b"other pairs")
    assert run_data.run_mode(data, run, record) == "overwrite=true"
    assert run_data.main(["mode", str(data)]) == 2


def test_the_record_and_the_stamps_take_the_mode_a_plain_write_would(tmp_path):
    """mkstemp's 0600 went onto every stamp and record, so in a checkout shared by a team another user's `make` could
    not read them."""
    import os

    from data_tools.code_stamp import write_if_changed
    from data_tools.run_data import write_record

    old = os.umask(0o022)
    try:
        write_record(tmp_path, tmp_path / ".make" / "trained-on" / "run")
        write_if_changed(tmp_path / ".make" / "stamp", "x\n")
    finally:
        os.umask(old)
    assert (tmp_path / ".make" / "trained-on" / "run").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / ".make" / "stamp").stat().st_mode & 0o777 == 0o644
