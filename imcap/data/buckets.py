"""Length-bucketed training batches with a few fixed widths (`data.length_buckets`).

A captured step (CUDA graphs, `model.compile={mode: reduce-overhead}`) replays one set of
shapes. Batches padded to the longest caption have a new width every few batches; with
buckets, captions of similar length are batched together and padded to their bucket's fixed
width, so an epoch has one shape per bucket (plus the last, smaller batch of a bucket).

The plan of an epoch is a pure function of (seed, epoch, the caption lengths, batch size,
widths, world size):
1. the epoch's items in `EpochSeededSampler`'s order (all captions, or `captions_per_image`
   drawn per image), each put in the first bucket wide enough for it;
2. each bucket cut into batches in that order (its last batch may be smaller);
3. the batches shuffled by a generator seeded with (seed, epoch), then, where needed, the
   largest split in halves until every rank gets the same number (with `captions_per_image`,
   whose draw changes the bucket sizes, until the count every epoch can reach: Lightning
   counts the batches of an epoch once);
4. rank r takes batches r, r + W, r + 2W, ...: disjoint, every item exactly once per epoch
   across ranks, and the same batch count everywhere (DDP steps in lockstep).

Under DDP Lightning rebuilds this batch sampler with a `DistributedSampler` as `sampler`
(it re-runs `__init__` with the saved arguments); only its rank and world size are read.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, Sampler

from imcap.data.dataset import EpochSeededSampler
from imcap.errors import ImcapError


def bucket_widths(length_buckets: Sequence[int] | None, max_caption_length: int) -> tuple[int, ...] | None:
    """`data.length_buckets` (caption lengths in words, increasing) -> padded token widths
    (+2: <bos> and <eos>), with `max_caption_length` as the last bucket if no bucket holds it."""
    if length_buckets is None:
        return None
    words = list(length_buckets)
    if (not words or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in words)
            or words != sorted(set(words))):
        raise ImcapError(f"data.length_buckets={length_buckets!r}; give increasing caption lengths in words, "
                         "e.g. [8,12,16,20,30], or null for no buckets")
    if words[-1] < max_caption_length:
        words.append(max_caption_length)  # captions are truncated to it: every one fits
    return tuple(w + 2 for w in words)


def width_for(length: int, widths: Sequence[int]) -> int:
    """The padded width of a batch whose longest caption has `length` tokens: its bucket's."""
    i = bisect.bisect_left(widths, length)
    return widths[i] if i < len(widths) else length


class LengthBucketBatchSampler(BatchSampler):
    """Batches of item indices, each from one length bucket (module docstring has the plan).

    lengths: tokens per item (with <bos>/<eos>); widths: the buckets' token widths, increasing;
    order: the epoch's items in random order (`EpochSeededSampler`, which also draws
    `captions_per_image`); sampler: consulted only for `num_replicas` and `rank` when Lightning
    replaces it with a DistributedSampler (else one process)."""

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool = False, *,
                 lengths: Sequence[int], widths: Sequence[int], order: EpochSeededSampler, seed: int = 0):
        if drop_last:
            raise ValueError("length buckets keep every caption: drop_last must be False")
        super().__init__(sampler, batch_size, drop_last)
        self.lengths, self.widths = list(lengths), tuple(widths)
        self.order, self.seed, self.epoch = order, seed, 0
        self.world = int(getattr(sampler, "num_replicas", 1))
        self.rank = int(getattr(sampler, "rank", 0))
        self._plan: tuple[int, list[list[int]]] | None = None  # (epoch, this rank's batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order.set_epoch(epoch)

    def bucket_of(self, index: int) -> int:
        return min(bisect.bisect_left(self.widths, self.lengths[index]), len(self.widths) - 1)

    def plan(self) -> list[list[int]]:
        """Every rank's batches of this epoch, rank r's at positions r, r + W, ..."""
        buckets: list[list[int]] = [[] for _ in self.widths]
        self.order.set_epoch(self.epoch)
        for index in self.order:
            buckets[self.bucket_of(index)].append(index)
        batches = [b[i : i + self.batch_size] for b in buckets for i in range(0, len(b), self.batch_size)]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_919)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        while len(batches) < self.fixed_count() or len(batches) % self.world:  # split the largest batch in two
            largest = max(range(len(batches)), key=lambda i: len(batches[i]))
            if len(batches[largest]) < 2:
                raise ImcapError(f"{len(self.order)} training captions cannot make the same number of batches "
                                 f"on {self.world} processes; use fewer processes or data.length_buckets=null")
            whole = batches[largest]
            batches[largest : largest + 1] = [whole[: len(whole) // 2], whole[len(whole) // 2 :]]
        return batches

    def fixed_count(self) -> int:
        """The batch count every epoch must have when the draw of `captions_per_image` makes
        bucket sizes vary (then at most ceil(N / B) + buckets - 1), else 0 (no constraint)."""
        if self.order.groups is None:
            return 0
        return -(-len(self.order) // self.batch_size) + len(self.widths) - 1

    def _mine(self) -> list[list[int]]:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self.plan()[self.rank :: self.world])
        return self._plan[1]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())
