"""The decoder contract, for every registered decoder x attention pair: shapes, incremental =
teacher-forced, generic states, checkpoint round trip, overfitting a batch, compiled steps;
the valid pairs derived from what each decoder offers; every valid pair learns through
`imcap.train`; and a new attention variant in two files (a class and a YAML) trains with every
decoder that accepts it."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from imcap import registry
from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from imcap.models.decoder import AttentionSupport, Decoder, accepts, attentions_for, valid_pairs
from imcap.models.packing import map_state
from imcap.train import train
from tests.helpers.decoders import (
    ATTENTIONS,
    INVALID,
    PAIRS,
    B,
    N,
    T,
    V,
    assert_steps_reproduce_teacher_forcing,
    inputs,
    make_decoder,
    pair_id,
)
from tests.helpers.runs import TINY, run

pytestmark = pytest.mark.usefixtures("one_thread")
SENTINEL_DECODERS = [d for d in registry.names("decoder")
                     if registry.get("decoder", d).attention_support.sentinel]


def test_valid_pairs_follow_what_each_decoder_offers():
    assert {a for d, a in PAIRS if d == "lstm"} == set(ATTENTIONS)  # it takes every option
    assert ("topdown", "none") in INVALID and ("topdown", "adaptive") in PAIRS
    assert ("transformer", "none") in INVALID and ("transformer", "adaptive") in INVALID
    assert {d for d, _ in PAIRS} == set(registry.names("decoder"))
    for decoder in registry.names("decoder"):
        support = registry.get("decoder", decoder).attention_support
        assert isinstance(support, AttentionSupport)
        assert ((decoder, "none") in PAIRS) == support.none
        assert ((decoder, "adaptive") in PAIRS) == support.sentinel


@pytest.mark.parametrize("pair", INVALID, ids=pair_id)
def test_direct_construction_refuses_a_pair_without_meaning(pair):
    with pytest.raises(ImcapError, match=f"model/decoder={pair[0]} does not work with model/attention={pair[1]}"):
        make_decoder(*pair)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_shapes_and_weights_form_a_distribution(pair):
    dec = make_decoder(*pair)
    assert isinstance(dec, Decoder)
    grid, pooled, tokens = inputs()
    logits, weights = dec(grid, pooled, tokens)
    assert logits.shape == (B, T, V)
    if pair[1] == "none":
        assert weights is None
        return
    assert weights.shape == (B, T, N) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, T))


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


@pytest.mark.parametrize("decoder", SENTINEL_DECODERS)
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


def _loss_and_grads(dec, grid, pooled, tokens, lengths):
    dec.zero_grad()
    logits, weights = dec(grid, pooled, tokens, lengths)
    loss = logits.logsumexp(-1).sum() + (weights.square().sum() if weights is not None else 0)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}


COMPILED = [("lstm", "additive"), ("lstm", "multihead"), ("topdown", "additive"), ("transformer", "multihead")]


REDUCE_OVERHEAD = {"mode": "reduce-overhead"}


@pytest.mark.slow
@pytest.mark.parametrize("pair,options", [*((p, {}) for p in COMPILED),
                                          # both recurrences (the kernel's and run_cell's) with fixed shapes
                                          (("lstm", "additive"), REDUCE_OVERHEAD), (("lstm", "multihead"), REDUCE_OVERHEAD)],
                         ids=lambda v: pair_id(v) if isinstance(v, tuple) else v.get("mode", "default"))
def test_compiled_steps_match_eager(pair, options):
    """`model.compile=true`: each decoder's compiled hot path computes what the eager one does,
    on padded batches of varying length (one graph for every step and batch size). With
    reduce-overhead (CUDA graphs on a GPU; here CPU inductor) the shapes are fixed instead:
    every row runs every step and padding is zeroed."""
    eager, compiled = make_decoder(*pair), make_decoder(*pair)
    compiled.compile_steps(**options)
    assert compiled.fixed_shapes == bool(options)
    for length, lengths in ((T, torch.tensor([2, T, 5])), (T - 2, None), (T - 2, torch.tensor([1, 1, 3]))):
        grid, pooled, tokens = inputs(seed=length, length=length)
        want_logits, want_grads = _loss_and_grads(eager, grid, pooled, tokens, lengths)
        got_logits, got_grads = _loss_and_grads(compiled, grid, pooled, tokens, lengths)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-4, msg=name)


HOST_LENGTHS = torch.tensor([2, T, 5])  # as the module passes them: on the host, unsorted


@pytest.mark.parametrize("fixed", [False, True], ids=["packed", "fixed-shapes"])
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_teacher_forcing_never_reads_the_device_back(pair, fixed):
    """No host synchronisation in the teacher-forced forward and backward: on the meta device
    a tensor has no values, so `.item()`, `.tolist()`, `.cpu()`, `bool(t)`, `nonzero` and a
    boolean index all raise (see the next test). Every decoder runs there with the lengths on
    the host, as `CaptionModule` passes them; on a GPU no step then waits for the device."""
    dec = make_decoder(*pair).train().to("meta")
    dec.fixed_shapes = fixed
    grid, pooled, tokens = (x.to("meta") for x in inputs())
    logits, weights = dec(grid, pooled, tokens, HOST_LENGTHS)
    assert logits.device.type == "meta" and logits.shape == (B, T, V)
    loss = logits.sum() + (weights.sum() if weights is not None else 0)
    loss.backward()
    assert dec.output.weight.grad is not None and dec.output.weight.grad.device.type == "meta"


@pytest.mark.parametrize("read", [lambda t: t.sum().item(), lambda t: t.tolist(), lambda t: t.cpu(),
                                  lambda t: bool(t.any()), lambda t: t.nonzero(), lambda t: t[t > 0]],
                         ids=["item", "tolist", "cpu", "bool", "nonzero", "boolean-index"])
def test_the_meta_device_refuses_every_read_back(read):
    with pytest.raises((RuntimeError, NotImplementedError)):
        read(torch.ones(B, T, device="meta"))


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_fixed_shapes_compute_what_skipping_padding_does(pair):
    """`fixed_shapes` (CUDA-graph modes: every row runs every step, padding zeroed after) gives
    the logits, weights and gradients of the packed path, in fp64."""
    packed, fixed = make_decoder(*pair).double(), make_decoder(*pair).double()
    fixed.fixed_shapes = True
    grid, pooled, tokens = inputs()
    grid, pooled = grid.double(), pooled.double()
    with torch.no_grad():
        want, got = packed(grid, pooled, tokens, HOST_LENGTHS), fixed(grid, pooled, tokens, HOST_LENGTHS)
    for w, g in zip(want, got):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    want_logits, want_grads = _loss_and_grads(packed, grid, pooled, tokens, HOST_LENGTHS)
    got_logits, got_grads = _loss_and_grads(fixed, grid, pooled, tokens, HOST_LENGTHS)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-10, atol=1e-12)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def train_losses(run_dir) -> list[float]:
    """train/xe (the cross-entropy, without the attention penalty) per step, from the run's CSV log."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [float(row["train/xe"]) for row in csv.DictReader(f) if row.get("train/xe")]


