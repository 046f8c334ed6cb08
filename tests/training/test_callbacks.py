"""Callbacks of the training configs, driven as Lightning drives them: the learning-rate warmup,
per-step reseeding (what makes a resumed run continue exactly; tests/faults/test_resume.py checks
that end to end) and the training-throughput timer."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from imcap.training.callbacks import LinearWarmup, ReseedEveryStep, TrainTimer


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


def draws_after_reseed(callback: ReseedEveryStep, step: int, rank: int = 0) -> tuple:
    trainer = SimpleNamespace(global_step=step, global_rank=rank)
    callback.on_train_batch_start(trainer, None, None, 0)
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_every_random_generator_depends_only_on_seed_step_and_rank():
    callback = ReseedEveryStep(seed=7)
    first = draws_after_reseed(callback, step=3)
    torch.rand(100), np.random.rand(100), random.random()  # whatever ran in between
    assert draws_after_reseed(callback, step=3) == first
    assert draws_after_reseed(callback, step=4) != first
    assert draws_after_reseed(callback, step=3, rank=1) != first  # ranks draw different dropout masks
    assert draws_after_reseed(ReseedEveryStep(seed=8), step=3) != first


class Module:
    def __init__(self):
        self.logged = {}

    def log(self, name, value):
        self.logged[name] = value


def train_batches(timer: TrainTimer, trainer, module, sizes=(4, 4, 3)) -> None:
    for index, size in enumerate(sizes):
        timer.on_train_batch_end(trainer, module, None, {"tokens": torch.zeros(size, 6, dtype=torch.long)}, index)


def test_timer_counts_each_epochs_captions_once_and_leaves_out_validation():
    trainer = SimpleNamespace(sanity_checking=False)
    timer, module = TrainTimer(), Module()
    for _ in range(2):
        timer.on_train_epoch_start(trainer, module)
        train_batches(timer, trainer, module)
        timer.on_validation_start(trainer, module)  # the training part of the epoch ends here
        timer.on_train_epoch_end(trainer, module)  # and is not counted a second time
    assert timer.captions == 22 and timer.seconds > 0
    assert module.logged["train/captions_per_s"] == timer.captions / timer.seconds


def test_timer_ignores_the_sanity_check_before_training():
    trainer = SimpleNamespace(sanity_checking=True)
    timer, module = TrainTimer(), Module()
    timer.on_validation_start(trainer, module)
    timer.on_train_epoch_start(trainer, module)
    train_batches(timer, trainer, module)
    timer.on_validation_start(trainer, module)  # still sanity checking: the epoch keeps running
    train_batches(timer, trainer, module)
    trainer.sanity_checking = False
    timer.on_train_epoch_end(trainer, module)
    assert timer.captions == 22 and "train/captions_per_s" in module.logged
