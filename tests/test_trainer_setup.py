"""What a run builds from its config besides data and model (a trainer whose refused options are one
line each), and its flat metrics."""

from __future__ import annotations

import re
import sys
from importlib.util import find_spec

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from pytorch_lightning.accelerators import AcceleratorRegistry, CPUAccelerator, MPSAccelerator
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from imcap.errors import ImcapError
from imcap.trainer_setup import build_trainer, instantiate_group, refused_option, scalar_metrics
from tests.helpers.runs import TINY, assert_one_line_error, run


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


# CUDA hidden: the same on a CI machine with a GPU as on one without
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.slow
def test_trainer_gpu_on_a_machine_without_one_is_one_line_saying_to_drop_it(tmp_path):
    result = run(sys.executable, "-m", "imcap.train", *TINY, "trainer=gpu", cwd=tmp_path, env=NO_GPU)
    assert_one_line_error(result, "error: trainer=gpu needs a CUDA GPU and torch sees none "
                          "(torch.cuda.is_available() is False); drop trainer=gpu to run on the CPU")
    assert result.returncode == 2
    assert not (tmp_path / "data").exists()  # refused before the demo's images are made


@pytest.mark.slow
def test_eval_on_a_gpu_the_machine_lacks_is_one_line_naming_the_option(trained_run, tmp_path):
    result = run(sys.executable, "-m", "imcap.eval", f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
                 "trainer.accelerator=gpu", cwd=tmp_path, env=NO_GPU)
    assert_one_line_error(result, "error: trainer.accelerator=gpu needs a CUDA GPU", "use trainer.accelerator=cpu")
    assert result.returncode == 2


@pytest.mark.slow
@pytest.mark.skipif(find_spec("torch_xla") is not None, reason="torch_xla is installed here")
def test_a_tpu_without_torch_xla_is_one_line_saying_what_to_install_before_any_data_is_made(tmp_path):
    result = run(sys.executable, "-m", "imcap.train", *TINY, "trainer.accelerator=tpu", cwd=tmp_path)
    assert_one_line_error(result, "error: trainer.accelerator=tpu needs torch_xla, which is not installed; use "
                          "trainer.accelerator=cpu to run on the CPU, or install torch_xla (pip install torch_xla)")
    assert result.returncode == 2
    assert not (tmp_path / "data").exists()


KNOWN = "choose one of auto, cpu, cuda, gpu, mps, tpu"


@pytest.mark.parametrize("override,says", [
    ("trainer.accelerator=nope", f"trainer.accelerator=nope is not an accelerator Lightning knows; {KNOWN}"),
    ("trainer.accelerator=hpu", f"trainer.accelerator=hpu is not an accelerator Lightning knows; {KNOWN}"),
    ("trainer.accelerator=mps", "trainer.accelerator=mps needs Apple's MPS and torch sees none "
                                "(torch.backends.mps.is_available() is False); use trainer.accelerator=cpu to run on the CPU"),
])
def test_an_accelerator_unknown_or_absent_here_is_one_line_saying_why(make_cfg, tmp_path, monkeypatch, override, says):
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))  # also on an Apple machine
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.delenv("DISABLE_MPS", raising=False)
    with pytest.raises(ImcapError) as refused:
        build_trainer(make_cfg(override, out=tmp_path), [], [])
    assert str(refused.value) == says


def test_a_plugins_accelerator_this_machine_cannot_run_is_one_line(make_cfg, tmp_path, monkeypatch):
    class FarAccelerator(CPUAccelerator):
        @staticmethod
        def is_available() -> bool:
            return False

    monkeypatch.setitem(AcceleratorRegistry, "far", {"accelerator": FarAccelerator, "accelerator_name": "far",
                                                     "description": "", "init_params": {}})
    with pytest.raises(ImcapError) as refused:
        build_trainer(make_cfg("trainer.accelerator=far", out=tmp_path), [], [])
    assert str(refused.value) == ("trainer.accelerator=far cannot run on this machine (FarAccelerator.is_available() "
                                  "is False); use trainer.accelerator=cpu to run on the CPU")


@pytest.mark.parametrize("overrides,says", [
    (["trainer=gpu", "trainer.devices=4"], "trainer.devices=4 with trainer=gpu, but torch sees 1 CUDA GPU; "
                                           "use trainer.devices=1 or fewer (-1: every GPU)"),
    (["trainer=ddp"], "trainer.devices=2 with trainer.accelerator=auto, but torch sees 1 CUDA GPU; use "
                      "trainer.devices=1 or fewer (-1: every GPU), or trainer.accelerator=cpu to run 2 processes on the CPU"),
])
def test_more_gpus_than_the_machine_has_are_one_line(make_cfg, tmp_path, monkeypatch, overrides, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ImcapError) as refused:
        build_trainer(make_cfg(*overrides, out=tmp_path), [], [])
    assert str(refused.value) == says


@pytest.mark.parametrize("override,says,refusal", [
    ("trainer.precision=fp8", "trainer.precision='fp8': Precision 'fp8' is invalid", ValueError),
    ("trainer.devices=0", "trainer.devices=0: `Trainer(devices=0)` value is not a valid input", MisconfigurationException),
    ("trainer.devices=-1", "trainer.devices=-1: `devices` selected with `CPUAccelerator` should be", TypeError),
    ("+trainer.strategy=bogus", "trainer.strategy='bogus': You selected an invalid strategy name", ValueError),
    ("trainer.max_epochs=-5", "trainer.max_epochs=-5: `max_epochs` must be a non-negative integer", MisconfigurationException),
])
def test_an_option_lightning_refuses_is_one_line_naming_it_with_lightnings_reason(make_cfg, tmp_path, override, says,
                                                                                refusal):
    with pytest.raises(ImcapError, match="^" + re.escape(says)) as refused:
        build_trainer(make_cfg(override, out=tmp_path), [], [])
    assert "\n" not in str(refused.value) and isinstance(refused.value.__cause__, refusal)


def test_a_refusal_naming_no_trainer_option_keeps_its_traceback(make_cfg, tmp_path):
    trainer = make_cfg(out=tmp_path).trainer
    assert refused_option(trainer, MisconfigurationException("No supported gpu backend found!")) is None
    assert refused_option(trainer, ValueError("checkpoint plugins clash")) is None  # built objects, not values
    assert refused_option(trainer, TypeError("`devices` selected with `CPUAccelerator` should be an int > 0")) == "devices"
    with pytest.raises(InstantiationException):  # a bug (callbacks not a list): Hydra's error and traceback
        build_trainer(make_cfg(out=tmp_path), "not a list", [])
