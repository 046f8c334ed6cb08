"""Search (imcap/models/search.py): greedy and sampling (one function), beam search against
greedy and exhaustive search, the plain implementations they replaced, and the decoding rules
(no <unk>, no caption ending on a function word) on every decoder with every method."""

import itertools
from functools import partial

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from imcap import registry
from imcap.config_checks import check_stored_config
from imcap.data.vocab import SPECIALS, Vocabulary
from imcap.errors import ImcapError
from imcap.models.attention import AdditiveAttention
from imcap.models.embeddings import LearnedEmbedding
from imcap.models.lstm import LSTMDecoder
from imcap.models.search import (
    Decoding,
    SearchResult,
    beam_search,
    decoding_rules,
    generate,
    greedy_search,
    sample,
)
from tests.helpers import decoders

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a shared CPU

BOS, EOS, PAD, UNK = 1, 2, 0, 3
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


# -- greedy ---------------------------------------------------------------------------------
def test_greedy_picks_the_argmax_of_the_teacher_forced_logits():
    dec = decoders.make_decoder("lstm", "additive")
    grid, pooled, _ = decoders.inputs(batch=4)
    result = greedy_search(dec, grid, pooled, BOS, EOS, PAD, max_length=6)
    inputs = torch.cat([torch.full((4, 1), BOS), result.tokens[:, :-1]], dim=1)
    with torch.no_grad():
        logits, _ = dec(grid, pooled, inputs)
    logits[..., [BOS, PAD]] = float("-inf")  # search never generates them
    logits[:, 0, EOS] = float("-inf")  # nor <eos> before min_length=1 word
    for b in range(4):
        ids = result.tokens[b].tolist()
        n = ids.index(EOS) + 1 if EOS in ids else len(ids)
        assert ids[:n] == logits[b, :n].argmax(-1).tolist()
        assert all(i == PAD for i in ids[n:])
    assert result.attention.shape == (4, result.tokens.shape[1], decoders.N)


def test_greedy_stops_once_every_sequence_has_ended():
    dec = decoders.make_decoder("lstm", "none")
    with torch.no_grad():
        dec.output.bias.fill_(-100.0)
        dec.output.bias[EOS] = 100.0  # every step prefers <eos>
    grid, pooled, _ = decoders.inputs()
    result = greedy_search(dec, grid, pooled, BOS, EOS, PAD, max_length=10, min_length=0)
    assert result.tokens.tolist() == [[EOS]] * 3
    assert result.attention is None
    at_least_one_word = greedy_search(dec, grid, pooled, BOS, EOS, PAD, max_length=10)  # min_length=1
    assert at_least_one_word.tokens[:, 1].tolist() == [EOS] * 3 and (at_least_one_word.tokens[:, 0] != EOS).all()


# -- greedy and sampling: one function, the same results as the two it replaced --------------
@torch.no_grad()
def plain_greedy_search(decoder, grid, pooled, bos_id, eos_id, pad_id, max_length=20) -> SearchResult:
    """Greedy search as first written, on its own (no rules beyond never <bos>/<pad>)."""
    batch = grid.shape[0]
    state = decoder.init_state(grid, pooled)
    prev = torch.full((batch,), bos_id, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool)
    scores = torch.zeros(batch)
    tokens, maps = [], []
    for _ in range(max_length):
        logits, state, weights = decoder.step(state, prev)
        logp = torch.log_softmax(logits.float(), dim=-1)
        logp[:, bos_id] = float("-inf")
        logp[:, pad_id] = float("-inf")
        best_logp, best = logp.max(dim=-1)
        best = best.masked_fill(finished, pad_id)
        scores += best_logp.masked_fill(finished, 0.0)
        tokens.append(best)
        if weights is not None:
            maps.append(weights)
        finished |= best == eos_id
        prev = best
        if bool(finished.all()):
            break
    return SearchResult(torch.stack(tokens, dim=1), scores, torch.stack(maps, dim=1) if maps else None)


