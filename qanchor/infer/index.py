"""Look-alike search over exported embeddings with faiss (inner product = cosine on unit vectors).

Small collections get an exact flat index; from ``ivf_min_size`` vectors on, an IVF index
(``nlist`` ~ 4 sqrt(N) coarse cells, ``nprobe`` of them searched) trades a little recall for speed.
An index is three files: ``FILE`` (faiss), ``FILE.users.parquet`` (row -> user_id), ``FILE.json``.

Example:
    >>> idx = LookalikeIndex.from_embeddings("emb/", query_id="coupon")  # doctest: +SKIP
    >>> idx.save("coupon.faiss")  # doctest: +SKIP
    >>> LookalikeIndex.load("coupon.faiss").search_user("u000042", k=10)[:2]  # doctest: +SKIP
    [('u001337', 0.93), ('u000815', 0.91)]
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qanchor.data.io import (
    atomic_path,
    check_not_inside,
    file_sha256,
    refuse_inside_replaced_whole,
    write_text,
)
from qanchor.errors import ModelInputError, OutputError
from qanchor.infer.export import embeddings_maker, read_embeddings, stored_query_ids
from qanchor.logs import warn
from qanchor.model.factory import same_model

__all__ = ["LookalikeIndex", "IVF_MIN_SIZE", "INDEX_FORMAT", "check_index_target"]

IVF_MIN_SIZE = 50_000  # below this an exact scan is fast enough (~ms per query on one core)
INDEX_FORMAT = "qanchor-index"  # in FILE.json: marks the three files as a qanchor index (so a rebuild may replace them)


def check_index_target(out: str | Path, embeddings: str | Path | None = None) -> None:
    """Refuse an index path that is a directory, sits inside the embeddings it indexes, or would replace
    files that are not a qanchor index (OutputError / ModelInputError before any work)."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"out={out} is a directory; give the index file's path, e.g. {out / 'index.faiss'}")
    if embeddings is not None:
        check_not_inside(out, {"embeddings": embeddings}, key="out")
    refuse_inside_replaced_whole(out)  # its next rebuild or update would delete the index
    existing = [p for p in (out, Path(f"{out}.users.parquet"), Path(f"{out}.json")) if p.exists()]
    if existing and _meta_format(Path(f"{out}.json")) != INDEX_FORMAT:
        raise OutputError(f"out={out}: {existing[0]} exists and is not part of a qanchor index; qanchor does not "
                          "replace it: choose another path")


