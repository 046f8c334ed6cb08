from imcap.data.text import normalize, tokenize


def test_normalize_lowercases_and_strips_punctuation():
    assert normalize("A Dog, running!  On the beach.") == "a dog running on the beach"


def test_normalize_splits_hyphens_and_apostrophes():
    assert tokenize("A black-and-white dog's toy") == ["a", "black", "and", "white", "dog", "s", "toy"]


def test_normalize_keeps_unicode_letters_and_digits():
    assert tokenize("Zwei Hunde spielen im Café, 2 Bälle") == ["zwei", "hunde", "spielen", "im", "café", "2", "bälle"]


def test_empty_and_punctuation_only_captions_give_no_tokens():
    assert tokenize("") == []
    assert tokenize(" ... !! ") == []


def test_underscores_are_separators():
    assert tokenize("snake_case") == ["snake", "case"]
