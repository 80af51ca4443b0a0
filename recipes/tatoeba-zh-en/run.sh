#!/usr/bin/env bash
# zh->en and en->zh with the recipe's config, on one split of Tatoeba by English sentence; writes
# WORK/results.json.
#
#   recipes/tatoeba-zh-en/run.sh cpu|gpu WORK_DIR [cmn-eng.tsv.gz] [settings] [normalization] [pretrained]
#
# `settings` also trains each direction with one of the recipe's low-resource settings taken back
# (the rows of the README's settings table); `normalization` also trains each direction on data
# prepared with --normalize none; `pretrained` pretrains a masked LM on the two sides of the
# training split (pretrain-KIND.yaml) and trains each direction from it, on data encoded with its
# vocabulary (nmt prepare --spm-model). Every run has the same update budget. A run whose test.json
# exists is not trained again, and one that was stopped continues from its last/ checkpoint.
# NMT overrides the command (default: nmt); TRAIN_ARGS adds options to every nmt train.
set -euo pipefail
kind=${1:?cpu or gpu}; work=${2:?work dir}; tsv=${3:-../shared/data/tatoeba/cmn-eng.tsv.gz}
extras=" ${*:4} "
here=$(cd "$(dirname "$0")" && pwd)
nmt=${NMT:-nmt}
read -r -a train_args <<< "${TRAIN_ARGS:-}"
mkdir -p "$work"
times="$work/times.txt"; touch "$times"
stage() { local name=$1 t0; shift; t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> "$times"; }
# A run with a checkpoint to continue: last/, or the copy a save that was cut short left beside it.
has_checkpoint() { [ -d "$1/last" ] || compgen -G "$1/.last.old-*" > /dev/null; }

# Each row: a run name and the nmt train options that make it differ from the recipe.
rows=("recipe|")
if [[ $extras == *" settings "* ]]; then
    rows+=(
        "no-word-dropout|--set train.word_dropout=0"
        "dropout-0.3|--set model.dropout=0.3 --set model.attn_dropout=0.1"
        "batch-2500|--set train.batch_tokens=2500"
    )
fi
[[ $extras == *" normalization "* ]] && rows+=("normalization-off|")
[[ $extras == *" pretrained "* ]] && rows+=("pretrained|--init $work/masked-lm")

[ -f "$work/split/test.zh" ] || python3 "$here/split.py" "$tsv" "$work/split"
if [[ $extras == *" pretrained "* ]]; then
    [ -f "$work/data-mono/manifest.json" ] || $nmt prepare --mono "$work/split/train.zh" --mono "$work/split/train.en" \
        --vocab-size 8000 --out "$work/data-mono" --no-progress
    # A pretraining that was stopped goes on from its last/ checkpoint.
    if [ ! -f "$work/masked-lm.done" ]; then
        start=--overwrite; has_checkpoint "$work/masked-lm" && start=--resume
        stage pretrain $nmt pretrain "$here/pretrain-$kind.yaml" --data "$work/data-mono" --out "$work/masked-lm" \
            $start --no-progress "${train_args[@]}"
        touch "$work/masked-lm.done"
    fi
fi
for pair in zh-en en-zh; do
    src=${pair%-*}; tgt=${pair#*-}
    for row in "${rows[@]}"; do
        name=${row%%|*}; read -r -a options <<< "${row#*|}"
        data="$work/data-$pair"; prepare_options=()
        if [ "$name" = normalization-off ]; then data="$work/data-$pair-raw"; prepare_options=(--normalize none); fi
        if [ "$name" = pretrained ]; then data="$work/data-$pair-mlm"; prepare_options=(--spm-model "$work/data-mono/spm.joint.model"); fi
        [ -f "$data/manifest.json" ] || $nmt prepare --train "$work/split/train" --valid "$work/split/valid" \
            --test "$work/split/test" --src "$src" --tgt "$tgt" --vocab-size 8000 "${prepare_options[@]}" \
            --out "$data" --no-progress
        run="$work/$pair-$name"
        [ -f "$run/test.json" ] && continue
        start=--overwrite; has_checkpoint "$run" && start=--resume  # a stopped run goes on where it was
        stage "train-$pair-$name" $nmt train "$here/transformer-$kind.yaml" --data "$data" --out "$run" \
            $start --no-progress "${options[@]}" "${train_args[@]}"
        stage "translate-$pair-$name" $nmt translate "$run" -i "$data/test.src.txt" -o "$run/test.hyp"
        # Scored against the references of the normalized data dir (Chinese: in Simplified).
        $nmt evaluate --hyp "$run/test.hyp" --ref "$work/data-$pair/test.tgt.txt" --lang "$tgt" --json > "$run/test.json.tmp"
        mv "$run/test.json.tmp" "$run/test.json"  # complete, or not there: a run without it is run again
    done
done
$nmt translate "$work/zh-en-recipe" -i "$here/examples.zh" -o "$work/examples.zh-en"
head -1 "$here/examples.zh" | $nmt translate "$work/zh-en-recipe" --prefix "$here/knowledge.en" --prefix-only \
    --attention "$work/attention" --attention-words > /dev/null
python3 "$here/results.py" "$work" > "$work/results.json"
cat "$work/results.json"
