"""Token layout: special tokens (by name) and how prefix and suffix embeddings are laid out.

    prefix: [bos] <|user|> u  <|mod_1|> m_1 .. <|mod_M|> m_M  (<|m_start|> e_1 .. e_n <|m_end|>) x M
    suffix: [soft prompt x k] query tokens <|user_emb|>
    (pretraining appends <|answer|>, the answer tokens and the end token for the next-token loss: the
    marker keeps <|user_emb|> from being a prediction position; it summarises the user, it guesses no word)

Everything a scenario changes lives in the suffix, so one cached prefix serves every query and head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qanchor.errors import ModelInputError
from qanchor.model.user_encoder import UserTokens

__all__ = ["check_utf8", "USER", "USER_EMB", "M_START", "M_END", "ANSWER", "modality_token", "special_token_names", "TokenIds", "build_prefixes",
           "pad_right", "tokenize_query", "tokenize_answer"]

USER, USER_EMB, M_START, M_END, ANSWER = "<|user|>", "<|user_emb|>", "<|m_start|>", "<|m_end|>", "<|answer|>"


def modality_token(name: str) -> str:
    return f"<|mod_{name}|>"


def special_token_names(modalities: list[str]) -> list[str]:
    return [USER, USER_EMB, M_START, M_END, ANSWER, *[modality_token(m) for m in modalities]]


@dataclass(frozen=True)
class TokenIds:
    """Ids of the layout's tokens, looked up by name from the tokenizer."""

    user: int
    user_emb: int
    m_start: int
    m_end: int
    modality: tuple[int, ...]  # manifest order
    bos: int | None  # the tokenizer's own begin token, if it has one
    end: int  # closes an answer: the tokenizer's eos (or sep) token
    pad: int
    answer: int  # opens an answer, after <|user_emb|>

    @classmethod
    def from_tokenizer(cls, tokenizer, modalities: list[str]) -> TokenIds:
        def lookup(name: str) -> int:
            idx = tokenizer.convert_tokens_to_ids(name)
            if idx is None or idx == tokenizer.unk_token_id:
                raise KeyError(f"special token {name} is not in the tokenizer; add it with add_special_tokens()")
            return int(idx)

        end_token = tokenizer.eos_token or tokenizer.sep_token
        bos = tokenizer.bos_token if tokenizer.bos_token and tokenizer.bos_token != end_token else tokenizer.cls_token
        return cls(
            lookup(USER), lookup(USER_EMB), lookup(M_START), lookup(M_END),
            tuple(lookup(modality_token(m)) for m in modalities),
            lookup(bos) if bos else None, lookup(end_token), int(tokenizer.pad_token_id), lookup(ANSWER),
        )


def build_prefixes(tokens: UserTokens, ids: TokenIds, embed: torch.nn.Module, summary_tokens: bool = True) -> list[torch.Tensor]:
    """One prefix embedding sequence per user: list of (L_b, H) tensors."""
    device = tokens.user.device
    marker_ids = [ids.user, ids.m_start, ids.m_end, *ids.modality] + ([ids.bos] if ids.bos is not None else [])
    markers = embed(torch.tensor(marker_ids, device=device)).to(tokens.user.dtype)  # (K, H)
    user_mark, start, end, mods = markers[0:1], markers[1:2], markers[2:3], markers[3 : 3 + len(ids.modality)]
    bos = markers[-1:] if ids.bos is not None else markers[:0]
    prefixes = []
    for b in range(tokens.user.shape[0]):
        parts = [bos]
        if summary_tokens:
            parts += [user_mark, tokens.user[b : b + 1]]
            for m in range(len(ids.modality)):
                parts += [mods[m : m + 1], tokens.modality[b, m : m + 1]]
        for m in range(len(ids.modality)):
            parts += [start, tokens.events[m][b][tokens.event_mask[m][b]], end]  # only real events
        prefixes.append(torch.cat(parts, dim=0))  # (L_b, H)
    return prefixes


def pad_right(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_b, H) rows -> embeds (B, L, H), attention mask long (B, L), lengths long (B,)."""
    embeds = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, L, H)
    lengths = torch.tensor([r.shape[0] for r in rows], device=embeds.device)
    mask = (torch.arange(embeds.shape[1], device=embeds.device)[None, :] < lengths[:, None]).long()
    return embeds, mask, lengths


def check_utf8(text: str, where: str) -> None:
    """ModelInputError unless ``text`` is valid Unicode: a lone surrogate (text decoded with "surrogateescape", as
    Python decodes bytes that are not UTF-8 in argv) made the tokenizer raise a bare TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ModelInputError(f"{where}: not valid Unicode text (character {exc.start}); decode the source as UTF-8 "
                              "(replacing bad bytes) before passing it") from None


def tokenize_query(tokenizer, text: str, max_tokens: int) -> list[int]:
    """Token ids of a query (no special tokens). A query longer than ``max_tokens`` (the model's
    ``max_query_tokens``) is refused, never silently cut: the model was not trained on longer ones.

        >>> tokenize_query(tok, "Will this user churn?", 32)  # doctest: +SKIP
        [2097, 2023, 5310, 26765, 1029]
    """
    check_utf8(text, f"query {text[:60]!r}")
    # split_special_tokens: text that spells a control token ("<|user_emb|>", "[SEP]") is words, not that token
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    if not ids:
        raise ModelInputError(f"query {text!r} has no tokens (only characters the tokenizer drops, such as zero-width or "
                              "control characters); ask a question in words")
    if len(ids) > max_tokens:
        raise ModelInputError(f"query {text[:60]!r}{'...' if len(text) > 60 else ''} has {len(ids)} tokens, more than "
                              f"model.max_query_tokens={max_tokens} this model was trained with; shorten the query")
    return ids


def tokenize_answer(tokenizer, text: str, max_tokens: int, end_id: int) -> list[int]:
    """Answer ids cut to ``max_tokens - 1`` plus the end token (predicted too; the semantic tower pools there).

    Answers are targets, not inputs: a long one is truncated (as in the paper's 200-token limit).
    """
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, truncation=True,
                    max_length=max_tokens - 1)["input_ids"]
    return [*ids, end_id]
