#!/usr/bin/env bash
# RealUID on MNIST-5k (experiments/results/mnist5k_realuid.md): data-free FGM against FGM with
# real-data supervision (config.fgm.real_data), every run distilled from the same teacher and
# scored at N = 5,000 on the same noise, with the teacher's Euler 50 and Heun 25 rows.
#
#   bash experiments/mnist5k_realuid_study.sh ROOT [VARIANT ...]
#
# ROOT holds the teacher (ROOT/teacher, e.g. from `python -m fgm_jax.main
# --config=configs/mnist_fgm.py --workdir=ROOT`, the MNIST-5k pipeline). With VARIANT names,
# only those runs (see `variants` below); without, all. Every run resumes, so rerunning after
# an interruption continues where it stopped. Wall times go to ROOT/realuid_times.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:?usage: mnist5k_realuid_study.sh ROOT [VARIANT ...]}; shift
PY=${PYTHON:-python}
N=5000
TIMES="$ROOT/realuid_times.tsv"
F=(--config=configs/mnist_fgm.py --config.teacher.workdir="$ROOT/teacher"
   --config.eval.classifier_dir="$ROOT/mnist5k_classifier")

source experiments/timed.sh  # timed NAME CMD...

run() {  # run NAME FLAGS...: distil into ROOT/NAME, then score it on N samples
  local name=$1; shift
  [ -f "$ROOT/$name/eval_n$N.json" ] && return 0
  timed "$name" $PY -m fgm_jax.main "${F[@]}" --config.job=train "$@" --workdir="$ROOT/$name"
  timed "$name:eval$N" $PY -m fgm_jax.main "${F[@]}" --config.job=evaluate "$@" \
      --config.eval.teacher_steps="()" --config.eval.num_samples=$N \
      --config.eval.output="eval_n$N.json" --workdir="$ROOT/$name"
}

# RealUID: the generator loss's 1/2 form (config.fgm.alpha = 0.5), the paper's alpha/beta.
ruid() {  # ruid ALPHA BETA K SEED [FLAGS...]
  local a=$1 b=$2 k=$3 s=$4; shift 4
  run "realuid_a${a}_b${b}_k${k}_s${s}" $(ruid_flags "$a" "$b" "$k" "$s") "$@"
}

# A finished run continued to more iterations (its own flags plus --config.num_steps), in a
# copy of its workdir: the run resumes from its last checkpoint, so the extension costs only
# the extra iterations, and the data stream (keyed by step) continues as in one long run.
long() {  # long BASE STEPS: ROOT/BASE continued to STEPS iterations in ROOT/BASE_itSTEPS
  continued "${1}_it${2}" "$1" "$2"
}

# The same, with both learning rates falling (cosine) from lr at BASE's last step, 600, to 0
# at STEPS: a run with that schedule is the 600-iteration run up to there (optim.py).
cosine() {  # cosine BASE STEPS: into ROOT/BASE_cosSTEPS
  continued "${1}_cos${2}" "$1" "$2" \
      --config.optim.decay_steps="(600, $2)" --config.online_optim.decay_steps="(600, $2)"
}

continued() {  # continued NAME BASE STEPS [FLAGS...]
  local name=$1 base=$2 steps=$3 flags; shift 3
  flags=$(run_flags "$base")  # (a plain assignment: set -e stops at an unknown name)
  if [ ! -d "$ROOT/$name" ]; then
    if [ ! -f "$ROOT/$base/eval_n$N.json" ]; then  # the 600-iteration run first
      if [ "$base" = fgm ]; then variant fgm_s0; else run "$base" $flags; fi
    fi
    cp -r "$ROOT/$base" "$ROOT/$name.partial" && rm -f "$ROOT/$name.partial"/eval*.json
    mv "$ROOT/$name.partial" "$ROOT/$name"
  fi
  run "$name" --config.num_steps="$steps" "$@" $flags
}

ruid_flags() {  # ruid_flags ALPHA BETA K SEED: the RealUID flags of one run
  echo --config.fgm.alpha=0.5 --config.fgm.real_data.enabled=True \
      --config.fgm.real_data.alpha="$1" --config.fgm.real_data.beta="$2" \
      --config.fgm.online_steps="$3" --config.seed="$4"
}

# A run's flags read from its folder's name (fgm, fgm_s<S>, realuid_a<A>_b<B>_k<K>_s<S>), so
# a continuation always trains with its base's flags.
REALUID_RUN='^realuid_a([0-9.]+)_b([0-9.]+)_k([0-9]+)_s([0-9]+)$'
run_flags() {  # run_flags NAME
  if [ "$1" = fgm ]; then
    return 0
  elif [[ $1 =~ ^fgm_s([0-9]+)$ ]]; then
    echo --config.seed="${BASH_REMATCH[1]}"
  elif [[ $1 =~ $REALUID_RUN ]]; then
    ruid_flags "${BASH_REMATCH[@]:1}"
  else
    echo "no run is named $1" >&2; exit 2
  fi
}

