"""Speed of the CIFAR-10 U-Net FGM iteration, the teacher's flow-matching step and sampling.

    python experiments/bench_unet.py                                  # GPU: batch 128, bf16
    python experiments/bench_unet.py --batch=128,256 --precision=bf16,fp32 \\
        --what=iteration,sample,teacher --sample_batch=1024 --json=out.json
    python experiments/bench_unet.py --tiny                           # CPU smoke run

Builds the states of configs/cifar10_fgm.py (EDM DDPM++ U-Net, 55.7 M parameters per
network, 32x32x3) with random weights: no data, no teacher workdir. What it times:

* iteration: ``FGMTrainer.train_step`` (one online-flow update + one generator update,
  the frozen teacher passed in), exactly what the training loop calls;
* teacher: ``TeacherTrainer.train_step`` (rectified flow matching), fed synthetic batches
  through the trainer's own prefetching data path;
* sample: the one-step generator (the trainer's sampling function), noise already on device.

Each row: median step time over --steps calls after --warmup calls (each call waited with
``block_until_ready``), the mean of --steps calls dispatched back to back (as the training loop
runs them), generated images/s (batch / median), XLA's FLOP count of one call (its cost
analysis of the lowered program) divided by the median time, that as a fraction of
--peak_tflops (default 989: the H100 SXM's dense bf16 tensor-core rate on its spec sheet; the
issue's roofline uses the 790 TFLOP/s measured for bf16 matmuls), the process's peak device
memory so far (``memory_stats``; rows run in the order given, so it is cumulative), and
whether the timed calls traced again (a retrace is a bug; the run then exits non-zero).

--precision: bf16 sets ``config.teacher.model.dtype = 'bfloat16'`` (fp32 parameters and Adam
state, bf16 convolutions/matmuls, fp32 GroupNorm statistics, softmax and losses); fp32 leaves
it float32 (on GPUs XLA's default matmul precision then allows TF32).
--tiny: the configs' ':runlocal' U-Net (16 channels, one level) at batch 8, for a CPU check.
Imports no TensorFlow (checked at the end of every run).
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
from configs import cifar10_fgm  # noqa: E402
from configs import cifar10_teacher  # noqa: E402
from fgm_jax import sharding as sharding_lib  # noqa: E402
from fgm_jax.train import steps  # noqa: E402
from fgm_jax.train import trainers  # noqa: E402

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
WHATS = ("iteration", "sample", "teacher")
# The issue's FLOP accounting: 42.4 GFLOP per DDPM++ forward at 32x32; one FGM iteration is
# about 11 forwards per generated image (online update 4, generator update 7).
ISSUE_GFLOP_PER_ITERATION_IMAGE = 11 * 42.4


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="tiny U-Net at batch 8 (CPU check)")
  p.add_argument("--batch", default=None, help="comma list of global batch sizes")
  p.add_argument("--sample_batch", default=None, help="comma list for --what=sample "
                 "(default: --batch)")
  p.add_argument("--precision", default="bf16", help="comma list of bf16|fp32")
  p.add_argument("--what", default="iteration,sample,teacher",
                 help=f"comma list of {'|'.join(WHATS)}")
  p.add_argument("--steps", type=int, default=None, help="timed calls per row")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
  p.add_argument("--peak_tflops", type=float, default=989.0,
                 help="the card's peak rate for the utilisation column")
  p.add_argument("--hlo_dir", default=None,
                 help="write each row's optimised HLO here (to check dtypes on the card)")
  p.add_argument("--profile_dir", default=None,
                 help="jax.profiler trace of 3 back-to-back calls of each row's program")
  p.add_argument("--json", default=None,
                 help="append every row to this JSON file (rows of earlier runs are kept)")
  p.add_argument("--table", default=None,
                 help="only print the table of these comma-separated JSON files")
  args = p.parse_args(argv)
  args.batch = args.batch or ("8" if args.tiny else "128")
  args.sample_batch = args.sample_batch or args.batch
  args.steps = args.steps or (3 if args.tiny else 10)
  ints = lambda s: [int(b) for b in s.split(",") if b.strip()]
  args.batches, args.sample_batches = ints(args.batch), ints(args.sample_batch)
  args.precisions = [w.strip() for w in args.precision.split(",") if w.strip()]
  args.whats = [w.strip() for w in args.what.split(",") if w.strip()]
  for name, words, known in (("--precision", args.precisions, DTYPES),
                             ("--what", args.whats, WHATS)):
    unknown = [w for w in words if w not in known]
    if unknown or not words:
      p.error(f"{name}={','.join(words)}: choose from {', '.join(known)}")
  return args


# ----------------------------------------------------------------------------- states


def fgm_config(tiny, batch, precision):
  c = cifar10_fgm.get_config("runlocal" if tiny else "")
  c.batch_size = batch
  c.teacher.model.dtype = DTYPES[precision]
  return c


def random_params(abstract, seed=0):
  """Random float32 weights with every layer active (EDM's init zeroes the residual
  branches' last convs): kernels N(0, 1/fan_in), GroupNorm scales ~1, other vectors small.
  NumPy draws: nothing is compiled for them."""
  rng = np.random.default_rng(seed)

  def draw(path, a):
    noise = rng.standard_normal(a.shape, np.float32)
    if a.ndim >= 2:
      return noise / np.float32(np.sqrt(np.prod(a.shape[:-1])))
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return 1.0 + 0.1 * noise
    return 0.1 * noise
  return jax.tree_util.tree_map_with_path(draw, abstract)


class SyntheticImages:
  """A data source (fgm_jax.data's interface) of N(0, 0.5^2) images clipped to [-1, 1]."""

  def __init__(self, shape):
    self.shape = tuple(shape)

  def batch(self, step, global_batch, process_index=0, process_count=1):
    rng = np.random.default_rng(step)
    n = global_batch // process_count
    return np.clip(0.5 * rng.standard_normal((n,) + self.shape, np.float32), -1, 1)


class SyntheticTeacherTrainer(trainers.TeacherTrainer):
  """The teacher trainer with synthetic data in place of tfds."""

  @property
  def data(self):
    return SyntheticImages(self.shape)


# ----------------------------------------------------------------------------- measuring


def xla_flops(jitted, args, context):
  with context.active():
    cost = jitted.lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def write_hlo(jitted, args, context, path):
  with context.active():
    text = jitted.lower(*args).compile().as_text()
  with open(path, "w") as f:
    f.write(text)


def row_dir(root, what, precision, batch):
  return None if root is None else os.path.join(root, f"{what}_{precision}_b{batch}")


def peak_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def time_loop(call, carry, warmup, steps, start=1, profile_dir=None):
  """(median seconds per waited call, mean seconds per call dispatched back to back, carry).
  ``call(carry, i) -> carry`` for i = start, start + 1, ... (the step after the compiling
  call); the carry (a donated train state) threads through."""
  i = start
  for _ in range(warmup):
    carry = jax.block_until_ready(call(carry, i))
    i += 1
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    carry = jax.block_until_ready(call(carry, i))
    times.append(time.perf_counter() - t0)
    i += 1
  t0 = time.perf_counter()
  for _ in range(steps):
    carry = call(carry, i)
    i += 1
  carry = jax.block_until_ready(carry)
  pipelined = (time.perf_counter() - t0) / steps
  if profile_dir:  # after timing: tracing slows the calls it records
    with jax.profiler.trace(profile_dir):
      for _ in range(3):
        carry = call(carry, i)
        i += 1
      carry = jax.block_until_ready(carry)
  return statistics.median(times), pipelined, carry


def bench_iteration(args, batch, precision, mesh):
  config = fgm_config(args.tiny, batch, precision)
  layout = trainers.FGMTrainer(config, mesh)  # shapes only: nothing compiled
  teacher = random_params(layout.abstract_state.gen_params)
  trainer = trainers.FGMTrainer(config, mesh, teacher_params=teacher)
  state = trainer.init_state()
  step_args = (state, trainer.frozen_teacher, None, trainer.keys.fgm_step, None)
  if args.hlo_dir:
    write_hlo(trainer._step.jitted, step_args, trainer.sharding,
              os.path.join(args.hlo_dir, f"iteration_{precision}_b{batch}.hlo.txt"))
  return time_train_steps(args, trainer, step_args, "iteration", precision, batch)


def time_train_steps(args, trainer, step_args, what, precision, batch):
  """Compile time, median and pipelined step time, XLA FLOPs and a retrace flag for
  ``trainer.train_step``, whose jitted function takes ``step_args``."""
  flops = xla_flops(trainer._step.jitted, step_args, trainer.sharding)
  t0 = time.perf_counter()
  state, _ = jax.block_until_ready(trainer.train_step(step_args[0], 0))
  compile_s = time.perf_counter() - t0
  traces = dict(trainer.traces)
  step = lambda carry, i: trainer.train_step(carry[0], i)
  median, pipelined, _ = time_loop(step, (state, None), args.warmup, args.steps,
                                   profile_dir=row_dir(args.profile_dir, what, precision, batch))
  return dict(compile_s=compile_s, seconds=median, pipelined_s=pipelined, flops=flops,
              retraced=dict(trainer.traces) != traces)


def bench_teacher(args, batch, precision, mesh):
  config = cifar10_teacher.get_config("runlocal" if args.tiny else "")
  config.batch_size = batch
  config.model.dtype = DTYPES[precision]
  trainer = SyntheticTeacherTrainer(config, mesh)
  state = trainer.init_state()
  example = jnp.zeros((batch,) + trainer.shape, jnp.float32)
  row = time_train_steps(args, trainer, (state, example, trainer.keys.teacher_step), "teacher",
                         precision, batch)
  trainer.close()
  return row


def bench_sample(args, batch, precision, mesh):
  config = fgm_config(args.tiny, batch, precision)
  layout = trainers.FGMTrainer(config, mesh)
  params = jax.device_put(random_params(layout.abstract_state.gen_params, seed=1))
  traces = [0]

  def generate(params, z):
    traces[0] += 1  # runs only while tracing
    return steps.generate(layout.model, params, z, config.fgm.t_star)

  fn = jax.jit(generate)
  z = jax.random.normal(jax.random.PRNGKey(0), (batch,) + layout.shape)
  lowered = fn.lower(params, z)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", float("nan")))
  if args.hlo_dir:
    with open(os.path.join(args.hlo_dir, f"sample_{precision}_b{batch}.hlo.txt"), "w") as f:
      f.write(lowered.compile().as_text())
  t0 = time.perf_counter()
  jax.block_until_ready(fn(params, z))
  compile_s = time.perf_counter() - t0
  before = traces[0]
  median, pipelined, _ = time_loop(lambda carry, i: fn(params, z), None, args.warmup,
                                   args.steps,
                                   profile_dir=row_dir(args.profile_dir, "sample", precision,
                                                      batch))
  return dict(compile_s=compile_s, seconds=median, pipelined_s=pipelined, flops=flops,
              retraced=traces[0] != before)


BENCHES = {"iteration": bench_iteration, "teacher": bench_teacher, "sample": bench_sample}


def run_row(args, what, batch, precision, mesh):
  try:
    r = BENCHES[what](args, batch, precision, mesh)
  except Exception as e:  # e.g. RESOURCE_EXHAUSTED at a large batch: report, go on
    msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      msg = "OOM"
    return dict(what=what, batch=batch, precision=precision, error=msg)
  r.update(what=what, batch=batch, precision=precision, images_per_s=batch / r["seconds"],
           tflops=r["flops"] / r["seconds"] / 1e12, peak=peak_bytes(),
           gflop_per_image=r["flops"] / batch / 1e9)
  r["utilisation"] = r["tflops"] / args.peak_tflops
  r["retraced"] = bool(r["retraced"])
  return r


def markdown(rows, args):
  first = rows[0] if rows else {}
  lines = [
      f"U-Net {'tiny (:runlocal)' if args.tiny else 'CIFAR-10 DDPM++'}; device: "
      f"{first.get('device', jax.devices()[0].device_kind)}, jax "
      f"{first.get('jax', jax.__version__)}; median of {first.get('steps', args.steps)} waited "
      f"calls after warm-up; utilisation vs {first.get('peak_tflops', args.peak_tflops):g} "
      "TFLOP/s",
      "",
      "| what | precision | batch | median ms | back-to-back ms | images/s | GFLOP/image (XLA)"
      " | TFLOP/s | utilisation | peak GiB | compile s | retraced |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['what']} | {r['precision']} | {r['batch']} | {r['error']} |"
                   + " |" * 8)
      continue
    peak = f"{r['peak'] / 2**30:.2f}" if r["peak"] else "n/a"
    lines.append(
        f"| {r['what']} | {r['precision']} | {r['batch']} | {1e3 * r['seconds']:.2f} | "
        f"{1e3 * r['pipelined_s']:.2f} | {r['images_per_s']:.1f} | "
        f"{r['gflop_per_image']:.2f} | {r['tflops']:.2f} | {100 * r['utilisation']:.1f}% | "
        f"{peak} | {r['compile_s']:.1f} | {'YES' if r['retraced'] else 'no'} |")
  if not args.tiny:
    lines.append(f"\n(The issue counts {ISSUE_GFLOP_PER_ITERATION_IMAGE:.0f} GFLOP per "
                 "generated image and iteration; its target is >= 642 images/s at batch 128, "
                 "bf16, on one H100.)")
  return "\n".join(lines)


def load_rows(paths):
  rows = []
  for path in paths:
    if os.path.exists(path):
      with open(path) as f:
        rows += json.load(f)["rows"]
  return rows


def main(argv=None):
  args = parse_args(argv)
  if args.table:
    print(markdown(load_rows(args.table.split(",")), args))
    return
  t0 = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)
  log(f"jax {jax.__version__}, devices {jax.devices()}")
  if args.hlo_dir:
    os.makedirs(args.hlo_dir, exist_ok=True)
  mesh = sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1])  # one device: per-card numbers
  plan = [(what, batch, precision) for precision in args.precisions for what in args.whats
          for batch in (args.sample_batches if what == "sample" else args.batches)]
  earlier = load_rows([args.json]) if args.json else []
  rows = []
  for what, batch, precision in plan:
    rows.append(run_row(args, what, batch, precision, mesh))
    rows[-1].update(device=jax.devices()[0].device_kind, jax=jax.__version__,
                    steps=args.steps, peak_tflops=args.peak_tflops)
    log(f"{what} {precision} batch {batch}: " + json.dumps(rows[-1], default=str))
    if args.json:  # after every row: a later OOM or timeout keeps what ran
      with open(args.json, "w") as f:
        json.dump(dict(rows=earlier + rows), f, indent=1, default=str)
  print(markdown(rows, args))
  loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow",
                                                               "tensorflow_datasets"))
  if loaded:
    sys.exit(f"TensorFlow was imported ({loaded[:3]}...): the benchmark must not need it")
  if any(r.get("retraced") for r in rows):
    sys.exit("timed calls traced again: the numbers include compile time")


if __name__ == "__main__":
  main()
