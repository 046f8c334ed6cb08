"""Teacher forcing without compute on padding (`imcap.models.packing`): for every decoder x
attention pair, a padded batch with lengths gives each caption exactly what it gets alone,
zeros on padding, the gradients of the unpadded computation, and fewer FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from imcap.models.packing import on_valid, pack, stack_steps
from tests.helpers.decoders import PAIRS, T, inputs, make_decoder, pair_id

pytestmark = pytest.mark.usefixtures("one_thread")
LENGTHS = torch.tensor([3, T, 1])  # unsorted on purpose: decoders sort and unsort rows themselves


def test_pack_sorts_longest_first_and_counts_the_rows_of_each_step():
    packing = pack(torch.tensor([2, 5, 0, 5]), 4, 5, torch.device("cpu"))
    assert packing.lengths.tolist() == [5, 5, 2, 0]
    assert packing.order.tolist() == [1, 3, 0, 2]  # stable: ties keep their order
    assert packing.batch_sizes == (3, 3, 2, 2, 2)
    assert not packing.full
    x = torch.arange(4)
    assert packing.unsort(packing.sort(x)).tolist() == x.tolist()
    assert packing.valid.sum().item() == 12


def test_pack_of_full_or_sorted_rows_needs_no_permutation():
    assert pack(None, 3, 4, torch.device("cpu")).full
    packing = pack(torch.tensor([9, 4, 4]), 3, 4, torch.device("cpu"))  # clamped to the steps
    assert packing.full and packing.order is None and packing.valid is None


def test_pack_refuses_lengths_of_another_batch():
    with pytest.raises(ValueError, match=r"lengths must have shape \(3,\)"):
        pack(torch.tensor([1, 2]), 3, 4, torch.device("cpu"))


def test_on_valid_runs_the_layer_on_valid_positions_only():
    hs = torch.randn(2, 3, 4)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    seen = []
    out = on_valid(hs, valid, lambda h: seen.append(h.shape[0]) or h * 2)
    assert seen == [3]
    torch.testing.assert_close(out[valid], hs[valid] * 2)
    assert (out[~valid] == 0).all()


def test_stack_steps_pads_ended_rows_and_missing_steps_with_zeros():
    out = stack_steps([torch.ones(3, 2), torch.ones(1, 2)], batch=3, total_steps=4)
    assert out.shape == (3, 4, 2)
    assert out.sum(-1).tolist() == [[2, 2, 0, 0], [2, 0, 0, 0], [2, 0, 0, 0]]


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_each_caption_gets_what_it_gets_alone_and_zeros_on_padding(pair):
    dec = make_decoder(*pair).double()
    grid, pooled, tokens = inputs()
    grid, pooled = grid.double(), pooled.double()
    with torch.no_grad():
        logits, weights = dec(grid, pooled, tokens, LENGTHS)
        for b, n in enumerate(LENGTHS.tolist()):
            alone, alone_weights = dec(grid[b : b + 1], pooled[b : b + 1], tokens[b : b + 1, :n])
            torch.testing.assert_close(logits[b, :n], alone[0], rtol=1e-10, atol=1e-10)
            assert (logits[b, n:] == 0).all()
            if weights is not None:
                torch.testing.assert_close(weights[b, :n], alone_weights[0], rtol=1e-10, atol=1e-10)
                assert (weights[b, n:] == 0).all()


def _masked_loss_grads(dec, grid, pooled, tokens, lengths):
    dec.zero_grad()
    grid = grid.clone().requires_grad_()
    logits, weights = dec(grid, pooled, tokens, lengths)
    valid = torch.arange(T) < LENGTHS.unsqueeze(1)
    loss = torch.nn.functional.cross_entropy(logits[valid], tokens.roll(-1, 1)[valid])
    if weights is not None:
        loss = loss + (weights * valid.unsqueeze(-1)).square().sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}, grid.grad


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_skipping_padding_leaves_the_loss_and_every_gradient_unchanged(pair):
    dec = make_decoder(*pair).double()
    grid, pooled, tokens = inputs()
    grid, pooled = grid.double(), pooled.double()
    packed = _masked_loss_grads(dec, grid, pooled, tokens, LENGTHS)
    padded = _masked_loss_grads(dec, grid, pooled, tokens, None)  # the same loss, computed on padding too
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-12, atol=1e-12)
    assert packed[1].keys() == padded[1].keys()
    for name in padded[1]:
        torch.testing.assert_close(packed[1][name], padded[1][name], rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(packed[2], padded[2], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("decoder,attention", [("lstm", "additive"), ("lstm", "none"), ("topdown", "additive"),
                                               ("lstm", "multihead")])
def test_recurrent_decoders_spend_no_matrix_products_on_padding(decoder, attention):
    """Half the positions padded: well under the FLOPs of the full batch (forward + backward).
    (The transformer's layers run on all positions at once; it skips only the output layer.)"""
    dec = make_decoder(decoder, attention, hidden=64).train()
    grid, pooled, tokens = inputs(batch=8)
    lengths = torch.tensor([T, T, T, T, 1, 1, 1, 1])  # valid positions: (4 T + 4) / 8 T of the batch

    def flops(lengths):
        with FlopCounterMode(display=False) as counter:
            logits, _ = dec(grid, pooled, tokens, lengths)
            logits.sum().backward()
        return counter.get_total_flops()

    assert flops(lengths) < 0.7 * flops(None)