@torch.no_grad()
def plain_sample(decoder, grid, pooled, bos_id, eos_id, pad_id, max_length, temperature, top_k, top_p,
                 generator) -> SearchResult:
    """Sampling as first written, on its own."""
    batch = grid.shape[0]
    state = decoder.init_state(grid, pooled)
    prev = torch.full((batch,), bos_id, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool)
    scores = torch.zeros(batch)
    tokens = []
    for _ in range(max_length):
        logits, state, _ = decoder.step(state, prev)
        logits = logits.float() / max(temperature, 1e-6)
        logits[:, [bos_id, pad_id]] = float("-inf")
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            drop = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1) > top_p
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        logp = torch.log_softmax(logits, dim=-1)
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1).masked_fill(finished, pad_id)
        scores += logp.gather(1, token.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0)
        tokens.append(token)
        finished |= token == eos_id
        prev = token
        if bool(finished.all()):
            break
    return SearchResult(torch.stack(tokens, dim=1), scores, None)


def sharp(pair: tuple[str, str]) -> nn.Module:
    """A tiny decoder with sharper distributions, where some captions end early."""
    dec = decoders.make_decoder(*pair)
    with torch.no_grad():
        dec.output.weight.mul_(4.0)
        dec.output.bias[EOS] += 1.5
    return dec


@pytest.mark.parametrize("pair", decoders.PAIRS, ids=decoders.pair_id)
def test_greedy_is_bit_identical_to_the_greedy_search_it_replaced(pair):
    dec = sharp(pair)
    grid, pooled, _ = decoders.inputs(batch=5)
    new = greedy_search(dec, grid, pooled, BOS, EOS, PAD, max_length=9, min_length=0)  # no rules: as before
    old = plain_greedy_search(dec, grid, pooled, BOS, EOS, PAD, max_length=9)
    assert torch.equal(new.tokens, old.tokens) and torch.equal(new.scores, old.scores)
    assert (old.attention is None) == (new.attention is None)
    assert old.attention is None or torch.equal(new.attention, old.attention)
    assert torch.equal(sample(dec, grid, pooled, BOS, EOS, PAD, 9, temperature=0.0, min_length=0).tokens, old.tokens)


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_k": 5}, {"top_p": 0.8}], ids=["plain", "top_k", "top_p"])
def test_sampling_draws_what_the_sampling_it_replaced_drew(options):
    dec = sharp(("lstm", "additive"))
    grid, pooled, _ = decoders.inputs(batch=6)
    kwargs = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **options}
    new = sample(dec, grid, pooled, BOS, EOS, PAD, 9, generator=torch.Generator().manual_seed(3), min_length=0, **kwargs)
    old = plain_sample(dec, grid, pooled, BOS, EOS, PAD, 9, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(new.tokens, old.tokens) and torch.equal(new.scores, old.scores)


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


def test_all_hypotheses_are_the_final_beam_best_first():
    dec = decoder()
    grid, pooled = features(3)
    best = beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=4, max_length=8)
    every = beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=4, max_length=8, all_hypotheses=True)
    assert every.tokens.shape[:2] == (3, 4) and every.attention.shape[:3] == every.tokens.shape
    assert torch.equal(every.tokens[:, 0], best.tokens) and torch.equal(every.scores[:, 0], best.scores)
    assert (every.scores[:, :-1] >= every.scores[:, 1:]).all()
    for b in range(3):
        rows = [[t for t in row if t != PAD] for row in every.tokens[b].tolist()]
        assert len({tuple(r) for r in rows}) == 4  # four different captions
        for row, score in zip(rows, every.scores[b].tolist()):
            assert score == pytest.approx(sequence_logprob(dec, grid[b : b + 1], pooled[b : b + 1], row), abs=1e-4)


