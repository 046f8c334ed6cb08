"""coco-caption's PTB tokenisation in pure Python, without Java.

pycocoevalcap's `PTBTokenizer` runs Stanford CoreNLP 3.4.1's `PTBTokenizer -preserveLines
-lowerCase` over one caption per line and then drops the tokens in `PUNCTUATIONS`. This module
re-implements the JFlex scanner behind it (`PTBLexer`) as an ordered list of rules matched
longest-first, ties going to the earlier rule, with the jar's default options (PTB3 escaping,
no americanisation, no escaping of `/` and `*`). The rules follow PTBLexer.flex of that time,
each detail checked against the jar (its character classes too: see _ptb_charsets.py). Rules
that cannot change a token's text once punctuation is removed (the period repeated after a
sentence-final "etc." or "U.S.") are folded into their simpler forms.

Measured against the jar: all 40,455 Flickr8k captions tokenise identically, and 319,999 of
320,000 generated strings of tricky fragments and random characters (the one: a capital letter
Unicode added after the version Java 17 knows, which Python lowercases and Java does not).

Where it departs from pycocoevalcap, on purpose:
- Each caption is tokenised on its own, as if followed by a newline and an ordinary word. The
  jar reads all captions as one file, so a caption's last token can see the next caption (only
  "fig." or "no." at a line end before a line starting with a digit comes out differently) and
  the last caption sees the end of the file (a handful of constructs, e.g. a final ":)").
- Line separators inside a caption (\\r, \\v, \\f, U+2028, U+2029) are spaces here; the jar
  turns them into extra output lines, which misaligns every later caption in pycocoevalcap.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from imcap.metrics._ptb_charsets import ALPHA_RANGES, DIGIT_RANGES, LETTER_EXTRA_RANGES, char_class

# pycocoevalcap/tokenizer/ptbtokenizer.py removes these tokens after tokenising. The jar has
# already lowercased its output, so "-LRB-" and friends never match and stay as "-lrb-".
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])


def _ci(literal: str) -> str:
    """A regex for `literal` matched as JFlex's %caseless matches text outside classes."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.lower() != c.upper() else re.escape(c)
                   for c in literal)


def _alt(*literals: str) -> str:
    return "(?:" + "|".join(_ci(w) for w in literals) + ")"


# --- Macros of PTBLexer.flex (3.4.1), in Python syntax -------------------------------------
ALPHA, DIGIT_CLS = char_class(ALPHA_RANGES), char_class(DIGIT_RANGES)
L = f"[{ALPHA}]"                                  # [:letter:]
D = f"[{DIGIT_CLS}]"                              # [:digit:] and NKo digits
LD = f"[{ALPHA}{DIGIT_CLS}]"
SPLET = "&[aeiouAEIOU]" + _alt("acute", "grave", "uml") + ";"
LETTER = f"(?:[{ALPHA}{char_class(LETTER_EXTRA_RANGES)}]|{SPLET})"
SPACE_CHARS = " \t\u00a0\u2000-\u200a\u3000"
NEWLINE_CHARS = "\r\n\u2028\u2029\u000b\u000c\u0085"
SPACE = f"[{SPACE_CHARS}]"
SPACENL = f"[{SPACE_CHARS}{NEWLINE_CHARS}]"

APOS = f"(?:['\u0092\u2019]|{_ci('&apos;')})"
APOSETC = f"(?:{APOS}|[`\u0091\u2018\u201b])"
HYPHEN = "[-_\u058a\u2010\u2011]"
SPAMP = _ci("&amp;")
NUM = f"{D}*(?:[.:,\u00ad\u066b\u066c]{D}+)+|{D}+"  # longer alternative first (Python is not POSIX)
NUMBER = f"[-+]?(?:{NUM})"
WORD = f"{LETTER}(?:{LETTER}|{D})*(?:[.!?]{LETTER}(?:{LETTER}|{D})*)*"
THING = f"(?:[dDoOlL]{APOSETC}{LD})?{LD}+(?:{HYPHEN}(?:[dDoOlL]{APOSETC}{LD})?{LD}+)*"
THINGA = f"[A-Z]+(?:(?:[+&]|{SPAMP})[A-Z]+)+"
THING3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
ACRO_SPECIAL = (f"(?:{_alt('Canada', 'Sino', 'Korean', 'EU', 'Japan', 'non')}-{_ci('U.S')}"
                f"|{_ci('U.S.-')}{_alt('U.K', 'U.S.S.R')})")