@pytest.mark.slow
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_every_valid_pair_learns_through_imcap_train(pair, make_cfg, tmp_path):
    """One batch seen 300 times through the real training entry point: the cross-entropy ends
    below half its first value, near ln(vocabulary size). The topdown pairs learn slowest
    (measured: topdown + dot at 2.00 from 3.57 after 200 steps, under half after 300)."""
    decoder, attention = pair
    out = tmp_path / pair_id(pair)
    cfg = make_cfg("debug=overfit", "trainer.max_epochs=300", "trainer.log_every_n_steps=1", "test=false",
                   f"model/decoder={decoder}", f"model/attention={attention}", "model.decoder.hidden_dim=32",
                   f"++model.attention.attention_dim={'null' if attention == 'dot' else 16}",  # dot has none
                   "model.embedding.dim=16", "model.optimizer.lr=3e-3",
                   *(["model.decoder.layers=1", "model.decoder.heads=4"] if decoder == "transformer" else []),
                   out=out)
    metrics = train(cfg)
    losses = train_losses(out)
    assert len(losses) == 300
    assert losses[-1] < 0.5 * losses[0], [round(x, 2) for x in losses[::30]]
    assert metrics["train/xe"] == pytest.approx(losses[-1])
    assert ("train/attention_reg" in metrics) == (attention != "none")