def test_reranking_chooses_among_the_beams_by_the_neighbours_captions():
    from imcap.models.rerank import NeighbourMemory

    dec, vocab = decoder(), Vocabulary([*SPECIALS, *(str(i) for i in range(4, 9))])
    grid, pooled = features(3)
    rerank = Decoding(method="beam", max_length=8, bad_endings=[], rerank_neighbours=1, rerank_beams=4,
                      rerank_logprob_weight=0.0, block_trigrams=False)
    every = beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=4, max_length=8, all_hypotheses=True,
                        **decoding_rules(vocab, rerank))
    with pytest.raises(ImcapError, match="decoding.rerank_neighbours=0"):
        generate(dec, grid, pooled, vocab, rerank)  # no memory to vote with
    for k in range(4):  # every image's only neighbour says what its k-th hypothesis says
        said = [[[t for t in row.tolist() if t not in (PAD, EOS)]] for row in every.tokens[:, k]]
        memory = NeighbourMemory.build(pooled, said)
        chosen = generate(dec, grid, pooled, vocab, rerank, memory)
        assert torch.equal(chosen.tokens[:, : every.tokens.shape[2]], every.tokens[:, k])
        assert torch.equal(chosen.scores, every.scores[:, k])
        assert torch.equal(chosen.attention, every.attention[:, k])


def test_min_length_forbids_early_end():
    dec = decoder()
    with torch.no_grad():
        dec.output.bias[EOS] = 50.0  # the model wants to stop at once
    grid, pooled = features(4)
    result = beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=3, max_length=8, min_length=3)
    for row in result.tokens.tolist():
        assert row.index(EOS) == 3  # three words, then <eos>


@pytest.mark.parametrize("search,vocab", [(partial(beam_search, beam_size=3), 6), (greedy_search, 9)],
                         ids=["beam", "greedy"])
def test_trigram_blocking_leaves_no_repeated_trigram(search, vocab):
    dec = decoder(vocab=vocab)
    with torch.no_grad():
        dec.output.bias[EOS] = -50.0  # never stop: repetition is then likely
    grid, pooled = features(4)
    plain = search(dec, grid, pooled, BOS, EOS, PAD, max_length=15)
    blocked = search(dec, grid, pooled, BOS, EOS, PAD, max_length=15, block_trigrams=True)

    def repeats(row):
        grams = [tuple(row[i : i + 3]) for i in range(len(row) - 2)]
        return len(grams) != len(set(grams))

    assert any(repeats(r) for r in plain.tokens.tolist())  # the check has something to catch
    assert not any(repeats(r) for r in blocked.tokens.tolist())
    assert torch.isfinite(blocked.scores).all()


def test_greedy_trigram_blocking_repeats_rather_than_break_when_nothing_else_is_left():
    """Two words and no end (min_length = max_length): after a few steps every continuation
    repeats a trigram. The caption then repeats one (a finite score, real words) instead of
    emitting <pad>."""
    dec = decoder(vocab=6)
    grid, pooled = features(4)
    result = greedy_search(dec, grid, pooled, BOS, EOS, PAD, max_length=15, min_length=15, never=(UNK,),
                           block_trigrams=True)
    assert torch.isfinite(result.scores).all()
    assert set(result.tokens.unique().tolist()) <= {4, 5}


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
                      length_penalty=0.0, block_trigrams=False, *, never=(), bad_endings=(), all_hypotheses=False,
                      check_every=None) -> SearchResult:
    """Beam search as first written: the state expanded before `init_state`, every leaf, the
    token history and the attention maps reordered every step, one topk over each image's K*V
    continuations; with the decoding rules (`never`, `bad_endings`) written out plainly."""
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
        logp[:, [bos_id, pad_id, *never]] = float("-inf")
        V = logp.shape[-1]
        if t < min_length:
            logp[:, eos_id] = float("-inf")
        if bad_endings:
            logp[torch.isin(prev, torch.tensor(list(bad_endings))), eos_id] = float("-inf")  # no end after "a"
            if t == max_length - 1:
                logp[:, list(bad_endings)] = float("-inf")
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
    if all_hypotheses:
        best = (normalised.argsort(dim=-1, descending=True) + offsets).view(-1)
        attention = maps.index_select(0, best).view(B, K, *maps.shape[1:]) if maps is not None else None
        return SearchResult(history.index_select(0, best).view(B, K, -1), scores.view(-1).index_select(0, best).view(B, K),
                            attention)
    best = normalised.argmax(dim=-1) + offsets.squeeze(1)
    attention = maps.index_select(0, best) if maps is not None else None
    return SearchResult(history.index_select(0, best), scores.view(-1).index_select(0, best), attention)


