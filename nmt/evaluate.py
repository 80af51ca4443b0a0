"""`nmt evaluate`: sacreBLEU's BLEU, chrF and TER, with their signatures."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF, TER

from nmt.data import read_lines
from nmt.errors import DataError

METRICS = ("bleu", "chrf", "ter")


@dataclass
class Score:
    metric: str
    score: float
    signature: str
    text: str  # sacreBLEU's one-line summary, e.g. "BLEU = 41.23 72.1/..."

    def as_dict(self) -> dict:
        return {"metric": self.metric, "score": round(self.score, 4), "signature": self.signature, "text": self.text}


def corpus_bleu(hypotheses: list[str], references: list[str], tokenize: str | None = None) -> float:
    return score_texts(hypotheses, references, ("bleu",), tokenize)[0].score


def score_texts(
    hypotheses: list[str], references: list[str], metrics=METRICS, tokenize: str | None = None
) -> list[Score]:
    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scores = []
    for name in metrics:
        if name == "bleu":
            if tokenize and tokenize not in BLEU.TOKENIZERS:
                raise DataError(f"unknown BLEU tokenizer {tokenize!r} (choose from {', '.join(BLEU.TOKENIZERS)})")
            metric = BLEU(tokenize=tokenize) if tokenize else BLEU()
        elif name == "chrf":
            metric = CHRF()
        elif name == "ter":
            metric = TER()
        else:
            raise DataError(f"unknown metric {name!r} (choose from {', '.join(METRICS)})")
        result = metric.corpus_score(hypotheses, [references])
        scores.append(Score(name, float(result.score), str(metric.get_signature()), str(result)))
    return scores


def score_files(hyp_path: Path, ref_path: Path, metrics=METRICS, tokenize: str | None = None) -> list[Score]:
    hypotheses = list(read_lines(hyp_path))
    references = list(read_lines(ref_path))
    if len(hypotheses) != len(references):
        raise DataError(
            f"line counts differ: {hyp_path} has {len(hypotheses)} lines, {ref_path} has {len(references)}"
        )
    return score_texts(hypotheses, references, metrics, tokenize)


def translate_and_score(
    model_dir: Path,
    src_path: Path,
    ref_path: Path,
    decode_options: dict | None = None,
    metrics=METRICS,
    tokenize: str | None = None,
    device: str = "auto",
) -> list[Score]:
    """Translate `src_path` with a checkpoint, then score the output against `ref_path`."""
    from nmt.translate import translate_file

    with tempfile.TemporaryDirectory(prefix="nmt-eval-") as tmp:
        hyp_path = Path(tmp) / "hyp.txt"
        translate_file(model_dir, src_path, hyp_path, decode_options, device=device)
        return score_files(hyp_path, ref_path, metrics, tokenize)
