"""Every decoder x attention pair: shapes, incremental = teacher-forced, generic states,
overfitting a batch, checkpoint round trip, and refusal of the pairs that mean nothing."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from imcap.models.captioner import build_captioner
from imcap.models.search import map_state
from tests.models.zoo import ATTENTIONS, INVALID, PAIRS, B, N, T, V, inputs, make_decoder, pair_id

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_valid_pairs():
    assert len(PAIRS) == 18
    assert {a for d, a in PAIRS if d == "lstm"} == set(ATTENTIONS)
    assert ("topdown", "none") in INVALID and ("transformer", "none") in INVALID
    assert ("transformer", "adaptive") in INVALID and ("topdown", "adaptive") in PAIRS


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_shapes_and_weights_form_a_distribution(pair):
    dec = make_decoder(*pair)
    grid, pooled, tokens = inputs()
    logits, weights = dec(grid, pooled, tokens)
    assert logits.shape == (B, T, V)
    if pair[1] == "none":
        assert weights is None
        return
    assert weights.shape == (B, T, N) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, T))


def assert_steps_reproduce_teacher_forcing(dec) -> None:
    """`step` one token at a time gives the logits and weights of the teacher-forced forward."""
    grid, pooled, tokens = inputs()
    with torch.no_grad():
        logits, weights = dec(grid, pooled, tokens)
        state = dec.init_state(grid, pooled)
        for t in range(T):
            step_logits, state, step_weights = dec.step(state, tokens[:, t])
            torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-5, atol=1e-5)
            if weights is not None:
                torch.testing.assert_close(step_weights, weights[:, t], rtol=1e-5, atol=1e-6)
            else:
                assert step_weights is None


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_step_by_step_decoding_reproduces_teacher_forced_logits(pair):
    assert_steps_reproduce_teacher_forcing(make_decoder(*pair))


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_states_reorder_generically_along_the_batch(pair):
    """Every state leaf is a tensor with the batch first (or None), so search can reorder beams
    with index_select: reordering the state reorders the next step's logits."""
    dec = make_decoder(*pair)
    grid, pooled, tokens = inputs()
    leaves = []
    with torch.no_grad():
        state = dec.init_state(grid, pooled)
        for t in range(3):
            _, state, _ = dec.step(state, tokens[:, t])
        map_state(state, lambda x: leaves.append(x) or x)
        assert leaves and all(x.shape[0] == B for x in leaves)
        order = torch.tensor([2, 0, 1])
        logits, _, _ = dec.step(state, tokens[:, 3])
        shuffled, _, _ = dec.step(map_state(state, lambda x: x.index_select(0, order)), tokens[order, 3])
    torch.testing.assert_close(shuffled, logits[order], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_checkpoint_round_trip_gives_identical_logits(pair):
    dec = make_decoder(*pair, seed=0)
    buffer = io.BytesIO()
    torch.save(dec.state_dict(), buffer)
    other = make_decoder(*pair, seed=1)
    grid, pooled, tokens = inputs()
    assert not torch.equal(other(grid, pooled, tokens)[0], dec(grid, pooled, tokens)[0])
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other(grid, pooled, tokens)[0], dec(grid, pooled, tokens)[0])


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_each_pair_overfits_a_small_batch(pair):
    dec = make_decoder(*pair).train()
    grid, pooled, tokens = inputs(seed=2, batch=4, length=9)
    tokens[:, 0] = Vocabulary.bos_id  # the same start: only the image tells the captions apart
    x, y = tokens[:, :-1], tokens[:, 1:]  # otherwise four different random sequences
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3 if pair[0] == "transformer" else 1e-2)
    first = None
    for _ in range(200):
        logits, _ = dec(grid, pooled, x)
        loss = F.cross_entropy(logits.transpose(1, 2), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dec.eval()
    with torch.no_grad():
        logits, _ = dec(grid, pooled, x)
    assert first > 3.0  # about ln(30) at the start
    assert F.cross_entropy(logits.transpose(1, 2), y).item() < 0.1
    assert torch.equal(logits.argmax(-1), y)  # the first word included, which only the image gives


def test_lstm_with_additive_attention_keeps_its_parameter_names():
    """Checkpoints of the Show-Attend-Tell decoder trained before the zoo still load."""
    names = {k.rsplit(".", 1)[0] for k in make_decoder("lstm", "additive").state_dict()}
    assert names == {"embedding", "init_h", "init_c", "input_proj", "hidden_proj", "attention.key_proj",
                     "attention.query_proj", "attention.score", "context_proj", "gate", "output"}


@pytest.mark.parametrize("decoder", ["lstm", "topdown"])
def test_adaptive_attention_exposes_beta(decoder):
    dec = make_decoder(decoder, "adaptive")
    grid, pooled, tokens = inputs()
    with torch.no_grad():
        dec(grid, pooled, tokens)
        beta = dec.last_beta
        assert beta.shape == (B, T) and ((beta > 0) & (beta < 1)).all()
        state = dec.init_state(grid, pooled)
        for t in range(T):
            _, state, _ = dec.step(state, tokens[:, t])
            torch.testing.assert_close(state.beta, beta[:, t], rtol=1e-5, atol=1e-6)
    plain = make_decoder(decoder, "additive")
    plain(grid, pooled, tokens)
    assert plain.last_beta is None


def test_adaptive_beta_moves_the_context_towards_the_sentinel():
    attention = ATTENTIONS["adaptive"](key_dim=24, query_dim=8)
    cache = attention.precompute(torch.randn(B, N, 24))
    query, sentinel = torch.randn(B, 8), torch.randn(B, 8)
    context, weights, beta = attention(query, cache, sentinel=sentinel)
    spatial = torch.bmm(weights.unsqueeze(1), cache.values).squeeze(1)  # (B, H)
    torch.testing.assert_close(context, beta.unsqueeze(1) * sentinel + (1 - beta.unsqueeze(1)) * spatial)
    with torch.no_grad():
        attention.score.bias.zero_()
        attention.sentinel_proj.weight.fill_(10.0)  # the sentinel's score dwarfs every cell's
        attention.score.weight.fill_(1.0)
    _, _, beta = attention(query, cache, sentinel=sentinel.abs() + 1)
    assert (beta > 0.99).all()


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


def _arch(decoder: str, attention: str) -> dict:
    att = {"_target_": None} if attention == "none" else {
        "_target_": f"imcap.models.attention.{ATTENTIONS[attention].func.__name__}", **ATTENTIONS[attention].keywords}
    targets = {"lstm": "imcap.models.decoders.LSTMDecoder", "topdown": "imcap.models.topdown.TopDownDecoder",
               "transformer": "imcap.models.transformer.TransformerDecoder"}
    return {"encoder": {"_target_": "imcap.models.encoders.TorchvisionEncoder", "name": "resnet18", "weights": None},
            "decoder": {"_target_": targets[decoder], "hidden_dim": 32},
            "attention": att,
            "embedding": {"_target_": "imcap.models.embeddings.LearnedEmbedding", "dim": 16}}


@pytest.mark.parametrize("pair", INVALID, ids=pair_id)
def test_pairs_without_meaning_are_refused_with_the_valid_ones_listed(pair):
    vocab = Vocabulary.build([["a", "red", "circle"]])
    with pytest.raises(ImcapError) as info:
        build_captioner(_arch(*pair), vocab, 64, pretrained=False)
    message = str(info.value)
    assert f"model/decoder={pair[0]} does not work with model/attention={pair[1]}" in message
    assert "lstm: none, additive" in message and "transformer: additive, dot, general, scaled_dot, multihead" in message
    assert "\n" not in message


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_valid_pairs_build_from_configs(pair):
    vocab = Vocabulary.build([["a", "red", "circle"]])
    captioner = build_captioner(_arch(*pair), vocab, 64, pretrained=False)
    grid = torch.randn(2, 4, 512)
    logits, _ = captioner(grid, grid.mean(1), torch.zeros(2, 3, dtype=torch.long))
    assert logits.shape == (2, 3, len(vocab))


def test_transformer_with_learned_positions_decodes_incrementally():
    assert_steps_reproduce_teacher_forcing(make_decoder("transformer", "additive", positions="learned", max_length=T))
