"""The training losses against their textbook definitions (torch's own functions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imcap.training.losses import caption_cross_entropy, doubly_stochastic_penalty

PAD = 0


def _batch(dtype=torch.float64, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 6, V, generator=g, dtype=dtype) * 3
    targets = torch.randint(1, V, (4, 6), generator=g)
    targets[1, 3:] = PAD
    targets[3, 1:] = PAD
    return logits, targets


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_reads_only_valid_positions_as_ignore_index_does(smoothing):
    logits, targets = _batch()
    logits[targets == PAD] = float("nan")  # what padding holds must not matter
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = caption_cross_entropy(ours_in, targets, PAD, smoothing)
    ref_in.data[targets == PAD] = 0.0
    ref = F.cross_entropy(ref_in.transpose(1, 2), targets, ignore_index=PAD, label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    (2.5 * ours).backward()
    (2.5 * ref).backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-12, atol=1e-12)
    assert (ours_in.grad[targets == PAD] == 0).all()


def test_cross_entropy_of_a_batch_without_padding():
    logits, targets = _batch()
    targets[targets == PAD] = 5
    torch.testing.assert_close(caption_cross_entropy(logits, targets, PAD),
                               F.cross_entropy(logits.flatten(0, 1), targets.flatten()), rtol=1e-12, atol=1e-12)


def test_doubly_stochastic_penalty_is_zero_when_every_cell_gets_one_unit():
    weights = torch.full((2, 4, 4), 0.25)  # 4 valid steps, each spreading 1/4 over 4 cells
    assert doubly_stochastic_penalty(weights, torch.ones(2, 4, dtype=torch.bool)).item() == 0
    assert doubly_stochastic_penalty(weights, torch.tensor([[1, 1, 0, 0]] * 2).bool()).item() == pytest.approx(0.25)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fp32_logits_get_torchs_own_cross_entropy_bit_for_bit(smoothing):
    """fp32 training computes exactly what it did before the bf16 path existed: same loss, same
    gradient, to the bit (a different summation order moves every later step's weights)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 50, requires_grad=True)
    targets = torch.randint(1, 50, (4, 7))
    targets[0, 5:] = PAD
    ours = caption_cross_entropy(logits, targets, PAD, smoothing)
    ours.backward()
    ours_grad, logits.grad = logits.grad.clone(), None
    valid = targets != PAD
    reference = torch.nn.functional.cross_entropy(logits[valid], targets[valid], label_smoothing=smoothing)
    reference.backward()
    assert torch.equal(ours, reference) and torch.equal(ours_grad, logits.grad)
