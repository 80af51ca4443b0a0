#!/usr/bin/env bash
# One Transformer for de, fr, cs <-> en on Multi30k: prepares the multilingual data dir, trains
# (or continues) the recipe's config, then scores on test_2016_flickr (beam 5) the six trained
# directions, the six zero-shot ones directly and through English, every direction again with
# the output restricted to the target language's pieces (--restrict-vocab), with the off-target
# rate of each, and the mean of the last 5 checkpoints; writes WORK/results.json.
#
#   recipes/multi30k-multilingual/run.sh cpu|gpu WORK_DIR [MULTI30K_DIR] [RUNS]
#
# RUNS is a comma-separated list of the runs to train and score (default: main):
#   main       the six English-centred directions, as above;
#   bridge     the same config with de-fr and fr-de added from 1,000 of the training pairs (the
#              first lines of train.de and train.fr): does a little data between two non-English
#              languages stop the zero-shot output from leaving for English?
#   bridge-cs  the bridge run with de-cs added from the same 1,000 lines: does a little data into
#              Czech from a non-English source do the same for fr-cs, still zero-shot?
#   synthetic  no data between the non-English languages at all: the main run's model translates
#              the English side of the first 5,000 training pairs into de, fr and cs, which pairs
#              each real de, fr or cs source with a synthetic target in another of them (de-fr:
#              the real German with the model's French for its English); the main model is then
#              fine-tuned (nmt train --init) on its six directions plus these six.
# Each bridge or synthetic run is scored on every direction of its data dir.
#
# NMT overrides the command (default: nmt); TRAIN_ARGS adds options to nmt train; SYNTHETIC_LINES
# (default 5000) and SYNTHETIC_STEPS (default 1000) size the synthetic run's pairs and fine-tuning.
set -euo pipefail
kind=${1:?cpu or gpu}; work=${2:?work dir}; m30k=${3:-../shared/data/multi30k}; runs=${4:-main}
here=$(cd "$(dirname "$0")" && pwd)
nmt=${NMT:-nmt}
read -r -a train_args <<< "${TRAIN_ARGS:-}"
trained=de-en,en-de,fr-en,en-fr,cs-en,en-cs
zero_shot=de-fr,fr-de,de-cs,cs-de,fr-cs,cs-fr
case $kind in cpu|gpu) ;; *) echo "run.sh: the first argument is cpu or gpu (got '$kind')" >&2; exit 2 ;; esac
run="$work/$kind"
# The scores and hypotheses of WORK are one run's: a cpu and a gpu run each need their own WORK.
other=$([ "$kind" = cpu ] && echo gpu || echo cpu)
if [ -d "$work/$other" ]; then
    echo "run.sh: $work holds a $other run; give the $kind run a work dir of its own" >&2; exit 2
