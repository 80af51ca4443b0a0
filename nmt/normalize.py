"""Language-aware text normalization. `nmt prepare` applies it to both sides of the corpus and
records it in the data dir; the checkpoint keeps it, and `nmt translate` applies the source
side's to its input, so that a model sees text at translate time as it saw it in training.

For Chinese: the full-width forms of ASCII become ASCII (as SentencePiece's NFKC makes them, so
that a model can write them), then ASCII sentence punctuation after a Chinese character or a
closing mark (or between a Latin letter, digit, % or bracket and one, or ending a line of
Chinese) and brackets around Chinese text become their full-width forms (the forms Chinese text
uses), and Traditional characters become Simplified (OpenCC), so that one sentence in two
scripts is one sentence.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass
from functools import lru_cache

from nmt.errors import DataError

# ISO 639-1 and 639-3 codes (Tatoeba names its files with the latter: cmn, jpn, kor); the Chinese
# ones are the macrolanguage and its members written in Han characters (Mandarin, Cantonese, Wu,
# Classical Chinese, Hakka, Gan, Xiang, Jin, Min, Pu-Xian, Huizhou).
CHINESE_LANGS = ("zh", "zho", "chi", "cmn", "yue", "wuu", "lzh", "hak", "gan", "hsn", "cjy", "nan", "cdo", "mnp", "czo",
                 "cpx", "czh")
CJK_LANGS = CHINESE_LANGS + ("ja", "jpn", "ko", "kor")
SCRIPTS = ("simplified", "none")
UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")


def _ascii_form(code: int) -> int | None:
    """The ASCII character NFKC makes of the character `code`, if it makes one."""
    folded = unicodedata.normalize("NFKC", chr(code))
    return ord(folded) if len(folded) == 1 and folded.isascii() else None


# The full-width and small forms of ASCII (U+FF01-FF5E, FE50-FE6B) and the ideographic space: what
# SentencePiece's NFKC makes ASCII, so that a model can write those of its references. The
# punctuation rules below then give back the full-width forms Chinese text uses.
_WIDTH = {code: folded for code in [*range(0xFF01, 0xFF5F), *range(0xFE50, 0xFE6C), 0x3000]
          if (folded := _ascii_form(code)) is not None}
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
HAN_CHARACTER = re.compile(f"[{_HAN}]")  # CJK ideographs (with extension A and compatibility)
_CLOSING_MARKS = "”」』》〉】〕…"  # after which punctuation is Chinese text's, as after a character
_FULL_PUNCTUATION = {",": "，", "!": "！", "?": "？", ":": "：", ";": "；", ".": "。", "(": "（", ")": "）"}
# Chinese text's places for full-width punctuation, found in one pass: both brackets of a
# bracketed text holding Chinese ("(我是Tom)"; what is inside is then looked at alone); ASCII
# punctuation right after a Han character or a closing mark ("》,"), a run of ! and ? whole
# ("真的?!"; a period only where a sentence would end, not "3.5" or "e.g." after a character);
# after a Latin letter, a digit, % or a bracket, before a Han character ("CD,不是吗"; not between
# digits, "2:30"); an unclosed bracket before a Han character and an unopened one after one.
_PUNCTUATION = re.compile(
    rf"\([^()]*[{_HAN}][^()]*\)"
    rf"|(?<=[{_HAN}{_CLOSING_MARKS}])(?:[!?]+|[,:;]|\.(?=\s|$|[{_HAN}]))"
    rf"|(?<=[{_HAN}])\)"
    rf"|(?<=[A-Za-z0-9%)])[,!?:;](?=[{_HAN}])"
    rf"|\((?=[{_HAN}])"
)
# A run of ! and ? ending a line of Chinese after a Latin letter, digit or % ("为什么要担心Tom?").
_PUNCTUATION_ENDING = re.compile(r"(?<=[A-Za-z0-9%])[!?]+(?=\s*$)")


def _full_width(match: re.Match) -> str:
    found = match.group(0)
    if len(found) > 1 and found[0] == "(":  # a bracketed text: its brackets, and what is inside on its own
        return "（" + _PUNCTUATION.sub(_full_width, found[1:-1]) + "）"
    return "".join(_FULL_PUNCTUATION[c] for c in found)


def base_language(lang: str) -> str:
    return lang.lower().replace("_", "-").split("-")[0]


def is_chinese(lang: str) -> bool:
    return base_language(lang) in CHINESE_LANGS


def is_cjk(lang: str) -> bool:
    """Languages written without spaces between words: lengths count characters."""
    return base_language(lang) in CJK_LANGS


@dataclass(frozen=True)
class Normalization:
    unicode_form: str = "NFC"  # NFC, NFKC, NFD, NFKD or none
    fold_width: bool = False  # full-width (and small) forms of ASCII -> ASCII
    cjk_punctuation: bool = False  # ASCII , ! ? : ; . after a Han character (and see below) -> full-width
    chinese_script: str = "none"  # "simplified": Traditional -> Simplified with OpenCC

    def __post_init__(self) -> None:
        if not isinstance(self.unicode_form, str) or self.unicode_form.upper() not in map(str.upper, UNICODE_FORMS):
            raise DataError(f"the Unicode normalization must be one of {', '.join(UNICODE_FORMS)} (got {self.unicode_form!r})")
        if self.chinese_script not in SCRIPTS:
            raise DataError(f"Chinese script must be one of {', '.join(SCRIPTS)} (got {self.chinese_script!r})")

    def __call__(self, text: str) -> str:
        if self.unicode_form.lower() != "none":
            text = unicodedata.normalize(self.unicode_form.upper(), text)
        if self.fold_width:
            text = text.translate(_WIDTH)
        if self.chinese_script == "simplified":
            text = _traditional_to_simplified()(text)
        if self.cjk_punctuation:
            text = _PUNCTUATION.sub(_full_width, text)
            if HAN_CHARACTER.search(text):
                text = _PUNCTUATION_ENDING.sub(_full_width, text)
        return text

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_saved(cls, saved) -> Normalization:
        """From a data dir's or checkpoint's record: a dict, or (older ones) the Unicode form alone."""
        if isinstance(saved, str):
            return cls(unicode_form=saved)
        if isinstance(saved, dict):
            return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})
        return cls()


def language_normalization(lang: str, unicode_form: str = "NFC", chinese_script: str = "simplified") -> Normalization:
    """The normalization `nmt prepare` uses for `lang`: the Unicode form for every language, and
    for Chinese the width, punctuation and (unless chinese_script is "none") script folding.
    A Unicode form of "none" turns every step off."""
    if chinese_script not in SCRIPTS:
        raise DataError(f"Chinese script must be one of {', '.join(SCRIPTS)} (got {chinese_script!r})")
    if not is_chinese(lang) or unicode_form.lower() == "none":  # "none" turns all of it off
        return Normalization(unicode_form)
    return Normalization(unicode_form, fold_width=True, cjk_punctuation=True, chinese_script=chinese_script)


@lru_cache(maxsize=1)
def _traditional_to_simplified():
    try:
        import opencc
    except ImportError:
        raise DataError("Traditional -> Simplified conversion needs the opencc package (pip install opencc)") from None
    convert = opencc.OpenCC("t2s").convert

    def simplified(text: str) -> str:
        # What a pass changed is converted again: OpenCC maps 薴 to 苧, which it maps to 苎, and
        # normalizing normalized text must change nothing.
        once = convert(text)
        return once if once == text else convert(once)

    return simplified
