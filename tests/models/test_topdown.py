"""TopDownDecoder beyond the shared contract (tests/models/test_decoder.py): its states start
at zero, as in Anderson et al., and the image enters every step through the mean feature as
well as through attention."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.decoders import inputs, make_decoder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_states_start_at_zero():
    dec = make_decoder("topdown", "additive")
    grid, pooled, _ = inputs()
    state = dec.init_state(grid, pooled)
    for h in (state.h1, state.c1, state.h2, state.c2):
        assert h.shape == (grid.shape[0], dec.hidden_dim) and not h.any()


def test_the_mean_feature_enters_every_step():
    """The attention LSTM reads the mean feature at each step: with the same grid and words,
    another pooled vector changes every step's logits."""
    dec = make_decoder("topdown", "additive")
    grid, pooled, tokens = inputs()
    with torch.no_grad():
        a, _ = dec(grid, pooled, tokens)
        b, _ = dec(grid, torch.randn_like(pooled), tokens)
    assert not torch.isclose(a, b, rtol=1e-4, atol=1e-5).all(-1).any()  # no step is left unchanged
