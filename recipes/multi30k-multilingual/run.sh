#!/usr/bin/env bash
# One Transformer for de, fr, cs <-> en on Multi30k: prepares the multilingual data dir, trains
# (or continues) the recipe's config, then scores on test_2016_flickr (beam 5) the six trained
# directions, the six zero-shot ones directly and through English, every direction again with
# the output restricted to the target language's pieces (--restrict-vocab), with the off-target
# rate of each, and the mean of the last 5 checkpoints; writes WORK/results.json.
#
#   recipes/multi30k-multilingual/run.sh cpu|gpu WORK_DIR [MULTI30K_DIR] [bridge|bridge-only]
#
# `bridge` also trains the same config with de-fr and fr-de added from 1,000 of the training
# pairs (the first lines of train.de and train.fr), and scores every direction of it: does a
# little data between two non-English languages stop the zero-shot output from leaving for English?
# `bridge-only` trains and scores that run alone (the main run's figures are in results-KIND.json).
#
# NMT overrides the command (default: nmt); TRAIN_ARGS adds options to nmt train.
set -euo pipefail
kind=${1:?cpu or gpu}; work=${2:?work dir}; m30k=${3:-../shared/data/multi30k}; bridge=${4:-}
here=$(cd "$(dirname "$0")" && pwd)
nmt=${NMT:-nmt}
read -r -a train_args <<< "${TRAIN_ARGS:-}"
trained=de-en,en-de,fr-en,en-fr,cs-en,en-cs
zero_shot=de-fr,fr-de,de-cs,cs-de,fr-cs,cs-fr
run="$work/$kind"
mkdir -p "$work"
# A run with a checkpoint to continue: last/, or the copy a save that was cut short left beside it.
has_checkpoint() { [ -d "$1/last" ] || compgen -G "$1/.last.old-*" > /dev/null; }
# nmt evaluate into WORK/NAME.json, which appears only once it is complete.
scores() { local name=$1; shift; $nmt evaluate "$@" --json > "$work/$name.json.tmp"; mv "$work/$name.json.tmp" "$work/$name.json"; }
if [ "$bridge" != bridge-only ]; then
    [ -f "$work/data/manifest.json" ] || $nmt prepare --train "$m30k/train" --valid "$m30k/val" \
        --test "$m30k/test_2016_flickr" --directions $trained --zero-shot $zero_shot --vocab-size 8000 \
        --out "$work/data" --no-progress
    continue_run=()
    has_checkpoint "$run" && continue_run=(--resume)
    $nmt train "$here/transformer-$kind.yaml" --data "$work/data" --out "$run" --no-progress "${continue_run[@]}" "${train_args[@]}"
    scores direct --model "$run" --data "$work/data" --off-target --hyp-dir "$work/hyp-direct"
    scores pivot --model "$run" --data "$work/data" --directions $zero_shot --pivot en --off-target --hyp-dir "$work/hyp-pivot"
    scores restricted --model "$run" --data "$work/data" --restrict-vocab --off-target --hyp-dir "$work/hyp-restricted"
    rm -rf "$run-avg"  # the average of the run as it is now
    $nmt average "$run" --last 5 --out "$run-avg"
    scores average --model "$run-avg" --data "$work/data" --directions $trained --hyp-dir "$work/hyp-avg"
fi
if [ "$bridge" = bridge ] || [ "$bridge" = bridge-only ]; then
    mkdir -p "$work/bridge"
    for lang in de fr; do
        [ -f "$m30k/train.$lang.gz" ] && reader=(gzip -dc "$m30k/train.$lang.gz") || reader=(cat "$m30k/train.$lang")
        "${reader[@]}" | awk 'NR <= 1000' > "$work/bridge/train.$lang"  # reads to the end: no SIGPIPE under pipefail
    done
    trains=()  # the six English-centred directions from Multi30k, de-fr and fr-de from the 1,000
    for direction in ${trained//,/ } de-fr fr-de; do
        case $direction in de-fr|fr-de) trains+=(--train "$work/bridge/train") ;; *) trains+=(--train "$m30k/train") ;; esac
    done
    [ -f "$work/data-bridge/manifest.json" ] || $nmt prepare --directions $trained,de-fr,fr-de \
        --zero-shot de-cs,cs-de,fr-cs,cs-fr "${trains[@]}" --valid "$m30k/val" --test "$m30k/test_2016_flickr" \
        --vocab-size 8000 --out "$work/data-bridge" --no-progress
    continue_run=()
    has_checkpoint "$run-bridge" && continue_run=(--resume)
    $nmt train "$here/transformer-$kind.yaml" --data "$work/data-bridge" --out "$run-bridge" --no-progress \
        "${continue_run[@]}" "${train_args[@]}"
    scores bridge --model "$run-bridge" --data "$work/data-bridge" --off-target --hyp-dir "$work/hyp-bridge"
fi
python3 "$here/results.py" "$work" > "$work/results.json"
cat "$work/results.json"
