"""Horizontal-flip augmentation for training (`data.hflip`): a mirrored view of every training
image, the caption's "left" and "right" swapped with it, and which items are mirrored in an
epoch, drawn from (seed, epoch) alone so that a resumed run mirrors the same items.

With cached features the mirrored view is a second cache (the transform differs, so its key
does): the encoder stays frozen and still runs once per image and view.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torchvision.transforms import v2 as T

# words that name a side of the picture: a mirrored image swaps them
MIRRORED_WORDS = {"left": "right", "right": "left"}


def mirrored_transform(transform: Callable) -> T.Compose:
    """`transform`, then a horizontal flip of its (C, H, W) output. A v2 Compose stays one
    Compose, so JPEG files are still decoded straight into tensors (`accepts_uint8_tensor`)."""
    flip = T.RandomHorizontalFlip(p=1.0)
    if isinstance(transform, T.Compose):
        return T.Compose([*transform.transforms, flip])
    return T.Compose([transform, flip])


def mirror_words(caption: str) -> str:
    """A normalised caption as it reads for the mirrored image ("a dog on the left" -> "a dog on
    the right")."""
    return " ".join(MIRRORED_WORDS.get(w, w) for w in caption.split())


def mirrored_items(count: int, seed: int, epoch: int, share: float = 0.5) -> np.ndarray:
    """(count,) bool: the items that are mirrored in `epoch`, each with probability `share`."""
    return np.random.default_rng([seed, epoch, 0x6D6972]).random(count) < share
