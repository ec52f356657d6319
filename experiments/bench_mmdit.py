"""Speed benchmark of the SD3-Medium-shaped MM-DiT: jitted forward and forward+backward.

    python experiments/bench_mmdit.py                 # GPU/TPU: SD3-Medium shape, batch 8
    python experiments/bench_mmdit.py --tiny          # CPU smoke run of the same code path
    python experiments/bench_mmdit.py --remat=none,dots,full --batch=4

Model: 24 layers, 24 heads x 64 (hidden 1536), joint dim 4096, pooled 2048, patch 2, random
weights; float32 params, bfloat16 compute; 64x64x16 latents (512 px) + 333 text tokens
(77 CLIP + 256 T5). Attention uses cuDNN flash attention on GPUs, XLA elsewhere.

Reports the median step time over --repeats calls (warm-up excluded, each call waited with
block_until_ready), images/s, TFLOP/s from XLA's cost analysis and from an analytic count
(XLA cannot see inside the cuDNN attention call, so its count misses attention, and it counts
a scanned run of blocks once: --unrolled for its full count), peak device memory when the
backend reports it, and checks that the timed calls did not trace or compile again. Prints a
markdown table.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fgm_jax.models import mmdit  # noqa: E402

TINY = dict(mmdit.SD3_MEDIUM, num_layers=3, num_attention_heads=2, attention_head_dim=16,
            caption_projection_dim=32, joint_attention_dim=24, pooled_projection_dim=16,
            pos_embed_max_size=16)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="tiny model and inputs (CPU check)")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--latent", type=int, default=None, help="latent height = width")
  p.add_argument("--text_len", type=int, default=None)
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--remat", default="dots",
                 help="comma list of none|dots|full for forward+backward")
  p.add_argument("--attention_impl", default="auto", choices=["auto", "xla", "cudnn"])
  p.add_argument("--unrolled", action="store_true",
                 help="scan_layers=False: one compiled copy per block (compare compile time)")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--json", default=None, help="write all numbers to this JSON file")
  args = p.parse_args(argv)
  defaults = (2, 16, 8, 3) if args.tiny else (8, 64, 333, 10)
  for name, value in zip(("batch", "latent", "text_len", "repeats"), defaults):
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.attention_impl == "auto":
    args.attention_impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  return args


# ----------------------------------------------------------------------------- FLOPs


def analytic_flops(config, batch, n_img, n_txt):
  """Matmul + attention FLOPs of one forward (2 per multiply-add), mirroring mmdit.py."""
  d = config["num_attention_heads"] * config["attention_head_dim"]
  p, c = config["patch_size"], config["in_channels"]
  per_tok = lambda fan_in, fan_out: 2 * fan_in * fan_out
  f = n_img * per_tok(p * p * c, d)                         # patch conv
  f += n_txt * per_tok(config["joint_attention_dim"], d)       # context embedder
  f += n_img * per_tok(d, p * p * config["out_channels"])      # proj_out
  n = n_img + n_txt
  for i in range(config["num_layers"]):
    last = i == config["num_layers"] - 1
    dual = i in tuple(config["dual_attention_layers"])
    f += n_img * (4 * per_tok(d, d) + 2 * per_tok(d, 4 * d))  # q k v o + MLP (image)
    f += n_txt * 3 * per_tok(d, d)                            # context q k v
    if not last:
      f += n_txt * (per_tok(d, d) + 2 * per_tok(d, 4 * d))    # context out + MLP
    q_rows = n_img if last else n
    f += 2 * 2 * q_rows * n * d                               # QK^T and PV
    if dual:
      f += n_img * 4 * per_tok(d, d) + 2 * 2 * n_img * n_img * d
  return batch * f  # the (batch x D) adaLN / embedder matmuls are negligible


def xla_flops(lowered):
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


# ----------------------------------------------------------------------------- timing


def peak_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def time_calls(fn, args, warmup, repeats):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def random_params(module, x, t, cond):
  """Random float32 weights (std 0.02 everywhere, so no zero-initialised layer short-cuts
  work). Shapes come from eval_shape: no init graph of the full model is compiled."""
  abstract = jax.eval_shape(lambda k: module.init(k, x, t, cond)["params"],
                            jax.random.PRNGKey(0))
  abstract = jax.tree_util.tree_map(lambda a: a.value if hasattr(a, "value") else a,
                                    abstract, is_leaf=lambda a: hasattr(a, "value"))
  leaves, tree = jax.tree_util.tree_flatten(abstract)
  # One small RNG program per distinct shape (eager calls are cached by shape); a single
  # jit over all ~600 leaves took minutes to compile on an H100 host.
  base = jax.random.PRNGKey(0)
  return jax.tree_util.tree_unflatten(tree, [
      0.02 * jax.random.normal(jax.random.fold_in(base, i), a.shape, a.dtype)
      for i, a in enumerate(leaves)])


def make_inputs(config, args):
  kx, kt, kc, kp = jax.random.split(jax.random.PRNGKey(1), 4)
  x = jax.random.normal(kx, (args.batch, args.latent, args.latent, config["in_channels"]))
  t = jax.random.uniform(kt, (args.batch,))
  cond = {"context": jax.random.normal(kc, (args.batch, args.text_len,
                                           config["joint_attention_dim"])),
          "pooled": jax.random.normal(kp, (args.batch, config["pooled_projection_dim"]))}
  return x, t, cond


def check_attention(config, args):
  """Fused attention vs XLA's plain softmax attention at the benchmark's shape, in bf16,
  both against a float32 reference. Fresh random inputs; returns relative errors."""
  n = (args.latent // config["patch_size"]) ** 2 + args.text_len
  shape = (args.batch, n, config["num_attention_heads"], config["attention_head_dim"])
  q, k, v = (jax.random.normal(key, shape) for key in jax.random.split(
      jax.random.PRNGKey(7), 3))
  ref = mmdit.attention(q, k, v, "xla")
  rel = lambda a: float(jnp.linalg.norm(a.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
  bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
  out = {"xla_bf16": rel(jax.jit(lambda *a: mmdit.attention(*a, "xla"))(*bf))}
  if args.attention_impl != "xla":
    out[args.attention_impl + "_bf16"] = rel(
        jax.jit(lambda *a: mmdit.attention(*a, args.attention_impl))(*bf))
    # Backward too: gradient w.r.t. q, k, v of <attention, r> for a random r.
    r = jax.random.normal(jax.random.PRNGKey(8), ref.shape)
    grad = lambda impl, *a: jax.grad(lambda *b: jnp.vdot(
        mmdit.attention(*b, impl).astype(jnp.float32), r), (0, 1, 2))(*a)
    g_ref = jax.jit(lambda *a: grad("xla", *a))(q, k, v)
    g_fused = jax.jit(lambda *a: grad(args.attention_impl, *a))(*bf)
    out[args.attention_impl + "_bf16_grad_qkv"] = [
        float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
        for a, b in zip(g_fused, g_ref)]
  return out


def bench(mode, remat, config, args, params, inputs):
  module = mmdit.from_diffusers_config(config, dtype=args.dtype,
                                       attention_impl=args.attention_impl, remat=remat,
                                       scan_layers=not args.unrolled)
  traces = [0]

  def forward(params, x, t, cond):
    traces[0] += 1  # runs only while tracing
    return module.apply({"params": params}, x, t, cond)

  def loss_and_grad(params, x, t, cond):
    traces[0] += 1
    loss = lambda p: jnp.mean(jnp.square(module.apply({"params": p}, x, t, cond)
                                         .astype(jnp.float32)))
    return jax.value_and_grad(loss)(params)

  fn = jax.jit(forward if mode == "forward" else loss_and_grad)
  all_inputs = (params,) + tuple(inputs)
  t0 = time.perf_counter()
  try:
    flops_xla = xla_flops(fn.lower(*all_inputs))
    traces[0] = 0
    jax.block_until_ready(fn(*all_inputs))  # compile + first run
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
      jax.block_until_ready(fn(*all_inputs))
    traces_after_warmup, cache_after_warmup = traces[0], _cache_size(fn)
    seconds = time_calls(fn, all_inputs, 0, args.repeats)
  except Exception as e:  # e.g. RESOURCE_EXHAUSTED: report and move on
    msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      msg = "OOM"
    return dict(mode=mode, remat=remat, error=msg)
  recompiled = traces[0] != traces_after_warmup or _cache_size(fn) != cache_after_warmup
  n_img = (args.latent // config["patch_size"]) ** 2
  flops_model = analytic_flops(config, args.batch, n_img, args.text_len)
  if mode != "forward":
    flops_model *= 3  # backward ~ 2x forward; remat recompute is not useful work
  return dict(mode=mode, remat=remat if mode != "forward" else "-", seconds=seconds,
              images_per_s=args.batch / seconds, tflops_xla=flops_xla / seconds / 1e12,
              tflops_model=flops_model / seconds / 1e12, peak=peak_bytes(),
              recompiled=recompiled, compile_s=compile_s,
              gflop_per_image_fwd=analytic_flops(config, 1, n_img, args.text_len) / 1e9)


def _cache_size(fn):
  size = getattr(fn, "_cache_size", None)
  return size() if callable(size) else None


def markdown(rows, args, config):
  dev = jax.devices()[0]
  lines = [
      f"MM-DiT {'tiny' if args.tiny else 'SD3-Medium'} shape "
      f"({config['num_layers']} layers, {config['num_attention_heads']}x"
      f"{config['attention_head_dim']}), {args.dtype} compute, fp32 params; batch "
      f"{args.batch}, latents {args.latent}x{args.latent}x{config['in_channels']}, "
      f"{args.text_len} text tokens; attention={args.attention_impl}; "
      f"{'unrolled' if args.unrolled else 'scanned'} blocks; device: "
      f"{dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}",
      "",
      "| pass | remat | median ms | images/s | TFLOP/s (XLA count) | TFLOP/s (model) "
      "| peak GB | recompiled |",
      "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['mode']} | {r['remat']} | {r['error']} | | | | | |")
      continue
    peak = f"{r['peak'] / 2**30:.1f}" if r["peak"] else "n/a"
    lines.append(
        f"| {r['mode']} | {r['remat']} | {1e3 * r['seconds']:.1f} | "
        f"{r['images_per_s']:.2f} | {r['tflops_xla']:.3f} | {r['tflops_model']:.3f} | "
        f"{peak} | {'YES' if r['recompiled'] else 'no'} |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  config = TINY if args.tiny else mmdit.SD3_MEDIUM
  t0 = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)
  log(f"jax {jax.__version__}, devices {jax.devices()}")
  try:
    attn = check_attention(config, args)
  except Exception as e:  # e.g. no cuDNN fused attention for this shape: fall back
    attn = {"error": f"{args.attention_impl}: {str(e).splitlines()[0][:200]}"}
    args.attention_impl = "xla"
  log(f"attention relative error vs float32: {attn}")
  inputs = make_inputs(config, args)
  module = mmdit.from_diffusers_config(config, dtype=args.dtype, scan_layers=not args.unrolled)
  params = jax.block_until_ready(random_params(module, *inputs))
  n_params = sum(a.size for a in jax.tree_util.tree_leaves(params))
  log(f"params: {n_params:,} (float32)")
  rows = []
  plan = [("forward", "none")] + [("forward+backward", r.strip())
                                  for r in args.remat.split(",")]
  for mode, remat in plan:
    rows.append(bench(mode, remat, config, args, params, inputs))
    log(f"{mode} remat={remat}: {rows[-1]}")
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(rows=rows, attention_rel_err=attn, params=n_params,
                       device=jax.devices()[0].device_kind, jax=jax.__version__,
                       args=vars(args)), f, indent=1, default=str)
  print(markdown(rows, args, config))
  if any(r.get("recompiled") for r in rows):
    sys.exit("timed calls recompiled: the benchmark numbers include compile time")


if __name__ == "__main__":
  main()
