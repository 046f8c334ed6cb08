"""How consensus reranking's settings were chosen: the runs of one variant (trained without
reranking), decoded again with every combination of beams x neighbours x log-probability weight,
scored on the validation and the test images against beam 3's most probable caption.

    python experiments/real_photo_recipe/rerank_grid.py --out /path/to/ablation/out --variant no_rerank

Reads each run's checkpoints/best.ckpt and the feature cache of its data (`--data-dir`, as
ablation.py writes them); writes table-rerank-grid.md and results-rerank-grid.json here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from imcap.data.vocab import Vocabulary
from imcap.metrics.coco import CaptionMetrics
from imcap.models.captioner import CHECKPOINT_KEY, Captioner, load_checkpoint
from imcap.models.rerank import NeighbourMemory, pick_by_consensus
from imcap.models.search import Decoding, beam_search, decoding_rules

HERE = Path(__file__).resolve().parent
BASELINE = (3, 0, 0.0)  # beam 3, no reranking


def split_features(captioner: Captioner, datamodule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached grid (M, N, C) and pooled (M, C) features of `split`'s images, in record order."""
    rows = np.stack([np.asarray(f, dtype=np.float32) for f in datamodule._dataset(split).features])
    return captioner.encoder.from_cache(torch.from_numpy(rows))


def score(captions: list[str], references: list[list[str]]) -> dict[str, float]:
    metric = CaptionMetrics(["BLEU", "CIDEr-D"])
    metric.update(list(range(len(captions))), captions, references)
    return {k: float(v) for k, v in metric.compute().items() if k in ("BLEU-4", "CIDEr-D")}


@torch.no_grad()
def grid_of_one_run(ckpt: Path, beams: list[int], neighbours: list[int], weights: list[float]) -> dict:
    meta = load_checkpoint(ckpt)[CHECKPOINT_KEY]
    captioner = Captioner.from_checkpoint(ckpt)
    datamodule = instantiate(OmegaConf.create(meta["data"]))
    datamodule.prepare_data()
    vocab = datamodule.build_vocab(Vocabulary(meta["vocab"]))
    datamodule.attach_encoder(captioner.encoder)
    train = datamodule._dataset("train")
    memory = NeighbourMemory.build(split_features(captioner, datamodule, "train")[1],
                                   [[ids[1:-1] for ids in image] for image in train.tokens])
    rules = decoding_rules(vocab, Decoding(**meta["decoding"]))
    ids = (vocab.bos_id, vocab.eos_id, vocab.pad_id)
    out: dict = {}
    for split in ("val", "test"):
        grid, pooled = split_features(captioner, datamodule, split)
        references = [list(r.captions) for r in datamodule.records[split]]
        for k in sorted({*beams, BASELINE[0]}):
            found = beam_search(captioner.decoder, grid, pooled, *ids, k, meta["decoding"]["max_length"],
                                block_trigrams=meta["decoding"]["block_trigrams"], all_hypotheses=True, **rules)
            settings = [(k, 0, 0.0)] + ([(k, n, w) for n, w in itertools.product(neighbours, weights)]
                                        if k in beams else [])
            for beam, n, w in settings:
                pick = (torch.zeros(len(grid), dtype=torch.long) if n == 0
                        else pick_by_consensus(found.tokens, found.scores, pooled, memory, n, w, vocab.eos_id))
                captions = [vocab.decode_text(found.tokens[b, pick[b]]) for b in range(len(grid))]
                out[f"{split} {beam} {n} {w}"] = {**score(captions, references), "distinct": len(set(captions))}
    return out


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):+.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:+.3f}"


def report(results: dict[str, dict]) -> str:
    runs = sorted(results)
    base = {split: f"{split} {BASELINE[0]} {BASELINE[1]} {BASELINE[2]}" for split in ("val", "test")}
    settings = sorted({key.split(" ", 1)[1] for key in results[runs[0]]},
                      key=lambda s: tuple(float(x) for x in s.split()))
    rows = ["| beams | neighbours | log-prob weight | val Δ CIDEr-D (higher in) | val Δ BLEU-4 | test CIDEr-D "
            "| test Δ CIDEr-D (higher in) | test BLEU-4 |", "|---|---|---|---|---|---|---|---|"]
    for setting in settings:
        line = [*setting.split()]
        for split in ("val", "test"):
            got = [results[r][f"{split} {setting}"] for r in runs]
            ref = [results[r][base[split]] for r in runs]
            d_cider = [g["CIDEr-D"] - b["CIDEr-D"] for g, b in zip(got, ref)]
            d_bleu = [g["BLEU-4"] - b["BLEU-4"] for g, b in zip(got, ref)]
            wins = sum(d > 0 for d in d_cider)
            if split == "val":
                line += [f"{mean_std(d_cider)} ({wins}/{len(runs)})", mean_std(d_bleu)]
            else:
                cider = [g["CIDEr-D"] for g in got]
                bleu = [g["BLEU-4"] for g in got]
                line += [f"{statistics.mean(cider):.3f}", f"{mean_std(d_cider)} ({wins}/{len(runs)})",
                         f"{statistics.mean(bleu):.3f}"]
        rows.append("| " + " | ".join(line) + " |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("logs/real_photo_recipe"), help="ablation.py's --out")
    parser.add_argument("--variant", default="no_rerank", help="whose runs to decode again")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="the runs' feature cache")
    parser.add_argument("--beams", default="3,8,16")
    parser.add_argument("--neighbours", default="10,30,50,80")
    parser.add_argument("--weights", default="0,0.02,0.1")
    args = parser.parse_args()
    os.environ["IMCAP_DATA_DIR"] = str(args.data_dir.resolve())
    results = {}
    for folder in sorted((args.out / args.variant).glob("split*-seed*")):
        results[folder.name] = grid_of_one_run(folder / "checkpoints" / "best.ckpt",
                                               [int(x) for x in args.beams.split(",")],
                                               [int(x) for x in args.neighbours.split(",")],
                                               [float(x) for x in args.weights.split(",")])
        print(folder.name, json.dumps(results[folder.name][f"test {BASELINE[0]} 0 0.0"]), flush=True)
    (HERE / "results-rerank-grid.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    table = report(results)
    (HERE / "table-rerank-grid.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
