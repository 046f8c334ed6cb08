import random

import pytest
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from imcap.metrics.tokenizer import PUNCTUATIONS, ptb_tokens, tokenize, tokenize_captions
from tests.helpers.coco_reference import flickr_sample, java_ptb, requires_flickr, requires_java

EDGE_CASES = [
    "", " ", "   ", ".", "...", "!?", "a", "A.", "Dog", "A dog .", "A dog.", "a dog  runs\tfast",
    # apostrophes, contractions, possessives
    "A man's dog.", "the dogs' bone", "don't won't can't isn't ain't y'all", "DON'T Won'T N'T",
    "it's 'quoted' here", "'90s rock 'n' roll", "o'clock O'Neil d'Avignon L'Oreal Shi'ite",
    "man’s dog’s (curly)", "don´t", "cont'd cap'n c'est 'em 'cause 'til", "y'know c'mon",
    "can't've", "O'o", "dog'", "'x", "'", "''", "'hello'", "a'b ab'cd",
    # assimilations
    "cannot gonna gotta lemme gimme wanna 'twas 'tis dunno", "Cannot GONNA", "cannots gonnabe",
    # quotes
    'He said "hi" to me', '"', '" a "', '"$5"', "``latex'' `single'", "“curly” ‘single’ «guillemets»",
    "‚low„ ‹angle› ‛reversed", "’’hi dog’’",
    # hyphens and dashes
    "e-mail well-known t-shirt x-ray co-op 3-year-old mid-air", "-a a- -- --- ---- ----- --a a--b",
    "x -- y – z — w", "-5 +5 -5.5 5-5 -5-year 1.5-2.5 a-1.5 x-U.S.", "a-b-c-d 1-2-3 -x-",
    # brackets, symbols
    "(a) [b] {c} <d> <<e>> a < b > c", "-LRB- -rrb- ( )", "a/b and/or 24/7 1/2/2003",
    "* ** \\* ~ ^ | \\ = == + _ __ @ # ## $ % &", "100% $5 #1 @home US$5 €5 £5 ¢5 ¥5",
    "a&b AT&T R&B &amp; &lt; &gt; &quot; &nbsp;x &mdash;", "S&P-500 C.D.s pro- anti-",
    # numbers and fractions
    "3.5 1,000 10:30 .5 1. ,5 :30 2nd 3rd 1990s", "1/2 1 1/2 12-3/4 ½ ¼ ¾ ⅓ ⅔ ⅛ ² ₂ x²",
    "555-1234 (555) 555-1234 +1 555 123 4567 555.123.4567", "12/31/99 10-12-2010",
    # abbreviations, acronyms, sentence ends
    "U.S. a.m. p.m. Mr. Smith Dr. Who etc. e.g. i.e. vs. St. Mt. Jan. 5", "I. The end.",
    "U.S. The dog", "U.S. the dog", "Inc. The", "Co. Ltd", "fig. 3 ca. 5 no. 5", "mass. Mass. The",
    "hello.world dog.The cat., x.y. etc.b", "Mr.Smith a.b!c?d",
    # urls, emails, files, twitter
    "http://www.google.com/a?b=c, www.foo.com/x foo.com bar.edu", "x@y.com <x@y.com> mailto:x@y.com",
    "photo.jpg file.txt 12www.x.com", "@user #tag #tag2nd c++ c# f#",
    # smileys
    ":) :-( ;) :D ^_^ (^_^) x_x :o", "a :)b",
    # unicode
    "café naïve résumé über 日本 ñ ü ß Ω ﬁ", "ΟΔΟΣ S1Σ", "emoji😀 fine 👍🏽", "soft\u00adhyphen",
    "zero\u200bwidth", "ideographic\u3000space non\u00a0breaking", "Ünïcödé CAPITALS", "İstanbul",
    "tab\there", "ellipsis… dots . . . ....", "ＦＵＬＬ width", "\x7fdel\x00null",
]


def test_basic_tokens():
    assert ptb_tokens("A man's dog (big) don't.") == ["A", "man", "'s", "dog", "-LRB-", "big", "-RRB-",
                                                     "do", "n't", "."]
    # lowercased, "-LRB-" survives (coco-caption lowercases before removing "-LRB-"), "." goes
    assert tokenize("A man's dog (big) don't.") == "a man 's dog -lrb- big -rrb- do n't"
    assert tokenize("") == "" and tokenize(" . ") == ""
    assert PUNCTUATIONS >= {".", ",", "``", "''", "--"}


def test_a_newline_inside_a_caption_is_a_space():
    # pycocoevalcap replaces "\n" by " "; the other line separators split its output lines
    assert tokenize("a dog\nruns") == tokenize("a dog\rruns") == tokenize("a dog\u2028runs") == "a dog runs"


def test_tokenize_captions_takes_pycocoevalcap_input():
    out = tokenize_captions({1: [{"caption": "A Dog."}, {"caption": "Two cats!"}], "x": ["Hi, you"]})
    assert out == {1: ["a dog", "two cats"], "x": ["hi you"]}


@requires_java
def test_matches_the_java_tokenizer_on_edge_cases(tmp_path):
    expected = java_ptb(EDGE_CASES, tmp_path)
    assert [tokenize(c) for c in EDGE_CASES] == expected


@requires_java
@requires_flickr
@pytest.mark.realdata
def test_matches_pycocoevalcap_tokenizer_on_real_captions():
    """pycocoevalcap's own PTBTokenizer (the jar, one file for all captions), 2,000 captions."""
    _, references = flickr_sample(400)
    captions = {i: [{"caption": c} for c in refs] for i, refs in enumerate(references)}
    expected = PTBTokenizer().tokenize(captions)
    assert tokenize_captions(captions) == expected


FRAGMENTS = """a A dog Dog man's don't can't 's 'll ' '' ` `` " “ ” ‘ ’ « » . , ; : ! ? ... - -- _ ( ) [ ] { }
< > & &amp; # @ $ % * / \\ = + 1 12 3.5 1,000 10:30 1/2 ½ 2nd '90s -5 U.S. e.g. etc. Mr. fig. The I.
e-mail 3-year-old O'Neil y'all cannot gonna c++ :) ^_^ x@y.com www.x.com a.jpg @user #tag AT&T café
日本 Ω 😀 ² € – — … · é""".split()


@requires_java
def test_agreement_rate_on_generated_text(tmp_path):
    """Random strings of tricky fragments: the rate of exact agreement with the jar, per caption
    tokenised on its own (this implementation's contract) and as pycocoevalcap runs them, all in
    one file, where a caption's last token can see the next caption or the end of the file."""
    rng = random.Random(0)
    texts = ["".join(rng.choice(FRAGMENTS) + rng.choice(["", " ", " ", "  ", "\t", "\u00a0"])
                     for _ in range(rng.randint(1, 10))).strip(" ") for _ in range(3000)]
    ours = [tokenize(t) for t in texts]
    isolated = java_ptb(texts, tmp_path)
    one_file = list(PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)}).values())
    agreement = sum(a == b for a, b in zip(ours, isolated)) / len(texts)
    agreement_one_file = sum([a] == b for a, b in zip(ours, one_file)) / len(texts)
    print(f"agreement with the jar: {agreement:.4%} per caption, {agreement_one_file:.4%} in one file")
    assert agreement >= 0.999
    assert agreement_one_file >= 0.99
