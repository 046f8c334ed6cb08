"""`model.compile=true`: each decoder's compiled hot path computes what the eager one does,
on padded batches of varying length (one graph for every step and batch size)."""

from __future__ import annotations

import pytest
import torch

from tests.models.zoo import T, inputs, make_decoder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _loss_and_grads(dec, grid, pooled, tokens, lengths):
    dec.zero_grad()
    logits, weights = dec(grid, pooled, tokens, lengths)
    loss = logits.logsumexp(-1).sum() + weights.square().sum()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("pair", [("lstm", "additive"), ("lstm", "multihead"), ("topdown", "additive"),
                                  ("transformer", "multihead")], ids="-".join)
def test_compiled_steps_match_eager(pair):
    eager, compiled = make_decoder(*pair), make_decoder(*pair)
    compiled.compile_steps()
    for length, lengths in ((T, torch.tensor([2, T, 5])), (T - 2, None), (T - 2, torch.tensor([1, 1, 3]))):
        grid, pooled, tokens = inputs(seed=length, length=length)
        want_logits, want_grads = _loss_and_grads(eager, grid, pooled, tokens, lengths)
        got_logits, got_grads = _loss_and_grads(compiled, grid, pooled, tokens, lengths)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-4, msg=name)
