"""The Show-Attend-Tell figure: a heat map per word, where the attention is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imcap.viz.attention import (
    attention_heatmap,
    caption_attention_figure,
    figure_to_image,
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
