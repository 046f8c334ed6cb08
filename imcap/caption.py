"""Caption new images: `python -m imcap.caption ckpt_path=... 'images=[a.jpg,b.jpg]'`.

Prints `<image>\\t<caption>` per image and writes them as JSON; `attention_plots=true` also
writes one figure per image with a heat map per generated word. `images` may name folders.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig

from imcap.cli import decoding_with_overrides, hydra_entry, write_json
from imcap.data.images import load_image
from imcap.errors import ImcapError
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
    captioner = Captioner.from_checkpoint(cfg.ckpt_path, map_location=device).to(device)
    decoding = Decoding(**decoding_with_overrides(asdict(captioner.decoding), cfg.get("decoding")))
    captions = captioner.caption(paths, decoding, batch_size=cfg.batch_size)
    results = list(zip(paths, captions))
    for path, cap in results:
        print(f"{path}\t{cap.text}", flush=True)
    out = Path(cfg.output)
    write_json(out, [{"image": str(p), "caption": c.text} for p, c in results])
    log.info("Wrote %s", out)
    if cfg.attention_plots:
        if captions and captions[0].attention is None:
            log.warning("This model has no attention (model/attention=none): no attention plots")
        else:
            from imcap.viz.attention import plot_caption_attention

            plot_dir = out.parent / "attention"
            for path, cap in results:
                if cap.words:
                    plot_caption_attention(load_image(str(path)), cap.words, cap.attention,
                                           plot_dir / f"{path.stem}.png")
            log.info("Wrote attention plots to %s", plot_dir)
    return results


@hydra_entry("caption")
def main(cfg: DictConfig) -> None:
    caption_images(cfg)


if __name__ == "__main__":
    main()
