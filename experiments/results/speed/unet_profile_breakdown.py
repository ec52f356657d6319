"""GPU time of the CIFAR-10 U-Net FGM iteration by kernel class (issue 11; see ../speed.md).

Reads the jax.profiler trace that `experiments/gpu_check.sh ... session` writes
(`unet_profile.tgz`: `.../vm.trace.json.gz`, 3 back-to-back iterations) and the compiled GPU
HLO of the same program (`iteration_bf16_b128_h100.hlo.txt.gz`, kept next to this file), and
prints: per-iteration span, busy and idle time; kernels per iteration; time, traffic and share
by class; FLOPs of the cuDNN convolutions and matmuls from their HLO shapes. Standard library
only, runs on CPU in about a minute:

    tar xzf unet_profile.tgz -C /tmp
    python unet_profile_breakdown.py /tmp/unet_profile/iteration_bf16_b128/plugins/profile/*/vm.trace.json.gz \
        iteration_bf16_b128_h100.hlo.txt.gz [--kernels_csv=out.csv.gz]

Kernels run in CUDA graphs carry `hlo_op=command_buffer_N`; those are named after their XLA
fusion (its deduplicated name with '.' -> '_'), which the HLO maps to a source op_name.
cuDNN/cuBLAS kernels carry their custom-call's name in `hlo_op`.
"""
import argparse
import collections
import csv
import gzip
import json
import re

CONV_KIND = {"__cudnn$convBiasActivationForward": "fprop", "__cudnn$convForward": "fprop",
             "__cudnn$convBackwardInput": "dgrad", "__cudnn$convBackwardFilter": "wgrad"}
CONV_HELPERS = ("Memset", "AddPadding", "init_device_workspace", "nchwToNhwc", "splitKreduce",
                "ReduceSplitK")
BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
         "s64": 8, "u64": 8}


def dims(shape):
  m = re.search(r"\[([\d,]*)\]", shape)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def nbytes(shape):
  total = 0
  for dt, d in re.findall(r"(\w+)\[([\d,]*)\]", shape):
    n = 1
    for x in d.split(","):
      n *= int(x) if x else 1
    total += n * BYTES.get(dt, 4)
  return total


def prod(xs):
  p = 1
  for x in xs:
    p *= x
  return p


class Hlo:
  """Instruction shapes, op_names, fusion traffic and conv/dot FLOPs of a compiled module."""

  def __init__(self, text):
    self.shape, self.line, self.by_kernel = {}, {}, {}
    for line in text.split("\n"):
      m = re.match(r"\s+(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([a-z][\w-]*)\(", line)
      if not m:
        continue
      name = m.group(1)
      self.shape[name], self.line[name] = m.group(2), line
      dedup = re.search(r'deduplicated_name="([^"]+)"', line)
      for key in {name, dedup.group(1) if dedup else name}:
        self.by_kernel.setdefault(key.replace(".", "_"), []).append(name)
    self.convs = {n: self._conv(n, l) for n, l in self.line.items()
                  if "custom_call_target=\"__cudnn$conv" in l}

  def op_name(self, name):
    m = re.search(r'op_name="([^"]+)"', self.line[name])
    return m.group(1) if m else ""

  def _conv(self, name, line):
    target = re.search(r'custom_call_target="([^"]+)"', line).group(1)
    ops = [o.strip().lstrip("%") for o in
           re.search(r"custom-call\(([^)]*)\)", line).group(1).split(",")]
    rhs = re.search(r"dim_labels=\w+_(\w+)->", line).group(1)
    groups = int(re.search(r"feature_group_count=(\d+)", line).group(1)) \
        if "feature_group_count" in line else 1
    result = dims(self.shape[name])
    kind = CONV_KIND[target]
    # FLOPs of the forward conv X * W -> Y, whichever of X, W, Y this call produces.
    y, w = {"fprop": (result, dims(self.shape[ops[1]])),
            "dgrad": (dims(self.shape[ops[0]]), dims(self.shape[ops[1]])),
            "wgrad": (dims(self.shape[ops[1]]), result)}[kind]
    flops = 2 * prod(y) * w[rhs.index("0")] * w[rhs.index("1")] * w[rhs.index("i")]
    return dict(kind="resample" if groups > 1 else kind, flops=flops,
                op_name=self.op_name(name))

  def dot_flops(self):
    total = 0
    for name, line in self.line.items():
      if " dot(" in line:
        ops = [o.strip().lstrip("%") for o in re.search(r" dot\(([^)]*)\)", line).group(1).split(",")]
        k = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
        a = dims(self.shape[ops[0]])
        total += 2 * prod(dims(self.shape[name])) * prod(a[int(i)] for i in k.split(",") if i)
      elif "__cublas$lt$matmul" in line:
        ops = [o.strip().lstrip("%") for o in re.search(r"custom-call\(([^)]*)\)", line).group(1).split(",")]
        k = int(re.search(r'"lhs_contracting_dimensions":\["(\d+)"', line).group(1))
        total += 2 * prod(dims(self.shape[name])) * dims(self.shape[ops[0]])[k]
    return total

  def fusion_bytes(self, kernel):
    """Bytes a fusion kernel reads and writes (operands + result; an upper bound)."""
    for name in self.by_kernel.get(kernel, []):
      m = re.search(r" fusion\(([^)]*)\)", self.line[name])
      if m:
        ops = [re.sub(r"^/\*index=\d+\*/", "", o.strip()).lstrip("%") for o in m.group(1).split(",")]
        return nbytes(self.shape[name]) + sum(nbytes(self.shape.get(o, "")) for o in ops)
    return None


