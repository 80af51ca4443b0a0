"""Collect run.sh's results into one JSON object: python results.py WORK_DIR"""

import json
import sys
from pathlib import Path


def main(work: Path) -> dict:
    times = dict(line.split() for line in (work / "times.txt").read_text().splitlines())
    result = {}
    for pair in ("zh-en", "en-zh"):
        for norm in ("on", "off"):
            run = work / f"{pair}-{norm}"
            scores = {s["metric"]: s for s in json.loads((run / "test.json").read_text())}
            own = {s["metric"]: s for s in json.loads((run / "test-own-refs.json").read_text())}
            log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
            valid = [r for r in log if r.get("type") == "valid"]
            result[f"{pair}-normalization-{norm}"] = {
                "test_bleu": scores["bleu"]["score"],
                "test_chrf": scores["chrf"]["score"],
                "bleu_signature": scores["bleu"]["signature"],
                "test_bleu_own_references": own["bleu"]["score"],
                "best_dev_bleu": max(r["bleu"] for r in valid),
                "steps": valid[-1]["step"],
                "train_seconds": int(times[f"train-{pair}-{norm}"]),
                "translate_seconds": int(times[f"translate-{pair}-{norm}"]),
            }
    for norm in ("on", "off"):
        lines = (work / f"examples.zh-en.{norm}").read_text(encoding="utf-8").splitlines()
        result[f"examples-zh-en-normalization-{norm}"] = dict(
            zip(["知识就是力量。", "我們明天見。", "她在圖書館讀書。"], lines)
        )
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2, ensure_ascii=False))
