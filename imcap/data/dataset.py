"""Caption datasets (one item per caption for training, per image for evaluation) and collate."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from imcap.data.images import load_image
from imcap.data.mirror import mirror_words, mirrored_items
from imcap.data.records import CaptionRecord
from imcap.data.tokenizer import normalize
from imcap.data.vocab import Vocabulary

log = logging.getLogger(__name__)


class CaptionDataset(Dataset):
    """Items: `tokens` (L,) with <bos>/<eos>, all normalised `references`, `image_id`, `index`
    (record position), and either `image` (3, H, W) or cached `grid` (N, C).

    `per_caption=True` yields every (image, caption) pair (training); otherwise one item per
    image whose `tokens` are its first caption (evaluation, where decoding uses only the image).

    `mirror=True` (training with `data.hflip`) mirrors half of the items each epoch
    (`set_epoch`): the image is flipped, or its grid read from `mirrored_features` (the cache of
    the mirrored images), and "left" and "right" trade places in its tokens and references.
    """

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        vocab: Vocabulary,
        per_caption: bool,
        max_length: int = 30,
        transform: Callable | None = None,
        features: np.ndarray | None = None,
        mirror: bool = False,
        mirrored_features: np.ndarray | None = None,
        seed: int = 0,
    ):
        if (transform is None) == (features is None):
            raise ValueError("give exactly one of transform (images) or features (cached grids)")
        if mirror and features is not None and mirrored_features is None:
            raise ValueError("mirror=True with cached features needs the mirrored images' features")
        self.records = list(records)
        self.references = [[normalize(c) for c in r.captions] for r in self.records]
        truncated = sum(len(ref.split()) > max_length for refs in self.references for ref in refs)
        self.tokens = self._encode(self.references, vocab, max_length)
        if truncated:
            log.info("Truncated %d captions longer than %d tokens (data.max_caption_length)",
                     truncated, max_length)
        self.index = (
            [(i, j) for i, refs in enumerate(self.references) for j in range(len(refs))]
            if per_caption
            else [(i, 0) for i in range(len(self.records))]
        )
        self.transform, self.features = transform, features
        self.mirror, self.mirrored_features, self.seed = mirror, mirrored_features, seed
        if mirror:
            self.mirrored_references = [[mirror_words(c) for c in refs] for refs in self.references]
            self.mirrored_tokens = self._encode(self.mirrored_references, vocab, max_length)
        self._epoch = torch.zeros(1, dtype=torch.long)
        if mirror:  # in shared memory: persistent loader workers hold copies of this dataset
            self._epoch.share_memory_()
        self._draw: tuple[int, np.ndarray] | None = None  # (epoch, mirrored items) in this process

    @staticmethod
    def _encode(references: list[list[str]], vocab: Vocabulary, max_length: int) -> list[list[list[int]]]:
        return [[vocab.encode(ref.split()[:max_length]) for ref in refs] for refs in references]

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose items are served next (it decides which are mirrored)."""
        self._epoch[0] = epoch

    def is_mirrored(self, k: int) -> bool:
        """Whether item `k` is mirrored in the current epoch."""
        if not self.mirror:
            return False
        epoch = int(self._epoch[0])
        if self._draw is None or self._draw[0] != epoch:
            self._draw = epoch, mirrored_items(len(self.index), self.seed, epoch)
        return bool(self._draw[1][k])

    def __len__(self) -> int:
        return len(self.index)

    def token_lengths(self) -> list[int]:
        """Tokens of each item (<bos> and <eos> included), as collate pads them."""
        return [len(self.tokens[i][j]) for i, j in self.index]

    def groups(self) -> list[list[int]]:
        """Item indices of each image, in record order."""
        out: list[list[int]] = [[] for _ in self.records]
        for k, (i, _) in enumerate(self.index):
            out[i].append(k)
        return out

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, j = self.index[k]
        record = self.records[i]
        mirrored = self.is_mirrored(k)
        tokens, references = ((self.mirrored_tokens, self.mirrored_references) if mirrored
                              else (self.tokens, self.references))
        item: dict[str, Any] = {
            "tokens": torch.tensor(tokens[i][j], dtype=torch.long),
            "references": references[i],
            "raw_references": list(record.captions),  # as written, for the official metrics
            "image_id": record.image_id,
            "index": i,
            "item_id": k,  # this (image, caption) pair's position in the dataset
            # object annotations (shapes demo) for attention grounding; None elsewhere
            "objects": record.extra.get("objects"),
            "extent": record.extra.get("image_size"),
        }
        if self.features is not None:
            features = self.mirrored_features if mirrored else self.features
            item["grid"] = torch.from_numpy(np.asarray(features[i], dtype=np.float32))
        else:
            image = self.transform(load_image(record.image_path))  # (3, H, W)
            item["image"] = image.flip(-1) if mirrored else image
        return item


