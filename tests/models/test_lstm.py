"""LSTMDecoder beyond the shared contract (tests/models/test_decoder.py): Show and Tell sees the
image only through its initial state, parameter names old checkpoints rely on, the choice of
path, and the Show-Attend-Tell path's step weights kept within a sequence, copied and saved."""

from __future__ import annotations

import copy
import io
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from imcap.models.lstm import PlainPath, ShowAttendTellPath
from tests.helpers.decoders import inputs, make_decoder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_show_and_tell_sees_the_image_only_through_the_initial_state():
    dec = make_decoder("lstm", "none")
    grid, _, tokens = inputs()
    shuffled = grid[:, torch.randperm(grid.shape[1])]  # same mean, other layout
    a, _ = dec(grid, grid.mean(1), tokens)
    b, _ = dec(shuffled, shuffled.mean(1), tokens)
    torch.testing.assert_close(a, b)


def test_lstm_with_additive_attention_keeps_its_parameter_names():
    """Checkpoints of the Show-Attend-Tell decoder trained before the zoo still load."""
    names = {k.rsplit(".", 1)[0] for k in make_decoder("lstm", "additive").state_dict()}
    assert names == {"embedding", "init_h", "init_c", "input_proj", "hidden_proj", "attention.key_proj",
                     "attention.query_proj", "attention.score", "context_proj", "gate", "output"}


@pytest.mark.parametrize("attention", ["additive", "dot", "adaptive", "none"])
def test_the_kernel_runs_where_it_applies_unless_switched_off(attention):
    dec = make_decoder("lstm", attention)
    assert isinstance(dec.path, ShowAttendTellPath if attention == "additive" else PlainPath)
    dec.fast_path = False
    assert isinstance(dec.path, PlainPath)


def _train_once(dec) -> None:
    grid, _, tokens = inputs()
    logits, _ = dec(grid, grid.mean(1), tokens)
    F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()


@pytest.mark.parametrize("optimizer", [partial(torch.optim.SGD, lr=0.1), partial(torch.optim.AdamW, fused=True)],
                         ids=["sgd", "fused_adamw"])  # fused AdamW changes parameters without a version bump
def test_step_weights_are_kept_within_a_sequence_and_rebuilt_for_the_next(optimizer):
    dec = make_decoder("lstm", "additive", dropout=0.0)
    grid, _, tokens = inputs()

    def step_logits() -> torch.Tensor:
        with torch.no_grad():
            return dec.step(dec.init_state(grid, grid.mean(1)), tokens[:, 0])[0]

    first = step_logits()
    with torch.no_grad():  # the steps of one sequence share the prepared weights
        state = dec.init_state(grid, grid.mean(1))
        _, state, _ = dec.step(state, tokens[:, 0])
        kept = dec.sat_path.kept
        dec.step(state, tokens[:, 1])
        assert kept is not None and dec.sat_path.kept is kept
    opt = optimizer(dec.parameters())
    _train_once(dec)
    opt.step()  # in place: the kept weights are stale now
    updated = step_logits()
    dec.fast_path = False
    torch.testing.assert_close(updated, step_logits(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(updated, first)
    fresh = make_decoder("lstm", "additive", dropout=0.0)
    dec.fast_path = True
    dec.load_state_dict(fresh.state_dict())  # copied in place
    torch.testing.assert_close(step_logits(), first)


def test_decoders_with_kept_weights_copy_and_save():
    dec = make_decoder("lstm", "additive", dropout=0.0)
    grid, _, tokens = inputs()
    with torch.no_grad():
        dec.step(dec.init_state(grid, grid.mean(1)), tokens[:, 0])
    assert dec.sat_path.kept is not None
    clone = copy.deepcopy(dec)
    assert clone.sat_path.kept is None and clone.sat_path.decoder is clone and clone.plain_path.decoder is clone
    torch.save(dec, io.BytesIO())
    torch.testing.assert_close(clone(grid, grid.mean(1), tokens)[0], dec(grid, grid.mean(1), tokens)[0])


def test_checkpoints_of_the_plain_code_load_into_the_fast_path():
    plain = make_decoder("lstm", "additive", dropout=0.0)
    plain.fast_path = False
    buffer = io.BytesIO()
    torch.save(plain.state_dict(), buffer)
    fast = make_decoder("lstm", "additive", seed=5, dropout=0.0)
    buffer.seek(0)
    fast.load_state_dict(torch.load(buffer, weights_only=True))
    grid, _, tokens = inputs()
    with torch.no_grad():
        torch.testing.assert_close(fast(grid, grid.mean(1), tokens)[0], plain(grid, grid.mean(1), tokens)[0],
                                   rtol=1e-5, atol=1e-5)
