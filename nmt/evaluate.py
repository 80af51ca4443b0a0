"""`nmt evaluate`: sacreBLEU's BLEU, chrF and TER, with their signatures."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF, TER

from nmt.data import read_lines
from nmt.errors import DataError, first_line
from nmt.normalize import HAN_CHARACTER, base_language, is_chinese
from nmt.paths import check_output_apart, make_folder

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
WORD_SEGMENTING_TOKENIZERS = {"ja": "ja-mecab", "jpn": "ja-mecab", "ko": "ko-mecab", "kor": "ko-mecab"}
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
    check_scoring(metrics, tokenize)
    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        raise DataError("nothing to score: no lines")
    scores = []
    by_language = bleu_tokenizer(lang, references)
    tokenize = tokenize or by_language
    for name in metrics:
        metric = _bleu(tokenize) if name == "bleu" else CHRF() if name == "chrf" else _ter(by_language)
        result = metric.corpus_score(hypotheses, [references])
        scores.append(Score(name, float(result.score), str(metric.get_signature()), str(result)))
    return scores


def check_scoring(metrics, tokenize: str | None) -> None:
    """Refuse unknown metrics or BLEU tokenizers (before anything is translated)."""
    if not metrics:
        raise DataError(f"no metric given (choose from {', '.join(METRICS)})")
    for name in metrics:
        if name not in METRICS:
            raise DataError(f"unknown metric {name!r} (choose from {', '.join(METRICS)})")
    if tokenize is not None and tokenize not in BLEU.TOKENIZERS:
        raise DataError(f"unknown BLEU tokenizer {tokenize!r} (choose from {', '.join(BLEU.TOKENIZERS)})")
    if tokenize is not None and "bleu" in metrics:
        _bleu(tokenize)  # loaded now: one that cannot be (MeCab missing, offline) fails before translating


def check_language_tokenizers(metrics, tokenize: str | None, languages) -> None:
    """Without a given tokenizer, load the one each target language picks (before translating)."""
    if tokenize is None:
        for lang in sorted(set(languages), key=str):
            check_scoring(metrics, bleu_tokenizer(lang))


def _ter(language_tokenize: str) -> TER:
    """TER splits the Han characters of Chinese and Japanese text apart (sacreBLEU's asian_support,
    which works on normalized text; kana runs stay whole), whatever tokenizer BLEU was given:
    otherwise an unsegmented line is one word, and TER only tells whether a line matches its
    reference exactly. `language_tokenize`: the BLEU tokenizer of the text's language
    (`bleu_tokenizer`)."""
    segmented = language_tokenize in ("zh", "ja-mecab")
    return TER(normalized=segmented, asian_support=segmented)


def _bleu(tokenize: str) -> BLEU:
    try:
        return BLEU(tokenize=tokenize)
    except (OSError, ImportError, RuntimeError) as e:  # a model to download, a package missing (MeCab)
        raise DataError(f"BLEU tokenizer {tokenize!r} cannot be loaded: {first_line(e)}") from None


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
    tgt_lang: str | None = None,
    src_lang: str | None = None,
) -> list[Score]:
    """Translate `src_path` with a checkpoint (into `tgt_lang`: a multilingual model's target;
    from `src_lang`, where its languages are normalized differently), then score the output
    against `ref_path` (in the target language unless `lang` says otherwise)."""
    from nmt.files import VocabInfo
    from nmt.translate import LanguageChoice, translate_file

    check_scoring(metrics, tokenize)
    lang = lang or tgt_lang or VocabInfo.read(model_dir).tgt_lang
    check_language_tokenizers(metrics, tokenize, [lang])
    with tempfile.TemporaryDirectory(prefix="nmt-eval-") as tmp:
        hyp_path = Path(tmp) / "hyp.txt"
        translate_file(model_dir, src_path, hyp_path, decode_options, device=device, languages=LanguageChoice(tgt_lang, src_lang))
        hypotheses, references = list(read_lines(hyp_path)), list(read_lines(ref_path))  # each read once: pipes work
    if len(hypotheses) != len(references):  # one output line per source line
        raise DataError(f"line counts differ: {src_path} has {len(hypotheses)} lines, {ref_path} has {len(references)}")
    return score_texts(hypotheses, references, metrics, tokenize, lang)


@dataclass
class DirectionScores:
    """The scores of one direction of a data dir's split."""

    direction: str  # "de-en"
    scores: list[Score]
    zero_shot: bool = False  # a direction the model was not trained on
    off_target: float | None = None  # % of output lines identified as another language than the target
    hypotheses: Path | None = None  # where the translations were written

    def as_dict(self) -> dict:
        return {"direction": self.direction, "zero_shot": self.zero_shot, "off_target_percent": self.off_target,
                "hypotheses": str(self.hypotheses) if self.hypotheses else None, "scores": [s.as_dict() for s in self.scores]}


