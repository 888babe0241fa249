"""Q-Anchor: hierarchical user tokens + a query anchored at the end, read by one causal LM twice.

Anchor tower: prefix + [soft prompt] + query + <|user_emb|>; the hidden state at <|user_emb|> is the
query-conditioned user embedding. Semantic tower (``model.answer_tower``): the same backbone reads the
answer text (last or mean-pooled token, through the shared projection MLP hidden -> 512 -> 128), or the
answer's frozen sentence vector goes through a projection of its own; both are L2-normalised.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qanchor.config import LossConfig, ModelConfig
from qanchor.data.batch import TextBatch, UserBatch
from qanchor.data.history import WINDOW_STATS
from qanchor.data.manifest import Manifest
from qanchor.model.backbone import cache_argument
from qanchor.model.layout import TokenIds, build_prefixes, pad_right
from qanchor.model.losses import combine, masked_infonce, token_cross_entropy
from qanchor.model.query_evidence import QueryEvidence
from qanchor.model.user_encoder import HierarchicalUserEncoder

__all__ = ["PretrainBatch", "QAnchorOutput", "QAnchorModel", "AnswerBank", "ProfileDecoder", "StatisticsPath",
           "shrunk_whitening"]

Gather = Callable[[torch.Tensor], torch.Tensor]
Normalise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PretrainBatch:
    users: UserBatch
    queries: TextBatch  # token ids without specials, right-padded
    answers: TextBatch  # answer token ids ending with the end token, right-padded
    answer_hash: torch.Tensor  # long [B]: equal answers share a hash; masked as negatives of each other
    answer_vec: torch.Tensor | None = None  # float32 [B, T]: frozen sentence vectors of the answers (text tower)
    query_hash: torch.Tensor | None = None  # long [B]: equal query texts share a hash (answer-bank scope)
    # bool [B]: the rows the profile loss applies to (loss.profile_sources); None = every row
    profile_rows: torch.Tensor | None = None
    # float32 [B, F]: each pair's window statistics of the days after its cutoff (loss.future_weight), and bool [B]:
    # the rows whose window ends by the dataset's cutoff (the others hold zeros and are not targets)
    future: torch.Tensor | None = None
    future_rows: torch.Tensor | None = None
    query_vec: torch.Tensor | None = None  # float32 [B, T]: frozen sentence vectors of the queries (model.query_evidence)

    def to(self, device) -> PretrainBatch:
        vec, qh, rows, fut, fut_rows, qvec = (None if t is None else t.to(device) for t in (
            self.answer_vec, self.query_hash, self.profile_rows, self.future, self.future_rows, self.query_vec))
        return PretrainBatch(self.users.to(device), self.queries.to(device), self.answers.to(device),
                             self.answer_hash.to(device), vec, qh, rows, fut, fut_rows, qvec)


@dataclass
class QAnchorOutput:
    anchor: torch.Tensor  # (B, D) unit vectors
    answer: torch.Tensor | None  # (B, D) unit vectors; None when the contrastive term is off
    loss: torch.Tensor
    loss_contrastive: torch.Tensor
    loss_ntp: torch.Tensor
    loss_profile: torch.Tensor  # zero when loss.profile_weight is 0
    loss_future: torch.Tensor  # zero when loss.future_weight is 0
    # The contrastive + profile_weight x profile loss of the embedding without the statistics path (before
    # loss.path_free_weight); zero when that weight is 0.
    loss_path_free: torch.Tensor


class AnswerBank:
    """The frozen sentence vectors and hashes of the most recent training answers (newest first), extra negatives.

    Only the text tower's inputs are kept, never embeddings: each step re-projects them with the current
    weights, so a bank negative is exactly what that answer would be in today's batch. Every rank pushes the
    gathered batch, so all ranks hold the same bank and N ranks x B rows equal one process with N x B rows.
    Its contents are part of the resume state (:meth:`state_dict`): a resumed run sees the same negatives as
    an uninterrupted one.
    """

    def __init__(self, size: int):
        self.size = size
        self.vec: torch.Tensor | None = None  # float32 [K, T]
        self.hash: torch.Tensor | None = None  # long [K]
        self.query_hash: torch.Tensor | None = None  # long [K]: the query each answer answered

    def __len__(self) -> int:
        return 0 if self.hash is None else int(self.hash.shape[0])

    def push(self, vec: torch.Tensor, hashes: torch.Tensor, query_hashes: torch.Tensor | None = None) -> None:
        vec, hashes = vec.detach().float(), hashes.detach().long()
        qh = torch.zeros_like(hashes) if query_hashes is None else query_hashes.detach().long()
        if self.vec is not None:
            vec, hashes = torch.cat([vec, self.vec.to(vec.device)]), torch.cat([hashes, self.hash.to(hashes.device)])
            qh = torch.cat([qh, self.query_hash.to(qh.device)])
        self.vec, self.hash, self.query_hash = vec[: self.size], hashes[: self.size], qh[: self.size]

    def state_dict(self) -> dict:
        return {"size": self.size, **{k: None if getattr(self, k) is None else getattr(self, k).cpu()
                                      for k in ("vec", "hash", "query_hash")}}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.vec, self.hash, self.query_hash = int(state["size"]), state["vec"], state["hash"], state["query_hash"]


def _local_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp_min(1)


def _projection(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """The paper's MLP head (Linear, GELU, Linear); ``hidden`` 0 = one linear map, so the embedding is a linear
    image of the anchor's hidden state and a linear probe can read from it whatever it could read from that state."""
    if hidden == 0:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def shrunk_whitening(z: torch.Tensor, shrink: float = 1.0) -> torch.Tensor:
    """A (P, P) matrix W for standardised profiles ``z`` (N, P): ``z @ W`` has uncorrelated columns, the principal
    direction of variance ``lam`` scaled to variance ``lam / (lam + shrink)`` and the whole rescaled so the total
    variance stays P (that of ``z``).

    ``shrink`` is in units of one standardised statistic: a direction restated by twenty statistics (variance ~20)
    counts about once, like one independent statistic (variance 1 -> 1/2 before the rescale), while near-empty
    directions (variance << shrink) stay near zero instead of being blown up into noise as full whitening would.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.cat([torch.randn(4000, 1, generator=g).repeat(1, 4), torch.randn(4000, 2, generator=g)], 1)
        >>> v = (z @ shrunk_whitening(z)).var(0)  # one direction restated 4 times, then two independent ones
        >>> v.sum().round().item(), (v.max() / v[v > 0.1].min()).item() < 1.7  # total kept; restated ~ single
        (6.0, True)
    """
    z = z.double()
    cov = z.T @ z / max(len(z), 1)  # (P, P); z is standardised, so its mean is ~0
    lam, vec = torch.linalg.eigh(cov)
    lam = lam.clamp_min(0.0)
    scale = (lam + shrink).rsqrt()
    kept = lam / (lam + shrink)  # each direction's variance after the scaling
    total = float(cov.diagonal().sum())
    if float(kept.sum()) <= 0:  # every profile identical: nothing to weigh
        return torch.eye(len(cov))
    return (vec * scale * (total / float(kept.sum())) ** 0.5).float()  # column k: direction k, rescaled


