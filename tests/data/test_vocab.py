import pytest

from imcap.data.vocab import SPECIALS, Vocabulary
from imcap.errors import ImcapError


def test_specials_first_then_by_frequency_then_alphabetical():
    vocab = Vocabulary.build([["b", "a", "c"], ["b", "a"], ["b"]])
    assert vocab.itos == [*SPECIALS, "b", "a", "c"]
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2, 3)


def test_min_freq_and_max_size():
    data = [["a", "a", "a", "b", "b", "c"]]
    assert Vocabulary.build(data, min_freq=2).itos[4:] == ["a", "b"]
    assert Vocabulary.build(data, max_size=5).itos[4:] == ["a"]


def test_encode_wraps_and_maps_unknown_words():
    vocab = Vocabulary.build([["a", "dog"]])
    assert vocab.encode(["a", "cat"]) == [vocab.bos_id, vocab.stoi["a"], vocab.unk_id, vocab.eos_id]


def test_decode_stops_at_eos_drops_padding_and_shows_unknown_words():
    vocab = Vocabulary.build([["a", "dog"]])
    ids = [vocab.bos_id, vocab.stoi["a"], vocab.unk_id, vocab.stoi["dog"], vocab.eos_id, vocab.stoi["a"]]
    assert vocab.decode_text(ids) == "a <unk> dog"  # not silently "a dog"
    assert vocab.decode([vocab.stoi["dog"], vocab.pad_id, vocab.pad_id]) == ["dog"]


def test_json_round_trip(tmp_path):
    vocab = Vocabulary.build([["ein", "café"]])
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab


def test_unreadable_vocab_file_is_a_user_error(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text("not json")
    with pytest.raises(ImcapError, match="vocab.json"):
        Vocabulary.load(path)


def test_vocab_must_start_with_specials():
    with pytest.raises(ImcapError, match="must start with"):
        Vocabulary(["a", "b"])
