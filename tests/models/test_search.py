import torch

from imcap.models.search import greedy_search
from tests.helpers.decoders import C, N, V, make_decoder

BOS, EOS, PAD = 1, 2, 0


def test_greedy_picks_the_argmax_of_the_teacher_forced_logits():
    dec = make_decoder("lstm", "additive")
    grid = torch.randn(4, N, C)
    result = greedy_search(dec, grid, grid.mean(1), BOS, EOS, PAD, max_length=6)
    inputs = torch.cat([torch.full((4, 1), BOS), result.tokens[:, :-1]], dim=1)
    with torch.no_grad():
        logits, _ = dec(grid, grid.mean(1), inputs)
    logits[..., [BOS, PAD]] = float("-inf")  # search never generates them
    for b in range(4):
        ids = result.tokens[b].tolist()
        n = ids.index(EOS) + 1 if EOS in ids else len(ids)
        assert ids[:n] == logits[b, :n].argmax(-1).tolist()
        assert all(i == PAD for i in ids[n:])
    assert result.attention.shape == (4, result.tokens.shape[1], N)


def test_greedy_stops_once_every_sequence_has_ended():
    dec = make_decoder("lstm", "none")
    with torch.no_grad():
        dec.output.bias.fill_(-100.0)
        dec.output.bias[EOS] = 100.0  # every step prefers <eos>
    grid = torch.randn(3, N, C)
    result = greedy_search(dec, grid, grid.mean(1), BOS, EOS, PAD, max_length=10)
    assert result.tokens.tolist() == [[EOS]] * 3
    assert result.attention is None
    assert V > EOS
