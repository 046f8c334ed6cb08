"""The feature cache under faults: a kill -9 mid-extraction, a damaged progress file, a full
disk, an image rewritten with its size and mtime kept, another process holding the lock."""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from imcap.data import features as features_mod
from imcap.data.features import cache_key, extract_features
from imcap.errors import ImcapError
from imcap.models.encoders import TorchvisionEncoder

N_IMAGES = 24
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny inputs: one thread is fastest


def make_images(folder, n=N_IMAGES, seed=0):
    """n random 48x48 BMPs (a BMP's size depends only on its dimensions)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.bmp"
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def new_encoder():
    torch.manual_seed(0)
    return TorchvisionEncoder("resnet18", weights=None)  # (random mobilenet_v2 gives ~1e-10: zeros in fp16)


@pytest.fixture
def images(tmp_path):
    return make_images(tmp_path / "images")


@pytest.fixture(scope="module")
def encoder():
    return new_encoder()


def extract(encoder, images, cache, **kwargs):
    return extract_features(encoder, images, encoder.image_transform(64), cache, encoder.fingerprint(),
                            batch_size=2, **kwargs)


def interrupted(encoder, images, cache, monkeypatch, after_batches=9):
    """An extraction stopped after `after_batches` batches of 2 (progress is written every 16)."""
    real = encoder.forward
    calls = {"n": 0}

    def crashing(x):
        calls["n"] += 1
        if calls["n"] > after_batches:
            raise KeyboardInterrupt
        return real(x)

    with monkeypatch.context() as m:
        m.setattr(encoder, "forward", crashing)
        with pytest.raises(KeyboardInterrupt):
            extract(encoder, images, cache)
    partial = list(cache.glob("*.partial.npy"))
    progress = list(cache.glob("*.progress.json"))
    assert len(partial) == 1 and len(progress) == 1
    return progress[0]


@pytest.mark.parametrize("content", ["", "{", '{"done": "8"}', '{"done": 9999}', "[]"])
def test_a_damaged_progress_file_is_reported_and_extraction_starts_again(
        tmp_path, images, encoder, monkeypatch, caplog, content):
    reference = np.array(extract(encoder, images, tmp_path / "ref"))
    cache = tmp_path / "cache"
    progress = interrupted(encoder, images, cache, monkeypatch, after_batches=9)  # 18 images, progress at 16
    progress.write_text(content)
    with caplog.at_level(logging.WARNING, "imcap.data.features"):
        again = np.array(extract(encoder, images, cache))
    np.testing.assert_array_equal(again, reference)
    assert "damaged progress" in caplog.text and progress.name in caplog.text
    assert not list(cache.glob("*.partial.npy")) and not list(cache.glob("*.progress.json"))


def test_a_damaged_partial_file_is_not_reused(tmp_path, images, encoder, monkeypatch, caplog):
    reference = np.array(extract(encoder, images, tmp_path / "ref"))
    cache = tmp_path / "cache"
    interrupted(encoder, images, cache, monkeypatch, after_batches=9)
    partial = next(cache.glob("*.partial.npy"))
    partial.write_bytes(partial.read_bytes()[:100])  # a truncated header
    with caplog.at_level(logging.WARNING, "imcap.data.features"):
        np.testing.assert_array_equal(np.array(extract(encoder, images, cache)), reference)
    assert "damaged progress" in caplog.text


def test_an_image_rewritten_with_size_and_mtime_kept_is_extracted_again(tmp_path, images, encoder):
    first = np.array(extract(encoder, images, tmp_path / "cache"))
    st = os.stat(images[5])
    other = make_images(tmp_path / "other", n=1, seed=1)[0]
    os.replace(other, images[5])  # what `cp -p` does: new bytes, same size, old mtime
    os.utime(images[5], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(images[5]).st_size == st.st_size
    second = np.array(extract(encoder, images, tmp_path / "cache"))
    assert not np.array_equal(second[5], first[5])
    np.testing.assert_array_equal(np.delete(second, 5, 0), np.delete(first, 5, 0))
    assert np.array_equal(second, np.array(extract(encoder, images, tmp_path / "fresh")))


def test_large_files_are_fingerprinted_by_samples(tmp_path):
    big = tmp_path / "big.bin"
    data = bytearray(os.urandom(3 << 20))
    big.write_bytes(data)
    before = features_mod.content_fingerprint(str(big))
    data[-1] ^= 1  # the last byte
    big.write_bytes(data)
    assert features_mod.content_fingerprint(str(big)) != before


@pytest.mark.timeout(120)
def test_waiting_for_a_stuck_lock_holder_is_logged_and_bounded(tmp_path, images, encoder, monkeypatch, caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    key = cache_key(encoder.fingerprint(), images, "float16")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)", str(cache / f"{key}.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv(features_mod.LOCK_TIMEOUT_ENV, "0.5")
        with caplog.at_level(logging.INFO, "imcap.data.features"), \
                pytest.raises(ImcapError, match=f"another process has held .*{key}.lock for 0.5 s without progress"):
            extract(encoder, images, cache)
        assert "Waiting for another process" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    np.asarray(extract(encoder, images, cache))  # the holder gone, the lock is free


DRIVER = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    import torch
    from imcap.data import features
    from imcap.models.encoders import TorchvisionEncoder

    cache, stop_at, *images = sys.argv[1:]
    torch.manual_seed(0)
    encoder = TorchvisionEncoder("resnet18", weights=None)  # (random mobilenet_v2 gives ~1e-10: zeros in fp16)
    real, loaded, lock = features.load_image, [0], threading.Lock()

    def load(path):  # after `stop_at` images, announce it and hang (to be killed)
        with lock:
            loaded[0] += 1
            n = loaded[0]
        if n > int(stop_at):
            Path(cache, "stopped").touch()
            time.sleep(600)
        return real(path)

    features.load_image = features.load_image_tensor = load
    features.extract_features(encoder, images, encoder.image_transform(64), cache, encoder.fingerprint(),
                              batch_size=2)
    print("done")
""")


