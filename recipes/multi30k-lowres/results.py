"""Collect run.sh's results into one JSON object: python results.py WORK_DIR"""

import json
import sys
from pathlib import Path


def log_records(run: Path, kind: str) -> list[dict]:
    lines = (run / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r.get("type") == kind]


def main(work: Path) -> dict:
    times = dict(line.split() for line in (work / "times.txt").read_text().splitlines())
    valid = log_records(work / "pretrained", "valid")
    result = {
        "pretrain": {
            "seconds": int(times["pretrain"]),
            "steps": valid[-1]["step"],
            "dev_masked_accuracy": max(r["accuracy"] for r in valid),
            "dev_ppl": valid[-1]["ppl"],
        }
    }
    for setting in ("lowres", "full"):
        if not (work / f"{setting}-scratch").is_dir():
            continue
        runs = {}
        for start in ("scratch", "pretrained"):
            run = work / f"{setting}-{start}"
            scores = {s["metric"]: s for s in json.loads((run / "test.json").read_text())}
            runs[start] = {
                "test_bleu": scores["bleu"]["score"],
                "test_chrf": scores["chrf"]["score"],
                "test_ter": scores["ter"]["score"],
                "best_dev_bleu": max(r["bleu"] for r in log_records(run, "valid")),
                "steps": log_records(run, "valid")[-1]["step"],
                "train_seconds": int(times[f"train-{setting}-{start}"]),
                "translate_seconds": int(times[f"translate-{setting}-{start}"]),
            }
        runs["bleu_gain"] = round(runs["pretrained"]["test_bleu"] - runs["scratch"]["test_bleu"], 2)
        runs["signature"] = scores["bleu"]["signature"]
        result[setting] = runs
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2))
