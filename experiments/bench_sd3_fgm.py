"""Speed and memory of one MM-DiT-FGM iteration at SD3-Medium shape on one accelerator.

    python experiments/bench_sd3_fgm.py                      # GPU: 512 px, 333 tokens, batch 4
    python experiments/bench_sd3_fgm.py --batch=2,4 --remat=dots,full
    python experiments/bench_sd3_fgm.py --tiny               # CPU smoke run of the same path

Runs the real step (fgm_jax.train.steps.fgm_step, as FGMTrainer jits it, state
donated): one online-flow update and one generator update per iteration, teacher with CFG
(conditional + unconditional pass), the frozen teacher held in bf16, generator and online
flow in fp32 with Adam (b1 = 0) and no EMA, the positional table frozen, bf16 compute,
cuDNN attention on GPUs. Random weights (std 0.02), random prompt embeddings.

Prints, per (remat, batch): median iteration time, generated images/s (batch / iteration),
model TFLOP/s at 13 forward-equivalents per image (experiments/sd3_memory_estimate.md), the
peak device memory, compile time, and whether a timed call traced again. An OOM is a row,
not a crash. No TensorFlow import (configs are not read).
"""

import argparse
import json
import os
import sys
import time
import types

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import bench_mmdit  # noqa: E402
from fgm_jax import sharding as sharding_lib  # noqa: E402
from fgm_jax.models import mmdit  # noqa: E402
from fgm_jax.train import optim  # noqa: E402
from fgm_jax.train import state as state_lib  # noqa: E402
from fgm_jax.train import steps  # noqa: E402

FORWARDS_PER_IMAGE = 13  # 4 (online update) + 9 (generator update with a CFG teacher)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--batch", default=None, help="comma list of batch sizes")
  p.add_argument("--remat", default="dots", help="comma list of none|dots|full")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--guidance", type=float, default=7.0)
  p.add_argument("--attention_impl", default="auto", choices=["auto", "xla", "cudnn"])
  p.add_argument("--unrolled", action="store_true",
                 help="scan_layers=False: one compiled copy per block (compare compile time)")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  args.batch = [int(b) for b in (args.batch or ("2" if args.tiny else "4")).split(",")]
  args.repeats = args.repeats or (2 if args.tiny else 5)
  args.latent, args.text_len = (16, 8) if args.tiny else (64, 333)
  if args.attention_impl == "auto":
    args.attention_impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  return args


def fgm_settings(guidance):
  return types.SimpleNamespace(
      t_star=1.0, online_steps=1, alpha=1.0, weighting="sid_norm", guidance=guidance,
      time_sampler="logit_normal", t_min=0.0, t_max=1.0, logit_mean=0.0, logit_std=1.0,
      shift=3.0)


def adam(lr=1e-5):
  return types.SimpleNamespace(lr=lr, b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0,
                               warmup_steps=0, grad_clip=0.0, ema_decay=0.0)


def build_state(teacher, tx):
  """Generator and online flow: fp32 copies of the (bf16) teacher, Adam states; no EMA.
  Eager (per leaf), so no jitted initialiser over ~600 leaves has to compile."""
  gen = jax.tree.map(lambda x: x.astype(jnp.float32), teacher)
  online = jax.tree.map(lambda x: x.astype(jnp.float32), teacher)
  return state_lib.FGMState(
      step=jnp.zeros((), jnp.int32), gen_params=gen, gen_opt_state=tx.init(gen),
      gen_ema_params=None, online_params=online, online_opt_state=tx.init(online))