def classify(kernel, hlo_op, hlo):
  if hlo_op in hlo.convs:
    conv = hlo.convs[hlo_op]
    if conv["kind"] == "resample":
      return "resample 2x2 depthwise conv (cuDNN grouped direct)"
    if any(h in kernel for h in CONV_HELPERS):
      return "conv helpers (memset, channel padding, workspace)"
    return f"conv {conv['kind']}"
  if kernel.startswith("nvjet") or "cublas" in kernel or "gemm_fusion" in kernel:
    return "matmul (attention, dense: cuBLAS / Triton)"
  if kernel.lower().startswith("memcpy"):
    return "copies of Adam/EMA state (memcpy)"
  if kernel.startswith("Memset"):
    return "memset"
  names = hlo.by_kernel.get(kernel)
  if not names:
    return "other"
  ons = [hlo.op_name(n) for n in names]
  on = ons[0]
  if not any("SongUNet" in o for o in ons):
    if any("reduce_and" in o or "is_finite" in o for o in ons):
      return "state_finite (reduce_and over the whole state)"
    if "transpose" in kernel or re.search(r"jit\(counted\)/(add|mul|sub|div|sqrt)", on):
      return "Adam / EMA updates (+ weight layout transposes)"
    return "other outside the model (losses, noise, RNG)"
  backward = "transpose(jvp" in on
  if "transpose" in kernel:
    return "transposes in the model (attention q/k/v)"
  if "_attend" in on:
    return "attention elementwise (softmax, slices)"
  if "/norm" in on or "_norm/" in on:
    return "GroupNorm " + ("backward" if backward else "forward")
  if "silu" in on:
    return "SiLU " + ("backward" if backward else "forward")
  if "concatenate" in on:
    return "concatenate (decoder skips)"
  if on.endswith("convert_element_type"):
    return "casts"
  return "other elementwise " + ("backward" if backward else "forward")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("trace")
  p.add_argument("hlo")
  p.add_argument("--kernels_csv", default=None, help="write one iteration's kernels here (.csv.gz)")
  a = p.parse_args()
  hlo = Hlo(gzip.open(a.hlo, "rt").read())
  events = json.load(gzip.open(a.trace))["traceEvents"]
  gpu = sorted((e for e in events if e.get("ph") == "X" and e["pid"] == 1), key=lambda e: e["ts"])
  # An iteration starts with the first kernel of its first CUDA graph.
  starts = [i for i, e in enumerate(gpu) if e["args"].get("hlo_op") == "command_buffer_1"
            and (i == 0 or gpu[i - 1]["args"].get("hlo_op") != "command_buffer_1")]
  iterations = [gpu[s:e] for s, e in zip(starts, starts[1:] + [len(gpu)])]
  time, count, traffic = collections.Counter(), collections.Counter(), collections.Counter()
  for it in iterations:
    busy, cur, gaps = 0.0, None, []
    for e in it:
      s, t = e["ts"], e["ts"] + e["dur"]
      if cur and s > cur[1]:
        busy += cur[1] - cur[0]
        gaps.append(s - cur[1])
        cur = (s, t)
      else:
        cur = (cur[0], max(cur[1], t)) if cur else (s, t)
      c = classify(e["name"], e["args"].get("hlo_op", ""), hlo)
      time[c] += e["dur"] / len(iterations)
      count[c] += 1 / len(iterations)
      b = hlo.fusion_bytes(e["name"])
      traffic[c] += (b or 0) / len(iterations)
    busy += cur[1] - cur[0]
    span = it[-1]["ts"] + it[-1]["dur"] - it[0]["ts"]
    print(f"iteration: {len(it)} kernels, span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, "
          f"idle {sum(gaps) / 1e3:.2f} ms in {len(gaps)} gaps (largest {max(gaps):.1f} us)")
  total = sum(time.values())
  print(f"\n| class | kernels / iteration | ms / iteration | share | fusion traffic GB (TB/s) |")
  print("|---|---|---|---|---|")
  for c, t in time.most_common():
    tb = f"{traffic[c] / 1e9:.1f} ({traffic[c] / t / 1e6:.1f})" if traffic[c] else ""
    print(f"| {c} | {count[c]:.0f} | {t / 1e3:.2f} | {100 * t / total:.1f} % | {tb} |")
  flops = collections.Counter()
  for conv in hlo.convs.values():
    flops[conv["kind"]] += conv["flops"]
  flops["matmul"] = hlo.dot_flops()
  print("\nTFLOP per iteration:", {k: round(v / 1e12, 2) for k, v in flops.items()},
        f"total {sum(flops.values()) / 1e12:.2f}")
  for kind in ("fprop", "dgrad", "wgrad"):
    print(f"conv {kind}: {flops[kind] / time['conv ' + kind] / 1e6:.0f} TFLOP/s")
  if a.kernels_csv:
    with gzip.open(a.kernels_csv, "wt", newline="") as f:
      w = csv.writer(f)
      w.writerow(["start_us", "dur_us", "class", "hlo_op", "kernel"])
      it = iterations[1]
      for e in it:
        w.writerow([f"{e['ts'] - it[0]['ts']:.3f}", f"{e['dur']:.3f}",
                    classify(e["name"], e["args"].get("hlo_op", ""), hlo),
                    e["args"].get("hlo_op", ""), e["name"][:120]])


if __name__ == "__main__":
  main()
