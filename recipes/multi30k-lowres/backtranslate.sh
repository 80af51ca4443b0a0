#!/usr/bin/env bash
# Back-translation on the low-resource split: train en->de on the 2,900 pairs, translate the
# 26,100 unpaired English sentences into German (beam search, and sampling from the 10 most
# probable tokens), then train de->en on the real plus the synthetic pairs and compare with
# de->en from the real pairs alone. With `pretrained`, also pretrain a masked LM on the unpaired
# text and start de->en from it, with and without the beam back-translations. With `tuned`, also
# train de->en from scratch with the low-resource settings of translate-tuned.yaml, on the shared
# vocabulary and on a 2,000-piece one of the 2,900 pairs' own: the baselines the gains of
# pretraining and back-translation are to be measured against; and back-translation with those
# settings (tagged synthetic sources, real pairs upsampled), by beam and by sampling; with both
# `pretrained` and `tuned`, the masked-LM start on the tuned beam back-translations too. Writes
# WORK/results-bt.json.
#
#   recipes/multi30k-lowres/backtranslate.sh cpu|gpu WORK_DIR [MULTI30K_DIR] [pretrained] [tuned]
#
# Every run uses one SentencePiece model (joint, 8,000 pieces), trained on the unpaired text by
# `nmt prepare --mono`; every translation run has translate-KIND.yaml's config and budget. A
# stage whose output exists is not run again, so an interrupted comparison continues where it
# stopped. NMT, PRETRAIN_ARGS and TRAIN_ARGS as in run.sh.
set -euo pipefail
kind=${1:?cpu or gpu}; work=${2:?work dir}; m30k=${3:-../shared/data/multi30k}; extras=" ${*:4} "
here=$(cd "$(dirname "$0")" && pwd)
nmt=${NMT:-nmt}
read -r -a pretrain_args <<< "${PRETRAIN_ARGS:-}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
mkdir -p "$work"
times="$work/times-bt.txt"; touch "$times"
stage() { local name=$1 t0; shift; t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> "$times"; }
text=$work/text

[ -f "$text/mono.en" ] || python3 "$here/split.py" "$m30k" "$text"
[ -f "$work/data-mono/manifest.json" ] || $nmt prepare --mono "$text/mono.de" --mono "$text/mono.en" \
    --vocab-size 8000 --out "$work/data-mono" --no-progress
spm=$work/data-mono/spm.joint.model

prepare_pairs() {  # prepare_pairs OUT TRAIN_PREFIX SRC TGT [nmt prepare options...]
    [ -f "$1/manifest.json" ] || $nmt prepare --train "$2" --valid "$m30k/val" --test "$m30k/test_2016_flickr" \
        --src "$3" --tgt "$4" --spm-model "$spm" --out "$1" --no-progress "${@:5}"
}
# A run with a checkpoint to continue: last/, or the copy a save that was cut short left beside it.
has_checkpoint() { [ -d "$1/last" ] || compgen -G "$1/.last.old-*" > /dev/null; }
train_and_score() {  # train_and_score NAME DATA [nmt train options...]; CONFIG overrides translate-KIND.yaml
    local name=$1 data=$2; shift 2
    local run=$work/$name start=--overwrite
    if [ ! -f "$run/test.json" ]; then
        has_checkpoint "$run" && start=--resume  # a stopped run goes on where it was
        stage "train-$name" $nmt train "${CONFIG:-$here/translate-$kind.yaml}" --data "$data" --out "$run" $start \
            --no-progress "$@" "${train_args[@]}"
        stage "translate-$name" $nmt translate "$run" -i "$data/test.src.txt" -o "$run/test.hyp"
        $nmt evaluate --hyp "$run/test.hyp" --ref "$data/test.tgt.txt" --json > "$run/test.json.tmp"
        mv "$run/test.json.tmp" "$run/test.json"  # complete, or not there
    fi
}

prepare_pairs "$work/data-lowres" "$text/lowres" de en
prepare_pairs "$work/data-lowres-en-de" "$text/lowres" en de
train_and_score scratch "$work/data-lowres"
train_and_score en-de "$work/data-lowres-en-de"

