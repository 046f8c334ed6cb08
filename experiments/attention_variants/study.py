"""Train every decoder x attention pair with several seeds (and image splits), then tabulate
mean ± std, plot it with error bars and say which differences exceed seed noise.

    python experiments/attention_variants/study.py --epochs 4            # shapes demo: all valid pairs x 3 seeds
    python experiments/attention_variants/study.py --data flickr8k --root ../shared/data/flickr8k-1k --splits 0,1
    python experiments/attention_variants/study.py --data coco --root /data/coco --accelerator gpu

Each run is a plain `imcap.train` run on the project's default recipe for the data option
(conf/, including conf/recipe/<data>.yaml), with only the pair, the seed, the image split and
the epochs set here; its folder, <out>/<study>/<decoder>-<attention>/seed<S>[-split<K>], holds
checkpoints/best.ckpt, metrics.json and result.json. A run whose result.json exists is skipped,
and an interrupted run continues from its checkpoints/last.ckpt, so rerunning the same command
after a crash or `kill -9` resumes the study. After every run the report is rewritten:
results-<study>.json (every run), table-<study>.md (table + conclusions), results-<study>.png,
and the block between `<!-- study:<study> -->` markers in README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `experiments.` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.attention_variants import report  # noqa: E402
from imcap.atomic_files import write_json, write_text  # noqa: E402
from imcap.config_compose import compose_config  # noqa: E402
from imcap.data.sources.flickr8k import KARPATHY, OFFICIAL_SPLITS  # noqa: E402
from imcap.data.vocab import Vocabulary  # noqa: E402
from imcap.errors import ImcapError, report_user_errors  # noqa: E402
from imcap.models.captioner import build_captioner  # noqa: E402
from imcap.models.decoder import valid_pairs  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data" / "flickr8k-1k"
DATA = ("shapes", "flickr8k", "coco")
# On real photos: Show and Tell, every attention with the LSTM decoder, and the strongest
# attention of each other decoder family (9 pairs; a 2-core CPU trains one in minutes).
PHOTO_PAIRS = ("lstm-none,lstm-additive,lstm-dot,lstm-general,lstm-scaled_dot,lstm-multihead,lstm-adaptive,"
               "topdown-additive,transformer-multihead")
# what a run does not need to show: progress bars and a model summary per run
QUIET = ["callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# Each variant is judged by the caption it finds most probable itself: consensus reranking (the
# real-photo default since this study's tables were made) chooses by the training captions, which
# would blur the attention's part, and a resumed study must not mix runs decoded both ways.
STUDY_DECODING = ["model.decoding.rerank_neighbours=0"]


def parse_pairs(text: str, data: str) -> list[tuple[str, str]]:
    """'all' (every valid pair, from the registry), 'photos' (PHOTO_PAIRS), 'default' (all on the
    demo, photos on real photos) or comma-separated decoder-attention names."""
    if text == "default":
        text = "all" if data == "shapes" else "photos"
    if text == "all":
        return valid_pairs()
    valid = valid_pairs()
    pairs = []
    for name in (PHOTO_PAIRS if text == "photos" else text).split(","):
        pair = tuple(name.strip().split("-", 1))
        if pair not in valid:
            raise ImcapError(f"--pairs: {name.strip()!r} is not a valid decoder-attention pair; "
                             f"valid: {', '.join('-'.join(p) for p in valid)}")
        pairs.append(pair)
    return pairs


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def base_overrides(args: argparse.Namespace) -> list[str]:
    """What every run of the study shares: the data option and its root, the trainer, the
    epochs and the user's extra overrides; everything else is the project's recipe."""
    data = [] if args.data == "shapes" else [f"data={args.data}", f"data.root={Path(args.root).resolve()}"]
    return [*data, f"trainer={args.accelerator}", *QUIET, *STUDY_DECODING,
            *([f"trainer.max_epochs={args.epochs}"] if args.epochs is not None else []), *args.override]


def fixed_splits(root: Path) -> bool:
    """Whether a Flickr8k folder fixes its own split (official split files or Karpathy's JSON),
    so that data.source.split_seed changes nothing."""
    return (root / KARPATHY).is_file() or any((root / name).is_file() for name in OFFICIAL_SPLITS.values())


def study_name(args: argparse.Namespace, epochs: int) -> str:
    """--name, or <data or root folder>-<epochs>ep[-<hash of extra overrides>]: a study with
    another budget or other overrides gets runs of its own instead of mixing with these."""
    if args.name:
        return args.name
    base = "shapes" if args.data == "shapes" else Path(args.root).resolve().name
    extra = f"-{hashlib.sha1(' '.join(args.override).encode()).hexdigest()[:8]}" if args.override else ""
    return f"{base}-{epochs}ep{extra}"


def decoder_params(run_dir: Path) -> int:
    """Parameters of the run's decoder (embedding and attention included), rebuilt from its
    config.yaml and vocab.json without weights."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    captioner = build_captioner(cfg.model, Vocabulary.load(run_dir / "vocab.json"), cfg.data.image_size,
                                pretrained=False)
    return sum(p.numel() for p in captioner.decoder.parameters())