def split_files(data_dir: Path, split: str, direction: str, manifest) -> tuple[Path, Path]:
    """The source and reference text of `direction`'s `split` in a data dir (multilingual or not)."""
    from nmt.files import text_files

    return text_files(data_dir, f"{split}.{direction}" if manifest.multilingual else split)


def evaluate_directions(
    model_dirs: list[Path], data_dir: Path, split: str = "test", directions: list[str] | None = None,
    decode_options: dict | None = None, metrics=METRICS, device: str = "auto", pivot: str | None = None,
    pivot_dirs: list[Path] | None = None, hyp_dir: Path | None = None, off_target: bool = False,
    tokenize: str | None = None,
) -> list[DirectionScores]:
    """Translate and score each direction of a data dir's split (default: every direction with
    one, zero-shot included); `pivot` translates through that language. With `hyp_dir`, the
    translations are kept there as SPLIT.DIRECTION.hyp; `off_target` identifies the language of
    each output line among the model's languages (py3langid)."""
    from nmt.files import Manifest, VocabInfo
    from nmt.multilingual import direction_languages
    from nmt.translate import LanguageChoice, check_language_choices, translate_file

    check_scoring(metrics, tokenize)
    manifest = Manifest.read(data_dir)
    if split not in ("valid", "test"):
        raise DataError(f"--split must be valid or test (got {split!r})")
    # A bilingual data dir's languages may hold a hyphen (zh-TW): its one direction is not split.
    languages_of = ({d: direction_languages(d) for d in manifest.eval_directions()} if manifest.multilingual
                    else {f"{manifest.src_lang}-{manifest.tgt_lang}": (manifest.src_lang, manifest.tgt_lang)})
    known = list(languages_of)
    unknown = [d for d in directions or [] if d not in known]
    if unknown:
        raise DataError(f"{data_dir} has no {split} set for {', '.join(unknown)} (it has {', '.join(known)})")
    if pivot is not None:  # the directions that go through the pivot: by default, those without it
        through = [d for d in directions or known if pivot not in languages_of[d]]
        if directions and len(through) < len(directions) or not through:
            raise DataError(f"--pivot {pivot}: choose --directions without {pivot} "
                            f"({', '.join(through) if through else 'this data dir has none'})")
        directions = through
    vocab_info = VocabInfo.read(model_dirs[0])
    if hyp_dir is not None:  # before the translating; never into the data dir (a link to its reference, say)
        for direction in directions or known:
            check_output_apart(Path(hyp_dir) / f"{split}.{direction}.hyp", [], [data_dir])
        make_folder(Path(hyp_dir), "--hyp-dir")
    candidates = sorted(vocab_info.languages) or [x for x in (vocab_info.src_lang, vocab_info.tgt_lang) if x]
    if off_target:
        check_identifiable(candidates)
    check_language_choices(model_dirs, pivot_dirs, [languages_of[d] for d in directions or known], pivot, decode_options)
    check_language_tokenizers(metrics, tokenize, [languages_of[d][1] for d in directions or known])
    # Zero-shot: what the model was not trained on (the data dir may come from another run).
    trained = (set(vocab_info.directions) or set(manifest.directions)
               or {f"{vocab_info.src_lang or manifest.src_lang}-{vocab_info.tgt_lang or manifest.tgt_lang}"})
    results = []
    with tempfile.TemporaryDirectory(prefix="nmt-eval-") as tmp:
        for direction in directions or known:
            src_lang, tgt_lang = languages_of[direction]
            src_path, ref_path = split_files(data_dir, split, direction, manifest)
            hyp_path = Path(hyp_dir or tmp) / f"{split}.{direction}.hyp"
            choice = LanguageChoice(tgt_lang, src_lang)  # a model for other languages stops here
            translate_file(model_dirs, src_path, hyp_path, decode_options, device=device, languages=choice,
                           pivot=pivot, pivot_dirs=pivot_dirs)
            hypotheses = list(read_lines(hyp_path))
            result = DirectionScores(direction, score_files(hyp_path, ref_path, metrics, tokenize, tgt_lang),
                                     direction not in trained, hypotheses=hyp_path if hyp_dir else None)
            if off_target:
                result.off_target = off_target_percent(hypotheses, tgt_lang, candidates)
            results.append(result)
    return results


