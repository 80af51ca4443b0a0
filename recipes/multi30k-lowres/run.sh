#!/usr/bin/env bash
# The whole low-resource comparison: split the data, pretrain, then train de->en with and
# without the pretrained initialisation on 2,900 pairs (and with `full`, on all 29,000 too),
# translate test_2016_flickr and score it; writes WORK/results.json.
#
#   recipes/multi30k-lowres/run.sh cpu|gpu WORK_DIR [MULTI30K_DIR] [full]
#
# NMT overrides the command (default: nmt); PRETRAIN_ARGS and TRAIN_ARGS add options to
# nmt pretrain and nmt train (e.g. TRAIN_ARGS="--set train.max_minutes=5").
set -euo pipefail
kind=${1:?cpu or gpu}; work=${2:?work dir}; m30k=${3:-../shared/data/multi30k}; full=${4:-}
here=$(cd "$(dirname "$0")" && pwd)
nmt=${NMT:-nmt}
read -r -a pretrain_args <<< "${PRETRAIN_ARGS:-}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
mkdir -p "$work"
times="$work/times.txt"; : > "$times"
stage() { local name=$1 t0; shift; t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> "$times"; }

python3 "$here/split.py" "$m30k" "$work/text"
stage pretrain $nmt pretrain "$here/pretrain-$kind.yaml" --text "$work/text/mono.de" --text "$work/text/mono.en" \
    --vocab-size 8000 --out "$work/pretrained" --overwrite --no-progress "${pretrain_args[@]}"
settings=(lowres); [ "$full" = full ] && settings+=(full)
for setting in "${settings[@]}"; do
    if [ "$setting" = lowres ]; then train="$work/text/lowres"; else train="$m30k/train"; fi
    $nmt prepare --train "$train" --valid "$m30k/val" --test "$m30k/test_2016_flickr" --src de --tgt en \
        --spm-model "$work/pretrained" --out "$work/data-$setting" --overwrite --no-progress
    for start in scratch pretrained; do
        init=(); [ "$start" = pretrained ] && init=(--init "$work/pretrained")
        run="$work/$setting-$start"
        stage "train-$setting-$start" $nmt train "$here/translate-$kind.yaml" --data "$work/data-$setting" \
            --out "$run" "${init[@]}" --overwrite --no-progress "${train_args[@]}"
        stage "translate-$setting-$start" $nmt translate "$run" -i "$work/data-$setting/test.src.txt" -o "$run/test.hyp"
        $nmt evaluate --hyp "$run/test.hyp" --ref "$work/data-$setting/test.tgt.txt" --json > "$run/test.json"
    done
done
python3 "$here/results.py" "$work" > "$work/results.json"
cat "$work/results.json"
