"""The bf16 training path (`trainer.precision=bf16-mixed`): what it computes in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imcap.training.losses import caption_cross_entropy

PAD = 0


def _bf16_batch(V: int = 1000):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 7, V, generator=g) * 4).bfloat16()
    targets = torch.randint(1, V, (4, 7), generator=g)
    targets[2, 4:] = PAD
    return logits, targets


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("autocast", [False, True])
def test_cross_entropy_of_bf16_logits_is_computed_in_fp32(smoothing, autocast):
    # the loss of bf16 logits, with or without autocast, is that of the same values in fp32,
    # and their gradient is the fp32 gradient in bf16 (up to one rounding)
    logits, targets = _bf16_batch()
    ours_in, ref_in = logits.clone().requires_grad_(), logits.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = caption_cross_entropy(ours_in, targets, PAD, smoothing)
    valid = targets != PAD
    ref = F.cross_entropy(ref_in[valid], targets[valid], label_smoothing=smoothing)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    ours.backward()
    ref.backward()
    assert ours_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours_in.grad.float(), ref_in.grad, rtol=2**-8, atol=1e-7)
