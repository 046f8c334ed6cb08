import numpy as np
import pytest
import torch

from imcap.data import features as features_mod
from imcap.data.features import extract_features
from imcap.data.sources.shapes import ShapesSource
from imcap.models.encoders import TorchvisionEncoder


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
