"""Consensus reranking: pick, among beam search's final hypotheses, the caption that agrees most
with the captions of the training images nearest to the photo.

Beam search's top hypothesis is the most probable word sequence, which on small data is often a
generic one ("a dog is running through the grass"). Devlin et al. (2015, "Exploring nearest
neighbor approaches for image captioning") showed that the captions of an image's nearest
training images make a good consensus to choose captions by. Here the candidates stay the
model's own (its attention maps with them); the neighbours only vote:

    score(candidate) = CIDEr-D(candidate, captions of the k nearest training images)
                       + logprob_weight * log p(candidate | image)

Neighbours are found by the cosine of the encoder's pooled features; CIDEr-D uses the memory's
own document frequencies (each training image a document). On Flickr8k-1k this raised test
CIDEr-D by about 0.05 over beam 3 (experiments/real_photo_recipe/).

`NeighbourMemory` keeps what that needs, as buffers of the captioner, so checkpoints and
exported folders carry it and `imcap.caption` reranks on a machine without the training data:
the training images' L2-normalised pooled features (fp16) and their captions as word ids.

`pick_by_consensus` scores a whole batch of candidates at once with tensors (`consensus_scores`):
every memory caption's CIDEr vector is flattened once into a `ReferenceTable`, the candidates'
vectors are built from their token ids (`candidate_vectors`, no strings), and the clipped dot
products of all candidate x reference pairs of the batch are one gather and one index_add.
`consensus` is the plain path it is held to (one candidate and one reference at a time, with
`imcap.metrics.cider.similarity`): the candidates' weights are the same to the bit, the scores
agree to float64 rounding (tests/models/test_rerank.py).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import NamedTuple

import torch
from torch import nn

from imcap.metrics.cider import NGRAMS, SCALE, SIGMA, TfIdf, ngram_counts, similarity, tfidf

log = logging.getLogger(__name__)
BUFFERS = ("features", "words", "caption_starts", "image_starts")


class ReferenceTable(NamedTuple):
    """Every memory caption's CIDEr vector (`tfidf`, the same float64 values) as flat tensors:
    caption j's entries are rows starts[j]:starts[j + 1] of ids/weights/orders."""

    grams: dict[tuple[str, ...], int]  # n-gram -> id
    ids: torch.Tensor  # (E,) long: the n-gram of each entry
    weights: torch.Tensor  # (E,) float64: its tf-idf weight
    orders: torch.Tensor  # (E,) long: n - 1
    starts: torch.Tensor  # (Ncap + 1,) long
    norms: torch.Tensor  # (Ncap, NGRAMS) float64
    lengths: torch.Tensor  # (Ncap,) long: bigram counts (CIDEr's length)
    # n-gram lookup by word ids, one order at a time: n-gram g = (prefix, w) has the key
    # (id of prefix + 1) * word_bound + w (a unigram's prefix id is -1); every prefix of a
    # memory n-gram is one too, so an n-gram whose prefix is unknown is unknown
    keys: torch.Tensor  # (G,) long, sorted
    key_grams: torch.Tensor  # (G,) long: the n-gram id of each key
    word_bound: int  # 1 + the largest word id of the memory
    log_df: torch.Tensor  # (G,) float64: log(max(1, document frequency)), as `tfidf` computes it


