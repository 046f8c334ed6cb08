"""What each paper recipe (conf/experiment/) costs per step, measured on this machine.

For every recipe: the encoder's images/s at the recipe's image size (features are computed
once, the encoder is frozen), the grid it yields, and one cross-entropy training step of the
recipe's decoder (teacher-forced forward, loss, backward, optimiser step) in captions/s and
GFLOP per caption; for a recipe with SCST, one SCST step as well (sampling, greedy or mean
baseline, policy-gradient backward; the reward is left out: a constant). Random weights, a
10,000-word vocabulary, captions of 16 tokens, fp32.

    python experiments/paper_recipes/step_cost.py --output experiments/paper_recipes/step_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from imcap.config_compose import compose_config
from imcap.data.vocab import SPECIALS, Vocabulary
from imcap.models.captioner import COMPONENTS, build_captioner
from imcap.training.losses import caption_cross_entropy
from imcap.training.scst import SCST, scst_loss

RECIPES = ("sat_flickr8k", "updown_coco", "transformer_scst_coco")
VOCAB = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(10_000 - len(SPECIALS)))])
LENGTH = 16


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(recipe: str, batch: int, images: int, repeats: int) -> dict:
    cfg = compose_config("train", [f"experiment={recipe}"], Path(tempfile.gettempdir()))
    model = OmegaConf.to_container(cfg.model, resolve=True)
    size = cfg.data.image_size
    captioner = build_captioner({k: model[k] for k in COMPONENTS}, VOCAB, size, pretrained=False)
    encoder, decoder = captioner.encoder.eval(), captioner.decoder.train()
    pixels = torch.randn(images, 3, size, size)
    with torch.no_grad():
        grid, _ = encoder(pixels[:1])
        encode = seconds(lambda: encoder(pixels), repeats)
    cells, channels = grid.shape[1:]
    torch.manual_seed(0)
    grid = torch.randn(batch, cells, channels)
    tokens = torch.randint(len(SPECIALS), len(VOCAB), (batch, LENGTH + 1))
    optimizer = instantiate(model["optimizer"])(decoder.parameters())

    def xe_step():
        logits, _ = decoder(grid, grid.mean(1), tokens[:, :-1])
        loss = caption_cross_entropy(logits, tokens[:, 1:], VOCAB.pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        xe_step()
    out = {
        "recipe": recipe, "image_size": size, "grid": f"{int(cells ** 0.5)}x{int(cells ** 0.5)}x{channels}",
        "decoder_parameters_M": sum(p.numel() for p in decoder.parameters()) / 1e6,
        "encoder_images_per_s": images / encode,
        "xe_gflop_per_caption": counter.get_total_flops() / batch / 1e9,
        "xe_captions_per_s": batch / seconds(xe_step, repeats),
    }
    if model.get("scst", {}).get("start_epoch") is not None:
        config = SCST(**{**model["scst"], "start_epoch": 0})
        references = [["w1 w2"]] * batch

        def scst_step():
            loss = scst_loss(decoder, grid, grid.mean(1), references, VOCAB,
                             lambda c, r: torch.zeros(len(c)), config)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        out["scst_images_per_s"] = batch / seconds(scst_step, repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    results = {"load_average": list(os.getloadavg()), "threads": torch.get_num_threads(),
               "recipes": [measure(r, args.batch, args.images, args.repeats) for r in RECIPES]}
    print(json.dumps(results, indent=1))
    if args.output:
        args.output.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
