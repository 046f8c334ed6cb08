"""DecoderEnsemble (imcap/models/ensemble.py): the mixture it decodes, its state under beam
search, how `model.ensemble` builds it, and that a checkpoint rebuilds it."""

from __future__ import annotations

import copy

import pytest
import torch

from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from imcap.models.captioner import CHECKPOINT_KEY, Captioner, build_captioner
from imcap.models.ensemble import DecoderEnsemble, decoder_members, ensemble_size
from imcap.models.search import beam_search, greedy_search
from tests.helpers import decoders
from tests.helpers.decoders import PAIRS, architecture, pair_id

pytestmark = pytest.mark.usefixtures("one_thread")

BOS, EOS, PAD = 1, 2, 0


def sharpened(dec: torch.nn.Module) -> torch.nn.Module:
    """Sharper word distributions than at init, so that search paths differ between members."""
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if "output" in name and name.endswith("weight"):
                p.mul_(6.0)
    return dec


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_each_step_decodes_the_mean_of_the_members_word_probabilities(pair):
    members = [decoders.make_decoder(*pair, seed=s) for s in (0, 1, 2)]
    ensemble = DecoderEnsemble(members).eval()
    grid, pooled, tokens = decoders.inputs()
    state = ensemble.init_state(grid, pooled)
    alone = [m.init_state(grid, pooled) for m in members]
    with torch.no_grad():
        for t in range(3):
            logp, state, weights = ensemble.step(state, tokens[:, t])
            outs = [m.step(s, tokens[:, t]) for m, s in zip(members, alone)]
            alone = [o[1] for o in outs]
            mean = torch.stack([o[0].float().softmax(-1) for o in outs]).mean(0)  # (B, V)
            torch.testing.assert_close(logp.exp(), mean)
            if weights is not None:
                torch.testing.assert_close(weights, torch.stack([o[2] for o in outs]).mean(0))


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_teacher_forcing_gives_the_mixture_that_search_decodes(pair):
    ensemble = DecoderEnsemble([decoders.make_decoder(*pair, seed=s) for s in (0, 1)]).eval()
    grid, pooled, tokens = decoders.inputs()
    lengths = torch.tensor([tokens.shape[1], 4, 2])
    with torch.no_grad():
        logp, _ = ensemble(grid, pooled, tokens, lengths)
        state = ensemble.init_state(grid, pooled)
        for t in range(tokens.shape[1]):
            step_logp, state, _ = ensemble.step(state, tokens[:, t])
            valid = t < lengths
            torch.testing.assert_close(logp[valid, t], step_logp[valid], atol=1e-5, rtol=1e-4)
            assert (logp[~valid, t] == 0).all()  # the decoder contract: zeros past each row's end


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_copies_of_one_decoder_search_exactly_as_that_decoder(pair):
    """The mixture of identical members is that member: beam search (which expands and
    reorders the tuple of member states) must then find the same captions and scores."""
    one = sharpened(decoders.make_decoder(*pair, seed=3))
    ensemble = DecoderEnsemble([one, copy.deepcopy(one), copy.deepcopy(one)]).eval()
    grid, pooled, _ = decoders.inputs(batch=4)
    for search in (lambda d: beam_search(d, grid, pooled, BOS, EOS, PAD, beam_size=3, max_length=6),
                   lambda d: greedy_search(d, grid, pooled, BOS, EOS, PAD, max_length=6)):
        expected, got = search(one), search(ensemble)
        assert torch.equal(got.tokens, expected.tokens)
        torch.testing.assert_close(got.scores, expected.scores, atol=1e-4, rtol=1e-4)


def test_different_members_can_decode_what_neither_decodes_alone():
    """Not a relabelled member: over a few batches, the ensemble's beam captions differ from
    each member's somewhere."""
    a, b = (sharpened(decoders.make_decoder("lstm", "additive", seed=s)) for s in (0, 1))
    ensemble = DecoderEnsemble([a, b]).eval()
    grid, pooled, _ = decoders.inputs(batch=12)

    def search(d):
        return beam_search(d, grid, pooled, BOS, EOS, PAD, beam_size=3, max_length=6).tokens

    mixed = search(ensemble)
    assert not torch.equal(mixed, search(a)) and not torch.equal(mixed, search(b))


VOCAB = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog", "runs", "on", "grass"])


def test_model_ensemble_builds_that_many_freshly_initialised_decoders():
    arch = {**architecture("lstm", "additive"), "ensemble": 3}
    captioner = build_captioner(arch, VOCAB, 64, pretrained=False)
    assert isinstance(captioner.decoder, DecoderEnsemble)
    members = decoder_members(captioner.decoder)
    assert len(members) == 3
    first = [m.output.weight for m in members]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    single = build_captioner({**arch, "ensemble": 1}, VOCAB, 64, pretrained=False)
    assert decoder_members(single.decoder) == [single.decoder]  # ensemble 1: the plain decoder


@pytest.mark.parametrize("value", [0, -2, "3", 2.0, True, None])
def test_a_bad_ensemble_size_is_refused_naming_the_option(value):
    with pytest.raises(ImcapError, match="model.ensemble"):
        ensemble_size(value)


def test_a_checkpoint_rebuilds_the_ensemble_and_its_captions(tmp_path):
    arch = {**architecture("lstm", "additive"), "ensemble": 2}
    trained = build_captioner(arch, VOCAB, 64, pretrained=False).eval()
    path = tmp_path / "ensemble.ckpt"
    torch.save({CHECKPOINT_KEY: {"architecture": trained.architecture, "vocab": VOCAB.itos, "image_size": 64},
                "state_dict": {f"captioner.{k}": v for k, v in trained.state_dict().items()}}, path)
    rebuilt = Captioner.from_checkpoint(path)
    assert isinstance(rebuilt.decoder, DecoderEnsemble) and len(rebuilt.decoder.members) == 2
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = trained.generate(*trained.encode(pixels), rebuilt.decoding)  # the one the checkpoint stores
        got = rebuilt.generate(*rebuilt.encode(pixels))
    assert torch.equal(got.tokens, expected.tokens)


def test_an_exported_ensemble_loads_as_one_and_says_so_in_its_card(tmp_path):
    captioner = build_captioner({**architecture("lstm", "additive"), "ensemble": 2}, VOCAB, 64,
                                pretrained=False).eval()
    folder = captioner.save_pretrained(tmp_path / "shared")
    assert "| ensemble | 2 decoders" in (folder / "README.md").read_text()
    loaded = Captioner.from_pretrained(folder)
    assert isinstance(loaded.decoder, DecoderEnsemble)
    ours, theirs = captioner.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
