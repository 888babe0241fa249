"""Build a :class:`QAnchorModel` from a config and a manifest, and save / load checkpoints.

A checkpoint is a self-describing directory, written atomically::

    config.yaml           the resolved run config (model section used to rebuild)
    qanchor.json          format version, modalities, text encoder, tabular columns and stats
    backbone_config.json  the backbone's HF config (vocabulary already grown by the special tokens)
    tokenizer files       with the special tokens added
    model.safetensors     every weight (never pickled)

Example:
    >>> model, tokenizer = QAnchorModel_from_pretrained("runs/demo/pretrain")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

import qanchor
from qanchor.config import (
    LossConfig,
    ModelConfig,
    PretrainConfig,
    TextEncoderConfig,
    load_run_config,
    to_yaml,
)
from qanchor.data.io import OutputKind, as_umask_allows, atomic_dir, file_sha256, read_json_object
from qanchor.data.manifest import Manifest
from qanchor.errors import CheckpointError, ConfigError, QAnchorError
from qanchor.logs import warn
from qanchor.model.backbone import (
    add_special_tokens,
    build_backbone,
    load_tokenizer,
    resolve_attn_implementation,
)
from qanchor.model.layout import TokenIds, special_token_names
from qanchor.model.qanchor_model import QAnchorModel

__all__ = ["FORMAT_VERSION", "ModelMeta", "build_model", "save_checkpoint", "load_checkpoint", "checkpoint_hash",
           "checkpoint_id", "same_model", "head_label", "resolve_checkpoint_dir", "read_meta", "shared_duplicates", "unique_state"]

FORMAT_VERSION = 2  # 2: <|answer|> marker, separately normalised event inputs, raw-text modality summaries


@dataclass
class ModelMeta:
    """What, besides the config, is needed to rebuild the model and feed it the same inputs."""

    manifest: dict[str, Any]  # the dataset manifest the model was built from (modalities, cutoff)
    text_dim: int
    text_encoder: dict[str, Any] = field(default_factory=dict)  # TextEncoderConfig fields
    tabular_columns: list[str] = field(default_factory=list)
    # len(tokenizer) when saved: a tokenizer rebuilt from damaged or missing files numbers its tokens differently
    # (<|user_emb|> and every word land on other rows of the embedding table) yet loads; None in older checkpoints
    tokenizer_size: int | None = None
    # SentenceEncoder.digest of the text encoder pretraining read (its weights, tokenizer and settings, not where it
    # lay): a text cache opened on the encoder at another place is accepted when its digest is this. None in older ones
    text_encoder_digest: str | None = None
    format_version: int = FORMAT_VERSION
    qanchor_version: str = qanchor.__version__

    @property
    def manifest_obj(self) -> Manifest:
        return Manifest.from_dict(self.manifest)


def _apply_lora(backbone: torch.nn.Module, cfg: ModelConfig, new_token_ids: list[int]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = cfg.backbone.lora
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                          task_type="CAUSAL_LM", trainable_token_indices={"embed_tokens": new_token_ids})
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` alias: a notice for peft's authors,
        # printed into every LoRA user's log. Only that one message is silenced.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            return get_peft_model(backbone, peft_cfg)
        except ValueError as exc:  # peft's NoMatchingPeftModuleError: a target name this backbone has no layer of
            if type(exc).__name__ != "NoMatchingPeftModuleError":
                raise
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(f"model.backbone.lora.target_modules={list(lora.target_modules)}: no layer of the backbone "
                              f"has such a name; its linear layers are named {', '.join(linear)}") from None


def _backbone_config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises on a damaged or edited backbone config (a layer count that disagrees with its layer
    types, an unknown rope type, a negative size): its own checks' ValueError and KeyError, torch's RuntimeError, and
    huggingface_hub's strict config classes' own error type where that library has them."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, TypeError, KeyError, RuntimeError, ZeroDivisionError,
                                               AttributeError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: its configs raise the built-in types above
        return errors
    return (*errors, StrictDataclassError)


def _out_of_memory(exc: BaseException) -> bool:
    """torch reports a failed allocation as a RuntimeError (CPU: "can't allocate memory"; CUDA: "out of memory")."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("allocate" in text or "out of memory" in text)