ACRO = f"(?:{ACRO_SPECIAL}|[A-Za-z](?:\\.[A-Za-z])*)"
ACRO2 = f"(?:{ACRO_SPECIAL}|[A-Za-z](?:\\.[A-Za-z])+)"
HTHING = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{ACRO2}\\.|[A-Za-z0-9\u00ad]+))+"
REDAUX = f"{APOS}(?:[msdMSD]|{_alt('re', 've', 'll')})"
SWORD = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
SREDAUX = f"[nN]{APOSETC}[tT]"
SGML = ("<(?:[!?][A-Za-z-][^>\r\n]*"
        "|[A-Za-z][A-Za-z0-9_:.-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")"
        "|[A-Za-z][A-Za-z0-9_:.-]*))*[ ]*/?"
        "|/[A-Za-z][A-Za-z0-9_:.-]*)[ ]*>")
EMAIL_CHAR = "[^ \t\n\f\r\"<>|(){}\u00a0]"
EMAIL_DOMAIN_CHAR = "[^ \t\n\f\r\"<>|(){}.\u00a0]"
URL_END = "[^ \t\n\f\r\"<>|.!?(){},-]"
URL_PATH = f"(?:/[^ \t\n\f\r\"<>|()]+{URL_END})?"
TLD = _alt("com", "net", "org", "edu")
FILENAME_EXT = _alt("bat", "bmp", "class", "cgi", "cpp", "c", "dll", "docx", "doc", "exe", "gif",
                    "gz", "html", "htm", "h", "jar", "java", "jpeg", "jpg", "mov", "mp3", "pdf",
                    "php", "pl", "png", "ppt", "ps", "py", "sql", "tar", "txt", "wav", "xml", "x",
                    "zip")
PHONE_SEP = "[- \u00a0]"
ABMONTH = ["Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sept", "Sep", "Oct", "Nov", "Dec"]
ABDAYS = ["Mon", "Tues", "Tue", "Wed", "Thurs", "Thu", "Fri"]
ABSTATE = ["Ala", "Ariz", "[A]z", "[A]rk", "Calif", "Colo", "Conn", "Ct", "Dak", "[D]el", "Fla",
           "Ga", "[I]ll", "Ind", "Kans?", "Ky", "[L]a", "[M]ass", "Md", "Mich", "Minn", "[M]iss",
           "Mo", "Mont", "Neb", "Nev", "Okla", "[O]re", "[P]a", "Penn", "Tenn", "[T]ex", "Va",
           "Vt", "[W]ash", "Wisc?", "Wyo"]
ABCOMP = ["Inc", "Cos?", "Corp", "Pp?t[ye]s?", "Ltd", "Plc", "Rt", "Bancorp", "Bhd", "Assn",
          "Univ", "Intl", "Sys"]
ABNUM = ["tel", "est", "ext", "sq"]
ABPTIT = ["Jr", "Sr", "Bros", "(?:Ed|Ph)\\.D", "Blvd", "Rd", "Esq"]
ABTITLE = ["Mr", "Mrs", "Ms", "[M]iss", "Drs?", "Profs?", "Sens?", "Reps?", "Attys?", "Lt", "Col",
           "Gen", "Messrs", "Govs?", "Adm", "Rev", "Maj", "Sgt", "Cpl", "Pvt", "Capt", "Ste?",
           "Ave", "Pres", "Lieut", "Rt", "Hon", "Brig", "Co?mdr", "Pfc", "Spc", "Supts?", "Det",
           "Mt", "Ft", "Adj", "Adv", "Asst", "Assoc", "Ens", "Insp", "Mlle", "Mme", "Msgr", "Sfc",
           "Sr"]
ABCOMP2 = ["Invt", "Elec", "Natl", "M[ft]g", "Dept", "Blvd", "Rd", "Ave"]
ACRONYM_NEXT = ["About", "According", "Additionally", "After", "An", "A", "As", "At", "But",
                "Earlier", "He", "Her", "Here", "However", "If", "In", "It", "Last", "Many",
                "More", "Mr\\.", "Ms\\.", "Now", "Once", "One", "Other", "Our", "She", "Since", "So",
                "Some", "Such", "That", "The", "Their", "Then", "There", "These", "They", "This",
                "We", "When", "While", "What", "Yet", "You"]


