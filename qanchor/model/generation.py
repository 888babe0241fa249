"""Reading the user model in words: greedy answers and option log-likelihoods on a cached user prefix.

Pretraining teaches the next-token tower to write the answer after ``question <|user_emb|> <|answer|>``
(``QAnchorModel.sequence``). Generation asks in exactly that layout: the user's prefix runs once (the same
:class:`~qanchor.model.prefix_cache.PrefixCache` that serves embeddings), each question is a suffix on it,
and the answer grows one token at a time on the row's own copy of the keys/values.

- :func:`answer_suffix`: question ids -> the suffix embeddings an answer follows.
- :func:`greedy_generate` / :func:`greedy_generate_uncached`: answer token ids per (user, question) row.
- :func:`option_logprobs` / :func:`option_logprobs_uncached`: mean log-probability of each option's tokens
  (closed by the end token, so an option that is only the start of the model's answer is not favoured).

The uncached functions run every row as one full sequence from scratch: the reference the cached paths are
tested against (same tokens; log-likelihoods within 1e-4).

Example:
    >>> prefix = encode_prefixes(model, users)                                          # doctest: +SKIP
    >>> ids = greedy_generate(model, prefix, torch.tensor([0, 1]), [s, s], max_new_tokens=32)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qanchor.errors import CheckpointError
from qanchor.model.layout import pad_right
from qanchor.model.prefix_cache import PrefixCache, suffix_hidden
from qanchor.model.qanchor_model import QAnchorModel

__all__ = ["language_head", "answer_suffix", "greedy_generate", "greedy_generate_uncached", "option_logprobs",
           "option_logprobs_uncached"]


def language_head(model: QAnchorModel) -> torch.nn.Module:
    """The backbone's LM head, or CheckpointError when the backbone has none."""
    head = model.backbone.get_output_embeddings()
    if head is None:
        raise CheckpointError("this checkpoint's backbone has no language-model head: it can embed users but not "
                              "answer questions; use a checkpoint pretrained with loss.mode=both or ntp")
    return head


def answer_suffix(model: QAnchorModel, question_ids: torch.Tensor) -> torch.Tensor:
    """(Lq,) question ids -> (Lq + 2, H): ``question <|user_emb|> <|answer|>``, the layout answers follow."""
    ids = model.token_ids
    return model.embed_tokens(torch.cat([question_ids, question_ids.new_tensor([ids.user_emb, ids.answer])]))


def _logits(model: QAnchorModel, hidden: torch.Tensor) -> torch.Tensor:
    head = language_head(model)
    return head(hidden.to(head.weight.dtype)).float()


@torch.inference_mode()
def greedy_generate(model: QAnchorModel, prefix: PrefixCache, user_index: torch.Tensor, suffixes: list[torch.Tensor],
                    max_new_tokens: int) -> list[list[int]]:
    """Greedy answer ids (without the end token) for ``suffixes[n]`` on user ``user_index[n]``'s cached prefix.

    Rows are right-padded: a row's new token is written after the padding of the shorter suffixes, which the
    attention mask hides, and its position id continues the row's own sequence, so each row decodes exactly
    as it would alone.
    """
    end = model.token_ids.end
    rows = prefix.select(user_index)
    embeds, suffix_mask, suffix_len = pad_right(suffixes)  # (N, Ls, H)
    steps = torch.arange(embeds.shape[1], device=embeds.device)
    mask = torch.cat([rows.mask, suffix_mask], dim=1)
    out = model.decoder(embeds, mask, cache=rows.cache, use_cache=True, position_ids=rows.lengths[:, None] + steps[None, :])
    n = len(suffixes)
    hidden = out.last_hidden_state[torch.arange(n, device=embeds.device), suffix_len - 1]  # (N, H)
    position = rows.lengths + suffix_len  # (N,): where each row's next token sits in its own sequence
    tokens: list[list[int]] = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool, device=embeds.device)
    for _ in range(max_new_tokens):
        nxt = _logits(model, hidden).argmax(-1)  # (N,)
        done |= nxt == end
        for i in torch.nonzero(~done).flatten().tolist():
            tokens[i].append(int(nxt[i]))
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
        feed = model.embed_tokens(torch.where(done, torch.full_like(nxt, end), nxt))[:, None]  # (N, 1, H)
        out = model.decoder(feed, mask, cache=rows.cache, use_cache=True, position_ids=position[:, None])
        position = position + 1
        hidden = out.last_hidden_state[:, 0]
    return tokens


