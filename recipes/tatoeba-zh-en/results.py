"""Collect run.sh's results into one JSON object: python results.py WORK_DIR"""

import json
import sys
from pathlib import Path


def run_result(run: Path, times: dict) -> dict:
    scores = {s["metric"]: s for s in json.loads((run / "test.json").read_text())}
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    valid = [r for r in log if r.get("type") == "valid"]
    return {
        "test_bleu": scores["bleu"]["score"],
        "test_chrf": scores["chrf"]["score"],
        "test_ter": scores["ter"]["score"],
        "bleu_signature": scores["bleu"]["signature"],
        "best_dev_bleu": max(r["bleu"] for r in valid),
        "steps": valid[-1]["step"],
        "train_seconds": int(times.get(f"train-{run.name}", 0)) or None,
        "translate_seconds": int(times.get(f"translate-{run.name}", 0)) or None,
    }


def main(work: Path) -> dict:
    times = dict(line.split() for line in (work / "times.txt").read_text().splitlines())
    result = {run.name: run_result(run, times) for run in sorted(work.glob("*-*/")) if (run / "test.json").is_file()}
    examples = (Path(__file__).parent / "examples.zh").read_text(encoding="utf-8").splitlines()
    translations = (work / "examples.zh-en").read_text(encoding="utf-8").splitlines()
    result["examples-zh-en"] = dict(zip(examples, translations))
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2, ensure_ascii=False))
