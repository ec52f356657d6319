"""job=compile: compile a run's jitted functions ahead of time, for this machine or a TPU slice.

    python -m fgm_jax.main --config=configs/sd3_fgm.py --workdir=runs/aot \\
        --config.job=compile --config.aot.architecture=sd3-medium \\
        --config.aot.topology=v5p:2x2x1 --config.mesh.fsdp=4

Builds the run's train state as shapes only (no weights, data, teacher checkpoint or prompt
cache is read), lays it out on the config's mesh -- over this machine's devices, or over the
chips of a named TPU topology, which needs only libtpu (``pip install "jax[tpu]"``), not a
TPU -- and compiles exactly what the run jits: the train step (teacher step or FGM
iteration), the one-step generator and the teacher's sampler. Per function it prints the
compile time, the per-chip bytes (arguments, outputs, temporaries, code), whether they fit the
chip's memory, the FLOPs, the compiler's time estimate as images/s per chip and a share of the
chip's bf16 peak, and the collectives in the program; the same goes to <workdir>/aot.json.
A function that does not fit stops the job (exit status 2) with one line saying by how much and
what to change. Check that a config fits before renting the slice.

The time figures are the compiler's estimates, not measurements. XLA's cost analysis counts a
loop body once; the FLOPs here are counted from the traced program instead (matmuls and
convolutions, loop bodies times their trip count), and the compiler's time estimate is scaled
by the ratio of the two when they differ (scanned models, samplers' step loops).
"""

import collections
import dataclasses
import json
import os
import re
import time
from typing import Optional

import jax
from absl import logging
from jax.extend import core as jax_core

from fgm_jax import config_checks
from fgm_jax import sharding as sharding_lib
from fgm_jax import paths

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """What a TPU generation offers per chip (Google Cloud's published figures)."""
  name: str
  hbm_bytes: int
  bf16_flops: float  # peak dense bf16 FLOP/s


# Matched against jax's device_kind; also how the help lists topology names.
CHIPS = (
    ("TPU v4", Chip("v4", 32 * GIB, 275e12)),
    ("TPU v5 lite", Chip("v5e", 16 * GIB, 197e12)),
    ("TPU v5e", Chip("v5e", 16 * GIB, 197e12)),
    ("TPU v5", Chip("v5p", 95 * GIB, 459e12)),  # 'TPU v5' and 'TPU v5p'
    ("TPU v6 lite", Chip("v6e", 32 * GIB, 918e12)),
    ("TPU v6e", Chip("v6e", 32 * GIB, 918e12)),
)
EXAMPLE_TOPOLOGIES = ("v4:2x2x1 (4 chips)", "v5e:2x2 (v5e-4)", "v5e:4x4 (v5e-16)",
                      "v5p:2x2x1 (v5p-8: 4 chips)", "v6e:2x2 (v6e-4)", "v6e:2x4 (v6e-8)")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")


def chip_of(device) -> Optional[Chip]:
  kind = device.device_kind
  for prefix, chip in CHIPS:
    if kind == prefix or kind.startswith(prefix + " ") or kind == prefix + "p":
      return chip
  for prefix, chip in CHIPS:
    if kind.startswith(prefix):
      return chip
  return None


