"""One typed config per command: its dataclass is the command's signature.

Every ``qanchor`` command reads ``[--config FILE] key=value ...`` into one of these (defaults here, a
YAML file on top, the command line last). Paths to existing inputs are strings; ``checkpoint`` always
names a checkpoint directory (or a pretraining output_dir), ``model`` always a :class:`ModelConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from qanchor.config.sections import (
    DataConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    check_seed,
    refuse_for_training,
)
from qanchor.errors import ConfigError

__all__ = ["PretrainConfig", "DataOverrides", "PromptTuneConfig", "BenchConfig", "InferConfig", "EmbedConfig",
           "UpdateConfig", "UqaConfig", "AskConfig", "DescribeConfig", "IndexBuildConfig", "IndexSearchConfig", "SynthConfig", "CompleteJourneyConfig",
           "CompleteJourneyProfileConfig",
           "UserUConfig", "require"]


def require(value: object, key: str, example: str) -> None:
    """ConfigError naming ``key`` when a required setting is empty."""
    if value in (None, "", [], ()):
        raise ConfigError(f"{key} is not set; pass {key}={example}")


@dataclass
class PretrainConfig:
    """``qanchor pretrain``: contrastive + next-token pretraining under DeepSpeed."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/pretrain"
    resume: bool = False  # continue the run in output_dir (refused if it was written by another run or user)
    overwrite: bool = False  # start output_dir (a qanchor pretraining run) afresh instead of refusing

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise ConfigError("resume=true and overwrite=true contradict each other; choose one")
        if self.data.text_events and self.model.user_input != "text":
            raise ConfigError(f"data.text_events={self.data.text_events} is read only by model.user_input=text; "
                              "set data.text_events=0 or model.user_input=text")
        reads_history_text = self.model.user_encoder.summary_text == "history"
        if reads_history_text != self.data.history_text:
            raise ConfigError(f"model.user_encoder.summary_text={self.model.user_encoder.summary_text} with "
                              f"data.history_text={str(self.data.history_text).lower()}: the whole history's text vector "
                              "is packed (data.history_text) exactly when the model reads it (summary_text=history); "
                              "set both or neither")
        if self.loss.path_free_weight > 0 and self.model.statistics_path == "none" and not self.model.query_evidence:
            raise ConfigError("loss.path_free_weight > 0 trains the embedding made without the statistics path and the "
                              "query evidence, and the model has neither; set model.statistics_path=add (or gated, "
                              "principal), model.query_evidence=true or loss.path_free_weight=0")
        enc = self.model.user_encoder
        if enc.content_components and enc.content_use == "target" and self.loss.profile_weight <= 0:
            raise ConfigError(f"model.user_encoder.content_components={enc.content_components} with content_use=target "
                              "adds targets to the profile loss, which loss.profile_weight=0 turns off; set "
                              "model.user_encoder.content_components=0, a positive loss.profile_weight or "
                              "model.user_encoder.content_use=path")
        if self.loss.answer_bank and self.loss.mode == "ntp":
            refuse_for_training("loss.answer_bank adds negatives to the contrastive loss, which loss.mode=ntp turns off; set "
                              "loss.answer_bank=0 or loss.mode=both")
        if self.model.answer_pooling != "last" and self.model.answer_tower != "backbone":
            refuse_for_training(f"model.answer_pooling={self.model.answer_pooling} pools the backbone tower's answer tokens, "
                              f"and model.answer_tower={self.model.answer_tower} embeds answers with the sentence encoder; "
                              "set model.answer_tower=backbone or leave answer_pooling at last")
        if self.loss.answer_bank and self.model.answer_tower != "text_encoder":
            raise ConfigError("loss.answer_bank needs model.answer_tower=text_encoder (only frozen answer vectors can "
                              "be re-projected with the current weights); set loss.answer_bank=0 or change the tower")


@dataclass
class DataOverrides:
    """Packing settings that override a checkpoint's own (None = as in pretraining)."""

    path: str = ""  # dataset directory
    cache_dir: str | None = None
    max_events: dict[str, int] | None = None
    default_max_events: int | None = None

    def apply(self, base: DataConfig) -> DataConfig:
        """``base`` (the checkpoint's data section) with the keys set here replacing its own. A modality's cap given
        here replaces the checkpoint's cap for that modality and keeps the others (``data.max_events.mini=10`` on a
        checkpoint trained with ``{bill: 32}`` packs with ``{bill: 32, mini: 10}``); ``data.max_events={}`` clears them."""
        changes = {k: v for k, v in (("path", self.path), ("cache_dir", self.cache_dir),
                                     ("default_max_events", self.default_max_events)) if v not in (None, "")}
        if self.max_events is not None:
            changes["max_events"] = {**base.max_events, **self.max_events} if self.max_events else {}
        return replace(base, **changes)