backtranslate() {  # backtranslate METHOD EN_DE_RUN [nmt translate options...]: text/bt-METHOD.de, once
    local method=$1 run=$2; shift 2
    if [ ! -f "$text/bt-$method.de" ]; then
        stage "backtranslate-$method" $nmt translate "$run" -i "$text/mono.en" -o "$text/bt-$method.de.tmp" "$@"
        mv "$text/bt-$method.de.tmp" "$text/bt-$method.de"
    fi
}

# The synthetic German of each method, appended to the real pairs.
declare -A method_options=([beam]="--beam 5" [topk10]="--sampling --topk 10 --seed 1")
for method in beam topk10; do
    read -r -a options <<< "${method_options[$method]}"
    backtranslate "$method" "$work/en-de" "${options[@]}"
    cat "$text/lowres.de" "$text/bt-$method.de" > "$text/lowres+bt-$method.de"
    cat "$text/lowres.en" "$text/mono.en" > "$text/lowres+bt-$method.en"
    prepare_pairs "$work/data-bt-$method" "$text/lowres+bt-$method" de en
    train_and_score "bt-$method" "$work/data-bt-$method"
done

if [[ $extras == *" pretrained "* ]]; then
    # The masked LM's directory is not a run's (`train_and_score pretrained` trains into
    # $work/pretrained). A pretraining that was stopped goes on from its last/ checkpoint.
    if [ ! -f "$work/masked-lm.done" ]; then
        start=--overwrite; has_checkpoint "$work/masked-lm" && start=--resume
        stage pretrain $nmt pretrain "$here/pretrain-$kind.yaml" --data "$work/data-mono" --out "$work/masked-lm" \
            $start --no-progress "${pretrain_args[@]}"
        touch "$work/masked-lm.done"
    fi
    train_and_score pretrained "$work/data-lowres" --init "$work/masked-lm"
    train_and_score pretrained+bt-beam "$work/data-bt-beam" --init "$work/masked-lm"
fi
if [[ $extras == *" tuned "* ]]; then
    [ -f "$work/data-lowres-2k/manifest.json" ] || $nmt prepare --train "$text/lowres" --valid "$m30k/val" \
        --test "$m30k/test_2016_flickr" --src de --tgt en --vocab-size 2000 --out "$work/data-lowres-2k" --no-progress
    CONFIG="$here/translate-tuned.yaml" train_and_score scratch-tuned "$work/data-lowres"
    CONFIG="$here/translate-tuned.yaml" train_and_score scratch-tuned-2k "$work/data-lowres-2k"
    # Back-translation with the same settings: en->de tuned like de->en, its beam and its sampled
    # translations tagged (`--tagged-train`, Caswell et al. 2019: the synthetic sources start with
    # the reserved [CLS] symbol, so the model can tell them from real German) and the real pairs
    # given three times (a quarter of the training pairs), kept apart by --no-dedup.
    CONFIG="$here/translate-tuned.yaml" train_and_score en-de-tuned "$work/data-lowres-en-de"
    for side in de en; do cat "$text/lowres.$side" "$text/lowres.$side" "$text/lowres.$side" > "$text/lowres-x3.$side"; done
    for method in beam topk10; do  # with the untuned loop's options
        read -r -a options <<< "${method_options[$method]}"
        method=tuned-$method
        backtranslate "$method" "$work/en-de-tuned" "${options[@]}"
        cp "$text/mono.en" "$text/bt-$method.en"  # the English each synthetic German line translates
        prepare_pairs "$work/data-bt-$method" "$text/lowres-x3" de en --no-dedup --tagged-train "$text/bt-$method"
        CONFIG="$here/translate-tuned.yaml" train_and_score "bt-$method" "$work/data-bt-$method"
    done
    if [[ $extras == *" pretrained "* ]]; then
        # Both together: the masked-LM start, its decoder too (3+3 layers, the masked LM's size),
        # trained with the tuned settings on the tuned back-translations.
        CONFIG="$here/translate-tuned.yaml" train_and_score pretrained+bt-tuned-beam "$work/data-bt-tuned-beam" \
            --init "$work/masked-lm" --set model.enc_layers=3 --set model.dec_layers=3 --set train.init_decoder=true
    fi
fi
python3 "$here/bt_results.py" "$work" > "$work/results-bt.json"
cat "$work/results-bt.json"