def collate(items: list[dict[str, Any]], pad_id: int = Vocabulary.pad_id, pad_to_multiple: int = 1,
            widths: Sequence[int] | None = None) -> dict[str, Any]:
    """Pad tokens to the longest in the batch, rounded up to a multiple of `pad_to_multiple`,
    or to the first of `widths` that holds it (length buckets, `imcap.data.buckets`: a few
    fixed widths, for captured graphs on GPUs); keep every reference per image. Items are
    sorted longest caption first, the order decoders skip padding in (`imcap.models.packing`)."""
    items = sorted(items, key=lambda it: -len(it["tokens"]))  # stable: ties keep their order
    lengths = torch.tensor([len(it["tokens"]) for it in items])
    longest = int(lengths.max())
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    if widths is not None:
        width = next((w for w in widths if w >= longest), width)
    tokens = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, L)
    for b, it in enumerate(items):
        tokens[b, : len(it["tokens"])] = it["tokens"]
    batch: dict[str, Any] = {
        "tokens": tokens,
        "lengths": lengths,
        "references": [it["references"] for it in items],
        "raw_references": [it["raw_references"] for it in items],
        "image_ids": [it["image_id"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
        "item_ids": [it.get("item_id") for it in items],
        "objects": [it.get("objects") for it in items],
        "extents": [it.get("extent") for it in items],
    }
    key = "grid" if "grid" in items[0] else "image"
    batch["grid" if key == "grid" else "images"] = torch.stack([it[key] for it in items])
    return batch


class EpochSeededSampler(Sampler[int]):
    """Random order that depends only on (seed, epoch).

    Lightning calls `set_epoch` every epoch, so a run resumed from a checkpoint sees the same
    batches as an uninterrupted one (a plain RandomSampler draws from the global RNG).
    With `groups` (item indices per image) and `per_group=k`, each epoch draws k of every
    image's captions, so an epoch covers every image without repeating it five times.
    From epoch `one_per_group_from` on, each epoch draws one item per image (SCST: its reward
    scores a sample against all of the image's references, so further captions of the same
    image would only repeat the image).
    `on_epoch(epoch)` is called with every new epoch.
    """

    def __init__(self, length: int, seed: int = 0, groups: Sequence[Sequence[int]] | None = None,
                 per_group: int | None = None, one_per_group_from: int | None = None,
                 on_epoch: Callable[[int], None] | None = None):
        self.length, self.seed, self.epoch = length, seed, 0
        self.on_epoch = on_epoch  # told each new epoch (the dataset's per-epoch mirroring)
        needs_groups = groups is not None and (per_group or one_per_group_from is not None)
        self.groups = [list(g) for g in groups] if needs_groups else None
        self.per_group, self.one_per_group_from = per_group, one_per_group_from

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def draws_per_group(self) -> int | None:
        """Items drawn per group this epoch (None: all)."""
        if self.one_per_group_from is not None and self.epoch >= self.one_per_group_from:
            return 1
        return self.per_group

    def __len__(self) -> int:
        k = self.draws_per_group()
        if self.groups is None or k is None:
            return self.length
        return sum(min(len(g), k) for g in self.groups)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        k = self.draws_per_group()
        if self.groups is None or k is None:
            return iter(torch.randperm(self.length, generator=g).tolist())
        chosen = []
        for group in self.groups:
            pick = torch.randperm(len(group), generator=g)[:k].tolist()
            chosen += [group[i] for i in pick]
        order = torch.randperm(len(chosen), generator=g).tolist()
        return iter([chosen[i] for i in order])