def run_driver(tmp_path, cache, images, stop_at):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.Popen([sys.executable, str(driver), str(cache), str(stop_at), *images],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_during_extraction_then_a_rerun_gives_the_uninterrupted_features(tmp_path, images):
    reference = np.array(extract(new_encoder(), images, tmp_path / "ref"))
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = run_driver(tmp_path, cache, images, stop_at=19)  # progress is written at 16 images
    try:
        while not (cache / "stopped").exists() and proc.poll() is None:
            threading.Event().wait(0.05)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert list(cache.glob("*.partial.npy")) and not list(cache.glob("*[0-9a-f].npy"))
    (cache / "stopped").unlink()
    rerun = run_driver(tmp_path, cache, images, stop_at=10**6)
    out, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err[-2000:]
    final = [p for p in cache.glob("*.npy") if ".partial" not in p.name]
    assert len(final) == 1 and not list(cache.glob("*.partial.npy"))
    np.testing.assert_array_equal(np.load(final[0]), reference)


# the whole trunk (2x2x1280 at 64 px, not the demo's stride-16 cut): the cache sizes below rely on it
SHAPES_TINY = ["data=shapes", "data.source.num_images={train:12,val:4,test:4}", "data.source.image_size=64",
               "model.encoder.weights=null", "model.encoder.output_stride=null", "data.eval_batch_size=4"]


def features_cli(tmp_path, fsize_limit=None, cache_dir=None, train_images=12):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    args = [a.replace("train:12", f"train:{train_images}") for a in SHAPES_TINY]
    args += [f"data.cache_dir={cache_dir}"] if cache_dir else []
    return subprocess.run([sys.executable, "-m", "imcap.data", "features", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if fsize_limit else None,
                          env={**os.environ, "IMCAP_ROOT": str(tmp_path), "IMCAP_DATA_DIR": str(tmp_path / "data")})


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing_a_later_run_would_reuse(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the 4 val images' cache (41 KB) fits under
    64 KiB, the 12 train images' (123 KB) does not. Python ignores SIGXFSZ, so the write fails
    with EFBIG as it would with ENOSPC."""
    full = features_cli(tmp_path, fsize_limit=64 << 10)
    errors = [ln for ln in full.stderr.splitlines() if ln.startswith("error:")]
    assert full.returncode == 2 and len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "cannot write the feature cache" in errors[0] and "data.cache_dir" in errors[0]
    cache = tmp_path / "data" / "features"
    assert not list(cache.glob("*.partial.npy")) and not list(cache.glob("*.progress.json"))
    assert len(list(cache.glob("*.npy"))) == 1  # val, complete
    ok = features_cli(tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert sorted(np.load(p).shape[0] for p in cache.glob("*.npy")) == [4, 4, 12]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (a disk that really fills up); skipped where mounting is not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode(errors='replace').strip()[:80]})")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


FULL_DISK_DRIVER = textwrap.dedent("""
    import shutil, sys
    import torch
    from imcap.data import features
    from imcap.errors import ImcapError
    from imcap.models.encoders import TorchvisionEncoder

    lie, cache, *images = sys.argv[1:]
    if lie == "lie":  # as if the space went after the free-space check
        real = shutil.disk_usage
        shutil.disk_usage = lambda p: real(p)._replace(free=1 << 40)
    torch.manual_seed(0)
    encoder = TorchvisionEncoder("resnet18", weights=None)
    try:
        features.extract_features(encoder, images, encoder.image_transform(64), cache, encoder.fingerprint())
    except ImcapError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
""")


@pytest.mark.slow
def test_a_really_full_disk_is_one_line_not_a_sigbus(tmp_path, small_tmpfs):
    """Before the fix a full tmpfs killed extraction with SIGBUS (status 135) and left a partial
    file. The free-space check catches it up front; when the space goes after the check, the
    blocks reserved before the memory map do."""
    images = make_images(tmp_path / "many", n=80)  # 80 x 4 x 512 x 2 bytes = 320 KiB
    driver = tmp_path / "driver.py"
    driver.write_text(FULL_DISK_DRIVER, encoding="utf-8")
    for lie, message in (("truth", "which has 0.2 MiB free; free some space"), ("lie", "No space left on device")):
        run = subprocess.run([sys.executable, str(driver), lie, str(small_tmpfs / lie), *images], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
        assert "Traceback" not in run.stderr
    assert not list(small_tmpfs.rglob("*.partial.npy")) and not list(small_tmpfs.rglob("*.progress.json"))
