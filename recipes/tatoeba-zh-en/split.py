"""Split Tatoeba's Chinese-English pairs by English sentence into train, valid and test.

    python recipes/tatoeba-zh-en/split.py ../shared/data/tatoeba/cmn-eng.tsv.gz OUT_DIR

Tatoeba has several translations of many sentences. Every pair of one English sentence goes to
the same split, so that no English sentence of valid or test is in train. Writes
OUT_DIR/{train,valid,test}.{en,zh} (1,000 English sentences each for valid and test, with all
their pairs); the text is left as it is, for `nmt prepare` to normalize (or not).
"""

import gzip
import random
import sys
from pathlib import Path


def main(tsv: str, out: str, held_out: int = 1000) -> None:
    if not Path(tsv).is_file():
        sys.exit(f"error: {tsv} not found")
    groups: dict[str, list[str]] = {}
    opener = gzip.open if tsv.endswith(".gz") else open
    with opener(tsv, "rt", encoding="utf-8", newline="\n") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2:
                sys.exit(f"error: {tsv}:{number}: expected English<TAB>Chinese")
            groups.setdefault(fields[0], []).append(fields[1])
    english = sorted(groups)
    if len(english) < 4 * held_out:
        sys.exit(f"error: {tsv} has {len(english)} English sentences; valid and test take {held_out} each, "
                 "and train needs more than both")
    random.Random(1).shuffle(english)
    splits = {"test": english[:held_out], "valid": english[held_out : 2 * held_out], "train": english[2 * held_out :]}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, sentences in splits.items():
        pairs = [(en, zh) for en in sentences for zh in groups[en]]
        (out_dir / f"{split}.en").write_text("".join(en + "\n" for en, _ in pairs), encoding="utf-8")
        (out_dir / f"{split}.zh").write_text("".join(zh + "\n" for _, zh in pairs), encoding="utf-8")
        print(f"{split}: {len(sentences)} English sentences, {len(pairs)} pairs")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
