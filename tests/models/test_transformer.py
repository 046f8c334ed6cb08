"""TransformerDecoder beyond the shared contract (tests/models/test_decoder.py): cached keys
and values, positions, option errors."""

from __future__ import annotations

import pytest
import torch

from imcap.errors import ImcapError
from tests.helpers.decoders import T, assert_steps_reproduce_teacher_forcing, inputs, make_decoder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_transformer_steps_only_process_the_new_position():
    """Keys/values are cached: step t feeds one position through the layers (O(t) attention),
    and the cross-attention keys are projected once per sequence."""
    dec = make_decoder("transformer", "multihead")
    grid, pooled, tokens = inputs()
    seen, key_projections = [], []
    dec.layers[0].self_attn.qkv.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    dec.layers[0].cross.key_proj.register_forward_hook(lambda m, i, o: key_projections.append(1))
    with torch.no_grad():
        state = dec.init_state(grid, pooled)
        for t in range(T):
            _, state, _ = dec.step(state, tokens[:, t])
            assert state.keys[0].shape[2] == t + 1
    assert seen == [1] * T and len(key_projections) == 1


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_transformer_positions(positions):
    dec = make_decoder("transformer", "multihead", positions=positions, max_length=T)
    grid, pooled, tokens = inputs()
    logits, _ = dec(grid, pooled, tokens)
    swapped, _ = dec(grid, pooled, tokens.flip(1))
    assert not torch.allclose(logits[:, -1], swapped[:, 0])  # order matters: positions are in
    if positions == "learned":
        with pytest.raises(ImcapError, match="model.decoder.max_length=7"):
            dec(grid, pooled, torch.cat([tokens, tokens[:, :1]], dim=1))


def test_transformer_option_errors():
    with pytest.raises(ImcapError, match="model.decoder.positions='rotary'"):
        make_decoder("transformer", "multihead", positions="rotary")
    with pytest.raises(ImcapError, match="model.decoder.heads=5"):
        make_decoder("transformer", "multihead", heads=5)
    with pytest.raises(ImcapError, match="model.decoder.layers=0"):
        make_decoder("transformer", "multihead", layers=0)


def test_transformer_with_learned_positions_decodes_incrementally():
    assert_steps_reproduce_teacher_forcing(make_decoder("transformer", "additive", positions="learned", max_length=T))