def device_memory(device) -> Optional[int]:
  """Bytes one device can hold: the TPU table, else what the runtime reports (GPUs)."""
  chip = chip_of(device)
  if chip is not None:
    return chip.hbm_bytes
  try:
    return (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # pylint: disable=broad-except  (CPU devices, topology-only devices)
    return None


def topology_devices(name: str):
  """The chips of TPU topology ``name`` ('v5p:2x2x1'), compiled for without a TPU."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # tests run several at once
  # Off a TPU VM libtpu finds no worker list and logs an error line about it: name this host.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  import importlib.util
  from jax.experimental import topologies
  if importlib.util.find_spec("libtpu") is None:
    raise config_checks.ConfigError(
        f"config.aot.topology={name!r} needs the TPU compiler, which is not installed; "
        f"pip install \"jax[tpu]=={jax.__version__}\" (no TPU needed).")
  try:
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu",
                                        **_host_bounds(name))
  except Exception as e:  # pylint: disable=broad-except
    lines = [l for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    raise config_checks.ConfigError(
        f"config.aot.topology={name!r} is not a TPU topology libtpu knows ({lines[-1]}); "
        f"e.g. {', '.join(EXAMPLE_TOPOLOGIES)}, or one chip: v6e:1x1.") from None
  return list(topo.devices)


def _host_bounds(name: str) -> dict:
  """libtpu's default host is 2x2x1 chips; a slice smaller than that (one chip, 'v6e:1x1',
  the single-chip hosts v5e/v6e are also sold as) is one host of its own shape."""
  dims = name.partition(":")[2].split("x")
  if not all(d.isdigit() for d in dims) or len(dims) > 3:
    return {}
  bounds = [int(d) for d in dims] + [1] * (3 - len(dims))
  return {"chips_per_host_bounds": tuple(bounds)} if bounds[0] * bounds[1] < 4 else {}


# ---------------------------------------------------------------------------- FLOP counting


def _size(shape) -> int:
  n = 1
  for d in shape:
    n *= d
  return n


def _dot_flops(eqn):
  lhs = eqn.invars[0].aval
  (contracting, _), _ = eqn.params["dimension_numbers"]
  return 2 * _size(eqn.outvars[0].aval.shape) * _size(lhs.shape[d] for d in contracting)


def _conv_flops(eqn):
  # Every output element is a dot over the kernel's window and its (per-group) input
  # channels: every kernel dimension but the output features.
  rhs = eqn.invars[1].aval
  out_features = eqn.params["dimension_numbers"].rhs_spec[0]
  window = _size(d for i, d in enumerate(rhs.shape) if i != out_features)
  return 2 * _size(eqn.outvars[0].aval.shape) * window


def _sub_jaxprs(eqn):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in eqn.params:
      yield eqn.params[key]
  for branch in eqn.params.get("branches", ()):
    yield branch


def jaxpr_flops(jaxpr) -> int:
  """2 x multiply-adds of every matmul and convolution, loop bodies times their trip count
  (scan length; fori-style while loops with a static bound). Elementwise work is not
  counted: on a TPU it hides under the matmuls."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    elif name == "while":
      total += _while_trips(eqn) * jaxpr_flops(eqn.params["body_jaxpr"])
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      total += sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn))
  return total


def _while_trips(eqn) -> int:
  # fori_loop(lo, hi) with literal bounds: the condition compares the counter to a literal.
  cond = eqn.params["cond_jaxpr"].jaxpr
  for e in cond.eqns:
    if e.primitive.name == "lt":
      for v in e.invars:
        if isinstance(v, jax_core.Literal):
          return int(v.val)
  return 1


# ---------------------------------------------------------------------------- one function


PROGRAM_OPS = ("convolution", "dot_general", "reduce", "is_finite", "broadcast_in_dim",
               "while", "rng_bit_generator", "threefry2x32", "custom_call")


def program_size(lowered_text: str, compiled_text: str) -> dict:
  """What makes a program big: op counts of the lowered StableHLO (before XLA's passes) and
  the compiled program's fusions and instructions."""
  ops = {op: len(re.findall(rf"\bstablehlo\.{op}\b", lowered_text)) for op in PROGRAM_OPS}
  ops["func_calls"] = len(re.findall(r"\bcall @", lowered_text))
  ops["compiled_fusions"] = len(re.findall(r"^\s*(?:ROOT )?%\S+ = .*? fusion\(", compiled_text,
                                           re.M))
  ops["compiled_instructions"] = len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", compiled_text, re.M))
  return {k: v for k, v in ops.items() if v}


def collectives(hlo_text: str) -> dict:
  """Count of each collective kind in a compiled program's HLO (async pairs counted once)."""
  counts = collections.Counter()
  for kind in COLLECTIVES:
    # The op name right before its operands (tuple-shaped results print '/*index=5*/'
    # comments, so the text between '=' and the op cannot be relied on).
    counts[kind] = len(re.findall(rf"(?<![\w%.-]){kind}(?:-start)?\(", hlo_text))
  return {k: v for k, v in counts.items() if v}


