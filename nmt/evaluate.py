"""`nmt evaluate`: sacreBLEU's BLEU, chrF and TER, with their signatures."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF, TER

from nmt.data import read_lines
from nmt.errors import DataError
from nmt.normalize import HAN_CHARACTER, base_language, is_chinese

METRICS = ("bleu", "chrf", "ter")


@dataclass
class Score:
    metric: str
    score: float
    signature: str
    text: str  # sacreBLEU's one-line summary, e.g. "BLEU = 41.23 72.1/..."

    def as_dict(self) -> dict:
        return {"metric": self.metric, "score": round(self.score, 4), "signature": self.signature, "text": self.text}


# sacreBLEU's tokenizers for languages written without spaces between words: Chinese is split
# into characters, Japanese and Korean into words by MeCab (sacrebleu[ja,ko]).
WORD_SEGMENTING_TOKENIZERS = {"ja": "ja-mecab", "ko": "ko-mecab"}
_KANA = re.compile("[\u3040-\u30ff]")  # hiragana and katakana
_HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")


def bleu_tokenizer(lang: str | None = None, references: list[str] | None = None) -> str:
    """sacreBLEU's `zh` tokenizer for Chinese (it splits Chinese characters apart), `ja-mecab`
    for Japanese, `ko-mecab` for Korean, `13a` otherwise. Without a language, it is recognised
    from the references: Hangul, or Han characters and kana, making up more than a third of
    their non-space characters."""
    if lang:
        if is_chinese(lang):
            return "zh"
        return WORD_SEGMENTING_TOKENIZERS.get(base_language(lang), "13a")
    text = "".join(references or [])
    letters = len(text) - text.count(" ")
    hangul, kana, han = (len(p.findall(text)) for p in (_HANGUL, _KANA, HAN_CHARACTER))
    if letters and hangul > letters / 3:
        return "ko-mecab"
    if letters and han + kana > letters / 3:  # Japanese mixes kana with Han characters; Chinese has none
        return "ja-mecab" if kana > letters / 20 else "zh"
    return "13a"


def corpus_bleu(hypotheses: list[str], references: list[str], tokenize: str | None = None) -> float:
    return score_texts(hypotheses, references, ("bleu",), tokenize)[0].score


def score_texts(
    hypotheses: list[str], references: list[str], metrics=METRICS, tokenize: str | None = None, lang: str | None = None
) -> list[Score]:
    """Scores with sacreBLEU; BLEU's tokenizer is `tokenize`, or chosen for the target language
    `lang` (or, without it, from the references) by `bleu_tokenizer`."""
    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scores = []
    tokenize = tokenize or bleu_tokenizer(lang, references)
    for name in metrics:
        if name == "bleu":
            if tokenize not in BLEU.TOKENIZERS:
                raise DataError(f"unknown BLEU tokenizer {tokenize!r} (choose from {', '.join(BLEU.TOKENIZERS)})")
            metric = BLEU(tokenize=tokenize)
        elif name == "chrf":
            metric = CHRF()
        elif name == "ter":
            metric = TER()
        else:
            raise DataError(f"unknown metric {name!r} (choose from {', '.join(METRICS)})")
        result = metric.corpus_score(hypotheses, [references])
        scores.append(Score(name, float(result.score), str(metric.get_signature()), str(result)))
    return scores


def score_files(
    hyp_path: Path, ref_path: Path, metrics=METRICS, tokenize: str | None = None, lang: str | None = None
) -> list[Score]:
    hypotheses = list(read_lines(hyp_path))
    references = list(read_lines(ref_path))
    if len(hypotheses) != len(references):
        raise DataError(
            f"line counts differ: {hyp_path} has {len(hypotheses)} lines, {ref_path} has {len(references)}"
        )
    return score_texts(hypotheses, references, metrics, tokenize, lang)


def translate_and_score(
    model_dir: Path,
    src_path: Path,
    ref_path: Path,
    decode_options: dict | None = None,
    metrics=METRICS,
    tokenize: str | None = None,
    device: str = "auto",
    lang: str | None = None,
) -> list[Score]:
    """Translate `src_path` with a checkpoint, then score the output against `ref_path` (in the
    checkpoint's target language unless `lang` says otherwise)."""
    from nmt.files import VocabInfo
    from nmt.translate import translate_file

    lang = lang or VocabInfo.read(model_dir).tgt_lang
    with tempfile.TemporaryDirectory(prefix="nmt-eval-") as tmp:
        hyp_path = Path(tmp) / "hyp.txt"
        translate_file(model_dir, src_path, hyp_path, decode_options, device=device)
        return score_files(hyp_path, ref_path, metrics, tokenize, lang)