def _flex_alt(words: list[str]) -> str:
    """Alternatives written flex-style: `[X]` keeps one letter's case, the rest is caseless."""
    def one(word: str) -> str:
        out, i = [], 0
        while i < len(word):
            if word[i] == "[" and word[i + 2] == "]" and word[i + 1].isalpha():
                out.append(word[i + 1])
                i += 3
            elif word[i] in "?()|\\.[]":  # regex syntax passes through
                end = word.index("]", i) + 1 if word[i] == "[" else i + 1
                out.append(word[i:end] if word[i] != "\\" else word[i:i + 2])
                i = end if word[i] != "\\" else i + 2
            else:
                out.append(_ci(word[i]))
                i += 1
        return "".join(out)
    return "(?:" + "|".join(one(w) for w in words) + ")"


ABBREV1 = _flex_alt(ABMONTH + ABDAYS + ABSTATE + ABCOMP + ABNUM + ABPTIT + ["etc", "al", "seq", "Bldg"]) + r"\."
ABBREV3 = _alt("ca", "figs", "fig", "prop", "nos", "no", "art", "bldg", "pp", "op") + r"\."
ABBREV4 = ("(?:" + _flex_alt(ABTITLE + ["vs", "[v]", "Alex", "Wm", "Jos", "Cie", "a\\.k\\.a", "cf",
                                        "TREAS", "Ph"] + ABCOMP2) + f"|{ACRO})")
MISCSYMBOL = ("[+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387"
              "\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b"
              "\u061e\u066a\u066d\u0703-\u070d\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017"
              "\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e"
              "\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20"
              "\uff3b-\uff40\uff5b-\uff65]")
QUOTE_CHARS = "[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]"
ASIAN_FACE = "[-^x=~<>']"


# --- Token normalisations (the helper methods of PTBLexer) ----------------------------------
def _latex_quotes(tok: str, probably_left: bool) -> str:
    tok = re.sub("&apos;|'", "`" if probably_left else "'", tok)
    tok = re.sub('"|&quot;', "``" if probably_left else "''", tok)
    tok = re.sub("[\u0091\u2018\u201b\u2039]", "`", tok)
    tok = re.sub("[\u0092\u2019\u203a]", "'", tok)
    tok = re.sub("[\u0093\u201c\u00ab]", "``", tok)
    return re.sub("[\u0094\u201d\u00bb]", "''", tok)


def _no_soft_hyphens(tok: str) -> str:
    return tok.replace("\u00ad", "") or "-"


def _normalize_amp(tok: str) -> str:
    return re.sub("(?i:&amp;)", "&", tok)


