"""How the text side's costs grow with the number of captions.

    python experiments/scaling/run.py [--sizes 10000 100000 616000] [--work DIR] [--output results.json]

For each size, a synthetic custom source (`captions.csv`: image, caption, split; five captions
per image, words drawn from a Zipf-like 20,000-word vocabulary, 8-16 words each; every image a
hard link to one 16x16 JPEG) is measured in a fresh process, so that peak memory is its own:

- setup_s: `CaptionDataModule.setup()` from nothing: reading the records, vocabulary, the
  train/val/test datasets (normalisation + tokenisation of every caption), split into
  records_s, vocab_s and datasets_s;
- cache_key_s: the feature-cache key of the train images (a stat per image);
- epoch_overhead_s: one pass of the train loader over every caption with features replaced by a
  (1, 1) array: sampler, items, collate; what an epoch costs outside the model;
- extra_rss_mb: peak resident memory above the process's memory after imports.

Prints a table (with the load average: the machine is shared) and the cost per caption, which
should stay flat across sizes if everything grows linearly.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORDS = 20_000


def make_source(folder: Path, captions: int, seed: int = 0) -> None:
    """captions.csv and images/ for `captions` captions (5 per image), unless already there."""
    import numpy as np
    from PIL import Image

    done = folder / "captions.csv"
    if done.is_file():
        return
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    shared = [folder / f"shared-{k}.jpg" for k in range(captions // 5 // 60_000 + 1)]  # ext4: < 65,000 links a file
    for path in shared:
        Image.new("RGB", (16, 16), (120, 80, 40)).save(path)
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(WORDS)])
    weights = 1.0 / np.arange(1, WORDS + 1)
    weights /= weights.sum()
    n_images = captions // 5
    lengths = rng.integers(8, 17, size=captions)
    words = rng.choice(WORDS, size=int(lengths.sum()), p=weights)
    splits = np.where(np.arange(n_images) % 20 == 0, "val", np.where(np.arange(n_images) % 20 == 1, "test", "train"))
    tmp = folder / "captions.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("image,caption,split\n")
        pos = 0
        for c in range(captions):
            i = c // 5
            if c % 5 == 0:
                os.link(shared[i // 60_000], images / f"{i:07d}.jpg")
            caption = " ".join(vocab[words[pos:pos + lengths[c]]])
            pos += lengths[c]
            f.write(f"images/{i:07d}.jpg,{caption.capitalize()}.,{splits[i]}\n")
    tmp.rename(done)


def rss_mb() -> float:
    """Current resident memory of this process, MB."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Encoder:
    """What the datamodule asks of an encoder, without a CNN: transform and trainability."""

    trainable = True

    def image_transform(self, image_size: int):
        return lambda image: image


def measure(folder: Path) -> dict:
    """Every figure for the source in `folder`, in this process."""
    import numpy as np
    from torch.utils.data import DataLoader

    from imcap.data.datamodule import CaptionDataModule
    from imcap.data.dataset import CaptionDataset, EpochSeededSampler, collate
    from imcap.data.features import cache_key
    from imcap.data.sources.custom import CustomSource

    base = rss_mb()
    dm = CaptionDataModule(CustomSource(str(folder)), batch_size=32, num_workers=0, min_freq=5,
                           max_vocab_size=10_000, features="none")
    dm.attach_encoder(Encoder())
    t0 = time.perf_counter()
    records = dm.records
    t1 = time.perf_counter()
    vocab = dm.build_vocab()
    t2 = time.perf_counter()
    dm.setup()
    t3 = time.perf_counter()
    paths = [r.image_path for r in records["train"]]
    cache_key("fingerprint", paths, "float16")
    t4 = time.perf_counter()
    train = dm.datasets["train"]
    stub = CaptionDataset(train.records, vocab, per_caption=True, features=np.zeros((len(train.records), 1, 1), np.float16))
    t5 = time.perf_counter()
    loader = DataLoader(stub, batch_size=32, sampler=EpochSeededSampler(len(stub), 0), collate_fn=collate)
    batches = sum(1 for _ in loader)
    t6 = time.perf_counter()
    captions = sum(len(r.captions) for split in records.values() for r in split)
    return {
        "captions": captions, "images": sum(len(v) for v in records.values()), "vocab": len(vocab),
        "records_s": t1 - t0, "vocab_s": t2 - t1, "datasets_s": t3 - t2, "setup_s": t3 - t0,
        "cache_key_s": t4 - t3, "epoch_overhead_s": t6 - t5, "batches": batches,
        "extra_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base,
        "load_average": list(os.getloadavg()),
    }


def table(rows: list[dict]) -> str:
    head = ("captions", "setup s", "records s", "vocab s", "datasets s", "cache key s", "epoch overhead s",
            "extra RSS MB", "setup us/caption", "epoch us/caption", "RSS KB/caption", "load (1 min)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = r["captions"]
        lines.append("| " + " | ".join([
            f"{n:,}", f"{r['setup_s']:.1f}", f"{r['records_s']:.1f}", f"{r['vocab_s']:.1f}", f"{r['datasets_s']:.1f}",
            f"{r['cache_key_s']:.1f}", f"{r['epoch_overhead_s']:.1f}", f"{r['extra_rss_mb']:.0f}",
            f"{1e6 * r['setup_s'] / n:.0f}", f"{1e6 * r['epoch_overhead_s'] / n:.0f}",
            f"{1024 * r['extra_rss_mb'] / n:.2f}", f"{r['load_average'][0]:.1f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 616_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/imcap-scaling"), help="where the sources are made")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # measure one source, in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    rows = []
    for n in args.sizes:
        folder = args.work / f"captions-{n}"
        make_source(folder, n)
        out = subprocess.run([sys.executable, __file__, "--one", str(folder)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    args.output.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(table(rows))


if __name__ == "__main__":
    main()