class ProfileDecoder(nn.Module):
    """Embedding (N, D) -> the user's standardised input profile (N, P), a training aid (``loss.profile_weight``).

    Linear, so whatever it decodes a linear probe on the embedding can read too. It reads the unit embedding
    times sqrt(D), components of order 1 like its standardised targets: from the unit vector (components ~D^-1/2)
    a default-initialised layer would need weights ~10x larger, which a few hundred steps never reach. The
    profile's mean and std are set from training users before pretraining (:meth:`set_stats`) and saved with
    the weights.

    With ``whitening`` the standardised targets are rotated and rescaled by a fixed (P, P) matrix
    (:func:`shrunk_whitening`, set with the statistics) before the error: an invertible linear map of the target,
    so the decoder stays linear and what it decodes is the same information, weighted per independent direction.
    """

    def __init__(self, embedding_dim: int, width: int, whitening: bool = False):
        super().__init__()
        self.linear = nn.Linear(embedding_dim, width)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.whitening = whitening
        if whitening:  # only then: checkpoints saved without it load unchanged
            self.register_buffer("whiten", torch.eye(width))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor, whiten: torch.Tensor | None = None) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)
        if self.whitening:
            if whiten is None:
                raise ValueError("a whitening profile decoder needs its whitening matrix (shrunk_whitening)")
            self.whiten.copy_(whiten)

    def target(self, profile: torch.Tensor) -> torch.Tensor:
        """(N, P) raw profiles -> what the decoder must output: standardised, then whitened if asked."""
        z = (profile.float() - self.mean.float()) / self.std.float()  # float32 targets, also under bf16 weights
        return z @ self.whiten.float() if self.whitening else z

    def loss_sum(self, embedding: torch.Tensor, profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum over rows of the per-row mean squared error, and the row count (for a global mean across ranks)."""
        target = self.target(profile)
        decoded = self.linear((embedding.float() * embedding.shape[-1] ** 0.5).to(self.linear.weight.dtype)).float()
        err = (decoded - target).pow(2).mean(-1)  # (N,)
        return err.sum(), torch.tensor(float(len(err)), device=err.device)


class StatisticsPath(nn.Module):
    """The wide path (``model.statistics_path``): the user's standardised input statistics (N, S) -> (N, D), added
    to the projection of the anchor's hidden state before the embedding is normalised.

    The user tokens are built from these statistics, yet a small backbone passes on less than a linear read of them
    holds (``benchmarks/forecast_check.py``); this path hands them to the embedding directly, as a wide-and-deep
    model's wide part does. ``gated``: each statistic is first scaled by ``2 sigmoid(W h)`` of the anchor's hidden
    state ``h``, which depends on the query, so the query chooses which statistics enter. ``W`` starts at zero, so
    a gated path starts as the plain linear one (every gate 1). ``principal``: a fixed map instead, the statistics'
    principal directions on the training users (:meth:`set_principal`, called by ``fit_input_stats``) times one
    learned gain, so training cannot reshape what the path passes on.
    """

    def __init__(self, hidden: int, width: int, embedding_dim: int, gated: bool = False, principal: bool = False,
                 orthogonal: bool = False):
        super().__init__()
        if gated and principal:
            raise ValueError("a statistics path is gated or principal, not both")
        if principal and orthogonal:
            raise ValueError("a principal statistics path has a fixed map: it has no initialisation to choose")
        self.principal = principal
        if principal:
            # Fixed: set by :meth:`set_principal` from the training users (zeros until then: the path adds nothing).
            self.register_buffer("center", torch.zeros(width))
            self.register_buffer("basis", torch.zeros(embedding_dim, width))
            self.gain = nn.Parameter(torch.ones(1))  # not 0-d: DeepSpeed broadcasts parameters as byte views
            self.linear = self.gate = None
            return
        self.linear = nn.Linear(width, embedding_dim)
        if orthogonal:
            # Semi-orthogonal (equal singular values), scaled to torch's default expected squared norm (each weight's
            # variance 1 / (3 width), so embedding_dim / 3 in all): the same share of the embedding, no input
            # direction squashed.
            nn.init.orthogonal_(self.linear.weight, gain=math.sqrt(embedding_dim / 3 / min(width, embedding_dim)))
        self.gate = nn.Linear(hidden, width) if gated else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    @torch.no_grad()
    def set_principal(self, statistics: torch.Tensor) -> None:
        """Fit the fixed map of a ``principal`` path on the training users' statistics (N, S): their mean, and their
        top principal directions (as many as the embedding has dimensions) scaled so that a training user's mapped
        statistics have unit mean squared norm. Directions are kept unwhitened: a quiet statistic stays quiet."""
        if not self.principal:
            raise ValueError("set_principal: this statistics path is not principal")
        x = statistics.double()
        center = x.mean(0)
        _, sv, vt = torch.linalg.svd(x - center, full_matrices=False)
        k = min(self.basis.shape[0], len(sv))
        variance = float((sv[:k] ** 2).sum()) / max(len(x), 1)
        basis = torch.zeros_like(self.basis, dtype=torch.float64)
        if variance > 0:
            basis[:k] = vt[:k] / variance**0.5
        self.center.copy_(center.to(self.center.dtype))
        self.basis.copy_(basis.to(self.basis.dtype))

    def forward(self, hidden: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
        if self.principal:
            x = statistics.to(self.basis.dtype) - self.center
            return self.gain.to(x.dtype) * (x @ self.basis.T)
        x = statistics.to(self.linear.weight.dtype)
        if self.gate is not None:
            x = x * 2 * torch.sigmoid(self.gate(hidden.to(self.gate.weight.dtype)))
        return self.linear(x)


class QAnchorModel(nn.Module):
    def __init__(self, cfg: ModelConfig, manifest: Manifest, backbone: nn.Module, token_ids: TokenIds, text_dim: int, n_tabular: int,
                 tokenizer: object = None, training_aids: LossConfig | None = None):
        """``training_aids``: the loss config whose decoders to build (the profile decoder when
        ``profile_weight`` > 0, the future decoder when ``future_weight`` > 0); None builds neither."""
        super().__init__()
        self.cfg, self.manifest, self.token_ids = cfg, manifest, token_ids
        self.tokenizer = tokenizer  # only a text-prefix model (user_input=text) tokenises inside forward
        self._line_ids: dict[str, list[int]] = {}  # event line -> token ids (lines repeat across steps)
        self.backbone = backbone
        hidden = backbone.get_input_embeddings().weight.shape[1]
        self.hidden_size = hidden
        self.user_encoder = HierarchicalUserEncoder(manifest, cfg.user_encoder, text_dim, hidden, n_tabular)
        self.projection = _projection(hidden, cfg.projection_hidden, cfg.embedding_dim)
        self.statistics_path = (StatisticsPath(hidden, self.user_encoder.statistics_width(), cfg.embedding_dim,
                                               gated=cfg.statistics_path == "gated",
                                               principal=cfg.statistics_path == "principal",
                                               orthogonal=cfg.statistics_path_init == "orthogonal")
                                if cfg.statistics_path != "none" else None)
        self.query_evidence = (QueryEvidence(self.user_encoder.sequence_names, text_dim, cfg.embedding_dim,
                                             learn_gain=cfg.query_evidence_gain == "learned")
                               if cfg.query_evidence else None)
        # The text tower's answers are frozen sentence vectors: a projection of their own maps them to the space.
        self.answer_projection = (_projection(text_dim, cfg.projection_hidden, cfg.embedding_dim)
                                  if cfg.answer_tower == "text_encoder" else None)
        aids = training_aids or LossConfig()
        self.profile_decoder = (ProfileDecoder(cfg.embedding_dim, self.user_encoder.profile_width(), aids.profile_whitening)
                                if aids.profile_weight > 0 else None)
        self.future_decoder = (ProfileDecoder(cfg.embedding_dim, self.future_width()) if aids.future_weight > 0 else None)

    def future_width(self) -> int:
        """Width of the future-profile target: :data:`WINDOW_STATS` per sequence modality, in manifest order."""
        return len(self.user_encoder.sequence_names) * len(WINDOW_STATS)

    # ------------------------------------------------------------------------------ building blocks
    @property
    def embed_tokens(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def decoder(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cache=None, **kwargs):
        """Run the backbone's transformer (no LM head) on embeddings, reading and extending ``cache`` if given."""
        decoder = self.backbone.get_decoder()
        if cache is not None:
            kwargs[cache_argument(type(decoder))] = cache
        # The user tokens come from float32 adapters; a bfloat16 / float16 backbone (model.backbone.dtype) reads its own.
        inputs_embeds = inputs_embeds.to(self.embed_tokens.weight.dtype)
        return decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def user_statistics(self, users: UserBatch) -> torch.Tensor | None:
        """(B, S) what the statistics path reads of each user (:meth:`HierarchicalUserEncoder.statistics`); None
        without a statistics path. Pass its rows to :meth:`project`, one per hidden state."""
        return None if self.statistics_path is None else self.user_encoder.statistics(users)

    def evidence(self, users: UserBatch, index: torch.Tensor, query_vectors: torch.Tensor | None) -> torch.Tensor | None:
        """(N, F) query evidence of row ``n``'s query (``query_vectors`` (N, T): the frozen sentence encoder's
        vectors of the query texts) in the events of user ``index[n]``; None without ``model.query_evidence``.
        Pass the rows to :meth:`project`, one per hidden state."""
        if self.query_evidence is None:
            return None
        if query_vectors is None:
            raise ValueError("model.query_evidence: the embedding needs each row's query vector (the sentence "
                             "encoder's vector of the query text)")
        return self.query_evidence.features(users, index.to(query_vectors.device), query_vectors)

    def project(self, hidden: torch.Tensor, statistics: torch.Tensor | None = None,
                evidence: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H) anchor hidden states -> (N, D) unit embeddings, in float32. With a statistics path
        (``model.statistics_path``) ``statistics`` (N, S) are the users' rows of :meth:`user_statistics`, one per
        hidden state, and are required; with ``model.query_evidence`` so are ``evidence`` (N, F), the rows of
        :meth:`evidence`."""
        deep, wide = self.embedding_parts(hidden, statistics, evidence)
        return F.normalize((deep if wide is None else deep + wide).float(), dim=-1)

    def embedding_parts(self, hidden: torch.Tensor, statistics: torch.Tensor | None = None,
                        evidence: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The two (N, D) summands :meth:`project` normalises, before normalisation: the projection of the hidden
        states, and what reaches the embedding without the backbone (the statistics path's map of ``statistics``
        plus the query evidence's map of ``evidence``; None with neither)."""
        deep = self.projection(hidden.to(self.projection[0].weight.dtype))
        wide = None
        if self.statistics_path is not None:
            if statistics is None:
                raise ValueError(f"model.statistics_path={self.cfg.statistics_path!r}: project() needs each row's user "
                                 "statistics (model.user_statistics(users), indexed like the hidden states)")
            wide = self.statistics_path(hidden, statistics.to(deep.device))
        if self.query_evidence is not None:
            if evidence is None:
                raise ValueError("model.query_evidence: project() needs each row's query evidence (model.evidence(users, "
                                 "index, query_vectors), indexed like the hidden states)")
            mapped = self.query_evidence(evidence.to(deep.device))
            wide = mapped if wide is None else wide + mapped
        return deep, wide

    def _project_text(self, hidden: torch.Tensor) -> torch.Tensor:
        """The backbone answer tower: an answer's hidden state through the shared projection, no user statistics."""
        return F.normalize(self.projection(hidden.to(self.projection[0].weight.dtype)).float(), dim=-1)

    def prefixes(self, users: UserBatch) -> list[torch.Tensor]:
        """Each user's prefix embeddings (L_b, H): user tokens, or with ``user_input=text`` the event lines."""
        if self.cfg.user_input == "text":
            return self._text_prefixes(users)
        tokens = self.user_encoder(users)
        return build_prefixes(tokens, self.token_ids, self.embed_tokens, self.cfg.user_encoder.summary_tokens)

    def _text_prefixes(self, users: UserBatch) -> list[torch.Tensor]:
        """TextN: ``[bos] <|user|>`` and the user's last events as plain text, each line closed by ``;``."""
        if self.tokenizer is None:
            raise ValueError("model.user_input=text needs the model's tokenizer (build_model sets it)")
        head = ([self.token_ids.bos] if self.token_ids.bos is not None else []) + [self.token_ids.user]
        device = next(self.parameters()).device
        out = []
        for lines in users.event_lines or [[] for _ in range(len(users))]:
            ids = list(head)
            for line in lines:
                if len(self._line_ids) >= 500_000:  # a bound for long runs over many users; lines are cheap to redo
                    self._line_ids.clear()
                if line not in self._line_ids:
                    self._line_ids[line] = self.tokenizer(f"{line} ;", add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
                ids += self._line_ids[line]
            out.append(self.embed_tokens(torch.tensor(ids, dtype=torch.long, device=device)))
        return out

    def suffix(self, query_ids: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
        """(Lq,) query ids -> (k + Lq + 1, H) suffix embeddings: [soft prompt] query <|user_emb|>."""
        ids = torch.cat([query_ids, query_ids.new_tensor([self.token_ids.user_emb])])
        emb = self.embed_tokens(ids)
        return emb if prompt is None else torch.cat([prompt.to(emb.dtype), emb], dim=0)

    def sequence(self, prefix: torch.Tensor, suffix: torch.Tensor, answer_ids: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One pretraining row: prefix (Lp, H) + suffix (Ls, H) [+ <|answer|> + answer tokens] -> (L, H) embeddings,
        next-token labels long (L,) (-100 = no target) and the anchor position.

        ``labels[t]`` is the token position ``t - 1`` must predict. The marker follows the anchor, so the anchor
        (``<|user_emb|>``) predicts nothing: it summarises the user for the query, it does not guess a word.
        """
        anchor = prefix.shape[0] + suffix.shape[0] - 1
        parts = [prefix, suffix]
        if answer_ids is not None:
            marker = answer_ids.new_tensor([self.token_ids.answer])
            parts.append(self.embed_tokens(torch.cat([marker, answer_ids])))  # (1 + La, H)
        row = torch.cat(parts, dim=0)  # (L, H)
        labels = torch.full((row.shape[0],), -100, dtype=torch.long, device=row.device)
        if answer_ids is not None:
            labels[anchor + 2 :] = answer_ids  # the marker (anchor + 1) predicts the first answer token
        return row, labels, anchor

    # ------------------------------------------------------------------------------------ forward
    def forward(self, batch: PretrainBatch, loss_cfg: LossConfig | None = None, gather: Gather | None = None,
                normalise: Normalise | None = None, rank: int = 0, prompt: torch.Tensor | None = None,
                answer_bank: AnswerBank | None = None) -> QAnchorOutput:
        """Anchor tower with the answer appended (next-token loss) plus the semantic tower.

        ``gather`` all-gathers embeddings across ranks with gradients and ``normalise(sum, count)`` turns a
        local loss sum into this rank's share of the global mean; both default to single-process versions.
        ``answer_bank`` (text tower only; the training loop owns it) adds its answers as negatives, then
        receives this batch's.
        Ranks hold equal-sized batches, so this rank's rows start at ``rank * B`` in the gathered batch.
        """
        loss_cfg = loss_cfg or LossConfig()
        gather = gather or (lambda x: x)
        normalise = normalise or _local_mean
        want_ntp, want_cl = loss_cfg.mode in ("both", "ntp"), loss_cfg.mode in ("both", "contrastive")
        rows, labels, anchor_pos = [], [], []
        for b, prefix in enumerate(self.prefixes(batch.users)):
            q = batch.queries.ids[b, : batch.queries.lengths[b]]
            a = batch.answers.ids[b, : batch.answers.lengths[b]]
            row, lab, pos = self.sequence(prefix, self.suffix(q, prompt), a if want_ntp else None)
            rows.append(row)
            labels.append(lab)
            anchor_pos.append(pos)
        embeds, mask, _ = pad_right(rows)
        hidden = self.decoder(embeds, mask).last_hidden_state  # (B, L, H)
        pos = torch.tensor(anchor_pos, device=hidden.device)
        every = torch.arange(len(rows), device=hidden.device)
        deep, wide = self.embedding_parts(hidden[every, pos], self.user_statistics(batch.users),
                                          self.evidence(batch.users, every, batch.query_vec))  # (B, D) each
        anchor = F.normalize((deep if wide is None else deep + wide).float(), dim=-1)
        path_free = None  # the same anchor without the statistics path: what the backbone alone carries
        if loss_cfg.path_free_weight > 0:
            if wide is None:
                raise ValueError("loss.path_free_weight > 0 needs a model with a statistics path (model.statistics_path) "
                                 "or query evidence (model.query_evidence)")
            path_free = F.normalize(deep.float(), dim=-1)
        zero = hidden.new_zeros((), dtype=torch.float32)
        ntp = cl = None
        path_free_loss = zero  # contrastive + profile_weight x profile of the path-free anchors
        if want_ntp:
            lab = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)  # (B, L)
            keep = lab[:, 1:] != -100  # (B, L - 1): positions whose next token is a target
            # The LM head only where a target follows: [B, L, V] logits would dwarf the rest of the step.
            logits = self.backbone.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
            ntp = normalise(*token_cross_entropy(logits, lab[:, 1:][keep]))
        answer_emb = None
        if want_cl:
            answer_emb = self.encode_answers(batch.answers, batch.answer_vec)
            anchors_all, answers_all = gather(anchor), gather(answer_emb)
            hashes = gather(batch.answer_hash)
            offset = rank * len(rows)
            same = hashes[:, None] == hashes[None, :]
            local = slice(offset, offset + len(rows))
            bank = bank_same = None
            if answer_bank is not None:
                if self.answer_projection is None:
                    raise ValueError("an answer bank needs model.answer_tower=text_encoder")
                if len(answer_bank):
                    bank = self._project_answer_vec(answer_bank.vec.to(anchor.device))
                    bank_same = hashes[local, None] == answer_bank.hash.to(hashes.device)[None, :]
                    if loss_cfg.answer_bank_scope == "same_query":  # only other users' answers to this query
                        if batch.query_hash is None:
                            raise ValueError("answer_bank_scope=same_query needs the batch's query_hash")
                        queries_all = gather(batch.query_hash)[local]
                        bank_same = bank_same | (queries_all[:, None] != answer_bank.query_hash.to(hashes.device)[None, :])
            def contrastive(anchors: torch.Tensor) -> torch.Tensor:
                total, count = masked_infonce(anchors, answers_all, rows=local, temperature=loss_cfg.temperature,
                                              margin=loss_cfg.margin, same_answer=same, bank=bank, same_bank=bank_same)
                return normalise(total, count)

            cl = contrastive(anchors_all)
            if path_free is not None:
                path_free_loss = contrastive(gather(path_free))
            if answer_bank is not None:  # after the loss: this batch's answers are already its in-batch negatives
                answer_bank.push(gather(batch.answer_vec.float()).detach(), hashes,
                                 None if batch.query_hash is None else gather(batch.query_hash))
        terms = combine(cl, ntp, loss_cfg.ntp_weight)
        total, profile = terms.total, zero
        if loss_cfg.profile_weight > 0:
            if self.profile_decoder is None:
                raise ValueError("loss.profile_weight > 0 needs a model built with its profile decoder")
            profile_in = self.user_encoder.profile(batch.users)
            chosen = slice(None) if batch.profile_rows is None else batch.profile_rows  # a rank may hold none

            def profile_error(embedded: torch.Tensor) -> torch.Tensor:
                return normalise(*self.profile_decoder.loss_sum(embedded[chosen], profile_in[chosen]))

            profile = profile_error(anchor)
            total = total + loss_cfg.profile_weight * profile
            if path_free is not None:
                path_free_loss = path_free_loss + loss_cfg.profile_weight * profile_error(path_free)
        if path_free is not None:
            total = total + loss_cfg.path_free_weight * path_free_loss
        future = zero
        if loss_cfg.future_weight > 0:
            if self.future_decoder is None or batch.future is None or batch.future_rows is None:
                raise ValueError("loss.future_weight > 0 needs a model built with its future decoder and batches with "
                                 "future targets (PretrainStream future_days)")
            rows = batch.future_rows
            future = normalise(*self.future_decoder.loss_sum(anchor[rows], batch.future[rows]))
            total = total + loss_cfg.future_weight * future
        return QAnchorOutput(anchor, answer_emb, total, terms.contrastive if cl is not None else zero,
                             terms.ntp if ntp is not None else zero, profile, future, path_free_loss)

    def _project_answer_vec(self, answer_vec: torch.Tensor) -> torch.Tensor:
        """Text tower: frozen sentence vectors (N, T) -> (N, D) unit vectors."""
        return F.normalize(self.answer_projection(answer_vec.to(self.answer_projection[0].weight.dtype)).float(), dim=-1)

    def encode_answers(self, answers: TextBatch, answer_vec: torch.Tensor | None = None) -> torch.Tensor:
        """Semantic tower -> (B, D) unit vectors: the backbone reads each answer (last token or mean pooled),
        or, with ``answer_tower="text_encoder"``, the answers' frozen sentence vectors (B, T) are projected."""
        if self.answer_projection is not None:
            if answer_vec is None:
                raise ValueError("answer_tower=text_encoder needs the batch's answer_vec (PretrainStream sets it)")
            return self._project_answer_vec(answer_vec)
        embeds = self.embed_tokens(answers.ids)  # (B, La, H)
        mask = torch.arange(answers.ids.shape[1], device=embeds.device)[None, :] < answers.lengths[:, None]
        hidden = self.decoder(embeds, mask.long()).last_hidden_state  # (B, La, H)
        if self.cfg.answer_pooling == "mean":  # a small causal model's last token sees little of a long answer
            w = mask.to(hidden.dtype).unsqueeze(-1)  # (B, La, 1)
            return self._project_text((hidden * w).sum(1) / w.sum(1).clamp_min(1.0))
        last = hidden[torch.arange(len(answers.lengths), device=hidden.device), answers.lengths - 1]
        return self._project_text(last)