def _description(path: Path) -> dict:
    """An index description's keys ({} where it is missing or unreadable)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _meta_format(path: Path) -> str | None:
    return _description(path).get("format")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class LookalikeIndex:
    """A faiss inner-product index over one query's user embeddings, with the user id of every row."""

    def __init__(self, index, user_ids: np.ndarray, meta: dict):
        self.index, self.user_ids, self.meta = index, np.asarray(user_ids, dtype=object), meta
        self._row = {u: i for i, u in enumerate(self.user_ids)}

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, user_ids: np.ndarray, vectors: np.ndarray, ivf_min_size: int = IVF_MIN_SIZE,
              nprobe: int | None = None, seed: int = 0, **meta) -> LookalikeIndex:
        """Flat index below ``ivf_min_size`` vectors, IVF-flat above; vectors are re-normalised."""
        import faiss

        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ModelInputError(f"vectors must be [N, D] (one row per user), got shape {vectors.shape}")
        if len(user_ids) != len(vectors):
            raise ModelInputError(f"got {len(user_ids)} user ids but {len(vectors)} vectors; give one id per vector")
        if not np.isfinite(vectors).all():  # a NaN row was indexed, then never found, and searching it blamed the query
            bad = [str(user_ids[i]) for i in np.flatnonzero(~np.isfinite(vectors).all(axis=1))[:3]]
            raise ModelInputError(f"embeddings of {', '.join(bad)} hold NaN or inf; re-export them before indexing")
        vectors = _unit(vectors)  # (N, D)
        n, d = vectors.shape
        if n == 0:
            raise ModelInputError("no embeddings to index")
        if len(set(user_ids)) != n:  # one query's rows name each user once: a repeat is the same user exported twice
            twice = str(next(u for u, count in Counter(user_ids).items() if count > 1))
            if "query_id" not in meta:  # ids and vectors handed in: nothing to say of where they came from
                raise ModelInputError(f"user id {twice!r} appears more than once; give each user one vector")
            raise ModelInputError(f"user id {twice!r} appears more than once among the embeddings of query "
                                  f"{meta['query_id']!r} (the same users exported into two shards, or shards of two "
                                  "exports in one folder?); index a folder that `qanchor embed` wrote")
        if n < ivf_min_size:
            index, kind = faiss.IndexFlatIP(d), "flat"
        else:
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per cell
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = vectors[rng.choice(n, size=min(n, 256 * nlist), replace=False)]
            index.train(sample)
            index.nprobe = nprobe or max(1, nlist // 8)
            index.make_direct_map()  # lets search_user() reconstruct a stored vector
            kind = "ivf"
        index.add(vectors)
        meta = {"format": INDEX_FORMAT, **meta, "kind": kind, "n": n, "dim": d, "nprobe": getattr(index, "nprobe", None)}
        return cls(index, np.asarray(user_ids, dtype=object), meta)

    @classmethod
    def from_embeddings(cls, directory: str | Path, query_id: str, **kwargs) -> LookalikeIndex:
        """Index the ``query_id`` embeddings of an export directory (or an update state)."""
        users, _, vectors = read_embeddings(directory, query_id)
        if not len(users):
            raise ModelInputError(f"{directory}: no embeddings for query id {query_id!r}; it holds "
                                  f"{stored_query_ids(directory)} (query_id=<one of them>)")
        # the model that made them: a vector searched against them must come from the same one (search's made_by)
        return cls.build(users, vectors, query_id=query_id, source=str(directory), checkpoint=embeddings_maker(directory),
                         **kwargs)

    def save(self, path: str | Path) -> Path:
        import faiss

        path = Path(path)
        check_index_target(path)
        if not Path(f"{path}.json").exists():
            # a first build marks the path as a qanchor index before any data file: one killed before its description
            # (written last) is then re-run over its own files instead of refused as someone else's
            write_text(json.dumps({"format": INDEX_FORMAT, "building": True}), f"{path}.json")
        # each file's digest is taken from what this build wrote, before it is put in place: taken from the path
        # afterwards, it could be another build's file of the same name, written meanwhile, and the mix would load
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))
            index_digest = _sampled_digest(tmp)
        with atomic_path(Path(f"{path}.users.parquet")) as tmp:
            pq.write_table(pa.table({"user_id": pa.array(self.user_ids.tolist(), pa.string())}), tmp, compression="zstd")
            users_digest = file_sha256(tmp)
        # the description last, holding the hashes of the other two: each file is replaced atomically, but not the
        # three together, and a build killed between them must not pair new vectors with old user ids
        files = {"index": index_digest, "users": users_digest}
        write_text(json.dumps({**self.meta, "files": files}, indent=2), f"{path}.json")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LookalikeIndex:
        """Read an index written by :meth:`save`; a missing, damaged or mismatched file is a ModelInputError."""
        import faiss

        path = Path(path)
        if _description(Path(f"{path}.json")).get("building"):  # the mark a first build writes before its data files
            raise ModelInputError(f"{path}: its build stopped before it finished; run `qanchor index build` again")
        for p in (path, Path(f"{path}.users.parquet"), Path(f"{path}.json")):
            if not p.is_file():
                raise ModelInputError(f"{p} not found; build the index with `qanchor index build`")
        meta_path = Path(f"{path}.json")
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise ModelInputError(f"{meta_path}: not valid JSON; rebuild the index with `qanchor index build`") from None
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            raise ModelInputError(f"{meta_path}: not a qanchor index description; rebuild with `qanchor index build`")
        try:
            ids = pq.read_table(f"{path}.users.parquet").column("user_id").to_numpy(zero_copy_only=False)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise ModelInputError(f"{path}.users.parquet: unreadable ({str(exc).splitlines()[0]}); rebuild the index") from None
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:  # faiss reports a damaged or truncated file as RuntimeError
            raise ModelInputError(f"{path}: not a faiss index, or truncated ({str(exc).splitlines()[0][:120]}); "
                                  "rebuild it with `qanchor index build`") from None
        files = meta.get("files")  # absent in indexes built before qanchor recorded it
        if isinstance(files, dict) and (files.get("index") != _sampled_digest(path)
                                        or files.get("users") != file_sha256(f"{path}.users.parquet")):
            raise ModelInputError(f"{path}: the index, its user list and {meta_path.name} were not written by one build "
                                  "(a build stopped half way, or files copied from several); the three files do not "
                                  "belong together: rebuild the index")
        if index.ntotal != len(ids) or index.d != meta.get("dim"):
            raise ModelInputError(f"{path}: the index holds {index.ntotal} vectors of {index.d} dims but its files "
                                  f"list {len(ids)} users of {meta.get('dim')} dims; the three files do not belong "
                                  "together: rebuild the index")
        return cls(index, ids, meta)

    def search(self, vectors: np.ndarray, k: int = 10, made_by: str | None = None) -> list[list[tuple[str, float]]]:
        """Top ``k`` (user_id, cosine) per query vector; ``vectors`` is [D] or [n, D]. ``made_by``: the weights id
        (``QAnchor.weights_id()``) of the model that embedded ``vectors``, refused unless the index's embeddings came
        from the same model (vectors of two models share no space: the nearest users would be noise)."""
        if k < 1:
            raise ModelInputError("k must be >= 1")
        indexed_by = self.meta.get("checkpoint")
        if made_by is not None and indexed_by is None:
            warn("this index does not record the model that made its vectors (built before qanchor recorded it, or "
                 "from embeddings without an export record): the vector's model cannot be checked; rebuild the index "
                 "with `qanchor index build` to have it checked")
        this_index = f"the index of {self.meta.get('source')}"
        if made_by is not None and indexed_by is not None and not same_model(indexed_by, made_by, this_index):
            raise ModelInputError(f"the vector was embedded by model {made_by[:16]}, the index holds embeddings of model "
                                  f"{indexed_by[:16]}; embed it with the model the index was built from")
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if not np.isfinite(vectors).all():
            raise ModelInputError("a query vector holds NaN or inf; give finite numbers")
        if not np.linalg.norm(vectors, axis=-1).all():  # no direction: every user would score 0, in arbitrary order
            raise ModelInputError("a query vector is all zeros; give an embedding")
        queries = _unit(vectors)  # (n, D)
        if queries.shape[1] != self.meta["dim"]:
            raise ModelInputError(f"vector has {queries.shape[1]} dimensions, the index holds {self.meta['dim']}")
        scores, rows = self.index.search(queries, min(k, len(self)))  # (n, k) each
        return [[(str(self.user_ids[r]), float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]

    def vector(self, user_id: str) -> np.ndarray:
        if user_id not in self._row:
            raise ModelInputError(f"user {user_id!r} is not in this index ({len(self)} users)")
        return self.index.reconstruct(self._row[user_id])

    def search_user(self, user_id: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` users most like ``user_id`` (the user itself excluded)."""
        hits = self.search(self.vector(user_id), k + 1)[0]
        return [h for h in hits if h[0] != user_id][:k]


def _sampled_digest(path: Path, block: int = 1 << 20) -> str:
    """The faiss file's size and the SHA-256 of its first and last MiB: another build's file differs there (its header,
    its last vectors) at a cost that does not grow with the index, which every search loads (a full hash of a 10 GB
    index added seconds to each). The user list, small, is hashed whole."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        h.update(str(size).encode() + b":" + fh.read(block))
        fh.seek(max(size - block, 0))
        h.update(fh.read(block))
    return h.hexdigest()
