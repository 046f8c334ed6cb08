"""Every registered attention variant alone: shapes, distributions, masks, batched queries,
projections; and how an attention option is named."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from imcap import registry
from imcap.errors import ImcapError
from imcap.models import attention as att
from imcap.models.captioner import load_state
from tests.helpers.decoders import B, C, H, N, attention, make_decoder

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = registry.names("attention")
K, Q = 24, 8  # key (feature) dim, query (hidden) dim
CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "attention"


def attend(module, query, cache, mask=None):
    if module.needs_sentinel:
        context, weights, _ = module(query, cache, mask, sentinel=torch.randn(*query.shape[:-1], Q))
        return context, weights
    return module(query, cache, mask)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_distribution(name):
    torch.manual_seed(0)
    module = attention(name)(key_dim=K, query_dim=Q)
    assert att.attention_name(attention(name)) == att.attention_name(module) == name
    cache = module.precompute(torch.randn(B, N, K))
    context, weights = attend(module, torch.randn(B, Q), cache)
    assert context.shape == (B, module.context_dim) and weights.shape == (B, N)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(B))


@pytest.mark.parametrize("name", NAMES)
def test_masked_cells_get_no_weight(name):
    torch.manual_seed(0)
    module = attention(name)(key_dim=K, query_dim=Q)
    cache = module.precompute(torch.randn(B, N, K))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :4] = False
    mask[1, 5:] = False
    _, weights = attend(module, torch.randn(B, Q), cache, mask)
    assert (weights[~mask] == 0).all() and (weights[mask] > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(B))


@pytest.mark.parametrize("name", NAMES)
def test_a_block_of_queries_equals_one_query_at_a_time(name):
    """The transformer asks with (B, T, H) queries, the recurrent decoders with (B, H)."""
    torch.manual_seed(0)
    module = attention(name)(key_dim=K, query_dim=Q)
    cache = module.precompute(torch.randn(B, N, K))
    queries = torch.randn(B, 5, Q)
    extra = {}
    if module.needs_sentinel:
        extra = {"sentinel": torch.randn(B, 5, Q)}
    block = module(queries, cache, **extra)
    for t in range(5):
        one = module(queries[:, t], cache, **{k: v[:, t] for k, v in extra.items()})
        for a, b in zip(block, one):
            torch.testing.assert_close(a[:, t], b, rtol=1e-5, atol=1e-6)


def test_dot_has_no_score_parameters_and_averages_its_memory():
    same = att.DotAttention(key_dim=Q, query_dim=Q)
    assert not list(same.parameters())
    keys, query = torch.randn(B, N, Q), torch.randn(B, Q)
    context, weights = same(query, same.precompute(keys))
    torch.testing.assert_close(weights, torch.softmax(torch.einsum("bnc,bc->bn", keys, query), -1))
    torch.testing.assert_close(context, torch.einsum("bn,bnc->bc", weights, keys))
    # other widths: the features are brought to the decoder's width once; the score stays q . m_i
    # and the context averages that same memory
    other = att.DotAttention(key_dim=K, query_dim=Q)
    assert [p.shape for p in other.parameters()] == [(Q, K)] and other.context_dim == Q
    grid = torch.randn(B, N, K)
    memory = other.memory_proj(grid)
    context, weights = other(query, other.precompute(grid))
    torch.testing.assert_close(weights, torch.softmax(torch.einsum("bnc,bc->bn", memory, query), -1))
    torch.testing.assert_close(context, torch.einsum("bn,bnc->bc", weights, memory))


def test_dot_refuses_an_attention_dim_in_one_line_and_builds_from_its_yaml():
    """dot has no width of its own: a number would be silently ignored, so it is refused."""
    for widths in [(Q, Q), (K, Q)]:
        with pytest.raises(ImcapError) as caught:
            att.DotAttention(*widths, attention_dim=16)
        assert str(caught.value) == (
            "model.attention.attention_dim=16 means nothing to model/attention=dot (Luong's dot score has no "
            "parameters, so no width of its own): leave it unset, or use model/attention=general for a learnt "
            "W_a of that rank")
    assert default_attention("dot", K, Q).context_dim == Q  # its YAML leaves attention_dim unset
    assert att.GeneralAttention(K, Q, attention_dim=4).key_proj.weight.shape == (4, Q)  # general takes one


@pytest.mark.parametrize("name", ["dot", "general"])
def test_a_dot_or_general_checkpoint_from_before_fails_with_one_line(name):
    """Before, both projected only the keys (`key_proj`, K -> Q) and averaged the raw features."""
    old = {"key_proj.weight": torch.randn(Q, K)}
    with pytest.raises(ImcapError) as caught:
        registry.get("attention", name)(key_dim=K, query_dim=Q).load_state_dict(old)
    message = str(caught.value)
    assert "\n" not in message and f"holds the earlier model/attention={name}," in message
    assert message.endswith(f"retrain it with model/attention={name}")


@pytest.mark.parametrize("name", ["dot", "general"])
def test_a_checkpoint_of_the_earlier_dot_or_general_is_refused_by_name(name):
    """What eval, caption, resume and from_checkpoint load through (load_state): the earlier layout
    of an LSTM decoder with dot or general (W_a on the keys, a context of feature width)."""
    decoder = make_decoder("lstm", name)
    earlier = {k: v for k, v in decoder.state_dict().items() if not k.startswith("attention.")}
    earlier["attention.key_proj.weight"] = torch.zeros(H, C)
    earlier.update({"context_proj.weight": torch.zeros(4 * H, C), "gate.weight": torch.zeros(C, H),
                    "gate.bias": torch.zeros(C)})
    with pytest.raises(ImcapError) as caught:
        load_state(decoder, earlier, "old.ckpt")
    assert str(caught.value) == (f"checkpoint old.ckpt holds the earlier model/attention={name}, which projected "
                                 f"only the keys and averaged the raw features; it cannot load as today's {name} "
                                 f"(a memory of the decoder's width): retrain it with model/attention={name}")


def test_dot_and_general_checkpoints_of_equal_widths_still_load():
    """With equal widths the memory is the features: dot had no parameters, general only W_a."""
    general = att.GeneralAttention(key_dim=Q, query_dim=Q)
    general.load_state_dict({"key_proj.weight": torch.randn(Q, Q)})
    att.DotAttention(key_dim=Q, query_dim=Q).load_state_dict({})


def test_general_learns_w_a_even_when_the_dims_agree():
    general = att.GeneralAttention(key_dim=Q, query_dim=Q)
    assert general.key_proj.weight.shape == (Q, Q)


def test_scaled_dot_divides_by_the_root_of_its_dim():
    module = att.ScaledDotAttention(key_dim=K, query_dim=Q, attention_dim=16)
    grid, query = torch.randn(B, N, K), torch.randn(B, Q)
    cache = module.precompute(grid)
    raw = torch.einsum("bna,ba->bn", module.key_proj(grid), module.query_proj(query))
    torch.testing.assert_close(module(query, cache)[1], torch.softmax(raw / 4.0, -1))


def test_multihead_reports_the_head_average():
    torch.manual_seed(0)
    module = att.MultiHeadAttention(key_dim=K, query_dim=Q, attention_dim=16, heads=4)
    grid, query = torch.randn(B, N, K), torch.randn(B, Q)
    context, weights = module(query, module.precompute(grid))
    q = module.query_proj(query).view(B, 4, 1, 4)
    k = module.key_proj(grid).view(B, N, 4, 4).transpose(1, 2)
    per_head = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1).squeeze(2)  # (B, heads, N)
    torch.testing.assert_close(weights, per_head.mean(1))
    v = module.value_proj(grid).view(B, N, 4, 4).transpose(1, 2)
    torch.testing.assert_close(context, (per_head.unsqueeze(2) @ v).squeeze(2).flatten(1))
    assert module.context_dim == 16 and context.shape == (B, 16)
    with pytest.raises(ImcapError, match="model.attention.heads=3 must divide model.attention.attention_dim=16"):
        att.MultiHeadAttention(key_dim=K, query_dim=Q, attention_dim=16, heads=3)


@pytest.mark.parametrize("name", ["additive", "dot", "general", "scaled_dot", "multihead", "adaptive"])
def test_keys_are_projected_once_per_sequence(name):
    module = attention(name)(key_dim=K, query_dim=Q)
    calls = []
    # dot projects its memory (its keys and values at once)
    (module.memory_proj if name == "dot" else module.key_proj).register_forward_hook(lambda m, i, o: calls.append(1))
    cache = module.precompute(torch.randn(B, N, K))
    for _ in range(4):
        attend(module, torch.randn(B, Q), cache)
    assert len(calls) == 1


def test_attention_name_of_none_and_of_a_class_of_ones_own():
    class Mine(att.AdditiveAttention):  # a subclass does not inherit its parent's name
        pass

    assert att.attention_name(None) == att.NO_ATTENTION == "none" and att.attention_name(Mine) is None


def test_adaptive_beta_moves_the_context_towards_the_sentinel():
    module = attention("adaptive")(key_dim=24, query_dim=8, attention_dim=512)
    cache = module.precompute(torch.randn(B, N, 24))
    query, sentinel = torch.randn(B, 8), torch.randn(B, 8)
    context, weights, beta = module(query, cache, sentinel=sentinel)
    spatial = torch.bmm(weights.unsqueeze(1), cache.values).squeeze(1)  # (B, H)
    torch.testing.assert_close(context, beta.unsqueeze(1) * sentinel + (1 - beta.unsqueeze(1)) * spatial)
    with torch.no_grad():
        module.score.bias.zero_()
        module.sentinel_proj.weight.fill_(10.0)  # the sentinel's score dwarfs every cell's
        module.score.weight.fill_(1.0)
    _, _, beta = module(query, cache, sentinel=sentinel.abs() + 1)
    assert (beta > 0.99).all()


def default_attention(name: str, key_dim: int, query_dim: int) -> att.Attention:
    """The variant as conf/model/attention/<name>.yaml builds it for a decoder of `query_dim`."""
    cfg = OmegaConf.create({"model": {"decoder": {"hidden_dim": query_dim},
                                      "attention": OmegaConf.load(CONF / f"{name}.yaml")}})
    torch.manual_seed(0)
    return hydra.utils.instantiate(cfg.model.attention, key_dim=key_dim, query_dim=query_dim)


BUILTIN = [n for n in NAMES if registry.get("attention", n).__module__ == att.__name__]
# (feature channels, hidden_dim): the real-photo default (EfficientNet-Lite0, conf/model/decoder/lstm.yaml)
# and equal widths (the transformer's cross-attention)
WIDTHS = [(1280, OmegaConf.load(CONF.parent / "decoder" / "lstm.yaml").hidden_dim), (64, 64)]


@pytest.mark.parametrize("widths", WIDTHS, ids=lambda w: f"{w[0]}to{w[1]}")
def test_no_two_variants_compute_the_same_scores_under_their_defaults(widths):
    """Each option is its own model: from its YAML defaults, with the same seed and inputs, no two
    registered variants give the same attention weights (softmax of their scores)."""
    key_dim, query_dim = widths
    g = torch.Generator().manual_seed(1)
    grid, query = torch.randn(B, N, key_dim, generator=g), torch.randn(B, query_dim, generator=g)
    sentinel = torch.randn(B, query_dim, generator=g)
    weights = {}
    for name in BUILTIN:
        module = default_attention(name, key_dim, query_dim)
        extra = {"sentinel": sentinel} if module.needs_sentinel else {}
        weights[name] = module(query, module.precompute(grid), **extra)[1]
    same = [(a, b) for i, a in enumerate(BUILTIN) for b in BUILTIN[i + 1:]
            if torch.allclose(weights[a], weights[b], rtol=1e-4, atol=1e-6)]
    assert not same, f"these attention options compute the same scores: {same}"
