#!/usr/bin/env bash
# RealUID on digits (experiments/results/mnist5k_realuid.md, "Check on digits"): FGM with real
# data at the MNIST-5k study's best ratio (beta/alpha 0.98), two seeds, and data-free FGM's
# second seed, each distilled from the digits pipeline's teacher with the digits recipe
# (1,600 iterations) and scored like the pipeline (FD of 1,500 one-step samples, seed 123).
#
#   bash experiments/digits_realuid_check.sh ROOT
#
# ROOT holds a finished digits pipeline (python -m fgm_jax.main --config=configs/digits_fgm.py
# --workdir=ROOT): its teacher, its data-free run ROOT/fgm and ROOT/eval.json. Runs resume;
# wall times go to ROOT/realuid_times.tsv; the last lines print every FD.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:?usage: digits_realuid_check.sh ROOT}
PY=${PYTHON:-python}
TIMES="$ROOT/realuid_times.tsv"
F=(--config=configs/digits_fgm.py --config.teacher.workdir="$ROOT/teacher"
   --config.eval.classifier_dir="$ROOT/digits_classifier")
source experiments/timed.sh

run() {  # run NAME FLAGS...: distil into ROOT/NAME, then score its one-step samples
  local name=$1; shift
  [ -f "$ROOT/$name/eval_fgm.json" ] && return 0
  timed "$name" $PY -m fgm_jax.main "${F[@]}" --config.job=train "$@" --workdir="$ROOT/$name"
  timed "$name:eval" $PY -m fgm_jax.main "${F[@]}" --config.job=evaluate "$@" \
      --config.eval.teacher_steps="()" --config.eval.output=eval_fgm.json --workdir="$ROOT/$name"
}

real() {  # real SEED: beta/alpha = 0.9016/0.92 = 0.98, the generator loss's 1/2 form
  echo --config.fgm.alpha=0.5 --config.fgm.real_data.enabled=True \
      --config.fgm.real_data.alpha=0.92 --config.fgm.real_data.beta=0.9016 --config.seed="$1"
}

run fgm_s1 --config.seed=1
run realuid_r0.98_s0 $(real 0)
run realuid_r0.98_s1 $(real 1)
echo "teacher Euler 50: $(grep -A1 teacher_euler_50step "$ROOT/eval.json" | tail -n1)"
echo "data-free seed 0 (the pipeline's run): $(grep -A1 fgm_1step "$ROOT/eval.json" | tail -n1)"
for name in fgm_s1 realuid_r0.98_s0 realuid_r0.98_s1; do
  echo "$name: $(grep -A1 fgm_1step "$ROOT/$name/eval_fgm.json" | tail -n1)"
done
