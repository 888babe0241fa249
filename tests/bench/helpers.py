"""Fakes for the benchmark tests: a hashing text encoder, an embedder and a head that need no model."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from qanchor.data.dataset import Task


class HashEncoder:
    """Stands in for SentenceEncoder: a fixed pseudo-random unit vector per text, no weights to load."""

    key, dim = "hash-test", 8

    def encode(self, texts: list[str], progress: bool = False, what: str = "event texts") -> np.ndarray:
        out = np.stack([np.random.default_rng(int(hashlib.md5(t.encode()).hexdigest()[:8], 16)).normal(size=self.dim)
                        for t in texts]) if texts else np.zeros((0, self.dim))
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


class FakeHead:
    """A head whose score is the embedding's first coordinate."""

    def __init__(self, task: str, query: str):
        self.task, self.query = task, query

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        return emb[:, 0]


class FakeEmbedder:
    """Deterministic 16-d vectors per (user, query); the task query (and its head) carry the label."""

    def __init__(self, tasks: list[Task], strength: float = 4.0):
        self.signal = {t.query: dict(zip(t.user_ids, t.labels)) for t in tasks}
        self.strength = strength
        self.calls: list[tuple[int, int]] = []  # (users, requests) per call

    def embed_many(self, user_ids, requests) -> np.ndarray:
        self.calls.append((len(user_ids), len(requests)))
        out = np.zeros((len(user_ids), len(requests), 16), np.float32)
        for i, u in enumerate(user_ids):
            for j, (q, head) in enumerate(requests):
                seed = int(hashlib.md5(f"{u}|{q}".encode()).hexdigest()[:8], 16)
                v = np.random.default_rng(seed).normal(size=16)
                v[0] += self.strength * (2 if head is not None else 1) * self.signal.get(q, {}).get(u, 0)
                out[i, j] = v / np.linalg.norm(v)
        return out
