"""The results of run.sh in one JSON: per direction BLEU, chrF2 and off-target rate (trained,
zero-shot direct, zero-shot through English, every direction with --restrict-vocab, last-5
average, the bridge runs with a little de<->fr and de->cs data, and the main model fine-tuned
with synthetic pairs for the zero-shot directions), their means, the training state of each run.

    python3 results.py WORK_DIR > results.json
"""

import json
import sys
from pathlib import Path

RUNS = ("bridge", "bridge-cs", "synthetic")  # run.sh's other runs: trained in KIND-NAME/, scored into NAME.json


def by_direction(report: dict) -> dict:
    return {
        r["direction"]: {
            **{s["metric"]: round(s["score"], 2) for s in r["scores"]},
            "off_target_percent": r["off_target_percent"],
            "signatures": {s["metric"]: s["signature"] for s in r["scores"]},
        }
        for r in report["directions"]
    }


def training_state(run: Path) -> dict:
    best = json.loads((run / "best" / "info.json").read_text())
    last = json.loads((run / "last" / "info.json").read_text())
    return {
        "best_step": best["step"],
        "best_dev_mean_bleu": best["best_score"],
        "updates": last["step"],
        "completed_epochs": last["epoch"],
        "seconds": round(last["seconds"]),
    }


def main(work: Path) -> dict:
    result = {}
    for name in ("direct", "pivot", "restricted", "average", *RUNS, "synthetic_restricted"):
        path = work / f"{name}.json"
        if path.is_file():
            report = json.loads(path.read_text())
            result[name.replace("-", "_")] = {"directions": by_direction(report), "mean": report["mean"]}
    for kind in ("cpu", "gpu"):
        runs = {kind: "training", **{f"{kind}-{name}": f"training_{name.replace('-', '_')}" for name in RUNS}}
        for run, key in runs.items():
            if (work / run / "best" / "info.json").is_file():
                result[key] = {"config": f"transformer-{kind}.yaml", **training_state(work / run)}
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2, ensure_ascii=False))
