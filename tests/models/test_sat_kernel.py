"""The Show-Attend-Tell kernel (lstm + additive) against the plain per-step code it replaces:
same logits, attention and gradients (fp64 to rounding, fp32 and bf16 within their precision),
in teacher forcing, step by step, under autograd, for beam search's shared attention cache,
and with the energy made in chunks; and its prepacked products."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from imcap.bench import count_prepacked_linear_flops
from imcap.models import sat_kernel
from imcap.models.lstm import LSTMDecoder
from imcap.models.sat_kernel import PrepackedLinear
from tests.helpers.decoders import TINY_OPTIONS, B, N, T, V, inputs, make_decoder

pytestmark = pytest.mark.usefixtures("one_thread")
A = TINY_OPTIONS["attention_dim"]


def make(gate: bool = True, dtype: torch.dtype = torch.float32) -> LSTMDecoder:
    return make_decoder("lstm", "additive", gate=gate, dropout=0.0).to(dtype)


def data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    grid, _, tokens = inputs()
    return grid.to(dtype), tokens


def run(dec: LSTMDecoder, grid: torch.Tensor, tokens: torch.Tensor, fast: bool, autocast: bool = False,
        lengths: torch.Tensor | None = None):
    """Logits, attention, parameter gradients and the grid's gradient of a loss that uses both
    outputs (as the doubly stochastic attention penalty does)."""
    dec.fast_path = fast
    dec.zero_grad()
    grid = grid.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, weights = dec(grid, grid.mean(1), tokens, lengths)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.roll(-1, 1).flatten())
        loss = loss + ((1 - weights.float().sum(1)) ** 2).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in dec.named_parameters()}
    return logits.detach(), weights.detach(), grads, grid.grad


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no_gate"])
def test_teacher_forcing_matches_the_plain_code_in_fp64(gate):
    dec = make(gate, torch.float64)
    grid, tokens = data(torch.float64)
    fast, plain = run(dec, grid, tokens, True), run(dec, grid, tokens, False)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-12, atol=1e-12)
    assert fast[2].keys() == plain[2].keys()
    for name in plain[2]:
        torch.testing.assert_close(fast[2][name], plain[2][name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(fast[3], plain[3], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lengths", [[4, 7, 1], [7, 5, 5], [0, 3, 2]], ids=["unsorted", "sorted", "empty_row"])
def test_teacher_forcing_on_padded_rows_matches_the_plain_code_in_fp64(lengths):
    """With lengths, both paths skip the padding (and sort the rows themselves)."""
    dec = make(True, torch.float64)
    grid, tokens = data(torch.float64)
    lengths = torch.tensor(lengths)
    fast, plain = run(dec, grid, tokens, True, lengths=lengths), run(dec, grid, tokens, False, lengths=lengths)
    valid = torch.arange(T) < lengths.unsqueeze(1)  # (B, T)
    assert (fast[0][~valid] == 0).all() and (fast[1][~valid] == 0).all()
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-12, atol=1e-12)
    for name in plain[2]:
        torch.testing.assert_close(fast[2][name], plain[2][name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(fast[3], plain[3], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no_gate"])
def test_teacher_forcing_matches_the_plain_code_in_fp32(gate):
    dec = make(gate)
    grid, tokens = data()
    fast, plain = run(dec, grid, tokens, True), run(dec, grid, tokens, False)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-5, atol=1e-6)
    for name in plain[2]:
        scale = plain[2][name].abs().max().item()
        torch.testing.assert_close(fast[2][name], plain[2][name], rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=name)
    torch.testing.assert_close(fast[3], plain[3], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_matches_the_plain_code_within_bf16_precision():
    dec = make()
    grid, tokens = data()
    fast, plain = run(dec, grid, tokens, True, autocast=True), run(dec, grid, tokens, False, autocast=True)
    exact = run(dec, grid, tokens, False)
    assert fast[0].dtype == plain[0].dtype == torch.bfloat16
    torch.testing.assert_close(fast[0].float(), exact[0], rtol=0, atol=0.05)
    torch.testing.assert_close(fast[1].float(), exact[1], rtol=0, atol=0.01)
    for name in exact[2]:  # no worse than autocast's plain code, relative to the fp32 gradient
        err_fast = (fast[2][name] - exact[2][name]).norm() / exact[2][name].norm().clamp_min(1e-12)
        err_plain = (plain[2][name] - exact[2][name]).norm() / exact[2][name].norm().clamp_min(1e-12)
        assert err_fast < max(2 * err_plain, 0.05), name


def test_step_reproduces_teacher_forcing_under_autocast():
    dec = make()
    grid, tokens = data()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, weights = dec(grid, grid.mean(1), tokens)
        state = dec.init_state(grid, grid.mean(1))
        for t in range(T):
            step_logits, state, step_weights = dec.step(state, tokens[:, t])
            torch.testing.assert_close(step_logits.float(), logits[:, t].float(), rtol=0, atol=0.05)
            torch.testing.assert_close(step_weights, weights[:, t], rtol=0, atol=0.01)


def test_step_under_autograd_gives_the_plain_gradients():
    """Scheduled sampling differentiates through `step`."""
    dec = make()
    grid, tokens = data()
    results = []
    for fast in (True, False):
        dec.fast_path = fast
        dec.zero_grad()
        state = dec.init_state(grid, grid.mean(1))
        total = 0
        for t in range(T):
            logits, state, weights = dec.step(state, tokens[:, t])
            total = total + logits.logsumexp(-1).sum() + weights[:, 0].sum()
        total.backward()
        results.append((total.detach(), {n: p.grad.clone() for n, p in dec.named_parameters()}))
    (fast_total, fast_grads), (plain_total, plain_grads) = results
    torch.testing.assert_close(fast_total, plain_total, rtol=1e-5, atol=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_energy_made_in_chunks_changes_nothing(monkeypatch):
    """Without autograd `step` makes the attention energy a few images at a time once it is
    large; teacher forcing keeps it whole for its backward."""
    dec = make()
    grid, tokens = data()
    with torch.no_grad():
        whole = [dec.step(dec.init_state(grid, grid.mean(1)), tokens[:, 0])]
    monkeypatch.setattr(sat_kernel, "ENERGY_CHUNK_BYTES", N * A * 4)  # one image per chunk
    with torch.no_grad():
        chunked = [dec.step(dec.init_state(grid, grid.mean(1)), tokens[:, 0])]
    torch.testing.assert_close(chunked[0][0], whole[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked[0][2], whole[0][2], rtol=1e-6, atol=1e-7)
    fast, plain = run(dec, grid, tokens, True), run(dec, grid, tokens, False)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[2]["context_proj.weight"], plain[2]["context_proj.weight"], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # validation: nothing kept for a backward, so chunks here too
        dec.fast_path = True
        logits, weights = dec(grid, grid.mean(1), tokens)
    torch.testing.assert_close(logits, plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, plain[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, N * A * 4 * 2], ids=["whole", "chunked"])
def test_a_cache_shared_by_each_images_beams_gives_the_expanded_result(chunk, monkeypatch):
    """expand_state keeps keys and values once per image; step then attends per image."""
    if chunk:
        monkeypatch.setattr(sat_kernel, "ENERGY_CHUNK_BYTES", chunk)
    dec, beams = make(), 4
    grid, tokens = data()
    with torch.no_grad():
        state = dec.init_state(grid, grid.mean(1))
        shared = dec.expand_state(state, beams)
        index = torch.arange(B).repeat_interleave(beams)
        expanded = type(state)(*(x.index_select(0, index) if isinstance(x, torch.Tensor) else x for x in state))
        expanded = expanded._replace(cache=type(state.cache)(*(x.index_select(0, index) for x in state.cache)))
        assert shared.cache.doubled_keys.shape[0] == B and shared.h.shape[0] == B * beams
        prev = torch.randint(0, V, (B * beams,))
        for _ in range(3):
            a, shared, wa = dec.step(shared, prev)
            b, expanded, wb = dec.step(expanded, prev)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-7)
            prev = a.argmax(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_prepacked_linear_equals_linear_and_the_bench_counts_it_as_a_matrix_product(dtype):
    count_prepacked_linear_flops()
    torch.manual_seed(0)
    weight, bias, x = torch.randn(40, 24, dtype=dtype), torch.randn(40, dtype=dtype), torch.randn(6, 24, dtype=dtype)
    with torch.no_grad():
        linear = PrepackedLinear(weight, bias, rows=6)
        with FlopCounterMode(display=False) as counter:
            y = linear(x)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias), **tol)
    assert counter.get_total_flops() == 2 * 6 * 24 * 40
    assert PrepackedLinear(weight.requires_grad_(), bias, rows=6).packed is None  # under autograd: plain linear


def test_backward_frees_what_the_loop_kept_without_waiting_for_the_cyclic_gc():
    # SCST runs few, large steps with little Python garbage in between, so the cyclic GC ran
    # rarely and each step's kept activations piled up (12 GB by the second SCST epoch).
    import gc

    dec, (grid, tokens) = make(), data()
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            run(dec, grid, tokens, fast=True)
        kept = [o for o in gc.get_objects() if isinstance(o, sat_kernel.SATStep)]
    finally:
        gc.enable()
    assert kept == []


@pytest.mark.parametrize("chunk", [None, N * A * 4 * 2], ids=["whole", "chunked"])
def test_a_step_of_some_rows_gives_those_rows_bit_for_bit_and_leaves_the_others(chunk, monkeypatch):
    """step(..., active=rows) (beam search skipping its finished hypotheses): the rows computed
    get exactly what a step of every row gives them; the others keep h and c, with logits and
    attention weights 0. Only the kernel takes `active` (`skips_rows`)."""
    if chunk:
        monkeypatch.setattr(sat_kernel, "ENERGY_CHUNK_BYTES", chunk)
    dec, beams = make(), 4
    grid, tokens = data()
    active = torch.tensor([0, 2, 3, 5, 8, 9, 10])  # of B * beams = 12: every image loses some rows
    with torch.no_grad():
        state = dec.expand_state(dec.init_state(grid, grid.mean(1)), beams)
        state = state._replace(h=state.h + torch.randn_like(state.h), c=state.c + torch.randn_like(state.c))
        prev = torch.randint(0, V, (B * beams,))
        logits, new, weights = dec.step(state, prev)
        some_logits, some, some_weights = dec.step(state, prev, active=active)
    skipped = torch.ones(B * beams, dtype=torch.bool).index_fill_(0, active, False)
    for full, part in ((logits, some_logits), (new.h, some.h), (new.c, some.c), (weights, some_weights)):
        assert torch.equal(part[active], full[active])
    assert torch.equal(some.h[skipped], state.h[skipped]) and torch.equal(some.c[skipped], state.c[skipped])
    assert not some_logits[skipped].any() and not some_weights[skipped].any()
    assert dec.skips_rows
    dec.fast_path = False
    assert not dec.skips_rows
