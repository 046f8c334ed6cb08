"""Shared fixtures: composed configs for tiny, fast runs, one trained tiny run; offline W&B."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# `make test` runs the suite in two pytest-xdist workers, one per core of a CI machine. Each
# worker computes on one thread (two 2-thread OpenMP pools on 2 cores mostly wait on each other),
# and so does every process its tests start; each has a temporary folder of its own, so that what
# one worker's processes leave in the system temp folder (demo uploads, staged shards) is never
# seen or cleaned by the other's.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TMPDIR"] = tempfile.mkdtemp(prefix=f"imcap-tests-{os.environ['PYTEST_XDIST_WORKER']}-")
    atexit.register(shutil.rmtree, os.environ["TMPDIR"], ignore_errors=True)
    tempfile.tempdir = None  # read TMPDIR again

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from imcap.config_compose import compose_config  # noqa: E402
from tests.helpers.paths import FLICKR_1K  # noqa: E402
from tests.helpers.runs import TINY  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")  # tests never need a W&B key
os.environ.setdefault("WANDB_SILENT", "true")


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
def trained(tmp_path_factory, data_dir) -> tuple[Path, dict[str, float]]:
    """One tiny two-epoch training run (run directory, metrics), shared by every test that needs
    a trained model: its directory holds checkpoints/{best,last}.ckpt, metrics.json, config.yaml
    and predictions/test.json. Scores nltk's BLEU too."""
    from imcap.train import train

    out = tmp_path_factory.mktemp("trained") / "run"
    tiny = [o for o in TINY if not o.startswith("model.test_metrics")]
    cfg = compose_config("train", [*tiny, "model.test_metrics=[BLEU,BLEU_nltk,ROUGE-L,CIDEr-D]",
                                   "trainer.max_epochs=2"], out, data_dir)
    return out, train(cfg)


@pytest.fixture(scope="session")
def trained_run(trained) -> Path:
    """The directory of the `trained` run."""
    return trained[0]


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


@pytest.fixture
def glove_file(tmp_path) -> Path:
    """A 3-d GloVe text file (tests/helpers/word_vectors.py) for data and model tests."""
    from tests.helpers.word_vectors import write_glove_file

    return write_glove_file(tmp_path)
