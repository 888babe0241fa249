"""Query evidence (``model.query_evidence``): how strongly a user's own events match the question asked.

The query is anchored after the user tokens so that the backbone can pick out the behaviour the question is about.
A small backbone trained from random weights does not learn that look-up (the task query's embedding reads no
better than the generic query's: README, "the query matters"), yet the look-up needs no training: the question and
every event text are sentences embedded by the same frozen sentence encoder. For each sequence modality the
relevance of each kept event to the question is the cosine of their sentence vectors, standardised against the
modality's events of the training users (mean ``q . m``, variance ``q^T C q`` for the events' mean ``m`` and
covariance ``C``, so a question whose words resemble every event does not count as evidence everywhere). A few
fixed summaries of those relevances (the strongest, the top five, the mean, the share and number of clearly
relevant events, a soft maximum), standardised on the run's own pretraining pairs, enter the embedding through a
fixed map with orthonormal columns, scaled so that each modality's seven summaries together weigh as much as one
standardised statistic (they restate one quantity: how relevant that modality's events are to the question), times
one learned gain, beside the projection of the anchor's hidden state. They
depend on the question, so the same user gets different evidence under "Will this user buy a mutual fund?" and "Will
this user accept a travel offer?", which the generic question cannot stand in for.

Why fixed: pretraining pairs reward the evidence weakly (a yes/no answer carries about a bit), so a learned map
started at zero stayed small (after the tiny synthetic run its weights had norm 0.6 against the statistics path's
6.9) and the evidence was drowned in the sum; a probe on the embedding plus the raw features read 0.010 AUC more than
the embedding alone. A fixed faithful map puts every standardised feature into the embedding from the first step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qanchor.data.batch import UserBatch

__all__ = ["QueryEvidence", "EVIDENCE_FEATURES"]

# Per sequence modality, from the standardised relevances z of its kept events (zeros where it has none):
EVIDENCE_FEATURES = ("max", "top5_mean", "mean", "share_above_1", "share_above_2", "log_count_above_2", "soft_max")
TOP = 5
SOFT_MAX_SHARPNESS = 2.0  # weights softmax(2 z): between the mean (0) and the maximum (inf)
# A modality's summaries restate one quantity; together they weigh as much as one standardised statistic. At one
# statistic each, the evidence of the tiny runs made up most of the embedding's variance and cost the tasks it says
# nothing about (docs/quality.md, "Query evidence").
PER_MODALITY_SCALE = len(EVIDENCE_FEATURES) ** -0.5


class QueryEvidence(nn.Module):
    """(users, query sentence vectors) -> evidence features (N, M x 7) -> (N, D), part of the embedding's wide summand.

    ``names``: the sequence modalities, in the order of the user batch's. Set before pretraining and saved with the
    weights: the per-modality reference (the mean and covariance of the unit text vectors of the training users'
    kept events; :meth:`set_reference`, from ``fit_input_stats``) and the features' standardisation (their mean and
    std over the run's first pretraining pairs, each user at the pair's cutoff under the pair's question;
    :meth:`set_feature_stats`, from ``fit_evidence_stats``). The map: the standardised features times a fixed
    (D, F) matrix with orthonormal columns (rows where F > D; drawn from a fixed seed, so every model of one shape
    has the same), divided by sqrt(7) so that a modality's seven summaries (one quantity restated seven ways) enter
    with the squared norm of one standardised statistic, times a gain: learned from 1 (``learn_gain``), or held at 1.
    """

    def __init__(self, names: list[str], text_dim: int, embedding_dim: int, learn_gain: bool = True):
        super().__init__()
        self.names = list(names)
        width = len(self.names) * len(EVIDENCE_FEATURES)
        self.register_buffer("text_mean", torch.zeros(len(self.names), text_dim))
        self.register_buffer("text_cov", torch.zeros(len(self.names), text_dim, text_dim))
        self.register_buffer("feature_mean", torch.zeros(width))
        self.register_buffer("feature_std", torch.ones(width))
        self.register_buffer("basis", _orthonormal(embedding_dim, width))
        if learn_gain:
            self.gain = nn.Parameter(torch.ones(1))  # not 0-d: DeepSpeed broadcasts parameters as byte views
        else:  # model.query_evidence_gain: fixed; a buffer under the same name, so either checkpoint loads into either
            self.register_buffer("gain", torch.ones(1))

    @property
    def width(self) -> int:
        return self.basis.shape[1]

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Standardise the features as ``features`` (n, F), computed on pretraining pairs, are distributed."""
        x = features.double()
        std = x.std(0, unbiased=False)
        self.feature_mean.copy_(x.mean(0).to(self.feature_mean.dtype))
        self.feature_std.copy_(torch.where(std > 1e-6, std, 1.0).to(self.feature_std.dtype))

    def standardise(self, evidence: torch.Tensor) -> torch.Tensor:
        return (evidence.to(self.basis.dtype) - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def set_reference(self, name: str, vectors: torch.Tensor) -> None:
        """Fit modality ``name``'s reference on its events' text vectors (n, T) (normalised here)."""
        if name not in self.names:
            raise ValueError(f"query evidence: unknown modality {name!r}; it reads {self.names}")
        i = self.names.index(name)
        x = F.normalize(vectors.double(), dim=-1)
        if len(x) < 2:  # no events of this modality among the training users: nothing is relevant to anything
            self.text_mean[i].zero_()
            self.text_cov[i].zero_()
            return
        mean = x.mean(0)
        centred = x - mean
        self.text_mean[i].copy_(mean.to(self.text_mean.dtype))
        self.text_cov[i].copy_((centred.T @ centred / len(x)).to(self.text_cov.dtype))

    def features(self, users: UserBatch, index: torch.Tensor, query_vectors: torch.Tensor) -> torch.Tensor:
        """(N, M x 7) evidence of query ``n`` (``query_vectors`` (N, T), the frozen encoder's vectors of the query
        texts) in the kept events of user ``index[n]``; float32, no gradient (nothing here is learned)."""
        with torch.no_grad():
            return self.features_of(
                {name: (users.modalities[name].text_vec[index], users.modalities[name].mask[index]) for name in self.names},
                query_vectors)

    def features_of(self, events: dict[str, tuple[torch.Tensor, torch.Tensor]], query_vectors: torch.Tensor) -> torch.Tensor:
        """(N, M x 7) evidence of ``query_vectors`` (N, T) or one vector (T,) shared by every row, in ``events``: per
        modality name, the text vectors (N, E, T) of row ``n``'s kept events and their mask (N, E). Differentiable
        in the query vectors, so a scenario head can learn what to look up (``PromptTuneConfig.lookup_lr``)."""
        q = F.normalize(query_vectors.float(), dim=-1)  # (N, T) or (T,)
        out = []
        for i, name in enumerate(self.names):
            vectors, mask = events[name]
            text = F.normalize(vectors.float(), dim=-1)  # (N, E, T)
            q_rows = q.expand(len(text), -1) if q.dim() == 1 else q  # (N, T)
            center = q_rows @ self.text_mean[i].float()  # (N,)
            variance = torch.einsum("nt,ts,ns->n", q_rows, self.text_cov[i].float(), q_rows)
            spread = variance.clamp_min(SPREAD_FLOOR**2).sqrt()
            z = (torch.einsum("net,nt->ne", text, q_rows) - center[:, None]) / spread[:, None]  # (N, E)
            # A modality whose training texts barely vary along the question (no events, one fixed text such as
            # "login"): its relevances would be rounding noise magnified 10^4 times. Nothing there is evidence.
            z = torch.where((variance > SPREAD_FLOOR**2)[:, None], z, torch.zeros_like(z))
            out.append(_summaries(z, mask))
        return torch.cat(out, dim=-1)

    def forward(self, evidence: torch.Tensor) -> torch.Tensor:
        """(N, M x 7) features of :meth:`features` -> (N, D): standardised, through the fixed map, each modality's
        block at the weight of one statistic, times the gain."""
        return self.gain.to(self.basis.dtype) * (self.standardise(evidence) @ self.basis.T) * PER_MODALITY_SCALE


# The least spread of a modality's event texts along a question (std of their cosine to it over the training events)
# that relevance is measured against; the bundled datasets' smallest is 0.023 (Complete Journey's visits).
SPREAD_FLOOR = 1e-3


def _orthonormal(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (orthonormal rows if cols > rows), from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=torch.float64))
    return (q if rows >= cols else q.T).float()


