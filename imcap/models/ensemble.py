"""Several decoders of one architecture, trained side by side and decoded as one (`model.ensemble`).

`model.ensemble=K` builds K decoders from the same config, each from its own random
initialisation, on the same (frozen, usually cached) image features. Training gives each member
its own loss on the same batches (`members`; the module sums them, so each member gets exactly
the gradient it would get alone). Search and the teacher-forced path see one decoder: the
members' word distributions are averaged, probabilities not logits, and their attention maps
are averaged for the figures. Averaging independently initialised captioners is the usual
ensemble of the captioning literature (Vinyals et al. 2015; ImageCaptioning.pytorch's
`eval_ensemble`); here it is one model, one checkpoint, one command. Separately trained
checkpoints are joined the same way at evaluation (`imcap.models.captioner.join_ensemble`:
`imcap.eval` and `imcap.caption` with a list of checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from imcap.errors import ImcapError
from imcap.models.decoder import expand_for_beams
from imcap.models.packing import valid_mask


def _mean_maps(maps: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The members' attention weights averaged, (B, ..., N); None without attention."""
    return None if maps[0] is None else torch.stack(list(maps)).mean(dim=0)


def _mixture(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the members' mean word probability: K tensors (..., V) -> (..., V), in fp32."""
    logp = torch.stack([torch.log_softmax(x.float(), dim=-1) for x in logits])  # (K, ..., V)
    return torch.logsumexp(logp, dim=0) - math.log(len(logits))


class DecoderEnsemble(nn.Module):
    """K decoders behind the decoder contract (`imcap.models.decoder.Decoder`). The state is a
    tuple of the members' states; `step` and `forward` return log-probabilities, which are
    valid logits (their log-softmax is themselves)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ImcapError(f"an ensemble needs at least 2 decoders; got {len(members)} (model.ensemble=1 is one model)")
        self.members = nn.ModuleList(members)
        self.vocab_size = members[0].vocab_size

    def init_state(self, grid: torch.Tensor, pooled: torch.Tensor) -> tuple:
        return tuple(m.init_state(grid, pooled) for m in self.members)

    def step(self, state: tuple, prev_tokens: torch.Tensor) -> tuple[torch.Tensor, tuple, torch.Tensor | None]:
        logits, states, maps = zip(*(m.step(s, prev_tokens) for m, s in zip(self.members, state)))
        return _mixture(logits), tuple(states), _mean_maps(maps)  # (B, V), state, (B, N) or None

    def expand_state(self, state: tuple, beams: int) -> tuple:
        """Each member's state with `beams` rows per image, as search expands that member's."""
        return tuple(expand_for_beams(m, s, beams) for m, s in zip(self.members, state))

    def forward(self, grid: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mixture, teacher-forced: log-probabilities (B, T, V) and mean weights (B, T, N)."""
        logits, maps = zip(*(m(grid, pooled, tokens, lengths) for m in self.members))
        mixed = _mixture(logits)
        valid = valid_mask(lengths, tokens.shape[1])  # (B, T) or None: every position is valid
        if valid is not None:  # the contract's zeros past each row's end (the mixture of zeros is not)
            mixed = mixed.masked_fill(~valid.to(mixed.device).unsqueeze(-1), 0.0)
        return mixed, _mean_maps(maps)

    def compile_steps(self, **options: Any) -> None:
        for member in self.members:
            member.compile_steps(**options)


def ensemble_size(value: Any) -> int:
    """`model.ensemble` checked: a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ImcapError(f"model.ensemble={value!r}; give the number of decoders to train side by side "
                         "(1: one model, e.g. 3: an ensemble of three)")
    return value


def decoder_members(decoder: nn.Module) -> list[nn.Module]:
    """The decoders that are trained, each with its own loss: an ensemble's members, or itself."""
    return list(decoder.members) if isinstance(decoder, DecoderEnsemble) else [decoder]