variant() {
  case $1 in
    teacher)  # Euler 50 and Heun 25 (50 evaluations each) at N, the same noise as every row
      [ -f "$ROOT/teacher/eval_euler50_n$N.json" ] || timed teacher_euler50 $PY -m fgm_jax.main \
          --config=configs/mnist_teacher.py --config.job=evaluate --workdir="$ROOT/teacher" \
          --config.eval.classifier_dir="$ROOT/mnist5k_classifier" \
          --config.eval.teacher_steps="(50,)" --config.eval.num_samples=$N \
          --config.eval.output="eval_euler50_n$N.json"
      [ -f "$ROOT/teacher/eval_heun25_n$N.json" ] || timed teacher_heun25 $PY -m fgm_jax.main \
          --config=configs/mnist_teacher.py --config.job=evaluate --workdir="$ROOT/teacher" \
          --config.eval.classifier_dir="$ROOT/mnist5k_classifier" --config.sample.method=heun \
          --config.eval.teacher_steps="(25,)" --config.eval.num_samples=$N \
          --config.eval.output="eval_heun25_n$N.json" ;;
    fgm_s0)  # data-free FGM, the MNIST-5k default: the pipeline's own run (ROOT/fgm), rescored
      [ -f "$ROOT/fgm/eval_n$N.json" ] || timed "fgm:eval$N" $PY -m fgm_jax.main "${F[@]}" \
          --config.job=evaluate --config.eval.teacher_steps="()" --config.eval.num_samples=$N \
          --config.eval.output="eval_n$N.json" --workdir="$ROOT/fgm" ;;
    fgm_s[1-9]) run "$1" --config.seed="${1##*_s}" ;;
    headline_k1_s[0-9]) ruid 0.92 0.94 1 "${1##*_s}" ;;  # the paper's unconditional alpha/beta (b/a 1.022)
    ratio0.98_k1_s[0-9]) ruid 0.92 0.9016 1 "${1##*_s}" ;;  # b/a = 0.98
    ratio0.95_k1_s[0-9]) ruid 0.92 0.874 1 "${1##*_s}" ;;  # b/a = 0.95: beyond the paper's best
    ratio1.00_k1_s[0-9]) ruid 0.92 0.92 1 "${1##*_s}" ;;  # b/a = 1: real data without rescaling
    ratio0.90_k1_s[0-9]) ruid 0.92 0.828 1 "${1##*_s}" ;;
    ratio0.98_k3_s[0-9]) ruid 0.92 0.9016 3 "${1##*_s}" --config.num_steps=300 ;;
    ratio0.98_k5_s[0-9]) ruid 0.92 0.9016 5 "${1##*_s}" --config.num_steps=200 ;;
    # K online updates per generator update at equal compute: an iteration costs K + 1
    # network updates against 2 at K = 1, so 600 * 2 / (K + 1) iterations.
    headline_k3_s[0-9]) ruid 0.92 0.94 3 "${1##*_s}" --config.num_steps=300 ;;
    headline_k5_s[0-9]) ruid 0.92 0.94 5 "${1##*_s}" --config.num_steps=200 ;;
    # beta > 1 (outside the paper's range; opt-in): the real-data target scale
    # (1 - beta)/(1 - alpha) turns negative, which pulls the student toward the data.
    pull_a${PULL_A:-0.5}_b${PULL_B:-1.5}_k${PULL_K:-1}_s${PULL_S:-0})
      ruid "${PULL_A:-0.5}" "${PULL_B:-1.5}" "${PULL_K:-1}" "${PULL_S:-0}" \
          --config.fgm.real_data.allow_beta_above_one=True ;;
    # Three times as long (1,800 iterations): the 600-iteration runs above, continued.
    long_fgm_s0) long fgm 1800 ;;
    long_fgm_s[1-9]) long "fgm_s${1##*_s}" 1800 ;;
    long_ratio0.98_k1_s[0-9]) long "realuid_a0.92_b0.9016_k1_s${1##*_s}" 1800 ;;
    long_ratio0.95_k1_s[0-9]) long "realuid_a0.92_b0.874_k1_s${1##*_s}" 1800 ;;
    # 1,800 iterations with the learning rates falling to 0 from iteration 600 (cosine).
    cos_fgm_s0) cosine fgm 1800 ;;
    cos_fgm_s[1-9]) cosine "fgm_s${1##*_s}" 1800 ;;
    cos_ratio0.98_k1_s[0-9]) cosine "realuid_a0.92_b0.9016_k1_s${1##*_s}" 1800 ;;
    cos_ratio0.95_k1_s[0-9]) cosine "realuid_a0.92_b0.874_k1_s${1##*_s}" 1800 ;;
    cos_ratio0.90_k1_s[0-9]) cosine "realuid_a0.92_b0.828_k1_s${1##*_s}" 1800 ;;
    cos_ratio1.00_k1_s[0-9]) cosine "realuid_a0.92_b0.92_k1_s${1##*_s}" 1800 ;;
    cos_headline_k1_s[0-9]) cosine "realuid_a0.92_b0.94_k1_s${1##*_s}" 1800 ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

ALL=(teacher fgm_s0 headline_k1_s0 ratio0.98_k1_s0 headline_k3_s0 headline_k5_s0 fgm_s1
     headline_k1_s1 ratio0.98_k1_s1 headline_k3_s1 headline_k5_s1)
mkdir -p "$ROOT"
for v in "${@:-${ALL[@]}}"; do variant "$v"; done
echo "=== done ($(date -u +%H:%M:%S)); wall times in $TIMES"