def build_model(cfg: ModelConfig, manifest: Manifest, text_dim: int, tabular_columns: list[str],
                load_weights: bool = True, hf_config: Any = None, tokenizer: Any = None,
                training_aids: LossConfig | None = None, device: str | torch.device | None = None) -> tuple[QAnchorModel, Any]:
    """The model and its tokenizer. ``hf_config`` (from a checkpoint) fixes the backbone's exact shape;
    ``training_aids`` (a run's loss config) adds the decoders its ``profile_weight`` / ``future_weight`` train."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or load_tokenizer(cfg.backbone)
    if hf_config is not None:
        attn = resolve_attn_implementation(cfg.backbone, loading=True, device=device)
        try:
            backbone = AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, cfg.backbone.dtype),
                                                        attn_implementation=attn)
        except _backbone_config_errors() as exc:  # values transformers validates only when it builds the model
            if _out_of_memory(exc):  # a config too large for this machine, or a size edited out of all proportion
                raise CheckpointError(f"the checkpoint's backbone_config.json asks for more memory than this machine can "
                                      f"give ({str(exc).splitlines()[0][:200]}): run it on a machine with more memory, "
                                      "or, if that file was edited, re-copy the checkpoint folder whole") from None
            raise CheckpointError(f"the checkpoint's backbone_config.json does not describe a model transformers can build "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); it is damaged or was "
                                  "edited: re-copy the checkpoint folder whole") from None
    else:
        backbone = build_backbone(cfg.backbone, len(tokenizer), load_weights=load_weights)
    modalities = [m.name for m in manifest.modalities]
    names = special_token_names(modalities)
    ids = add_special_tokens(tokenizer, backbone, names)
    if cfg.backbone.freeze:
        backbone.requires_grad_(False)
    if cfg.backbone.lora.enabled:
        backbone = _apply_lora(backbone, cfg, sorted(ids.values()))
    token_ids = TokenIds.from_tokenizer(tokenizer, modalities)
    model = QAnchorModel(cfg, manifest, backbone, token_ids, text_dim, len(tabular_columns), tokenizer, training_aids)
    return model, tokenizer


def _unmatched(state: dict[str, torch.Tensor], not_filled: list[str], not_placed: list[str]) -> tuple[list[str], list[str]]:
    """The model's tensors the file did not fill, and the file's tensors the model had no place for (torch's report of
    a non-strict load, after the modules' hooks renamed older keys). Tensors that are one (tied embeddings and LM
    head, peft's token deltas; :func:`shared_duplicates`) are filled by any one of their names, and only once:
    safetensors' report left a group out when none of its names was stored, so a file without the token table loaded,
    with the table as built (random), and served other embeddings without a word."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(_identity(t), []).append(name)
    absent = set(not_filled)
    missing = sorted(names[0] for names in groups.values() if absent.issuperset(names))
    twice = [name for names in groups.values() for name in [n for n in names if n not in absent][1:]]
    return missing, sorted(not_placed) + sorted(twice)


def _identity(t: torch.Tensor) -> tuple:
    """What makes two names one tensor: the same memory, shape, strides and dtype."""
    return t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype


def shared_duplicates(state: dict[str, torch.Tensor]) -> set[str]:
    """Names that are the very same tensor as another name of ``state`` (tied embeddings and LM head, peft's
    token deltas shared by both): saved once under one name, refilled through it on load.

    Identity means the same memory, shape and strides: DeepSpeed also makes parameters views into one flat
    buffer, and those disjoint views are of course all kept.
    """
    first: dict[tuple, str] = {}
    out = set()
    for name, t in state.items():
        key = _identity(t)
        if key in first:
            out.add(name)
        else:
            first[key] = name
    return out


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without :func:`shared_duplicates`, each tensor an own contiguous CPU copy (safetensors
    stores no views of shared buffers)."""
    state = model.state_dict()
    skip = shared_duplicates(state)
    return {k: (v.detach().cpu() if v.is_cuda else v.detach().clone()).contiguous() for k, v in state.items()
            if k not in skip}


def _base_config(model: QAnchorModel):
    backbone = model.backbone
    return backbone.get_base_model().config if hasattr(backbone, "get_base_model") else backbone.config


def save_checkpoint(out_dir: str | Path, model: QAnchorModel, tokenizer: Any, run_cfg: PretrainConfig, meta: ModelMeta,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write a checkpoint directory atomically (a crash leaves the previous one intact); its marker records the names
    written, so a later save refuses to replace one a user has put files in (notes, evaluations)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, OutputKind.CHECKPOINT, record_layout=True) as tmp:
        (tmp / "config.yaml").write_text(to_yaml(run_cfg))
        meta = replace(meta, tokenizer_size=len(tokenizer))
        (tmp / "qanchor.json").write_text(json.dumps(meta.__dict__, indent=2, default=str))
        (tmp / "backbone_config.json").write_text(_base_config(model).to_json_string())
        tokenizer.save_pretrained(tmp)
        save_file(unique_state(model), str(tmp / "model.safetensors"))  # no pickle; tied tensors stored once
        as_umask_allows(tmp / "model.safetensors")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir


def resolve_checkpoint_dir(ckpt: str | Path) -> Path:
    """A checkpoint directory, or a pretraining output_dir whose ``checkpoint/`` holds the latest one."""
    ckpt = Path(ckpt)
    if not (ckpt / "qanchor.json").exists() and (ckpt / "checkpoint" / "qanchor.json").exists():
        return ckpt / "checkpoint"
    return ckpt


def checkpoint_hash(ckpt: str | Path) -> str:
    """A checkpoint's id (:func:`checkpoint_id`) as its files are now: scenario heads, exports, update states and
    indexes record it and refuse any other checkpoint."""
    ckpt = resolve_checkpoint_dir(ckpt)
    path = ckpt / "model.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path} not found; is {ckpt} a qanchor checkpoint?")
    return checkpoint_id(file_sha256(path), ckpt)


# The files besides the weights that define what a checkpoint computes, and the data keys among its config's that change
# what a user's packed input holds (the event caps are recorded and compared on their own: a command may change them)
_DEFINING_FILES = ("config.yaml", "qanchor.json", "backbone_config.json")
_DEFINING_DATA_KEYS = ("text_events", "history_text")
# checkpoint id -> the SHA-256 of its weights alone, for every id this process computed: what outputs recorded as their
# model's id before the id covered the config (see same_model)
_WEIGHTS_OF: dict[str, str] = {}
_SAID_LEGACY: set[tuple[str, str]] = set()


def checkpoint_id(weights_sha256: str, ckpt: Path) -> str:
    """The id of what checkpoint ``ckpt`` computes: SHA-256 over its weights' SHA-256 (``weights_sha256``, taken of the
    very file loaded), the bytes of backbone_config.json, the model section of config.yaml (with the data keys that
    change a user's packed input) and qanchor.json. The weights alone are not the model: two checkpoints with the same
    weights and another model.user_encoder.summary_tokens (a folder copied and its config edited) embed users apart.

    The config is read as written, not as this qanchor's loader completes it: a key a later version adds with its
    default would otherwise change the id of every checkpoint saved before. What only records where things came from is
    left out (qanchor.json's qanchor_version, the manifest's provenance, config.yaml's other sections)."""
    config = _read_defining(ckpt / "config.yaml", yaml.safe_load)
    meta = _read_defining(ckpt / "qanchor.json", json.loads)
    if config is not None:
        data = config.get("data") if isinstance(config.get("data"), dict) else {}
        config = {"model": config.get("model"), "data": {k: data[k] for k in _DEFINING_DATA_KEYS if k in data}}
    if meta is not None:
        meta = {k: v for k, v in meta.items() if k != "qanchor_version"}
        if isinstance(meta.get("manifest"), dict):
            meta["manifest"] = {k: v for k, v in meta["manifest"].items() if k != "provenance"}
    backbone = ckpt / "backbone_config.json"
    parts = {"weights": weights_sha256, "config": config, "meta": meta,
             "backbone_config": file_sha256(backbone) if backbone.is_file() else None}
    model_id = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    _WEIGHTS_OF[model_id] = weights_sha256
    return model_id


def _read_defining(path: Path, parse: Callable[[str], Any]) -> dict | None:
    if not path.is_file():
        return None
    try:
        raw = parse(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, yaml.YAMLError):
        raise CheckpointError(f"{path}: damaged (not the file qanchor saved); re-copy the checkpoint folder whole") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: damaged (not the mapping qanchor saved); re-copy the checkpoint folder whole")
    return raw


def same_model(recorded: str | None, model_id: str, what: str) -> bool:
    """Whether an output whose record names ``recorded`` as its model was made by the model whose id is ``model_id``
    (:func:`checkpoint_id`, or ``QAnchor.weights_id``). A record written before ids covered the config holds the
    SHA-256 of the weights alone: it is accepted for the same weights, said once per record (``what`` names it), since
    a config changed since then cannot be told from it."""
    if recorded == model_id:
        return True
    if recorded is None or recorded != _WEIGHTS_OF.get(model_id):
        return False
    if (what, recorded) not in _SAID_LEGACY:
        _SAID_LEGACY.add((what, recorded))
        warn(f"{what} records its model by the weights alone (written before qanchor's model ids covered the config), "
             "so a config.yaml, backbone_config.json or qanchor.json changed since cannot be detected; it is taken as "
             "this model's. Re-save it (tune the head again, export again, rebuild the state or index) to record the "
             "new id")
    return True


def head_label(directory: Path | None, query: str | None = None) -> str:
    """How a head is named where :func:`same_model` checks it: by the folder it was read from, else (built in memory)
    by its query. The same words at every check of one head (when it is loaded, when a model serves it): the warning
    about its record is said once per record, and a bench run said it twice per head, once per wording."""
    return f"the head {directory}" if directory is not None else f"the head for query {query!r}"


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_meta(ckpt: Path) -> ModelMeta:
    path = ckpt / "qanchor.json"
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    if not path.exists():
        raise CheckpointError(f"{ckpt}: not a qanchor checkpoint (qanchor.json missing)")
    raw = read_json_object(path, CheckpointError, "the checkpoint is damaged (re-save or re-train it)")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt}: checkpoint format {raw.get('format_version')} but this qanchor reads format "
                              f"{FORMAT_VERSION}; re-export it with qanchor {raw.get('qanchor_version')}")
    known = {f.name for f in fields(ModelMeta)}
    if unknown := sorted(set(raw) - known):  # written by a newer qanchor of the same format: what it adds is unread
        warn(f"{path}: entries this qanchor does not know ({', '.join(unknown)}), written by a newer one; "
             "ignored")
        raw = {k: v for k, v in raw.items() if k in known}
    try:
        meta = ModelMeta(**raw)
        meta.manifest_obj  # noqa: B018  (parses: a damaged manifest fails here, not mid-inference)
    except (TypeError, QAnchorError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({exc})") from None
    return meta


# A saved tokenizer's vocabulary: a fast tokenizer's tokenizer.json, or a slow one's own files (BERT, GPT-2 / Qwen,
# SentencePiece)
_VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def load_checkpoint(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[QAnchorModel, Any, ModelMeta, PretrainConfig]:
    """Rebuild model, tokenizer, metadata and run config from a checkpoint directory (safetensors only)."""
    from transformers import AutoConfig, AutoTokenizer

    ckpt = resolve_checkpoint_dir(ckpt)
    # taken before any of them is read: the checkpoint id read at the end describes the very files the model was built from
    defining = {name: _file_identity(ckpt / name) for name in _DEFINING_FILES if (ckpt / name).is_file()}
    meta = read_meta(ckpt)
    for name in ("config.yaml", "backbone_config.json", "model.safetensors", "tokenizer_config.json"):
        if not (ckpt / name).exists():
            raise CheckpointError(f"{ckpt}: incomplete checkpoint, {name} is missing")
    if not any((ckpt / name).exists() for name in _VOCABULARY_FILES):
        raise CheckpointError(f"{ckpt}: incomplete checkpoint, the tokenizer's vocabulary is missing (none of "
                              f"{', '.join(_VOCABULARY_FILES)}); re-copy the checkpoint folder whole")
    try:
        run_cfg = load_run_config(ckpt / "config.yaml")
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt / 'config.yaml'}: damaged run config ({exc})") from None
    try:
        hf_config = AutoConfig.from_pretrained(ckpt / "backbone_config.json")
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except _backbone_config_errors() as exc:
        if _out_of_memory(exc):
            raise
        raise CheckpointError(f"{ckpt}: damaged backbone config or tokenizer files ({str(exc).splitlines()[0]})") from None
    if meta.tokenizer_size is not None and len(tokenizer) != meta.tokenizer_size:
        raise CheckpointError(f"{ckpt}: the tokenizer files hold {len(tokenizer)} tokens, the model was saved with "
                              f"{meta.tokenizer_size}: they are damaged or from another model (every token would read "
                              "another row of the embedding table); re-copy the checkpoint folder whole")
    model, tokenizer = build_model(run_cfg.model, meta.manifest_obj, meta.text_dim, meta.tabular_columns,
                                   hf_config=hf_config, tokenizer=tokenizer, training_aids=run_cfg.loss, device=device)
    weights = ckpt / "model.safetensors"
    # The hash of exactly the weights loaded (the checkpoint id heads, exports and states record holds it): a run still saving into ``ckpt``
    # may publish new weights at any moment (a new file renamed into place), so the file must be the same one, unchanged,
    # from before it is hashed to after it is read; its identity is compared, not its bytes read a second time.
    identity = _file_identity(weights)
    weights_hash = file_sha256(weights)
    try:
        loaded = model.load_state_dict(load_file(str(weights)), strict=False)  # its pre-hooks rename older keys
    except RuntimeError as exc:  # torch: tensors of other shapes than this qanchor builds from the config
        raise CheckpointError(f"{weights}: the weights do not fit the model its config describes "
                              f"({str(exc).splitlines()[-1].strip()[:160]}); was it saved by another qanchor version?") from None
    except Exception as exc:  # safetensors raises its own error types for a damaged header or payload
        raise CheckpointError(f"{weights}: not a safetensors file, or truncated / damaged ({str(exc).splitlines()[0]}); "
                              "re-copy or re-save the checkpoint") from None
    missing, unexpected = _unmatched(model.state_dict(), loaded.missing_keys, loaded.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")
    if _file_identity(weights) != identity:
        raise CheckpointError(f"{weights} changed while it was being loaded (a run still saving into {ckpt}?); load it again")
    model_id = checkpoint_id(weights_hash, ckpt)
    if changed := next((name for name, was in defining.items()
                        if not (ckpt / name).is_file() or _file_identity(ckpt / name) != was), None):
        raise CheckpointError(f"{ckpt / changed} changed while the checkpoint was being loaded (a run still saving into "
                              f"{ckpt}?); load it again")
    # a NaN or an infinity in any weight makes every embedding NaN, which an export would write without a word
    broken = first_nonfinite(model.state_dict())
    if broken is not None:
        raise CheckpointError(f"{weights}: the weight {broken} holds NaN or infinite values (a run that diverged, or a "
                              "damaged file); load an earlier checkpoint, or pretrain again with a lower train.lr")
    model.weights_hash, model.checkpoint_id = weights_hash, model_id
    return model.to(device).eval(), tokenizer, meta, run_cfg


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None. Read through each tensor's
    largest and smallest value (a NaN propagates through both; an infinity is one of them), once per storage (tied
    weights are one): 0.7 s for Qwen2.5-0.5B's weights on 2 CPU cores, where a full isfinite pass took 4 s."""
    seen: set[tuple] = set()
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in seen:
            continue
        seen.add(key)
        if not (torch.isfinite(tensor.amax()) and torch.isfinite(tensor.amin())):
            return name
    return None


def check_encoder_digest(encoder: Any, recorded: str | None, checkpoint: str | Path | None,
                         refusal: Callable[[str], Exception] | None = None) -> None:
    """Compare a sentence encoder with what a checkpoint recorded of the encoder it was trained with (``recorded``, its
    :attr:`SentenceEncoder.digest`; None in a checkpoint older than the record: nothing to compare). Where it differs,
    raise ``refusal(why)`` (a text cache handed in, whose vectors would be mixed in), or else warn: the encoder a model
    opens for itself (at the path its checkpoint names, or the installed package) is only said to differ, since the
    digest reads the encoder's config.json, which a folder's owner may edit without changing what it computes (and an
    older checkpoint recorded the config as the transformers of its day described it, which another version describes
    with other keys). An encoder recognised only by an older digest (the weights' sum, which a small
    change of them can keep) is said too. A stand-in encoder without a config is taken as it is."""
    if recorded is None or getattr(encoder, "cfg", None) is None:
        return
    where = encoder.cfg.path or "all-MiniLM-L6-v2 (the installed package)"
    recognised = encoder.recognises(recorded)
    if recognised is not None:
        if recognised == "sum":  # recognised by the weights' sum only
            warn(f"{checkpoint or 'this model'} recorded its text encoder by the sum of the weights (a checkpoint "
                 "saved before 2026-12-07), which a small change of the weights, as fine-tuning makes, can leave as it "
                 f"was: the encoder {where} matches it, but make sure it is the one the model was trained with")
        return
    if refusal is not None:
        raise refusal(f" (its weights, tokenizer or settings differ: digest {encoder.digest}, trained {recorded})")
    warn(f"the text encoder {where} does not compute what {checkpoint or 'this model'} recorded of the encoder it was "
         f"trained with (digest {encoder.digest}, recorded {recorded}): its weights, tokenizer or config.json differ "
         "(or, for an older checkpoint, which recorded the config as the transformers of its day described it, the "
         "installed version describes the same encoder with other keys). If the encoder changed, every embedding differs from training's: put the trained encoder back at "
         "its path (data.text_encoder.path in the checkpoint's config.yaml)")


def text_encoder_config(meta: ModelMeta) -> TextEncoderConfig:
    return TextEncoderConfig(**meta.text_encoder)
