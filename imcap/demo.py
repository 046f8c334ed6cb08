"""A captioning web demo: `python -m imcap.demo ckpt_path=...` (or `make demo`).

A local Gradio page: upload or drop a photo and get its caption (beam size and maximum
length adjustable), then select a word to see where the model looked for it. Uploads are read
by imcap's own loader, as `imcap.caption` reads files: one that cannot be read (empty, cut short,
HEIC without pi-heif) is one line on the page naming it and saying why. Example images come from the test split
of the data the model was trained on. The page is served offline on 127.0.0.1 by default: Gradio's analytics and Hugging Face calls are off, the theme uses the
system's fonts, and no share link is made.

Safe to share: uploads are limited in size and deleted after a while, the queue of waiting
requests is bounded, the attention overlay has a bounded size for any image shape, Gradio
serves the example files only (never their folders), and a login can be required (auth_file).
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image

from imcap.caption import UNSUPPORTED, UNSUPPORTED_SUFFIXES, expand_images
from imcap.data.images import as_viewed, load_image
from imcap.entry import hydra_entry
from imcap.errors import ImcapError
from imcap.models.captioner import CHECKPOINT_KEY, Caption, Captioner, load_checkpoint
from imcap.viz.attention import attention_overlay, fit_size

log = logging.getLogger("imcap.demo")
# set before gradio is imported: it reads them at import time
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
MAX_BEAM, MAX_LENGTH = 20, 50
# The attention overlay's short side is enlarged to DISPLAY_SIZE (the shapes demo's 64 px images),
# and its long side is at most DISPLAY_LONG_SIDE: a thin 1 x N upload once became 256 x 256N pixels
# (a 71-byte 1 x 100 PNG cost 474 MB), now at most 1 x DISPLAY_LONG_SIDE; a 12 MP photo 1024 x 768.
DISPLAY_SIZE, DISPLAY_LONG_SIDE = 256, 1024
FILE_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}  # Gradio's units (1 kb = 1024 b)


def load_model(source: str | Path, device: str = "cpu", revision: str | None = None) -> Captioner:
    """A captioner from a training checkpoint, a folder written by `save_pretrained` (or
    `python -m imcap.export`), or a Hugging Face Hub repo id (at `revision`)."""
    return Captioner.load(source, map_location=device, revision=revision).to(device).eval()


def newest_checkpoint(log_dir: str | Path) -> Path:
    """The best checkpoint of the newest training run under `log_dir` (what `make train` left)."""
    runs = sorted(Path(log_dir).glob("train/runs/*/checkpoints/best.ckpt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise ImcapError(f"no trained model under {log_dir}/train/runs; run `make train` first, or pass "
                         "ckpt_path=.../checkpoints/best.ckpt")
    log.info("Using the newest run's checkpoint %s (pass ckpt_path=... for another)", runs[-1])
    return runs[-1]


def example_images(ckpt_path: str | Path, count: int) -> list[Path]:
    """The first `count` test images of the data a training checkpoint was trained on ([] with
    one log line for a model folder, or when that data is not on this machine)."""
    from hydra.utils import instantiate

    path = Path(ckpt_path)
    if not path.is_file():
        log.info("No example images: %s is a model folder or repo id, which names no data; "
                 "pass examples=FOLDER", ckpt_path)
        return []
    data = (load_checkpoint(path)[CHECKPOINT_KEY].get("data") or {}).get("source")
    if not data:
        log.info("No example images: the checkpoint stores no data config; pass examples=FOLDER")
        return []
    try:
        records = [r for r in instantiate(data).records() if r.split == "test"]
    except ImcapError as e:
        log.info("No example images: the training data is not readable here (%s); pass examples=FOLDER", e)
        return []
    return [Path(r.image_path) for r in records if Path(r.image_path).is_file()][:count]


class Demo:
    """What the page calls: caption one image, then draw one word's attention."""

    def __init__(self, captioner: Captioner):
        self.captioner = captioner

    @staticmethod
    def read(path: str | Path | None) -> Image.Image:
        """The uploaded file at `path` as viewers show it (imcap's loader: EXIF orientation, pixel
        modes, transparency on white), or one line naming the upload and why it cannot be read."""
        if path is None:
            raise ImcapError("no image: upload or drop a photo first")
        name = Path(path).name  # Gradio keeps the upload's own file name
        if Path(path).suffix.lower() in UNSUPPORTED_SUFFIXES:
            raise ImcapError(f"cannot read upload {name}: {UNSUPPORTED}")
        return load_image(str(path), name=f"upload {name}", fix="upload another photo")

    def caption(self, image: Image.Image | str | Path | None, beam_size: int, max_length: int) -> Caption:
        """The caption of `image` (a PIL image, or an uploaded file's path)."""
        if not isinstance(image, Image.Image):
            image = self.read(image)
        # a reranking model's beams are the candidates it chooses among (decoding.rerank_beams)
        beams = {"rerank_beams": int(beam_size)} if self.captioner.decoding.reranks else {}
        decoding = replace(self.captioner.decoding, method="beam" if beam_size > 1 else "greedy",
                           beam_size=int(beam_size), max_length=int(max_length),
                           min_length=min(self.captioner.decoding.min_length, int(max_length)), **beams)
        return self.captioner.caption([image], decoding)[0]  # as viewers show it: transparency on white

    @staticmethod
    def overlay(image: Image.Image, caption: Caption, index: int) -> Image.Image | None:
        """The image under word `index`'s attention (None for a model without attention)."""
        if caption.attention is None or not 0 <= index < len(caption.words):
            return None
        image = as_viewed(image)  # what was captioned: upright, transparency on white
        size = fit_size(image.size, max(DISPLAY_SIZE, min(image.size)), DISPLAY_LONG_SIDE)
        if size != image.size:
            image = image.resize(size, Image.BILINEAR)
        return attention_overlay(image, caption.attention[index])


