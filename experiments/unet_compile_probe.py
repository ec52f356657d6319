"""Compile one U-Net function for a TPU topology (libtpu, no TPU) and print compile time,
code size and op counts: a probe for what makes the FGM iteration's TPU program big.

    .venv/bin/python experiments/unet_compile_probe.py --mode=fwd --batch=32 \
        --model="dict(model_channels=16, channel_mult=(1,), num_blocks=1, attn_resolutions=(32,))"

modes: fwd (forward), xgrad (gradient w.r.t. the input), pgrad (w.r.t. the parameters),
gen_loss (the FGM generator loss and its parameter gradient: 3 forwards, 3 backwards).
--patch: comma-separated experiment switches (no_groupnorm, ...), see PATCHES.
"""

import argparse
import ast
import json
import os
import re
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fgm_jax import aot  # noqa: E402
from fgm_jax import fgm  # noqa: E402
from fgm_jax.models import unet  # noqa: E402


def _patch(names):
  import flax.linen as nn
  for name in names:
    if name == "no_groupnorm":  # GroupNorm -> identity (still a param-free op)
      unet._group_norm = lambda x, name, dtype, eps=1e-6: x.astype(dtype)
    elif name == "layernorm":  # GroupNorm -> per-pixel LayerNorm over channels
      unet._group_norm = lambda x, name, dtype, eps=1e-6: nn.LayerNorm(
          epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)(x)
    elif name:
      raise ValueError(name)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--mode", default="fwd")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--model", default="dict()")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--topology", default="v5e:2x2")
  p.add_argument("--devices", type=int, default=4, help="batch-sharded over this many chips")
  p.add_argument("--patch", default="")
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--json", default="")
  a = p.parse_args()
  _patch(a.patch.split(","))
  config = unet.default_config()
  config.update(dict(dropout=0.0, augment_dim=0))
  config.update(ast.literal_eval(a.model.replace("dict(", "{").replace(")", "}")) if False else
             eval(a.model, {"dict": dict}))
  config.dtype = a.dtype
  model = unet.from_config(config)
  devs = topologies.get_topology_desc(topology_name=a.topology, platform="tpu").devices
  mesh = Mesh(np.array(devs[:a.devices]), ("data",))
  rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  x = jax.ShapeDtypeStruct((a.batch, a.size, a.size, 3), jnp.float32, sharding=bat)
  t = jax.ShapeDtypeStruct((a.batch,), jnp.float32, sharding=bat)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, a.size, a.size, 3)),
                                             jnp.zeros((1,)))["params"])
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), params)
  n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(params))

  def v(pp, xx, tt):
    return model.apply({"params": pp}, xx, tt)

  if a.mode == "fwd":
    fn, args = v, (params, x, t)
  elif a.mode == "xgrad":
    fn = lambda pp, xx, tt: jax.grad(lambda u: jnp.sum(v(pp, u, tt) ** 2))(xx)
    args = (params, x, t)
  elif a.mode == "pgrad":
    fn = lambda pp, xx, tt: jax.grad(lambda q: jnp.sum(v(q, xx, tt) ** 2))(pp)
    args = (params, x, t)
  elif a.mode == "gen_loss":
    def fn(gp, tp, op, z, eps, tt):
      def loss(q):
        x0 = fgm.generator_sample(lambda u, s: v(q, u, s), z, 0.999)
        return fgm.generator_loss(lambda u, s: v(tp, u, s), lambda u, s: v(op, u, s),
                                  x0, eps, tt)
      return jax.grad(loss)(gp)
    args = (params, params, params, x, x, t)
  elif a.mode in ("update", "finite", "finite_concatenated"):
    # The FGM step's state bookkeeping alone: Adam (b1 = 0) on the generator and the online
    # flow, the generator EMA, and state_finite over the whole new state.
    import optax
    from fgm_jax.train import steps
    tx = optax.adamw(1e-5, b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0)
    opt = jax.eval_shape(tx.init, params)
    opt = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), opt)
    finite = steps.state_finite

    def fn(gp, ema, op, gopt, oopt, gg, og):
      if a.mode != "update":
        return finite((gp, ema, op, gopt, oopt))
      u, gopt = tx.update(gg, gopt, gp)
      gp = optax.apply_updates(gp, u)
      u, oopt = tx.update(og, oopt, op)
      op = optax.apply_updates(op, u)
      ema = jax.tree.map(lambda e, q: 0.9999 * e + (1 - 0.9999) * q, ema, gp)
      state = (gp, ema, op, gopt, oopt)
      return state, steps.state_finite(state)
    args = (params, params, params, opt, opt, params, params)
  else:
    raise ValueError(a.mode)
  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  t1 = time.perf_counter()
  c1 = time.process_time()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  cpu_s = time.process_time() - c1
  mem = compiled.memory_analysis()
  prog = aot.program_size(lowered.as_text(), compiled.as_text() or "")
  row = dict(mode=a.mode, batch=a.batch, dtype=a.dtype, model=a.model, patch=a.patch,
             devices=a.devices, params=n_params, lower_s=round(t1 - t0, 1),
             compile_s=round(t2 - t1, 1), compile_cpu_s=round(cpu_s, 1),
             load=round(os.getloadavg()[0], 1), code_mb=round(mem.generated_code_size_in_bytes / 1e6, 1),
             temp_mb=round(mem.temp_size_in_bytes / 1e6, 1), **prog)
  print(json.dumps(row), flush=True)
  if a.json:
    with open(a.json, "a") as f:
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
