"""Streaming training from tar shards (`data=shards`): every sample once per epoch across all
ranks, shuffled, and resumable mid-epoch.

The plan of an epoch is a pure function of (seed, epoch, world size, rank, batch size, shuffle
buffer) and the shard indexes (`imcap.data.shards`):

1. items: one per (image, caption) for training (or `captions_per_image` drawn per image), one
   per image for evaluation, shard after shard, the shards in a seeded order per epoch;
2. rank r takes the contiguous slice [M*r/W, M*(r+1)/W) of the M items, cut into the same
   number K of batches on every rank (sizes differ by at most one), so DDP ranks step in
   lockstep with nothing padded or dropped;
3. each run of `shuffle_buffer // batch_size` batches is a chunk whose items are permuted by
   a generator seeded with (seed, epoch, rank, chunk): a shuffle buffer that can be replayed;
4. data-loader worker w streams chunks w, w+n, ...; the DataLoader takes their batches in turn.

The position is the number of batches trained in the epoch. `StreamingLoader.state_dict`
stores it in checkpoints (Lightning saves the state of stateful loaders); on resume every
worker skips the batches already trained, so nothing repeats and nothing is skipped.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imcap.data.datamodule import CaptionDataModule
from imcap.data.dataset import collate
from imcap.data.images import accepts_uint8_tensor
from imcap.data.shard_features import extract_shard_features
from imcap.data.shard_split import ShardSplit, decode_image
from imcap.data.shards import (
    BAD_SAMPLES,
    Sample,
    ask_bucket,
    glob_shards,
    join,
    load_index,
    local_path,
    read_images,
    shown,
)
from imcap.data.sources.validation import check_choice
from imcap.data.tokenizer import normalize, tokenize
from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from imcap.registry import register

log = logging.getLogger(__name__)


def epoch_items(split: ShardSplit, train: bool, seed: int, epoch: int, per_image: int | None) -> np.ndarray:
    """(M, 3) rows (shard, sample, caption) in the order the epoch streams them."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(split.shards)) if train else np.arange(len(split.shards))
    parts = []
    for s in order:
        samples, ncap = split.keep[s], split.ncaptions[s]
        if not train:
            caption = np.zeros(len(samples), dtype=np.int64)
        else:
            samples = np.repeat(samples, ncap)
            start = np.repeat(np.cumsum(ncap) - ncap, ncap)
            caption = np.arange(len(samples)) - start  # position of each caption within its image
            if per_image is not None:  # a random rank per caption within its image; keep the first k
                group = np.repeat(np.arange(len(ncap)), ncap)
                by_rank = np.lexsort((rng.random(len(samples)), group))
                rank = np.empty(len(samples), dtype=np.int64)
                rank[by_rank] = np.arange(len(samples)) - start[by_rank]
                samples, caption = samples[rank < per_image], caption[rank < per_image]
        parts.append(np.stack([np.full(len(samples), s), samples, caption], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)


@dataclass(frozen=True)
class RankPlan:
    """Rank `rank`'s slice [start, stop) of an epoch's items in `batches` batches, whose item
    offsets within the slice are bounds[b]:bounds[b+1]; chunks of `per_chunk` batches."""

    start: int
    stop: int
    batches: int
    per_chunk: int

    @classmethod
    def make(cls, items: int, world: int, rank: int, batch_size: int, per_chunk: int, split: str) -> RankPlan:
        start, stop = items * rank // world, items * (rank + 1) // world
        batches = math.ceil(math.ceil(items / world) / batch_size)
        if items // world < batches or items == 0:
            raise ImcapError(f"{items} {split} items cannot fill {batches} batches on each of {world} ranks; "
                             f"use more data, fewer processes or a larger batch")
        return cls(start, stop, batches, max(1, per_chunk))

    @property
    def bounds(self) -> np.ndarray:
        """(batches + 1,) offsets: sizes as equal as they can be (they differ by at most one)."""
        n = self.stop - self.start
        sizes = np.full(self.batches, n // self.batches) + (np.arange(self.batches) < n % self.batches)
        return np.concatenate([[0], np.cumsum(sizes)])

    @property
    def chunks(self) -> int:
        return math.ceil(self.batches / self.per_chunk)

    def worker_batches(self, worker: int, workers: int) -> list[int]:
        """Batch ids that data-loader worker `worker` of `workers` produces, in its order."""
        return [b for c in range(worker, self.chunks, workers)
                for b in range(c * self.per_chunk, min((c + 1) * self.per_chunk, self.batches))]

    def first_batches(self, done: int, workers: int) -> set[int]:
        """The batch ids a DataLoader with `workers` workers yields first `done` of: it takes
        one batch from each worker in turn, passing over workers that have finished."""
        queues = [self.worker_batches(w, workers) for w in range(max(1, workers))]
        taken: set[int] = set()
        for r in range(max((len(q) for q in queues), default=0)):
            for q in queues:
                if len(taken) == done:
                    return taken
                if r < len(q):
                    taken.add(q[r])
        return taken


# -- the dataset -----------------------------------------------------------------------------------
class ShardStream(IterableDataset):
    """Yields collated batches of one split for this rank (and data-loader worker).

    Set `rank`, `world` and `start_epoch(...)` before iterating (`StreamingLoader` does).
    With `features` (one memory-mapped grid array per shard, rows = sample positions) batches
    carry `grid`; otherwise images are read from the shards and transformed.
    """

    def __init__(self, split: ShardSplit, vocab: Vocabulary, train: bool, batch_size: int, seed: int,
                 shuffle_buffer: int, max_length: int, per_image: int | None, cache_dir: str | None,
                 transform: Callable | None = None, features: Sequence[str] | None = None,
                 pad_to_multiple: int = 1, widths: Sequence[int] | None = None):
        if (transform is None) == (features is None):
            raise ValueError("give exactly one of transform (images) or features (cached grids)")
        self.split, self.vocab, self.train = split, vocab, train
        self.batch_size, self.seed, self.max_length = batch_size, seed, max_length
        self.per_chunk = max(1, shuffle_buffer // batch_size) if train else 1
        self.per_image = per_image if train else None
        self.cache_dir, self.transform, self.features = cache_dir, transform, features
        self.pad_to_multiple = pad_to_multiple
        self.widths = widths  # data.length_buckets: padded to a bucket's width (the plan does not group by length)
        self.rank, self.world = 0, 1
        self.epoch, self.skip = 0, frozenset()
        # global position of each shard's first usable sample: an image's `index` in the split
        self.offsets = np.concatenate([[0], np.cumsum([len(k) for k in split.keep])])
        self._indexes: OrderedDict[int, list[Sample]] = OrderedDict()
        self._grids: OrderedDict[int, np.ndarray] = OrderedDict()

    # the plan
    def plan(self) -> RankPlan:
        items = self.split.captions if self.train and self.per_image is None else (
            self.split.images if not self.train else
            int(sum(np.minimum(n, self.per_image).sum() for n in self.split.ncaptions)))
        return RankPlan.make(items, self.world, self.rank, self.batch_size, self.per_chunk, self.split.name)

    def __len__(self) -> int:
        return self.plan().batches

    def start_epoch(self, epoch: int, skip: set[int] | frozenset = frozenset()) -> None:
        self.epoch, self.skip = epoch, frozenset(skip)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan()
        items = epoch_items(self.split, self.train, self.seed, self.epoch, self.per_image)[plan.start:plan.stop]
        bounds = plan.bounds
        mine = [b for b in plan.worker_batches(worker, workers) if b not in self.skip]
        chunk_order: dict[int, np.ndarray] = {}
        for b in mine:
            c = b // plan.per_chunk
            if c not in chunk_order:  # one chunk's permutation at a time
                chunk_order = {c: self._chunk_order(plan, bounds, c)}
            lo = bounds[c * plan.per_chunk]
            yield self._batch(items[chunk_order[c][bounds[b] - lo: bounds[b + 1] - lo]])

    def _chunk_order(self, plan: RankPlan, bounds: np.ndarray, chunk: int) -> np.ndarray:
        lo = bounds[chunk * plan.per_chunk]
        hi = bounds[min((chunk + 1) * plan.per_chunk, plan.batches)]
        positions = np.arange(lo, hi)
        if self.train:
            positions = np.random.default_rng([self.seed, self.epoch, self.rank, chunk]).permutation(positions)
        return positions

    # reading samples
    def _samples(self, shard: int) -> list[Sample]:
        return self._cached(self._indexes, shard, lambda: load_index(self.split.shards[shard], self.cache_dir))

    def _grid(self, shard: int) -> np.ndarray:
        return self._cached(self._grids, shard, lambda: np.load(self.features[shard], mmap_mode="r"))

    @staticmethod
    def _cached(cache: OrderedDict, key: int, load: Callable[[], Any], size: int = 16) -> Any:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        cache[key] = value = load()
        if len(cache) > size:
            cache.popitem(last=False)
        return value

    def _image(self, shard: int, sample: Sample, data: bytes) -> torch.Tensor:
        where = f"key {sample.key} in {shown(self.split.shards[shard])}"
        return self.transform(decode_image(data, where, tensor=accepts_uint8_tensor(self.transform)))

    def _item(self, shard: int, position: int, caption: int, image: bytes | None = None) -> dict[str, Any]:
        sample = self._samples(shard)[position]
        refs = [normalize(c) for c in sample.captions]
        words = refs[caption].split()[: self.max_length]
        index = int(self.offsets[shard] + np.searchsorted(self.split.keep[shard], position))
        item = {"tokens": torch.tensor(self.vocab.encode(words), dtype=torch.long), "references": refs,
                "raw_references": list(sample.captions), "image_id": sample.image_id, "index": index,
                "objects": None, "extent": None,
                "item_id": f"{Path(self.split.shards[shard]).name}/{sample.key}#{caption}"}
        if self.features is not None:
            item["grid"] = torch.from_numpy(np.asarray(self._grid(shard)[position], dtype=np.float32))
        else:
            item["image"] = self._image(shard, sample, image)
        return item

    def _batch(self, rows: np.ndarray) -> dict[str, Any]:
        rows = [tuple(map(int, row)) for row in rows]
        images: list[bytes | None] = [None] * len(rows)
        if self.features is None:  # the batch's image files in one go: concurrent range requests to a store
            images = read_images([(self.split.shards[s], self._samples(s)[p]) for s, p, _ in rows])
        items = sorted((self._item(*row, image) for row, image in zip(rows, images)), key=lambda it: -len(it["tokens"]))
        # keeps this (longest-first) order; item_ids: the samples' "shard/key#caption"
        batch = collate(items, pad_id=Vocabulary.pad_id, pad_to_multiple=self.pad_to_multiple, widths=self.widths)
        return batch

    @property
    def references(self) -> list[list[str]]:
        """Normalised references of every usable image (for SCST's CIDEr document frequencies)."""
        return [[normalize(c) for c in self._samples(s)[p].captions]
                for s in range(len(self.split.shards)) for p in self.split.keep[s]]


# -- the loader ------------------------------------------------------------------------------------
class StreamingLoader(DataLoader):
    """A DataLoader over a `ShardStream` whose position is saved in checkpoints: Lightning
    calls `state_dict` when it saves and `load_state_dict` before the resumed run iterates."""

    def __init__(self, dataset: ShardStream, epoch: Callable[[], int], trained: Callable[[], int], **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.epoch_of_run, self.trained = epoch, trained
        self._iter_epoch = 0
        self._resume: dict[str, Any] | None = None

    def _layout(self) -> dict[str, int]:
        ds = self.dataset
        return {"world": ds.world, "batch_size": ds.batch_size, "per_chunk": ds.per_chunk, "seed": ds.seed,
                "batches": ds.plan().batches}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._iter_epoch, "trained": self.trained(), "workers": max(1, self.num_workers),
                **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layout = {k: state.get(k) for k in self._layout()}
        if layout != self._layout():
            changed = ", ".join(f"{k} {layout[k]} -> {v}" for k, v in self._layout().items() if layout[k] != v)
            raise ImcapError(f"the checkpoint's streaming position was saved with other settings ({changed}); "
                             "resume with the same data.batch_size, data.shuffle_buffer, seed and number of processes")
        self._resume = state

    def __iter__(self):
        epoch, skip = self.epoch_of_run(), set()
        if self._resume is not None:
            state, self._resume = self._resume, None
            epoch = state["epoch"]
            if state["trained"] >= state["batches"]:  # saved at the end of its epoch
                epoch += 1
            else:
                skip = self.dataset.plan().first_batches(state["trained"], state["workers"])
                log.info("Resuming epoch %d of the %s shards after %d of %d batches", epoch,
                         self.dataset.split.name, state["trained"], state["batches"])
        self._iter_epoch = epoch
        self.dataset.start_epoch(epoch, skip)
        return super().__iter__()


# -- the data module -------------------------------------------------------------------------------
def expand_shards(root: str | Path, patterns: str | Sequence[str] | None) -> list[str]:
    """Shard paths or URLs of glob and brace patterns (`{000000..000099}.tar`), relative to
    `root` (a folder or an fsspec URL; globs need a store that lists, as S3 and GCS do)."""
    if patterns is None:
        return []
    found: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        for p in braceexpand(str(pattern)):
            path = join(root, p)
            # "?" is left to URLs: a signed https URL's query is not a pattern
            magic = "*" in path or "[" in path or (local_path(path) is not None and "?" in path)
            found += glob_shards(path) if magic else [path]
    return list(dict.fromkeys(found))


def use_storage_options(options: dict[str, dict[str, Any]] | None) -> None:
    """data.storage_options, per protocol ({s3: {endpoint_url: ...}}), as fsspec's own config:
    every filesystem this process (and its forked loader workers) opens takes them."""
    import fsspec
    from omegaconf import DictConfig, OmegaConf

    if isinstance(options, DictConfig):
        options = OmegaConf.to_container(options, resolve=True)
    for protocol, values in (options or {}).items():
        if not isinstance(values, dict):
            raise ImcapError(f"data.storage_options.{protocol} must map option names to values, e.g. "
                             "data.storage_options={s3:{endpoint_url:http://HOST:PORT}}")
        fsspec.config.conf.setdefault(str(protocol), {}).update(dict(values))


@register("datamodule", "shards")
class ShardDataModule(CaptionDataModule):
    """Captions streamed from tar shards (see imcap/data/shards.py for the layout).

    The vocabulary is built from the train shards' captions, read from the shard indexes (a
    first pass over the tar headers and the .txt/.json members only, cached), so min_freq and
    max_vocab_size stay training options and shards from img2dataset work as they are.
    """

    # streamed: no training image one by one, so no neighbour memory for consensus reranking
    memory_loader = None

    def __init__(self, root: str, train: str | Sequence[str] = "train/*.tar", val: str | Sequence[str] | None = "val/*.tar",
                 test: str | Sequence[str] | None = "test/*.tar", bad_samples: str = "error",
                 shuffle_buffer: int = 2048, source: None = None, remote_cache_dir: str | None = None,
                 storage_options: dict[str, dict[str, Any]] | None = None, **kwargs):
        if source is not None:
            raise ImcapError("data=shards reads the shards under data.root; it takes no data.source")
        super().__init__(source=None, root=str(root), **kwargs)
        use_storage_options(storage_options)
        if self.cache_dir is None and local_path(root) is None:  # shards in object storage: indexes on local disk
            self.cache_dir = remote_cache_dir
        if self.hflip:  # a stream has no second, mirrored cache to read from
            raise ImcapError("data.hflip=true is not available with data=shards; set data.hflip=false, or train "
                             "from the data option the shards were written from")
        check_choice(bad_samples, BAD_SAMPLES, "data.bad_samples")
        if shuffle_buffer < 1:
            raise ImcapError(f"data.shuffle_buffer={shuffle_buffer}; use a number of items >= 1")
        self.root, self.patterns = str(root), {"train": train, "val": val, "test": test}
        self.bad_samples, self.shuffle_buffer = bad_samples, shuffle_buffer
        self.splits: dict[str, ShardSplit] = {}

    def prepare_data(self) -> None:
        if not expand_shards(self.root, self.patterns["train"]):
            raise self._none_match("train")

    def _none_match(self, split: str) -> ImcapError:
        """No shard matches the `split` pattern. In a bucket: which endpoint answered and what it
        holds there, so that a wrong endpoint or bucket is not taken for missing shards."""
        what = f"no {split} shards match data.{split}={self.patterns[split]!r} under data.root={shown(self.root)}"
        answer = ask_bucket(self.root)
        if answer is None:
            return ImcapError(f"{what}; write some with `python -m imcap.data shards data=NAME out=DIR`")
        endpoint = "AWS_ENDPOINT_URL, or data.storage_options={s3:{endpoint_url:URL}}"
        fix = {"no bucket": f"check the bucket in data.root, and the endpoint ({endpoint})",
               "not s3": f"check the endpoint ({endpoint})",
               "holds": f"check data.root and data.{split}",
               "nothing": f"check data.root, or write shards there with `python -m imcap.data shards data=NAME "
                          f"out={shown(self.root)}`"}[answer.kind]
        return ImcapError(f"{what}: {answer.text}; {fix}")

    @property
    def records(self):
        raise ImcapError("data=shards has no image files to list (gallery, stats); use the source the shards were "
                         "written from")

    def shard_split(self, split: str) -> ShardSplit:
        if split not in self.splits:
            shards = expand_shards(self.root, self.patterns[split])
            if not shards:
                raise self._none_match(split)
            self.splits[split] = ShardSplit.load(split, shards, self.cache_dir, self.bad_samples)
            s = self.splits[split]
            log.info("Shards %s: %d shards, %d images, %d captions", split, len(shards), s.images, s.captions)
        return self.splits[split]

    def build_vocab(self, vocab: Vocabulary | None = None) -> Vocabulary:
        if vocab is None:
            split = self.shard_split("train")
            captions = (c for s, shard in enumerate(split.shards) for p, x in enumerate(load_index(shard, self.cache_dir))
                        if not x.problem for c in x.captions)
            vocab = Vocabulary.build((tokenize(c) for c in captions), self.min_freq, self.max_vocab_size)
            log.info("Vocabulary: %d tokens (min_freq=%d) from the train shards", len(vocab), self.min_freq)
        self.vocab = vocab
        return vocab

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _dataset(self, split: str) -> ShardStream:
        if split in self.datasets:
            return self.datasets[split]
        if self.encoder is None or self.vocab is None:
            raise RuntimeError("call build_vocab() and attach_encoder() before setup()")
        data = self.shard_split(split)
        transform = self.encoder.image_transform(self.image_size)
        kwargs: dict[str, Any] = {"transform": transform}
        if self._use_cached_features():
            rank, world = self._rank()
            kwargs = {"features": extract_shard_features(
                self.encoder, data, transform, self.cache_dir, self.encoder.fingerprint(transform_desc=repr(transform)),
                batch_size=self.eval_batch_size, precision=self.feature_precision, policy=self.bad_samples,
                first=rank)}
        train = split == "train"
        dataset = ShardStream(data, self.vocab, train, self.batch_size if train else self.eval_batch_size, self.seed,
                              self.shuffle_buffer, self.max_caption_length, self.captions_per_image, self.cache_dir,
                              pad_to_multiple=self.pad_to_multiple, widths=self.bucket_widths if train else None,
                              **kwargs)
        self.datasets[split] = dataset
        return dataset

    def _epoch(self) -> int:
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0

    def _trained(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer is not None else 0

    def _loader(self, split: str, train: bool) -> StreamingLoader:
        dataset = self._dataset(split)
        dataset.rank, dataset.world = self._rank()
        workers = self.loader_workers()
        # workers are started afresh each epoch: they take the epoch's plan with them
        return StreamingLoader(dataset, epoch=self._epoch, trained=self._trained, num_workers=workers,
                               pin_memory=self.pin())

