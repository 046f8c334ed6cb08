"""The web demo as people use it: a server started from the command line on a free local
port, driven through gradio_client, plain HTTP and a real headless Chromium that uploads a photo;
and the same demo set up to be shared: a login, an upload limit, uploads deleted, thin images."""

from __future__ import annotations

import http.cookiejar
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from imcap.config_compose import compose_config
from imcap.demo import (
    DISPLAY_LONG_SIDE,
    OFFLINE_ENV,
    build_app,
    example_images,
    load_model,
    network_warning,
    serving_options,
)
from imcap.errors import ImcapError
from imcap.models.search import Decoding
from tests.helpers.paths import ROOT
from tests.helpers.runs import assert_one_line_error

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo(work: Path, *overrides: str, first_port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m imcap.demo overrides...` in its own process on a free loopback port, its output in
    work/demo.out; returns once the page is served (the process, the URL). With `first_port`, no
    port= is given (as `make demo` gives none): Gradio tries first_port and the ones after it, and
    the URL is the one the demo's log names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_")}
    if first_port is None:
        port = free_port()
        options, url = [f"port={port}"], f"http://127.0.0.1:{port}/"
    else:
        env["GRADIO_SERVER_PORT"] = str(first_port)  # where Gradio starts looking instead of 7860
        options, url = [], None
    process = subprocess.Popen(
        [sys.executable, "-m", "imcap.demo", *options, *overrides],
        cwd=work, env={**env, "IMCAP_ROOT": str(work), "PYTHONPATH": str(ROOT)},
        stdout=(work / "demo.out").open("w"), stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    try:
        return process, wait_until_served(process, work / "demo.out", url)
    except BaseException:
        stop_demo(process)  # a demo that failed to start does not outlive the test
        raise


def wait_until_served(process: subprocess.Popen, log: Path, url: str | None) -> str:
    """The URL once the page answers there (`url`, or the one the log's "Serving the demo on" names)."""
    deadline = time.monotonic() + 300  # a limit for a loaded machine, not a speed requirement
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the demo did not start serving"
        if url is None:
            line = next((ln for ln in log.read_text().splitlines() if "Serving the demo on" in ln), None)
            if line is None:
                time.sleep(0.5)
                continue
            named = re.search(r"Serving the demo on (http://127\.0\.0\.1:\d+/) ", line)
            assert named, f"the log names no URL one can open: {line}"
            url = named[1]
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return url
        except urllib.error.HTTPError:
            return url  # serving (a login page answers 401 to some requests)
        except OSError:
            pass
        time.sleep(0.5)


def stop_demo(process: subprocess.Popen) -> None:
    """Stop the server as `kill` does (SIGTERM), so that it deletes its uploads."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def demo_server(trained_run, tmp_path_factory):
    """`make demo` after `make train`: `python -m imcap.demo` in its own process, in a folder
    whose logs/ hold the trained run, without ckpt_path (the newest run is served) nor port (the
    first port it tries is busy: the log names the one it took); yields the URL."""
    work = tmp_path_factory.mktemp("demo")
    (work / "logs" / "train" / "runs").mkdir(parents=True)
    (work / "logs" / "train" / "runs" / "2026-11-30_10-00-00").symlink_to(trained_run)
    with socket.socket() as busy:  # another program on the first port Gradio tries
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        process, url = start_demo(work, first_port=busy.getsockname()[1])
        assert url != f"http://127.0.0.1:{busy.getsockname()[1]}/"
    yield url
    stop_demo(process)


USER, PASSWORD = "alice", "correct-horse-battery-7"
SHARED = ["max_file_size=100kb", "delete_cache=[1,10]"]  # small limits the tests can reach


@pytest.fixture(scope="module")
def shared_demo(trained_run, photo, tmp_path_factory):
    """The demo as someone shares it: examples from a folder that also holds a private file, a
    login from an auth file, a 100 kB upload limit, uploads deleted after 10 s. Yields
    (URL, server process, example photo, private file beside it, run folder)."""
    work, private = tmp_path_factory.mktemp("shared"), tmp_path_factory.mktemp("private")
    folder = work / "photos"
    folder.mkdir()
    example = Path(shutil.copy(photo, folder / "beach.png"))
    secret = folder / "secret.txt"
    secret.write_text("AWS_SECRET_ACCESS_KEY=do-not-serve\n")
    (private / "logins.txt").write_text(f"# who may open the demo\n{USER}:{PASSWORD}\n")
    process, url = start_demo(work, f"ckpt_path={trained_run}/checkpoints/best.ckpt", f"examples={folder}",
                              f"auth_file={private / 'logins.txt'}", *SHARED)
    yield url, process, example, secret, work
    stop_demo(process)


def logged_in(url: str, user: str = USER, password: str = PASSWORD) -> urllib.request.OpenerDirector:
    """An HTTP client holding the session cookie of Gradio's login form."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    form = urllib.parse.urlencode({"username": user, "password": password}).encode()
    with opener.open(url + "login", data=form, timeout=30) as response:
        assert json.loads(response.read()) == {"success": True}
    return opener


def http_status(opener: urllib.request.OpenerDirector, url: str, data: bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with opener.open(urllib.request.Request(url, data=data, headers=headers or {}), timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def upload(opener: urllib.request.OpenerDirector, url: str, name: str, content: bytes) -> tuple[int, bytes]:
    """POST one file to Gradio's upload route as a browser's file input does (multipart form)."""
    boundary = "imcap-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return http_status(opener, url + "gradio_api/upload", body,
                       {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def peak_memory(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    (line,) = [ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM:")]
    return int(line.split()[1]) * 1024


@pytest.fixture(scope="module")
def photo(trained_run) -> Path:
    (first, *_) = example_images(f"{trained_run}/checkpoints/best.ckpt", 3)
    return first


def expected_caption(trained_run, photo, beam_size: int, max_length: int) -> str:
    captioner = load_model(f"{trained_run}/checkpoints/best.ckpt")
    # the run's own decoding rules (what the demo starts from), with the two settings the page sets
    decoding = replace(captioner.decoding, method="beam" if beam_size > 1 else "greedy", beam_size=beam_size,
                       max_length=max_length, min_length=min(captioner.decoding.min_length, max_length))
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


def test_a_bad_upload_is_one_reason_naming_the_file(demo_server, tmp_path):
    """Gradio's own preprocessing once failed on these first, as its bare "The upstream Gradio app
    has raised an exception"."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    jpeg = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(jpeg, "JPEG")
    files = {"cut.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) * 2 // 3],  # a download stopped part-way
             "empty.jpg": b"", "IMG_0001.HEIC": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)}
    reasons = {"cut.jpg": "cannot read upload cut.jpg: image file is truncated",
               "empty.jpg": "cannot read upload empty.jpg: an empty file (0 bytes); upload another photo",
               "IMG_0001.HEIC": "cannot read upload IMG_0001.HEIC: "}  # damaged, or pillow-heif not installed
    client = Client(demo_server, verbose=False)
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(AppError) as e:
            client.predict(handle_file(str(tmp_path / name)), 1, 8, api_name="/caption")
        assert str(e.value).startswith(reasons[name]), str(e.value)


def test_a_busy_port_is_one_error_line_naming_the_option(trained_run, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "imcap.demo", f"ckpt_path={trained_run}/checkpoints/best.ckpt",
                                 f"port={port}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "IMCAP_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert_one_line_error(result, f"error: port={port} on 127.0.0.1 is in use by another program",
                          "pass another port=N, or leave port unset")


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


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_thin_images_get_a_bounded_overlay_in_bounded_server_memory(shared_demo, tmp_path):
    from gradio_client import Client, handle_file

    url, process, example, _, _ = shared_demo
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    client.predict(handle_file(str(example)), 1, 8, api_name="/caption")  # the first caption's allocations
    before = peak_memory(process.pid)
    for size in ((1, 3000), (3000, 1)):  # a few hundred bytes each; the overlay once took 256 px x 256N
        path = tmp_path / f"strip_{size[0]}x{size[1]}.png"
        Image.linear_gradient("L").resize(size).convert("RGB").save(path)
        assert path.stat().st_size < 100 * 1024
        text, _, heat = client.predict(handle_file(str(path)), 1, 8, api_name="/caption")
        overlay = Image.open(heat)
        assert text and max(overlay.size) <= DISPLAY_LONG_SIDE, overlay.size
        assert overlay.width * overlay.height <= DISPLAY_LONG_SIDE**2
    grown = peak_memory(process.pid) - before
    assert grown < 150 * 2**20, f"the server's peak memory grew by {grown / 2**20:.0f} MB"


def test_an_upload_over_the_size_limit_is_refused(shared_demo):
    url = shared_demo[0]
    too_big = png_bytes(Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3)))  # noise: no compression
    assert len(too_big) > 100 * 1024
    status, body = upload(logged_in(url), url, "noise.png", too_big)
    assert status == 413, (status, body)


def test_uploads_are_deleted_after_their_age(shared_demo):
    url = shared_demo[0]
    status, body = upload(logged_in(url), url, "dot.png", png_bytes(Image.new("RGB", (8, 8), "red")))
    assert status == 200, body
    (stored,) = [Path(p) for p in json.loads(body)]
    assert stored.is_file()
    deadline = time.monotonic() + 120  # deleted 10 s after upload, checked every second
    while stored.exists():
        assert time.monotonic() < deadline, f"{stored} was not deleted"
        time.sleep(1)


def test_only_the_example_itself_is_served_never_a_file_beside_it(shared_demo):
    url, _, example, secret, _ = shared_demo
    opener = logged_in(url)
    status, body = http_status(opener, f"{url}gradio_api/file={example}")
    assert status == 200 and body == example.read_bytes()
    for private in (secret, example.parent, example.parent / "beach.png.bak"):
        status, body = http_status(opener, f"{url}gradio_api/file={private}")
        assert 400 <= status < 500 and b"do-not-serve" not in body, (private, status)


def test_with_an_auth_file_nothing_is_served_without_a_login(shared_demo):
    from gradio_client import Client

    url, _, example, _, work = shared_demo
    anonymous = urllib.request.build_opener()
    for path in ("config", "gradio_api/info", f"gradio_api/file={example}"):
        status, _ = http_status(anonymous, url + path)
        assert status == 401, (path, status)
    assert upload(anonymous, url, "dot.png", png_bytes(Image.new("RGB", (8, 8))))[0] == 401
    with pytest.raises(urllib.error.HTTPError):
        logged_in(url, USER, "wrong password")
    with pytest.raises(Exception):  # noqa: B017 (gradio_client raises a bare ValueError or httpx error)
        Client(url, verbose=False)
    assert "Caption" in http_status(logged_in(url), url + "config")[1].decode()
    written = [p for p in work.rglob("*") if p.is_file() and p.suffix not in (".png", ".ckpt")]
    assert written and not [p for p in written if PASSWORD in p.read_text(errors="replace")]  # never logged


def uploads_folder(url: str) -> Path:
    """Where the demo at `url` keeps uploads: it uploads a small PNG and returns that file's folder."""
    status, body = upload(urllib.request.build_opener(), url, "dot.png", png_bytes(Image.new("RGB", (8, 8), "blue")))
    assert status == 200, body
    (stored,) = [Path(p) for p in json.loads(body)]
    assert stored.is_file()
    folder = stored.parent.parent  # Gradio keeps each upload in a folder named by its hash
    assert folder != Path(tempfile.gettempdir()) / "gradio"  # its own, not the one all Gradio apps share
    return folder


def test_uploads_go_when_the_server_stops_or_after_a_kill_9(trained_run, tmp_path):
    demo = [f"ckpt_path={trained_run}/checkpoints/best.ckpt", "num_examples=0"]
    killed, url = start_demo(tmp_path, *demo)
    left = uploads_folder(url)
    killed.kill()  # SIGKILL: the server can delete nothing itself
    killed.wait()
    assert left.is_dir()
    process, url = start_demo(tmp_path, *demo)  # the next demo deletes what a dead one left
    try:
        assert not left.exists(), sorted(left.rglob("*"))
        uploads = uploads_folder(url)
        process.send_signal(signal.SIGTERM)  # kill, systemd and docker stop send it
        # and again while it closes, as an impatient user presses Ctrl-C twice (SIGTERM: a test
        # runner started in the background passes SIGINT on ignored)
        for pause in (0.05, 0.4):
            time.sleep(pause)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        process.kill()
    said = (tmp_path / "demo.out").read_text()
    assert process.returncode == 0 and "error:" not in said, said[-2000:]
    assert not uploads.exists(), sorted(uploads.rglob("*"))


def test_a_network_host_warns_and_says_how_to_require_a_login(shared_demo, tmp_path):
    result = subprocess.run([sys.executable, "-m", "imcap.demo", "host=0.0.0.0", f"ckpt_path={tmp_path / 'missing.ckpt'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                            env={**os.environ, "IMCAP_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert_one_line_error(result, "missing.ckpt")  # the check comes before the model loads: nothing binds
    (line,) = [ln for ln in result.stderr.splitlines() if "reachable from the network" in ln]
    assert "WARNING" in line and "host=0.0.0.0" in line and "auth_file=" in line
    assert "reachable from the network" not in (shared_demo[4] / "demo.out").read_text()  # on 127.0.0.1
    assert "a login from auth_file is required" in network_warning("0.0.0.0", "logins.txt")
    assert network_warning("localhost", None) is None and network_warning("::1", None) is None
    assert network_warning("192.168.1.20", None) and network_warning("my-host.local", None)


def test_the_safety_options_reach_gradio_and_bad_ones_are_one_line(trained_run, tmp_path, monkeypatch):
    options = serving_options(compose_config("demo"))
    assert options == {"queue_size": 20, "delete_cache": (600, 3600), "max_file_size": 20 * 2**20, "auth": None}
    for key in OFFLINE_ENV:  # build_app sets them for the server's process: this one gets its own back afterwards
        monkeypatch.setenv(key, os.environ.get(key, ""))
    app = build_app(load_model(f"{trained_run}/checkpoints/best.ckpt"), [], queue_size=3, delete_cache=(5, 60))
    assert app._queue.max_size == 3 and app.delete_cache == (5, 60)
    (tmp_path / "bad.txt").write_text("alice secret-in-a-bad-line\n")
    for override, fragment in (("max_file_size=lots", "max_file_size=lots"), ("queue_size=0", "queue_size=0"),
                               ("delete_cache=[600]", "delete_cache="), ("max_file_size=0mb", "max_file_size="),
                               (f"auth_file={tmp_path / 'none.txt'}", "cannot read auth_file"),
                               (f"auth_file={tmp_path / 'bad.txt'}", "line 1 is not user:password")):
        with pytest.raises(ImcapError, match="; ") as raised:
            serving_options(compose_config("demo", [override]))
        assert fragment in str(raised.value) and "secret-in-a-bad-line" not in str(raised.value)


def test_the_overlay_enlarges_small_images_and_shrinks_large_ones():
    import torch

    from imcap.demo import DISPLAY_SIZE, Demo
    from imcap.models.captioner import Caption

    caption = Caption("a red square", ["a", "red", "square"], torch.softmax(torch.randn(3, 49), dim=-1))
    for size, shown in (((64, 48), (341, 256)), ((4000, 3000), (DISPLAY_LONG_SIDE, 768)), ((500, 400), (500, 400))):
        assert Demo.overlay(Image.new("RGB", size, "red"), caption, 2).size == shown
    assert min(Demo.overlay(Image.new("RGB", (64, 64)), caption, 0).size) == DISPLAY_SIZE
