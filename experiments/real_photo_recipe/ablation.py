"""Train recipe variants on the real Flickr8k photos in ../shared over seeds and image splits.

    python experiments/real_photo_recipe/ablation.py                          # every variant
    python experiments/real_photo_recipe/ablation.py --variants default,glove_ls --seeds 0,1,2 --splits 0,1,2
    python experiments/real_photo_recipe/ablation.py --report                 # tables only

Every run is a new `python -m imcap.train data=flickr8k data.root=DIR` process with the
variant's overrides, the seed and the image split (`data.source.split_seed`). Its run folder
under --out keeps metrics.json, predictions/test.json and result.json (wall time included);
a run whose result.json exists is not trained again, so a killed ablation resumes. The report
(results.json, table.md) is written next to this script from the result.json files alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data" / "flickr8k-1k"
METRICS = ("test/BLEU-4", "test/METEOR", "test/ROUGE-L", "test/CIDEr-D")

# name -> (what it changes against the default recipe, overrides). "default" is the recipe
# itself: no overrides, as a user runs it.
VARIANTS: dict[str, tuple[str, list[str]]] = {"default": ("the default recipe", [])}
# rows measured before the recipe took consensus reranking, and before trigram blocking: their
# overrides pin what they were measured with, so a rerun reproduces them
NO_RERANK = ["model.decoding.rerank_neighbours=0"]
BEFORE = ["model/attention=additive", "model.decoding.block_trigrams=false", *NO_RERANK]
VARIANTS.update({
    "no_rerank": ("the default without consensus reranking: beam 3's most probable caption (the default of the "
                  "last revision)", NO_RERANK),
    "adaptive_attention": ("adaptive attention with a visual sentinel (Lu et al. 2017) instead of soft attention, "
                           "without reranking", ["model/attention=adaptive", *NO_RERANK]),
    "finetune_head": ("EfficientNet-Lite0's last stage (its 1×1 head convolution) fine-tuned, from a cache of the "
                      "map in front of it, without reranking", ["model.encoder.finetune=last_k", *NO_RERANK]),
})
VARIANTS.update({
    "width_512": ("soft attention, no trigram blocking, LSTM, attention and word embedding 512 wide",
                  ["model.decoder.hidden_dim=512", *BEFORE]),
    "width_256": ("no_rerank without trigram blocking (the default three revisions ago)", BEFORE),
    "mobilenet_v2": ("MobileNetV2 features instead of EfficientNet-Lite0, at width 512, soft attention",
                     ["model/encoder=mobilenet_v2", "model.decoder.hidden_dim=512", *BEFORE]),
    "previous_defaults": ("imcap's defaults before this recipe: MobileNetV2, greedy, cross-entropy, 10 epochs, width 512",
                          ["model/encoder=mobilenet_v2", "model.decoding.method=greedy",
                           "model.scst.start_epoch=null", "trainer.max_epochs=10", "model.decoder.hidden_dim=512",
                           *BEFORE]),
    "glove_ls": ("GloVe 6B-50d word vectors (frozen) and label smoothing 0.1, at width 512, soft attention",
                 ["model/embedding=glove", "model.label_smoothing=0.1", "model.decoder.hidden_dim=512", *BEFORE]),
})
# variants without training: a trained variant's runs (`base`), evaluated again (python -m
# imcap.eval) with other decoding options, or their other checkpoint (the last epoch instead of the
# best on validation). name -> (what it is, overrides, which checkpoint of each run, base)
DECODING = {"rerank_at_test": ("no_rerank's checkpoints decoded with consensus reranking (the same weights)",
                               ["decoding.rerank_neighbours=50"], "best.ckpt", "no_rerank"),
            "greedy": ("no_rerank, greedy decoding at test", ["decoding.method=greedy"], "best.ckpt", "no_rerank"),
            "no_trigram_blocking": ("no_rerank, decoded without trigram blocking (the decoding before it)",
                                    ["decoding.block_trigrams=false"], "best.ckpt", "no_rerank"),
            "last_epoch": ("no_rerank, the last epoch's checkpoint instead of the best on validation", [],
                           "last.ckpt", "no_rerank"),
            "last_epoch_rerank": ("the default recipe, the last epoch's checkpoint instead of the best on validation",
                                  [], "last.ckpt", "default")}


def run_dir(out: Path, variant: str, split: int, seed: int) -> Path:
    return out / variant / f"split{split}-seed{seed}"


def caption_stats(predictions: list[dict]) -> dict:
    """Distinct captions, and captions that hold <unk> or end on a function word."""
    from imcap.models.search import BAD_ENDINGS

    captions = [p["caption"] for p in predictions]
    return {
        "test_images": len(captions),
        "distinct_captions": len(set(captions)),
        "unk_captions": sum("<unk>" in c.split() for c in captions),
        "bad_ending_captions": sum(bool(c.split()) and c.split()[-1] in BAD_ENDINGS for c in captions),
    }


def train_one(variant: str, overrides: list[str], split: int, seed: int, args: argparse.Namespace) -> dict:
    folder = run_dir(args.out, variant, split, seed)
    if (folder / "result.json").is_file():
        return json.loads((folder / "result.json").read_text(encoding="utf-8"))
    command = [
        sys.executable, "-m", "imcap.train", "data=flickr8k", f"data.root={args.root}",
        *overrides, f"seed={seed}", f"data.source.split_seed={split}", f"hydra.run.dir={folder}",
        "callbacks.progress_bar=null", "trainer.enable_progress_bar=false", *args.override,
    ]
    env = {**os.environ, "IMCAP_DATA_DIR": str(args.data_dir)}
    start = time.perf_counter()
    with open(args.out / f"{variant}-split{split}-seed{seed}.log", "w", encoding="utf-8") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - start
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    predictions = json.loads((folder / "predictions" / "test.json").read_text(encoding="utf-8"))
    result = {
        "variant": variant, "overrides": overrides, "split": split, "seed": seed, "wall_s": round(wall, 1),
        "load_before": args.load_before, **{k: metrics.get(k) for k in METRICS},
        **caption_stats(predictions),
    }
    (folder / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def evaluate(ckpt_path: str, overrides: list[str], folder: Path, args: argparse.Namespace) -> dict:
    """`python -m imcap.eval` of `ckpt_path` into `folder`: its test metrics and caption stats."""
    subprocess.run([sys.executable, "-m", "imcap.eval", f"ckpt_path={ckpt_path}", *overrides, f"hydra.run.dir={folder}"],
                   check=True, capture_output=True, env={**os.environ, "IMCAP_DATA_DIR": str(args.data_dir)})
    metrics = read_json(folder / "metrics.json")
    return {**{k: metrics.get(k) for k in METRICS}, **caption_stats(read_json(folder / "predictions" / "test.json"))}


def evaluate_again(name: str, overrides: list[str], checkpoint: str, base: str, args: argparse.Namespace) -> list[dict]:
    """`checkpoint` (best.ckpt, last.ckpt) of every run of variant `base` decoded with
    `overrides`: a row without training."""
    results = []
    for folder in sorted((args.out / base).glob("split*-seed*")):
        base = folder / "result.json"
        again = args.out / name / folder.name
        if not base.is_file():
            continue
        if not (again / "result.json").is_file():
            scores = evaluate(f"{folder}/checkpoints/{checkpoint}", overrides, again, args)
            result = {**read_json(base), "variant": name, **scores}
            (again / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        results.append(read_json(again / "result.json"))
    return results


# name -> (what it is, which checkpoint of each run, which variant's runs)
SEED_ENSEMBLES = {
    "seed_ensemble": ("the default recipe's best checkpoints of all seeds of a split, decoded as one ensemble "
                      "(`python -m imcap.eval 'ckpt_path=[...]'`)", "best.ckpt", "default"),
    "seed_ensemble_beam3": ("the same for no_rerank (beam 3's most probable caption)", "best.ckpt", "no_rerank"),
    "seed_ensemble_last": ("no_rerank's last-epoch checkpoints, ensembled the same way", "last.ckpt", "no_rerank"),
}


def evaluate_seed_ensembles(name: str, args: argparse.Namespace) -> list[dict]:
    """Per image split, the ensemble of a variant's runs of every seed: one row per split."""
    _, checkpoint, base = SEED_ENSEMBLES[name]
    results: list[dict] = []
    runs: dict[int, list[Path]] = {}
    for folder in sorted((args.out / base).glob("split*-seed*")):
        if (folder / "result.json").is_file():
            runs.setdefault(read_json(folder / "result.json")["split"], []).append(folder)
    for split, folders in sorted(runs.items()):
        again = args.out / name / f"split{split}"
        if len(folders) < len(args.seeds.split(",")):  # not every seed has finished: no partial ensemble
            continue
        if not (again / "result.json").is_file():
            checkpoints = ",".join(str(f / "checkpoints" / checkpoint) for f in folders)
            scores = evaluate(f"[{checkpoints}]", [], again, args)
            seeds = [read_json(f / "result.json") for f in folders]
            result = {"variant": name, "overrides": [], "split": split, "seed": "+".join(str(r["seed"]) for r in seeds),
                      "wall_s": round(sum(r["wall_s"] for r in seeds), 1), **scores}
            (again / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        results.append(read_json(again / "result.json"))
    return results


def mean_std(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(out: Path, tag: str) -> None:
    order = [*VARIANTS, *DECODING, *SEED_ENSEMBLES]
    results = sorted((json.loads(p.read_text(encoding="utf-8")) for p in out.glob("*/*/result.json")),
                     key=lambda r: (order.index(r["variant"]) if r["variant"] in order else len(order),
                                    r["variant"], r["split"], r["seed"]))
    (HERE / f"results-{tag}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    rows = ["| variant | what changes | runs (splits × seeds) | test BLEU-4 | METEOR | ROUGE-L | CIDEr-D "
            "| distinct captions | wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    described = {**VARIANTS, **DECODING, **SEED_ENSEMBLES}
    for variant, runs in by_variant.items():
        splits, seeds = sorted({r["split"] for r in runs}), sorted({r["seed"] for r in runs})
        rows.append(
            f"| {variant} | {described[variant][0] if variant in described else ' '.join(runs[0].get('overrides', []))} | {len(runs)} ({len(splits)} × {len(seeds)}) | "
            + " | ".join(mean_std([r[m] for r in runs]) for m in METRICS)
            + f" | {mean_std([r['distinct_captions'] for r in runs], 0)} of {mean_std([r['test_images'] for r in runs], 0)}"
            f" | {mean_std([r['wall_s'] for r in runs], 0)} |"
        )
    (HERE / f"table-{tag}.md").write_text("\n".join(rows) + "\n", encoding="utf-8")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="all", help="'all' or comma-separated names of VARIANTS")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--splits", default="0,1,2")
    parser.add_argument("--root", type=Path, default=SHARED, help="Flickr8k (Kaggle layout) with its images")
    parser.add_argument("--out", type=Path, default=Path("logs/real_photo_recipe"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="feature cache shared by the runs")
    parser.add_argument("--name", help="train an exploratory variant NAME made of the positional overrides")
    parser.add_argument("--tag", default="ablation", help="the report's name: table-TAG.md, results-TAG.json")
    parser.add_argument("--report", action="store_true", help="only write the tables from finished runs")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    args.out, args.data_dir = args.out.resolve(), args.data_dir.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
        if args.name:  # an exploratory variant: the positional overrides alone
            VARIANTS[args.name], names, args.override = (" ".join(args.override), args.override), [args.name], []
        for name in names:
            for split in map(int, args.splits.split(",")):
                for seed in map(int, args.seeds.split(",")):
                    args.load_before = os.getloadavg()[0]
                    result = train_one(name, VARIANTS[name][1], split, seed, args)
                    print(json.dumps(result), flush=True)
        for name, (_, overrides, checkpoint, base) in DECODING.items():
            evaluate_again(name, overrides, checkpoint, base, args)
        for name in SEED_ENSEMBLES:
            evaluate_seed_ensembles(name, args)
    report(args.out, args.tag)


if __name__ == "__main__":
    main()