def _summaries(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, E) relevances, (N, E) bool valid -> (N, 7) :data:`EVIDENCE_FEATURES`; zeros for a row without events."""
    valid = mask.float()
    n = valid.sum(1)  # (N,)
    has = n > 0
    denom = n.clamp_min(1)
    z = torch.where(mask, z, torch.zeros_like(z))
    lowest = -1e4  # below any relevance (a few units either side of 0), finite so softmax stays defined
    masked = torch.where(mask, z, torch.full_like(z, lowest))
    k = min(TOP, z.shape[1])
    top = masked.topk(k, dim=1).values  # (N, k); invalid slots at the end, held at `lowest`
    top_valid = top > lowest / 2
    top_mean = (top * top_valid).sum(1) / top_valid.sum(1).clamp_min(1)
    soft = torch.softmax(SOFT_MAX_SHARPNESS * masked, dim=1)  # invalid slots get weight 0 (when any is valid)
    above_1, above_2 = ((z > 1) & mask).float().sum(1), ((z > 2) & mask).float().sum(1)
    feats = torch.stack([masked.max(1).values, top_mean, z.sum(1) / denom, above_1 / denom, above_2 / denom,
                         torch.log1p(above_2), (soft * z).sum(1)], dim=1)
    return torch.where(has[:, None], feats, torch.zeros_like(feats))
