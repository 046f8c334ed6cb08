"""CaptionDataModule: source records -> vocabulary -> datasets -> loaders."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from imcap.data.buckets import LengthBucketBatchSampler, bucket_widths
from imcap.data.dataset import CaptionDataset, EpochSeededSampler, collate
from imcap.data.features import PRECISIONS, extract_features
from imcap.data.mirror import mirrored_transform
from imcap.data.records import SPLITS, CaptionRecord
from imcap.data.sources import CaptionSource
from imcap.data.tokenizer import tokenize
from imcap.data.vocab import SPECIALS, Vocabulary
from imcap.errors import ImcapError
from imcap.registry import name_of, register
from imcap.training.checkpoints import ResumableLoader

log = logging.getLogger(__name__)

FEATURE_MODES = ("auto", "cached", "none")


def whole_number(value: object, option: str, least: int, meaning: str, null: str | None = None) -> None:
    """Refuse data.`option`=`value` unless it is a whole number >= `least` (or null, where `null`
    says what null means): one line, before any data is generated or read (a batch size of -1
    used to fail only in the first DataLoader, after the feature extraction)."""
    if value is None and null is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        counts = "a positive whole number" if least == 1 else f"a whole number >= {least}"
        raise ImcapError(f"data.{option}={value!r}; give {counts} ({meaning}){f', or null {null}' if null else ''}")


@register("datamodule", "caption")
class CaptionDataModule(pl.LightningDataModule):
    """Builds the vocabulary from the train split only and serves padded caption batches.

    Call `attach_encoder(encoder)` before `setup`: the encoder supplies the image transform
    and, with `features=auto` and a frozen encoder (or `features=cached`), the grid features
    that are extracted once into `cache_dir` instead of re-running the CNN every epoch.
    The defaults are conf/data/_base.yaml's (tests/test_defaults.py holds them equal).
    """

    def __init__(
        self,
        source: CaptionSource,
        image_size: int = 224,
        batch_size: int = 32,
        eval_batch_size: int | None = 100,
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        min_freq: int = 5,
        max_vocab_size: int | None = 10000,
        max_caption_length: int = 30,
        captions_per_image: int | None = None,
        features: str = "auto",
        cache_dir: str | None = None,
        feature_precision: str = "fp32",
        seed: int = 42,
        root: str | None = None,
        pad_to_multiple: int = 1,
        length_buckets: list[int] | None = None,
        hflip: bool = False,
    ):
        super().__init__()
        if features not in FEATURE_MODES:
            raise ImcapError(f"data.features={features!r}; choose one of {FEATURE_MODES}")
        if feature_precision not in PRECISIONS:
            raise ImcapError(f"data.feature_precision={feature_precision!r}; choose one of {list(PRECISIONS)}")
        if num_workers != "auto" and not (isinstance(num_workers, int) and num_workers >= 0):
            raise ImcapError(f"data.num_workers={num_workers!r}; use auto or a count >= 0")
        if pin_memory != "auto" and not isinstance(pin_memory, bool):
            raise ImcapError(f"data.pin_memory={pin_memory!r}; use auto or a bool")
        whole_number(image_size, "image_size", 1, "the side in pixels images are resized to")
        whole_number(batch_size, "batch_size", 1, "captions per training batch")
        whole_number(eval_batch_size, "eval_batch_size", 1, "images per evaluation batch", null="for data.batch_size")
        whole_number(min_freq, "min_freq", 1, "times a word is seen to enter the vocabulary; 1: every word")
        whole_number(max_vocab_size, "max_vocab_size", len(SPECIALS) + 1,
                     f"words kept, {len(SPECIALS)} of them special tokens", null="for no limit")
        whole_number(max_caption_length, "max_caption_length", 1, "words a caption is cut to")
        whole_number(captions_per_image, "captions_per_image", 1, "captions drawn per image each epoch",
                     null="for all of them")
        self.source = source
        self.root = root  # conf: data.root, which the source reads (named in logs and errors)
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.min_freq, self.max_vocab_size = min_freq, max_vocab_size
        self.max_caption_length = max_caption_length
        self.captions_per_image = captions_per_image
        self.features = features
        self.cache_dir = cache_dir
        self.feature_precision = feature_precision  # what the encoder computes the cache in
        self.seed = seed
        if not (isinstance(pad_to_multiple, int) and pad_to_multiple >= 1):
            raise ImcapError(f"data.pad_to_multiple={pad_to_multiple!r}; use a token count >= 1 (1: no buckets)")
        self.pad_to_multiple = pad_to_multiple  # caption widths rounded up to a multiple (GPU recipe)
        # training batches from one length bucket each, padded to its width (imcap.data.buckets)
        self.bucket_widths = bucket_widths(length_buckets, max_caption_length)
        self.hflip = hflip  # mirror half of the training items each epoch (imcap.data.mirror)
        self.vocab: Vocabulary | None = None
        self.encoder = None
        self._records: dict[str, list[CaptionRecord]] | None = None
        self.datasets: dict[str, CaptionDataset] = {}
        self.eval_split = "test"  # the split the test loop runs on (imcap.eval split=val)
        # the epoch from which training draws one caption per image (set by the module: SCST)
        self.one_caption_per_image_from: int | None = None

    @property
    def source_name(self) -> str:
        """The source's registered name (its conf/data option), else its class name."""
        return name_of(self.source) or type(self.source).__name__

    @property
    def _under_root(self) -> str:
        return f" under data.root={self.root}" if self.root else ""

    # -- records and vocabulary -------------------------------------------------------------
    def prepare_data(self) -> None:
        self.source.prepare()

    @property
    def records(self) -> dict[str, list[CaptionRecord]]:
        if self._records is None:
            by_split: dict[str, list[CaptionRecord]] = {s: [] for s in SPLITS}
            for r in self.source.records():
                if r.split not in by_split:
                    raise ImcapError(f"record {r.image_id} has split {r.split!r}; expected one of {SPLITS}")
                by_split[r.split].append(r)
            if not by_split["train"]:
                raise ImcapError(f"data source {self.source_name!r} has no training images{self._under_root}")
            counts = ", ".join(f"{s}={len(v)}" for s, v in by_split.items())
            log.info("Data %s%s: %s images", self.source_name, self._under_root, counts)
            self._records = by_split
        return self._records

    def build_vocab(self, vocab: Vocabulary | None = None) -> Vocabulary:
        """Use `vocab` (e.g. from a checkpoint being resumed) or build one from train captions."""
        if vocab is None:
            tokenized = (tokenize(c) for r in self.records["train"] for c in r.captions)
            vocab = Vocabulary.build(tokenized, self.min_freq, self.max_vocab_size)
            log.info("Vocabulary: %d tokens (min_freq=%d)", len(vocab), self.min_freq)
        self.vocab = vocab
        return vocab

    # -- datasets -----------------------------------------------------------------------------
    def attach_encoder(self, encoder) -> None:
        self.encoder = encoder

    def _use_cached_features(self) -> bool:
        # frozen, or frozen in front of the stages that train (model.encoder.finetune=last_k)
        cacheable = self.encoder.cacheable
        if self.features == "cached" and not cacheable:
            raise ImcapError("data.features=cached needs an encoder that is frozen, or trains its last stages "
                             "only; set model.encoder.finetune=none or last_k, or data.features=auto")
        return self.features == "cached" or (self.features == "auto" and cacheable)

    def _dataset(self, split: str) -> CaptionDataset:
        if split in self.datasets:
            return self.datasets[split]
        if self.encoder is None or self.vocab is None:
            raise RuntimeError("call build_vocab() and attach_encoder() before setup()")
        records = self.records[split]
        if not records:
            raise ImcapError(f"data source {self.source_name!r} has no {split} images{self._under_root}")
        transform = self.encoder.image_transform(self.image_size)
        mirror = self.hflip and split == "train"
        kwargs: dict = {"transform": transform}
        if self._use_cached_features():
            kwargs = {"features": self._features(records, transform, split)}
            if mirror:
                kwargs["mirrored_features"] = self._features(records, mirrored_transform(transform), f"{split}, mirrored")
        dataset = CaptionDataset(records, self.vocab, per_caption=split == "train",
                                 max_length=self.max_caption_length, mirror=mirror, seed=self.seed, **kwargs)
        self.datasets[split] = dataset
        return dataset

    def _features(self, records: list[CaptionRecord], transform, description: str):
        """The frozen encoder's cached grids of `records`' images under `transform`."""
        cache_dir = self.cache_dir or Path(records[0].image_path).parent / ".imcap-features"
        return extract_features(
            self.encoder, [r.image_path for r in records], transform, cache_dir,
            fingerprint=self.encoder.fingerprint(transform_desc=repr(transform)),
            batch_size=self.eval_batch_size, num_workers=0 if self.num_workers == "auto" else self.num_workers,
            description=description, precision=self.feature_precision,
        )

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": (self.eval_split,)}.get(stage or "", SPLITS)
        for split in splits:
            self._dataset(split)

    def loader_workers(self) -> int:
        """data.num_workers, or with auto: none for cached features (reading a memory-mapped
        cache in-process beats shipping batches from worker processes: measured 20 s against
        26 s per Flickr8k-1k epoch with 2 workers on 2 cores), else a JPEG decoder per core
        (up to 8)."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        if self.encoder is not None and self._use_cached_features():
            return 0
        return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

    def pin(self) -> bool:
        """data.pin_memory, or with auto: pinned batches when a GPU will read them."""
        return torch.cuda.is_available() if self.pin_memory == "auto" else bool(self.pin_memory)

    def _loader(self, split: str, train: bool, items: Sequence[int] | None = None) -> DataLoader:
        """The loader of `split`: shuffled by epoch for training, else in order (of `items`, when given)."""
        dataset = self._dataset(split)
        workers = self.loader_workers()
        order = items
        if train:
            order = EpochSeededSampler(len(dataset), self.seed, dataset.groups(), self.captions_per_image,
                                       self.one_caption_per_image_from, on_epoch=dataset.set_epoch)
            # Lightning counts an epoch's batches from len(loader) when it (re)loads it
            order.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        batching: dict = {"batch_size": self.batch_size if train else self.eval_batch_size, "sampler": order}
        widths = self.bucket_widths if train else None
        if widths is not None:
            buckets = LengthBucketBatchSampler(order, self.batch_size, lengths=dataset.token_lengths(), widths=widths,
                                               order=order, seed=self.seed)
            buckets.set_epoch(order.epoch)
            batching = {"batch_sampler": buckets}
        return ResumableLoader(  # an interrupted run resumes in the middle of its epoch
            dataset,
            **batching,
            collate_fn=partial(collate, pad_id=Vocabulary.pad_id, pad_to_multiple=self.pad_to_multiple, widths=widths),
            num_workers=workers,
            pin_memory=self.pin(),
            persistent_workers=workers > 0,
        )

    def memory_loader(self) -> DataLoader:
        """Every training image once, in order, each with all its captions (`references`): what
        consensus reranking's neighbour memory is built from (`imcap.models.rerank`)."""
        first_items = [items[0] for items in self._dataset("train").groups()]  # one (image, caption) item per image
        return self._loader("train", train=False, items=first_items)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_split, train=False)