OPTIONS = {
    "plain": {},
    "penalty_min_length": {"length_penalty": 1.0, "min_length": 3},
    "trigrams": {"block_trigrams": True},
    "rules_all_hypotheses": {"never": (UNK,), "bad_endings": (4, 5), "all_hypotheses": True},
}


@pytest.mark.parametrize("options", OPTIONS, ids=list(OPTIONS))
@pytest.mark.parametrize("pair", decoders.PAIRS, ids=decoders.pair_id)
def test_beam_search_equals_the_plain_search_for_every_decoder(pair, options):
    """Shared per-image state, leaves passed through unreordered and back-pointers give the
    same captions, scores and attention maps as reordering everything every step."""
    dec = decoders.make_decoder(*pair).double()  # fp64: no near-ties that rounding could break apart
    with torch.no_grad():
        dec.output.weight.mul_(4.0)  # sharper distributions: beams diverge, some end early
        dec.output.bias[EOS] += 0.5  # images end at different steps (tests/helpers/decoders)
    grid, pooled, _ = decoders.inputs(batch=4)
    grid, pooled = grid.double(), pooled.double()
    kwargs = {"beam_size": 3, "max_length": 9, **OPTIONS[options]}
    fast = beam_search(dec, grid, pooled, BOS, EOS, PAD, **kwargs)
    plain = plain_beam_search(dec, grid, pooled, BOS, EOS, PAD, **kwargs)
    assert torch.equal(fast.tokens, plain.tokens)
    torch.testing.assert_close(fast.scores, plain.scores, rtol=1e-5, atol=1e-5)
    if plain.attention is None:
        assert fast.attention is None
    else:  # where a word or <eos> was written: an image whose captions have all ended leaves the
        # batch on a CPU, so its later steps (only <pad>) have no attention, not that of reading <pad>
        written = (plain.tokens != PAD).unsqueeze(-1).expand_as(plain.attention)
        torch.testing.assert_close(fast.attention[written], plain.attention[written], rtol=1e-9, atol=1e-12)
    if options == "plain" and pair == ("lstm", "additive"):
        assert (fast.tokens == EOS).any() and (fast.tokens == PAD).any()  # some beams did end early


# -- no read back from the device inside a step (GPU path) --------------------------------------
READ_BACKS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"}


class ReadBacks(TorchFunctionMode):
    """Counts the tensor calls that make a host wait for a GPU (what they return is read on
    the host), and `to` calls that leave the tensor's device for the CPU."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_cpu = name == "to" and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values()))
        if name in READ_BACKS or to_cpu:
            self.calls.append(name)
        return func(*args, **kwargs)


def _search(method: str, dec: nn.Module, check_every: int | None, **options) -> SearchResult:
    grid, pooled, _ = decoders.inputs(batch=4)
    grid, pooled = grid.double(), pooled.double()
    if method == "beam":
        return beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=3, max_length=12, check_every=check_every,
                           **options)
    temperature = 1.0 if method == "sample" else 0.0
    return sample(dec, grid, pooled, BOS, EOS, PAD, 12, temperature=temperature, check_every=check_every,
                  generator=torch.Generator().manual_seed(3), **options)


class EndsSooner(nn.Module):
    """A real decoder whose <eos> grows likelier with every step: captions end at different
    steps, all well before max_length."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.t = inner, 0
        if hasattr(inner, "expand_state"):
            self.expand_state = inner.expand_state

    def init_state(self, grid: torch.Tensor, pooled: torch.Tensor):
        self.t = 0
        return self.inner.init_state(grid, pooled)

    def step(self, state, prev: torch.Tensor):
        logits, state, weights = self.inner.step(state, prev)
        logits = logits.clone()
        logits[:, EOS] += 1.5 * self.t
        self.t += 1
        return logits, state, weights


def _ending_decoder(pair: tuple[str, str]) -> nn.Module:
    dec = decoders.make_decoder(*pair).double()
    with torch.no_grad():  # sharper distributions: beams diverge
        dec.output.weight.mul_(4.0)
    return EndsSooner(dec)


