"""Shared fixtures: composed configs for tiny, fast runs; real-data paths; offline W&B."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from imcap.config import compose_config

os.environ.setdefault("WANDB_MODE", "offline")  # tests never need a W&B key
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"
FLICKR_1K = SHARED_DATA / "flickr8k-1k"

# A model and dataset small enough for a CPU epoch in a second or two.
TINY = [
    "data.source.num_images={train:48,val:16,test:16}",
    "data.source.image_size=64",
    "data.batch_size=16",
    "data.eval_batch_size=16",
    "model.decoder.hidden_dim=64",
    "++model.attention.attention_dim=32",
    "model.embedding.dim=32",
    "trainer.max_epochs=1",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "model.test_metrics=[BLEU,ROUGE-L,CIDEr-D]",  # METEOR's Java start (7 s) is tested in tests/metrics
]


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; several OpenMP threads on a shared CPU mostly wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data folder per test session: the tiny shapes set and its features are made once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """One tiny trained run per session (shapes, one epoch, tested): its directory holds
    checkpoints/best.ckpt, metrics.json and predictions/test.json. Scores nltk's BLEU too."""
    from imcap.train import train

    out = tmp_path_factory.mktemp("trained") / "run"
    metrics = [o for o in TINY if o.startswith("model.test_metrics")]
    train(compose_config("train", [*[o for o in TINY if o not in metrics],
                                   "model.test_metrics=[BLEU,BLEU_nltk,CIDEr-D]"], out, data_dir))
    return out


@pytest.fixture
def make_cfg(tmp_path, data_dir):
    def make(*overrides: str, name: str = "train", tiny: bool = True, out: Path | None = None) -> DictConfig:
        extra = TINY if (tiny and name == "train") else []
        return compose_config(name, [*extra, *overrides], out or tmp_path / "run", data_dir)

    return make


def pytest_collection_modifyitems(config, items):
    if not FLICKR_1K.is_dir():
        skip = pytest.mark.skip(reason=f"real Flickr8k subset not found at {FLICKR_1K}")
        for item in items:
            if "realdata" in item.keywords:
                item.add_marker(skip)