@dataclass
class PromptTuneConfig:
    """``qanchor prompt-tune``: cluster-based soft prompt tuning of one scenario head per task (DESIGN section 5).

    Users are packed exactly as in pretraining (the checkpoint's data section) unless ``data`` says
    otherwise; the text encoder is always the checkpoint's.
    """

    checkpoint: str = ""  # pretrained checkpoint directory (or a pretraining output_dir)
    data: DataOverrides = field(default_factory=DataOverrides)
    task: str = "all"  # a task name of the dataset, a comma-separated list, or "all"
    # Your own scenario instead of the dataset's tasks: a user_id,label Parquet / CSV / TSV and the question that
    # anchors it (as in qanchor bench); the head is named after the file
    labels: str | None = None
    query: str | None = None
    output_dir: str = "runs/heads"
    num_prompt_tokens: int = 6
    prototypes_per_class: int = 4
    # ...but fewer where a class is small: each prototype needs this many training users behind it.
    # Measured on the synthetic tasks (~1,200 training users): 4 prototypes for a class of 50-400 users
    # fit noise and cost ~0.03 test AUC against 1 prototype per class.
    min_users_per_prototype: int = 500
    temperature: float = 0.1
    # Where the prototypes start: "logistic", one per class placed so that the head's score ranks users as a
    # logistic regression on the step-0 embeddings does (prototypes_per_class is then unused; see
    # qanchor.tune.head.logistic_prototypes), or "kmeans", centres inside each class (the paper's cluster-based
    # tuning). k-means centres of overlapping classes say where each class lies, not what separates them:
    # per-fold heads scored 0.04 AUC below the linear probe on the same embeddings (docs/quality.md, "The scenario head").
    prototype_init: Literal["kmeans", "logistic"] = "logistic"
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3  # Adam, for the prompt vectors
    prototype_lr: float = 1e-3  # Adam, for the prototypes (unit vectors: a different scale from the prompt)
    # Adam, for the head's look-up vector on a model with model.query_evidence: which of the user's events count as
    # evidence for this scenario (it starts at the query text's sentence vector; see ScenarioHead). 0 = keep the
    # query's own vector (the frozen look-up).
    lookup_lr: float = 0.0
    eval_every: int = 25  # validation AUC every this many steps; the best step is kept
    # After the best step is chosen, fit the head's readout (its logistic prototypes and calibration) again on the
    # training *and* validation users under the chosen prompt: validation only picks the step, and a readout fitted
    # on 80% of the labelled users scored up to 0.013 AUC below one on all of them. Needs prototype_init: logistic
    # (tuned k-means prototypes have no refit that keeps what tuning learned).
    refit_readout: bool = True
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0
    prompt_init: Literal["query", "random"] = "query"  # query = the query's own token embeddings, cycled
    balanced: bool = True  # class-balanced batches (half positives): rare positives still shape the prompt
    # Learn the head's logit scale (temperature) and a class bias beside the prompt and prototypes. Unit-vector
    # cosines have a bounded range and no offset, so with a fixed temperature the loss can only fit a base rate or
    # a confident regression by tilting the prototypes off the direction that separates the classes. With a
    # logistic start both begin where the regression's logits are. false = the paper's fixed-temperature form.
    learn_calibration: bool = True
    # Whiten embeddings inside the head before the cosine (ridge eps relative to the top eigenvalue); null =
    # raw cosine on the embedding, the paper's literal form (default). Whitening helped when the embedding was
    # one direction; on an embedding spread over a dozen directions, whitening then normalising lets the
    # whitened noise directions dominate the norm and cost 0.04 AUC (docs/quality.md, "The scenario head"). See fit_whitening.
    whitening_eps: float | None = None
    prefix_chunk: int = 256  # users per prefix-encoding / evaluation batch
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1 or self.prototypes_per_class < 1 or self.min_users_per_prototype < 1:
            raise ConfigError("num_prompt_tokens, prototypes_per_class and min_users_per_prototype must be >= 1")
        # nan passed "<= 0" checks, inf any: each failed in a traceback (whitening_eps nan in scikit-learn, lr inf), or
        # tuned nothing without a word (whitening_eps inf: every user one point, AUC 0.5)
        positive = ("temperature", "lr", *(("whitening_eps",) if self.whitening_eps is not None else ()))
        for key in (*positive, "prototype_lr", "lookup_lr"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0 or (value == 0 and key in positive):
                bound = "> 0" if key in positive else ">= 0"
                null = ", or null for no whitening" if key == "whitening_eps" else ""
                raise ConfigError(f"{key} must be a finite number {bound}{null}, got {value}")
        check_seed(self.seed, "seed")  # a negative one was read as "too few users to split"
        if self.steps < 0 or self.batch_size < 2 or self.eval_every < 1 or self.prefix_chunk < 1:
            raise ConfigError("steps must be >= 0, batch_size >= 2, eval_every and prefix_chunk >= 1")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ConfigError(f"val_fraction ({self.val_fraction}) and test_fraction ({self.test_fraction}) must be in "
                              "(0, 1) and sum to less than 1: training needs users too")
        if self.refit_readout and self.prototype_init != "logistic":
            raise ConfigError(f"refit_readout needs prototype_init: logistic (got {self.prototype_init}); "
                              "set refit_readout=false to keep the tuned k-means prototypes")
        if (self.labels is None) != (self.query is None):
            raise ConfigError("a custom scenario needs both labels=<user_id,label file> and query=<text>")
        if self.labels is not None and self.task != "all":
            raise ConfigError(f"task={self.task} and labels= both name what to tune: give one of them")


@dataclass
class BenchConfig:
    """``qanchor bench``: AUC / KS of Q-Anchor and peers under the same stratified k-fold split.

    Either the dataset's own tasks (``tasks``) or one custom task (``labels`` + ``query``) is judged.
    """

    checkpoint: str | None = None  # checkpoint dir (or a pretraining output_dir); None = peers only
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[str] = field(default_factory=list)  # empty = every task of the dataset
    folds: int = 5
    seed: int = 0  # fixes the folds, the classifiers and any subsampling
    generic_query: str = "What kind of user is this?"  # the static-embedding baseline's one query
    methods: list[str] = field(default_factory=lambda: ["qanchor_task", "qanchor_generic", "qanchor_swapped_query",
                                                        "qanchor_random_init", "qanchor_head", "qanchor_head_lr", "rfm_lgbm",
                                                        "rfm_lr", "text_mean_lr", "union_lgbm", "union_lr", "coles"])
    heads_dir: str | None = None  # `qanchor prompt-tune` output_dir, for the before / after tuning PCA plot
    ablations: bool = False  # retrain ablated models under <output_dir>/ablations/ (slow: pretraining runs)
    output_dir: str = "results/bench"
    labels: str | None = None  # custom task: a Parquet with user_id, label (0/1); needs `query`
    query: str | None = None  # custom task: the question that anchors it
    max_users: int | None = None  # random subsample of every task's users (quick looks); None = all
    n_jobs: int = 1  # threads (torch, BLAS, LightGBM) for the run; 1 is safest on shared cores, 2 is ~1.5x faster on 2 idle ones
    pca_tasks: list[str] = field(default_factory=list)  # tasks for the before/after-tuning PCA plot; [] = first with a head
    coles_epochs: int = 4  # CoLES is a peer, kept small so the demo stays within minutes on CPU
    coles_hidden: int = 64
    coles_max_events: int = 256  # most recent events per user fed to CoLES
    ablation_pretrain_overrides: list[str] = field(default_factory=list)  # extra key=value for ablation pretraining
    ablation_prompt_tokens: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 8])
    prompt_tune_config: str | None = None  # prompt-tune YAML for per-fold heads and the prompt-token ablation
    head_steps: int | None = 150  # steps of each per-fold head (qanchor_head); None = the prompt-tune config's

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"folds must be >= 2, got {self.folds}")
        check_seed(self.seed, "seed")
        if self.n_jobs < 1:  # LightGBM reads 0 or -1 as every core
            raise ConfigError(f"n_jobs must be >= 1 (threads), got {self.n_jobs}")
        # the CoLES peer's: epochs -1 trained forever (Lightning's max_epochs=-1), a width of 0 failed in a traceback,
        # and 0 events used every event without a word (a negative number dropped the newest)
        for key in ("coles_epochs", "coles_hidden", "coles_max_events"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.head_steps is not None and self.head_steps < 0:  # said only after other rows had run, as "steps"
            raise ConfigError(f"head_steps must be >= 0 (or null: the prompt-tune config's steps), got {self.head_steps}")
        if (self.labels is None) != (self.query is None):
            raise ConfigError("a custom task needs both labels=<user_id,label Parquet> and query=<text>")
        if self.max_users is not None and self.max_users < 10:
            raise ConfigError(f"max_users must be >= 10 (or null), got {self.max_users}")
        if not self.methods:
            raise ConfigError("methods is empty; name at least one method")
        if bad := [k for k in self.ablation_prompt_tokens if k < 1]:  # said only after four pretraining runs, unnamed
            raise ConfigError(f"ablation_prompt_tokens: {bad[0]} is not a number of prompt tokens; each must be >= 1, "
                              f"got {list(self.ablation_prompt_tokens)}")
        default = DataConfig()
        unused = [k for k in ("max_events", "default_max_events", "text_events", "history_text")
                  if getattr(self.data, k) != getattr(default, k)]
        if unused:  # accepted and ignored, a misspelled modality included, until 2026-12-06
            raise ConfigError(f"data.{unused[0]}: the bench packs users as the checkpoint was pretrained (its own caps) "
                              "and its peers read every event before the cutoff; the setting would be ignored, drop it")


@dataclass
class InferConfig:
    """Loading a checkpoint for inference: what every inference command (and ``QAnchor.from_config``) reads."""

    checkpoint: str = ""  # checkpoint dir (or a pretraining output_dir)
    device: str = "cpu"
    batch_size: int = 32  # users per prefix pass
    max_rows: int = 512  # (user, query) suffixes per forward
    text_cache_dir: str | None = None  # event-text vectors; default: the dataset's cache, else ~/.cache/qanchor/text

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_rows < 1:
            raise ConfigError(f"batch_size and max_rows must be >= 1, got {self.batch_size} and {self.max_rows}")


@dataclass
class EmbedConfig(InferConfig):
    """``qanchor embed``: every user of a dataset x every query (and head) -> resumable Parquet shards."""

    data: DataOverrides = field(default_factory=DataOverrides)  # data.path: the dataset to embed (caps: the checkpoint's)
    queries: str | None = None  # a YAML / CSV / text / Parquet file of queries (qanchor.infer.export.read_queries), or "tasks" (the dataset's task queries)
    heads: list[str] = field(default_factory=list)  # prompt-tune output dirs or head folders: rows head:<task>
    out: str = ""  # output directory (resumes a partial export of the same settings)
    shard_users: int | None = None  # users per shard (default: one dataset partition)
    cutoff: str | None = None  # ISO time event ages count from (default: the dataset cutoff)
    use_prefix_cache: bool = True  # false = reference path: one full forward per user x query
    overwrite: bool = False  # replace an export of other settings in `out` (still only a qanchor export)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shard_users is not None and self.shard_users < 1:
            raise ConfigError(f"shard_users must be >= 1 (or null), got {self.shard_users}")


@dataclass
class UpdateConfig(InferConfig):
    """``qanchor update``: build a first state from a dataset, or apply a day of events to yesterday's state."""

    # data.path: build the first state from this dataset; data.max_events / default_max_events: the checkpoint's unless
    # set (a state keeps the caps it was built with, and its updates pack with them)
    data: DataOverrides = field(default_factory=DataOverrides)
    state: str | None = None  # yesterday's state directory
    events: list[str] = field(default_factory=list)  # Parquet file(s) of new events (dataset event format)
    out: str = ""  # today's state directory (never inside --state or the dataset)
    queries: str | None = None  # queries file (default: the state's); new queries re-embed everyone
    as_of: str | None = None  # ISO time of the new state (default: midnight after the newest event)
    full: bool = False  # re-encode every modality of every user at the new as_of
    tabular: str | None = None  # Parquet of tabular rows (user_id + the model's tabular columns): new users' or changed


@dataclass
class IndexBuildConfig:
    """``qanchor index build``: a faiss look-alike index over one query's exported embeddings."""

    embeddings: str = ""  # an export directory (qanchor embed) or an update state
    query_id: str = ""
    out: str = ""  # index file (FILE.users.parquet and FILE.json are written beside it)
    ivf_min_size: int = 50_000  # from this many users on, an IVF index (else exact)
    nprobe: int | None = None  # IVF cells searched (default nlist / 8)

    def __post_init__(self) -> None:
        if self.ivf_min_size < 1 or (self.nprobe is not None and self.nprobe < 1):
            raise ConfigError(f"ivf_min_size and nprobe must be >= 1 (nprobe: or null), got {self.ivf_min_size} and "
                              f"{self.nprobe}")


@dataclass
class UqaConfig:
    """``qanchor uqa``: multiple-choice questions about held-out users; Q-Anchor vs TextN vs the prior vs random."""

    checkpoint: str = ""  # a Q-Anchor checkpoint pretrained with train.holdout_users > 0
    data: DataOverrides = field(default_factory=DataOverrides)  # data.path: the dataset it was pretrained on
    text_events: list[int] = field(default_factory=lambda: [8, 32, 128])  # TextN rows (each retrained: slow)
    prior: bool = True  # the no-user row (retrained with the same recipe)
    max_users: int | None = None  # at most this many held-out users (drawn with seed); None = all
    window_days: int = 30  # action prediction: the window after the internal cutoff
    seed: int = 0
    batch_size: int = 16  # users per prefix pass while scoring
    output_dir: str = "results/uqa"

    def __post_init__(self) -> None:
        if any(n < 1 for n in self.text_events):
            raise ConfigError(f"text_events must be >= 1 each (the prior row is prior=true), got {self.text_events}")
        if self.max_users is not None and self.max_users < 4:
            raise ConfigError(f"max_users must be >= 4 (3 distractors come from other users), got {self.max_users}")
        if self.window_days < 1 or self.batch_size < 1:
            raise ConfigError("window_days and batch_size must be >= 1")
        check_seed(self.seed, "seed")
        for key in ("max_events", "default_max_events"):
            if getattr(self.data, key) is not None:  # accepted and ignored until 2026-12-06
                raise ConfigError(f"data.{key}: uqa reads users as the checkpoint was pretrained (each TextN row with "
                                  "the caps its N needs); the setting would be ignored, drop it")


@dataclass
class AskConfig(InferConfig):
    """``qanchor ask``: the model's answer to a question about one user of a dataset."""

    data: DataOverrides = field(default_factory=DataOverrides)  # data.path: the dataset the user is in
    user: str = ""  # user id
    question: str = ""  # or the command's positional argument
    options: list[str] | None = None  # given: score these and pick one instead of writing an answer
    max_new_tokens: int = 48
    cutoff: str | None = None  # ISO time event ages count from (default: the dataset cutoff)
    json: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class DescribeConfig(InferConfig):
    """``qanchor describe``: a verified profile of one user, from the model's own answers."""

    data: DataOverrides = field(default_factory=DataOverrides)
    user: str = ""
    aspects: list[str] = field(default_factory=list)  # default: every aspect of qanchor.data.profile
    cutoff: str | None = None
    json: bool = False


@dataclass
class IndexSearchConfig:
    """``qanchor index search``: the k users most like a user or a vector."""

    index: str = ""
    user: str = ""  # a user id, verbatim ("None" is an id like any other); empty: not given
    vector: str | None = None  # comma-separated numbers or a .npy file
    k: int = 10
    json: bool = False
    # with vector=: the checkpoint that embedded it, refused unless the index's embeddings are that model's
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")


@dataclass
class SynthConfig:
    """``qanchor data synth``: the synthetic six-modality world (tasks know their true probability); also
    ``qanchor data ratings``, the synthetic ratings world (``data_tools.ratings``), with the same settings."""

    out: str = ""
    users: int = 2000
    seed: int = 1

    def __post_init__(self) -> None:
        if self.users < 1:
            raise ConfigError(f"users must be >= 1, got {self.users}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0 (the generator's random streams are seeded by it), got {self.seed}")


@dataclass
class CompleteJourneyConfig:
    """``qanchor data completejourney``: the Complete Journey grocery panel as a qanchor dataset."""

    out: str = ""
    cutoff: str = "2017-09-30"  # inputs strictly before, labels after (an ISO date: midnight UTC)


@dataclass
class CompleteJourneyProfileConfig:
    """``qanchor data cj-profile``: Complete Journey households' purchases, with their demographics as profile tasks."""

    out: str = ""
    cutoff: str = "2018-01-01"  # purchases strictly before (the default keeps all of 2017); labels are fixed attributes


@dataclass
class UserUConfig:
    """``qanchor data userU DIR``: UserU pretraining pairs (future + uqa + forecast [+ signature]) into ``DIR/userU.parquet``."""

    seed: int = 0
    future_cutoffs: int = 3  # internal cutoffs per user for `future` pairs
    future_window_days: int = 30
    min_history_days: int = 14
    forecast: bool = True  # also write `forecast` pairs (yes / no questions about the next window)
    # also write `signature` pairs: "what sets this user apart?", answered with the items it repeats that few
    # other users have (at the dataset cutoff and each future cutoff)
    signature: bool = False

    def __post_init__(self) -> None:
        if self.seed < 0 or self.future_cutoffs < 0 or self.future_window_days < 1 or self.min_history_days < 0:
            raise ConfigError("seed, future_cutoffs and min_history_days must be >= 0 and future_window_days >= 1")
