"""Decoding strategies over any decoder: greedy, batched beam search, sampling.

Search talks only to `decoder.init_state(grid, pooled)` and `decoder.step(state, prev)`; it
never knows which decoder it drives. Decoder states are (nested) tuples of tensors with the
batch first, so beams are expanded and reordered generically with `index_select`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn

from imcap.errors import ImcapError
from imcap.models.packing import map_state


class SearchResult(NamedTuple):
    tokens: torch.Tensor  # (B, L) generated ids, <eos> included, <pad> after it
    scores: torch.Tensor  # (B,) sum of token log-probabilities (beam: before length penalty)
    attention: torch.Tensor | None  # (B, L, N) weights per generated token


@dataclass(frozen=True)
class Decoding:
    """How captions are generated for validation, test and `imcap.caption`."""

    method: str = "greedy"  # greedy | beam
    beam_size: int = 3
    max_length: int = 20
    min_length: int = 1
    length_penalty: float = 0.0  # GNMT alpha: final score / ((5 + len) / 6) ** alpha
    block_trigrams: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("greedy", "beam"):
            raise ImcapError(f"decoding.method={self.method!r}; choose greedy or beam")
        if self.beam_size < 1 or self.max_length < 1 or not 0 <= self.min_length <= self.max_length:
            raise ImcapError("decoding needs beam_size >= 1, max_length >= 1 and 0 <= min_length <= max_length; "
                             f"got {self.beam_size}, {self.max_length}, {self.min_length}")


def _forbid_specials(logp: torch.Tensor, bos_id: int, pad_id: int) -> torch.Tensor:
    """<pad> and <bos> are never generated (in place; returns logp)."""
    logp[:, bos_id] = float("-inf")
    logp[:, pad_id] = float("-inf")
    return logp


@torch.no_grad()
def greedy_search(
    decoder: nn.Module,
    grid: torch.Tensor,
    pooled: torch.Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int = 20,
) -> SearchResult:
    """Most probable token at every step, for the whole batch at once; stops when every
    sequence has emitted <eos> or after `max_length` tokens."""
    batch = grid.shape[0]
    state = decoder.init_state(grid, pooled)
    prev = torch.full((batch,), bos_id, dtype=torch.long, device=grid.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=grid.device)
    scores = torch.zeros(batch, device=grid.device)
    tokens, maps = [], []
    for _ in range(max_length):
        logits, state, weights = decoder.step(state, prev)
        logp = _forbid_specials(torch.log_softmax(logits.float(), dim=-1), bos_id, pad_id)  # (B, V)
        best_logp, best = logp.max(dim=-1)
        best = best.masked_fill(finished, pad_id)
        scores += best_logp.masked_fill(finished, 0.0)
        tokens.append(best)
        if weights is not None:
            maps.append(weights)
        finished |= best == eos_id
        prev = best
        if bool(finished.all()):
            break
    attention = torch.stack(maps, dim=1) if maps else None
    return SearchResult(torch.stack(tokens, dim=1), scores, attention)


def _block_repeated_trigrams(logp: torch.Tensor, history: torch.Tensor) -> None:
    """Forbid tokens that would repeat a trigram already in the hypothesis (in place).

    logp: (R, V); history: (R, t) tokens so far. A candidate c is blocked when
    (h[t-2], h[t-1], c) equals some earlier (h[j], h[j+1], h[j+2]).
    """
    t = history.shape[1]
    if t < 3:
        return
    same_prefix = (history[:, : t - 2] == history[:, t - 2 : t - 1]) & (
        history[:, 1 : t - 1] == history[:, t - 1 : t]
    )  # (R, t-2): positions j whose bigram equals the last bigram
    rows, js = same_prefix.nonzero(as_tuple=True)
    logp[rows, history[rows, js + 2]] = float("-inf")


def _leaves(state: Any) -> list[torch.Tensor]:
    leaves: list[torch.Tensor] = []
    map_state(state, lambda x: leaves.append(x) or x)
    return leaves


@torch.no_grad()
def beam_search(
    decoder: nn.Module,
    grid: torch.Tensor,
    pooled: torch.Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    beam_size: int = 3,
    max_length: int = 20,
    min_length: int = 1,
    length_penalty: float = 0.0,
    block_trigrams: bool = False,
) -> SearchResult:
    """Beam search over the whole batch x beam at once (no per-image Python loops).

    Every step scores all B*K hypotheses in one `decoder.step`, takes the top K of K*V
    continuations per image, and reorders the state with one gather per leaf. Finished
    hypotheses stay in the beam with a frozen score (they may only extend by <pad>).
    `min_length` forbids <eos> before that many words; the best hypothesis per image is chosen
    by score / ((5 + length) / 6) ** length_penalty. beam_size=1 gives exactly greedy search.

    Work per step stays O(1) in the step count: the initial state is computed once per image
    and copied to its K beams (by the decoder's `expand_state(state, K)` where it has one: it
    may keep leaves per image, e.g. the attention cache, if its `step` passes them through);
    a state leaf that `step` passes through unchanged (the very tensor it got, e.g. projected
    attention keys) is the same in all K beams of an image, so it is never reordered; tokens
    and attention maps are not reordered each step either: each step keeps back-pointers (the
    source hypothesis of each new one), followed once at the end. The one host sync per step
    is the `finished.all()` check.
    """
    B, K = grid.shape[0], beam_size
    device = grid.device
    expand = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,) image of each row
    # the first step runs once per image (all K beams start the same), then the state is copied
    state = decoder.init_state(grid, pooled)
    logits, state, weights = decoder.step(state, torch.full((B,), bos_id, dtype=torch.long, device=device))
    logits = logits.index_select(0, expand)
    weights = weights.index_select(0, expand) if weights is not None else None
    if hasattr(decoder, "expand_state"):  # a decoder may keep per-image leaves unexpanded
        state = decoder.expand_state(state, K)
    else:
        state = map_state(state, partial(torch.index_select, dim=0, index=expand))
    # the same for an image's beams while passed through (values keep them alive: ids stay unique)
    shared = {id(x): x for x in _leaves(state)}
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished = torch.zeros(B * K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B * K, dtype=torch.long, device=device)  # words + <eos>
    history = torch.empty(B * K, 0, dtype=torch.long, device=device)  # only for trigram blocking
    offsets = (torch.arange(B, device=device) * K).unsqueeze(1)  # (B, 1)
    sources, tokens, maps = [], [], []  # per step: (B*K,) back-pointers, (B*K,) tokens, (B*K, N)
    prev: torch.Tensor | None = None  # the tokens the next step reads (the first step is done)

    def reorder(x: torch.Tensor) -> torch.Tensor:
        return x if id(x) in shared else x.index_select(0, rows)

    for t in range(max_length):
        if prev is not None:
            logits, state, weights = decoder.step(state, prev)
        logp = _forbid_specials(torch.log_softmax(logits.float(), dim=-1), bos_id, pad_id)  # (B*K, V)
        V = logp.shape[-1]
        if t < min_length:
            logp[:, eos_id] = float("-inf")
        if block_trigrams:
            _block_repeated_trigrams(logp, history)
        # an image's best K continuations are among the best K of each of its hypotheses: select
        # per hypothesis first (so the scores are added to B*K*K values, not B*K*V)
        best_logp, best_token = logp.topk(min(K, V), dim=-1)  # (B*K, K)
        candidates = scores.view(-1, 1) + best_logp
        # a finished hypothesis continues only with <pad>, at no cost
        candidates.masked_fill_(finished.unsqueeze(1), float("-inf"))
        candidates[:, 0] = torch.where(finished, scores.view(-1), candidates[:, 0])
        best_token[:, 0].masked_fill_(finished, pad_id)
        scores, flat = candidates.view(B, -1).topk(K, dim=-1)  # (B, K)
        width = best_logp.shape[-1]
        rows = (offsets + flat // width).view(-1)  # (B*K,) source hypothesis of each new one
        token = best_token.view(-1).index_select(0, rows * width + (flat % width).view(-1))

        state = map_state(state, reorder)
        finished = finished.index_select(0, rows)
        lengths = lengths.index_select(0, rows) + (~finished).long()
        if block_trigrams:
            history = torch.cat([history.index_select(0, rows), token.unsqueeze(1)], dim=1)
        sources.append(rows)
        tokens.append(token)
        if weights is not None:
            maps.append(weights)
        finished = finished | (token == eos_id)
        prev = token
        if bool(finished.all()):
            break

    normalised = scores / ((5.0 + lengths.view(B, K).float()) / 6.0) ** length_penalty
    best = normalised.argmax(dim=-1) + offsets.squeeze(1)  # (B,) row of the best final hypothesis
    final_scores = scores.view(-1).index_select(0, best)
    # follow the back-pointers from the last step to the first
    path, path_maps, row = [], [], best
    for t in reversed(range(len(tokens))):
        path.append(tokens[t].index_select(0, row))
        row = sources[t].index_select(0, row)  # the hypothesis that step t extended
        if maps:
            path_maps.append(maps[t].index_select(0, row))  # its attention when it chose the token
    attention = torch.stack(path_maps[::-1], dim=1) if maps else None
    return SearchResult(torch.stack(path[::-1], dim=1), final_scores, attention)


@torch.no_grad()
def sample(
    decoder: nn.Module,
    grid: torch.Tensor,
    pooled: torch.Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int = 20,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> SearchResult:
    """Ancestral sampling with temperature, top-k and nucleus (top-p) truncation."""
    batch = grid.shape[0]
    state = decoder.init_state(grid, pooled)
    prev = torch.full((batch,), bos_id, dtype=torch.long, device=grid.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=grid.device)
    scores = torch.zeros(batch, device=grid.device)
    tokens, maps = [], []
    for _ in range(max_length):
        logits, state, weights = decoder.step(state, prev)
        logits = logits.float() / max(temperature, 1e-6)
        logits[:, [bos_id, pad_id]] = float("-inf")  # never generated
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        logp = torch.log_softmax(logits, dim=-1)
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        token = token.masked_fill(finished, pad_id)
        scores += logp.gather(1, token.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0)
        tokens.append(token)
        if weights is not None:
            maps.append(weights)
        finished |= token == eos_id
        prev = token
        if bool(finished.all()):
            break
    attention = torch.stack(maps, dim=1) if maps else None
    return SearchResult(torch.stack(tokens, dim=1), scores, attention)


def generate(
    decoder: nn.Module, grid: torch.Tensor, pooled: torch.Tensor, bos_id: int, eos_id: int, pad_id: int,
    decoding: Decoding,
) -> SearchResult:
    """Decode with the configured method."""
    if decoding.method == "greedy":
        return greedy_search(decoder, grid, pooled, bos_id, eos_id, pad_id, decoding.max_length)
    if decoding.method == "beam":
        return beam_search(decoder, grid, pooled, bos_id, eos_id, pad_id, decoding.beam_size,
                           decoding.max_length, decoding.min_length, decoding.length_penalty,
                           decoding.block_trigrams)
    raise ValueError(f"unknown decoding method {decoding.method!r}")