class NeighbourMemory(nn.Module):
    """Training images' pooled features and captions, for `pick_by_consensus`.

    features (M, C) fp16, L2-normalised; words (W,) int32: every caption's word ids, one after
    another; caption_starts (Ncap + 1,): where each caption begins in `words`; image_starts
    (M + 1,): where each image's captions begin in `caption_starts`.
    """

    def __init__(self, features: torch.Tensor, words: torch.Tensor, caption_starts: torch.Tensor,
                 image_starts: torch.Tensor):
        super().__init__()
        for name, value in zip(BUFFERS, (features, words, caption_starts, image_starts)):
            self.register_buffer(name, value)
        self._vectors: dict[int, list[TfIdf]] = {}  # per image, built on first use
        self._frequencies: tuple[Counter, float] | None = None
        self._table: ReferenceTable | None = None
        self._features32: tuple[tuple[int, torch.device], torch.Tensor] | None = None  # `nearest`'s fp32 copy

    @classmethod
    def build(cls, pooled: torch.Tensor, captions: Sequence[Sequence[Sequence[int]]],
              max_images: int | None = None) -> NeighbourMemory:
        """From pooled features (M, C) and each image's captions (word ids, no <bos>/<eos>);
        with more than `max_images` images, an evenly spaced subset of them (logged)."""
        if len(captions) != pooled.shape[0]:
            raise ValueError(f"{pooled.shape[0]} feature rows for {len(captions)} images")
        keep = range(len(captions))
        if max_images is not None and len(captions) > max_images:
            keep = torch.linspace(0, len(captions) - 1, max_images).round().long().tolist()
            log.info("Neighbour memory: %d of %d training images (decoding.rerank_memory_images)",
                     max_images, len(captions))
        features = nn.functional.normalize(pooled[list(keep)].float(), dim=-1).half()
        flat = [list(c) for i in keep for c in captions[i]]
        caption_starts = torch.tensor([0, *accumulate(len(c) for c in flat)], dtype=torch.long)
        image_starts = torch.tensor([0, *accumulate(len(captions[i]) for i in keep)], dtype=torch.long)
        words = torch.tensor([w for c in flat for w in c], dtype=torch.int32)
        return cls(features.cpu(), words, caption_starts, image_starts)

    @classmethod
    def empty(cls, state: Mapping[str, torch.Tensor]) -> NeighbourMemory:
        """A memory shaped like the buffers in `state` (keyed features, words, ...), to load into."""
        missing = [name for name in BUFFERS if name not in state]
        if missing:
            raise ValueError(f"neighbour memory lacks {missing}")
        return cls(*(torch.empty(state[n].shape, dtype=state[n].dtype) for n in BUFFERS))

    def __len__(self) -> int:
        return self.features.shape[0]

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._vectors, self._frequencies, self._table = {}, None, None  # new captions: the caches are stale
        self._features32 = None  # and new features, copied into the same buffer
        super()._load_from_state_dict(*args, **kwargs)

    def nearest(self, pooled: torch.Tensor, k: int) -> torch.Tensor:
        """Indices (B, k) of the k training images nearest to pooled features (B, C), nearest first."""
        query = nn.functional.normalize(pooled.float(), dim=-1)
        # the fp16 features converted once, not per batch (20,000 images x 1,280 channels: 25M values)
        key = (self.features.data_ptr(), query.device)
        if self._features32 is None or self._features32[0] != key:
            self._features32 = key, self.features.to(query.device, torch.float32)
        similarity_ = query @ self._features32[1].T  # (B, M)
        return similarity_.topk(min(k, len(self)), dim=-1).indices.cpu()

    def frequencies(self) -> tuple[Counter, float]:
        """In how many training images' captions each n-gram occurs, and log(images): CIDEr's idf."""
        if self._frequencies is None:
            df: Counter = Counter()
            for image in range(len(self)):
                df.update(set().union(*(ngram_counts(c) for c in self._captions(image))))
            self._frequencies = df, math.log(float(max(len(self), 2)))
        return self._frequencies

    def caption_vectors(self, image: int) -> list[TfIdf]:
        """The CIDEr vectors of training image `image`'s captions."""
        if image not in self._vectors:
            df, log_images = self.frequencies()
            self._vectors[image] = [tfidf(ngram_counts(c), df, log_images) for c in self._captions(image)]
        return self._vectors[image]

    def reference_table(self) -> ReferenceTable:
        """All captions' CIDEr vectors as a `ReferenceTable`, built on first use (about as long
        as `frequencies`: one pass over the captions in Python)."""
        if self._table is None:
            df, log_images = self.frequencies()
            grams: dict[tuple[str, ...], int] = {}
            ids, weights, orders, counts, norms, lengths = [], [], [], [], [], []
            for image in range(len(self)):
                for caption in self._captions(image):
                    vector = tfidf(ngram_counts(caption), df, log_images)
                    for order, entries in enumerate(vector.vectors):
                        for gram, weight in entries.items():
                            ids.append(grams.setdefault(gram, len(grams)))
                            weights.append(weight)
                            orders.append(order)
                    counts.append(sum(len(v) for v in vector.vectors))
                    norms.append(vector.norms)
                    lengths.append(vector.length)
            bound = max((int(w) for gram in grams for w in gram), default=-1) + 1
            keys = torch.tensor([(grams[gram[:-1]] + 1 if len(gram) > 1 else 0) * bound + int(gram[-1])
                                 for gram in grams], dtype=torch.long)
            keys, key_grams = keys.sort()
            self._table = ReferenceTable(
                grams, torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float64),
                torch.tensor(orders, dtype=torch.long), torch.tensor([0, *accumulate(counts)], dtype=torch.long),
                torch.tensor(norms, dtype=torch.float64).view(-1, NGRAMS), torch.tensor(lengths, dtype=torch.long),
                keys, key_grams, bound,
                torch.tensor([math.log(max(1.0, df[gram])) for gram in grams], dtype=torch.float64))
        return self._table

    def _captions(self, image: int) -> list[str]:
        """Image `image`'s captions as strings of word ids ("4 17 9"), the form CIDEr counts n-grams in."""
        starts, bounds = self.caption_starts, self.image_starts
        return [" ".join(map(str, self.words[int(starts[j]):int(starts[j + 1])].tolist()))
                for j in range(int(bounds[image]), int(bounds[image + 1]))]


