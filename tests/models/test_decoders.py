from functools import partial

import pytest
import torch

from imcap.models.attention import AdditiveAttention
from imcap.models.decoders import LSTMDecoder
from imcap.models.embeddings import LearnedEmbedding

V, C, N, B, T = 30, 24, 9, 3, 7


def make_decoder(attention: bool) -> LSTMDecoder:
    torch.manual_seed(0)
    emb = LearnedEmbedding([str(i) for i in range(V)], dim=16)
    att = partial(AdditiveAttention, attention_dim=20) if attention else None
    return LSTMDecoder(V, C, emb, att, hidden_dim=32, dropout=0.3).eval()


@pytest.mark.parametrize("attention", [True, False], ids=["additive", "none"])
def test_step_by_step_decoding_reproduces_teacher_forced_logits(attention):
    dec = make_decoder(attention)
    grid = torch.randn(B, N, C)
    tokens = torch.randint(0, V, (B, T))
    with torch.no_grad():
        logits, weights = dec(grid, grid.mean(1), tokens)
        state = dec.init_state(grid, grid.mean(1))
        for t in range(T):
            step_logits, state, step_weights = dec.step(state, tokens[:, t])
            torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-5, atol=1e-5)
            if attention:
                torch.testing.assert_close(step_weights, weights[:, t], rtol=1e-5, atol=1e-6)
    assert logits.shape == (B, T, V)
    assert (weights is None) == (not attention)


def test_attention_weights_are_a_distribution_over_cells():
    dec = make_decoder(True)
    grid = torch.randn(B, N, C)
    _, weights = dec(grid, grid.mean(1), torch.randint(0, V, (B, T)))
    assert weights.shape == (B, T, N)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, T))


def test_attention_mask_excludes_cells():
    att = AdditiveAttention(C, 32, 20)
    cache = att.precompute(torch.randn(B, N, C))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[:, :4] = False
    context, weights = att(torch.randn(B, 32), cache, mask)
    assert (weights[:, :4] == 0).all() and context.shape == (B, C)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B))


def test_show_and_tell_sees_the_image_only_through_the_initial_state():
    dec = make_decoder(False)
    grid = torch.randn(B, N, C)
    tokens = torch.randint(0, V, (B, T))
    shuffled = grid[:, torch.randperm(N)]  # same mean, other layout
    a, _ = dec(grid, grid.mean(1), tokens)
    b, _ = dec(shuffled, shuffled.mean(1), tokens)
    torch.testing.assert_close(a, b)
