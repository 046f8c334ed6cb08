"""The web demo as people use it: a server started from the command line on a free local
port, driven through gradio_client and through a real headless Chromium that uploads a photo."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from imcap.demo import example_images, load_model
from imcap.models.search import Decoding
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server(trained_run, tmp_path_factory):
    """`make demo` after `make train`: `python -m imcap.demo` in its own process, in a folder
    whose logs/ hold the trained run, without ckpt_path (the newest run is served); yields the URL."""
    port, work = free_port(), tmp_path_factory.mktemp("demo")
    (work / "logs" / "train" / "runs").mkdir(parents=True)
    (work / "logs" / "train" / "runs" / "2026-11-30_10-00-00").symlink_to(trained_run)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "imcap.demo", f"port={port}"],
        cwd=work, env={**env, "IMCAP_ROOT": str(work), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300  # a limit for a loaded machine, not a speed requirement
    while True:
        assert process.poll() is None, process.stdout.read()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the demo did not start serving"
        time.sleep(0.5)
    yield url
    process.kill()  # as Ctrl-C would, without waiting for Gradio's shutdown
    process.wait()


@pytest.fixture(scope="module")
def photo(trained_run) -> Path:
    (first, *_) = example_images(f"{trained_run}/checkpoints/best.ckpt", 3)
    return first


def expected_caption(trained_run, photo, beam_size: int, max_length: int) -> str:
    captioner = load_model(f"{trained_run}/checkpoints/best.ckpt")
    decoding = Decoding(method="beam" if beam_size > 1 else "greedy", beam_size=beam_size, max_length=max_length)
    return captioner.caption([photo], decoding)[0].text


def test_without_a_trained_run_says_what_to_do(tmp_path):
    result = subprocess.run([sys.executable, "-m", "imcap.demo"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "IMCAP_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT)},
                            timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "no trained model" in line and "make train" in line and "ckpt_path=" in line


def test_examples_are_test_images_of_the_training_data(trained_run):
    images = example_images(f"{trained_run}/checkpoints/best.ckpt", 4)
    config = (trained_run / "config.yaml").read_text()
    assert len(images) == 4 and all(p.is_file() for p in images)
    assert all(str(p).startswith(str(Path(config.split("root: ")[1].split()[0]))) for p in images)


def test_a_pretrained_folder_is_served_like_its_checkpoint(trained_run, photo, tmp_path):
    checkpoint = load_model(f"{trained_run}/checkpoints/best.ckpt")
    folder = checkpoint.save_pretrained(tmp_path / "model")  # what `python -m imcap.export` writes
    assert load_model(folder).caption([photo])[0].text == checkpoint.caption([photo])[0].text
    assert example_images(folder, 3) == []  # a folder names no data: examples=FOLDER then


def test_gradio_client_captions_with_the_chosen_decoding(demo_server, trained_run, photo):
    from gradio_client import Client, handle_file

    client = Client(demo_server, verbose=False)
    for beam_size, max_length in ((1, 12), (3, 4)):
        text, words, heat = client.predict(handle_file(str(photo)), beam_size, max_length,
                                                  api_name="/caption")
        assert text == expected_caption(trained_run, photo, beam_size, max_length)
        assert text and len(text.split()) <= max_length
        assert words["value"] == f"1. {text.split()[0]}"  # the first word's map is shown at once
        assert Path(heat).is_file()  # the attention overlay, as an image file


def test_server_listens_on_loopback_only(demo_server):
    port = int(demo_server.rsplit(":", 1)[1].strip("/"))
    try:  # the address this machine would send from (a UDP connect sends nothing)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            outward = probe.getsockname()[0]
    except OSError:
        pytest.skip("this machine has no network interface besides loopback")
    if outward.startswith("127."):
        pytest.skip("this machine has no network interface besides loopback")
    with pytest.raises(OSError), socket.create_connection((outward, port), timeout=5):
        pass


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver are not "
                    "installed (apt-get install chromium chromium-driver; .ci/run does it)")
def test_browser_uploads_a_photo_and_shows_its_caption(demo_server, trained_run, photo, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        wait = WebDriverWait(driver, 180)
        driver.get(demo_server)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#photo input[type=file]")))
        upload.send_keys(str(photo))  # as a drop or the file dialog would: the upload event captions it
        expected = expected_caption(trained_run, photo, 1, Decoding().max_length)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#caption textarea").get_attribute("value") == expected)
        words = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#words label"))
        assert [w.text for w in words] == [f"{k + 1}. {w}" for k, w in enumerate(expected.split())]
        words[-1].click()  # select another word: its heat map replaces the first one
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attention img"))
        assert "test-set images" in driver.page_source
        driver.save_screenshot(str(tmp_path / "demo.png"))
        requests = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    finally:
        driver.quit()
    urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
    outside = sorted(u for u in urls if not u.startswith((demo_server, "data:", "blob:")))
    assert urls and not outside  # the page loads nothing from anywhere else


def test_a_reranking_model_chooses_among_the_beams_the_slider_sets(trained_run, photo):
    from dataclasses import replace

    import torch

    from imcap.demo import Demo
    from imcap.models.rerank import NeighbourMemory

    captioner = load_model(f"{trained_run}/checkpoints/best.ckpt")
    torch.manual_seed(0)
    captions = [[[5, 6, 7]], [[8, 9]], [[5, 9, 6]]]  # three "training images"
    captioner.memory = NeighbourMemory.build(torch.randn(3, captioner.encoder.out_channels), captions)
    captioner.decoding = replace(captioner.decoding, method="beam", rerank_neighbours=2, rerank_beams=16)
    image = Image.open(photo).convert("RGB")
    for beams in (2, 6):
        shown = Demo(captioner).caption(image, beams, 12).text
        wanted = replace(captioner.decoding, beam_size=beams, rerank_beams=beams, max_length=12)
        assert shown == captioner.caption([image], wanted)[0].text
