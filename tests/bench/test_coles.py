"""CoLES peer: sequences built for pytorch-lifestream, the skip message without it, a tiny run with it."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from data_tools.synth import build_synthetic
from qanchor.bench.coles import INSTALL_HINT, coles_embeddings, require_ptls, user_sequences
from qanchor.bench.peers import Skip
from qanchor.config import BenchConfig, DataConfig
from qanchor.data.dataset import load_dataset


def test_user_sequences(tiny_dataset):
    ds = load_dataset(tiny_dataset)
    seqs = user_sequences(ds, ["u002", "u000", "u001"], cap=10)
    assert len(seqs) == 3 and set(seqs[0]) == {"text_id", "modality", "amount", "event_time"}
    u2, u0, u1 = seqs
    assert len(u0["text_id"]) == 1 and int(u0["text_id"][0]) == 0  # no events: one padding event
    assert len(u2["event_time"]) == 10  # capped to the 10 most recent of 6 + 2 + 3 + 2 events
    assert np.all(np.diff(u1["event_time"].numpy()) >= 0) and float(u1["event_time"].max()) < 0  # sorted, pre-cutoff
    assert set(u1["modality"].tolist()) == {1, 2}  # bill and app; odd users have no search


def test_missing_ptls_is_a_skip_with_install_hint(monkeypatch):
    real_import = builtins.__import__

    def no_ptls(name, *args, **kwargs):
        if name.startswith("ptls"):
            raise ImportError("No module named 'ptls'", name="ptls")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ptls)
    with pytest.raises(Skip, match="pip install --no-deps pytorch-lifestream") as err:
        require_ptls()
    assert INSTALL_HINT in str(err.value)


def test_tiny_coles_run(tiny_dataset):
    pytest.importorskip("ptls.frames.coles", reason="pytorch-lifestream not installed (" + INSTALL_HINT + ")")
    ds = load_dataset(tiny_dataset)
    cfg = BenchConfig(data=DataConfig(path=str(tiny_dataset)), coles_epochs=1, coles_hidden=16)
    vecs = coles_embeddings(ds, list(ds.user_ids), cfg)
    assert vecs.shape == (40, 16) and np.isfinite(vecs).all()


def test_coles_is_repeatable_with_two_threads(tmp_path):
    """With 2 threads some training kernel summed in a varying order (embeddings 1e-7 apart between runs of the same
    seed); deterministic kernels make the peer's numbers repeatable, and the process's own setting is restored."""
    pytest.importorskip("ptls.frames.coles", reason="pytorch-lifestream not installed (" + INSTALL_HINT + ")")
    build_synthetic(tmp_path / "synth", n_users=300, seed=3, progress=False)
    ds = load_dataset(tmp_path / "synth")
    cfg = BenchConfig(data=DataConfig(path=str(tmp_path / "synth")), coles_epochs=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(2):
            runs = [coles_embeddings(ds, sorted(ds.user_ids), cfg) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert all(np.array_equal(r, runs[0]) for r in runs[1:])
    assert not torch.are_deterministic_algorithms_enabled()



def test_no_user_with_two_events_is_a_skip_not_a_crash():
    """A tabular-only dataset or a cold-start task: the DataLoader raised on an empty dataset and the bench stopped."""
    pytest.importorskip("ptls.frames.coles", reason="pytorch-lifestream not installed (" + INSTALL_HINT + ")")
    from qanchor.bench.coles import _train

    one_event = [{"event_time": torch.tensor([1.0])}, {"event_time": torch.tensor([], dtype=torch.float32)}]
    with pytest.raises(Skip, match="no user has 2 or more events"):
        _train(None, one_event, epochs=1, progress=False)