def bench_one(config, args, remat, batch, teacher):
  module = mmdit.from_diffusers_config(config, dtype="bfloat16",
                                       attention_impl=args.attention_impl, remat=remat,
                                       scan_layers=not args.unrolled)
  mesh = sharding_lib.make_mesh()
  ctx = sharding_lib.ShardingContext(mesh, mmdit.LOGICAL_RULES)
  tx = optim.make_optimizer(adam(), mmdit.FROZEN_PARAMS)
  traces = [0]

  def step(state, teacher, cond, rng, null):
    traces[0] += 1
    return steps.fgm_step(state, teacher, cond, rng, null, model=module, gen_tx=tx,
                              online_tx=tx, fgm_config=fgm_settings(args.guidance),
                              batch_size=batch, shape=(args.latent, args.latent,
                                                       config["in_channels"]),
                              ema_decay=0.0, mesh=mesh)

  fn = ctx.jit(step, donate_argnums=0)
  kc, kp = jax.random.split(jax.random.PRNGKey(3))
  cond = {"context": jax.random.normal(kc, (batch, args.text_len, config["joint_attention_dim"]),
                                       jnp.bfloat16),
          "pooled": jax.random.normal(kp, (batch, config["pooled_projection_dim"]))}
  null = jax.tree.map(lambda x: jnp.zeros_like(x[:1]), cond)
  rng = jax.random.PRNGKey(0)
  row = dict(remat=remat, batch=batch)
  try:
    state = build_state(teacher, tx)
    t0 = time.perf_counter()
    state, metrics = fn(state, teacher, cond, rng, null)
    jax.block_until_ready(metrics)
    row["compile_s"] = time.perf_counter() - t0
    state, metrics = fn(state, teacher, cond, rng, null)  # warm-up
    jax.block_until_ready(metrics)
    traced = traces[0]
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      state, metrics = fn(state, teacher, cond, rng, null)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    times.sort()
    seconds = times[len(times) // 2]
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    n_img = (args.latent // config["patch_size"]) ** 2
    flops = FORWARDS_PER_IMAGE * bench_mmdit.analytic_flops(config, batch, n_img, args.text_len)
    row.update(seconds=seconds, images_per_s=batch / seconds,
               tflops_model=flops / seconds / 1e12, peak=bench_mmdit.peak_bytes(),
               retraced=traces[0] != traced, metrics=values)
    del state
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    row["error"] = ("OOM" if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
                    else (text.splitlines() or [type(e).__name__])[0][:200])
  return row


def table(rows, args, config, n_params):
  dev = jax.devices()[0]
  out = [f"MM-DiT-FGM iteration, {'tiny' if args.tiny else 'SD3-Medium'} MM-DiT "
         f"({n_params:,} params), latents {args.latent}x{args.latent}, {args.text_len} text "
         f"tokens, CFG {args.guidance}, attention={args.attention_impl}, "
         f"{'unrolled' if args.unrolled else 'scanned'} blocks; {dev.device_kind} "
         f"({jax.default_backend()}), jax {jax.__version__}", "",
         "| remat | batch | ms / iteration | generated images/s | TFLOP/s (13F) | peak GiB "
         "| compile s | retraced |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      out.append(f"| {r['remat']} | {r['batch']} | {r['error']} | | | | | |")
      continue
    peak = f"{r['peak'] / 2**30:.1f}" if r.get("peak") else "n/a"
    out.append(f"| {r['remat']} | {r['batch']} | {1e3 * r['seconds']:.0f} | "
               f"{r['images_per_s']:.2f} | {r['tflops_model']:.0f} | {peak} | "
               f"{r['compile_s']:.0f} | {'YES' if r['retraced'] else 'no'} |")
  return "\n".join(out)


def main(argv=None):
  args = parse_args(argv)
  config = bench_mmdit.TINY if args.tiny else mmdit.SD3_MEDIUM
  t0 = time.perf_counter()
  log = lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", flush=True)
  module = mmdit.from_diffusers_config(config, scan_layers=not args.unrolled)
  x, t, cond = mmdit.dummy_inputs(module, height=4, width=4)
  params = bench_mmdit.random_params(module, x, t, cond)
  n_params = sum(a.size for a in jax.tree.leaves(params))
  # Only the bf16 teacher stays: the trained nets are fp32 copies of it (as a bf16-held
  # teacher gives them in FGMTrainer), so no extra fp32 tree occupies memory.
  teacher = jax.block_until_ready(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
  del params
  log(f"random MM-DiT: {n_params:,} params on {jax.devices()[0].device_kind}")
  rows = []
  for remat in args.remat.split(","):
    for batch in args.batch:
      rows.append(bench_one(config, args, remat.strip(), batch, teacher))
      log(f"remat={remat} batch={batch}: {rows[-1]}")
      if args.json:
        with open(args.json, "w") as f:
          json.dump(dict(rows=rows, params=n_params, device=jax.devices()[0].device_kind,
                         jax=jax.__version__, args=vars(args)), f, indent=1, default=str)
  print(table(rows, args, config, n_params))


if __name__ == "__main__":
  main()