BILINEAR = '''
import torch
from torch import nn

from imcap.models.attention import Attention, AttentionCache
from imcap.registry import register


@register("attention", "bilinear_test")
class BilinearAttention(Attention):
    """e_i = q^T W k_i, with W k_i computed once per sequence."""

    def __init__(self, key_dim: int, query_dim: int, attention_dim: int = 512):
        super().__init__(key_dim, query_dim)
        self.key_proj = nn.Linear(key_dim, query_dim, bias=False)

    def precompute(self, keys: torch.Tensor) -> AttentionCache:
        return AttentionCache(values=keys, keys=self.key_proj(keys))

    def scores(self, query: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        return torch.bmm(query, cache.keys.transpose(1, 2))
'''


@pytest.fixture
def bilinear(tmp_path, monkeypatch):
    """A throwaway attention variant in two files: a module (on sys.path) with the registered
    class, and conf/model/attention/bilinear_test.yaml in a config directory of its own. The
    registration is undone afterwards."""
    code, conf = tmp_path / "code", tmp_path / "conf" / "model" / "attention"
    code.mkdir()
    conf.mkdir(parents=True)
    (code / "bilinear_attention.py").write_text(textwrap.dedent(BILINEAR))
    (conf / "bilinear_test.yaml").write_text("_target_: bilinear_attention.BilinearAttention\n")
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setitem(registry._registry, "attention", dict(registry._registry["attention"]))  # undone after
    monkeypatch.delitem(sys.modules, "bilinear_attention", raising=False)
    import bilinear_attention  # noqa: F401  (registers it)

    yield code, tmp_path / "conf"
    sys.modules.pop("bilinear_attention", None)


@pytest.mark.slow
def test_a_new_attention_in_two_files_trains_with_every_decoder_that_accepts_it(bilinear, data_dir, tmp_path):
    code, conf = bilinear
    cls = registry.get("attention", "bilinear_test")
    decoders = [d for d in registry.names("decoder") if accepts(registry.get("decoder", d), cls)]
    assert decoders == registry.names("decoder")  # it needs nothing a decoder might lack
    assert {(d, "bilinear_test") for d in decoders} <= set(valid_pairs())
    env = {"PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]),
           "IMCAP_DATA_DIR": str(data_dir)}
    result = run(sys.executable, "-m", "imcap.train", "-m", f"hydra.searchpath=[file://{conf}]",
                 "debug=fast_dev_run", *TINY, "model/attention=bilinear_test",
                 f"model/decoder={','.join(decoders)}", "model.decoder.hidden_dim=32",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, decoder in enumerate(decoders):  # the basic sweeper numbers jobs in override order
        job_dir = tmp_path / "sweep" / str(job)
        assert f"model/decoder={decoder}" in (job_dir / ".hydra" / "overrides.yaml").read_text()
        assert "_target_: bilinear_attention.BilinearAttention" in (job_dir / "config.yaml").read_text()
        metrics = json.loads((job_dir / "metrics.json").read_text())
        assert metrics["train/loss"] > 0 and "val/CIDEr-D" in metrics and "train/attention_reg" in metrics


@pytest.mark.parametrize("decoder", registry.names("decoder"))
def test_the_attention_sweep_lists_what_the_chosen_decoder_accepts(decoder, make_cfg):
    cfg = make_cfg("hparams_search=attention_variants", f"model/decoder={decoder}")
    swept = cfg.hydra.sweeper.params["model/attention"].split(",")
    assert swept == attentions_for(registry.get("decoder", decoder))
    assert swept == [a for d, a in valid_pairs() if d == decoder]
