"""What a run builds from its config besides data and model, and its flat metrics."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from imcap.trainer_setup import build_trainer, instantiate_group, scalar_metrics


def test_instantiate_group_builds_each_target_and_skips_removed_entries():
    group = OmegaConf.create({"a": {"_target_": "collections.Counter", "x": 1}, "removed": None,
                              "b": {"_target_": "collections.OrderedDict"}})
    built = instantiate_group(group)
    assert [type(b).__name__ for b in built] == ["Counter", "OrderedDict"] and built[0]["x"] == 1
    assert instantiate_group(None) == []


def test_the_trainer_gets_the_callbacks_and_no_logger_when_there_is_none(make_cfg, tmp_path):
    cfg = make_cfg(out=tmp_path)
    callbacks = instantiate_group(cfg.callbacks)
    trainer = build_trainer(cfg, callbacks, [])
    assert trainer.logger is None
    assert {type(c).__name__ for c in callbacks} <= {type(c).__name__ for c in trainer.callbacks}


def test_metrics_are_flat_sorted_floats():
    metrics = scalar_metrics({"val/b": torch.tensor(0.5), "test/a": 1})
    assert list(metrics) == ["test/a", "val/b"] and metrics == {"test/a": 1.0, "val/b": 0.5}
    assert all(type(v) is float for v in metrics.values())
