import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from imcap.train import build_module


def data_and_module(cfg, setup: bool = True):
    """The datamodule and the module of `cfg` as imcap.train wires them (vocabulary, encoder),
    with the datamodule set up for fit unless `setup` is False."""
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.prepare_data()
    module = build_module(cfg, dm.build_vocab())
    dm.attach_encoder(module.captioner.encoder)
    if setup:
        dm.setup("fit")
    return dm, module


def test_one_batch_overfits_to_near_zero_loss(make_cfg):
    cfg = make_cfg("model.decoder.dropout=0.0", "model.optimizer.lr=3e-3", "model.attention_reg=0.0")

    dm, module = data_and_module(cfg)
    vocab = module.vocab
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


class _GradientNorms(pl.Callback):
    """Gradient norms as the optimiser step saw them (clipped), and the optimiser."""

    def __init__(self):
        self.norms, self.fused = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        self.fused.append(bool(trainer.optimizers[0].defaults.get("fused")))


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_gradients_are_clipped_with_the_default_fused_optimiser(make_cfg, precision, one_thread):
    """Lightning refuses gradient clipping for fused optimisers under mixed precision; the
    module clips itself."""

    cfg = make_cfg()
    dm, module = data_and_module(cfg, setup=False)
    norms = _GradientNorms()
    trainer = pl.Trainer(max_steps=2, precision=precision, gradient_clip_val=1e-3, callbacks=[norms], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert norms.fused == [True, True]
    assert all(n <= 1e-3 * (1 + 1e-3) for n in norms.norms), norms.norms


@pytest.mark.slow
def test_model_compile_compiles_the_decoders_steps_for_training_only(make_cfg, one_thread):

    cfg = make_cfg("model.compile=true", "model.decoder.dropout=0.0")
    dm, module = data_and_module(cfg)
    batch = next(iter(dm.train_dataloader()))
    eager = module.loss(batch)["loss"]
    module.setup("validate")
    assert not hasattr(module.captioner.decoder.sat_path.step_fn, "_torchdynamo_orig_callable")  # eager outside fit
    module.setup("fit")
    assert hasattr(module.captioner.decoder.sat_path.step_fn, "_torchdynamo_orig_callable")
    compiled = module.loss(batch)["loss"]
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_clipping_under_a_grad_scaler_unscales_a_fused_optimisers_gradients_first(make_cfg):
    """16-mixed (GPU): Lightning leaves a fused optimiser's gradients scaled until its step;
    the module unscales them before clipping, and the scaler's step then applies them once.
    Run here with torch's CPU GradScaler, against clipping the true gradients by hand."""
    from types import SimpleNamespace

    from imcap.data.vocab import Vocabulary

    module = build_module(make_cfg(), Vocabulary.build([["a", "red", "circle"]]))
    params = [p for p in module.captioner.decoder.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    clip = 1e-2

    def step(scaler):
        for p, p0 in zip(params, start):
            p.data.copy_(p0)
        optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
        scale = scaler.scale(torch.tensor(1.0)).item() if scaler else 1.0  # what a scaled loss's gradients carry
        for p, g in zip(params, grads):
            p.grad = g * scale
        if scaler:
            module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
            module.configure_gradient_clipping(optimizer, clip, "norm")
            scaler.step(optimizer)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
        return [p.detach().clone() for p in params]

    scaled = step(torch.amp.GradScaler("cpu", init_scale=1024.0))
    reference = step(None)
    for got, want in zip(scaled, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


class _Copies(torch.overrides.TorchFunctionMode):
    """Records the `non_blocking` argument of every `Tensor.to` call."""

    def __init__(self):
        super().__init__()
        self.non_blocking: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "to":
            self.non_blocking.append(bool(kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


def test_batches_go_to_the_device_without_blocking_and_keep_their_lengths_on_the_host(make_cfg):
    """trainer=gpu: pinned batches are copied with non_blocking=True (here to the meta device,
    which Lightning copies to as it does to a GPU) and the caption lengths stay on the host as
    well, so the decoder plans its steps without reading the device back; the loss is the one
    computed from the lengths on the device."""

    cfg = make_cfg("model.decoder.dropout=0.0")
    dm, module = data_and_module(cfg)
    batch = next(iter(dm.train_dataloader()))
    tensors = [k for k, v in batch.items() if isinstance(v, torch.Tensor)]
    with _Copies() as copies:
        moved = module.transfer_batch_to_device(dict(batch), torch.device("meta"), 0)
    assert all(moved[k].device.type == "meta" for k in tensors)
    assert copies.non_blocking == [True] * len(tensors)
    assert moved["host_lengths"].device.type == "cpu" and torch.equal(moved["host_lengths"], batch["lengths"])
    on_cpu = module.transfer_batch_to_device(dict(batch), torch.device("cpu"), 0)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.loss(on_cpu)["loss"], module.loss(batch)["loss"], rtol=0, atol=0)


def test_the_gpu_recipe_pins_its_batches(make_cfg):

    cfg = make_cfg("trainer=gpu")
    dm, module = data_and_module(cfg)
    assert dm.train_dataloader().pin_memory and dm.val_dataloader().pin_memory


class _LearningRates(pl.Callback):
    """The learning rate each training step used, per epoch."""

    def __init__(self):
        self.rates: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rates = [group["lr"] for group in trainer.optimizers[0].param_groups]
        self.rates.setdefault(trainer.current_epoch, []).extend(rates)


@pytest.mark.parametrize("scst_lr", [3e-5, None])
def test_scst_epochs_train_at_scst_lr_and_cross_entropy_epochs_at_the_schedules(make_cfg, one_thread, scst_lr):
    cfg = make_cfg("model.scst.start_epoch=1", f"model.scst.lr={scst_lr if scst_lr else 'null'}",
                   "model.optimizer.lr=2e-3", "model.scheduler.T_max=4", "model.scheduler.eta_min=0")
    dm, module = data_and_module(cfg, setup=False)
    rates = _LearningRates()
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=[rates], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    cosine = [2e-3 * (1 + torch.cos(torch.tensor(torch.pi * e / 4)).item()) / 2 for e in range(3)]
    assert rates.rates[0] == pytest.approx([cosine[0]] * 2)
    expected = [scst_lr, scst_lr] if scst_lr else cosine[1:]
    assert [rates.rates[e] for e in (1, 2)] == [pytest.approx([r] * len(rates.rates[1])) for r in expected]


def test_feature_dropout_drops_image_features_in_training_only(make_cfg, monkeypatch):
    cfg = make_cfg("model.feature_dropout=0.5", "model.decoder.dropout=0.0")
    dm, module = data_and_module(cfg)
    batch = next(iter(dm.train_dataloader()))
    seen = []
    decoder_forward = type(module.captioner.decoder).forward

    def record(decoder, grid, pooled, *args):
        seen.append((grid.detach().clone(), pooled.detach().clone()))
        return decoder_forward(decoder, grid, pooled, *args)

    monkeypatch.setattr(type(module.captioner.decoder), "forward", record)
    clean_grid, clean_pooled = module.features(batch)
    module.train()
    module.loss(batch)
    module.eval()
    module.loss(batch)
    (train_grid, train_pooled), (eval_grid, eval_pooled) = seen
    nonzero = clean_grid != 0
    dropped = (train_grid == 0) & nonzero
    assert 0.4 < dropped.sum() / nonzero.sum() < 0.6 and ((train_pooled == 0) & (clean_pooled != 0)).any()
    # inverted dropout: what is kept is scaled by 1 / (1 - p), so the expected feature is unchanged
    kept = nonzero & ~dropped
    assert torch.allclose(train_grid[kept], 2 * clean_grid[kept])
    assert torch.equal(eval_grid, clean_grid) and torch.equal(eval_pooled, clean_pooled)


def test_feature_dropout_outside_0_to_1_names_the_option(make_cfg):
    from imcap.errors import ImcapError

    with pytest.raises(ImcapError, match=r"model.feature_dropout=1.0; use a probability in \[0, 1\)"):
        data_and_module(make_cfg("model.feature_dropout=1.0"), setup=False)


def test_an_ensemble_trains_each_member_on_its_own_loss(make_cfg, one_thread):
    """model.ensemble=2: the loss is the sum of the members' losses, so each member gets the
    gradient of its own loss alone (no parameter shared, no mixture trained), and the logged
    parts are the members' means."""
    from imcap.models.ensemble import decoder_members

    dm, module = data_and_module(make_cfg("model.ensemble=2", "model.decoder.dropout=0.0"))
    batch = next(iter(dm.train_dataloader()))
    module.train()
    losses = module.loss(batch)
    losses["loss"].backward()
    members = decoder_members(module.captioner.decoder)
    assert len(members) == 2
    together = [[p.grad.clone() for p in m.parameters() if p.requires_grad] for m in members]
    tokens = batch["tokens"]
    grid, pooled = module.features(batch)
    lengths = (tokens[:, 1:] != module.vocab.pad_id).sum(dim=1)
    alone = []
    for member in members:
        module.zero_grad()
        parts = module.decoder_loss(member, grid, pooled, tokens[:, :-1], tokens[:, 1:], lengths)
        parts["loss"].backward()
        alone.append(parts)
        for got, expected in zip(together[members.index(member)], [p.grad for p in member.parameters()
                                                                   if p.requires_grad]):
            torch.testing.assert_close(got, expected)
    torch.testing.assert_close(losses["loss"], alone[0]["loss"] + alone[1]["loss"])
    torch.testing.assert_close(losses["xe"], (alone[0]["xe"] + alone[1]["xe"]) / 2)
    assert alone[0]["xe"].item() != pytest.approx(alone[1]["xe"].item())  # two different initialisations


def test_gradient_clipping_clips_each_ensemble_member_alone(make_cfg, one_thread):
    """As if each member trained alone: every member's norm is at most gradient_clip_val, and
    together they exceed it (one joint clip would shrink each member by the others' norm)."""
    from imcap.models.ensemble import decoder_members

    class MemberNorms(pl.Callback):
        def __init__(self):
            self.norms = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # clipped by then
            self.norms.append([torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() for p in m.parameters() if p.grad is not None])).item()
                for m in decoder_members(pl_module.captioner.decoder)])

    dm, module = data_and_module(make_cfg("model.ensemble=3"), setup=False)
    norms = MemberNorms()
    trainer = pl.Trainer(max_steps=2, gradient_clip_val=1e-3, callbacks=[norms], logger=False, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert len(norms.norms) == 2
    for step in norms.norms:
        assert all(n == pytest.approx(1e-3, rel=1e-3) for n in step), step
