"""Streaming shards: each item once per epoch across ranks and workers, equal batch counts,
mid-epoch resume; and training from shards with 2 DDP processes, 2 nodes, and a kill -9."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imcap.data.records import CaptionRecord
from imcap.data.shards import write_shards
from imcap.data.streaming import RankPlan, ShardSplit, ShardStream, StreamingLoader, expand_shards
from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from tests.helpers.paths import ROOT
from tests.helpers.runs import kill_9_once_marked


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> ShardSplit:
    """23 tiny images with 1-3 captions each (46 captions) in 4 shards of up to 7."""
    folder = tmp_path_factory.mktemp("shards")
    records = []
    for i in range(23):
        path = folder / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(path)
        records.append(CaptionRecord(i, str(path), tuple(f"image {i} caption {j}" for j in range(1 + i % 3)), "train"))
    shards = write_shards(records, folder / "train", shard_size=7)
    return ShardSplit.load("train", shards, None, "error")


def all_items(split: ShardSplit, per_image: int | None = None) -> list[str]:
    from imcap.data.shards import load_index

    out = []
    for shard in split.shards:
        for s in load_index(shard):
            out += [f"{Path(shard).name}/{s.key}#{c}" for c in range(len(s.captions))][: per_image or None]
    return out


def stream(split: ShardSplit, train: bool = True, batch_size: int = 4, buffer: int = 8, per_image=None) -> ShardStream:
    vocab = Vocabulary.build([["image", "caption"]])
    return ShardStream(split, vocab, train, batch_size, seed=3, shuffle_buffer=buffer, max_length=10,
                       per_image=per_image, cache_dir=None, transform=lambda im: torch.zeros(3, 2, 2))


def loader(ds: ShardStream, rank: int, world: int, workers: int, epoch: int = 0, trained: int = 0) -> StreamingLoader:
    ds.rank, ds.world = rank, world
    return StreamingLoader(ds, epoch=lambda: epoch, trained=lambda: trained, num_workers=workers)


def epoch_batches(split, world: int, workers: int, epoch: int = 0, **kw) -> list[list[list[str]]]:
    return [[b["item_ids"] for b in loader(stream(split, **kw), r, world, workers, epoch)] for r in range(world)]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 2)])
def test_every_item_once_per_epoch_across_ranks_and_workers(split, world, workers):
    expected = sorted(all_items(split))
    orders = []
    for epoch in (0, 1):
        per_rank = epoch_batches(split, world, workers, epoch)
        assert len({len(batches) for batches in per_rank}) == 1  # DDP ranks step in lockstep
        seen = [i for batches in per_rank for b in batches for i in b]
        assert sorted(seen) == expected  # nothing repeated, nothing left out
        assert all(0 < len(b) <= 4 for batches in per_rank for b in batches)
        orders.append(seen)
    assert orders[0] != orders[1]  # shuffled afresh every epoch


def test_worker_count_changes_the_order_not_the_batches(split):
    one = epoch_batches(split, 1, 0)[0]
    two = epoch_batches(split, 1, 2)[0]
    assert sorted(map(tuple, one)) == sorted(map(tuple, two))


def test_captions_per_image_draws_one_caption_of_every_image(split):
    counts = [Counter(i.split("#")[0] for b in epoch_batches(split, 2, 0, epoch, per_image=1)[r] for i in b)
              for epoch in (0, 1) for r in range(2)]
    images = Counter()
    for c in counts[:2]:
        images.update(c)
    assert len(images) == 23 and set(images.values()) == {1}


def test_evaluation_streams_each_image_once_in_order(split):
    per_rank = epoch_batches(split, 2, 0, train=False)
    seen = [i for batches in per_rank for b in batches for i in b]
    assert sorted(seen) == sorted(all_items(split, per_image=1))
    ds = stream(split, train=False)
    batch = next(iter(loader(ds, 0, 1, 0)))
    assert sorted(batch["index"].tolist()) == [0, 1, 2, 3]  # positions in the split: unique across ranks


@pytest.mark.parametrize("workers,resume_workers", [(0, 0), (2, 2), (2, 0)])
def test_resume_mid_epoch_yields_exactly_the_batches_not_trained(split, workers, resume_workers):
    ds = stream(split)
    first = loader(ds, 1, 2, workers, epoch=1)
    it = iter(first)
    trained = [next(it)["item_ids"] for _ in range(3)]
    del it
    state = loader(ds, 1, 2, workers, epoch=1, trained=3).state_dict()
    state["workers"] = max(1, workers)  # as saved by the run that trained them
    state["epoch"] = 1
    resumed = loader(stream(split), 1, 2, resume_workers, epoch=0)
    resumed.load_state_dict(state)
    rest = [b["item_ids"] for b in resumed]
    full = [i for b in epoch_batches(split, 2, workers, epoch=1)[1] for i in b]
    assert sorted(i for b in trained + rest for i in b) == sorted(full)
    assert len(trained) + len(rest) == len(ds)


def test_resume_after_a_finished_epoch_starts_the_next(split):
    ds = stream(split)
    state = {**loader(ds, 0, 1, 0, epoch=0, trained=len(ds)).state_dict(), "epoch": 0}
    resumed = loader(stream(split), 0, 1, 0, epoch=0)
    resumed.load_state_dict(state)
    assert [b["item_ids"] for b in resumed] == epoch_batches(split, 1, 0, epoch=1)[0]


def test_resume_with_other_settings_is_a_one_line_error(split):
    state = loader(stream(split), 0, 1, 0).state_dict()
    with pytest.raises(ImcapError, match="world 1 -> 2.*same data.batch_size"):
        loader(stream(split), 0, 2, 0).load_state_dict(state)


def test_hflip_on_shards_is_a_one_line_error_not_ignored():
    from imcap.data.streaming import ShardDataModule

    with pytest.raises(ImcapError, match=r"data.hflip=true is not available with data=shards; set data.hflip=false"):
        ShardDataModule(root="shards", hflip=True)


def test_batches_split_evenly_and_too_little_data_is_an_error():
    plan = RankPlan.make(items=10, world=3, rank=2, batch_size=2, per_chunk=1, split="train")
    assert plan.batches == 2 and np.diff(plan.bounds).tolist() == [2, 2]
    with pytest.raises(ImcapError, match="2 val items cannot fill 1 batches on each of 3 ranks"):
        RankPlan.make(items=2, world=3, rank=0, batch_size=4, per_chunk=1, split="val")


def test_first_batches_follow_the_dataloaders_turns():
    plan = RankPlan(0, 20, batches=5, per_chunk=2)  # chunks {0,1} {2,3} {4}
    assert plan.worker_batches(0, 2) == [0, 1, 4] and plan.worker_batches(1, 2) == [2, 3]
    assert plan.first_batches(3, 2) == {0, 2, 1}
    assert plan.first_batches(5, 2) == {0, 1, 2, 3, 4}


def test_shard_patterns_expand_globs_and_brace_ranges(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:06d}.tar").touch()
    assert expand_shards(tmp_path, "*.tar") == [str(tmp_path / f"{i:06d}.tar") for i in range(3)]
    assert expand_shards(tmp_path, "{000001..000002}.tar") == [str(tmp_path / f"{i:06d}.tar") for i in (1, 2)]
    assert expand_shards(tmp_path, ["000002.tar", "*.tar"])[0].endswith("000002.tar")


# -- training from shards, as users run it ----------------------------------------------------------
TINY_TRAIN = [
    "data=shards", "data.image_size=64", "data.batch_size=8", "data.eval_batch_size=8", "data.min_freq=1",
    "data.shuffle_buffer=16", "model.decoder.hidden_dim=32", "++model.attention.attention_dim=16",
    "model.embedding.dim=16", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "model.test_metrics=[BLEU]", "test=false",
]


@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory) -> Path:
    """Shards of a small shapes demo, written by the command users run (48/8/8 images, 5
    captions each, 16 per shard), with their feature caches filled by a first tiny run."""
    home = tmp_path_factory.mktemp("shapes-shards")
    env = {**os.environ, "IMCAP_ROOT": str(home), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "imcap.data", "shards", f"out={home / 'shards'}", "shard_size=16",
                           "data.source.num_images={train:48,val:8,test:8}", "data.source.image_size=64"],
                          cwd=home, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train       48 images      3 shards" in done.stdout
    return home / "shards"


def train_cmd(shards: Path, out: Path, record: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "imcap.train", *TINY_TRAIN, f"data.root={shards}", f"hydra.run.dir={out}",
            "+callbacks.record._target_=tests.helpers.callbacks.RecordItems", f"+callbacks.record.path={record}", *extra]


def run_env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "IMCAP_ROOT": str(home), "PYTHONPATH": str(ROOT), **extra}


def seen_per_epoch(record: Path, max_step: int | None = None) -> dict[int, list[str]]:
    seen: dict[int, list[str]] = {}
    for path in sorted(record.parent.glob(f"{record.name}.rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if max_step is None or row["step"] <= max_step:
                seen.setdefault(row["epoch"], []).extend(row["items"])
    return seen


def shard_items(shards: Path) -> list[str]:
    from imcap.data.shards import load_index

    return sorted(f"{p.name}/{s.key}#{c}" for p in sorted((shards / "train").glob("*.tar"))
                  for s in load_index(p) for c in range(len(s.captions)))


@pytest.mark.slow
def test_two_ddp_processes_see_every_caption_once_per_epoch(shapes_shards, tmp_path):
    record = tmp_path / "seen"
    done = subprocess.run(train_cmd(shapes_shards, tmp_path / "run", record, "trainer=ddp", "trainer.accelerator=cpu",
                                    "trainer.devices=2", "trainer.max_epochs=2"),
                          cwd=tmp_path, env=run_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(tmp_path.glob("seen.rank*.jsonl"))) == 2
    expected = shard_items(shapes_shards)
    seen = seen_per_epoch(record)
    assert sorted(seen) == [0, 1]
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == expected, f"epoch {epoch}: {Counter(seen[epoch]).most_common(2)}"
    assert seen[0] != seen[1]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    # streamed shards give no training image one by one: the default decoding says it does not rerank
    assert "which ShardDataModule does not give (streamed data): decoding without reranking" in done.stdout + done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_one_process_see_every_caption_once(shapes_shards, tmp_path):
    """Two 'nodes' started by hand as a cluster scheduler would: NODE_RANK, MASTER_ADDR/PORT,
    WORLD_SIZE; each runs in its own folder, sharing the shards."""
    record = tmp_path / "seen"
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        env = run_env(tmp_path, NODE_RANK=str(node), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                      WORLD_SIZE="2")
        (tmp_path / f"node{node}").mkdir()
        procs.append(subprocess.Popen(
            train_cmd(shapes_shards, tmp_path / f"node{node}" / "run", record, "trainer=ddp", "trainer.accelerator=cpu",
                      "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_epochs=1"),
            cwd=tmp_path / f"node{node}", env=env, stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"node{node}.log", "w")))
    for node, proc in enumerate(procs):
        assert proc.wait(timeout=900) == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]
    assert sorted(p.name for p in tmp_path.glob("seen.rank*.jsonl")) == ["seen.rank0.jsonl", "seen.rank1.jsonl"]
    seen = seen_per_epoch(record)
    assert sorted(seen[0]) == shard_items(shapes_shards)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_repeats_and_skips_nothing(shapes_shards, tmp_path):
    """Batch 8, 240 captions: 30 steps an epoch. The first run checkpoints every 4 steps and is
    killed -9 while it waits before step 10 (its last checkpoint: step 8); the resumed run
    finishes the epoch and one more."""
    record, run = tmp_path / "seen", tmp_path / "run"
    common = ["trainer.max_epochs=2", "data.num_workers=2", "+callbacks.last_checkpoint.every_n_train_steps=4"]
    kill_9_once_marked(train_cmd(shapes_shards, run, record, *common, "+callbacks.record.stop_at_step=10"),
                       Path(f"{record}.stopped"), cwd=tmp_path, env=run_env(tmp_path), log=tmp_path / "first.log")
    ckpt = run / "checkpoints" / "last.ckpt"
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert step == 8
    before = seen_per_epoch(record, max_step=step)
    for path in tmp_path.glob("seen.rank*.jsonl"):
        path.rename(path.with_name("first-" + path.name))
    done = subprocess.run(train_cmd(shapes_shards, tmp_path / "resumed", record, *common, f"ckpt_path={ckpt}"),
                          cwd=tmp_path, env=run_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming epoch 0 of the train shards after 8 of 30 batches" in done.stdout + done.stderr
    after = seen_per_epoch(record)
    first = [json.loads(line) for line in (tmp_path / "first-seen.rank0.jsonl").read_text().splitlines()]
    before = [i for row in first if row["step"] <= step for i in row["items"]]
    expected = shard_items(shapes_shards)
    assert sorted(before + after[0]) == expected  # epoch 0: killed and resumed, each caption once
    assert sorted(after[1]) == expected


def test_the_loader_logs_nothing_when_not_resuming(split, caplog):
    with caplog.at_level(logging.INFO):
        list(loader(stream(split), 0, 1, 0))
    assert "Resuming" not in caplog.text