@dataclass
class EvaluateRequest:
    """What `nmt evaluate` is asked for: `hyp` scored against `ref`; `src` translated with
    `model` and scored against `ref`; or each direction of the `data` dir's `split` translated
    with `model` and scored (`directions`, `pivot`, `pivot_models`, `hyp_dir` and `off_target`
    go with this one, see `evaluate_directions`)."""

    hyp: Path | None = None
    ref: Path | None = None
    src: Path | None = None
    model: Path | None = None
    data: Path | None = None
    split: str = "test"
    directions: list[str] | None = None
    pivot: str | None = None
    pivot_models: list[Path] | None = None
    hyp_dir: Path | None = None
    off_target: bool = False
    decode_options: dict | None = None  # translating: beam, restrict_vocab (None: the model's)
    metrics: tuple[str, ...] = METRICS
    tokenize: str | None = None
    lang: str | None = None  # of the references, which picks BLEU's tokenizer
    tgt_lang: str | None = None  # with src: a multilingual model's target language
    src_lang: str | None = None
    device: str = "auto"


@dataclass
class ScoreReport:
    """The scores of one set of translations."""

    scores: list[Score]

    def as_json(self) -> list[dict]:
        return [s.as_dict() for s in self.scores]

    def text(self) -> str:
        return "\n".join(f"{s.text}\n  signature: {s.signature}" for s in self.scores)


@dataclass
class DirectionReport:
    """The scores of each direction of a data dir's split, and their means."""

    directions: list[DirectionScores]

    def means(self) -> dict[str, dict[str, float]]:
        """Each metric's mean over the trained and over the zero-shot directions."""
        groups = {"trained": [r for r in self.directions if not r.zero_shot],
                  "zero-shot": [r for r in self.directions if r.zero_shot]}
        return {name: {s.metric: round(sum(r.scores[i].score for r in group) / len(group), 2)
                       for i, s in enumerate(group[0].scores)} for name, group in groups.items() if group}

    def as_json(self) -> dict:
        return {"directions": [r.as_dict() for r in self.directions], "mean": self.means()}

    def text(self) -> str:
        """A table of the directions' scores and means, then each metric's signature(s)."""
        results = self.directions
        metric_names = [s.metric for s in results[0].scores]
        off = any(r.off_target is not None for r in results)
        lines = [f"{'direction':<14}  " + "  ".join(f"{m:>7}" for m in metric_names) + ("  off-target %" if off else "")]
        for r in results:
            lines.append(f"{r.direction + (' *' if r.zero_shot else ''):<14}  " + "  ".join(f"{s.score:7.2f}" for s in r.scores)
                         + (f"  {r.off_target:12.2f}" if r.off_target is not None else ""))
        for name, mean in self.means().items():
            lines.append(f"{'mean ' + name:<14}  " + "  ".join(f"{mean[m]:7.2f}" for m in metric_names))
        for metric in metric_names:  # one per metric, or one per tokenizer when directions use several
            directions_of: dict[str, list[str]] = {}
            for r in results:
                for s in r.scores:
                    if s.metric == metric:
                        directions_of.setdefault(s.signature, []).append(r.direction)
            for signature, directions in directions_of.items():
                which = f" ({', '.join(directions)})" if len(directions_of) > 1 else ""
                lines.append(f"{metric} signature{which}: {signature}")
        if any(r.zero_shot for r in results):
            lines.append("* zero-shot: a direction the model was not trained on")
        return "\n".join(lines)


