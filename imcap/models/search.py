"""Decoding strategies over any decoder: greedy, batched beam search, sampling.

Search talks only to `decoder.init_state(grid, pooled)` and `decoder.step(state, prev)` (and
the optional capabilities `imcap.models.decoder.Decoder` lists); it never knows which decoder it
drives. Decoder states are (nested) tuples of tensors with the batch first, so beams are
expanded and reordered generically with `index_select`.

Every method obeys the same rules on what may be generated (`_constrain`): never <bos>, <pad>
or the ids in `never` (<unk> unless `decoding.allow_unk`), no <eos> before `min_length` words,
and no caption that ends on a word of `bad_endings` ("a", "the", "of", ...): <eos> is
forbidden after one, and so is one at the last step, where `max_length` cuts the caption.

`generate` runs the configured method; with consensus reranking (`Decoding.reranks`) it keeps,
of beam search's final hypotheses, the one the captions of the nearest training images agree
with most (`imcap.models.rerank`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn

from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from imcap.models.decoder import expand_for_beams
from imcap.models.packing import map_state
from imcap.models.rerank import NeighbourMemory, pick_by_consensus

# Words a caption may not end on: ImageCaptioning.pytorch's remove_bad_endings list (articles,
# prepositions, "is/are/am") plus conjunctions and possessives that also leave a sentence open.
BAD_ENDINGS = ("a", "an", "the", "in", "for", "at", "of", "with", "before", "after", "on", "upon", "near",
               "to", "is", "are", "am", "and", "or", "from", "by", "into", "onto", "under", "his", "her",
               "their", "its")


class SearchResult(NamedTuple):
    tokens: torch.Tensor  # (B, L) generated ids, <eos> included, <pad> after it
    scores: torch.Tensor  # (B,) sum of token log-probabilities (beam: before length penalty)
    attention: torch.Tensor | None  # (B, L, N) weights per generated token; at <pad> meaningless (0 where search skipped the row)


# What a stored decoding without these keys meant: the defaults before they were the YAML's.
WRITTEN_WITHOUT = {"method": "greedy", "block_trigrams": False, "rerank_neighbours": 0}


@dataclass(frozen=True)
class Decoding:
    """How captions are generated for validation, test and `imcap.caption`; the defaults are
    conf/model/captioner.yaml's `decoding` (tests/test_defaults.py holds them equal)."""

    method: str = "beam"  # greedy | beam
    beam_size: int = 3
    max_length: int = 20
    min_length: int = 1
    length_penalty: float = 0.0  # GNMT alpha: final score / ((5 + len) / 6) ** alpha
    block_trigrams: bool = True
    allow_unk: bool = False  # whether <unk> may be generated
    bad_endings: tuple[str, ...] | None = None  # words a caption may not end on (None: BAD_ENDINGS, (): any)
    # consensus reranking (imcap.models.rerank), beam search only: > 0 keeps, of `rerank_beams`
    # final hypotheses, the one whose CIDEr-D against the captions of this many nearest training
    # images, plus rerank_logprob_weight x its log-probability, is highest
    rerank_neighbours: int = 50
    rerank_beams: int = 16
    rerank_logprob_weight: float = 0.02
    rerank_memory_images: int = 20000  # training images the memory keeps at most (evenly spaced)

    def __post_init__(self) -> None:
        if self.method not in ("greedy", "beam"):
            raise ImcapError(f"decoding.method={self.method!r}; choose greedy or beam")
        if self.beam_size < 1 or self.max_length < 1 or not 0 <= self.min_length <= self.max_length:
            raise ImcapError("decoding needs beam_size >= 1, max_length >= 1 and 0 <= min_length <= max_length; "
                             f"got {self.beam_size}, {self.max_length}, {self.min_length}")
        if self.rerank_neighbours < 0 or self.rerank_beams < 1 or self.rerank_memory_images < 1:
            raise ImcapError("decoding needs rerank_neighbours >= 0 (0: off), rerank_beams >= 1 and "
                             f"rerank_memory_images >= 1; got {self.rerank_neighbours}, {self.rerank_beams}, "
                             f"{self.rerank_memory_images}")
        words = BAD_ENDINGS if self.bad_endings is None else self.bad_endings
        if isinstance(words, str) or not all(isinstance(w, str) for w in words):
            raise ImcapError(f"decoding.bad_endings={self.bad_endings!r}; give a list of words, "
                             "e.g. decoding.bad_endings=[a,the] (or [] to allow any ending)")
        object.__setattr__(self, "bad_endings", tuple(words))  # YAML gives a list; checkpoints store the words

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any] | None) -> Decoding:
        """The decoding a checkpoint or exported folder stores. A key it lacks was written before
        that option or its current default existed: it decodes as it did then (WRITTEN_WITHOUT)."""
        return cls(**{**WRITTEN_WITHOUT, **(stored or {})})

    @property
    def reranks(self) -> bool:
        """Whether captions are chosen by consensus reranking (which needs a neighbour memory)."""
        return self.method == "beam" and self.rerank_neighbours > 0

    def to_config(self) -> dict[str, Any]:
        """The fields as plain values (lists, not tuples), as checkpoints store them."""
        return {**asdict(self), "bad_endings": list(self.bad_endings)}