_OOM = re.compile(r"memory required for ([\w ]+?) \(([\d.]+)([KMGT])\) exceeds available "
                  r"HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def out_of_memory(message: str):
  """The TPU compiler's refusal ('... required for HLO temporaries (168.57G) exceeds
  available HBM (15.75G)') as {total_bytes, device_bytes, error}; None for other errors."""
  if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
    return None
  line = next((l for l in message.splitlines() if "memory" in l), message.splitlines()[0])
  m = _OOM.search(message)
  if m is None:
    return dict(error=line.strip()[:300])
  need = float(m.group(2)) * _UNITS[m.group(3)]
  have = float(m.group(4)) * _UNITS[m.group(5)]
  return dict(error=line.strip()[:300], total_bytes=int(need), device_bytes=int(have),
              required_for=m.group(1))


def compile_one(name, jitted, args, sharding, images):
  """Lowers and compiles one function; a dict of what the compiler says about it."""
  t0 = time.perf_counter()
  with sharding.active():
    traced = jitted.trace(*args)
    flops = jaxpr_flops(traced.jaxpr)
    lowered = traced.lower()
  t1 = time.perf_counter()
  n_dev = sharding.mesh.devices.size
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    over = out_of_memory(str(e))
    if over is None:
      raise
    return dict(name=name, lower_s=round(t1 - t0, 2),
                compile_s=round(time.perf_counter() - t1, 2), images=images, devices=n_dev,
                flops_per_chip=flops / n_dev, collectives={}, fits=False, **over)
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  row = dict(name=name, lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2),
             images=images, devices=n_dev)
  if mem is not None:
    row.update(argument_bytes=mem.argument_size_in_bytes,
               output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
               temp_bytes=mem.temp_size_in_bytes, code_bytes=mem.generated_code_size_in_bytes)
    # Donated arguments alias outputs: count those bytes once.
    row["total_bytes"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                          - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  xla_flops = float(cost.get("flops", 0.0) or 0.0)
  row.update(flops_per_chip=flops / n_dev, xla_flops_per_chip=xla_flops,
             xla_cost={k: float(v) for k, v in cost.items() if "{" not in k})
  seconds = cost.get("optimal_seconds")
  if seconds and seconds > 0:
    # XLA counts loop bodies once: scale its time by the FLOPs it missed.
    scale = max(1.0, (flops / n_dev) / xla_flops) if xla_flops > 0 else 1.0
    row.update(xla_optimal_s=float(seconds), estimated_step_s=float(seconds) * scale)
  compiled_text = compiled.as_text() or ""
  row["collectives"] = collectives(compiled_text)
  row["program"] = program_size(lowered.as_text(), compiled_text)
  row["state_leaves"] = len(jax.tree.leaves(args[0]))
  return row


def _fit_and_rate(row, device):
  chip = chip_of(device)
  memory = device_memory(device)
  if row.get("fits") is False:  # refused by the compiler: its own figures
    return row
  if memory is not None and "total_bytes" in row:
    row["device_bytes"] = memory
    row["fits"] = row["total_bytes"] <= memory
  if row.get("estimated_step_s"):
    per_chip = row["images"] / row["devices"]
    row["images_per_s_per_chip"] = per_chip / row["estimated_step_s"]
    if chip is not None:
      row["utilisation"] = row["flops_per_chip"] / row["estimated_step_s"] / chip.bf16_flops
  return row


def advice(row, config) -> str:
  """One line: by how much a function overshoots the chip, and what to change."""
  if "total_bytes" not in row:
    return f"{row['name']} does not fit: {row['error']}"
  over = (row["total_bytes"] - row["device_bytes"]) / GIB
  tips = [f"more chips over config.mesh.fsdp (now {config.mesh.fsdp}; the state shards over it)",
          f"a smaller config.batch_size (now {config.batch_size})"]
  model = config_checks.architecture(config)[0]
  field = ("config.teacher.model.remat" if config_checks.is_fgm(config)
           else "config.model.remat")
  if "remat" in model and isinstance(model.remat, bool) and not model.remat:
    tips.append(f"{field}=True (recompute each block in the backward pass)")
  elif "remat" in model and isinstance(model.remat, str) and model.remat != "full":
    tips.append(f"{field}='full' (now {model.remat!r})")
  what = f" for {row['required_for']}" if row.get("required_for") else ""
  return (f"{row['name']} needs {row['total_bytes'] / GIB:.2f} GiB per chip{what} but a chip "
          f"holds {row['device_bytes'] / GIB:.2f} GiB ({over:.2f} GiB over); try "
          + ", or ".join(tips) + ".")


# ---------------------------------------------------------------------------- the job


def _gib(n):
  return f"{n / GIB:.2f}" if n is not None else "-"


def table(rows, header) -> str:
  lines = [header, "",
           "| function | compile s | args GiB | out GiB | temp GiB | total GiB | code MB | fits "
           "| GFLOP/chip | est. img/s/chip | bf16 util | collectives |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  note = ("Time figures (img/s, utilisation) are the compiler's estimates, not measurements; "
          "memory is the compiler's per-chip plan.")
  for r in rows:
    fits = {True: "yes", False: "**NO**"}.get(r.get("fits"), "?")
    rate = f"{r['images_per_s_per_chip']:.1f}" if r.get("images_per_s_per_chip") else "-"
    util = f"{100 * r['utilisation']:.0f}%" if r.get("utilisation") else "-"
    coll = ", ".join(f"{k} {v}" for k, v in r["collectives"].items()) or "none"
    if "argument_bytes" not in r:  # refused by the compiler
      lines.append(f"| {r['name']} | {r['compile_s']:.1f} | | | | "
                   f"{_gib(r.get('total_bytes'))} needed | | **NO** | "
                   f"{r['flops_per_chip'] / 1e9:.1f} | | | |")
      continue
    lines.append(
        f"| {r['name']} | {r['compile_s']:.1f} | {_gib(r.get('argument_bytes'))} | "
        f"{_gib(r.get('output_bytes'))} | {_gib(r.get('temp_bytes'))} | "
        f"{_gib(r.get('total_bytes'))} | {r.get('code_bytes', 0) / 1e6:.1f} | {fits} | "
        f"{r['flops_per_chip'] / 1e9:.1f} | {rate} | {util} | {coll} |")
  return "\n".join(lines + ["", note])


def _devices(config):
  if config.aot.topology:
    return topology_devices(config.aot.topology)
  return jax.devices()


def run(config, workdir):
  devices = _devices(config)
  config_checks.validate(config, device_count=len(devices))
  mesh = sharding_lib.mesh_from_config(config.mesh, devices=devices)
  sample_batch = config.aot.sample_batch or config.batch_size
  config_checks.check_batch(sample_batch, sharding_lib.batch_device_count(mesh),
                            "config.aot.sample_batch")
  config, trainer = _build(config, workdir, mesh)
  targets = trainer.compile_targets(sample_batch)
  wanted = tuple(config.aot.functions) or tuple(targets)
  unknown = set(wanted) - set(targets)
  if unknown:
    raise config_checks.ConfigError(f"config.aot.functions names {sorted(unknown)}; this run "
                                    f"compiles {list(targets)}.")
  where = config.aot.topology or f"{len(devices)} local {devices[0].platform} device(s)"
  header = (f"{config.job} of {_describe(config)} for {where} ({devices[0].device_kind}), "
            f"mesh {dict(mesh.shape)}, batch {config.batch_size}, samplers {sample_batch}; "
            f"jax {jax.__version__}{_libtpu_version()}")
  print(header, flush=True)
  rows = []
  for name in wanted:
    jitted, args = targets[name]
    images = config.batch_size if name == "train_step" else sample_batch
    print(f"compiling {name} ...", flush=True)
    row = _fit_and_rate(compile_one(name, jitted, args, trainer.sharding, images), devices[0])
    rows.append(row)
    print(f"  {name}: {'compiled' if 'code_bytes' in row else 'refused'} in "
          f"{row['compile_s']:.1f} s, {_gib(row.get('total_bytes'))} GiB per chip, fits: "
          f"{row.get('fits', '?')}", flush=True)
    _write(workdir, config, header, rows, devices)
  print(table(rows, header), flush=True)
  too_big = [r for r in rows if r.get("fits") is False]
  if too_big:
    raise config_checks.ConfigError(" ".join(advice(r, config) for r in too_big))
  return rows


def _build(config, workdir, mesh):
  from fgm_jax.train import trainers
  return trainers.build_abstract(config, workdir, mesh)


def _describe(config):
  model = config_checks.architecture(config)[0]
  kind = "FGM" if config_checks.is_fgm(config) else "teacher"
  dtype = f" (dtype {model.dtype})" if "dtype" in model else ""  # the MLP has no dtype field
  return f"{kind} {model.name}{dtype}"


def _libtpu_version():
  try:
    from importlib import metadata
    return f", libtpu {metadata.version('libtpu')}"
  except Exception:  # pylint: disable=broad-except
    return ""


def _write(workdir, config, header, rows, devices):
  if jax.process_index() != 0:
    return
  paths.makedirs(workdir)
  path = os.path.join(workdir, config.aot.output)
  out = dict(header=header, topology=config.aot.topology, device_kind=devices[0].device_kind,
             num_devices=len(devices), device_bytes=device_memory(devices[0]),
             jax=jax.__version__, libtpu=_libtpu_version().split(" ")[-1] or None,
             config=json.loads(config.to_json_best_effort()), functions=rows,
             note="time figures are the compiler's estimates, not measurements")
  paths.write_text(path, json.dumps(out, indent=1, default=str))  # whole; a disk or gs://
  logging.info("wrote %s", path)
