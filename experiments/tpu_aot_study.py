"""The TPU scale tables: real-size steps compiled for TPU slices on this machine (job=compile).

    python experiments/tpu_aot_study.py sd3 runs/tpu_aot          # SD3-Medium FGM, batch search
    python experiments/tpu_aot_study.py depth runs/tpu_aot        # compile time vs MM-DiT depth
    python experiments/tpu_aot_study.py cifar runs/tpu_aot        # CIFAR-10 FGM/teacher/sampling
    python experiments/tpu_aot_study.py lora runs/tpu_aot v6e-1 32 dots 4   # SD3 LoRA FGM
    python experiments/tpu_aot_study.py table runs/tpu_aot        # markdown of everything done

Each case is one `python -m fgm_jax.main ... --config.job=compile` in its own workdir
(<root>/<case>/aot.json); a case whose aot.json exists is not run again, so the study resumes.
The batch search doubles the global batch from the smallest the mesh splits until a function
no longer fits (the job exits 2), per topology and remat. Wall time per case goes to
<root>/times.tsv. Every figure except compile time and memory is the compiler's estimate.
"""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SD3 = ["--config=configs/sd3_fgm.py", "--config.aot.architecture=sd3-medium"]
# (slice, topology, chips, fsdp): the state (53.3 GB at fsdp 1) over enough chips.
SD3_SLICES = (("v5p-8", "v5p:2x2x1", 4, 4), ("v6e-8", "v6e:2x4", 8, 8),
              ("v5e-16", "v5e:4x4", 16, 16), ("v5p-16", "v5p:2x2x2", 8, 4))
# (slice, topology, chips) for SD3 LoRA FGM: one chip of each kind, and the slices of the
# full fine-tuning table. Data parallel over every chip (fsdp 1): the bf16 base and the
# adapters fit one chip, so each chip holds them and its share of the batch.
LORA_SLICES = (("v6e-1", "v6e:1x1", 1), ("v5e-1", "v5e:1x1", 1), ("v5p-1", "v5p:1x1x1", 1),
               ("v6e-8", "v6e:2x4", 8), ("v5e-16", "v5e:4x4", 16))
CIFAR = ["--config=configs/cifar10_fgm.py", "--config.teacher.model.dtype=bfloat16"]
CIFAR_TEACHER = ["--config=configs/cifar10_teacher.py", "--config.model.dtype=bfloat16"]


def run_case(root, name, args, timeout=3600):
  """Runs one compile job unless done; returns its aot.json (None if it did not finish)."""
  workdir = os.path.join(root, name)
  path = os.path.join(workdir, "aot.json")
  done = os.path.join(workdir, "done")
  if os.path.exists(done):
    return _read(path)
  os.makedirs(workdir, exist_ok=True)
  cmd = [sys.executable, "-m", "fgm_jax.main", args[0], f"--workdir={workdir}",
         "--config.job=compile", *args[1:]]  # --config=... must come first
  print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[2:])}", flush=True)
  t0 = time.time()
  with open(os.path.join(workdir, "log.txt"), "w") as log:
    try:
      r = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
      status = r.returncode
    except subprocess.TimeoutExpired:
      status = "timeout"
  wall = time.time() - t0
  with open(os.path.join(root, "times.tsv"), "a") as f:
    f.write(f"{name}\t{status}\t{wall:.0f}\t{' '.join(args)}\n")
  report = _read(path)
  if report is not None:
    report["status"], report["wall_s"], report["command"] = status, wall, " ".join(cmd[2:])
    with open(path, "w") as f:
      json.dump(report, f, indent=1)
  if status in (0, 2):
    open(done, "w").close()
  print(f"  -> status {status} in {wall:.0f} s", flush=True)
  return report