def decoding_rules(vocab: Vocabulary, decoding: Decoding) -> dict[str, Any]:
    """The keyword arguments that make a search function obey `decoding`'s rules on `vocab`."""
    bad = tuple(vocab.stoi[w] for w in decoding.bad_endings if w in vocab.stoi)  # others are never generated
    never = () if decoding.allow_unk else (vocab.unk_id,)
    specials = {vocab.pad_id, vocab.bos_id, vocab.eos_id, *never}
    if all(i in specials or i in bad for i in range(len(vocab))):
        raise ImcapError("decoding.bad_endings holds every word of the vocabulary, so no caption can end; "
                         "shorten decoding.bad_endings")
    return {"min_length": decoding.min_length, "never": never, "bad_endings": bad}


def _constrain(scores: torch.Tensor, prev: torch.Tensor, t: int, max_length: int, eos_id: int,
               never: torch.Tensor, min_length: int, bad_endings: torch.Tensor | None) -> torch.Tensor:
    """Forbid what may not be generated at step t (in place; returns scores).

    scores: (R, V) log-probabilities or logits; prev: (R,) the token each row read at step t.
    `never` always includes <bos> and <pad>.
    """
    scores[:, never] = float("-inf")
    if t < min_length:
        scores[:, eos_id] = float("-inf")
    if bad_endings is not None:
        scores[:, eos_id].masked_fill_(torch.isin(prev, bad_endings), float("-inf"))  # no end after "a"
        if t == max_length - 1:  # the caption is cut after this word: it must not be one of them
            scores[:, bad_endings] = float("-inf")
    return scores


def _rules(bos_id: int, pad_id: int, never: Sequence[int], bad_endings: Sequence[int],
           device: torch.device) -> dict[str, Any]:
    """`_constrain`'s `never` and `bad_endings` for one search call: ids on its device, copied
    there once (a Python list as an index would be copied to the device at every step)."""
    bad = torch.tensor(sorted(set(bad_endings)), dtype=torch.long, device=device) if len(bad_endings) else None
    return {"never": torch.tensor([bos_id, pad_id, *never], dtype=torch.long, device=device), "bad_endings": bad}


def stop_check_interval(device: torch.device) -> int:
    """How often a search asks whether every caption has ended (it stops early then). The
    answer is read back from the device: free on a CPU, so every step there; on an accelerator
    a wait for the queue to drain, so every CHECK_EVERY steps (the steps run past the end
    only append <pad> and are cut off; the result is the same)."""
    return 1 if device.type == "cpu" else CHECK_EVERY


CHECK_EVERY = 5  # steps between early-stop checks off the CPU: at most 4 steps of <pad> wasted


