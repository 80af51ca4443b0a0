"""Public parallel corpora that `nmt prepare --corpus NAME` loads with Hugging Face `datasets`,
and the bundled sample corpus (`tatoeba-en-es-15k.tsv.gz`).

Each entry says where the corpus lives on the Hub and how to select it. Script-based Hub
repositories no longer load with `datasets` ≥ 4; those are read from their parquet export
(`refs/convert/parquet`, one folder per config). With `--data-dir`, the same corpus is read
from local files instead (a folder of train/validation/test .jsonl, .csv or .parquet files with
a `translation` column or one column per language), through the same loading path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nmt.errors import DataError

# The project's tree (recipes/ beside nmt/), and the local copy of Multi30k beside it that the
# benchmarks read by default, wherever they are run from.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOCAL_MULTI30K = PROJECT_ROOT.parent / "shared" / "data" / "multi30k"


@dataclass(frozen=True)
class Corpus:
    hub_id: str
    languages: tuple[str, str]
    config: str | None = None  # the `datasets` config name
    revision: str | None = None
    data_dir: str | None = None  # folder inside the revision (parquet exports)
    test_set: str = ""  # what the test split is, for recipes and reports


CORPORA = {
    "multi30k": Corpus("bentrevett/multi30k", ("en", "de"), test_set="test_2016_flickr (1,000)"),
    "iwslt2017-de-en": Corpus(
        "IWSLT/iwslt2017", ("de", "en"), revision="refs/convert/parquet", data_dir="iwslt2017-de-en",
        test_set="tst2010-2015 (8,079)",
    ),
    "wmt14-de-en": Corpus("wmt/wmt14", ("de", "en"), config="de-en", test_set="newstest2014, full (3,003)"),
    "wmt16-ro-en": Corpus("wmt/wmt16", ("ro", "en"), config="ro-en", test_set="newstest2016 (1,999)"),
}


def find_corpus(name: str, src_lang: str, tgt_lang: str) -> Corpus:
    corpus = CORPORA.get(name)
    if corpus is None:
        raise DataError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)} (or use --hf, --tsv, --train)")
    if {src_lang, tgt_lang} != set(corpus.languages):
        raise DataError(f"corpus {name!r} has the languages {' and '.join(corpus.languages)}, not {src_lang}-{tgt_lang}")
    return corpus
