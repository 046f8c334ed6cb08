import json

import pytest
import torch

from imcap.metrics.grounding import GroundingRate, cell_centres
from tests.helpers.images import write_image
from tests.helpers.runs import module

# a 64-pixel image, 2x2 grid: cells (row-major) are top-left, top-right, bottom-left, bottom-right
OBJECTS = [{"color": "red", "shape": "circle", "box": [0, 0, 30, 30]},
           {"color": "blue", "shape": "square", "box": [34, 34, 64, 64]}]


def attention_on(cells: list[int]) -> torch.Tensor:
    att = torch.full((1, len(cells), 4), 0.1)
    for t, c in enumerate(cells):
        att[0, t, c] = 0.7
    return att


def test_cell_centres_are_row_major():
    assert cell_centres(4, 64).tolist() == [[16, 16], [48, 16], [16, 48], [48, 48]]
    with pytest.raises(ValueError):
        cell_centres(5, 64)


def test_hits_misses_and_chance():
    metric = GroundingRate()
    words = [["a", "red", "circle", "and", "a", "blue", "square"]]
    # red -> top-left (hit), circle -> bottom-right (miss), blue -> bottom-right (hit), square -> top-left (miss)
    metric.update(words, attention_on([0, 0, 3, 0, 0, 3, 0]), [OBJECTS], [64], [0])
    result = metric.compute()
    assert float(result["grounding"]) == pytest.approx(0.5)
    assert float(result["grounding_chance"]) == pytest.approx(0.25)  # one cell of four per word


def test_words_naming_no_object_and_images_without_annotations_are_not_counted():
    metric = GroundingRate()
    metric.update([["a", "green", "triangle"], ["a", "red", "circle"]], torch.cat([attention_on([0, 0, 0])] * 2),
                  [OBJECTS, None], [64, None], [0, 1])
    assert float(metric.compute()["grounding_words"]) == 0


def test_an_image_seen_twice_counts_once():
    """A DDP sampler pads the last batches with repeated images: they must not weigh twice."""
    once, twice = GroundingRate(), GroundingRate()
    hit, miss = (["a", "red", "circle"], attention_on([0, 0, 0])), (["a", "blue", "square"], attention_on([0, 0, 0]))
    for metric, images in ((once, [(hit, 7), (miss, 8)]), (twice, [(hit, 7), (miss, 8), (miss, 8)])):
        for (words, attention), index in images:
            metric.update([words], attention, [OBJECTS], [64], torch.tensor([index]))
    assert float(once.compute()["grounding"]) == pytest.approx(0.5)
    assert {k: float(v) for k, v in twice.compute().items()} == {k: float(v) for k, v in once.compute().items()}


@pytest.mark.slow
def test_photos_without_object_boxes_are_evaluated_without_a_grounding_warning_or_metric(trained_run, tmp_path):
    """Flickr, COCO and one's own photos have no object boxes: grounding is neither computed
    (torchmetrics warned that GroundingRate was computed before any update) nor logged."""
    for split in ("train", "test"):  # the custom source wants training images, also to evaluate
        for i, colour in enumerate([(200, 30, 30), (30, 160, 60), (40, 60, 200)]):
            image = write_image(tmp_path / "photos" / split / f"{i:02d}.png", colour, 32)
            image.with_suffix(".txt").write_text("a red circle and a blue square\n", encoding="utf-8")
    result = module("eval", f"ckpt_path={trained_run}/checkpoints/best.ckpt", "data=custom",
                    f"data.root={tmp_path / 'photos'}", "data.features=none", "metrics=[BLEU]",
                    "hydra.run.dir=eval", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was called before the ``update`` method" not in result.stderr, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "test/BLEU-4" in metrics and not any("grounding" in name for name in metrics), metrics
