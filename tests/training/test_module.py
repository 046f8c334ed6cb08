import torch
from omegaconf import OmegaConf

from imcap.train import build_module


def test_one_batch_overfits_to_near_zero_loss(make_cfg):
    cfg = make_cfg("model.decoder.dropout=0.0", "model.optimizer.lr=3e-3", "model.attention_reg=0.0")
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.prepare_data()
    vocab = dm.build_vocab()
    module = build_module(cfg, vocab)
    dm.attach_encoder(module.captioner.encoder)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    optimizer = torch.optim.Adam(module.captioner.decoder.parameters(), lr=3e-3)
    module.train()
    first = None
    for _ in range(150):
        loss = module.loss(batch)["loss"]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 2.0 and loss.item() < 0.05
    module.eval()
    with torch.no_grad():
        decoded = module.decode(batch)
    targets = [vocab.decode_text(t[1:]) for t in batch["tokens"].tolist()]  # drop <bos>
    assert all(t in refs for t, refs in zip(targets, batch["references"]))
    assert decoded == targets  # greedy decoding reproduces the memorised captions


def test_checkpoint_stores_what_rebuilds_the_model(make_cfg):
    cfg = make_cfg()
    from imcap.data.vocab import Vocabulary

    module = build_module(cfg, Vocabulary.build([["a", "red", "circle"]]))
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    meta = checkpoint["imcap"]
    assert meta["vocab"][4:] == ["a", "circle", "red"]
    assert meta["architecture"]["decoder"]["hidden_dim"] == 64
    assert meta["data"]["source"]["num_images"] == OmegaConf.to_container(cfg.data.source.num_images)
