"""Dataset tools: `python -m imcap.data COMMAND [options] [hydra overrides]`.

    python -m imcap.data prepare NAME [--keep-archives] [--base-url URL] [overrides]
    python -m imcap.data stats [--json] [data=NAME] [data.root=DIR] [model/embedding=...]
    python -m imcap.data features [data=NAME] [model/encoder=...] [data.cache_dir=DIR]
    python -m imcap.data shards [data=NAME] out=DIR [shard_size=N] [overrides]

prepare   downloads the public archives of `data=NAME` into its `data.root` with a progress
          bar, resumes partial downloads, checks size and sha256, extracts safely and is
          idempotent (see imcap/data/download.py; each source declares its files). Offline it
          fails at once, naming the files to fetch by hand and where to put them.
          `IMCAP_DOWNLOAD_BASE_URL` (or --base-url) fetches every archive from a mirror instead.
          A source without files to download (shapes: generated; custom) is only checked.
stats     images and captions per split, vocabulary size at `data.min_freq` (train split), caption
          lengths in tokens (p50/p90/p99/max), the share of tokens outside the vocabulary
          (`<unk>%`) and the share of caption tokens that the configured word embeddings cover
          (`model.embedding`'s boolean `found` mask, (V,); "n/a" for embeddings without one,
          such as `learned`). `--json` prints the same numbers as one JSON object.
features  extracts the grid-feature cache of every split ahead of training, with the encoder and
          transform training would use (JPEGs decode in `data.num_workers` DataLoader workers; auto:
          a decoding thread per core),
          and prints images/s per split; splits already cached are reported as such.
shards    writes every split of `data=NAME` as tar shards of `shard_size` samples (default 1000) in
          img2dataset's WebDataset layout, DIR/{train,val,test}/000000.tar ... (KEY.jpg or .png,
          KEY.txt with one caption per line, KEY.json with image_id and captions), and indexes
          them; train from them with `data=shards data.root=DIR` (see imcap/data/streaming.py).
          DIR may be a bucket, out=s3://BUCKET/PATH or gs://... (docs/guides/shards-in-a-bucket.md).

Configs are composed from conf/train.yaml as for `python -m imcap.train`, so the same overrides
work here. Results go to stdout, logs and progress bars to stderr; a mistake the user can fix
prints one line `error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from imcap import registry
from imcap.config_compose import compose_config
from imcap.data import download
from imcap.data.records import SPLITS
from imcap.data.tokenizer import tokenize
from imcap.data.vocab import SPECIALS
from imcap.errors import ImcapError, report_user_errors
from imcap.plugins import load_plugins

log = logging.getLogger("imcap.data")

PERCENTILES = (50, 90, 99)


def data_config(overrides: Sequence[str]) -> DictConfig:
    """The train config the data commands read, composed from `overrides`; an option it leaves
    required (`data.root` of a data config of one's own) is one line naming it, as the entry
    points say it."""
    from imcap.entry import missing_options, refuse_chosen_bases, required_options

    cfg = compose_config("train", overrides)
    refuse_chosen_bases()  # data=_base
    missing = missing_options(cfg)
    if missing:
        raise required_options(missing, "data")
    return cfg


def _data_name(cfg: DictConfig) -> str:
    return str(cfg.hydra.runtime.choices.get("data", "?"))


# -- prepare --------------------------------------------------------------------------------------
def run_prepare(name: str, overrides: Sequence[str], keep_archives: bool = False,
                base_url: str | None = None) -> list[str]:
    try:
        cfg = data_config([f"data={name}", *overrides])
    except ImcapError as e:
        if f"Could not find 'data/{name}'" not in str(e):
            raise
        # a source of one's own has its YAML in the user's config directory, which Hydra only reads when told
        raise ImcapError(f"{e}; a source of your own needs its config directory: "
                         f"hydra.searchpath=[file:///abs/conf] (the folder holding data/{name}.yaml)") from e
    load_plugins(cfg.get("plugins"))  # a source of one's own: plugins=[my_pkg.source]
    if cfg.data.get("source") is None:  # data=shards reads your own shards
        raise ImcapError(f"data={name} has no source to prepare; choose one of {registry.names('source')}")
    source = instantiate(cfg.data.source)
    resources = download.resources_of(source)  # COCO: of the year requested or found
    lines = download.prepare(source.root, resources, name, base_url=base_url, keep_archives=keep_archives)
    source.prepare()  # the reader finds the layout it expects (shapes: generates it)
    if not resources:
        return [f"{name} has nothing to download: {len(source.records())} images ready under {source.root}"]
    return [*lines, f"{name} is ready in {source.root}"]


# -- stats ----------------------------------------------------------------------------------------
def _found_mask(embedding: Any, vocab_size: int):
    """The embedding's (V,) bool `found` tensor (which words have a pretrained vector), or None."""
    import torch

    found = getattr(embedding, "found", None)
    if isinstance(found, torch.Tensor) and found.dtype == torch.bool and tuple(found.shape) == (vocab_size,):
        return found.cpu()
    if found is not None:
        log.warning("%s.found is not a bool tensor of shape (%d,); coverage not reported",
                    type(embedding).__name__, vocab_size)
    return None


def _split_stats(captions: list[list[str]], images: int, stoi: dict[str, int],
                 known: list[bool] | None) -> dict[str, Any]:
    lengths = np.array([len(c) for c in captions] or [0])
    tokens = [t for c in captions for t in c]
    ids = [stoi.get(t) for t in tokens]
    stats: dict[str, Any] = {
        "images": images,
        "captions": len(captions),
        "tokens": len(tokens),
        "length": {f"p{q}": int(np.percentile(lengths, q, method="inverted_cdf")) for q in PERCENTILES}
        | {"max": int(lengths.max())},
        "unk_share": sum(i is None for i in ids) / max(len(ids), 1),
        "embedding_coverage": None,
    }
    if known is not None:  # tokens outside the vocabulary become <unk>: not covered
        stats["embedding_coverage"] = sum(i is not None and known[i] for i in ids) / max(len(ids), 1)
    return stats


def collect_stats(cfg: DictConfig) -> dict[str, Any]:
    """The numbers `stats` prints, as plain data."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    records = datamodule.records
    vocab = datamodule.build_vocab()
    embedding = instantiate(cfg.model.embedding, vocab=vocab.itos)
    found = _found_mask(embedding, len(vocab))
    tokenized = {s: [tokenize(c) for r in records[s] for c in r.captions] for s in SPLITS}
    known = found.tolist() if found is not None else None
    splits = {s: _split_stats(tokenized[s], len(records[s]), vocab.stoi, known) for s in SPLITS}
    splits["all"] = _split_stats([c for s in SPLITS for c in tokenized[s]],
                                 sum(len(records[s]) for s in SPLITS), vocab.stoi, known)
    words = found[len(SPECIALS):] if found is not None else None
    return {
        "data": _data_name(cfg),
        "root": str(getattr(datamodule.source, "root", "")),
        "splits": splits,
        "vocabulary": {"size": len(vocab), "min_freq": datamodule.min_freq,
                       "max_size": datamodule.max_vocab_size},
        "embedding": {
            "name": type(embedding).__name__,
            "has_pretrained_vectors": found is not None,
            # share of (non-special) vocabulary words with a pretrained vector
            "vocabulary_coverage": float(words.float().mean()) if words is not None and len(words) else None,
        },
    }


def format_stats(stats: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    header = ("split", "images", "captions", "tokens", "len p50", "p90", "p99", "max", "<unk>", "embedded")
    rows = [header]
    for split, s in stats["splits"].items():
        length = s["length"]
        rows.append((split, f"{s['images']:,}", f"{s['captions']:,}", f"{s['tokens']:,}", str(length["p50"]),
                     str(length["p90"]), str(length["p99"]), str(length["max"]), pct(s["unk_share"]),
                     pct(s["embedding_coverage"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"data={stats['data']}  root={stats['root']}", ""]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in rows]
    vocab, emb = stats["vocabulary"], stats["embedding"]
    lines += ["", f"vocabulary: {vocab['size']:,} tokens, 4 of them special (train split, "
                  f"min_freq={vocab['min_freq']}, max_vocab_size={vocab['max_size']})"]
    if emb["has_pretrained_vectors"]:
        lines.append(f"word embeddings ({emb['name']}): pretrained vectors for "
                     f"{pct(emb['vocabulary_coverage'])} of the vocabulary words; 'embedded' is the share "
                     "of caption tokens they cover")
    else:
        lines.append(f"word embeddings ({emb['name']}): n/a, no pretrained vectors (no `found` mask)")
    return "\n".join(lines)


# -- features -------------------------------------------------------------------------------------
def extract_all(cfg: DictConfig) -> list[dict[str, Any]]:
    """Fill the feature cache for every split; per split: images, seconds, images/s, cached."""
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # as training: a random init matches
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.build_vocab()  # datasets need it; the features do not depend on it
    encoder = instantiate(cfg.model.encoder)  # as training builds it, so the cache keys match
    datamodule.attach_encoder(encoder)
    if not datamodule._use_cached_features():
        raise ImcapError(f"nothing to cache: data.features={datamodule.features} with "
                         f"model.encoder.finetune={encoder.finetune} computes features on the fly; use "
                         "model.encoder.finetune=none with data.features=auto or cached")
    results = []
    # one stage per split, so that each is timed alone (fit reuses the val set built just before)
    for stage, split in (("validate", "val"), ("fit", "train"), ("test", "test")):
        records = datamodule.records[split]
        if not records:
            log.info("No %s images: nothing to extract", split)
            continue
        # where datamodule._dataset puts the cache
        cache_dir = Path(datamodule.cache_dir or Path(records[0].image_path).parent / ".imcap-features")
        before = set(cache_dir.glob("*.npy"))
        start = time.perf_counter()
        try:
            datamodule.setup(stage)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise ImcapError(f"cannot write the feature cache in {cache_dir} ({e.strerror}); set "
                                 "data.cache_dir=A_WRITABLE_DIR") from e
            raise
        seconds = time.perf_counter() - start
        new = set(cache_dir.glob("*.npy")) - before
        results.append({"split": split, "images": len(records), "seconds": seconds,
                        "images_per_s": len(records) / seconds if new else None,
                        "cache": str(next(iter(new))) if new else str(cache_dir)})
    return results


def format_features(results: list[dict[str, Any]], encoder: str) -> str:
    lines = [f"grid features of {encoder}:"]
    for r in results:
        speed = f"{r['images_per_s']:.1f} images/s" if r["images_per_s"] else "already cached"
        lines.append(f"  {r['split']:<5} {r['images']:>7,} images  {r['seconds']:7.1f} s  {speed}  ({r['cache']})")
    return "\n".join(lines)


# -- shards ---------------------------------------------------------------------------------------
def run_shards(overrides: Sequence[str]) -> list[str]:
    """Write every split of the configured source as shards; `out=` and `shard_size=` are
    this command's own options, the rest are Hydra overrides."""
    from imcap.data.shards import (
        check_writable,
        glob_shards,
        join,
        load_index,
        local_path,
        shown,
        write_shards,
    )

    options = {k: v for k, _, v in (o.partition("=") for o in overrides if o.split("=")[0] in ("out", "shard_size"))}
    rest = [o for o in overrides if o.split("=")[0] not in ("out", "shard_size")]
    if "out" not in options:
        raise ImcapError("shards needs out=DIR, the folder (or s3://BUCKET/PATH) to write {train,val,test}/*.tar into")
    check_writable(options["out"])
    try:
        shard_size = int(options.get("shard_size", 1000))
    except ValueError:
        raise ImcapError(f"shard_size={options['shard_size']!r}; use a number of samples per shard") from None
    cfg = data_config(rest)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    lines = []
    for split, records in datamodule.records.items():
        if not records:
            continue
        folder = join(options["out"], split)  # a folder or an fsspec URL (s3://, gs://, ...)
        if glob_shards(join(folder, "*.tar")):
            raise ImcapError(f"{shown(folder)} already holds shards; choose another out= or remove them")
        start = time.perf_counter()
        shards = write_shards(records, folder, shard_size)
        for shard in shards if local_path(folder) is not None else ():  # remote: uploaded with its index
            load_index(shard)  # training then starts without a first pass over the tars
        lines.append(f"{split:<5} {len(records):>8,} images  {len(shards):>5} shards  "
                     f"{time.perf_counter() - start:6.1f} s  {shown(folder)}")
    return lines


# -- entry point ----------------------------------------------------------------------------------
class _SourcesHelp(argparse.HelpFormatter):
    """Names the registered sources, plugins' included, only when the help is shown: consulting
    the registry imports every component (about 6 s of CPU)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action) or ""
        return text.replace("{sources}", ", ".join(registry.names("source")))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m imcap.data", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="download, verify and extract a dataset", formatter_class=_SourcesHelp)
    prep.add_argument("name", help="a registered source: {sources}")
    prep.add_argument("--keep-archives", action="store_true", help="keep the archives after extracting")
    prep.add_argument("--base-url", help=f"fetch archives from this mirror (also ${download.BASE_URL_ENV})")
    prep.add_argument("overrides", nargs="*", help="hydra overrides, e.g. data.root=DIR")
    stats = sub.add_parser("stats", help="split, vocabulary, length and embedding-coverage statistics")
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    stats.add_argument("overrides", nargs="*", help="hydra overrides, e.g. data=flickr8k")
    features = sub.add_parser("features", help="extract the grid-feature cache of every split")
    features.add_argument("overrides", nargs="*", help="hydra overrides, e.g. model/encoder=resnet50")
    shards = sub.add_parser("shards", help="write every split as tar shards (WebDataset layout)")
    shards.add_argument("overrides", nargs="*", help="out=DIR [shard_size=N] and hydra overrides, e.g. data=flickr8k")
    return parser


@report_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user mistake prints `error: <one line>` and exits with status 2."""
    args = _parser().parse_args(argv)
    if args.command == "prepare":
        print("\n".join(run_prepare(args.name, args.overrides, args.keep_archives, args.base_url)))
    elif args.command == "stats":
        stats = collect_stats(data_config(args.overrides))
        print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    elif args.command == "shards":
        print("\n".join(run_shards(args.overrides)))
    else:
        cfg = data_config(args.overrides)
        print(format_features(extract_all(cfg), str(cfg.model.encoder.get("name", "the encoder"))))
    return 0


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


if __name__ == "__main__":
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    sys.exit(main())
