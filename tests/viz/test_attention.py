"""The Show-Attend-Tell figure: a heat map per word, where the attention is."""

from __future__ import annotations

import tracemalloc

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from imcap.viz.attention import (
    FIGURE_SIDE,
    attention_heatmap,
    attention_overlay,
    caption_attention_figure,
    figure_to_image,
    fit_size,
    plot_caption_attention,
)


def test_the_heat_map_is_hottest_over_the_attended_cell():
    weights = torch.zeros(16)
    weights[1 * 4 + 3] = 1.0  # row 1, column 3 of a 4 x 4 grid
    heat = attention_heatmap(weights, (64, 64))  # (H, W)
    assert heat.shape == (64, 64) and heat.min() == 0 and heat.max() == pytest.approx(1)
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert 16 <= row < 32 and 48 <= col < 64


def test_a_grid_that_is_not_square_is_refused():
    with pytest.raises(ValueError, match="not a square grid"):
        attention_heatmap(torch.ones(12), (8, 8))


def test_the_figure_has_the_image_then_one_titled_panel_per_word(tmp_path):
    image = Image.new("RGB", (32, 32), (0, 120, 0))
    words = ["a", "green", "square"]
    attention = torch.softmax(torch.randn(3, 49), dim=-1)  # (words, N)
    fig = caption_attention_figure(image, words, attention, columns=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["input", *words] and fig._suptitle.get_text() == "a green square"
    assert figure_to_image(fig).mode == "RGB"
    path = plot_caption_attention(image, words, attention, tmp_path / "figs" / "x.png")
    assert Image.open(path).size[0] > 0


@pytest.mark.parametrize("size", [(1, 5000), (5000, 1), (3, 40000), (64, 64), (4000, 3000), (300, 20)])
def test_a_display_size_is_bounded_for_any_shape(size):
    width, height = fit_size(size, 256, 1024)
    assert 1 <= width <= 1024 and 1 <= height <= 1024
    if max(size) * 256 <= 1024 * min(size):  # not thin: the short side is enlarged (or shrunk) to 256
        assert min(width, height) == 256


def test_the_overlay_is_coloured_like_jet_without_a_float64_canvas():
    weights = torch.softmax(torch.randn(49), dim=0)
    image = Image.new("RGB", (1000, 1000), (40, 80, 120))
    heat = attention_heatmap(weights, (1000, 1000))
    tracemalloc.start()
    overlay = attention_overlay(image, weights)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # matplotlib's jet of a 1000 x 1000 map is a 32 MB float64 RGBA array (and its copy * 255)
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MB"
    jet = plt.get_cmap("jet")(heat)[..., :3] * 255
    expected = np.asarray(image, dtype=np.float64) * 0.5 + jet * 0.5
    assert np.abs(np.asarray(overlay, dtype=np.float64) - expected).max() <= 4  # a 256-colour table


@pytest.mark.parametrize("size", [(4000, 3000), (1, 5000), (5000, 1)])
def test_the_figure_draws_any_photo_from_a_bounded_number_of_pixels(size, tmp_path):
    image = Image.new("RGB", size, (0, 120, 0))
    words = ["a", "long", "photo"]
    attention = torch.softmax(torch.randn(3, 49), dim=-1)
    fig = caption_attention_figure(image, words, attention)
    drawn = [artist.get_array().shape[:2] for ax in fig.axes for artist in ax.get_images()]
    assert len(drawn) == 1 + 2 * len(words)  # the photo, then photo and heat map per word
    assert all(max(shape) <= FIGURE_SIDE for shape in drawn), drawn
    path = plot_caption_attention(image, words, attention, tmp_path / "x.png")
    assert max(Image.open(path).size) <= 1000  # the figure's own size, whatever the photo's
