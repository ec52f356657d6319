"""bfloat16 compute (``config.teacher.model.dtype``) tracks float32 FGM training on a tiny U-Net.

Both runs start from the same random teacher (so the same generator, online net and Adam
state) and draw the same noise at every step (keyed by step); they differ only in the compute
dtype of the three networks. The reference is the float32 run itself: after ITERATIONS
iterations the bfloat16 run's loss curves and parameters must still be close to it, and must
differ from it (the switch is not a no-op). Measured on CPU (XLA's CPU backend computes bf16
convolutions in f32 and rounds at op boundaries, as the GPU's f32-accumulating bf16 tensor
cores do), 100 iterations, unoptimised XLA (tests/xla_flags.py): online loss per step within
0.63 %, generator loss (20-step means) within 1.4 % of its mean size, parameters 0.21 % apart
(relative), generator updates 8.3 % apart with cosine 0.997. The tolerances below leave
1.6-7x room.

Also checks, from the lowered StableHLO of the bfloat16 network, which ops run in which dtype.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_fgm
from fgm_jax import sharding as sharding_lib
from fgm_jax.models import unet
from fgm_jax.train import trainers

ITERATIONS = 100


def config(dtype):
  """digits_fgm (8x8x1, Adam b1 = 0, lr 3e-4) with a one-level tiny U-Net: one compile is
  cheap, and it still has GroupNorm and attention (its middle block always attends)."""
  c = digits_fgm.get_config()
  c.teacher.model = unet.tiny(channel_mult=(1,), attn_resolutions=(), dropout=0.0,
                              dtype=dtype)
  c.batch_size = 8
  return c


def random_teacher(abstract):
  """A teacher whose every layer is active (EDM's init zeroes the residual branches' last
  convs, which would make the net almost the identity): kernels ~ N(0, 1/fan_in), GroupNorm
  scales ~ 1, other vectors ~ N(0, 0.1^2). NumPy draws: nothing to compile."""
  rng = np.random.default_rng(0)

  def draw(path, a):
    noise = rng.standard_normal(a.shape).astype(np.float32)
    if a.ndim >= 2:
      return noise / np.sqrt(np.prod(a.shape[:-1]))
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return 1.0 + 0.1 * noise
    return 0.1 * noise
  return jax.tree_util.tree_map_with_path(draw, abstract)


def run(dtype, mesh, teacher):
  trainer = trainers.FGMTrainer(config(dtype), mesh, teacher_params=teacher)
  state = trainer.init_state()
  history = []
  for step in range(ITERATIONS):
    state, metrics = trainer.train_step(state, step)
    history.append(metrics)  # read after the loop: no host sync between steps
  history = jax.device_get(history)
  curves = {k: np.array([h[k] for h in history]) for k in ("online_loss", "generator_loss")}
  return trainer, jax.device_get(state), curves


@pytest.fixture(scope="module")
def runs():
  mesh = sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1])
  layout = trainers.FGMTrainer(config("float32"), mesh)  # shapes only, compiles nothing
  teacher = random_teacher(layout.abstract_state.gen_params)
  return {"teacher": teacher, "float32": run("float32", mesh, teacher),
          "bfloat16": run("bfloat16", mesh, teacher)}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_each_step_compiled_once(runs):
  for dtype in ("float32", "bfloat16"):
    trainer = runs[dtype][0]
    assert trainer.traces["train_step"] == 1, (dtype, dict(trainer.traces))


def test_bf16_loss_curves_track_fp32(runs):
  ref, got = runs["float32"][2], runs["bfloat16"][2]
  online = np.abs(got["online_loss"] - ref["online_loss"]) / np.abs(ref["online_loss"])
  assert online.max() < 1e-2, online.max()
  # The generator loss crosses zero step to step: compare 20-step means, relative to the
  # loss's typical size.
  size = np.mean(np.abs(ref["generator_loss"]))
  window = lambda x: x.reshape(-1, 20).mean(axis=1)
  gen = np.abs(window(got["generator_loss"]) - window(ref["generator_loss"])) / size
  assert gen.max() < 0.1, gen
  assert online.max() > 0, "bfloat16 run equals the float32 one: the dtype switch is ignored"


def test_bf16_parameters_track_fp32(runs):
  start = _flat(runs["teacher"])
  for tree in ("gen_params", "online_params"):
    ref = _flat(getattr(runs["float32"][1], tree))
    got = _flat(getattr(runs["bfloat16"][1], tree))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2, tree
    # The updates themselves (where Adam's normalised steps could let bf16 noise dominate):
    # same direction, close in size.
    d_ref, d_got = ref - start, got - start
    assert np.linalg.norm(d_got - d_ref) / np.linalg.norm(d_ref) < 0.25, tree
    assert d_got @ d_ref / (np.linalg.norm(d_got) * np.linalg.norm(d_ref)) > 0.98, tree
    # Parameters and optimizer state stay float32.
    assert {x.dtype for x in jax.tree.leaves(getattr(runs["bfloat16"][1], tree))} == {
        np.dtype(np.float32)}
  assert {x.dtype for x in jax.tree.leaves(runs["bfloat16"][1].gen_opt_state)
          if x.ndim} == {np.dtype(np.float32)}


def _op_dtypes(text):
  """(op, result dtype) -> count, from StableHLO text (the last type on an op's line)."""
  counts = collections.Counter()
  for line in text.splitlines():
    m = re.search(r"stablehlo\.(convolution|dot_general|rsqrt|exponential)\b.*"
                  r"tensor<[^>]*x(bf16|f32)>\s*$", line)
    if m:
      counts[m.groups()] += 1
  return counts


def test_bf16_network_ops(runs):
  """Convolutions bf16; GroupNorm (rsqrt of the variance) and softmax exponentials f32; the
  float32 dots are the mapping network's and the attention logits (bf16 operands)."""
  trainer, _, _ = runs["bfloat16"]
  x = jnp.zeros((2, 8, 8, 1))
  t = jnp.zeros((2,))
  text = jax.jit(lambda p: trainer.model.apply({"params": p}, x, t)).lower(
      runs["teacher"]).as_text()
  ops = _op_dtypes(text)
  assert ops[("convolution", "bf16")] > 0 and ops[("convolution", "f32")] == 0, ops
  assert ops[("rsqrt", "f32")] > 0 and ops[("rsqrt", "bf16")] == 0, ops
  assert ops[("exponential", "f32")] > 0, ops
  assert ops[("dot_general", "bf16")] > 0, ops  # the attention's qkv / proj and affine maps
  f32_dots = [line for line in text.splitlines()
              if "stablehlo.dot_general" in line and line.rstrip().endswith("f32>")]
  logits = [line for line in f32_dots if "xbf16>, tensor<" in line]
  assert len(logits) == 1, f32_dots  # the middle block's q.k: bf16 operands, f32 result
  assert len(f32_dots) == 1 + 2, f32_dots  # + map_layer0, map_layer1 (float32 by design)
