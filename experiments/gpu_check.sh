#!/bin/bash
# GPU checks in one device call (see experiments/results/speed.md).
#   bash experiments/gpu_check.sh "$OUT"          issue 4, MM-DiT:
#     1. fgm_jax MM-DiT, SD3-Medium shape: forward, forward+backward (remat dots, none)
#     2. same-card baseline: diffusers' PyTorch model, bf16 autocast, same shapes
#   bash experiments/gpu_check.sh "$OUT" unet     issue 11, CIFAR-10 U-Net (bench_unet.py):
#     FGM iteration, one-step sampling at 1024 and the teacher step, bf16 and fp32 at batch
#     128, one process; a table of all rows at the end. Rows are kept in unet.json as they
#     finish, so a timeout keeps the ones that ran.
#   bash experiments/gpu_check.sh "$OUT" sd3fgm   issue 12: MM-DiT-FGM iteration at SD3-Medium
#     shape (bench_sd3_fgm.py, remat full then dots, batch 4): a call of its own.
# Compile times on the H100 are long (U-Net FGM iteration > 100 s, MM-DiT-FGM > 215 s), so each
# mode runs its rows in one process with jax's persistent compilation cache on
# (experiments/results/speed.md, "Compile time is part of the budget").
# Wheels carried in .whl/: ml_collections (the configs need it; the image lacks it), and for
# the MM-DiT baseline diffusers. Call with carry=[".whl"] and a timeout of 600 s.
out=${1:-/tmp/gpu_check}
what=${2:-mmdit}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$out/card.txt"
date -u | tee -a "$out/card.txt"
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)" | tee -a "$out/card.txt"
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
if [ "$what" = sd3fgm ]; then  # a call of its own: the step compiled > 215 s on an H100
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 560 python3 experiments/bench_sd3_fgm.py \
    --remat=full,dots --batch=4 --json="$out/sd3_fgm.json" 2>&1 | tee "$out/sd3_fgm.log" \
    | grep -v "^W0000\|^I0000\|^W11\|^I11"
  exit 0
fi
if [ "$what" = unet ]; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  # One process for every row: each U-Net program compiled > 100 s on an H100 (2026-11-27);
  # in one process rows share autotuning, and the cache above helps a rerun.
  timeout 560 python3 experiments/bench_unet.py --precision=bf16,fp32 \
    --what=iteration,sample,teacher --batch=128 --sample_batch=1024 --json="$out/unet.json" \
    2>&1 | tee -a "$out/unet.log" | grep -v "^W0000\|^I0000\|^W11\|^I11\|^|\|^$\|^U-Net\|^(The"
  echo "=== fgm_jax U-Net ==="; python3 experiments/bench_unet.py --table="$out/unet.json"
  exit 0
fi
timeout 330 python3 experiments/bench_mmdit.py --remat=dots,none --json="$out/jax.json" 2>&1 | tee "$out/jax.log" | grep -v "^W0000\|^I0000"
if [ -z "$SKIP_TORCH" ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
[ -z "$SKIP_TORCH" ] && timeout 120 python3 experiments/bench_mmdit_torch.py --json="$out/torch.json" 2>&1 | tee "$out/torch.log" | tail -8
echo "=== fgm_jax ==="; grep -A8 "^MM-DiT" "$out/jax.log"
