"""The bf16 training path (`trainer.precision=bf16-mixed`): what it computes in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imcap.training import losses
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
@pytest.mark.parametrize("rows_per_chunk", [3, None])
def test_cross_entropy_of_bf16_logits_is_computed_in_fp32(smoothing, autocast, rows_per_chunk, monkeypatch):
    # the loss of bf16 logits, with or without autocast, is that of the same values in fp32,
    # and their gradient is the fp32 gradient in bf16 (up to one rounding), made a few rows at
    # a time (as on CPU at V = 10,000) or all at once
    logits, targets = _bf16_batch()
    if rows_per_chunk:
        monkeypatch.setattr(losses, "CHUNK_BYTES", rows_per_chunk * logits.shape[-1] * 4)
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


def test_bf16_training_follows_the_fp32_loss_curve():
    # a guard for the bf16 path as a whole (kernel, loss, fused AdamW on fp32 master weights):
    # the same decoder trained on the same batches in fp32 and under bf16 autocast
    import copy

    from imcap.bench import train_step
    from imcap.bench_models import build_optimizer, compose_model
    from imcap.data.vocab import Vocabulary
    from imcap.models.captioner import build_decoder

    V, B, T, N, C = 40, 16, 6, 9, 32
    vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", *[f"w{i}" for i in range(V - 4)]])
    arch = compose_model("lstm", "additive", ("model.decoder.hidden_dim=32", "model.embedding.dim=32",
                                              "++model.attention.attention_dim=16", "model.decoder.dropout=0"))
    torch.manual_seed(0)
    decoders = {"fp32": build_decoder(arch, vocab, C).train()}
    decoders["bf16"] = copy.deepcopy(decoders["fp32"])
    optimizers = {d: build_optimizer(arch, m) for d, m in decoders.items()}
    g = torch.Generator().manual_seed(1)
    classes, captions = torch.randn(4, 1, C, generator=g), torch.randint(4, V, (4, T), generator=g)
    losses: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(40):  # 4 kinds of image, each with its own caption
        kind = torch.randint(0, 4, (B,), generator=g)
        grid = classes[kind] + 0.5 * torch.randn(B, N, C, generator=g)
        tokens = torch.cat([torch.full((B, 1), vocab.bos_id), captions[kind]], 1)
        for dtype, decoder in decoders.items():
            train_step(decoder, optimizers[dtype], grid, tokens, dtype)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                logits, _ = decoder(grid, grid.mean(1), tokens[:, :-1])
                losses[dtype].append(caption_cross_entropy(logits, tokens[:, 1:], PAD).item())
    fp32, bf16 = (torch.tensor(losses[d]) for d in ("fp32", "bf16"))
    assert fp32[-10:].mean() < 0.8 * fp32[:10].mean()  # it learns
    assert ((bf16 - fp32).abs() <= 0.02 * fp32).all()  # measured: at most 0.05%