def evaluate(request: EvaluateRequest) -> ScoreReport | DirectionReport:
    """`nmt evaluate`: the options of one of its three ways checked together, then that way run."""
    r = request
    if r.data is not None:
        if r.model is None or r.hyp is not None or r.src is not None or r.ref is not None or r.lang or r.tgt_lang or r.src_lang:
            raise DataError("--data goes with --model (and no --hyp, --src, --ref, --lang, --tgt-lang or --src-lang: "
                            "each direction names its languages)")
        if r.directions == []:  # "--directions ," is no choice of all of them
            raise DataError("--directions names no direction")
        return DirectionReport(evaluate_directions(
            [r.model], r.data, r.split, r.directions, r.decode_options, r.metrics, r.device, r.pivot,
            pivot_dirs=r.pivot_models, hyp_dir=r.hyp_dir, off_target=r.off_target, tokenize=r.tokenize,
        ))
    if r.pivot or r.pivot_models or r.hyp_dir or r.directions is not None or r.off_target:
        raise DataError("--directions, --pivot, --pivot-model, --hyp-dir and --off-target go with --data")
    if r.ref is None:
        raise DataError("give --ref with --hyp or --src (or --data with --model)")
    if (r.hyp is None) == (r.src is None):
        raise DataError("give either --hyp, or --src with --model")
    if (r.tgt_lang or r.src_lang) and r.src is None:
        raise DataError("--tgt-lang and --src-lang go with --src and --model")
    if (r.decode_options or {}).get("restrict_vocab") is not None and r.src is None:
        raise DataError("--restrict-vocab goes with --src or --data, and --model")
    if r.src is None:
        return ScoreReport(score_files(r.hyp, r.ref, r.metrics, r.tokenize, r.lang))
    if r.model is None:
        raise DataError("--src needs --model")
    return ScoreReport(translate_and_score(r.model, r.src, r.ref, r.decode_options, r.metrics, r.tokenize, r.device,
                                           r.lang, r.tgt_lang, r.src_lang))


def off_target_percent(lines: list[str], lang: str, candidates: list[str]) -> float | None:
    """% of the non-empty `lines` that py3langid, choosing among the `candidates`, says are not
    in `lang`; None when it does not know one of them (a line in that language would be put
    down to another)."""
    known, model_file, identifier_type = _py3langid()
    labels = {code: _identifier_label(code, known) for code in {lang, *candidates}}
    if None in labels.values():
        return None
    identifier = _language_identifier(model_file, identifier_type, tuple(sorted(set(labels.values()))))
    texts = [line for line in lines if line.strip()]
    wrong = sum(identifier.classify(text)[0] != labels[lang] for text in texts)
    return round(100.0 * wrong / max(len(texts), 1), 2)


def check_identifiable(codes: list[str]) -> None:
    """The off-target rate needs py3langid to know every language of the model (a line in one
    it does not know would be put down to another): refused before anything is translated."""
    known = _py3langid()[0]
    unknown = [code for code in codes if _identifier_label(code, known) is None]
    if unknown:
        raise DataError(f"--off-target: py3langid does not know the language {unknown[0]!r} (it names languages by "
                        "ISO 639-1 codes, such as de or zh)")


def _py3langid():
    """The labels py3langid knows, its model file and identifier type."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise DataError("the off-target rate needs the py3langid package (pip install py3langid)") from None
    return set(_language_identifier(MODEL_FILE, LanguageIdentifier).labels), MODEL_FILE, LanguageIdentifier


def _identifier_label(code: str, known: set[str]) -> str | None:
    """py3langid's name (ISO 639-1) for a language code: zh_TW and cmn are zh; None if it has none."""
    base = base_language(code)
    if base in known:
        return base
    return "zh" if is_chinese(code) else None


@lru_cache(maxsize=4)
def _language_identifier(model_file, identifier_type, candidates: tuple[str, ...] | None = None):
    """py3langid's model (loaded once: about a second), choosing among `candidates` (None: all)."""
    identifier = identifier_type.from_model_file(model_file)
    if candidates:
        identifier.set_languages(list(candidates))
    return identifier