class RowCounter(nn.Module):
    """A decoder that records how many rows each step ran on."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.rows = inner, []
        if hasattr(inner, "expand_state"):
            self.expand_state = inner.expand_state

    def init_state(self, grid: torch.Tensor, pooled: torch.Tensor):
        return self.inner.init_state(grid, pooled)

    def step(self, state, prev: torch.Tensor):
        self.rows.append(prev.shape[0])
        return self.inner.step(state, prev)


def test_an_image_whose_hypotheses_have_all_ended_leaves_the_batch_on_a_cpu():
    """Later steps run on the other images' hypotheses only, with the captions, scores and
    attention (where written) of keeping every image to the end."""
    dec = decoders.make_decoder("lstm", "additive").double()  # the default's kernel: per-image leaves
    with torch.no_grad():
        dec.output.weight.mul_(4.0)  # sharper distributions: beams diverge, images end at different steps
        dec.output.bias[EOS] += 0.5  # images end at different steps (tests/helpers/decoders)
    grid, pooled, _ = decoders.inputs(batch=4)
    grid, pooled = grid.double(), pooled.double()
    counted = RowCounter(dec)
    found = beam_search(counted, grid, pooled, BOS, EOS, PAD, beam_size=3, max_length=9)
    assert counted.rows[1] == 4 * 3 and min(counted.rows[1:]) < 4 * 3  # fewer rows once images ended
    assert counted.rows[1:] == sorted(counted.rows[1:], reverse=True)
    whole = beam_search(dec, grid, pooled, BOS, EOS, PAD, beam_size=3, max_length=9, check_every=1)
    assert torch.equal(found.tokens, whole.tokens) and torch.equal(found.scores, whole.scores)
    if whole.attention is not None:
        written = (whole.tokens != PAD).unsqueeze(-1).expand_as(whole.attention)
        torch.testing.assert_close(found.attention[written], whole.attention[written], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method,options", [("beam", {}), ("beam", {"block_trigrams": True, "length_penalty": 1.0}),
                                            ("greedy", {}), ("sample", {})], ids=["beam", "beam-trigrams", "greedy",
                                                                                   "sample"])
@pytest.mark.parametrize("pair", decoders.PAIRS, ids=decoders.pair_id)
def test_checking_for_the_end_less_often_gives_the_same_result(pair, method, options):
    """check_every=4 (an accelerator's default is `CHECK_EVERY`) or 0 (never: max_length
    steps) give exactly the captions, scores and attention of checking at every step."""
    dec = _ending_decoder(pair)
    want = _search(method, dec, 1, **options)
    assert want.tokens.shape[1] < 12  # it did stop early
    for every in (4, 0):
        got = _search(method, dec, every, **options)
        assert torch.equal(got.tokens, want.tokens), every
        assert torch.equal(got.scores, want.scores), every
        if want.attention is None:
            assert got.attention is None
        else:
            assert torch.equal(got.attention, want.attention), every


@pytest.mark.parametrize("method", ["beam", "sample"])
@pytest.mark.parametrize("pair", [("lstm", "additive"), ("lstm", "adaptive"), ("topdown", "multihead"),
                                  ("transformer", "multihead")], ids=decoders.pair_id)
def test_search_reads_the_device_back_only_to_check_for_the_end(pair, method):
    """Beam search and sampling (SCST) never wait for the device inside a step: with
    check_every=4 over 12 steps, at most 3 checks and the final read of the step count;
    with 0, that final read only. A `.item()` or a boolean index in a step fails this."""
    dec = _ending_decoder(pair)
    for every, most in ((0, 1), (4, 12 // 4 + 1)):
        with ReadBacks() as reads:
            _search(method, dec, every, block_trigrams=True) if method == "beam" else _search(method, dec, every)
        assert 1 <= len(reads.calls) <= most, (every, reads.calls)


# -- decoding rules: no <unk>, no caption that ends on a function word ------------------------
WORDS = ["a", "the", "dog", "runs", "on", "grass", "red", "ball", "of", "with"]
VOCAB = Vocabulary([*SPECIALS, *WORDS, *(f"w{i}" for i in range(decoders.V - len(SPECIALS) - len(WORDS)))])
A, DOG = VOCAB.stoi["a"], VOCAB.stoi["dog"]
BAD = {VOCAB.stoi[w] for w in ("a", "the", "on", "of", "with")}  # those of the default list in VOCAB


class Tilted(nn.Module):
    """A real decoder whose logits favour <unk> most, then "a"; after "a", <eos>, then "dog";
    after any other word, <eos>. Unconstrained it writes "<unk> <eos>"; without <unk>,
    "a <eos>"; with the rules, "a dog <eos>"."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        if hasattr(inner, "expand_state"):
            self.expand_state = inner.expand_state

    def init_state(self, grid: torch.Tensor, pooled: torch.Tensor):
        return self.inner.init_state(grid, pooled)

    def step(self, state, prev: torch.Tensor):
        logits, state, weights = self.inner.step(state, prev)
        logits = logits.clone()
        logits[:, UNK] += 40.0
        logits[:, A] += 20.0
        after_a = prev == A
        logits[after_a, A] -= 100.0
        logits[after_a, DOG] += 30.0
        logits[prev != BOS, EOS] += 60.0
        return logits, state, weights