def _normalize_currency(tok: str) -> str:
    tok = tok.replace("\u00a2", "cents").replace("\u00a3", "#")
    return re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", tok)


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _parens(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


# --- Rules, in PTBLexer.flex order ----------------------------------------------------------
# An action gets the token text (trailing context excluded) and returns (token or None, length
# consumed); consuming less than the text is JFlex's yypushback.
Action = Callable[[str], tuple[str | None, int]]


def keep(t: str) -> tuple[str, int]:
    return t, len(t)


def skip(t: str) -> tuple[None, int]:
    return None, len(t)


def emit(fn: Callable[[str], str]) -> Action:
    return lambda t: (fn(t), len(t))


def pushback(n: int) -> Action:
    return lambda t: (t[:-n], len(t) - n)


def acronym(t: str) -> tuple[str, int]:
    # "I. The" -> "I" then "."; "U.S. The" -> "U.S." then "." (the second period is punctuation)
    return (t[:-1], len(t) - 1) if len(t) == 2 else (t, len(t) - 1)


@dataclass(frozen=True)
class Rule:
    name: str
    patterns: tuple[re.Pattern, ...]  # alternatives tried separately; the longest counts
    action: Action
    context: bool = False  # True: group "t" is the token, the rest of the match is lookahead


def rule(name: str, *patterns: str, action: Action = keep, context: str | None = None) -> Rule:
    if context is not None:
        compiled = tuple(re.compile(f"(?P<t>{p})(?:{context})") for p in patterns)
    else:
        compiled = tuple(re.compile(p) for p in patterns)
    return Rule(name, compiled, action, context is not None)


RULES: list[Rule] = [
    rule("PROG_LANGS", r"[cC]\+\+|[cCfF]#"),
    rule("ASSIMILATIONS3", _ci("cannot"), "'" + _ci("twas"), action=pushback(3)),
    rule("ASSIMILATIONS2", "'" + _ci("tis"), _alt("gonna", "gotta", "lemme", "gimme", "wanna"),
         action=pushback(2)),
    rule("SGML", SGML, action=emit(lambda t: t.replace(" ", "\u00a0"))),
    rule("SPMDASH", "&" + _alt("MD", "mdash", "ndash") + ";|[\u0096\u0097\u2013\u2014\u2015]",
         action=emit(lambda t: "--")),
    rule("SPAMP", SPAMP, action=emit(_normalize_amp)),
    rule("SPPUNC", "&" + _alt("HT", "TL", "UR", "LR", "QC", "QL", "QR", "odq", "cdq") + ";|&#[0-9]+;"),
    rule("WORD/REDAUX", WORD, context=REDAUX, action=emit(_no_soft_hyphens)),
    rule("SWORD/SREDAUX", SWORD, context=SREDAUX, action=emit(_no_soft_hyphens)),
    rule("WORD", WORD, action=emit(_no_soft_hyphens)),
    rule("APOWORD", f"{APOS}[nN]{APOS}?", f"[lLdDjJ]{APOS}",
         *(f"{_ci(w)}{APOS}" for w in ("Dunkin", "somethin", "ol")), f"{APOS}{_ci('em')}",
         f"[A-HJ-XZn]{APOSETC}{L}{{2}}{L}*", f"{APOS}[2-9]0[sS]", f"{APOS}{_ci('til')}[lL]?",
         f"{L}+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{L}*", f"{APOS}{_ci('cause')}",
         _ci("cont'd") + r"\.?",
         *(_ci(w) for w in ("nor'easter", "c'mon", "e'er", "s'mores", "ev'ry", "li'l", "nat'l")),
         f"[oO]{APOSETC}[oO]"),
    rule("APOWORD2", f"[yY]{APOS}", context=L),
    rule("FULLURL", _ci("http") + f"[sS]?://[^ \t\n\f\r\"<>|(){{}}]+{URL_END}"),
    rule("LIKELYURL", _ci("www") + r"\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}" + URL_PATH,
         f"(?:[^ \t\n\f\r\"`'<>|.!?(){{}},-_$]+\\.)+{TLD}{URL_PATH}"),
    rule("EMAIL", f"(?:{_ci('&lt;')}|<)?[a-zA-Z0-9]{EMAIL_CHAR}*@(?:{EMAIL_DOMAIN_CHAR}+\\.)*"
                  f"{EMAIL_DOMAIN_CHAR}+(?:{_ci('&gt;')}|>)?"),
    rule("TWITTER", "@[a-zA-Z_][a-zA-Z_0-9]*", f"#{LETTER}+"),
    rule("REDAUX/", REDAUX, context="[^A-Za-z]", action=emit(lambda t: _latex_quotes(t, False))),
    rule("SREDAUX", SREDAUX, action=emit(lambda t: _latex_quotes(t, False))),
    rule("DATE", f"{D}{{1,2}}[-/]{D}{{1,2}}[-/]{D}{{2,4}}"),
    rule("NUMBER", NUMBER, action=emit(_no_soft_hyphens)),
    rule("SUBSUPNUM", "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"),
    rule("FRAC", f"(?:{D}{{1,4}}[- \u00a0])?{D}{{1,4}}(?:\\\\?/|\u2044){D}{{1,4}}",
         action=emit(lambda t: t.replace(" ", "\u00a0"))),
    rule("FRAC2", "[\u00bc\u00bd\u00be\u2153-\u215e]", action=emit(lambda t: _FRACTIONS.get(t, t))),
    rule("TBSPEC", "-" + _alt("RRB", "LRB", "RCB", "LCB", "RSB", "LSB") + "-",
         *(_ci(w) for w in ("C.D.s", "pro-", "anti-", "S&P-500", "S&amp;P-500", "S&Ls", "S&amp;Ls")),
         _ci("Cap") + APOS + "[nN]", "[cC]" + APOS + _ci("est"), action=emit(_normalize_amp)),
    rule("THING3", THING3),
    rule("DOLSIGN", r"[A-Z]*\$|#"),
    rule("DOLSIGN2", "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
         action=emit(_normalize_currency)),
    # only the next word's first letter is case-sensitive: [T]he
    rule("ACRONYM", f"{ACRO}\\.", context=f"{SPACENL}+(?:{_flex_alt(['[' + w[0] + ']' + w[1:] for w in ACRONYM_NEXT])}|{SGML}){SPACENL}",
         action=acronym),
    rule("ABBREV3", ABBREV3, context=f"{SPACENL}?{D}"),
    rule("PTY_LTD", f"(?:{_ci('pt')}[eyEY]|{_ci('co')})\\.", context=f"{SPACE}{_alt('ltd', 'lim')}"),
    rule("ABBREV1/..", ABBREV1, context="(?s:..)"),  # beats "etc.b" as a WORD in "etc.b="
    rule("ABBREV1", ABBREV1),
    rule("ABBREV2", f"{ABBREV4}\\."),
    rule("ABBREV4", ABBREV4, context=SPACE),
    rule("ACRO", ACRO, context=SPACENL),
    rule("TBSPEC2", f"{APOS}[0-9][0-9]", context=SPACENL),
    rule("FILENAME", f"{LD}+(?:\\.{LD}+)*\\.{FILENAME_EXT}", context=f"{SPACENL}|[.?!,]"),
    rule("WORD.", f"{WORD}\\.", context="[,;:\u3001]", action=emit(_no_soft_hyphens)),
    rule("PHONE",
         f"(?:\\([0-9]{{2,3}}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{{2,4}}{PHONE_SEP})?[0-9]{{2,4}}{PHONE_SEP})"
         f"[0-9]{{3,4}}{PHONE_SEP}?[0-9]{{3,5}}",
         r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}",
         action=emit(lambda t: _parens(t.replace(" ", "\u00a0")))),
    rule("DBLQUOT/", '"|' + _ci("&quot;"), context="[A-Za-z0-9$]",
         action=emit(lambda t: _latex_quotes(t, True))),
    rule("DBLQUOT", '"|' + _ci("&quot;"), action=emit(lambda t: _latex_quotes(t, False))),
    rule("LESSTHAN", "<|" + _ci("&lt;"), action=emit(lambda t: "<")),
    rule("GREATERTHAN", ">|" + _ci("&gt;"), action=emit(lambda t: ">")),
    rule("SMILEY", "[<>]?[:;=][-o*']?[()DPdpO\\\\{@|\\[\\]]", context="[^A-Za-z0-9]",
         action=emit(_parens)),
    rule("ASIANSMILEY", r"[\^x=~<>]\.\[\^[xX]=~<>\]", f"{ASIAN_FACE}_{ASIAN_FACE}",
         f"\\({ASIAN_FACE}[_.]?{ASIAN_FACE}\\)", r"\([\^x=~<>']-[\^x=~<>'`]\)", action=emit(_parens)),
    rule("LCB", r"\{", action=emit(lambda t: "-LCB-")),
    rule("RCB", r"\}", action=emit(lambda t: "-RCB-")),
    rule("LSB", r"\[", action=emit(lambda t: "-LSB-")),
    rule("RSB", r"\]", action=emit(lambda t: "-RSB-")),
    rule("LRB", r"\(", action=emit(lambda t: "-LRB-")),
    rule("RRB", r"\)", action=emit(lambda t: "-RRB-")),
    rule("HYPHENS", "-+", action=emit(lambda t: "--" if 3 <= len(t) <= 4 else t)),
    rule("LDOTS", r"\.{3,5}", "(?:\\.[ \u00a0]){2,4}\\.", "[\u0085\u2026]", action=emit(lambda t: "...")),
    rule("FNMARKS", "@+", "#+", "_+"),
    rule("ASTS", r"\*+", r"(?:\\\*){1,3}"),
    rule("INSENTP", "[,;:\u3001]"),
    rule("BANGS", "[?!]+"),
    rule("PERIOD", "[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]"),
    rule("EQUALS", "="),
    rule("SLASH", "/"),
    rule("HTHING.", f"{HTHING}\\.", context="[,;:\u3001]", action=emit(_no_soft_hyphens)),
    rule("HTHING", HTHING, action=emit(_no_soft_hyphens)),
    rule("THING.", f"{THING}\\.", context="[,;:\u3001]"),
    rule("THING", THING),
    rule("THINGA.", f"{THINGA}\\.", context="[,;:\u3001]", action=emit(_normalize_amp)),
    rule("THINGA", THINGA, action=emit(_normalize_amp)),
    rule("LEFTQUOTE", "'", context="[A-Za-z][^ \t\n\r\u00a0]", action=emit(lambda t: "`")),
    rule("REDAUX", REDAUX, action=emit(lambda t: _latex_quotes(t, False))),
    rule("QUOTES", APOS, "''", QUOTE_CHARS + "{1,2}", action=emit(lambda t: _latex_quotes(t, False))),
    rule("FAKEDUCKFEET", "<<|>>"),
    rule("MISCSYMBOL", MISCSYMBOL),
    rule("SPACES", f"\x00|{SPACE}+|[\u200b\u200e\u200f\ufeff]", action=skip),
    rule("NEWLINE", f"[{NEWLINE_CHARS}]", action=skip),  # a line break inside a caption: a space
    rule("NBSP", _ci("&nbsp;"), action=skip),
    rule("UNTOKENIZABLE", "(?s:.)", action=skip),  # the jar warns and deletes the character
]