def _read(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def fits(report):
  return report is not None and all(r.get("fits") for r in report["functions"])


def sd3(root, remats=("dots", "none", "full"), slices=SD3_SLICES, start=32):
  """Per slice and remat, the largest global batch that fits, searched from ``start`` (the
  config's batch) by doubling while it fits, or halving until it does."""
  for slice_name, topo, chips, fsdp in slices:
    for remat in remats:
      def compile_at(batch):
        return fits(run_case(
            root, f"sd3_{slice_name}_{remat}_b{batch}",
            SD3 + [f"--config.aot.topology={topo}", f"--config.mesh.fsdp={fsdp}",
                   f"--config.teacher.model.remat={remat}", f"--config.batch_size={batch}",
                   "--config.aot.functions=('train_step',)"]))
      batch = max(start, chips // fsdp)
      if compile_at(batch):
        while batch < 64 * chips and compile_at(2 * batch):
          batch *= 2
      else:
        while batch > chips // fsdp and not compile_at(batch // 2):
          batch //= 2


def lora_at(root, slice_name, rank, remat, batch):
  """One SD3-Medium LoRA FGM step compile (attention + MLP adapters of rank ``rank``)."""
  _, topo, _ = next(s for s in LORA_SLICES if s[0] == slice_name)
  return fits(run_case(
      root, f"lora_{slice_name}_r{rank}_{remat}_b{batch}",
      SD3 + [f"--config.aot.topology={topo}", f"--config.lora.rank={rank}",
             f"--config.teacher.model.remat={remat}", f"--config.batch_size={batch}",
             "--config.aot.functions=('train_step',)"]))


def lora(root, slice_name, rank, remat="dots", start=None):
  """SD3-Medium LoRA FGM on one slice: the largest global batch that fits, searched from
  ``start`` (default one image per chip) by doubling while it fits, or halving until it
  does (down to one per chip)."""
  _, _, chips = next(s for s in LORA_SLICES if s[0] == slice_name)
  compile_at = lambda batch: lora_at(root, slice_name, rank, remat, batch)
  batch = int(start or chips)
  if compile_at(batch):
    while batch < 64 * chips and compile_at(2 * batch):
      batch *= 2
  else:
    while batch > chips and not compile_at(batch // 2):
      batch //= 2


def sd3_sampling(root):
  for slice_name, topo, chips, fsdp in SD3_SLICES[:1]:
    run_case(root, f"sd3_{slice_name}_sampling",
             SD3 + [f"--config.aot.topology={topo}", f"--config.mesh.fsdp={fsdp}",
                    f"--config.batch_size={8 * chips}",
                    "--config.aot.functions=('generator','teacher_cfg_28step')"])


def depth(root, depths=(1, 2, 4, 8, 24), unrolled=(1, 2, 4)):
  for scan in (True, False):
    for n in depths if scan else unrolled:
      run_case(root, f"depth_{'scan' if scan else 'unrolled'}_{n}",
               SD3 + ["--config.aot.topology=v5p:2x2x1", "--config.mesh.fsdp=4",
                      "--config.batch_size=8", "--config.teacher.model.remat=none",
                      f"--config.teacher.model.scan_layers={scan}",
                      f"--config.aot.num_layers={n}", "--config.aot.functions=('train_step',)"])


def cifar(root, slices=(("v5e-4", "v5e:2x2", 4), ("v6e-4", "v6e:2x2", 4),
                         ("v5p-8", "v5p:2x2x1", 4)), per_chip=128, steps=True):
  """CIFAR-10 (DDPM++, bf16): one-step sampling on every slice; with ``steps`` also the
  teacher step and the FGM iteration on the first (each takes minutes to compile)."""
  for name, topo, chips in slices:
    batch = per_chip * chips
    run_case(root, f"cifar_sampling_{name}_b{batch}",
             CIFAR + [f"--config.aot.topology={topo}", f"--config.batch_size={batch}",
                      "--config.aot.functions=('generator',)"])
  if steps:
    name, topo, chips = slices[0]
    batch = per_chip * chips
    run_case(root, f"cifar_teacher_{name}_b{batch}",
             CIFAR_TEACHER + [f"--config.aot.topology={topo}", f"--config.batch_size={batch}",
                              "--config.aot.functions=('train_step',)"])
    run_case(root, f"cifar_fgm_{name}_b{batch}",
             CIFAR + [f"--config.aot.topology={topo}", f"--config.batch_size={batch}",
                      "--config.aot.functions=('train_step',)"])


def _cases(root, prefix):
  for name in sorted(os.listdir(root), key=_natural):
    report = _read(os.path.join(root, name, "aot.json"))
    if name.startswith(prefix) and report is not None:
      yield name, report


def _natural(name):
  return [int(p) if p.isdigit() else p for p in name.replace("_b", "_").split("_")]


def _cells(f, report):
  total, of = f.get("total_bytes"), f.get("device_bytes") or report.get("device_bytes")
  mem = f"{total / 2**30:.1f} / {of / 2**30:.0f}" if total and of else "-"
  rate = f"{f['images_per_s_per_chip']:.2f}" if f.get("images_per_s_per_chip") else "-"
  util = f"{100 * f['utilisation']:.0f}%" if f.get("utilisation") else "-"
  code = f"{f['code_bytes'] / 1e6:.0f}" if f.get("code_bytes") else "-"
  coll = ", ".join(f"{k} {v}" for k, v in f.get("collectives", {}).items()) or "-"
  return mem, rate, util, code, coll


def table(root):
  """Markdown of every finished case: SD3 slices, compile time vs depth, the rest."""
  print("| slice (topology, fsdp) | remat | global batch | compile s | GiB per chip (of) | fits "
        "| code MB | est. img/s per chip | bf16 util. | collectives |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, report in _cases(root, "sd3_"):
    saved = report["config"]
    for f in report["functions"]:
      mem, rate, util, code, coll = _cells(f, report)
      batch = saved["batch_size"] if f["name"] == "train_step" else f["images"]
      where = f"{name.split('_')[1]} (`{saved['aot']['topology']}`, {saved['mesh']['fsdp']})"
      what = saved["teacher"]["model"]["remat"] if f["name"] == "train_step" else f["name"]
      print(f"| {where} | {what} | {batch} | {f['compile_s']:.0f} | {mem} | "
            f"{'yes' if f.get('fits') else '**no**'} | {code} | {rate} | {util} | {coll} |")
  print()
  print("| layout | MM-DiT blocks | compile s | code MB | compiled fusions | GiB per chip |")
  print("|---|---|---|---|---|---|")
  for name, report in _cases(root, "depth_"):
    f = report["functions"][0]
    print(f"| {name.split('_')[1]} | {name.split('_')[2]} | {f['compile_s']:.0f} | "
          f"{f['code_bytes'] / 1e6:.0f} | {f['program'].get('compiled_fusions', '-')} | "
          f"{f['total_bytes'] / 2**30:.1f} |")
  print()
  print("| case | function | batch | compile s | GiB per chip (of) | fits | code MB | "
        "est. img/s per chip | bf16 util. | collectives |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, report in _cases(root, "lora_"):
    saved, f = report["config"], report["functions"][0]
    mem, rate, _, code, _ = _cells(f, report)
    print(f"| LoRA {name.split('_')[1]} (`{saved['aot']['topology']}`) | r{saved['lora']['rank']} "
          f"{saved['teacher']['model']['remat']} | {saved['batch_size']} | "
          f"{f['compile_s']:.0f} | {mem} | {'yes' if f.get('fits') else '**no**'} | {code} | "
          f"{rate} | - | - |")
  for name, report in _cases(root, "cifar"):
    for f in report["functions"]:
      mem, rate, util, code, coll = _cells(f, report)
      print(f"| {name} | {f['name']} | {f['images']} | {f['compile_s']:.0f} | {mem} | "
            f"{'yes' if f.get('fits') else '**no**'} | {code} | {rate} | {util} | {coll} |")


if __name__ == "__main__":
  what, root = sys.argv[1], sys.argv[2]
  os.makedirs(root, exist_ok=True)
  steps = {"sd3": sd3, "sd3_sampling": sd3_sampling, "depth": depth, "cifar": cifar,
           "table": table}
  if what == "lora":  # lora <root> <slice> <rank> [remat] [start batch]
    lora(root, sys.argv[3], int(sys.argv[4]), *sys.argv[5:])
  elif what == "lora_at":  # lora_at <root> <slice> <rank> <remat> <batch>: one case
    lora_at(root, sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
  elif what == "sd3_slice":  # one slice and remat: sd3_slice <root> v6e-8 dots
    sd3(root, remats=(sys.argv[4],), slices=[s for s in SD3_SLICES if s[0] == sys.argv[3]])
  else:
    steps[what](root)