def first_pair(decoder_name: str) -> tuple[str, str]:
    return next(p for p in decoders.PAIRS if p[0] == decoder_name)


def decode_with(method: str, dec: nn.Module, decoding: Decoding) -> SearchResult:
    grid, pooled, _ = decoders.inputs(batch=4)
    if method == "sample":
        return sample(dec, grid, pooled, VOCAB.bos_id, VOCAB.eos_id, VOCAB.pad_id, decoding.max_length,
                      generator=torch.Generator().manual_seed(0), **decoding_rules(VOCAB, decoding))
    return generate(dec, grid, pooled, VOCAB, decoding)


def captions(result: SearchResult) -> list[list[int]]:
    """Each caption's ids up to (without) <eos>, and whether it ended with <eos>."""
    out = []
    for row in result.tokens.tolist():
        out.append(row[: row.index(EOS)] if EOS in row else [t for t in row if t != PAD])
    return out


# the rules alone: no trigram blocking (it would stop "a a a a") and no reranking (no memory here)
UNBLOCKED = {"block_trigrams": False, "rerank_neighbours": 0}


@pytest.mark.parametrize("max_length", [1, 2, 8])
@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
@pytest.mark.parametrize("decoder_name", registry.names("decoder"))
def test_no_unk_and_no_bad_ending_with_every_decoder_and_method(decoder_name, method, max_length):
    dec = Tilted(decoders.make_decoder(*first_pair(decoder_name)))
    default = Decoding(method="greedy" if method == "sample" else method, max_length=max_length, **UNBLOCKED)
    got = captions(decode_with(method, dec, default))
    assert all(UNK not in c for c in got)
    assert all(c and c[-1] not in BAD for c in got), [VOCAB.decode(c) for c in got]
    if max_length >= 2 and method != "beam":  # <eos> not after "a" but after the next word (or the cut there)
        assert got == [[A, DOG]] * len(got)
    if max_length == 8:  # (beam may prefer another first word, at a higher score)
        assert all(EOS in row for row in decode_with(method, dec, default).tokens.tolist())
    # what the rules prevented: the model's own choices
    free = Decoding(method=default.method, max_length=max_length, allow_unk=True, bad_endings=[], min_length=0,
                    **UNBLOCKED)
    assert all(UNK in c for c in captions(decode_with(method, dec, free)))
    unk_only = Decoding(method=default.method, max_length=max_length, bad_endings=[], **UNBLOCKED)
    assert all(c[-1] == A for c in captions(decode_with(method, dec, unk_only)))


def test_max_length_cut_never_leaves_a_bad_ending():
    """A model that keeps writing "a" is cut at max_length on another word."""
    dec = decoders.make_decoder("lstm", "additive")
    with torch.no_grad():
        dec.output.bias[A] += 50.0
        dec.output.bias[EOS] -= 50.0
    result = generate(dec, *decoders.inputs(batch=3)[:2], VOCAB, Decoding(method="greedy", max_length=5, **UNBLOCKED))
    for c in captions(result):
        assert c[:4] == [A] * 4 and len(c) == 5 and c[4] not in BAD


