"""A captioning web demo: `python -m imcap.demo ckpt_path=...` (or `make demo`).

A local Gradio page: upload or drop a photo and get its caption (beam size and maximum
length adjustable), then select a word to see where the model looked for it. Example images
come from the test split of the data the model was trained on. The page is served offline on
127.0.0.1 by default: Gradio's analytics and Hugging Face calls are off, the theme uses the
system's fonts, and no share link is made.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image

from imcap.caption import expand_images
from imcap.entry import hydra_entry
from imcap.errors import ImcapError
from imcap.models.captioner import CHECKPOINT_KEY, Caption, Captioner, load_checkpoint
from imcap.viz.attention import attention_overlay

log = logging.getLogger("imcap.demo")
# set before gradio is imported: it reads them at import time
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
MAX_BEAM, MAX_LENGTH = 20, 50
DISPLAY_SIZE = 256  # the attention overlay's shorter side is at least this many pixels


def load_model(source: str | Path, device: str = "cpu") -> Captioner:
    """A captioner from a training checkpoint, a folder written by `save_pretrained` (or
    `python -m imcap.export`), or a Hugging Face Hub repo id."""
    return Captioner.load(source, map_location=device).to(device).eval()


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

    def caption(self, image: Image.Image | None, beam_size: int, max_length: int) -> Caption:
        if image is None:
            raise ImcapError("no image: upload or drop a photo first")
        # a reranking model's beams are the candidates it chooses among (decoding.rerank_beams)
        beams = {"rerank_beams": int(beam_size)} if self.captioner.decoding.reranks else {}
        decoding = replace(self.captioner.decoding, method="beam" if beam_size > 1 else "greedy",
                           beam_size=int(beam_size), max_length=int(max_length),
                           min_length=min(self.captioner.decoding.min_length, int(max_length)), **beams)
        return self.captioner.caption([image.convert("RGB")], decoding)[0]

    @staticmethod
    def overlay(image: Image.Image, caption: Caption, index: int) -> Image.Image | None:
        """The image under word `index`'s attention (None for a model without attention)."""
        if caption.attention is None or not 0 <= index < len(caption.words):
            return None
        scale = -(-DISPLAY_SIZE // min(image.size))  # small images (the shapes demo) shown larger
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale), Image.BILINEAR)
        return attention_overlay(image, caption.attention[index])


def build_app(captioner: Captioner, examples: list[Path]) -> Any:
    """The Gradio Blocks page (not yet launched)."""
    os.environ.update(OFFLINE_ENV)
    import gradio as gr

    demo = Demo(captioner)
    default = captioner.decoding
    has_attention = bool((captioner.architecture.get("attention") or {}).get("_target_"))

    def caption(image, beam_size, max_length):
        try:
            result = demo.caption(image, beam_size, max_length)
        except ImcapError as e:
            raise gr.Error(str(e)) from e
        words = [f"{k + 1}. {w}" for k, w in enumerate(result.words)]
        state = {"words": result.words,
                 "attention": result.attention.tolist() if result.attention is not None else None}
        first = demo.overlay(image, result, 0)
        return result.text, gr.update(choices=words, value=words[0] if words else None), first, state

    def show_word(image, word, state):
        if image is None or not word or not state or state["attention"] is None:
            return None
        index = int(word.split(".", 1)[0]) - 1
        attention = torch.tensor(state["attention"])
        return demo.overlay(image, Caption(" ".join(state["words"]), state["words"], attention), index)

    with gr.Blocks(title="imcap demo", analytics_enabled=False) as app:
        gr.Markdown("## imcap: caption a photo\nUpload or drop a photo; then pick a word to see "
                    "where the model looked while writing it.")
        state = gr.State()
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", sources=["upload", "clipboard"], label="photo", elem_id="photo",
                                 height=300)
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
    return app


def launch(cfg: DictConfig) -> None:
    ckpt_path = cfg.ckpt_path or newest_checkpoint(cfg.paths.log_dir)
    captioner = load_model(ckpt_path, cfg.device)
    examples = (expand_images(str(cfg.examples)) if cfg.get("examples")
                else example_images(ckpt_path, cfg.num_examples))[: cfg.num_examples]
    app = build_app(captioner, examples)
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts to fetch
    log.info("Serving the demo on http://%s:%s (Ctrl-C stops it)", cfg.host, cfg.port or "7860+")
    app.launch(server_name=cfg.host, server_port=cfg.port, share=False, inbrowser=False, ssr_mode=False,
               theme=theme, allowed_paths=[str(p.parent) for p in examples], quiet=False)


@hydra_entry("demo")
def main(cfg: DictConfig) -> None:
    launch(cfg)


if __name__ == "__main__":
    main()
