"""Collect backtranslate.sh's results into one JSON object: python bt_results.py WORK_DIR"""

import json
import sys
from pathlib import Path

from results import log_records  # run.sh's collector, beside this file

RUNS = ("scratch", "bt-beam", "bt-topk10", "pretrained", "pretrained+bt-beam", "scratch-tuned", "scratch-tuned-2k")
DATA = {"en-de": "data-lowres-en-de", "scratch": "data-lowres", "pretrained": "data-lowres",
        "bt-beam": "data-bt-beam", "bt-topk10": "data-bt-topk10", "pretrained+bt-beam": "data-bt-beam",
        "scratch-tuned": "data-lowres", "scratch-tuned-2k": "data-lowres-2k"}


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
    times = dict(line.split() for line in (work / "times-bt.txt").read_text().splitlines())
    result = {"en-de": run_result(work, "en-de", times)}
    result["en-de"]["backtranslate_seconds"] = {m: int(times[f"backtranslate-{m}"]) for m in ("beam", "topk10")
                                                if f"backtranslate-{m}" in times}
    for name in RUNS:
        if (work / name / "test.json").is_file():
            result[name] = run_result(work, name, times)
    scratch = result["scratch"]["test_bleu"]
    result["bleu_gain_over_scratch"] = {name: round(result[name]["test_bleu"] - scratch, 2) for name in RUNS[1:] if name in result}
    tuned = max((result[name]["test_bleu"] for name in ("scratch-tuned", "scratch-tuned-2k") if name in result), default=None)
    if tuned is not None:  # the gains against the better of the tuned baselines
        result["bleu_gain_over_tuned_scratch"] = {name: round(result[name]["test_bleu"] - tuned, 2)
                                                  for name in RUNS[1:5] if name in result}
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2))
