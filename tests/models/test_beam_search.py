"""Beam search and sampling against greedy decoding and exhaustive search."""

import itertools
from functools import partial

import pytest
import torch

from imcap.models.attention import AdditiveAttention
from imcap.models.embeddings import LearnedEmbedding
from imcap.models.lstm import LSTMDecoder
from imcap.models.search import SearchResult, beam_search, greedy_search, sample
from tests.helpers import decoders as zoo

BOS, EOS, PAD = 1, 2, 0
C, N = 12, 4


def decoder(vocab: int = 9, seed: int = 0) -> LSTMDecoder:
    torch.manual_seed(seed)
    emb = LearnedEmbedding([str(i) for i in range(vocab)], dim=8)
    dec = LSTMDecoder(vocab, C, emb, partial(AdditiveAttention, attention_dim=8), hidden_dim=16).eval()
    with torch.no_grad():  # sharper distributions than at init, so paths differ
        dec.output.weight.mul_(8.0)
    return dec


def features(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.randn(batch, N, C, generator=torch.Generator().manual_seed(seed))
    return g, g.mean(1)


def sequence_logprob(dec, grid, pooled, seq: list[int]) -> float:
    inputs = torch.tensor([[BOS, *seq[:-1]]])
    with torch.no_grad():
        logp = dec(grid, pooled, inputs)[0].log_softmax(-1)[0]
    return float(sum(logp[t, tok] for t, tok in enumerate(seq)))


def test_beam_one_is_exactly_greedy():
    dec = decoder()
    grid, pooled = features(6)
    g = greedy_search(dec, grid, pooled, BOS, EOS, PAD, max_length=12)
    b = beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=1, max_length=12)
    assert torch.equal(g.tokens, b.tokens)
    torch.testing.assert_close(g.scores, b.scores)
    torch.testing.assert_close(g.attention, b.attention)


def test_wide_beam_finds_the_exhaustive_optimum():
    vocab, length = 5, 3
    dec = decoder(vocab)
    grid, pooled = features(3)
    result = beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=vocab ** length, max_length=length)
    for b in range(3):
        candidates = []
        words = [w for w in range(vocab) if w not in (BOS, PAD)]  # never generated
        for seq in itertools.product(words, repeat=length):
            seq = list(seq)
            if EOS in seq:
                seq = seq[: seq.index(EOS) + 1]
            if seq[0] == EOS:
                continue  # min_length=1: at least one word
            candidates.append((sequence_logprob(dec, grid[b : b + 1], pooled[b : b + 1], seq), seq))
        best_score, best_seq = max(candidates)
        got = [t for t in result.tokens[b].tolist() if t != PAD]
        assert got == best_seq
        assert float(result.scores[b]) == pytest.approx(best_score, abs=1e-4)


def test_each_image_is_decoded_independently_of_the_batch():
    dec = decoder()
    grid, pooled = features(5)
    together = beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=4, max_length=10)
    for b in range(5):
        alone = beam_search(dec, grid[b : b + 1], pooled[b : b + 1], BOS, EOS, PAD, beam_size=4, max_length=10)
        width = alone.tokens.shape[1]
        assert together.tokens[b, :width].tolist() == alone.tokens[0].tolist()
        assert (together.tokens[b, width:] == PAD).all()


def test_min_length_forbids_early_end():
    dec = decoder()
    with torch.no_grad():
        dec.output.bias[EOS] = 50.0  # the model wants to stop at once
    grid, pooled = features(4)
    result = beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=3, max_length=8, min_length=3)
    for row in result.tokens.tolist():
        assert row.index(EOS) == 3  # three words, then <eos>


def test_trigram_blocking_leaves_no_repeated_trigram():
    dec = decoder(vocab=6)
    with torch.no_grad():
        dec.output.bias[EOS] = -50.0  # never stop: repetition is then likely
    grid, pooled = features(4)
    plain = beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=3, max_length=15)
    blocked = beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=3, max_length=15, block_trigrams=True)

    def repeats(row):
        grams = [tuple(row[i : i + 3]) for i in range(len(row) - 2)]
        return len(grams) != len(set(grams))

    assert any(repeats(r) for r in plain.tokens.tolist())  # the check has something to catch
    assert not any(repeats(r) for r in blocked.tokens.tolist())


def test_length_penalty_prefers_longer_captions():
    dec = decoder(seed=3)
    grid, pooled = features(8, seed=4)
    short = beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=5, max_length=12, length_penalty=0.0)
    long = beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=5, max_length=12, length_penalty=2.0)
    length = lambda r: (r.tokens != PAD).sum(1)  # noqa: E731
    assert (length(long) >= length(short)).all()


