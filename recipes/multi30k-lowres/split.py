"""Split Multi30k's training pairs for the low-resource recipe.

    python recipes/multi30k-lowres/split.py ../shared/data/multi30k OUT_DIR

OUT_DIR/lowres.de, lowres.en: a fixed 10% of the training pairs (2,900), still paired.
OUT_DIR/mono.de, mono.en: the German and the English sides of the other 26,100 pairs, each
shuffled on its own, so that no pairing survives: monolingual text for `nmt pretrain`.
"""

import gzip
import random
import sys
from pathlib import Path


def read(path: Path) -> list[str]:
    if not path.is_file():
        sys.exit(f"error: {path} not found")
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def main(source: str, out: str) -> None:
    de, en = read(Path(source) / "train.de.gz"), read(Path(source) / "train.en.gz")
    if len(de) != len(en):
        sys.exit(f"error: {source}: train.de.gz has {len(de)} lines but train.en.gz {len(en)}")
    rng = random.Random(1)
    order = list(range(len(de)))
    rng.shuffle(order)
    paired = sorted(order[: len(de) // 10])
    rest = sorted(order[len(de) // 10 :])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for lang, lines in (("de", de), ("en", en)):
        (out_dir / f"lowres.{lang}").write_text("".join(lines[i] + "\n" for i in paired), encoding="utf-8")
        mono = [lines[i] for i in rest]
        random.Random(f"mono-{lang}").shuffle(mono)
        (out_dir / f"mono.{lang}").write_text("".join(line + "\n" for line in mono), encoding="utf-8")
    print(f"{out_dir}: {len(paired)} paired, {len(rest)} monolingual sentences per language")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
