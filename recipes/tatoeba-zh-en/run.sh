#!/usr/bin/env bash
# zh->en and en->zh, each with prepare's Chinese normalization on (default) and off
# (--normalize none), on one split of Tatoeba by English sentence; writes WORK/results.json.
#
#   recipes/tatoeba-zh-en/run.sh cpu|gpu WORK_DIR [cmn-eng.tsv.gz]
#
# NMT overrides the command (default: nmt); TRAIN_ARGS adds options to nmt train.
set -euo pipefail
kind=${1:?cpu or gpu}; work=${2:?work dir}; tsv=${3:-../shared/data/tatoeba/cmn-eng.tsv.gz}
here=$(cd "$(dirname "$0")" && pwd)
nmt=${NMT:-nmt}
read -r -a train_args <<< "${TRAIN_ARGS:-}"
mkdir -p "$work"
times="$work/times.txt"; : > "$times"
stage() { local name=$1 t0; shift; t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> "$times"; }

python3 "$here/split.py" "$tsv" "$work/split"
for pair in zh-en en-zh; do
    src=${pair%-*}; tgt=${pair#*-}
    for norm in on off; do
        options=(); [ "$norm" = off ] && options=(--normalize none)
        data="$work/data-$pair-$norm"; run="$work/$pair-$norm"
        $nmt prepare --train "$work/split/train" --valid "$work/split/valid" --test "$work/split/test" \
            --src "$src" --tgt "$tgt" --vocab-size 8000 "${options[@]}" --out "$data" --overwrite --no-progress
        stage "train-$pair-$norm" $nmt train "$here/transformer-$kind.yaml" --data "$data" --out "$run" \
            --overwrite --no-progress "${train_args[@]}"
        stage "translate-$pair-$norm" $nmt translate "$run" -i "$data/test.src.txt" -o "$run/test.hyp"
        # Scored against the references of the normalized data dir (Chinese: in Simplified), and
        # against its own data dir's.
        $nmt evaluate --hyp "$run/test.hyp" --ref "$work/data-$pair-on/test.tgt.txt" --lang "$tgt" --json > "$run/test.json"
        $nmt evaluate --hyp "$run/test.hyp" --ref "$data/test.tgt.txt" --lang "$tgt" --json > "$run/test-own-refs.json"
    done
done
printf '知识就是力量。\n我們明天見。\n她在圖書館讀書。\n' > "$work/examples.zh"
$nmt translate "$work/zh-en-on" -i "$work/examples.zh" -o "$work/examples.zh-en.on"
$nmt translate "$work/zh-en-off" -i "$work/examples.zh" -o "$work/examples.zh-en.off"
python3 "$here/results.py" "$work" > "$work/results.json"
cat "$work/results.json"
