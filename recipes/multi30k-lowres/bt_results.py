"""Collect backtranslate.sh's results into one JSON object: python bt_results.py WORK_DIR"""

import json
import sys
from pathlib import Path

from results import log_records  # run.sh's collector, beside this file

BACKWARD = {"en-de": ("beam", "topk10"), "en-de-tuned": ("tuned-beam", "tuned-topk10")}  # en->de runs and what they back-translated
TUNED = ("scratch-tuned", "scratch-tuned-2k")
# Every run's data dir; the de->en runs' gains are computed against scratch and the tuned baselines.
DATA = {"en-de": "data-lowres-en-de", "en-de-tuned": "data-lowres-en-de", "scratch": "data-lowres",
        "bt-beam": "data-bt-beam", "bt-topk10": "data-bt-topk10", "pretrained": "data-lowres",
        "pretrained+bt-beam": "data-bt-beam", "scratch-tuned": "data-lowres", "scratch-tuned-2k": "data-lowres-2k",
        "bt-tuned-beam": "data-bt-tuned-beam", "bt-tuned-topk10": "data-bt-tuned-topk10",
        "pretrained+bt-tuned-beam": "data-bt-tuned-beam"}
RUNS = tuple(name for name in DATA if name not in BACKWARD)  # the de->en runs


def run_result(work: Path, name: str, times: dict) -> dict:
    run = work / name
    scores = {s["metric"]: s for s in json.loads((run / "test.json").read_text())}
    valid = log_records(run, "valid")
    data = work / DATA[name]
    pairs = json.loads((data / "manifest.json").read_text())["counts"]["train"]["pairs"]
    return {
        "train_pairs": pairs,
        "test_bleu": scores["bleu"]["score"],
        "test_chrf": scores["chrf"]["score"],
        "test_ter": scores["ter"]["score"],
        "best_dev_bleu": max(r["bleu"] for r in valid),
        "steps": valid[-1]["step"],
        "train_seconds": int(times[f"train-{name}"]),
        "translate_seconds": int(times[f"translate-{name}"]),
        "signature": scores["bleu"]["signature"],
    }


def main(work: Path) -> dict:
    """Every run of WORK that finished (an interrupted comparison gives what it has)."""
    times = dict(line.split() for line in (work / "times-bt.txt").read_text().splitlines())
    done = [name for name in (*BACKWARD, *RUNS) if (work / name / "test.json").is_file()]
    result = {name: run_result(work, name, times) for name in done}
    for name, methods in BACKWARD.items():
        if name in result:
            result[name]["backtranslate_seconds"] = {m: int(times[f"backtranslate-{m}"]) for m in methods
                                                     if f"backtranslate-{m}" in times}
    for key, baselines in (("bleu_gain_over_scratch", ("scratch",)), ("bleu_gain_over_tuned_scratch", TUNED)):
        base = max((result[name]["test_bleu"] for name in baselines if name in result), default=None)
        if base is not None:  # against the better baseline of those
            result[key] = {name: round(result[name]["test_bleu"] - base, 2)
                           for name in RUNS if name in result and name not in baselines}
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2))
