"""Caption new images: `python -m imcap.caption ckpt_path=... 'images=[a.jpg,b.jpg]'`.

`ckpt_path` is a training checkpoint (.ckpt), a folder written by `python -m imcap.export`, or
the Hugging Face Hub repo id of such a folder.

Prints `<image>\\t<caption>` per image and writes them as JSON; `attention_plots=true` also
writes one figure per image with a heat map per generated word. `images` may name folders.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig

from imcap.config import decoding_with_overrides
from imcap.data.images import load_image
from imcap.entry import hydra_entry
from imcap.errors import ImcapError
from imcap.files import write_json
from imcap.models.captioner import Caption, Captioner
from imcap.models.search import Decoding

log = logging.getLogger("imcap.caption")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def expand_images(images: str | list[str]) -> list[Path]:
    """Image paths from files and folders (a folder contributes its images, sorted)."""
    items = [images] if isinstance(images, str) else list(images)
    paths: list[Path] = []
    for item in items:
        p = Path(str(item))
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise ImcapError(f"image not found: {p}; pass existing files or folders in images=[...]")
    if not paths:
        raise ImcapError(f"no images found in images={items}")
    return paths


def caption_images(cfg: DictConfig) -> list[tuple[Path, Caption]]:
    images = cfg.images
    paths = expand_images(list(images) if isinstance(images, ListConfig) else str(images))
    device = torch.device(cfg.device)
    captioner = Captioner.load(cfg.ckpt_path, map_location=device).to(device)  # .ckpt, folder or repo id
    decoding = Decoding(**decoding_with_overrides(asdict(captioner.decoding), cfg.get("decoding")))
    captions = captioner.caption(paths, decoding, batch_size=cfg.batch_size)
    results = list(zip(paths, captions))
    for path, cap in results:
        print(f"{path}\t{cap.text}", flush=True)
    out = Path(cfg.output)
    plots = cfg.attention_plots and bool(captions) and captions[0].attention is not None
    if cfg.attention_plots and not plots:
        log.warning("This model has no attention (model/attention=none): no attention plots")
    plot_dir = out.parent / "attention"
    plot_names = plot_file_names(paths)
    written = []
    for (path, cap), name in zip(results, plot_names):
        entry = {"image": str(path), "caption": cap.text}
        if plots and cap.words:
            from imcap.viz.attention import plot_caption_attention

            plot_caption_attention(load_image(str(path)), cap.words, cap.attention, plot_dir / name)
            entry["attention_plot"] = str(plot_dir / name)
        written.append(entry)
    if plots:
        log.info("Wrote attention plots to %s", plot_dir)
    write_json(out, written)
    log.info("Wrote %s", out)
    return results


def plot_file_names(paths: list[Path]) -> list[str]:
    """One file name per image, unique even when images in different folders share a name
    (a/x.jpg and b/x.jpg): `<position>-<stem>.png`, in the order of the captions."""
    width = len(str(len(paths)))
    return [f"{i:0{width}d}-{p.stem}.png" for i, p in enumerate(paths, 1)]


@hydra_entry("caption")
def main(cfg: DictConfig) -> None:
    caption_images(cfg)


if __name__ == "__main__":
    main()
