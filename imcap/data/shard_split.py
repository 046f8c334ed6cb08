"""The usable samples of a split of shards (`ShardSplit`), and how a shard sample's image
decodes: what streaming (imcap.data.streaming) and the per-shard feature cache
(imcap.data.shard_features) both read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from imcap.data import images
from imcap.data.shards import load_index, usable


@dataclass
class ShardSplit:
    """Per shard: its path, the positions of its usable samples and their caption counts."""

    name: str
    shards: list[str]
    keep: list[np.ndarray]  # per shard (n_s,) int64 sample positions
    ncaptions: list[np.ndarray]  # per shard (n_s,) int64

    @classmethod
    def load(cls, name: str, shards: Sequence[str], cache_dir: str | None, policy: str) -> ShardSplit:
        indexed = [(s, load_index(s, cache_dir)) for s in shards]
        usable(indexed, policy, name)
        keep = [np.array([i for i, x in enumerate(samples) if not x.problem], dtype=np.int64)
                for _, samples in indexed]
        ncap = [np.array([len(samples[i].captions) for i in k], dtype=np.int64) for k, (_, samples) in zip(keep, indexed)]
        return cls(name, list(shards), keep, ncap)

    def drop(self, shard: int, positions: Sequence[int]) -> None:
        """Leave out samples found bad after indexing (images that would not decode)."""
        mask = ~np.isin(self.keep[shard], np.asarray(positions, dtype=np.int64))
        self.keep[shard], self.ncaptions[shard] = self.keep[shard][mask], self.ncaptions[shard][mask]

    @property
    def images(self) -> int:
        return sum(len(k) for k in self.keep)

    @property
    def captions(self) -> int:
        return int(sum(n.sum() for n in self.ncaptions))


def decode_image(data: bytes, where: str, tensor: bool) -> torch.Tensor | Image.Image:
    """A (3, H, W) uint8 tensor (`tensor=True`; JPEGs decoded by torchvision) or an RGB PIL image,
    as viewers show it (imcap.data.images: EXIF orientation, pixel modes, limits, damage)."""
    return images.decode_image(data, f"the image of {where}", tensor,
                               fix="rewrite the shard or set data.bad_samples=skip with a frozen encoder "
                                   "(decoded once, into the feature cache)")
