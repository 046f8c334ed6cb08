"""`imcap.caption` and `Captioner` without Lightning: captions for image files, one attention plot
per image even when names repeat; an unreadable image or a foreign checkpoint is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imcap.caption import caption_images
from imcap.models.captioner import Captioner
from tests.helpers.checkpoints import write_untrained_checkpoint
from tests.helpers.runs import assert_one_line_error, module


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


@pytest.mark.slow
def test_captioner_loads_without_lightning_and_captions_files(trained, make_cfg, tmp_path, data_dir):
    out, _ = trained
    images = sorted(p for p in data_dir.rglob("test_0000*.png"))[:2]
    captioner = Captioner.from_checkpoint(out / "checkpoints" / "best.ckpt")
    captions = captioner.caption(images)
    assert len(captions) == 2 and all(c.text == " ".join(c.words) for c in captions)
    cfg = make_cfg(f"ckpt_path={out}/checkpoints/best.ckpt", f"images=[{images[0]},{images[1]}]",
                   "attention_plots=true", name="caption", out=tmp_path / "cap")
    results = caption_images(cfg)
    written = json.loads((tmp_path / "cap" / "captions.json").read_text())
    assert [w["caption"] for w in written] == [c.text for _, c in results] == [c.text for c in captions]
    assert len(list((tmp_path / "cap" / "attention").glob("*.png"))) == sum(bool(c.words) for c in captions)


@pytest.mark.slow
def test_a_list_of_checkpoints_captions_as_their_ensemble(trained_run, tmp_path):
    from imcap.models.ensemble import DecoderEnsemble

    best = trained_run / "checkpoints" / "best.ckpt"
    alone, both = Captioner.load(best), Captioner.load([str(best), str(best)])
    assert isinstance(both.decoder, DecoderEnsemble) and len(both.decoder.members) == 2
    images = [Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 30, 200))]
    assert [c.text for c in both.caption(images)] == [c.text for c in alone.caption(images)]


def test_unreadable_image_names_the_file(tmp_path):
    # a foreign checkpoint is refused before images are read
    import torch

    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    result = module("caption", f"ckpt_path={tmp_path}/foreign.ckpt", f"images=[{tmp_path}/x.jpg]", cwd=tmp_path)
    assert_one_line_error(result, "image not found", "x.jpg")
    (tmp_path / "x.jpg").write_text("not a jpeg")
    result = module("caption", f"ckpt_path={tmp_path}/foreign.ckpt", f"images=[{tmp_path}/x.jpg]", cwd=tmp_path)
    assert_one_line_error(result, "was not written by imcap training")
