"""Same-card baseline for bench_mmdit.py: diffusers' PyTorch SD3Transformer2DModel.

    python experiments/bench_mmdit_torch.py            # CUDA: SD3-Medium shape, batch 8
    python experiments/bench_mmdit_torch.py --tiny     # CPU smoke run

float32 weights, bf16 autocast, PyTorch's scaled_dot_product_attention (diffusers' default
processor, fused flash/cuDNN kernels on CUDA). Inputs and sizes match bench_mmdit.py. Times
are medians over CUDA-event-timed calls after warm-up; peak is torch's max allocated bytes.
Needs diffusers (pip install diffusers==0.42.1); not part of the package or the tests.
"""

import argparse
import json
import statistics
import time

import torch
from diffusers import SD3Transformer2DModel

# The exact shapes bench_mmdit.py times (importing it loads jax, but starts no device).
from bench_mmdit import TINY, mmdit


def timed(fn, repeats, cuda):
  times = []
  for _ in range(repeats):
    if cuda:
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      fn()
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end) / 1e3)
    else:
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--json", default=None)
  args = p.parse_args()
  config = TINY if args.tiny else mmdit.SD3_MEDIUM
  batch, latent, text_len = (2, 16, 8) if args.tiny else (8, 64, 333)
  batch = args.batch or batch
  cuda = torch.cuda.is_available()
  dev = torch.device("cuda" if cuda else "cpu")
  torch.manual_seed(0)
  with dev:
    model = SD3Transformer2DModel(**config)
  n_params = sum(p.numel() for p in model.parameters())
  # Fresh random inputs; random (not zero) adaLN/proj_out weights so no path short-cuts.
  with torch.no_grad():
    for prm in model.parameters():
      prm.normal_(0, 0.02)
  x = torch.randn(batch, config["in_channels"], latent, latent, device=dev)
  ctx = torch.randn(batch, text_len, config["joint_attention_dim"], device=dev)
  pooled = torch.randn(batch, config["pooled_projection_dim"], device=dev)
  t = torch.rand(batch, device=dev) * 1000
  amp = torch.autocast(dev.type, dtype=torch.bfloat16)

  def forward():
    with torch.no_grad(), amp:
      return model(x, ctx, pooled, t, return_dict=False)[0]

  def forward_backward():
    model.zero_grad(set_to_none=True)
    with amp:
      out = model(x, ctx, pooled, t, return_dict=False)[0]
    out.float().square().mean().backward()

  rows = []
  for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
    for _ in range(3):
      fn()
    if cuda:
      torch.cuda.synchronize()
      torch.cuda.reset_peak_memory_stats()
    seconds = timed(fn, args.repeats, cuda)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    rows.append(dict(mode=name, seconds=seconds, images_per_s=batch / seconds, peak=peak))
    print(rows[-1], flush=True)
  device = torch.cuda.get_device_name() if cuda else "cpu"
  print(f"diffusers SD3Transformer2DModel, {n_params:,} params, bf16 autocast, batch {batch}, "
        f"{latent}x{latent} latents, {text_len} text tokens; {device}, torch "
        f"{torch.__version__}")
  print("| pass | median ms | images/s | peak GiB |\n|---|---|---|---|")
  for r in rows:
    peak = f"{r['peak'] / 2**30:.1f}" if r["peak"] else "n/a"
    print(f"| {r['mode']} | {1e3 * r['seconds']:.1f} | {r['images_per_s']:.2f} | {peak} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(rows=rows, params=n_params, device=device, torch=torch.__version__,
                     batch=batch), f, indent=1)


if __name__ == "__main__":
  main()
