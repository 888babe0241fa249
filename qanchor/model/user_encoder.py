"""Hierarchical user encoder: event tokens -> modality tokens -> user token (DESIGN section 3).

Built from the manifest: one event adapter per sequence modality (the authors copy-pasted one class per
modality; here it is one class, instantiated per modality), a tabular encoder giving ``tabular_tokens``
tokens, one shared modal adapter, one user adapter and a learned "empty" token per modality.

Event input: the text vector and the numeric features are normalised *separately* (a LayerNorm on the
text vector, a standardisation with statistics stored at pretraining on the numeric features), so
neither drowns the other: raw, the log amounts (2-8) carried most of the energy and the unit-norm text
vector (components ~0.05) was lost. Modality tokens (``summary_input="text"``, the authors' choice) come
from the masked mean of the modality's *raw* text vectors plus window statistics of its kept events
(log count, newest and oldest age, mean numeric features), not from already adapted event tokens; with
``summary_stats="history"`` also the RFM statistics of the modality's whole history before the cutoff, which the
kept events (the most recent ``max_events``) cannot tell, and with ``"history_timing"`` its timing habit too.
With ``summary_text="history"`` the raw text mean is likewise the whole history's (``data.history_text``).

:meth:`HierarchicalUserEncoder.profile` gathers those statistics and the standardised tabular values into one
vector per user: the target of the profile loss (``loss.profile_weight``), which keeps them in the embedding.

Example:
    >>> enc = HierarchicalUserEncoder(manifest, cfg.user_encoder, text_dim=384, hidden=64, n_tabular=38)  # doctest: +SKIP
    >>> out = enc(user_batch)  # doctest: +SKIP
    >>> out.user.shape, out.modality.shape  # doctest: +SKIP
    (torch.Size([16, 64]), torch.Size([16, 6, 64]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qanchor.config import UserEncoderConfig
from qanchor.data.batch import UserBatch
from qanchor.data.history import HISTORY_STATS, PACKED_HISTORY
from qanchor.data.manifest import Manifest
from qanchor.data.packing import AGE_FEATURE, BASE_NUMERIC_FEATURES, numeric_width

__all__ = ["Adapter", "EventAdapter", "TabularEncoder", "ModalityEncoding", "UserTokens", "HierarchicalUserEncoder",
           "window_summary", "window_rfm", "SUMMARY_STATS", "RFM_STATS"]


class Adapter(nn.Sequential):
    """LayerNorm + two-layer GELU MLP: the shape of every adapter in the hierarchy."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, dropout: float = 0.0):
        super().__init__(nn.LayerNorm(d_in), nn.Linear(d_in, d_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out))


