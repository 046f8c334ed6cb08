"""The Show-Attend-Tell figure: the image, then one attention heat map per generated word."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

# The figure's panels are about 190 px wide at its 80 dpi: a photo is drawn from at most this
# many pixels a side, so a 48-megapixel photo costs no more memory than a thumbnail.
FIGURE_SIDE = 512


def fit_size(size: tuple[int, int], short: int, long: int) -> tuple[int, int]:
    """(width, height) scaled so the short side reaches `short` unless the long side would pass
    `long`: a bounded size for any shape (a 1 x 5000 strip stays 1 x `long`, never 256 x 1.3M)."""
    width, height = size
    scale = min(short / min(width, height), long / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def bounded(image: Image.Image, side: int) -> Image.Image:
    """`image` shrunk (never enlarged) so that neither side is longer than `side`."""
    if max(image.size) <= side:
        return image
    return image.resize(fit_size(image.size, side, side), Image.BILINEAR)


def _jet_table() -> np.ndarray:
    """The jet colour map as 256 uint8 RGB rows: a heat map is coloured by lookup in uint8,
    not through matplotlib's float64 RGBA of the whole canvas (32 bytes a pixel, not 3)."""
    return (plt.get_cmap("jet")(np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def attention_heatmap(weights: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Upsample one word's weights over an N = g x g grid to an (H, W) map in [0, 1]."""
    g = math.isqrt(weights.numel())
    if g * g != weights.numel():
        raise ValueError(f"attention over {weights.numel()} cells is not a square grid")
    grid = weights.float().reshape(1, 1, g, g)
    up = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0]
    up = up - up.min()
    return (up / up.max().clamp_min(1e-12)).numpy()


def attention_overlay(image: Image.Image, weights: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """One word's attention as a jet heat map blended over the image (the figure's panel,
    without matplotlib's axes; for interactive use)."""
    image = image.convert("RGB")
    heat = attention_heatmap(weights, (image.height, image.width))  # (H, W) float32 in [0, 1]
    colours = _jet_table()[(heat * 255).round().astype(np.uint8)]  # (H, W, 3) uint8
    return Image.blend(image, Image.fromarray(colours), alpha)


def caption_attention_figure(
    image: Image.Image, words: list[str], attention: torch.Tensor, columns: int = 5
) -> plt.Figure:
    """The image with its caption, then each word over its attention map.

    attention: (len(words), N) weights per word.
    """
    image = bounded(image.convert("RGB"), FIGURE_SIDE)
    panels = len(words) + 1
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title("input", fontsize=10)
    pixels = np.asarray(image)
    for k, word in enumerate(words):
        ax = axes.flat[k + 1]
        ax.imshow(pixels)
        ax.imshow(attention_heatmap(attention[k], pixels.shape[:2]), cmap="jet", alpha=0.5)
        ax.set_title(word, fontsize=10)
    fig.suptitle(" ".join(words), fontsize=10)
    fig.tight_layout()
    return fig


def figure_to_image(fig: plt.Figure) -> Image.Image:
    """Render and close a figure (for loggers that take images)."""
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    plt.close(fig)
    return image


def plot_caption_attention(
    image: Image.Image, words: list[str], attention: torch.Tensor, path: str | Path, columns: int = 5
) -> Path:
    """Save `caption_attention_figure` as an image file."""
    fig = caption_attention_figure(image, words, attention, columns)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
