"""The text-vector cache under a server's threads and over many small calls."""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np

from qanchor.data.text_cache import TextVectorCache


class _HashEncoder:
    """A stand-in sentence encoder: each text's vector is a function of the text alone, so any row that holds another
    text's vector shows. It sleeps a little, as a real encoder's forward pass releases the GIL."""

    dim, key = 8, "hash-encoder"

    @staticmethod
    def vector(text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        return np.random.default_rng(seed).standard_normal(8).astype(np.float32)

    def encode(self, texts: list[str], progress: bool = False, what: str = "") -> np.ndarray:
        time.sleep(0.0005)
        return np.stack([self.vector(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def _check(cache: TextVectorCache, texts: list[str]) -> None:
    np.testing.assert_array_equal(cache.vectors[cache.rows(texts)], np.stack([_HashEncoder.vector(t) for t in texts]))


def test_threads_sharing_one_cache_keep_every_text_on_its_own_row(tmp_path):
    """Four threads adding texts at once left the row count, the text -> row map and the stored vectors out of step:
    5,078 of 5,200 texts then read another text's vector, for the rest of the process."""
    cache = TextVectorCache(tmp_path / "cache", _HashEncoder())
    errors = []

    def work(worker: int) -> None:
        try:
            for call in range(40):
                texts = [f"search {worker}-{call}-{i}" for i in range(10)] + [f"shared {call}"]
                rows = cache.ensure(texts)
                np.testing.assert_array_equal(cache.vectors[rows], np.stack([_HashEncoder.vector(t) for t in texts]))
        except Exception as exc:  # noqa: BLE001 - reported below, with the thread's failure
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    every = [f"search {w}-{c}-{i}" for w in range(4) for c in range(40) for i in range(10)] + [f"shared {c}" for c in range(40)]
    assert len(cache) == len(every)
    _check(cache, every)
    _check(TextVectorCache(tmp_path / "cache", _HashEncoder()), every)  # and as stored on disk


def test_a_call_that_adds_a_few_texts_copies_no_stored_vector(tmp_path):
    """Each call that brought a new text re-concatenated every stored vector (a 300 MB copy per call at 200k texts).
    Rows now go into a buffer that doubles when full; a view taken earlier keeps its rows."""
    cache = TextVectorCache(tmp_path / "cache", _HashEncoder())
    cache.ensure([f"text {i}" for i in range(100)])
    before = cache.vectors
    cache.ensure(["one more"])
    after = cache.vectors
    assert np.shares_memory(before, after) and len(before) == 100 and len(after) == 101
    assert not after.flags.writeable  # a caller cannot overwrite stored rows through the view
    cache.ensure([f"many {i}" for i in range(5000)])  # past the buffer's capacity: a new buffer, the old view intact
    _check(cache, [f"text {i}" for i in range(100)] + ["one more"] + [f"many {i}" for i in range(5000)])
    first = [f"text {i}" for i in range(100)]
    np.testing.assert_array_equal(before[cache.rows(first)], np.stack([_HashEncoder.vector(t) for t in first]))


def test_a_cache_this_user_or_mount_cannot_write_is_one_clear_error(tmp_path, monkeypatch):
    """A read-only mount gave a raw OSError (EROFS) from a shard write, and a shared cache of another user's a
    PermissionError traceback from opening it: only a shard write refused by permissions had the advice."""
    import errno

    import pytest

    import qanchor.data.text_cache as text_cache
    from qanchor.errors import DataValidationError

    cache = TextVectorCache(tmp_path / "c", _HashEncoder())
    cache.ensure(["a"])

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(text_cache, "write_parquet", read_only)
    with pytest.raises(DataValidationError, match="cannot write the text-vector cache"):
        cache.ensure(["new text"])
    monkeypatch.setattr(text_cache, "claim_output_dir", read_only)
    with pytest.raises(DataValidationError, match="cannot write the text-vector cache here"):
        TextVectorCache(tmp_path / "other", _HashEncoder())


def test_a_texts_vector_does_not_depend_on_the_texts_encoded_beside_it():
    """Batches padded to their longest text gave a text a vector that moved by up to 2e-7 with its batch mates: a cache
    filled by a pretraining run's small groups and one filled by a bench's single pass held other vectors, and
    `union_lgbm` split on them differently (0.7795 against 0.7777 on the same data and seed)."""
    from qanchor.data.text_cache import SentenceEncoder

    encoder = SentenceEncoder(device="cpu")
    words = "grocery frozen pizza deli meat produce bakery coffee taxi rent fuel cinema loan flights".split()
    rng = np.random.default_rng(0)
    texts = list(dict.fromkeys(" ".join(rng.choice(words, int(rng.integers(1, 12)))) for _ in range(120)))
    together = encoder.encode(texts)
    for size in (1, 2, 3, 9):
        for start in range(0, 18, size):
            np.testing.assert_array_equal(encoder.encode(texts[start : start + size]), together[start : start + size])
    shuffled = rng.permutation(len(texts))
    np.testing.assert_array_equal(encoder.encode([texts[i] for i in shuffled]), together[shuffled])
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)


def test_a_text_of_no_tokens_is_the_zero_vector_not_a_crash():
    """With a tokenizer that adds no special tokens (a BPE one, as SmolLM2's or Qwen's), an empty event text is no
    token at all: the batch of one token count ran the model on an (8, 0) tensor and the whole cache fill failed."""
    from qanchor.data.text_cache import SentenceEncoder

    encoder = SentenceEncoder(device="cpu")
    real = encoder.tokenizer

    class NoSpecials:  # the bundled tokenizer, less its [CLS] / [SEP]
        model_input_names = real.model_input_names

        def __call__(self, texts, **kwargs):
            return {"input_ids": [ids[1:-1] for ids in real(texts, **kwargs)["input_ids"]]}

    encoder.tokenizer = NoSpecials()
    vectors = encoder.encode(["Opened app", "", "Coffee shop"])
    assert np.array_equal(vectors[1], np.zeros(encoder.dim, np.float32))
    assert np.allclose(np.linalg.norm(vectors[[0, 2]], axis=1), 1.0, atol=1e-6)


def test_a_byte_flipped_on_disk_in_a_shard_is_refused_not_served(tmp_path):
    """Shards were written without page checksums and read without verifying any: one byte flipped inside a page
    decoded into another vector that was served as the text's own; a flip in the footer's column names ended in a
    KeyError traceback. A shard written before shards carried checksums still reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from qanchor.errors import DataValidationError

    texts = [f"text number {i}" for i in range(2000)]
    old = TextVectorCache(tmp_path / "old", _HashEncoder())
    flat = pa.array(np.stack([_HashEncoder.vector(t) for t in texts]).reshape(-1), pa.float32())
    pq.write_table(pa.table({"text": texts, "vector": pa.FixedSizeListArray.from_arrays(flat, 8)}),
                   old.dir / "shard-00000000000000000001-1.parquet", compression="zstd")  # no checksums
    again = TextVectorCache(tmp_path / "old", _HashEncoder())
    _check(again, texts)
    assert again.encoded_count == 0

    TextVectorCache(tmp_path / "c", _HashEncoder()).ensure(texts)
    (shard,) = (tmp_path / "c" / _HashEncoder.key).glob("shard-*.parquet")
    good = shard.read_bytes()
    footer = len(good) - 8 - int.from_bytes(good[-8:-4], "little")  # its first "text" names the column
    for where, damage in ((len(good) // 2, None), (good.index(b"text", footer), "its columns are")):
        flipped = bytearray(good)
        flipped[where] ^= 0x10
        shard.write_bytes(bytes(flipped))
        with pytest.raises(DataValidationError, match=rf"{shard.name}: a damaged text-vector cache shard "
                                                      rf"\({damage or 'could not verify page integrity'}.*delete it"):
            TextVectorCache(tmp_path / "c", _HashEncoder())


def test_a_shard_this_user_cannot_read_is_named_unreadable_not_damaged(tmp_path, monkeypatch):
    """A shard another user wrote into a shared cache under umask 077 was reported as damaged, with the advice to delete
    it (another user's file); it is unreadable to this user, and the advice is the one for a cache not one's own."""
    import errno

    import pytest

    import qanchor.data.text_cache as text_cache
    from qanchor.errors import DataValidationError

    TextVectorCache(tmp_path / "c", _HashEncoder()).ensure(["a"])
    real = text_cache.pq.read_table

    def denied(source, *args, **kwargs):  # tests run as root, whom chmod 000 does not stop
        if "shard-" in str(source):
            raise PermissionError(errno.EACCES, f"Failed to open local file '{source}'")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(text_cache.pq, "read_table", denied)
    with pytest.raises(DataValidationError, match=r"shard-.*: this user cannot read this text-vector cache shard "
                                                  r"\(Permission denied\); give a cache folder of your own "
                                                  r"\(text_cache_dir=, data.cache_dir=\) or ask its owner") as info:
        TextVectorCache(tmp_path / "c", _HashEncoder())
    assert "damaged" not in str(info.value)


def test_an_encoder_folder_is_hashed_once_per_process_until_a_file_in_it_changes(tmp_path, monkeypatch):
    """Every model built opens the text encoder, and hashing its weights and tokenizer took 0.15 s each time. Its
    digests are now remembered by the folder's files as they stand: a second encoder on the folder hashes nothing, one
    opened after a file was rewritten hashes again, and an encoder whose tokenizer was swapped after loading is hashed
    as it is, not as the folder's."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qanchor.config import TextEncoderConfig
    from qanchor.data import text_cache
    from qanchor.data.text_cache import SentenceEncoder, default_encoder_path

    folder = tmp_path / "minilm"
    shutil.copytree(default_encoder_path(), folder)
    hashed = []
    real = text_cache.weights_sha256
    monkeypatch.setattr(text_cache, "weights_sha256", lambda module: hashed.append(1) or real(module))
    cfg = TextEncoderConfig(path=str(folder))
    first = SentenceEncoder(cfg, device="cpu")
    key, digest = first.key, first.digest
    assert len(hashed) == 1
    second = SentenceEncoder(cfg, device="cpu")
    assert (second.key, second.digest) == (key, digest) and len(hashed) == 1  # remembered
    weights = load_file(folder / "model.safetensors")  # a fine-tuning step's worth of change, written in place
    name = next(k for k, v in weights.items() if v.dtype.is_floating_point and v.ndim == 2)
    weights[name] = weights[name] * 1.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    tuned = SentenceEncoder(cfg, device="cpu")
    assert tuned.digest != digest and tuned.key != key and len(hashed) == 2
    swapped = SentenceEncoder(cfg, device="cpu")
    other = SentenceEncoder(cfg, device="cpu").tokenizer
    other.add_tokens(["<new-word>"])  # another vocabulary than the folder's
    swapped.tokenizer = other
    assert swapped._tokenizer_digest() != tuned._tokenizer_digest()  # read from the tokenizer it holds
    # changed in place, after a key was taken or before: another key, and the folder's remembered one stays its own
    import torch

    stepped, fresh = SentenceEncoder(cfg, device="cpu"), SentenceEncoder(cfg, device="cpu")
    assert stepped.key == tuned.key
    with torch.no_grad():  # a fine-tuning step's worth, in memory
        stepped.model.embeddings.word_embeddings.weight.mul_(1.01)
    assert stepped.key != tuned.key and stepped.digest != tuned.digest
    assert (fresh.key, fresh.digest) == (tuned.key, tuned.digest)
    grown = SentenceEncoder(cfg, device="cpu")
    grown.tokenizer.add_tokens(["<another-word>"])
    assert grown.key != tuned.key and SentenceEncoder(cfg, device="cpu").key == tuned.key