class EventAdapter(nn.Module):
    """A text vector and numeric features -> hidden size, each normalised and projected on its own.

    ``GELU(W_t LayerNorm(text) + W_n z(numeric)) -> Linear``, where ``z`` standardises with statistics stored
    at pretraining. Two input projections, summed, give both parts the same scale at initialisation whatever
    their widths (384 text dimensions against a handful of numeric ones), so neither drowns the other: in one
    LayerNorm over the concatenation the raw log amounts (2-8) carried most of the energy and the unit-norm
    text vector (components ~0.05) was lost.
    """

    def __init__(self, text_dim: int, numeric_dim: int, d_hidden: int, d_out: int, dropout: float = 0.0):
        super().__init__()
        self.text_norm = nn.LayerNorm(text_dim)
        # Set from training data by set_stats(); saved with the weights so inference normalises identically.
        self.register_buffer("numeric_mean", torch.zeros(numeric_dim))
        self.register_buffer("numeric_std", torch.ones(numeric_dim))
        self.text_in = nn.Linear(text_dim, d_hidden)
        self.numeric_in = nn.Linear(numeric_dim, d_hidden, bias=False)
        self.out = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.numeric_mean.copy_(mean)
        self.numeric_std.copy_(std)

    def forward(self, text_vec: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        # Batches stay float32 whatever the weights are (DeepSpeed's bf16 engine casts the weights only): the
        # statistics are standardised in float32, and each input meets its layer in that layer's dtype.
        dtype = self.text_in.weight.dtype
        z = ((numeric.float() - self.numeric_mean.float()) / self.numeric_std.float()).clamp(-10, 10)  # (..., F)
        return self.out(self.text_in(self.text_norm(text_vec.to(dtype))) + self.numeric_in(z.to(dtype)))  # (..., H)


SUMMARY_STATS = 3 + BASE_NUMERIC_FEATURES  # log count, newest age, oldest age, mean of the base numeric features


def window_summary(text_vec: torch.Tensor, numeric: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A modality's raw summary: (B, E, T), (B, E, F), (B, E) -> mean text vector (B, T), statistics (B, S).

    The statistics: log1p(events kept) / 3, the newest and the oldest kept event's age feature, and the mean of
    the modality-independent numeric features (value, missing flag, age, hour and weekday sin / cos).
    """
    w = mask.to(text_vec.dtype).unsqueeze(-1)  # (B, E, 1)
    count = w.sum(1)  # (B, 1)
    mean_text = (text_vec * w).sum(1) / count.clamp_min(1.0)  # (B, T)
    age = numeric[..., AGE_FEATURE]  # (B, E): log1p(age days) / 5 of each kept event
    newest = age.masked_fill(~mask, float("inf")).min(1, keepdim=True).values
    oldest = age.masked_fill(~mask, float("-inf")).max(1, keepdim=True).values
    present = count > 0
    newest, oldest = torch.where(present, newest, 0.0), torch.where(present, oldest, 0.0)
    base = (numeric[..., :BASE_NUMERIC_FEATURES] * w).sum(1) / count.clamp_min(1.0)  # (B, 7)
    return mean_text, torch.cat([torch.log1p(count) / 3, newest, oldest, base], dim=-1)


RFM_STATS = 10  # window_rfm's statistics
_RFM_WINDOWS_DAYS = (7.0, 30.0, 90.0)


def _signed_log(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def window_rfm(text_vec: torch.Tensor, numeric: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Recency / frequency / monetary statistics of a modality's kept events: (B, E, T), (B, E, F), (B, E) -> (B, 10).

    What a practitioner computes from a log, here over the events the model keeps (so a daily update, which keeps
    the same rolling window, computes them alike): log1p of the events in the last 7 / 30 / 90 days, of the active
    days, of the events per active day and of the distinct event texts; signed logs of the value sum, maximum,
    standard deviation and sum over the last 30 days (raw values, missing ones left out). Days count back from
    the cutoff, recovered from the age feature.
    """
    w = mask.to(numeric.dtype)  # (B, E)
    age_days = torch.expm1(numeric[..., AGE_FEATURE].clamp_min(0) * 5.0)  # (B, E), inverts log1p(days) / 5
    windows = [torch.log1p(((age_days <= d).to(w.dtype) * w).sum(1)) for d in _RFM_WINDOWS_DAYS]  # 3 x (B,)
    # Active days: distinct day indices among kept events (+1e-3 day absorbs float error at exact midnights).
    day = torch.floor(age_days + 1e-3).masked_fill(~mask, -1.0)  # (B, E)
    ordered = day.sort(dim=1).values
    starts = torch.cat([ordered[:, :1] >= 0, (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)], dim=1)
    active = starts.to(w.dtype).sum(1)  # (B,)
    count = w.sum(1)
    # Distinct texts: an event counts unless an earlier kept event has the same text vector.
    # the direct distance: cdist's default switches to a matrix product past 25 events, which puts identical vectors
    # up to 3.5e-4 apart, so the count depended on how wide other users in the batch padded the modality
    same = torch.cdist(text_vec.float(), text_vec.float(), compute_mode="donot_use_mm_for_euclid_dist") < 1e-4
    same = same & mask[:, :, None] & mask[:, None, :]
    earlier = torch.ones_like(same[0]).tril(diagonal=-1)  # (E, E): j < i
    distinct = (mask & ~(same & earlier).any(-1)).to(w.dtype).sum(1)  # (B,)
    known = mask & (numeric[..., 1] < 0.5)  # the value-missing flag
    # raw amounts in float64: legal values (up to float32's 3.4e38; 1e18-1e21 for wei) overflow a float32 sum or square
    logged = numeric[..., 0].double()
    raw = torch.where(known, torch.sign(logged) * torch.expm1(logged.abs()), 0.0)  # (B, E)
    n_known = known.to(raw.dtype).sum(1)
    total = raw.sum(1)
    mean = total / n_known.clamp_min(1.0)
    std = torch.sqrt(((raw - mean[:, None]) ** 2 * known).sum(1) / n_known.clamp_min(1.0))
    peak = raw.masked_fill(~known, float("-inf")).max(1).values
    peak = torch.where(n_known > 0, peak, 0.0)
    recent = (raw * (age_days <= 30.0)).sum(1)
    money = [_signed_log(x).to(w.dtype) for x in (total, peak, std, recent)]
    stats = [*windows, torch.log1p(active), torch.log1p(count / active.clamp_min(1.0)), torch.log1p(distinct), *money]
    return torch.stack(stats, dim=-1)  # (B, 10)


class TabularEncoder(nn.Module):
    """Normalised values with missing-value flags -> ``n_tokens`` tokens of width ``hidden``."""

    def __init__(self, n_features: int, n_tokens: int, d_hidden: int, hidden: int, dropout: float):
        super().__init__()
        self.n_tokens, self.hidden = n_tokens, hidden
        # Set from training data by set_stats(); saved with the weights so inference normalises identically.
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.mlp = Adapter(2 * n_features, d_hidden, n_tokens * hidden, dropout)

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def standardise(self, values: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        """(B, T) raw values -> z-scores with the stored statistics, clamped to +-10, 0 where missing."""
        return ((values.float() - self.mean.float()) / self.std.float()).clamp(-10, 10).masked_fill(missing, 0.0)

    def forward(self, values: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        z = self.standardise(values, missing)  # (B, T)
        x = torch.cat([z, missing.to(z.dtype)], dim=-1)  # (B, 2T)
        return self.mlp(x.to(self.mlp[0].weight.dtype)).view(-1, self.n_tokens, self.hidden)  # (B, n_tokens, H)


def _old_empty_key(state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints saved before EmptyTokens held the empty tokens as ``<prefix>empty``."""
    if prefix + "empty" in state_dict:
        state_dict[prefix + "empty.weight"] = state_dict.pop(prefix + "empty")


@dataclass
class ModalityEncoding:
    """One modality of B users: event tokens (B, E, H), their mask (B, E), the modality token (B, H)."""

    events: torch.Tensor
    mask: torch.Tensor
    token: torch.Tensor


@dataclass
class UserTokens:
    """Encoder output, all in the LLM's hidden size H. M counts every modality, tabular included."""

    user: torch.Tensor  # (B, H)
    modality: torch.Tensor  # (B, M, H), manifest order
    events: list[torch.Tensor]  # M tensors (B, E_m, H); tabular contributes its n_tokens tokens
    event_mask: list[torch.Tensor]  # M bool tensors (B, E_m)


class EmptyTokens(nn.Module):
    """The learned token (H,) of each modality for a user without events there. A module of its own (not a bare
    parameter of the encoder) so that DeepSpeed ZeRO-3, which gathers a module's weights around its forward and
    backward, finds it: the encoder's outputs are dataclasses, which its hooks do not see into."""

    def __init__(self, n: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, hidden))  # filled by the encoder, in its random-number order

    def forward(self, index: int) -> torch.Tensor:
        return self.weight[index]


class HierarchicalUserEncoder(nn.Module):
    def __init__(self, manifest: Manifest, cfg: UserEncoderConfig, text_dim: int, hidden: int, n_tabular: int):
        super().__init__()
        self.names = [m.name for m in manifest.modalities]
        # registered first, where the bare parameter it replaces stood in the parameter order (the optimizer's and the
        # gradient norm's summation order, so a run's numbers stay what they were); old checkpoints' key is mapped
        self.empty = EmptyTokens(len(self.names), hidden)
        self._register_load_state_dict_pre_hook(_old_empty_key)
        self.sequence_names = [m.name for m in manifest.sequence_modalities]
        self.tabular_name = manifest.tabular.name if manifest.tabular is not None else None
        self.summary_input = cfg.summary_input
        self.summary_stats = cfg.summary_stats
        self.summary_text = cfg.summary_text
        # how many of ModalityBatch.history's statistics the modality token reads: the RFM ones, or those and timing
        self.history_width = {"history": HISTORY_STATS, "history_timing": PACKED_HISTORY}.get(cfg.summary_stats, 0)
        self.summary_width = SUMMARY_STATS + (RFM_STATS if cfg.summary_stats == "rfm" else self.history_width)
        self.profile_stats_width = self.summary_width if cfg.profile_stats == "summary" else SUMMARY_STATS
        self.event_adapters = nn.ModuleDict({m.name: EventAdapter(text_dim, numeric_width(m), cfg.adapter_hidden, hidden,
                                                                  cfg.dropout) for m in manifest.sequence_modalities})
        self.tabular = (
            TabularEncoder(n_tabular, cfg.tabular_tokens, cfg.adapter_hidden, hidden, cfg.dropout) if self.tabular_name else None
        )
        self.modal_adapter = (EventAdapter(text_dim, self.summary_width, cfg.adapter_hidden, hidden, cfg.dropout)
                              if cfg.summary_input == "text" else Adapter(hidden, cfg.adapter_hidden, hidden, cfg.dropout))
        self.user_adapter = Adapter(hidden, cfg.adapter_hidden, hidden, cfg.dropout)
        self.empty.weight = nn.Parameter(torch.randn(len(self.names), hidden) * 0.02)  # one per modality
        self.content_components = cfg.content_components
        self.content_scale = cfg.content_scale
        # where the content components go: the profile's targets ("target") or the statistics path's input ("path")
        self.content_target = bool(cfg.content_components) and cfg.content_use == "target"
        self.content_in_path = bool(cfg.content_components) and cfg.content_use == "path"
        if self.content_components:  # only then: checkpoints saved without content load unchanged
            # Per sequence modality, set on the training users (set_content_basis) and saved with the weights: the
            # mean of their mean event-text vectors and the top principal directions, scaled as content_scale says.
            n_seq = len(self.sequence_names)
            self.register_buffer("content_center", torch.zeros(n_seq, text_dim))
            self.register_buffer("content_basis", torch.zeros(n_seq, self.content_components, text_dim))

    def modality_tokens(self, name: str, batch: UserBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Event tokens (B, E, H) and their mask (B, E) of modality ``name``; tabular gives its n_tokens tokens."""
        if name == self.tabular_name:
            tokens = self.tabular(batch.tabular, batch.tabular_missing)  # (B, n_tab, H)
            return tokens, batch.has_tabular[:, None].expand(-1, tokens.shape[1])  # (B, n_tab)
        mb = batch.modalities[name]
        return self.event_adapters[name](mb.text_vec, mb.numeric), mb.mask  # (B, E, H), (B, E)

    @staticmethod
    def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the unmasked tokens: (B, E, H), (B, E) -> (B, H); zeros where a row has none."""
        w = mask.to(tokens.dtype).unsqueeze(-1)  # (B, E, 1)
        return (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)

    def encode_modality(self, name: str, batch: UserBatch) -> ModalityEncoding:
        """Everything that depends on one modality's events alone: its event tokens and its modality token.

        A user without events of ``name`` gets the learned empty token. The daily update caches these per
        (user, modality) and re-encodes only modalities that received events.
        """
        tokens, mask = self.modality_tokens(name, batch)  # (B, E, H), (B, E)
        if name == self.tabular_name:
            summary = self.masked_mean(tokens, mask)  # the tabular tokens are already adapted
        elif self.summary_input == "text":
            summary = self.modal_adapter(*self.summary_inputs(name, batch))  # (B, H)
        else:
            summary = self.modal_adapter(self.masked_mean(tokens, mask))  # (B, H)
        empty = self.empty(self.names.index(name)).to(summary.dtype)
        return ModalityEncoding(tokens, mask, torch.where(mask.any(dim=1, keepdim=True), summary, empty))

    def tokens_from_encodings(self, encodings: list[ModalityEncoding]) -> UserTokens:
        """The user's tokens from its modality encodings (manifest order): the user token is computed here."""
        modal = torch.stack([e.token for e in encodings], dim=1)  # (B, M, H)
        user = self.user_adapter(modal.mean(dim=1))  # (B, H)
        return UserTokens(user, modal, [e.events for e in encodings], [e.mask for e in encodings])

    def forward(self, batch: UserBatch) -> UserTokens:
        return self.tokens_from_encodings([self.encode_modality(name, batch) for name in self.names])

    def summary_inputs(self, name: str, batch: UserBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence modality ``name``'s raw summary: mean text vector (B, T) and statistics (B, summary_width):
        :func:`window_summary`'s, then with ``summary_stats="rfm"`` :func:`window_rfm`'s (kept events), with
        ``summary_stats="history"`` the whole history's (``ModalityBatch.history``, computed when packing), with
        ``"history_timing"`` also its timing habit. The mean text vector is :meth:`summary_text_mean`'s."""
        mb = batch.modalities[name]
        mean_text, stats = window_summary(mb.text_vec, mb.numeric, mb.mask)
        if self.summary_text == "history":
            mean_text = self.history_text(name, batch).to(mean_text.dtype)
        if self.summary_stats == "rfm":
            stats = torch.cat([stats, window_rfm(mb.text_vec, mb.numeric, mb.mask)], dim=-1)
        elif self.history_width:
            if mb.history is None:
                raise ValueError(f"modality {name!r}: summary_stats={self.summary_stats!r} needs the whole-history "
                                 "statistics, and this batch has none; build batches with qanchor.data.batch.collate_users")
            stats = torch.cat([stats, mb.history[:, :self.history_width].to(stats.dtype)], dim=-1)
        return mean_text, stats

    def history_text(self, name: str, batch: UserBatch) -> torch.Tensor:
        """Sequence modality ``name``'s whole-history mean text vector (B, T), packed with ``data.history_text``."""
        mb = batch.modalities[name]
        if mb.history_text is None:
            raise ValueError(f"modality {name!r}: summary_text='history' reads each modality's whole-history mean text "
                             "vector, and this batch has none; pack with data.history_text=true (the checkpoint's "
                             "config sets it) and build batches with qanchor.data.batch.collate_users")
        return mb.history_text

    def summary_text_mean(self, name: str, batch: UserBatch) -> torch.Tensor:
        """The mean text vector that sequence modality ``name``'s token reads and its content components summarise,
        (B, T) float32: the kept events' (``summary_text="kept"``) or the whole history's (``"history"``)."""
        if self.summary_text == "history":
            return self.history_text(name, batch).float()
        mb = batch.modalities[name]
        return self.masked_mean(mb.text_vec.float(), mb.mask)

    @torch.no_grad()
    def set_content_basis(self, name: str, mean_text: torch.Tensor) -> None:
        """Fit sequence modality ``name``'s content components on the training users' mean event-text vectors
        (n, T) (users with events there only): their mean, and their top ``content_components`` principal
        directions, each scaled so that its component has unit variance over those users (``content_scale="unit"``),
        or all by one factor so that the components keep their relative spread and their mean variance is 1
        (``"spectrum"``). Directions beyond the data's rank stay zero (their components are 0)."""
        if not self.content_components:
            raise ValueError("set_content_basis: model.user_encoder.content_components is 0 (no content components)")
        i = self.sequence_names.index(name)
        x = mean_text.double()
        basis = torch.zeros(self.content_basis.shape[1:], dtype=torch.float64)
        center = x.mean(0) if len(x) else torch.zeros(basis.shape[1], dtype=torch.float64)
        if len(x) >= 2:
            _, sv, vt = torch.linalg.svd(x - center, full_matrices=False)
            std = sv / len(x) ** 0.5  # each direction's standard deviation over the users
            k = int(min(len(std), basis.shape[0], int((std > 1e-6).sum())))
            if self.content_scale == "spectrum":
                basis[:k] = vt[:k] / (std[:k] ** 2).mean().sqrt()
            else:
                basis[:k] = vt[:k] / std[:k, None]
        self.content_center[i].copy_(center.to(self.content_center.dtype))
        self.content_basis[i].copy_(basis.to(self.content_basis.dtype))

    def content(self, name: str, batch: UserBatch) -> torch.Tensor:
        """What sequence modality ``name``'s events are about, (B, content_components) float32: the standardised
        principal components (:meth:`set_content_basis`) of :meth:`summary_text_mean` (the kept events' or the
        whole history's mean text vector), clamped to +-10; zeros for a user without events there."""
        mb = batch.modalities[name]
        i = self.sequence_names.index(name)
        mean_text = self.summary_text_mean(name, batch)  # (B, T)
        z = ((mean_text - self.content_center[i].float()) @ self.content_basis[i].float().T).clamp(-10, 10)
        return torch.where(mb.mask.any(1, keepdim=True), z, 0.0)

    def profile(self, batch: UserBatch) -> torch.Tensor:
        """The user's input profile, (B, P): each sequence modality's summary statistics (:meth:`summary_inputs`;
        only :func:`window_summary`'s with ``profile_stats="window"``), then the tabular values standardised as the
        tabular encoder sees them and their missing flags, then (``content_use="target"``) each sequence modality's
        :meth:`content`."""
        parts = [self.summary_inputs(n, batch)[1][:, :self.profile_stats_width] for n in self.sequence_names]
        if self.tabular is not None:
            z = self.tabular.standardise(batch.tabular, batch.tabular_missing)
            parts += [z, batch.tabular_missing.to(z.dtype)]
        if self.content_target:
            parts += [self.content(n, batch).to(parts[0].dtype) for n in self.sequence_names]
        return torch.cat(parts, dim=-1)

    def modality_statistics(self, name: str, batch: UserBatch) -> torch.Tensor:
        """Modality ``name``'s block of :meth:`statistics`, float32: a sequence modality's summary statistics
        (:meth:`summary_inputs`) standardised as the modal adapter standardises them (zeros for a user without
        events there) and a presence flag, (B, summary_width + 1), then with ``content_use="path"`` its
        :meth:`content` (B, content_components); the tabular modality's values standardised as
        the tabular encoder sees them and their missing flags, (B, 2 T). It depends on that modality alone, so
        the daily update caches it with the modality's encoding."""
        if name == self.tabular_name:
            z = self.tabular.standardise(batch.tabular, batch.tabular_missing)
            return torch.cat([z, batch.tabular_missing.float()], dim=-1)
        stats = self.summary_inputs(name, batch)[1].float()  # (B, S_m)
        present = batch.modalities[name].mask.any(1, keepdim=True)  # (B, 1)
        if self.summary_input == "text":  # the modal adapter's stored standardisation (identity for "basic")
            adapter = self.modal_adapter
            stats = ((stats - adapter.numeric_mean.float()) / adapter.numeric_std.float()).clamp(-10, 10)
        block = [torch.where(present, stats, 0.0), present.float()]
        if self.content_in_path:
            block.append(self.content(name, batch))
        return torch.cat(block, dim=-1)

    def statistics(self, batch: UserBatch) -> torch.Tensor:
        """What the statistics path reads (``model.statistics_path``), (B, S): :meth:`modality_statistics` of
        every modality, manifest order."""
        return torch.cat([self.modality_statistics(name, batch) for name in self.names], dim=-1)

    def statistics_width(self) -> int:
        """Width S of :meth:`statistics`."""
        per_modality = self.summary_width + 1 + (self.content_components if self.content_in_path else 0)
        return len(self.sequence_names) * per_modality + (2 * self.tabular.mean.numel() if self.tabular is not None else 0)

    def profile_width(self) -> int:
        """Width P of :meth:`profile`."""
        return (len(self.sequence_names) * (self.profile_stats_width + (self.content_components if self.content_target else 0))
                + (2 * self.tabular.mean.numel() if self.tabular is not None else 0))
