"""Train every valid decoder x attention pair with one seed and tabulate the results.

    python experiments/attention_variants/study.py                      # shapes demo
    python experiments/attention_variants/study.py --data flickr8k-1k   # real photos (../shared)

Each run is a normal `imcap.train` run (its folder under --out holds checkpoints and
metrics.json); this script only composes the overrides, collects metrics.json, and writes
results-<data>.json, a Markdown table in README-<data>.md and a plot results-<data>.png next to
itself. Rerunning skips pairs whose metrics.json already exists (delete the folder to redo one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from imcap.config import compose_config
from imcap.data.vocab import Vocabulary
from imcap.models.captioner import build_decoder
from imcap.models.decoder import valid_pairs
from imcap.train import train

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data" / "flickr8k-1k"
DATA = {
    "shapes": [],
    "flickr8k-1k": ["data=flickr8k", "data.min_freq=3", "data.num_workers=0"],
}
METRICS = ("test/BLEU-4", "test/CIDEr-D", "test/grounding", "test/grounding_chance", "val/BLEU-4_best")


def decoder_params(run_dir: Path, decoder: str, attention: str, feature_dim: int) -> int:
    cfg = compose_config("train", [f"model/decoder={decoder}", f"model/attention={attention}"], run_dir)
    from omegaconf import OmegaConf

    arch = OmegaConf.to_container(cfg.model, resolve=True)
    vocab = Vocabulary.load(run_dir / "vocab.json")
    return sum(p.numel() for p in build_decoder(arch, vocab, feature_dim, pretrained=False).parameters())


def run_pair(decoder: str, attention: str, args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / f"{decoder}-{attention}"
    if (run_dir / "result.json").is_file():
        return json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    overrides = [
        *DATA[args.data], *([f"data.source.root={args.flickr_root}"] if args.data == "flickr8k-1k" else []),
        f"model/decoder={decoder}", f"model/attention={attention}", f"seed={args.seed}",
        f"trainer.max_epochs={args.epochs}", f"trainer.accelerator={args.accelerator}",
        "callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        *args.override,
    ]
    start = time.perf_counter()
    metrics = train(compose_config("train", overrides, run_dir, Path(args.data_dir)))
    result = {
        "decoder": decoder, "attention": attention, "data": args.data, "epochs": args.epochs, "seed": args.seed,
        "decoder_params": decoder_params(run_dir, decoder, attention, 1280),
        "train_captions_per_s": metrics["train/captions_per_s"],
        "wall_s": time.perf_counter() - start,
        **{m: metrics.get(m) for m in METRICS},
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def write_report(results: list[dict], args: argparse.Namespace, device: str) -> None:
    (HERE / f"results-{args.data}.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    lines = [
        "| decoder | attention | decoder params | test BLEU-4 | test CIDEr-D | grounding (chance) | train captions/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        grounding = "—" if r["test/grounding"] is None else f"{r['test/grounding']:.3f} ({r['test/grounding_chance']:.3f})"
        lines.append(f"| {r['decoder']} | {r['attention']} | {r['decoder_params'] / 1e6:.2f}M | {fmt(r['test/BLEU-4'])} | "
                     f"{fmt(r['test/CIDEr-D'])} | {grounding} | {r['train_captions_per_s']:.0f} |")
    table = "\n".join(lines)
    (HERE / f"table-{args.data}.md").write_text(
        f"Data: {args.data}; {args.epochs} epochs; seed {args.seed}; device: {device}; "
        f"overrides: {' '.join(args.override) or 'none'}.\n\n{table}\n", encoding="utf-8")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['decoder']}\n{r['attention']}" for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(results)), 3.8))
    xs = range(len(results))
    ax.bar([x - 0.2 for x in xs], [r["test/BLEU-4"] or 0 for r in results], width=0.4, label="test BLEU-4")
    if any(r["test/grounding"] is not None for r in results):
        ax.bar([x + 0.2 for x in xs], [r["test/grounding"] or 0 for r in results], width=0.4, label="grounding")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_title(f"attention variants on {args.data} ({args.epochs} epochs, seed {args.seed})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / f"results-{args.data}.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATA), default="shapes")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--pairs", default="all", help="'all', or comma-separated decoder-attention names")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--out", default="logs/attention_variants", help="folder for the runs")
    parser.add_argument("--data-dir", default="data", help="datasets and feature cache")
    parser.add_argument("--flickr-root", default=str(SHARED), help="the Kaggle-layout Flickr8k subset")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    if args.data == "flickr8k-1k" and not Path(args.flickr_root).is_dir():
        sys.exit(f"error: {args.flickr_root} not found")
    pairs = valid_pairs() if args.pairs == "all" else [tuple(p.split("-", 1)) for p in args.pairs.split(",")]
    out = Path(args.out) / args.data
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.accelerator != "cpu" else "CPU"
    results = []
    for decoder, attention in pairs:
        results.append(run_pair(decoder, attention, args, out))
        write_report(results, args, device)  # after every run: an interrupted study keeps its table


if __name__ == "__main__":
    main()
