"""The default checkpoint callbacks: best.ckpt follows val/CIDEr-D, last.ckpt the newest epoch."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset


class _Worsening(pl.LightningModule):
    """A model whose val/CIDEr-D falls every epoch: epoch 0 stays the best."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/CIDEr-D", 1.0 / (self.current_epoch + 1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_checkpoint_is_the_newest_epoch_even_when_it_is_not_the_best(make_cfg, tmp_path):
    cfg = make_cfg(out=tmp_path)
    callbacks = [instantiate(cfg.callbacks[k]) for k in ("model_checkpoint", "last_checkpoint")]
    loader = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = pl.Trainer(max_epochs=3, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(_Worsening(), loader, loader)
    assert trainer.checkpoint_callback.best_model_path.endswith("best.ckpt")  # what test and eval load

    def epoch(name):
        return torch.load(tmp_path / "checkpoints" / name, map_location="cpu", weights_only=False)["epoch"]

    assert epoch("best.ckpt") == 0
    assert epoch("last.ckpt") == 2  # resuming continues from here


def fit_worsening(cfg, max_epochs: int, ckpt_path=None) -> pl.Trainer:
    callbacks = [instantiate(cfg.callbacks[k]) for k in ("model_checkpoint", "last_checkpoint")]
    loader = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         plugins=[instantiate(p) for p in cfg.trainer.plugins])
    trainer.fit(_Worsening(), loader, loader, ckpt_path=ckpt_path)
    return trainer


def test_a_resume_into_another_directory_keeps_the_best_checkpoint_and_score(make_cfg, tmp_path):
    fit_worsening(make_cfg(out=tmp_path / "first"), max_epochs=2)
    resumed = fit_worsening(make_cfg(out=tmp_path / "second"), max_epochs=3,
                            ckpt_path=tmp_path / "first" / "checkpoints" / "last.ckpt")
    best = tmp_path / "second" / "checkpoints" / "best.ckpt"
    assert resumed.checkpoint_callback.best_model_path == str(best)
    assert resumed.checkpoint_callback.best_model_score == 1.0  # epoch 0's, not epoch 2's 1/3
    assert torch.load(best, map_location="cpu", weights_only=False)["epoch"] == 0


def test_checkpoints_are_written_beside_their_target_and_renamed(make_cfg, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systemtmp"))  # where Lightning would stage them
    (tmp_path / "systemtmp").mkdir()
    replaced = []
    real_replace = __import__("os").replace
    monkeypatch.setattr("os.replace", lambda a, b: (replaced.append((str(a), str(b))), real_replace(a, b)))
    fit_worsening(make_cfg(out=tmp_path), max_epochs=1)
    last = str(tmp_path / "checkpoints" / "last.ckpt")
    assert any(a.startswith(last[:-len(".ckpt")] + ".") and a.endswith(".ckpt.tmp") and b == last for a, b in replaced)
    assert not list((tmp_path / "systemtmp").iterdir())


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumable_loader_leaves_out_the_batches_already_trained_once(workers):
    from imcap.training.checkpoints import ResumableLoader

    loader = ResumableLoader(list(range(10)), batch_size=3, num_workers=workers, persistent_workers=workers > 0)
    assert loader.state_dict() == {"batches_trained": 0}  # every checkpoint but a mid-epoch one
    loader.load_state_dict({"batches_trained": 2})
    assert len(loader) == 4  # the epoch's length, as Lightning counts its batches
    # a worker-backed iterator draws from the sampler twice before the first batch: skipped once all the same
    assert [b.tolist() for b in loader] == [[6, 7, 8], [9]]
    assert [b.tolist() for b in loader] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]  # the next epoch is whole