class _Ended:
    """The first step after which every caption had ended, tracked on the device; read back
    every `every` steps (`stop`) and once at the end (`steps`)."""

    def __init__(self, every: int, device: torch.device):
        self.every, self.at = every, torch.full((), -1, dtype=torch.long, device=device)

    def update(self, t: int, finished: torch.Tensor) -> None:
        self.at = torch.where((self.at < 0) & finished.all(), t, self.at)

    def stop(self, t: int) -> bool:
        return self.every > 0 and (t + 1) % self.every == 0 and bool(self.at >= 0)

    def steps(self, ran: int) -> int:
        """How many of the `ran` steps to keep: up to the one where every caption had ended."""
        at = int(self.at)  # one read back per search
        return at + 1 if at >= 0 else ran


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
    # count, per token, the positions j that would repeat a trigram with it (a dense scatter:
    # no data-dependent shapes, so nothing is read back from the device)
    repeats = torch.zeros_like(logp).scatter_add_(1, history[:, 2:], same_prefix.to(logp.dtype))  # (R, V)
    logp.masked_fill_(repeats > 0, float("-inf"))


def _block_trigrams_unless_all_blocked(scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """`scores` (R, V) with repeated trigrams blocked, except in a row where that would block
    every token: a single caption (greedy, sampling) has no other hypothesis to fall back on,
    so it may repeat rather than emit an impossible token."""
    blocked = scores.clone()
    _block_repeated_trigrams(blocked, history)
    nothing_left = torch.isneginf(blocked).all(dim=-1, keepdim=True)  # (R, 1)
    return torch.where(nothing_left, scores, blocked)


def _keep_images(state: Any, shared: dict[int, torch.Tensor], keep: torch.Tensor, keep_rows: torch.Tensor,
                 images: int, beams: int) -> tuple[Any, dict[int, torch.Tensor]]:
    """`state` of `images` x `beams` rows narrowed to the images `keep` (hypothesis rows
    `keep_rows`): a leaf with a row per hypothesis keeps those rows, one with a row per image
    (the decoder's per-image cache) those images; the leaves that were `shared` stay shared."""
    kept: dict[int, torch.Tensor] = {}

    def narrow(x: torch.Tensor) -> torch.Tensor:
        rows = keep_rows if x.shape[0] == images * beams else keep
        if x.shape[0] not in (images * beams, images):
            raise ValueError(f"a beam search state leaf of {x.shape[0]} rows, not {images} or {images * beams}")
        y = x.index_select(0, rows)
        if id(x) in shared:
            kept[id(y)] = y
        return y

    return map_state(state, narrow), kept


def _leaves(state: Any) -> list[torch.Tensor]:
    leaves: list[torch.Tensor] = []
    map_state(state, lambda x: leaves.append(x) or x)
    return leaves


class _Beams:
    """Beam search's hypotheses in progress, K per image, rows image by image, for the A
    images still searching: `live` (A,) is the image of each batch row and `live_rows` (A*K,)
    the full row (of B*K) of each hypothesis row. The decoder's state is kept beside them, with
    `shared`: its leaves that `step` passes through (one per image's K beams, never reordered;
    the values keep them alive, so the ids stay unique)."""

    def __init__(self, state: Any, B: int, K: int, bos_id: int, device: torch.device):
        self.state, self.shared, self.K = state, {id(x): x for x in _leaves(state)}, K
        self.scores = torch.full((B, K), float("-inf"), device=device)  # (A, K) sums of log-probabilities
        self.scores[:, 0] = 0.0  # all beams start identical: expand only the first
        self.finished = torch.zeros(B * K, dtype=torch.bool, device=device)  # (A*K,)
        self.lengths = torch.zeros(B * K, dtype=torch.long, device=device)  # (A*K,) words + <eos>
        self.history = torch.empty(B * K, 0, dtype=torch.long, device=device)  # (A*K, t) only for trigram blocking
        self.prev = torch.full((B * K,), bos_id, dtype=torch.long, device=device)  # the first step read <bos>
        self.live, self.live_rows = torch.arange(B, device=device), torch.arange(B * K, device=device)
        self._index_rows()
        self.final_scores, self.final_lengths = self.scores.clone(), self.lengths.clone()  # (B, K), (B*K,)

    def _index_rows(self) -> None:
        A, device = len(self.live), self.live.device
        self.offsets = (torch.arange(A, device=device) * self.K).unsqueeze(1)  # (A, 1) first row of each image
        self.in_place = torch.arange(A * self.K, device=device)  # (A*K,) each hypothesis its own source

    def select(self, logp: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each image's best K continuations of its hypotheses, from logp (A*K, V): their
        scores (A, K), source hypothesis rows (A*K,) and tokens (A*K,).

        One topk over each image's K*V candidates: on a CPU, 7x faster than a topk of K per
        hypothesis followed by one over the K*K (one thread, 512 rows, V=805, K=16: 3 against 21 ms)."""
        A, K, V = len(self.live), self.K, logp.shape[-1]
        candidates = self.scores.view(-1, 1) + logp  # (A*K, V)
        # a finished hypothesis continues only with <pad>, at no cost
        candidates.masked_fill_(self.finished.unsqueeze(1), float("-inf"))
        candidates[:, pad_id] = torch.where(self.finished, self.scores.view(-1), candidates[:, pad_id])
        scores, flat = candidates.view(A, K * V).topk(K, dim=-1)  # (A, K)
        rows, token = (self.offsets + flat // V).view(-1), (flat % V).view(-1)
        # an image whose hypotheses have all ended keeps them in place (topk may swap ties)
        done = self.finished.view(A, K).all(dim=1, keepdim=True)  # (A, 1)
        return (torch.where(done, self.scores, scores), torch.where(done.expand(A, K).reshape(-1), self.in_place, rows),
                token)

    def advance(self, scores: torch.Tensor, rows: torch.Tensor, token: torch.Tensor, eos_id: int,
                block_trigrams: bool) -> None:
        """Hypothesis i becomes hypothesis rows[i] extended by token[i]: the state's leaves
        reordered with one gather each (all but the shared ones)."""
        self.state = map_state(self.state, lambda x: x if id(x) in self.shared else x.index_select(0, rows))
        finished = self.finished.index_select(0, rows)
        self.lengths = self.lengths.index_select(0, rows) + (~finished).long()
        if block_trigrams:
            self.history = torch.cat([self.history.index_select(0, rows), token.unsqueeze(1)], dim=1)
        self.scores, self.finished, self.prev = scores, finished | (token == eos_id), token

    def unfinished(self) -> torch.Tensor | None:
        """The rows of the hypotheses that have not ended (read back from the device), None when
        that is every row."""
        running = (~self.finished).nonzero().squeeze(1)
        return running if len(running) < len(self.finished) else None

    def drop_ended_images(self) -> None:
        """Images whose K hypotheses have all ended leave the batch (their scores and lengths
        kept aside): later steps run on the other images' rows only. With 16 beams most
        hypotheses end by word 9 while a few run to max_length."""
        A, K = len(self.live), self.K
        ended = self.finished.view(A, K).all(dim=1)
        if not bool(ended.any()):
            return
        self.final_scores[self.live], self.final_lengths[self.live_rows] = self.scores, self.lengths
        keep = (~ended).nonzero().squeeze(1)  # (A',)
        keep_rows = (keep.unsqueeze(1) * K + torch.arange(K, device=keep.device)).view(-1)  # (A'*K,)
        self.state, self.shared = _keep_images(self.state, self.shared, keep, keep_rows, A, K)
        self.live, self.live_rows = self.live[keep], self.live_rows[keep_rows]
        self.scores, self.finished, self.lengths = self.scores[keep], self.finished[keep_rows], self.lengths[keep_rows]
        self.history, self.prev = self.history[keep_rows], self.prev[keep_rows]
        self._index_rows()

    def final(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image's final scores (B, K) and lengths (B*K,)."""
        if len(self.live) * self.K == len(self.final_lengths):  # no image left early
            return self.scores, self.lengths
        self.final_scores[self.live], self.final_lengths[self.live_rows] = self.scores, self.lengths
        return self.final_scores, self.final_lengths


class _Trace:
    """What each step chose, in full rows (B*K): back-pointers (the source hypothesis of each
    new one), tokens and attention maps, followed once at the end (`paths`) instead of
    reordering the tokens and maps every step."""

    def __init__(self, rows: int, pad_id: int):
        self.rows, self.pad_id = rows, pad_id
        self.sources: list[torch.Tensor] = []  # per step (B*K,)
        self.tokens: list[torch.Tensor] = []  # per step (B*K,)
        self.maps: list[torch.Tensor] = []  # per step (B*K, N)

    def record(self, beams: _Beams, rows: torch.Tensor, token: torch.Tensor, weights: torch.Tensor | None) -> None:
        if len(rows) == self.rows:
            self.sources.append(rows)
            self.tokens.append(token)
            if weights is not None:
                self.maps.append(weights)
            return
        # rows of images that left stay in place, with <pad> (and no attention)
        live_rows, device = beams.live_rows, rows.device
        self.sources.append(torch.arange(self.rows, device=device).index_copy(0, live_rows, live_rows[rows]))
        self.tokens.append(torch.full((self.rows,), self.pad_id, dtype=token.dtype, device=device)
                           .index_copy(0, live_rows, token))
        if weights is not None:
            self.maps.append(weights.new_zeros((self.rows, *weights.shape[1:])).index_copy(0, live_rows, weights))

    def paths(self, best: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens (R, L) and attention (R, L, N) of the final hypotheses `best` (R,), from the
        last of the first `steps` steps back to the first."""
        path, path_maps, row = [], [], best
        for t in reversed(range(steps)):
            path.append(self.tokens[t].index_select(0, row))
            row = self.sources[t].index_select(0, row)  # the hypothesis that step t extended
            if self.maps:
                path_maps.append(self.maps[t].index_select(0, row))  # its attention when it chose the token
        return torch.stack(path[::-1], dim=1), torch.stack(path_maps[::-1], dim=1) if self.maps else None


def _first_step(decoder: nn.Module, grid: torch.Tensor, pooled: torch.Tensor, K: int,
                bos_id: int) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    """The first step, run once per image (all K beams read <bos> from the same state), its
    logits (B*K, V) and weights copied to the K beams, and the state expanded to them (by the
    decoder's `expand_state` where it has one: it may keep leaves per image)."""
    B, device = grid.shape[0], grid.device
    expand = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,) image of each row
    state = decoder.init_state(grid, pooled)
    logits, state, weights = decoder.step(state, torch.full((B,), bos_id, dtype=torch.long, device=device))
    weights = weights.index_select(0, expand) if weights is not None else None
    return logits.index_select(0, expand), expand_for_beams(decoder, state, K), weights


@torch.no_grad()
def beam_search(decoder: nn.Module, grid: torch.Tensor, pooled: torch.Tensor, bos_id: int, eos_id: int, pad_id: int,
                beam_size: int = 3, max_length: int = 20, min_length: int = 1, length_penalty: float = 0.0,
                block_trigrams: bool = False, *, never: Sequence[int] = (), bad_endings: Sequence[int] = (),
                check_every: int | None = None, all_hypotheses: bool = False) -> SearchResult:
    """Beam search over the whole batch x beam at once (no per-image Python loops).

    Every step scores all B*K hypotheses in one `decoder.step`, takes the top K of K*V
    continuations per image (`_Beams.select`), and reorders the state with one gather per leaf
    (`_Beams.advance`). Finished hypotheses stay in the beam with a frozen score (they may only
    extend by <pad>). The rules of `_constrain` apply to every hypothesis; the best one per
    image is chosen by score / ((5 + length) / 6) ** length_penalty. beam_size=1 gives exactly
    greedy search. `all_hypotheses=True` returns all K final hypotheses of each image instead,
    best first: tokens (B, K, L), scores (B, K), attention (B, K, L, N), for a reranker.

    Work per step stays O(1) in the step count: the first step runs once per image
    (`_first_step`); a state leaf that `step` passes through unchanged (e.g. projected
    attention keys) is the same in all K beams of an image, so it is never reordered; tokens
    and attention maps are not reordered either, only traced (`_Trace`). Nothing is read back
    from the device inside a step but the "has every caption ended?" check, every
    `check_every` steps (None: `stop_check_interval`, every step on a CPU); an image whose
    hypotheses have all ended keeps them in place, so the steps run past the end change
    nothing. On a CPU (where asking is free) such an image leaves the batch instead
    (`_Beams.drop_ended_images`), and where the decoder `skips_rows`, a finished hypothesis
    is not computed either (its logits are never read and its state only copied along), with
    the same captions, scores and attention of every word.
    """
    B, K, device = grid.shape[0], beam_size, grid.device
    rules = _rules(bos_id, pad_id, never, bad_endings, device)
    logits, state, weights = _first_step(decoder, grid, pooled, K, bos_id)
    beams, trace = _Beams(state, B, K, bos_id, device), _Trace(B * K, pad_id)
    ended = _Ended(stop_check_interval(device) if check_every is None else check_every, device)
    compact = K > 1 and device.type == "cpu" and check_every is None
    skips = compact and getattr(decoder, "skips_rows", False)
    for t in range(max_length):
        if t > 0:  # the first step is done
            rows = {"active": beams.unfinished()} if skips else {}
            logits, beams.state, weights = decoder.step(beams.state, beams.prev, **rows)
        logp = _constrain(torch.log_softmax(logits.float(), dim=-1), beams.prev, t, max_length, eos_id,
                          min_length=min_length, **rules)  # (A*K, V)
        if block_trigrams:
            _block_repeated_trigrams(logp, beams.history)
        scores, rows, token = beams.select(logp, pad_id)
        beams.advance(scores, rows, token, eos_id, block_trigrams)
        trace.record(beams, rows, token, weights)
        ended.update(t, beams.finished)
        if ended.stop(t):
            break
        if compact:
            beams.drop_ended_images()
    scores, lengths = beams.final()
    offsets = (torch.arange(B, device=device) * K).unsqueeze(1)  # (B, 1)
    normalised = scores / ((5.0 + lengths.view(B, K).float()) / 6.0) ** length_penalty
    if all_hypotheses:  # every final hypothesis, each image's best first
        best = (normalised.argsort(dim=-1, descending=True) + offsets).view(-1)  # (B*K,)
    else:
        best = normalised.argmax(dim=-1) + offsets.squeeze(1)  # (B,) row of the best final hypothesis
    # the steps run past the end only appended <pad>
    found, attention = trace.paths(best, ended.steps(len(trace.tokens)))
    final_scores = scores.view(-1).index_select(0, best)
    if all_hypotheses:
        return SearchResult(found.view(B, K, -1), final_scores.view(B, K),
                            attention.view(B, K, *attention.shape[1:]) if attention is not None else None)
    return SearchResult(found, final_scores, attention)


@torch.no_grad()
def sample(decoder: nn.Module, grid: torch.Tensor, pooled: torch.Tensor, bos_id: int, eos_id: int, pad_id: int,
           max_length: int = 20, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, *, min_length: int = 1, never: Sequence[int] = (),
           bad_endings: Sequence[int] = (), block_trigrams: bool = False, check_every: int | None = None) -> SearchResult:
    """Ancestral sampling with temperature, top-k and nucleus (top-p) truncation, for the whole
    batch at once; temperature=0 takes the most probable token at every step (greedy search).
    `block_trigrams` forbids a token that would repeat a trigram of the caption so far.
    Stops when every sequence has emitted <eos> or after `max_length` tokens; whether they all
    have is read back from the device every `check_every` steps only (`beam_search`), and the
    steps run past the end (<pad> only) are cut off.

    Scores are log-probabilities of the distribution drawn from: the model's own at temperature
    0, the tempered and truncated one otherwise.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy); got {temperature}")
    batch = grid.shape[0]
    rules = _rules(bos_id, pad_id, never, bad_endings, grid.device)
    constrain = partial(_constrain, max_length=max_length, eos_id=eos_id, min_length=min_length, **rules)
    state = decoder.init_state(grid, pooled)
    prev = torch.full((batch,), bos_id, dtype=torch.long, device=grid.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=grid.device)
    scores = torch.zeros(batch, device=grid.device)
    tokens, maps = [], []
    ended = _Ended(stop_check_interval(grid.device) if check_every is None else check_every, grid.device)
    for t in range(max_length):
        logits, state, weights = decoder.step(state, prev)
        if temperature == 0:
            logp = constrain(torch.log_softmax(logits.float(), dim=-1), prev, t)  # (B, V)
            if block_trigrams and tokens:
                logp = _block_trigrams_unless_all_blocked(logp, torch.stack(tokens, dim=1))
            token_logp, token = logp.max(dim=-1)
        else:
            logits = constrain(logits.float() / temperature, prev, t)
            if block_trigrams and tokens:
                logits = _block_trigrams_unless_all_blocked(logits, torch.stack(tokens, dim=1))
            logp = torch.log_softmax(_truncate(logits, top_k, top_p), dim=-1)  # (B, V)
            token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
            token_logp = logp.gather(1, token.unsqueeze(1)).squeeze(1)
        token = token.masked_fill(finished, pad_id)
        scores += token_logp.masked_fill(finished, 0.0)
        tokens.append(token)
        if weights is not None:
            maps.append(weights)
        finished |= token == eos_id
        prev = token
        ended.update(t, finished)
        if ended.stop(t):
            break
    steps = ended.steps(len(tokens))
    tokens, maps = tokens[:steps], maps[:steps]
    attention = torch.stack(maps, dim=1) if maps else None
    return SearchResult(torch.stack(tokens, dim=1), scores, attention)


def greedy_search(decoder: nn.Module, grid: torch.Tensor, pooled: torch.Tensor, bos_id: int, eos_id: int,
                  pad_id: int, max_length: int = 20, **rules: Any) -> SearchResult:
    """The most probable token at every step: `sample` at temperature 0; `rules` are its
    keyword-only options (min_length, never, bad_endings, block_trigrams, check_every)."""
    return sample(decoder, grid, pooled, bos_id, eos_id, pad_id, max_length, temperature=0.0, **rules)


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top_k most probable tokens, then the smallest set whose probability reaches top_p
    (logits (B, V) -> (B, V), the rest at -inf)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def generate(decoder: nn.Module, grid: torch.Tensor, pooled: torch.Tensor, vocab: Vocabulary,
             decoding: Decoding, memory: NeighbourMemory | None = None) -> SearchResult:
    """Decode grid (B, N, C) and pooled (B, C) features with the configured method and rules;
    with consensus reranking (`decoding.reranks`), by the training captions in `memory`."""
    ids = (vocab.bos_id, vocab.eos_id, vocab.pad_id)
    rules = decoding_rules(vocab, decoding)
    if decoding.method == "greedy":
        return greedy_search(decoder, grid, pooled, *ids, decoding.max_length, block_trigrams=decoding.block_trigrams,
                             **rules)
    if decoding.method != "beam":
        raise ValueError(f"unknown decoding method {decoding.method!r}")
    if decoding.reranks and memory is None:
        raise ImcapError(f"decoding.rerank_neighbours={decoding.rerank_neighbours} reranks captions by the training "
                         "captions, and this model carries none (it was saved without reranking); set "
                         "decoding.rerank_neighbours=0")
    found = beam_search(decoder, grid, pooled, *ids, decoding.rerank_beams if decoding.reranks else decoding.beam_size,
                        decoding.max_length, length_penalty=decoding.length_penalty,
                        block_trigrams=decoding.block_trigrams, all_hypotheses=decoding.reranks, **rules)
    if not decoding.reranks:
        return found
    # tokens (B, K, L): keep each image's hypothesis the neighbours' captions back most
    pick = pick_by_consensus(found.tokens, found.scores, pooled, memory, decoding.rerank_neighbours,
                  decoding.rerank_logprob_weight, vocab.eos_id)  # (B,)
    rows = torch.arange(found.tokens.shape[0], device=pick.device)
    return SearchResult(found.tokens[rows, pick], found.scores[rows, pick],
                        found.attention[rows, pick] if found.attention is not None else None)
