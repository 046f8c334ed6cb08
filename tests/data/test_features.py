import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from imcap.data import features as features_mod
from imcap.data.features import extract_features
from imcap.data.sources.shapes import ShapesSource
from imcap.models.encoders import TorchvisionEncoder
from imcap.train import build_module


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    source = ShapesSource(str(tmp_path_factory.mktemp("shapes")), {"train": 10}, image_size=64)
    source.prepare()
    return [r.image_path for r in source.records()]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TorchvisionEncoder("mobilenet_v2", weights=None)


def test_cached_features_equal_the_encoder_output(tmp_path, images, encoder):
    transform = encoder.image_transform(64)
    cached = extract_features(encoder, images, transform, tmp_path, encoder.fingerprint(), batch_size=4)
    with torch.no_grad():
        direct, _ = encoder.eval()(torch.stack([transform(features_mod.load_image(p)) for p in images]))
    assert cached.shape == (10, 4, 1280) and cached.dtype == np.float16
    np.testing.assert_allclose(cached.astype(np.float32), direct.numpy(), rtol=2e-3, atol=2e-3)


def test_second_call_reads_the_cache_without_running_the_encoder(tmp_path, images, encoder, monkeypatch):
    transform = encoder.image_transform(64)
    first = np.array(extract_features(encoder, images, transform, tmp_path, encoder.fingerprint()))
    monkeypatch.setattr(encoder, "forward", lambda *a: pytest.fail("encoder ran again"))
    second = extract_features(encoder, images, transform, tmp_path, encoder.fingerprint())
    np.testing.assert_array_equal(first, second)


def test_changed_weights_change_the_key(tmp_path, images, encoder):
    other = TorchvisionEncoder("mobilenet_v2", weights=None)
    assert other.fingerprint() != encoder.fingerprint()
    extract_features(encoder, images, encoder.image_transform(64), tmp_path, encoder.fingerprint())
    extract_features(other, images, other.image_transform(64), tmp_path, other.fingerprint())
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_interrupted_extraction_resumes_without_redoing_finished_batches(tmp_path, images, encoder, monkeypatch):
    transform = encoder.image_transform(64)
    reference = np.array(extract_features(encoder, images, transform, tmp_path / "ref", encoder.fingerprint(), batch_size=1))
    calls = {"n": 0}
    real_forward = encoder.forward

    def crashing(x):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real_forward(x)

    monkeypatch.setattr(encoder, "forward", crashing)
    with pytest.raises(KeyboardInterrupt):
        extract_features(encoder, images, transform, tmp_path, encoder.fingerprint(), batch_size=1)
    assert list(tmp_path.glob("*.partial.npy")) and not list(tmp_path.glob("*[0-9a-f].npy"))
    calls["n"] = 100  # no more crashes; count the resumed batches
    resumed = extract_features(encoder, images, transform, tmp_path, encoder.fingerprint(), batch_size=1)
    assert calls["n"] - 100 == 10 - 8  # 8 images were flushed before the crash
    np.testing.assert_array_equal(np.array(resumed), reference)


# -- the fast extraction path ------------------------------------------------------------------
def test_the_cache_key_hashes_pixels_path_size_mtime_and_content_and_only_bf16_adds_precision(images):
    import hashlib
    import os

    h = hashlib.sha256(b"fingerprint")
    h.update(b"float16")
    h.update(b"pixels=viewer-2")  # how files become pixels: EXIF orientation, modes as viewers show
    for p in images:
        st = os.stat(p)
        content = hashlib.sha256(open(p, "rb").read()).hexdigest()  # small files are hashed whole
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{content}\n".encode())
    assert features_mod.cache_key("fingerprint", images, "float16") == h.hexdigest()[:20]
    assert features_mod.cache_key("fingerprint", images, "float16", "bf16") != h.hexdigest()[:20]


def test_a_cache_of_pixels_read_another_way_is_not_reused(images, monkeypatch):
    """Caches written before EXIF orientation and viewer-like pixel modes hold sideways phone
    photos: reading files differently changes the key."""
    now = features_mod.cache_key("fingerprint", images, "float16")
    monkeypatch.setattr(features_mod, "PIXELS_VERSION", "another")
    assert features_mod.cache_key("fingerprint", images, "float16") != now


def test_bf16_features_are_cached_apart_and_close_to_fp32(tmp_path, images, encoder):
    transform = encoder.image_transform(64)
    fp32 = extract_features(encoder, images, transform, tmp_path, encoder.fingerprint(), batch_size=4)
    bf16 = extract_features(encoder, images, transform, tmp_path, encoder.fingerprint(), batch_size=4, precision="bf16")
    assert len(list(tmp_path.glob("*.npy"))) == 2 and bf16.shape == fp32.shape
    scale = np.abs(fp32).max()
    np.testing.assert_allclose(bf16.astype(np.float32), fp32.astype(np.float32), atol=0.05 * scale)
    assert next(encoder.parameters()).dtype == torch.float32  # the encoder itself is left alone


def test_unknown_precision_is_refused(tmp_path, images, encoder):
    from imcap.errors import ImcapError

    with pytest.raises(ImcapError, match="precision 'fp16' is unknown"):
        extract_features(encoder, images, encoder.image_transform(64), tmp_path, "x", precision="fp16")


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "efficientnet_lite0", "mobilenet_v3_large"])
def test_the_inference_copy_computes_what_the_encoder_does(name):
    """BatchNorm folded into the convolutions, activations fused into them: the same features."""
    torch.manual_seed(0)
    encoder = TorchvisionEncoder(name, weights=None)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    keys = list(encoder.state_dict())
    fast = features_mod.inference_encoder(encoder)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    if features_mod._can_fuse_on_cpu():  # every activation after a plain convolution rides on it
        assert any(isinstance(m, features_mod.ConvActivation) for m in fast.modules())
    assert list(encoder.state_dict()) == keys  # the encoder itself is untouched
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = encoder.eval()(x)[0], fast(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_images_decode_to_the_same_pixels_as_pil(tmp_path, images):
    from PIL import Image
    from torchvision.transforms import v2 as T

    from imcap.data.images import load_image_tensor

    with Image.open(images[0]) as im:
        rgb = im.convert("RGB")
    rgb.save(tmp_path / "rgb.jpg", quality=90)
    rgb.convert("L").save(tmp_path / "grey.jpg")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgb.save(tmp_path / "image.png")
    for name in ("rgb.jpg", "grey.jpg", "cmyk.jpg", "image.png"):
        path = str(tmp_path / name)
        assert torch.equal(load_image_tensor(path), T.PILToTensor()(features_mod.load_image(path))), name
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    from imcap.errors import ImcapError

    with pytest.raises(ImcapError, match="cannot read image"):
        load_image_tensor(str(tmp_path / "broken.jpg"))
    with pytest.raises(ImcapError, match="image not found"):
        load_image_tensor(str(tmp_path / "missing.jpg"))


def test_decoding_threads_and_worker_processes_give_the_same_features(tmp_path, images, encoder):
    transform = encoder.image_transform(64)
    threads = extract_features(encoder, images, transform, tmp_path / "threads", encoder.fingerprint(), batch_size=3)
    workers = extract_features(encoder, images, transform, tmp_path / "workers", encoder.fingerprint(), batch_size=3,
                               num_workers=1)
    np.testing.assert_array_equal(np.asarray(threads), np.asarray(workers))


def test_training_step_on_cached_features_equals_on_the_fly_extraction(make_cfg):
    """A frozen encoder's cached features train exactly like images run through the CNN."""
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
