"""A frozen encoder's cached features train exactly like images run through the CNN."""

import torch
from hydra.utils import instantiate

from imcap.train import build_module


def test_training_step_on_cached_features_equals_on_the_fly_extraction(make_cfg):
    cfg = make_cfg("model.decoder.dropout=0.0")
    batches = {}
    for mode in ("cached", "none"):
        dm = instantiate(cfg.data, features=mode)
        dm.prepare_data()
        vocab = dm.build_vocab()
        torch.manual_seed(0)
        module = build_module(cfg, vocab)
        dm.attach_encoder(module.captioner.encoder)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        module.train()
        loss = module.loss(batch)["loss"]
        loss.backward()
        grad = module.captioner.decoder.output.weight.grad.clone()
        batches[mode] = (batch, float(loss), grad)
    (cached, cached_loss, cached_grad), (images, image_loss, image_grad) = batches["cached"], batches["none"]
    assert "grid" in cached and "images" in images and torch.equal(cached["tokens"], images["tokens"])
    assert abs(cached_loss - image_loss) < 2e-3 * max(1.0, abs(image_loss))  # float16 storage
    torch.testing.assert_close(cached_grad, image_grad, rtol=2e-2, atol=2e-3)