def upload_path(preprocess: Callable[[Any], Any], payload: Any) -> Any:
    """The uploaded file's path, unopened, for the photo's gr.Image: Gradio's own preprocessing
    (`preprocess`) opens every upload with PIL, even for type="filepath", and an empty, truncated
    or HEIC file then fails there, before any function of ours, as Gradio's bare "The upstream
    Gradio app has raised an exception". imcap's loader reads the file and says what is wrong.
    (Set on the instance: a subclass of a Gradio component writes a .pyi file beside this module.)"""
    if payload is None or payload.path is None:  # nothing, or a data: URL: Gradio decodes those
        return preprocess(payload)
    return payload.path


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach a server bound to `host`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def network_warning(host: str, auth_file: str | None) -> str | None:
    """The one-line warning for a page that other machines can open (None on loopback)."""
    if is_loopback(host):
        return None
    login = ("a login from auth_file is required" if auth_file else "anyone who can reach this machine can use "
             "it and upload files; set auth_file=FILE (lines user:password) to require a login, or host=127.0.0.1")
    return f"host={host} makes the demo reachable from the network: {login}"


def read_logins(auth_file: str | Path) -> list[tuple[str, str]]:
    """(user, password) pairs from a file of `user:password` lines (blank and # lines skipped).

    A file, not a command-line option: Hydra writes options and overrides into the run directory.
    """
    path = Path(auth_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ImcapError(f"cannot read auth_file={path} ({e}); give a text file of user:password lines") from None
    logins = []
    for number, line in enumerate(lines, 1):
        user, colon, password = line.strip().partition(":")
        if not line.strip() or line.strip().startswith("#"):
            continue
        if not (colon and user and password):  # the line itself is never shown: it may hold a password
            raise ImcapError(f"auth_file={path} line {number} is not user:password; write one login a line")
        logins.append((user, password))
    if not logins:
        raise ImcapError(f"auth_file={path} holds no user:password line; add one login a line")
    return logins


def file_size_bytes(size: str | int) -> int:
    """`max_file_size` (bytes, or a number with b, kb, mb or gb) in bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?b)?\s*", str(size).lower())
    if not match or int(match[1]) < 1:
        raise ImcapError(f"max_file_size={size} is not a size; write e.g. max_file_size=20mb (units: b, kb, mb, gb)")
    return int(match[1]) * FILE_SIZE_UNITS[match[2] or "b"]


UPLOADS_PREFIX = "imcap-demo-"


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def private_upload_dir() -> Path:
    """A folder only this demo writes its uploads and overlays to (Gradio's GRADIO_TEMP_DIR), removed
    when it stops: Gradio serves every file in its temp folder, and /tmp/gradio is shared by every
    Gradio app of the machine and kept after they stop. A demo killed with SIGKILL cannot remove
    its own folder: the next demo removes the folders of demos no longer running."""
    for stale in Path(tempfile.gettempdir()).glob(f"{UPLOADS_PREFIX}*-*"):
        pid = stale.name[len(UPLOADS_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and stale.stat().st_uid == os.getuid() and not is_running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{UPLOADS_PREFIX}{os.getpid()}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def build_app(captioner: Captioner, examples: list[Path], queue_size: int | None = None,
              delete_cache: tuple[int, int] | None = None) -> Any:
    """The Gradio Blocks page (not yet launched): at most `queue_size` requests wait; every
    delete_cache[0] seconds, uploads and overlays older than delete_cache[1] seconds are deleted."""
    os.environ.update(OFFLINE_ENV)
    import gradio as gr

    demo = Demo(captioner)
    default = captioner.decoding
    has_attention = bool((captioner.architecture.get("attention") or {}).get("_target_"))

    def refuse(e: ImcapError) -> gr.Error:
        """The reason on the page and as one line in the server's log (not Gradio's traceback)."""
        log.warning("%s", e)
        return gr.Error(str(e), print_exception=False)

    def caption(path, beam_size, max_length):
        try:
            image = demo.read(path)
            result = demo.caption(image, beam_size, max_length)
        except ImcapError as e:
            raise refuse(e) from e
        words = [f"{k + 1}. {w}" for k, w in enumerate(result.words)]
        state = {"words": result.words,
                 "attention": result.attention.tolist() if result.attention is not None else None}
        first = demo.overlay(image, result, 0)
        return result.text, gr.update(choices=words, value=words[0] if words else None), first, state

    def show_word(path, word, state):
        if path is None or not word or not state or state["attention"] is None:
            return None
        index = int(word.split(".", 1)[0]) - 1
        attention = torch.tensor(state["attention"])
        try:
            image = demo.read(path)
        except ImcapError as e:  # the upload was deleted (delete_cache) since it was captioned
            raise refuse(e) from e
        return demo.overlay(image, Caption(" ".join(state["words"]), state["words"], attention), index)

    with gr.Blocks(title="imcap demo", analytics_enabled=False, delete_cache=delete_cache) as app:
        gr.Markdown("## imcap: caption a photo\nUpload or drop a photo; then pick a word to see "
                    "where the model looked while writing it.")
        state = gr.State()
        with gr.Row():
            with gr.Column():
                # the file's own path, read by imcap as viewers show it (not by Gradio's preprocessing)
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="photo",
                                 elem_id="photo", height=300)
                image.preprocess = partial(upload_path, image.preprocess)
                beams = default.rerank_beams if default.reranks else default.beam_size
                beam = gr.Slider(1, MAX_BEAM, value=beams if default.method == "beam" else 1, step=1,
                                 label="beams (1: greedy; a reranking model chooses among them)")
                length = gr.Slider(1, MAX_LENGTH, value=default.max_length, step=1, label="maximum length (words)")
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[image], label="test-set images")
            with gr.Column():
                text = gr.Textbox(label="caption", interactive=False, elem_id="caption")
                word = gr.Radio([], label="word", elem_id="words", visible=has_attention)
                heat = gr.Image(label="attention", interactive=False, elem_id="attention", visible=has_attention,
                                height=300)
        outputs = [text, word, heat, state]
        button.click(caption, [image, beam, length], outputs, api_name="caption")
        image.upload(caption, [image, beam, length], outputs, api_name=False)
        word.change(show_word, [image, word, state], heat, api_name=False)
    return app.queue(max_size=queue_size)


def serving_options(cfg: DictConfig) -> dict[str, Any]:
    """The checked safety options of conf/demo.yaml, as `build_app` and Gradio's `launch` take them."""
    if cfg.queue_size is not None and int(cfg.queue_size) < 1:
        raise ImcapError(f"queue_size={cfg.queue_size} lets no request wait; set queue_size=20 (or null: no limit)")
    delete_cache = None
    if cfg.delete_cache is not None:
        if len(cfg.delete_cache) != 2 or min(int(v) for v in cfg.delete_cache) < 1:
            raise ImcapError(f"delete_cache={list(cfg.delete_cache)} is not [every_seconds, age_seconds]; "
                             "write e.g. delete_cache=[600,3600] (or null: keep uploads until the demo stops)")
        delete_cache = (int(cfg.delete_cache[0]), int(cfg.delete_cache[1]))
    return {"queue_size": cfg.queue_size, "delete_cache": delete_cache,
            "max_file_size": None if cfg.max_file_size is None else file_size_bytes(cfg.max_file_size),
            "auth": read_logins(cfg.auth_file) if cfg.auth_file else None}


def launch(cfg: DictConfig) -> None:
    options = serving_options(cfg)  # a bad option fails before the model loads
    if warning := network_warning(str(cfg.host), cfg.auth_file):
        log.warning(warning)
    ckpt_path = cfg.ckpt_path or newest_checkpoint(cfg.paths.log_dir)
    captioner = load_model(ckpt_path, cfg.device, cfg.get("revision"))
    examples = (expand_images(str(cfg.examples)) if cfg.get("examples")
                else example_images(ckpt_path, cfg.num_examples))[: cfg.num_examples]
    if not os.environ.get("GRADIO_TEMP_DIR"):  # set before gradio is imported: some modules read it then
        os.environ["GRADIO_TEMP_DIR"] = str(private_upload_dir())
    # SIGTERM (kill, systemd, docker stop) stops the server as Ctrl-C does, so the uploads are
    # deleted, from the moment the server starts (Gradio's launch answers pages before it returns)
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, stop_once)
    app = build_app(captioner, examples, options["queue_size"], options["delete_cache"])
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts to fetch
    try:
        try:
            # the example files themselves, never their folders: Gradio serves everything below an allowed folder
            app.launch(server_name=cfg.host, server_port=cfg.port, share=False, inbrowser=False, ssr_mode=False,
                       theme=theme, allowed_paths=[str(p.resolve()) for p in examples], quiet=False,
                       max_file_size=options["max_file_size"], auth=options["auth"], prevent_thread_lock=True)
        except OSError as e:
            if "Cannot find empty port" not in str(e):
                raise
            raise ImcapError(port_error(cfg.host, cfg.port)) from None
        log.info("Serving the demo on %s (Ctrl-C stops it)", app.local_url)  # the port Gradio found free
        while app.is_running:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    log.info("Stopping the demo and deleting its uploads")
    app.close()


def stop_once(signum: int, frame: Any) -> None:
    """The first Ctrl-C or SIGTERM stops the demo; later ones are ignored while it closes and its
    uploads are deleted (atexit): a user pressing twice would otherwise end the process there,
    with the uploads left and an error line meant for other commands."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    raise KeyboardInterrupt


def port_error(host: str, port: int | None) -> str:
    """Why the demo could not listen (Gradio says "Cannot find empty port") and what to do."""
    if port is None:
        first = int(os.environ.get("GRADIO_SERVER_PORT", 7860))
        last = first + int(os.environ.get("GRADIO_NUM_PORTS", 100)) - 1
        return f"no free port on {host} from {first} to {last}; pass port=N with a free one"
    return (f"port={port} on {host} is in use by another program (or below 1024, which needs root); "
            f"pass another port=N, or leave port unset to take the next free one from 7860")


@hydra_entry("demo")
def main(cfg: DictConfig) -> None:
    launch(cfg)


if __name__ == "__main__":
    main()
