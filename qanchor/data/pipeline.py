"""One user pipeline: records -> packed users -> batches, with the event-text vector cache behind it.

Training, inference, prompt tuning, the benchmark and the benchmarks/ scripts all set up the same two
objects (a :class:`~qanchor.data.text_cache.TextVectorCache` over a sentence encoder, and a
:class:`~qanchor.data.packing.UserPacker` with the run's event caps); :class:`UserPipeline` is that one
set-up, and :func:`batched` the one chunking loop.

Example:
    >>> pipe = UserPipeline.for_dataset(ds, cfg.data)  # doctest: +SKIP
    >>> for records in batched(ds.users(), 256):  # doctest: +SKIP
    ...     batch = pipe.collate(pipe.pack_many(records))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np

from qanchor.config import DataConfig
from qanchor.data.batch import UserBatch, collate_users
from qanchor.data.dataset import Dataset, UserRecord
from qanchor.data.manifest import Manifest
from qanchor.data.packing import PackedUser, UserPacker
from qanchor.data.text_cache import SentenceEncoder, TextVectorCache
from qanchor.errors import ConfigError

__all__ = ["UserPipeline", "batched", "check_caps"]

T = TypeVar("T")


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Lists of ``n`` consecutive items (the last may be shorter), pulling only ``n`` at a time.

        >>> [b for b in batched(range(5), 2)]
        [[0, 1], [2, 3], [4]]
    """
    if n < 1:
        raise ValueError("batch size must be >= 1")
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def check_caps(data_cfg: DataConfig, manifest: Manifest) -> None:
    """ConfigError when ``data.max_events`` names a modality the dataset does not have: a typo there would
    otherwise silently leave the real modality at ``default_max_events``."""
    known = [m.name for m in manifest.sequence_modalities]
    unknown = sorted(set(data_cfg.max_events) - set(known))
    if unknown:
        raise ConfigError(f"data.max_events names {unknown}, which dataset '{manifest.name}' does not have (its sequence "
                          f"modalities: {known}); remove or rename them")


@dataclass
class UserPipeline:
    """Packs users of one manifest with one data config, gathering text vectors from one cache."""

    manifest: Manifest
    data_cfg: DataConfig
    cache: TextVectorCache
    n_tabular: int
    packer: UserPacker = field(init=False)

    def __post_init__(self) -> None:
        check_caps(self.data_cfg, self.manifest)
        self.packer = UserPacker(self.manifest, self.data_cfg, self.cache)

    @classmethod
    def for_dataset(cls, ds: Dataset, data_cfg: DataConfig, encoder: SentenceEncoder | None = None) -> UserPipeline:
        """The pipeline of a dataset: its own text cache (``<cache_dir>/text``), the config's caps and encoder."""
        cache = TextVectorCache(ds.text_cache_dir, encoder or SentenceEncoder(data_cfg.text_encoder))
        return cls(ds.manifest, data_cfg, cache, len(ds.tabular_columns))

    @classmethod
    def at(cls, manifest: Manifest, data_cfg: DataConfig, cache_dir: str | Path, n_tabular: int,
           encoder: SentenceEncoder | None = None) -> UserPipeline:
        """A pipeline whose text cache lives in ``cache_dir`` (inference on users from anywhere)."""
        cache = TextVectorCache(cache_dir, encoder or SentenceEncoder(data_cfg.text_encoder))
        return cls(manifest, data_cfg, cache, n_tabular)

    def prime(self, records: Iterable[UserRecord], progress: bool = False, all_events: bool = False,
              total: int | None = None) -> int:
        """Encode every not yet cached text the records keep (all their events if ``all_events``); ``total``: how many
        records there are, for the progress lines."""
        return self.packer.prime(records, progress=progress, all_events=all_events, total=total)

    def pack_many(self, records: Sequence[UserRecord], cutoff_us: int | None = None) -> list[PackedUser]:
        """Pack records at ``cutoff_us`` (default: the dataset cutoff), encoding their new texts in one pass.

        Events at or after the cutoff are dropped (training packing, and the dataset's own users).
        """
        kept = [self.packer.recent(r, self.packer.cutoff_us if cutoff_us is None else cutoff_us) for r in records]
        return self.pack_kept(records, kept, self.packer.cutoff_us if cutoff_us is None else cutoff_us)

    def pack_kept(self, records: Sequence[UserRecord], kept: Sequence[dict], cutoff_us: int) -> list[PackedUser]:
        """Pack the chosen events ``kept[i]`` of ``records[i]`` (ages from ``cutoff_us``); one encoder pass."""
        texts = {t for k in kept for s in k.values() for t in s.text}
        if self.data_cfg.history_text:  # the whole history's mean text vector reads every older event too
            texts.update(t for r in records for t in self.packer.history_texts(r, cutoff_us))
        self.cache.ensure(sorted(texts))
        return [self.packer.pack_kept(r, k, cutoff_us) for r, k in zip(records, kept)]

    def collate(self, packed: Sequence[PackedUser]) -> UserBatch:
        """Stack packed users into the model's batch type."""
        return collate_users(list(packed), self.manifest, self.cache.vectors, self.n_tabular)

    def seen_text_mean(self, packed: PackedUser) -> np.ndarray:
        """Mean text vector of the events a packed user keeps (zeros without any): the model's raw input."""
        rows = np.concatenate([m.text_rows for m in packed.modalities.values()])
        return self.cache.vectors[rows].mean(0) if len(rows) else np.zeros(self.cache.dim, np.float32)