def test_unk_is_generated_and_shown_when_allowed():
    dec = decoders.make_decoder("lstm", "additive")
    with torch.no_grad():
        dec.output.bias[UNK] += 50.0
    grid, pooled, _ = decoders.inputs(batch=2)
    result = generate(dec, grid, pooled, VOCAB, Decoding(method="greedy", allow_unk=True, max_length=3))
    assert all(VOCAB.decode(row) == ["<unk>"] * 3 for row in result.tokens.tolist())


def test_decoding_options_are_checked():
    with pytest.raises(ImcapError, match="bad_endings"):
        Decoding(bad_endings="a")
    assert Decoding(bad_endings=["a", "the"]).bad_endings == ("a", "the")
    assert "a" in Decoding().bad_endings and "dog" not in Decoding().bad_endings
    with pytest.raises(ImcapError, match="bad_endings"):  # nothing could end a caption
        decoding_rules(Vocabulary([*SPECIALS, "a", "the"]), Decoding())
    with pytest.raises(ImcapError, match="method"):
        Decoding(method="sample")
    with pytest.raises(ImcapError, match="rerank_neighbours >= 0"):
        Decoding(rerank_neighbours=-1)
    assert Decoding(method="beam", rerank_neighbours=5).reranks
    assert not Decoding(method="greedy", rerank_neighbours=5).reranks  # one candidate: nothing to rerank


def test_decoding_round_trips_through_a_checkpoints_plain_config():
    decoding = Decoding(method="beam", bad_endings=["a", "of"], allow_unk=True)
    stored = decoding.to_config()
    check_stored_config({"decoding": stored}, "checkpoint x.ckpt")  # plain values only: accepted
    assert Decoding(**stored) == decoding


class ComputedRows(nn.Module):
    """A real decoder that says it `skips_rows` or not (`skips`), whose <eos> grows likelier with
    every step (hypotheses end at different steps), recording per step how many rows it ran on
    and how many it computed."""

    def __init__(self, inner: nn.Module, skips: bool):
        super().__init__()
        self.inner, self.skips_rows, self.rows = inner, skips, []
        self.expand_state = inner.expand_state

    def init_state(self, grid: torch.Tensor, pooled: torch.Tensor):
        return self.inner.init_state(grid, pooled)

    def step(self, state, prev: torch.Tensor, active: torch.Tensor | None = None):
        self.rows.append((prev.shape[0], prev.shape[0] if active is None else active.shape[0]))
        logits, state, weights = self.inner.step(state, prev, active=active)
        logits = logits.clone()
        logits[:, EOS] += 0.3 * len(self.rows)
        return logits, state, weights


@pytest.mark.parametrize("options", [{}, {"block_trigrams": True, "length_penalty": 1.0}], ids=["plain", "trigrams"])
def test_skipping_finished_hypotheses_changes_no_caption_score_or_attention(options):
    """16 beams whose hypotheses end at different steps: with the kernel computing only the
    hypotheses that have not ended (`skips_rows`), every final hypothesis has bit for bit the
    tokens, score and attention of every word of computing them all; at <pad> the weights are 0."""
    dec = decoders.make_decoder("lstm", "additive", vocab=12)  # fp32: the default's products (oneDNN)
    with torch.no_grad():
        dec.output.weight.mul_(4.0)  # sharper distributions: beams diverge
        dec.output.bias[EOS] -= 1.0  # few end at once
    grid, pooled, _ = decoders.inputs(batch=4)
    found = {}
    for skips in (True, False):
        counted = ComputedRows(dec, skips)
        found[skips] = beam_search(counted, grid, pooled, BOS, EOS, PAD, beam_size=16, max_length=12,
                                   all_hypotheses=True, **options)
        ran, computed = (sum(n) for n in zip(*counted.rows))
        assert (computed < ran) == skips  # finished hypotheses were skipped, and only with skips_rows
    skipped, whole = found[True], found[False]
    ends = (whole.tokens == EOS).float().argmax(-1)  # (B, K) the step where each final hypothesis ended
    assert len(ends.unique()) >= 5
    assert torch.equal(skipped.tokens, whole.tokens) and torch.equal(skipped.scores, whole.scores)
    words = (whole.tokens != PAD).unsqueeze(-1).expand_as(whole.attention)
    assert torch.equal(skipped.attention[words], whole.attention[words])
    assert not skipped.attention[~words].any()