def consensus(memory: NeighbourMemory, candidates: Sequence[str], neighbours: Sequence[int]) -> list[float]:
    """CIDEr-D of each candidate (a string of word ids) against the captions of `neighbours`."""
    references = [v for image in neighbours for v in memory.caption_vectors(int(image))]
    df, log_images = memory.frequencies()
    scores = []
    for candidate in candidates:
        vector = tfidf(ngram_counts(candidate), df, log_images)
        scores.append(sum(similarity(vector, r) for r in references) / max(len(references), 1) * SCALE)
    return scores


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The concatenated aranges starts[i] .. starts[i] + counts[i] - 1 (1-D long tensors)."""
    offsets = torch.cumsum(counts, 0) - counts  # where each range begins in the output
    return torch.repeat_interleave(starts - offsets, counts) + torch.arange(int(counts.sum()))


def _length_penalties(differences: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """CIDEr-D's Gaussian length penalty of integer length differences, float64, computed as
    `similarity` computes it (math.e ** x, per distinct difference), so that it is the same number."""
    span = int(differences.abs().max()) if differences.numel() else 0
    table = torch.tensor([math.e ** (-(float(d) ** 2) / (2 * sigma**2)) for d in range(-span, span + 1)],
                         dtype=torch.float64)
    return table[differences + span]


class CandidateVectors(NamedTuple):
    """Candidates' CIDEr vectors (`tfidf`, the same float64 values) as flat tensors: one entry
    per distinct n-gram of each candidate."""

    rows: torch.Tensor  # (U,) long: the candidate of each entry
    grams: torch.Tensor  # (U,) long: its n-gram's id in the `ReferenceTable`, -1 where no memory caption has it
    orders: torch.Tensor  # (U,) long: n - 1
    weights: torch.Tensor  # (U,) float64: tf * idf
    norms: torch.Tensor  # (R, NGRAMS) float64
    lengths: torch.Tensor  # (R,) long: bigram counts (CIDEr's length)


def candidate_vectors(tokens: torch.Tensor, eos_id: int, table: ReferenceTable, log_images: float) -> CandidateVectors:
    """The CIDEr vectors of candidates tokens (R, L), each its words up to the first <eos> (all
    L without one), under the memory's document frequencies, with tensors.

    The n-grams at every position are built one order at a time from their prefix: looked up
    in `table` (an n-gram is known only if its prefix is), given dense ids among this batch's
    n-grams (known or not) by a 1-D `unique`, and counted per candidate by another."""
    tokens = tokens.cpu().long()
    R, L = tokens.shape
    is_eos = tokens == eos_id
    words = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), L)  # (R,) words per candidate
    positions, G, W = torch.arange(L), len(table.keys), int(tokens.max()) + 1 if tokens.numel() else 1
    known = torch.full((R, L), -1, dtype=torch.long)  # table id of the n-gram at each position (-1: unknown)
    local = torch.full((R, L), -1, dtype=torch.long)  # its id among this batch's n-grams of its order
    rows, grams, orders, counts = [], [], [], []
    for k in range(NGRAMS):  # the (k+1)-grams: words i .. i+k
        valid = positions + k < words.unsqueeze(1)  # (R, L)
        last = torch.cat([tokens[:, k:], tokens.new_zeros(R, k)], dim=1)  # (R, L) word i+k
        key = (known + 1) * table.word_bound + last
        in_table = (last < table.word_bound) & ((known >= 0) if k else True)
        if G:
            at = torch.searchsorted(table.keys, key).clamp(max=G - 1)
            known = torch.where(in_table & (table.keys[at] == key), table.key_grams[at], -1)
        local_ids, local[valid] = torch.unique(((local + 1) * W + last)[valid], return_inverse=True)
        pairs, which, tf = torch.unique(valid.nonzero()[:, 0] * len(local_ids) + local[valid], return_inverse=True,
                                        return_counts=True)  # one per (candidate, n-gram)
        rows.append(pairs // max(len(local_ids), 1))
        grams.append(torch.full_like(pairs, -1).scatter_(0, which, known[valid]))
        orders.append(torch.full_like(pairs, k))
        counts.append(tf)
    row, gram, order, tf = torch.cat(rows), torch.cat(grams), torch.cat(orders), torch.cat(counts)
    log_df = table.log_df[gram.clamp(min=0)] if G else torch.zeros(len(gram), dtype=torch.float64)
    weights = tf.double() * (log_images - torch.where(gram >= 0, log_df, 0.0))  # df 0: log(max(1, 0)) = 0
    norms = torch.zeros(R * NGRAMS, dtype=torch.float64).index_add_(0, row * NGRAMS + order, weights**2)
    return CandidateVectors(row, gram, order, weights, norms.sqrt().view(R, NGRAMS), (words - 1).clamp(min=0))


def consensus_scores(memory: NeighbourMemory, tokens: torch.Tensor, neighbours: torch.Tensor,
                     eos_id: int) -> torch.Tensor:
    """`consensus` for a batch, with tensors: float64 (B, K) CIDEr-D of the candidates tokens
    (B, K, L) (their words up to the first <eos>) against the captions of the training images
    `neighbours[b]` (B, k).

    Only n-grams a candidate holds add to its clipped dot products, so each reference entry
    whose n-gram some candidate of its image holds is gathered once against the K candidates'
    weights for it, and the products are summed per (reference, n-gram order) by index_add.
    """
    table = memory.reference_table()
    B, K, L = tokens.shape
    G = max(len(table.grams), 1)
    vectors = candidate_vectors(tokens.reshape(B * K, L), eos_id, table, memory.frequencies()[1])
    cand_norms, cand_lengths = vectors.norms.view(B, K, NGRAMS), vectors.lengths.view(B, K)
    known = vectors.grams >= 0  # candidate entries whose n-gram some reference holds
    columns, column_of = torch.unique((vectors.rows[known] // K) * G + vectors.grams[known],
                                      return_inverse=True)  # one column per (image, n-gram)
    weights = torch.zeros(K, len(columns), dtype=torch.float64)  # (K, J)
    weights[vectors.rows[known] % K, column_of] = vectors.weights[known]

    # the references: every caption of every neighbour, one slot per (image, caption)
    neighbours = neighbours.cpu().long()
    first = memory.image_starts.cpu()[neighbours]  # (B, k)
    counts = memory.image_starts.cpu()[neighbours + 1] - first
    captions = _ranges(first.view(-1), counts.view(-1))  # (P,) memory caption of each slot
    per_image = counts.sum(dim=1)  # (B,) references per image
    slot_image = torch.repeat_interleave(torch.arange(B), per_image)  # (P,)
    P = len(captions)
    entry_counts = table.starts[captions + 1] - table.starts[captions]
    entries = _ranges(table.starts[captions], entry_counts)  # (E,) entries of every slot's caption
    entry_slot = torch.repeat_interleave(torch.arange(P), entry_counts)
    entry_keys = slot_image[entry_slot] * G + table.ids[entries]
    at = torch.searchsorted(columns, entry_keys).clamp(max=max(len(columns) - 1, 0))
    held = columns[at] == entry_keys if len(columns) else torch.zeros_like(entry_keys, dtype=torch.bool)
    entries, entry_slot, at = entries[held], entry_slot[held], at[held]
    reference_weight = table.weights[entries]  # (E',)
    clipped = torch.minimum(weights[:, at], reference_weight) * reference_weight  # (K, E')
    dots = torch.zeros(K, P * NGRAMS, dtype=torch.float64)
    dots.index_add_(1, entry_slot * NGRAMS + table.orders[entries], clipped)
    dots = dots.view(K, P, NGRAMS)

    norms = cand_norms[slot_image].transpose(0, 1) * table.norms[captions]  # (K, P, NGRAMS)
    cosines = torch.where(norms != 0, dots / norms.where(norms != 0, 1.0), dots)
    penalty = _length_penalties(cand_lengths[slot_image].T - table.lengths[captions])  # (K, P)
    per_reference = cosines[..., 0] * penalty
    for order in range(1, NGRAMS):  # summed order by order, as `similarity` does
        per_reference = per_reference + cosines[..., order] * penalty
    per_reference = per_reference / NGRAMS
    totals = torch.zeros(K, B, dtype=torch.float64).index_add_(1, slot_image, per_reference)
    return (totals / per_image.clamp(min=1).double() * SCALE).T  # (B, K)


def pick_by_consensus(tokens: torch.Tensor, scores: torch.Tensor, pooled: torch.Tensor, memory: NeighbourMemory,
           neighbours: int, logprob_weight: float, eos_id: int) -> torch.Tensor:
    """Index (B,) of the hypothesis to keep per image, from hypotheses tokens (B, K, L) with
    their log-probabilities (B, K) (-inf: a hypothesis the search never filled)."""
    near = memory.nearest(pooled, neighbours)  # (B, k)
    agreement = consensus_scores(memory, tokens, near, eos_id)  # (B, K) float64
    total = agreement + logprob_weight * scores.double().cpu()  # -inf stays -inf
    picks = torch.where(torch.isfinite(total).any(dim=1), total.argmax(dim=1), 0)
    return picks.to(tokens.device)
