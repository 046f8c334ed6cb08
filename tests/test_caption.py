"""imcap.caption: one caption per image, and one attention plot per image even when names repeat."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from imcap.caption import caption_images
from tests.helpers import write_untrained_checkpoint


def test_images_with_the_same_name_in_different_folders_get_their_own_plots(make_cfg, tmp_path):
    write_untrained_checkpoint(make_cfg(out=tmp_path / "train"), tmp_path / "model.ckpt")
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / folder / "x.png")
    cfg = make_cfg(f"ckpt_path={tmp_path}/model.ckpt", f"images=[{tmp_path}/a/x.png,{tmp_path}/b/x.png]",
                   "attention_plots=true", "decoding.min_length=3", name="caption", out=tmp_path / "cap")
    caption_images(cfg)
    written = json.loads((tmp_path / "cap" / "captions.json").read_text())
    assert [w["image"] for w in written] == [f"{tmp_path}/a/x.png", f"{tmp_path}/b/x.png"]
    plots = [w["attention_plot"] for w in written]
    assert len(set(plots)) == 2 and all(Image.open(p).size for p in plots)
    assert sorted(p.name for p in (tmp_path / "cap" / "attention").iterdir()) == ["1-x.png", "2-x.png"]
