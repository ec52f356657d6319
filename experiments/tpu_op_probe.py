"""Code size and compile time of single ops on a TPU topology (libtpu, no TPU).

    .venv/bin/python experiments/tpu_op_probe.py conv3 --batch=8 --c=16 --hw=32 --dtype=float32
"""
import argparse
import json
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

p = argparse.ArgumentParser()
p.add_argument("op")
p.add_argument("--batch", type=int, default=8)
p.add_argument("--c", type=int, default=16)
p.add_argument("--hw", type=int, default=32)
p.add_argument("--dtype", default="float32")
p.add_argument("--n", type=int, default=1, help="repeat the op n times in sequence")
p.add_argument("--devices", type=int, default=1)
a = p.parse_args()
devs = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
mesh = Mesh(np.array(devs[:a.devices]), ("data",))
dt = jnp.dtype(a.dtype)
B, C, H = a.batch * a.devices, a.c, a.hw
x = jax.ShapeDtypeStruct((B, H, H, C), dt, sharding=NamedSharding(mesh, P("data")))
rep = NamedSharding(mesh, P())
DN = ("NHWC", "HWIO", "NHWC")


def conv(x, w, pad):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=DN)


def gn(x):
  g = min(32, x.shape[-1] // 4)
  y = x.reshape(x.shape[:-1] + (g, -1)).astype(jnp.float32)
  m = y.mean(axis=(1, 2, 4), keepdims=True)
  v = jnp.square(y - m).mean(axis=(1, 2, 4), keepdims=True)
  return ((y - m) * jax.lax.rsqrt(v + 1e-6)).reshape(x.shape).astype(x.dtype)


def attn(x):
  b, h, w, c = x.shape
  q = x.reshape(b, 1, h * w, c)
  l = jnp.einsum("bhqd,bhkd->bhqk", q, q, preferred_element_type=jnp.float32)
  s = jax.nn.softmax(l, axis=-1).astype(x.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", s, q).reshape(x.shape)


ops = {
    "conv3": (lambda x, w: conv(x, w, 1), (3, 3, C, C)),
    "conv1": (lambda x, w: conv(x, w, 0), (1, 1, C, C)),
    "gn": (lambda x, w: gn(x), None),
    "gn_silu": (lambda x, w: jax.nn.silu(gn(x)), None),
    "attn": (lambda x, w: attn(x), None),
    "ew": (lambda x, w: jax.nn.silu(x) * 2 + 1, None),
}
base = a.op
for suffix in ("_wgrad_mm", "_wgrad", "_xgrad", "_grad"):
  base = base[:-len(suffix)] if base.endswith(suffix) else base
f, wshape = ops[base]
w = jax.ShapeDtypeStruct(wshape or (1,), dt, sharding=rep)


def body(x, w):
  for _ in range(a.n):
    x = f(x, w)
  return x


def wgrad_mm(x, g):
  # dW[kh, kw] = sum over (b, h, w) of x_pad[b, h + kh, w + kw, :]^T g[b, h, w, :]: nine matmuls
  # instead of one windowed convolution.
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w_ = x.shape[1], x.shape[2]
  return jnp.stack([jnp.stack([
      jnp.einsum("bhwi,bhwo->io", xp[:, i:i + h, j:j + w_], g, preferred_element_type=jnp.float32)
      for j in range(3)]) for i in range(3)])


fn = body
if a.op == "conv3_wgrad":  # weight gradient only, as autodiff writes it
  fn = lambda x, w: jax.vjp(lambda w: conv(x, w, 1), w)[1](x)[0]
  w = jax.ShapeDtypeStruct((3, 3, C, C), dt, sharding=rep)
elif a.op == "conv3_xgrad":  # input gradient only
  fn = lambda x, w: jax.vjp(lambda x: conv(x, w, 1), x)[1](x)[0]
  w = jax.ShapeDtypeStruct((3, 3, C, C), dt, sharding=rep)
elif a.op == "conv3_wgrad_mm":
  fn = lambda x, w: wgrad_mm(x, x)
elif a.op.endswith("_grad"):
  fn = lambda x, w: jax.grad(lambda x, w: jnp.sum(body(x, w).astype(jnp.float32) ** 2), (0, 1))(x, w)
t0 = time.perf_counter()
lowered = jax.jit(fn).lower(x, w)
compiled = lowered.compile()
t1 = time.perf_counter()
m = compiled.memory_analysis()
print(json.dumps(dict(op=a.op, batch=a.batch, c=C, hw=H, dtype=a.dtype, n=a.n, devices=a.devices,
                      compile_s=round(t1 - t0, 2),
                      code_kb=round(m.generated_code_size_in_bytes / 1e3, 1))), flush=True)