def run_one(decoder: str, attention: str, seed: int, split: int | None, base: list[str], run_dir: Path,
            data_dir: Path, params: int | None = None) -> dict:
    """Train one run in this process (or continue it from its last.ckpt) and write result.json.
    `params`: the pair's decoder size when another run of it already counted it."""
    from imcap.train import train

    last = run_dir / "checkpoints" / "last.ckpt"
    resumed = last.is_file()
    overrides = [*base, f"model/decoder={decoder}", f"model/attention={attention}", f"seed={seed}",
                 *([f"data.source.split_seed={split}"] if split is not None else []),
                 *([f"ckpt_path={last}"] if resumed else [])]
    start = time.perf_counter()
    metrics = train(compose_config("train", overrides, run_dir, data_dir))
    result = {
        "decoder": decoder, "attention": attention, "seed": seed, "split": split,
        "decoder_params": params or decoder_params(run_dir), "wall_s": time.perf_counter() - start,
        "resumed": resumed,
        **{k: v for k, v in metrics.items() if k.startswith("test/")},
        **{k: metrics.get(k) for k in ("train/captions_per_s", "val/CIDEr-D_best", "epoch")},
    }
    write_json(run_dir / "result.json", result)
    last.unlink(missing_ok=True)  # only for resuming; best.ckpt stays
    return result


def write_report(results: list[dict], name: str, header: str, report_dir: Path) -> None:
    """results-<name>.json, table-<name>.md, results-<name>.png, and the README block if marked."""
    rows = report.aggregate(results)
    body = f"{header}\n\n{report.table(rows)}\n\n![{name}](results-{name}.png)\n\n{report.conclusions(rows)}\n"
    write_json(report_dir / f"results-{name}.json", results)
    write_text(report_dir / f"table-{name}.md", body)
    report.plot(rows, report_dir / f"results-{name}.png", f"attention variants, study {name}: mean ± 1 std over the n runs of each pair; "
                f"orange: the reference {'-'.join(report.REFERENCE)}, its mean dashed")
    readme = report_dir / "README.md"
    begin, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        write_text(readme, f"{before}{begin}\n{body}{end}{rest.split(end, 1)[1]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=DATA, default="shapes")
    parser.add_argument("--root", "--flickr-root", default=None,
                        help=f"dataset folder for flickr8k/coco (flickr8k: default {SHARED})")
    parser.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs (default: the recipe's)")
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated training seeds")
    parser.add_argument("--splits", default=None,
                        help="flickr8k only: comma-separated image split seeds (data.source.split_seed)")
    parser.add_argument("--pairs", default="default",
                        help="'default' (all on shapes, photos otherwise), 'all', 'photos' or decoder-attention,...")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu", help="trainer=cpu|gpu")
    parser.add_argument("--name", default=None, help="the study's name: its run folder and report files (default: <data or root folder>-<epochs>ep[-<hash of overrides>])")
    parser.add_argument("--out", default="logs/attention_variants", help="folder for the runs")
    parser.add_argument("--data-dir", default="data", help="datasets and feature cache")
    parser.add_argument("--report-dir", default=str(HERE), help="where results-*.json, table-*.md and the plot go")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for every run (they rename the study)")
    args = parser.parse_args(argv)
    if args.data == "flickr8k" and args.root is None:
        args.root = str(SHARED)
    if args.data != "shapes" and (args.root is None or not Path(args.root).is_dir()):
        raise ImcapError(f"--root {args.root}: no such folder; give the {args.data} dataset folder")
    if args.splits is not None and args.data != "flickr8k":
        raise ImcapError(f"--splits: only data=flickr8k has a seeded image split; {args.data}'s split is fixed")
    if args.splits is not None and len(ints(args.splits)) > 1 and fixed_splits(Path(args.root)):
        raise ImcapError(f"--splits: {args.root} holds its own split files, so split seeds change nothing; "
                         "drop --splits")
    return args


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pairs = parse_pairs(args.pairs, args.data)
    seeds = ints(args.seeds)
    splits: list[int | None] = ints(args.splits) if args.splits is not None else [None]
    base = base_overrides(args)
    epochs = int(compose_config("train", base).trainer.max_epochs)  # the budget the recipe resolves to
    name = study_name(args, epochs)
    out = Path(args.out) / name
    header = (f"Study `{name}`: data={args.data}{f' ({Path(args.root).name})' if args.root else ''}, "
              f"{epochs} epochs, trainer={args.accelerator}, seeds {args.seeds}"
              f"{f', image splits {args.splits}' if args.splits else ''}; "
              f"extra overrides: {' '.join(args.override) or 'none'}. Mean ± std (ddof 1) over the n runs.")
    results, trained = [], 0
    # seeds outermost: a study stopped early has every pair with fewer runs, not some pairs with none
    for split in splits:
        for seed in seeds:
            for decoder, attention in pairs:
                run_dir = out / f"{decoder}-{attention}" / (f"seed{seed}" + (f"-split{split}" if split is not None else ""))
                done = run_dir / "result.json"
                if done.is_file():
                    results.append(json.loads(done.read_text(encoding="utf-8")))
                    continue
                print(f"[study] training {run_dir}", flush=True)
                params = next((r["decoder_params"] for r in results if (r["decoder"], r["attention"]) == (decoder, attention)), None)
                results.append(run_one(decoder, attention, seed, split, base, run_dir, Path(args.data_dir), params))
                trained += 1
                write_report(results, name, header, Path(args.report_dir))
    write_report(results, name, header, Path(args.report_dir))
    print(f"[study] {name}: {len(results)} runs, {trained} trained now, {len(results) - trained} already done",
          flush=True)


if __name__ == "__main__":
    main()
