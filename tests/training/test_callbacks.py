"""Callbacks of the training configs, driven as Lightning drives them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from imcap.training.callbacks import LinearWarmup


def test_linear_warmup_ramps_to_the_configured_rate_then_leaves_it_to_the_scheduler():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=4e-3)
    trainer = SimpleNamespace(global_step=0, optimizers=[optimizer])
    warmup = LinearWarmup(steps=4)
    seen = []
    for step in range(6):
        trainer.global_step = step
        warmup.on_train_batch_start(trainer, None, None, step)
        seen.append(optimizer.param_groups[0]["lr"])
        if step == 5:
            optimizer.param_groups[0]["lr"] = 1e-3  # a scheduler's later decision stands
    assert seen == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3, 4e-3, 4e-3])
    trainer.global_step = 6
    warmup.on_train_batch_start(trainer, None, None, 6)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    # a run resumed mid-warmup: the optimiser state carries the target
    resumed = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=4e-3)
    state = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=4e-3)
    trainer = SimpleNamespace(global_step=1, optimizers=[state])
    LinearWarmup(steps=4).on_train_batch_start(trainer, None, None, 1)
    resumed.load_state_dict(state.state_dict())
    trainer = SimpleNamespace(global_step=2, optimizers=[resumed])
    LinearWarmup(steps=4).on_train_batch_start(trainer, None, None, 2)
    assert resumed.param_groups[0]["lr"] == pytest.approx(3e-3)
