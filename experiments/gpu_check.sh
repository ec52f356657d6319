#!/bin/bash
# GPU checks in one device call (see experiments/results/speed.md).
#   bash experiments/gpu_check.sh "$OUT"          issue 4, MM-DiT:
#     1. fgm_jax MM-DiT, SD3-Medium shape: forward, forward+backward (remat dots, none)
#     2. same-card baseline: diffusers' PyTorch model, bf16 autocast, same shapes
#   bash experiments/gpu_check.sh "$OUT" unet     issue 11, CIFAR-10 U-Net (bench_unet.py):
#     FGM iteration bf16 at batch 128, 256 and one-step sampling at 1024 (with HLO of the
#     batch-128 iteration and a profiler trace), then fp32 at 128, 256, then the teacher step
#     bf16/fp32 at 128; a table of all rows at the end. About 8 minutes; rows are kept in
#     unet.json as they finish, so a timeout keeps the ones that ran.
#   bash experiments/gpu_check.sh "$OUT" session  one ~9.5-min call for a 15-min lease:
#     issue 11's U-Net rows (bf16 iteration 128 + sampling 1024 with HLO and profile, fp32
#     iteration 128, bf16 teacher 128, bf16 iteration 256 last) around issue 12's MM-DiT-FGM
#     iteration at SD3-Medium shape (bench_sd3_fgm.py: remat dots, batch 4 then 12).
# Wheels carried in .whl/: ml_collections (the configs need it; the image lacks it), and for
# the MM-DiT baseline diffusers. Call with carry=[".whl"] and a timeout of 600 s.
out=${1:-/tmp/gpu_check}
what=${2:-mmdit}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$out/card.txt"
date -u | tee -a "$out/card.txt"
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)" | tee -a "$out/card.txt"
if [ "$what" = session ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  bench() {  # bench <timeout s> <bench_unet.py flags...>: every row appended to unet.json
    timeout "$1" python3 experiments/bench_unet.py "${@:2}" --json="$out/unet.json" 2>&1 \
      | tee -a "$out/unet.log" | grep -v "^W0000\|^I0000\|^|\|^$\|^U-Net\|^(The"
  }
  bench 160 --precision=bf16 --what=iteration,sample --batch=128 --sample_batch=1024 \
    --hlo_dir=/tmp/unet_hlo --profile_dir=/tmp/unet_profile
  bench 70 --precision=fp32 --what=iteration --batch=128
  bench 50 --precision=bf16 --what=teacher --batch=128
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 230 python3 experiments/bench_sd3_fgm.py --remat=dots --batch=4,12 \
    --json="$out/sd3_fgm.json" 2>&1 | tee "$out/sd3_fgm.log" | grep -v "^W0000\|^I0000"
  bench 45 --precision=bf16 --what=iteration --batch=256
  gzip -c /tmp/unet_hlo/iteration_bf16_b128.hlo.txt >"$out/iteration_bf16_b128.hlo.txt.gz" 2>/dev/null
  tar czf "$out/unet_profile.tgz" -C /tmp unet_profile 2>/dev/null
  echo "=== MM-DiT-FGM ==="; grep -A6 "^MM-DiT-FGM" "$out/sd3_fgm.log"
  echo "=== fgm_jax U-Net ==="; python3 experiments/bench_unet.py --table="$out/unet.json"
  exit 0
fi
if [ "$what" = unet ]; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  bench() {  # bench <timeout s> <bench_unet.py flags...>: every row appended to unet.json
    timeout "$1" python3 experiments/bench_unet.py "${@:2}" --json="$out/unet.json" 2>&1 \
      | tee -a "$out/unet.log" | grep -v "^W0000\|^I0000\|^|\|^$\|^U-Net\|^(The"
  }
  bench 300 --precision=bf16 --what=iteration,sample --batch=128,256 --sample_batch=1024 \
    --hlo_dir=/tmp/unet_hlo --profile_dir=/tmp/unet_profile
  bench 150 --precision=fp32 --what=iteration --batch=128,256
  bench 100 --precision=bf16,fp32 --what=teacher --batch=128
  gzip -c /tmp/unet_hlo/iteration_bf16_b128.hlo.txt >"$out/iteration_bf16_b128.hlo.txt.gz" 2>/dev/null
  tar czf "$out/unet_profile.tgz" -C /tmp unet_profile 2>/dev/null
  echo "=== fgm_jax U-Net ==="; python3 experiments/bench_unet.py --table="$out/unet.json"
  exit 0
fi
timeout 330 python3 experiments/bench_mmdit.py --remat=dots,none --json="$out/jax.json" 2>&1 | tee "$out/jax.log" | grep -v "^W0000\|^I0000"
if [ -z "$SKIP_TORCH" ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
[ -z "$SKIP_TORCH" ] && timeout 120 python3 experiments/bench_mmdit_torch.py --json="$out/torch.json" 2>&1 | tee "$out/torch.log" | tail -8
echo "=== fgm_jax ==="; grep -A8 "^MM-DiT" "$out/jax.log"