@torch.inference_mode()
def greedy_generate_uncached(model: QAnchorModel, prefixes: list[torch.Tensor], user_index: torch.Tensor,
                             suffixes: list[torch.Tensor], max_new_tokens: int) -> list[list[int]]:
    """Reference: each row re-runs its whole sequence (prefix + suffix + answer so far) for every new token."""
    end = model.token_ids.end
    out = []
    for u, suffix in zip(user_index.tolist(), suffixes):
        seq, tokens = torch.cat([prefixes[u], suffix]), []
        for _ in range(max_new_tokens):
            hidden = model.decoder(seq[None], torch.ones((1, seq.shape[0]), dtype=torch.long, device=seq.device))
            nxt = int(_logits(model, hidden.last_hidden_state[0, -1:]).argmax(-1))
            if nxt == end:
                break
            tokens.append(nxt)
            seq = torch.cat([seq, model.embed_tokens(torch.tensor([nxt], device=seq.device))])
        out.append(tokens)
    return out


def _option_rows(model: QAnchorModel, suffixes: list[torch.Tensor], options: list[list[int]]
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Suffix + option tokens + end -> rows, and each row's targets (the option's ids and the end id)."""
    targets = [torch.tensor([*o, model.token_ids.end], dtype=torch.long, device=s.device) for s, o in zip(suffixes, options)]
    rows = [torch.cat([s, model.embed_tokens(t[:-1])]) for s, t in zip(suffixes, targets)]
    return rows, targets


def _mean_logprob(model: QAnchorModel, hidden: torch.Tensor, start: int, target: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of ``target`` predicted from ``hidden[start - 1 : start - 1 + len(target)]``."""
    logp = F.log_softmax(_logits(model, hidden[start - 1 : start - 1 + len(target)]), dim=-1)  # (T, V)
    return logp.gather(1, target[:, None]).mean()


@torch.inference_mode()
def option_logprobs(model: QAnchorModel, prefix: PrefixCache, user_index: torch.Tensor, suffixes: list[torch.Tensor],
                    options: list[list[int]]) -> torch.Tensor:
    """Length-normalised log-likelihood of ``options[n]`` (ids) after ``suffixes[n]`` on user ``user_index[n]`` -> (N,)."""
    rows, targets = _option_rows(model, suffixes, options)
    hidden, _ = suffix_hidden(model, prefix, user_index, rows)  # (N, Ls, H)
    return torch.stack([_mean_logprob(model, hidden[n], suffixes[n].shape[0], targets[n]) for n in range(len(rows))])


@torch.inference_mode()
def option_logprobs_uncached(model: QAnchorModel, prefixes: list[torch.Tensor], user_index: torch.Tensor,
                             suffixes: list[torch.Tensor], options: list[list[int]]) -> torch.Tensor:
    """Reference for :func:`option_logprobs`: every row as one full sequence, no cache."""
    rows, targets = _option_rows(model, suffixes, options)
    full = [torch.cat([prefixes[u], r]) for u, r in zip(user_index.tolist(), rows)]
    embeds, mask, _ = pad_right(full)
    hidden = model.decoder(embeds, mask).last_hidden_state  # (N, L, H)
    starts = [prefixes[u].shape[0] + s.shape[0] for u, s in zip(user_index.tolist(), suffixes)]
    return torch.stack([_mean_logprob(model, hidden[n], starts[n], targets[n]) for n in range(len(rows))])