# Plain ASCII words followed by a space are by far the most common tokens. Any rule that could
# make such a word longer, or split it, needs a character other than a letter or a space, except
# the assimilations ("cannot" -> "can not", "gonna" -> "gon na"), so these skip the rule scan.
_PLAIN_WORDS = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?=[ \n])")
_BLANKS = re.compile("[ \t]+|\n")  # no token starts with these (one can with U+00A0: a URL)
_ASSIMILATIONS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _to_utf16_units(text: str) -> str:
    """Astral characters as two surrogates, which is how the Java scanner sees them."""
    if _ASTRAL.search(text) is None:
        return text
    out = []
    for c in text:
        v = ord(c) - 0x10000
        out.append(c if v < 0 else chr(0xD800 + (v >> 10)) + chr(0xDC00 + (v & 0x3FF)))
    return "".join(out)


def _from_utf16_units(tok: str) -> str:
    return tok.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def ptb_tokens(text: str) -> list[str]:
    """PTBLexer's tokens for one line of text, before lowercasing and punctuation removal."""
    if _PLAIN_WORDS.fullmatch(text) and not _ASSIMILATIONS.intersection(text.lower().split()):
        return text.split(" ")
    text = _to_utf16_units(text) + "\n"
    tokens, pos = [], 0
    while pos < len(text):
        blank = _BLANKS.match(text, pos)
        if blank is not None:
            pos = blank.end()
            continue
        plain = _PLAIN_WORD.match(text, pos)
        if plain is not None and plain.group().lower() not in _ASSIMILATIONS:
            tokens.append(plain.group())
            pos = plain.end()
            continue
        best, best_len, best_match = None, -1, None
        for r in RULES:
            for pattern in r.patterns:
                m = pattern.match(text, pos)
                if m is not None and m.end() - pos > best_len:
                    best, best_len, best_match = r, m.end() - pos, m
        token = best_match.group("t") if best.context else best_match.group()
        out, consumed = best.action(token)
        if out is not None:
            tokens.append(_from_utf16_units(out))
        pos += max(consumed, 1)
    return tokens


