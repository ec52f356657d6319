#!/bin/bash
# All GPU checks of issue 4 in one device call (see experiments/results/speed.md):
#   1. fgm_jax MM-DiT, SD3-Medium shape: forward, forward+backward (remat dots, none)
#   2. same-card baseline: diffusers' PyTorch model, bf16 autocast, same shapes
# Usage on the device machine (wheels for diffusers carried in .whl/):
#   bash experiments/gpu_check.sh "$OUT"
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$out/card.txt"
date -u | tee -a "$out/card.txt"
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)" | tee -a "$out/card.txt"
timeout 330 python3 experiments/bench_mmdit.py --remat=dots,none --json="$out/jax.json" 2>&1 | tee "$out/jax.log" | grep -v "^W0000\|^I0000"
if [ -z "$SKIP_TORCH" ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
[ -z "$SKIP_TORCH" ] && timeout 120 python3 experiments/bench_mmdit_torch.py --json="$out/torch.json" 2>&1 | tee "$out/torch.log" | tail -8
echo "=== fgm_jax ==="; grep -A8 "^MM-DiT" "$out/jax.log"