def test_sampling_truncation_and_seeding():
    dec = decoder()
    grid, pooled = features(5)
    greedy = greedy_search(dec, grid, pooled, BOS, EOS, PAD, max_length=10)
    assert torch.equal(sample(dec, grid, pooled, BOS, EOS, PAD, 10, top_k=1).tokens, greedy.tokens)
    assert torch.equal(sample(dec, grid, pooled, BOS, EOS, PAD, 10, top_p=1e-6).tokens, greedy.tokens)
    a = sample(dec, grid, pooled, BOS, EOS, PAD, 10, generator=torch.Generator().manual_seed(0))
    b = sample(dec, grid, pooled, BOS, EOS, PAD, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens)
    hot = sample(dec, grid, pooled, BOS, EOS, PAD, 10, temperature=5.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(hot.tokens[:, :3], greedy.tokens[:, :3])


# -- the fast search against the plain one ---------------------------------------------------
@torch.no_grad()
def plain_beam_search(decoder, grid, pooled, bos_id, eos_id, pad_id, beam_size=3, max_length=20, min_length=1,
                      length_penalty=0.0, block_trigrams=False) -> SearchResult:
    """Beam search as first written: the state expanded before `init_state`, every leaf, the
    token history and the attention maps reordered every step."""
    from imcap.models.packing import map_state
    from imcap.models.search import _block_repeated_trigrams

    B, K = grid.shape[0], beam_size
    expand = torch.arange(B).repeat_interleave(K)
    state = decoder.init_state(grid.index_select(0, expand), pooled.index_select(0, expand))
    scores = torch.full((B, K), float("-inf"))
    scores[:, 0] = 0.0
    prev = torch.full((B * K,), bos_id, dtype=torch.long)
    finished = torch.zeros(B * K, dtype=torch.bool)
    lengths = torch.zeros(B * K, dtype=torch.long)
    history = torch.empty(B * K, 0, dtype=torch.long)
    maps = None
    offsets = (torch.arange(B) * K).unsqueeze(1)
    for t in range(max_length):
        logits, state, weights = decoder.step(state, prev)
        logp = torch.log_softmax(logits.float(), dim=-1)
        logp[:, [bos_id, pad_id]] = float("-inf")
        V = logp.shape[-1]
        if t < min_length:
            logp[:, eos_id] = float("-inf")
        if block_trigrams:
            _block_repeated_trigrams(logp, history)
        logp[finished] = float("-inf")
        logp[finished, pad_id] = 0.0
        scores, flat = (scores.view(B * K, 1) + logp).view(B, K * V).topk(K, dim=-1)
        rows = (offsets + flat // V).view(-1)
        token = (flat % V).view(-1)
        state = map_state(state, lambda x: x.index_select(0, rows))  # noqa: B023
        finished = finished.index_select(0, rows)
        lengths = lengths.index_select(0, rows) + (~finished).long()
        history = torch.cat([history.index_select(0, rows), token.unsqueeze(1)], dim=1)
        if weights is not None:
            step_maps = weights.index_select(0, rows).unsqueeze(1)
            maps = step_maps if maps is None else torch.cat([maps.index_select(0, rows), step_maps], 1)
        finished = finished | (token == eos_id)
        prev = token
        if bool(finished.all()):
            break
    normalised = scores / ((5.0 + lengths.view(B, K).float()) / 6.0) ** length_penalty
    best = normalised.argmax(dim=-1) + offsets.squeeze(1)
    attention = maps.index_select(0, best) if maps is not None else None
    return SearchResult(history.index_select(0, best), scores.view(-1).index_select(0, best), attention)


OPTIONS = {
    "plain": {},
    "penalty_min_length": {"length_penalty": 1.0, "min_length": 3},
    "trigrams": {"block_trigrams": True},
}


@pytest.mark.parametrize("options", OPTIONS, ids=list(OPTIONS))
@pytest.mark.parametrize("pair", zoo.PAIRS, ids=zoo.pair_id)
def test_beam_search_equals_the_plain_search_for_every_decoder(pair, options, one_thread):
    """Shared per-image state, leaves passed through unreordered and back-pointers give the
    same captions, scores and attention maps as reordering everything every step."""
    dec = zoo.make_decoder(*pair).double()  # fp64: no near-ties that rounding could break apart
    with torch.no_grad():
        dec.output.weight.mul_(4.0)  # sharper distributions: beams diverge, some end early
        dec.output.bias[EOS] += 1.5
    grid, pooled, _ = zoo.inputs(batch=4)
    grid, pooled = grid.double(), pooled.double()
    kwargs = {"beam_size": 3, "max_length": 9, **OPTIONS[options]}
    fast = beam_search(dec, grid, pooled, BOS, EOS, PAD, **kwargs)
    plain = plain_beam_search(dec, grid, pooled, BOS, EOS, PAD, **kwargs)
    assert torch.equal(fast.tokens, plain.tokens)
    torch.testing.assert_close(fast.scores, plain.scores, rtol=1e-5, atol=1e-5)
    if plain.attention is None:
        assert fast.attention is None
    else:
        torch.testing.assert_close(fast.attention, plain.attention, rtol=1e-9, atol=1e-12)
    if options == "plain" and pair == ("lstm", "additive"):
        assert (fast.tokens == EOS).any() and (fast.tokens == PAD).any()  # some beams did end early
