"""Length-bucketed batches (`imcap.data.buckets`): every caption once per epoch, one bucket per
batch padded to its fixed width, the same plan from the same seed and epoch, disjoint ranks
with equal batch counts, and a real DDP training run through `python -m imcap.train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from imcap.data.buckets import LengthBucketBatchSampler, bucket_widths, width_for
from imcap.data.dataset import EpochSeededSampler, collate
from imcap.errors import ImcapError
from tests.helpers.runs import TINY

ROOT = Path(__file__).resolve().parents[2]
WIDTHS = (5, 8, 12)  # tokens: captions of up to 3, 6 and 10 words


def _lengths(n: int = 203, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(3, 13, (n,), generator=g)).tolist()  # tokens per caption, <bos>/<eos> included


def _sampler(lengths, batch_size=8, world=1, rank=0, seed=3, groups=None, per_group=None) -> LengthBucketBatchSampler:
    order = EpochSeededSampler(len(lengths), seed, groups, per_group)
    sampler = DistributedSampler(range(len(lengths)), num_replicas=world, rank=rank) if world > 1 else order
    return LengthBucketBatchSampler(sampler, batch_size, lengths=lengths, widths=WIDTHS, order=order, seed=seed)


def _epoch(sampler: LengthBucketBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    return batches


def test_bucket_widths_are_caption_lengths_plus_bos_and_eos_up_to_the_longest_caption():
    assert bucket_widths(None, 30) is None
    assert bucket_widths([8, 12, 16, 20, 30], 30) == (10, 14, 18, 22, 32)
    assert bucket_widths([8, 12], 30) == (10, 14, 32)  # a last bucket for what is longer
    assert width_for(11, (10, 14, 32)) == 14 and width_for(10, (10, 14, 32)) == 10


@pytest.mark.parametrize("bad", [[], [12, 8], [8, 8], [0, 4], ["a"], [True]])
def test_bucket_widths_refuse_what_is_not_increasing_lengths(bad):
    with pytest.raises(ImcapError, match=r"data.length_buckets=.*increasing caption lengths in words"):
        bucket_widths(bad, 30)


def test_each_caption_once_per_epoch_and_each_batch_from_one_bucket():
    lengths = _lengths()
    sampler = _sampler(lengths)
    for epoch in (0, 1):
        batches = _epoch(sampler, epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for batch in batches:
            assert 1 <= len(batch) <= 8
            assert len({width_for(lengths[i], WIDTHS) for i in batch}) == 1
        # full batches but for the last of each bucket
        assert sum(len(b) < 8 for b in batches) <= len(WIDTHS)


def test_the_plan_depends_only_on_seed_and_epoch():
    lengths = _lengths()
    assert _epoch(_sampler(lengths), 1) == _epoch(_sampler(lengths), 1)  # a resumed run sees the same epoch
    assert _epoch(_sampler(lengths), 0) != _epoch(_sampler(lengths), 1)
    assert _epoch(_sampler(lengths, seed=4), 0) != _epoch(_sampler(lengths), 0)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_are_disjoint_cover_every_caption_and_count_the_same_batches(world):
    lengths = _lengths()
    for epoch in (0, 1):
        per_rank = [_epoch(_sampler(lengths, world=world, rank=r), epoch) for r in range(world)]
        assert len({len(batches) for batches in per_rank}) == 1  # DDP steps in lockstep
        seen = [i for batches in per_rank for b in batches for i in b]
        assert sorted(seen) == list(range(len(lengths)))  # disjoint, nothing dropped or repeated


def test_captions_per_image_draws_per_image_with_the_same_batch_count_every_epoch():
    """Lightning counts an epoch's batches once: the draw must not change the count."""
    lengths = _lengths(n=150)
    groups = [list(range(i, i + 5)) for i in range(0, 150, 5)]  # 30 images of 5 captions
    sampler = _sampler(lengths, groups=groups, per_group=2)
    counts = set()
    for epoch in range(6):
        batches = _epoch(sampler, epoch)
        counts.add(len(batches))
        chosen = Counter(i // 5 for b in batches for i in b)
        assert chosen == {image: 2 for image in range(30)}
        assert all(len({width_for(lengths[i], WIDTHS) for i in b}) == 1 for b in batches)
    assert len(counts) == 1


def test_too_few_captions_for_the_processes_is_a_user_error():
    with pytest.raises(ImcapError, match="cannot make the same number of batches on 4 processes"):
        list(_sampler([4, 9], world=4))


def test_collate_pads_a_batch_to_its_buckets_width():
    items = [{"tokens": torch.arange(n), "references": [], "raw_references": [], "image_id": 0, "index": 0,
              "item_id": k, "grid": torch.zeros(2, 3)} for k, n in enumerate((6, 7))]
    batch = collate(items, widths=WIDTHS)
    assert batch["tokens"].shape == (2, 8) and batch["lengths"].tolist() == [7, 6]
    assert batch["item_ids"] == [1, 0]


def test_the_datamodule_batches_by_bucket(make_cfg):
    from hydra.utils import instantiate

    from imcap.train import build_module

    cfg = make_cfg("data.length_buckets=[3,5]", "data.batch_size=4")
    dm = instantiate(cfg.data)
    dm.prepare_data()
    module = build_module(cfg, dm.build_vocab())
    dm.attach_encoder(module.captioner.encoder)
    dm.setup("fit")
    widths = dm.bucket_widths
    batches = list(dm.train_dataloader())
    # data=shapes draws one caption per image each epoch: every image once
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(len(dm.records["train"])))
    for b in batches:
        assert b["tokens"].shape[1] in widths
        assert b["tokens"].shape[1] == width_for(int(b["lengths"].max()), widths)
    assert not isinstance(dm.val_dataloader().batch_sampler, LengthBucketBatchSampler)  # evaluation: by image


@pytest.mark.slow
def test_two_ddp_processes_train_on_disjoint_buckets_through_imcap_train(tmp_path):
    """`python -m imcap.train trainer=ddp` (2 gloo processes) with length buckets: Lightning
    rebuilds the batch sampler per rank; each epoch the ranks train on disjoint captions, all of
    them, in the same number of steps, every batch at a bucket width."""
    record = tmp_path / "seen"
    cmd = [sys.executable, "-m", "imcap.train", *TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.max_epochs=2", "test=false", "data.length_buckets=[3,5]", "data.batch_size=8",
           "data.captions_per_image=null",
           f"hydra.run.dir={tmp_path / 'run'}", "+callbacks.record._target_=tests.helpers.callbacks.RecordItems",
           f"+callbacks.record.path={record}"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "IMCAP_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r: [json.loads(line) for line in (tmp_path / f"seen.rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}
    assert all(row["world"] == 2 for r in rows for row in rows[r])
    for epoch in (0, 1):
        mine = {r: [i for row in rows[r] if row["epoch"] == epoch for i in row["items"]] for r in rows}
        steps = {r: sum(row["epoch"] == epoch for row in rows[r]) for r in rows}
        assert steps[0] == steps[1] > 0
        assert not set(mine[0]) & set(mine[1])
        assert sorted(mine[0] + mine[1]) == list(range(len(mine[0]) + len(mine[1])))  # every caption once
    assert {row["width"] for r in rows for row in rows[r]} <= {5, 7, 32}
