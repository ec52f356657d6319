#!/usr/bin/env bash
# The MNIST-5k study (experiments/results/mnist5k.md): the headline pipeline, then the FGM
# ablations and extra seeds distilled from the same teacher, then Heun on the teacher.
#
#   bash experiments/mnist5k_study.sh [ROOT]        # ROOT defaults to runs/mnist5k
#
# Every run resumes, so rerunning the script after an interruption continues where it stopped.
# Wall time per run goes to ROOT/study_times.tsv. With JAX_COMPILATION_CACHE_DIR set, runs with
# the same programs compile once (the study's timings below were taken that way).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/mnist5k}
PY=${PYTHON:-python}
mkdir -p "$ROOT"
TIMES="$ROOT/study_times.tsv"

source experiments/timed.sh  # timed NAME CMD...

# 1. Headline: teacher, FGM (alpha 1, t* 1, one online step, both nets from the teacher),
#    evaluation of teacher Euler 1/2/4/8/16/50 and FGM 1 step, report and grids.
#    (Skipped when its report exists: rerunning it would only evaluate again.)
[ -f "$ROOT/report.md" ] ||
  timed pipeline $PY -m fgm_jax.main --config=configs/mnist_fgm.py --workdir="$ROOT"

# 2. FGM variants from the same teacher; each scored on the same 1,000 noise draws.
F=(--config=configs/mnist_fgm.py --config.teacher.workdir="$ROOT/teacher"
   --config.eval.teacher_steps="()" --config.eval.classifier_dir="$ROOT/mnist5k_classifier")
N_LARGE=5000
score_large() {  # score_large NAME FLAGS...: the run ROOT/NAME scored again on N_LARGE samples
  # One step per sample makes a larger N cheap: the FD's noise falls as 1/sqrt(N). Compare these
  # only with each other (the FD's bias depends on N).
  local name=$1; shift
  [ -f "$ROOT/$name/eval_n$N_LARGE.json" ] ||
    timed "$name:eval$N_LARGE" $PY -m fgm_jax.main "${F[@]}" --config.job=evaluate "$@" \
        --config.eval.num_samples=$N_LARGE --config.eval.output="eval_n$N_LARGE.json" \
        --workdir="$ROOT/$name"
}
variant() {  # variant NAME FLAGS...: distil, score on 1,000 samples, then on N_LARGE
  local name=$1; shift
  if [ ! -f "$ROOT/$name/eval.json" ]; then  # else distilled and scored by an earlier invocation
    timed "$name" $PY -m fgm_jax.main "${F[@]}" --config.job=train "$@" --workdir="$ROOT/$name"
    timed "$name:eval" $PY -m fgm_jax.main "${F[@]}" --config.job=evaluate "$@" \
        --workdir="$ROOT/$name"
  fi
  score_large "$name" "$@"
}
score_large fgm  # the pipeline's own FGM run (scored on 1,000 samples in ROOT/eval.json)
variant fgm_seed1 --config.seed=1
variant fgm_seed2 --config.seed=2
variant fgm_alpha0.5 --config.fgm.alpha=0.5
variant fgm_alpha1.2 --config.fgm.alpha=1.2
variant fgm_tstar0.8 --config.fgm.t_star=0.8
variant fgm_tstar0.6 --config.fgm.t_star=0.6
# Two online-flow updates per generator update cost more per iteration: fewer iterations at
# the same compute (the ratio of the measured iteration rates, see the results file).
variant fgm_online2 --config.fgm.online_steps=2 --config.num_steps="${ONLINE2_STEPS:-460}"
variant fgm_online_random --config.fgm.init_online=random
variant fgm_generator_random --config.fgm.init_generator=random

# 3. A second seed of every ablation: the default's seed spread (seeds 0, 1, 2) is several
#    times the FD's sampling noise, so one run per variant cannot rank close variants.
variant fgm_alpha0.5_seed1 --config.fgm.alpha=0.5 --config.seed=1
variant fgm_alpha1.2_seed1 --config.fgm.alpha=1.2 --config.seed=1
variant fgm_tstar0.8_seed1 --config.fgm.t_star=0.8 --config.seed=1
variant fgm_tstar0.6_seed1 --config.fgm.t_star=0.6 --config.seed=1
variant fgm_online2_seed1 --config.fgm.online_steps=2 --config.num_steps="${ONLINE2_STEPS:-460}" \
    --config.seed=1
variant fgm_online_random_seed1 --config.fgm.init_online=random --config.seed=1
variant fgm_generator_random_seed1 --config.fgm.init_generator=random --config.seed=1

# 4. Heun on the teacher at matched evaluations (Heun N steps = 2N evaluations: 1, 2, 4, 8, 25
#    against Euler 2, 4, 8, 16, 50), same noise as the Euler rows.
[ -f "$ROOT/teacher/eval_heun.json" ] || timed teacher_heun $PY -m fgm_jax.main --config=configs/mnist_teacher.py --config.job=evaluate \
    --workdir="$ROOT/teacher" --config.sample.method=heun \
    --config.eval.teacher_steps="(1,2,4,8,25)" --config.eval.output=eval_heun.json
echo "=== done ($(date -u +%H:%M:%S)); wall times in $TIMES"

