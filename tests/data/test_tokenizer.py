from imcap.data.tokenizer import normalize, tokenize


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


# -- text in any script: combining marks stay inside their words -------------------------------
# Real captions (a cat asleep on a sofa, and the like), with the tokens a reader of each script sees.
SENTENCES = {
    "Hindi": ("एक बिल्ली सोफ़े पर सो रही है।", ["एक", "बिल्ली", "सोफ़े", "पर", "सो", "रही", "है"]),
    "Bengali": ("একটি বিড়াল ঘুমাচ্ছে", ["একটি", "বিড়াল", "ঘুমাচ্ছে"]),
    "Arabic with vowel marks": ("قِطَّةٌ نَائِمَةٌ عَلَى الأَرِيكَةِ.", ["قِطَّةٌ", "نَائِمَةٌ", "عَلَى", "الأَرِيكَةِ"]),
    "pointed Hebrew": ("חָתוּל יָשֵׁן עַל הַסַּפָּה.", ["חָתוּל", "יָשֵׁן", "עַל", "הַסַּפָּה"]),
    "Vietnamese": ("Một con mèo đang ngủ trên ghế sofa.", ["một", "con", "mèo", "đang", "ngủ", "trên", "ghế", "sofa"]),
    "German": ("Eine Katze schläft auf dem Sofa, daneben ein Hund.",
               ["eine", "katze", "schläft", "auf", "dem", "sofa", "daneben", "ein", "hund"]),
    "Persian (zero width non-joiner)": ("گربه\u200cها می\u200cخوابند", ["گربه\u200cها", "می\u200cخوابند"]),
    "emoji between words": ("Ein Hund 🐶 läuft 🏃‍♂️ am Strand ❤️", ["ein", "hund", "läuft", "am", "strand"]),
}


def test_words_in_every_script_keep_their_combining_marks():
    for script, (caption, words) in SENTENCES.items():
        assert tokenize(caption) == words, script


def test_a_hindi_word_is_one_token_not_its_consonants():
    assert tokenize("बिल्ली") == ["बिल्ली"]  # ब ि ल ् ल ी: vowel signs and virama are marks (Mn, Mc)


def test_text_without_spaces_is_one_token_per_run_between_punctuation():
    """Thai, Chinese and Japanese are not segmented (module docstring): their marks stay too."""
    assert tokenize("แมวนอนอยู่บนโซฟา") == ["แมวนอนอยู่บนโซฟา"]  # อยู่: two marks above
    assert tokenize("一只猫在沙发上睡觉。旁边有一只狗") == ["一只猫在沙发上睡觉", "旁边有一只狗"]
    assert tokenize("猫がソファの上で寝ている。") == ["猫がソファの上で寝ている"]
    assert tokenize("一只 猫 在 沙发 上") == ["一只", "猫", "在", "沙发", "上"]  # segmented beforehand


def test_nfkc_composes_what_it_can_and_marks_keep_the_rest():
    decomposed = "me\u0300o"  # Vietnamese "mèo" typed with a combining grave
    assert tokenize(decomposed) == ["mèo"]
    assert tokenize("Ga\u0331") == ["ga\u0331"]  # no precomposed form: the mark stays in the word


def test_emoji_symbols_and_stray_marks_are_separators():
    assert tokenize("🐱😴🛋️") == []
    assert tokenize("👨‍👩‍👧 ✨ — … ©") == []
    assert tokenize("dog \u0301 cat") == ["dog", "cat"]  # a mark with no letter before it


def test_english_tokens_are_unchanged_by_the_marks_rule():
    """The demo's and the real-photo recipe's metrics rest on this: byte-identical English."""
    assert normalize("A Dog's black-and-white ball_game, 2 cats!  ") == "a dog s black and white ball game 2 cats"