fi
mkdir -p "$work"
# A run with a checkpoint to continue: last/, or the copy a save that was cut short left beside it.
has_checkpoint() { [ -d "$1/last" ] || compgen -G "$1/.last.old-*" > /dev/null; }
# nmt evaluate into WORK/NAME.json, which appears only once it is complete.
scores() { local name=$1; shift; $nmt evaluate "$@" --json > "$work/$name.json.tmp"; mv "$work/$name.json.tmp" "$work/$name.json"; }
main_run() {
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
}
# A bridge run NAME: the six English-centred directions from Multi30k plus EXTRA (comma-separated)
# from the first 1,000 lines of train.LANG; the directions ZERO_SHOT stay untrained.
bridge_run() {
    local name=$1 extra=$2 zero=$3 lang direction reader trains continue_run
    mkdir -p "$work/bridge"
    for lang in de fr cs; do
        [ -f "$m30k/train.$lang.gz" ] && reader=(gzip -dc "$m30k/train.$lang.gz") || reader=(cat "$m30k/train.$lang")
        "${reader[@]}" | awk 'NR <= 1000' > "$work/bridge/train.$lang"  # reads to the end: no SIGPIPE under pipefail
    done
    trains=()
    for direction in ${trained//,/ } ${extra//,/ }; do
        case ,$extra, in *,$direction,*) trains+=(--train "$work/bridge/train") ;; *) trains+=(--train "$m30k/train") ;; esac
    done
    [ -f "$work/data-$name/manifest.json" ] || $nmt prepare --directions $trained,$extra \
        --zero-shot $zero "${trains[@]}" --valid "$m30k/val" --test "$m30k/test_2016_flickr" \
        --vocab-size 8000 --out "$work/data-$name" --no-progress
    continue_run=()
    has_checkpoint "$run-$name" && continue_run=(--resume)
    $nmt train "$here/transformer-$kind.yaml" --data "$work/data-$name" --out "$run-$name" --no-progress \
        "${continue_run[@]}" "${train_args[@]}"
    scores "$name" --model "$run-$name" --data "$work/data-$name" --off-target --hyp-dir "$work/hyp-$name"
}
# The main run's model translates the English of the first SYNTHETIC_LINES training pairs into
# de, fr and cs; for each zero-shot direction s-t, WORK/synthetic/s-t.s holds the real sentences
# of language s and WORK/synthetic/s-t.t the model's translations of their English into t.
synthetic_pairs() {
    local lang src tgt reader direction
    mkdir -p "$work/synthetic"
    for lang in en de fr cs; do
        [ -f "$m30k/train.$lang.gz" ] && reader=(gzip -dc "$m30k/train.$lang.gz") || reader=(cat "$m30k/train.$lang")
        "${reader[@]}" | awk -v n="$SYNTHETIC_LINES" 'NR <= n' > "$work/synthetic/real.$lang"
    done
    for lang in de fr cs; do
        [ -f "$work/synthetic/model.$lang" ] && continue
        $nmt translate "$run" --tgt-lang $lang -i "$work/synthetic/real.en" -o "$work/synthetic/model.$lang.tmp"
        mv "$work/synthetic/model.$lang.tmp" "$work/synthetic/model.$lang"
    done
    for direction in ${zero_shot//,/ }; do
        src=${direction%-*}; tgt=${direction#*-}
        cp "$work/synthetic/real.$src" "$work/synthetic/$direction.$src"
        cp "$work/synthetic/model.$tgt" "$work/synthetic/$direction.$tgt"
    done
}
synthetic_run() {
    local direction trains continue_run
    has_checkpoint "$run" || { echo "run.sh: the synthetic run starts from the main run's model; run main first" >&2; exit 2; }
    synthetic_pairs
    trains=()
    for direction in ${trained//,/ }; do trains+=(--train "$m30k/train"); done
    for direction in ${zero_shot//,/ }; do trains+=(--train "$work/synthetic/$direction"); done
    [ -f "$work/data-synthetic/manifest.json" ] || $nmt prepare --directions $trained,$zero_shot "${trains[@]}" \
        --valid "$m30k/val" --test "$m30k/test_2016_flickr" --spm-model "$run" --out "$work/data-synthetic" --no-progress
    continue_run=(--init "$run")
    has_checkpoint "$run-synthetic" && continue_run=(--resume)
    # Fine-tuning: a fresh schedule that starts near where the CPU config's main run ended (8.8e-4).
    $nmt train "$here/transformer-$kind.yaml" --data "$work/data-synthetic" --out "$run-synthetic" --no-progress \
        "${continue_run[@]}" --set train.max_steps=$SYNTHETIC_STEPS --set train.max_epochs=0 --set train.lr=1e-3 \
        --set train.warmup_steps=100 "${train_args[@]}"
    scores synthetic --model "$run-synthetic" --data "$work/data-synthetic" --off-target --hyp-dir "$work/hyp-synthetic"
    scores synthetic_restricted --model "$run-synthetic" --data "$work/data-synthetic" --directions $zero_shot \
        --restrict-vocab --off-target --hyp-dir "$work/hyp-synthetic-restricted"
}
SYNTHETIC_LINES=${SYNTHETIC_LINES:-5000}; SYNTHETIC_STEPS=${SYNTHETIC_STEPS:-1000}
plan=()  # every name is checked before the first run starts
for name in ${runs//,/ }; do
    case $name in
        main) plan+=("main_run") ;;
        bridge) plan+=("bridge_run bridge de-fr,fr-de de-cs,cs-de,fr-cs,cs-fr") ;;
        bridge-cs) plan+=("bridge_run bridge-cs de-fr,fr-de,de-cs cs-de,fr-cs,cs-fr") ;;
        synthetic) plan+=("synthetic_run") ;;
        *) echo "run.sh: unknown run '$name' (main, bridge, bridge-cs or synthetic)" >&2; exit 2 ;;
    esac
done
for step in "${plan[@]}"; do $step; done
python3 "$here/results.py" "$work" > "$work/results.json"
cat "$work/results.json"
