"""The default checkpoint callbacks: best.ckpt follows val/CIDEr-D, last.ckpt the newest epoch."""

from __future__ import annotations

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
