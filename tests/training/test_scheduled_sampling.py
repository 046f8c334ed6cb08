"""Scheduled sampling: the probability schedule, and feeding the model's own words through
`decoder.step` for every decoder (probability 0 is exactly teacher forcing)."""

from __future__ import annotations

import pytest
import torch

from imcap.training.scheduled_sampling import ScheduledSampling, scheduled_sampling_forward
from tests.helpers.decoders import PAIRS, inputs, make_decoder, pair_id

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a shared CPU


def test_schedule_starts_grows_and_is_capped():
    schedule = ScheduledSampling(start_epoch=2, increase_every=2, increase_prob=0.1, max_prob=0.25)
    assert [schedule.probability(e) for e in range(9)] == [0, 0, 0, 0, 0.1, 0.1, 0.2, 0.2, 0.25]
    assert ScheduledSampling().probability(50) == 0.0  # the default never starts


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_zero_probability_is_teacher_forcing_and_one_feeds_the_model(pair):
    dec = make_decoder(*pair)
    grid, pooled, tokens = inputs()
    with torch.no_grad():
        expected, _ = dec(grid, pooled, tokens)
        got, _ = scheduled_sampling_forward(dec, grid, pooled, tokens, 0.0)
        torch.manual_seed(0)
        mixed, _ = scheduled_sampling_forward(dec, grid, pooled, tokens, 1.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[:, 0], expected[:, 0], rtol=1e-5, atol=1e-5)  # the first input is <bos>
    assert not torch.allclose(mixed[:, 1:], expected[:, 1:])  # later inputs came from the model


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_it_leaves_this_batchs_sentinel_share_as_teacher_forcing_does(pair):
    # the training loss logs decoder.last_beta against this batch's words: a stale one from a
    # longer teacher-forced batch crashed adaptive attention at the first scheduled epoch
    dec = make_decoder(*pair)
    grid, pooled, tokens = inputs()
    with torch.no_grad():
        dec(grid, pooled, tokens)  # a teacher-forced batch of length T
        short = tokens[:, :-2]
        dec(grid, pooled, short)
        expected = getattr(dec, "last_beta", None)
        dec(grid, pooled, tokens)
        scheduled_sampling_forward(dec, grid, pooled, short, 0.0)
    got = getattr(dec, "last_beta", None)
    assert (got is None) == (expected is None) == (pair[1] != "adaptive")
    if expected is not None:
        assert got.shape == short.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
