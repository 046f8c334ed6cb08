"""Horizontal-flip augmentation: the mirrored transform, the left/right swap and the per-epoch draw."""

from __future__ import annotations

import numpy as np
import torch

from imcap.data.images import accepts_uint8_tensor, image_transform
from imcap.data.mirror import mirror_words, mirrored_items, mirrored_transform


def test_mirrored_transform_flips_the_transformed_image_and_still_takes_uint8_tensors():
    plain = image_transform(8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    mirrored = mirrored_transform(plain)
    image = torch.randint(0, 256, (3, 12, 16), dtype=torch.uint8)
    assert torch.equal(mirrored(image), plain(image).flip(-1))
    assert accepts_uint8_tensor(mirrored)  # JPEG files still decode straight into tensors
    assert repr(mirrored) != repr(plain)  # the feature cache keys on it: a cache of its own


def test_a_transform_that_is_not_a_compose_is_flipped_after_it():
    mirrored = mirrored_transform(lambda image: image.float() * 2)
    image = torch.arange(6, dtype=torch.uint8).reshape(1, 2, 3)
    assert torch.equal(mirrored(image), (image.float() * 2).flip(-1))


def test_left_and_right_trade_places_and_nothing_else_changes():
    assert mirror_words("a dog on the left of a man turning right") == "a dog on the right of a man turning left"
    assert mirror_words("a bright red kite") == "a bright red kite"  # whole words only


def test_the_mirrored_items_depend_only_on_seed_and_epoch():
    first = mirrored_items(1000, seed=3, epoch=2)
    assert np.array_equal(first, mirrored_items(1000, seed=3, epoch=2))  # a resumed run draws the same
    assert not np.array_equal(first, mirrored_items(1000, seed=3, epoch=3))
    assert not np.array_equal(first, mirrored_items(1000, seed=4, epoch=2))
    assert 400 < first.sum() < 600
