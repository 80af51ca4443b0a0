#!/usr/bin/env bash
# One Transformer for de, fr, cs <-> en on Multi30k: prepares the multilingual data dir, trains
# (or continues) the recipe's config, then scores on test_2016_flickr (beam 5) the six trained
# directions, the six zero-shot ones directly and through English, with the off-target rate of
# each, and the mean of the last 5 checkpoints; writes WORK/results.json.
#
#   recipes/multi30k-multilingual/run.sh cpu|gpu WORK_DIR [MULTI30K_DIR]
#
# NMT overrides the command (default: nmt); TRAIN_ARGS adds options to nmt train.
set -euo pipefail
kind=${1:?cpu or gpu}; work=${2:?work dir}; m30k=${3:-../shared/data/multi30k}
here=$(cd "$(dirname "$0")" && pwd)
nmt=${NMT:-nmt}
read -r -a train_args <<< "${TRAIN_ARGS:-}"
trained=de-en,en-de,fr-en,en-fr,cs-en,en-cs
zero_shot=de-fr,fr-de,de-cs,cs-de,fr-cs,cs-fr
run="$work/$kind"
mkdir -p "$work"
[ -f "$work/data/manifest.json" ] || $nmt prepare --train "$m30k/train" --valid "$m30k/val" \
    --test "$m30k/test_2016_flickr" --directions $trained --zero-shot $zero_shot --vocab-size 8000 \
    --out "$work/data" --no-progress
continue_run=()
[ -d "$run/last" ] && continue_run=(--resume)
$nmt train "$here/transformer-$kind.yaml" --data "$work/data" --out "$run" --no-progress "${continue_run[@]}" "${train_args[@]}"
$nmt evaluate --model "$run" --data "$work/data" --off-target --hyp-dir "$work/hyp-direct" --json > "$work/direct.json"
$nmt evaluate --model "$run" --data "$work/data" --directions $zero_shot --pivot en --off-target \
    --hyp-dir "$work/hyp-pivot" --json > "$work/pivot.json"
rm -rf "$run-avg"  # the average of the run as it is now
$nmt average "$run" --last 5 --out "$run-avg"
$nmt evaluate --model "$run-avg" --data "$work/data" --directions $trained --hyp-dir "$work/hyp-avg" --json > "$work/average.json"
python3 "$here/results.py" "$work" > "$work/results.json"
cat "$work/results.json"