def _java_lower(token: str) -> str:
    """Java's `toLowerCase(Locale.ENGLISH)`: like Python's, except that a capital sigma is final
    when a cased letter precedes it anywhere in the word and none follows (Python looks only at
    the neighbouring letters)."""
    if "\u03a3" not in token:
        return token.lower()
    cased = [c.islower() or c.isupper() or c.istitle() for c in token]
    return "".join(("\u03c2" if any(cased[:i]) and not any(cased[i + 1:]) else "\u03c3")
                   if c == "\u03a3" else c.lower() for i, c in enumerate(token))


@lru_cache(maxsize=1 << 16)
def tokenize(caption: str) -> str:
    """One caption as coco-caption tokenises it: lowercased PTB tokens without punctuation,
    joined by single spaces ("" for an empty caption)."""
    line = " ".join(_java_lower(t) for t in ptb_tokens(caption.replace("\n", " ")))
    # exactly pycocoevalcap's post-processing of the jar's output line (rstrip also drops a
    # trailing U+00A0 that a URL token may end with)
    return " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)


def tokenize_captions(captions: Mapping[object, Iterable[object]]) -> dict[object, list[str]]:
    """Drop-in for pycocoevalcap's `PTBTokenizer().tokenize`: {image_id: [{"caption": str}, ...]}
    (or plain strings) to {image_id: [tokenised caption, ...]}."""
    return {k: [tokenize(c["caption"] if isinstance(c, Mapping) else c) for c in v]
            for k, v in captions.items()}
