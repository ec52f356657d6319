"""job=compile (fgm_jax/aot.py) and the persistent compilation cache (fgm_jax/compile_cache.py).

The TPU cases run the real TPU compiler from libtpu on this CPU-only machine, in subprocesses
(libtpu stays out of the test workers), through the command line as a user would.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from fgm_jax import aot
from fgm_jax import compile_cache
from fgm_jax.train import loop
from tests import helpers
from tests import xla_flags


def _cli(workdir, *overrides, config="configs/toy2d_fgm.py:quick"):
  env = dict(os.environ, XLA_FLAGS=xla_flags.for_devices(1), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cmd = [sys.executable, "-m", "fgm_jax.main", f"--config={config}", f"--workdir={workdir}",
         "--config.job=compile", *overrides]
  return subprocess.run(cmd, cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def test_toy_fgm_compiles_for_a_tpu_slice(tmp_path):
  """Every function the run jits, compiled for v5e:2x2 on a CPU-only machine."""
  r = _cli(tmp_path, "--config.aot.topology=v5e:2x2", "--config.mesh.fsdp=2")
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((tmp_path / "aot.json").read_text())
  assert report["device_kind"].startswith("TPU v5") and report["num_devices"] == 4
  assert report["device_bytes"] == 16 * 2**30
  rows = {r["name"]: r for r in report["functions"]}
  assert set(rows) == {"train_step", "generator", "teacher_euler_50step"}
  for row in rows.values():
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "code_bytes", "total_bytes"):
      assert row[key] >= 0
    assert row["code_bytes"] > 0 and row["fits"] is True
    assert row["flops_per_chip"] > 0 and row["images_per_s_per_chip"] > 0
    assert 0 < row["utilisation"] <= 1
  # The state is split over fsdp and the batch over all 4 chips: the step talks.
  assert rows["train_step"]["collectives"], rows["train_step"]
  assert set(rows["train_step"]["collectives"]) <= set(aot.COLLECTIVES)
  # The 50-step sampler does 50 generator passes (its loop body counted 50 times).
  ratio = rows["teacher_euler_50step"]["flops_per_chip"] / rows["generator"]["flops_per_chip"]
  assert ratio == pytest.approx(50, rel=0.02)
  assert "| train_step |" in r.stdout and "compiler's estimates, not measurements" in r.stdout


def test_a_config_that_cannot_fit_the_chip_is_refused(tmp_path):
  r = _cli(tmp_path, "--config.aot.topology=v5e:2x2", "--config.batch_size=67108864",
           "--config.aot.functions=('train_step',)")
  assert r.returncode == 2, r.stderr[-3000:]
  error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1, r.stderr[-3000:]
  assert "train_step needs" in error[0] and "a chip holds 15.75 GiB" in error[0]
  assert "config.mesh.fsdp" in error[0] and "config.batch_size" in error[0]
  row = json.loads((tmp_path / "aot.json").read_text())["functions"][0]
  assert row["fits"] is False and row["total_bytes"] > 16 * 2**30


def test_one_chip_topologies_compile(tmp_path):
  """One chip (v6e:1x1, smaller than libtpu's default 2x2 host) is a host of its own."""
  assert aot._host_bounds("v6e:1x1") == {"chips_per_host_bounds": (1, 1, 1)}
  assert aot._host_bounds("v5p:1x1x1") == {"chips_per_host_bounds": (1, 1, 1)}
  assert aot._host_bounds("v6e:2x4") == {} and aot._host_bounds("v5e:2x2") == {}
  r = _cli(tmp_path, "--config.aot.topology=v6e:1x1", "--config.aot.functions=('generator',)")
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((tmp_path / "aot.json").read_text())
  assert report["device_kind"].startswith("TPU v6") and report["num_devices"] == 1


def test_an_unknown_topology_names_the_field(tmp_path):
  r = _cli(tmp_path, "--config.aot.topology=v9x:3x3")
  assert r.returncode == 2
  assert "config.aot.topology='v9x:3x3'" in r.stderr and "v5p:2x2x1" in r.stderr


def test_flops_are_counted_through_loops():
  """Matmul and convolution FLOPs against closed forms, a scan's body times its length."""
  a = jnp.zeros((8, 16))
  w = jnp.zeros((16, 16))

  def scanned(a, w):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), a, None, length=7)[0]

  def fori(a, w):
    return jax.lax.fori_loop(0, 5, lambda i, c: c @ w, a)

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  one = 2 * 8 * 16 * 16
  assert aot.jaxpr_flops(jax.make_jaxpr(scanned)(a, w)) == 7 * one
  assert aot.jaxpr_flops(jax.make_jaxpr(fori)(a, w)) == 5 * one
  x, k = jnp.zeros((2, 6, 6, 3)), jnp.zeros((3, 3, 3, 4))
  assert aot.jaxpr_flops(jax.make_jaxpr(conv)(x, k)) == 2 * (2 * 6 * 6 * 4) * (3 * 3 * 3)
  grad = jax.make_jaxpr(jax.grad(lambda a, w: jnp.sum(scanned(a, w)), argnums=(0, 1)))(a, w)
  assert aot.jaxpr_flops(grad) == 3 * 7 * one  # forward + two backward matmuls per step


def test_compile_on_local_devices_in_process(tmp_path):
  """Without a topology: this machine's 8 (fake CPU) devices, sharded as the run would be."""
  c = helpers.tiny_fgm_config(str(tmp_path / "no_teacher_needed"))
  c.job = "compile"
  c.mesh.fsdp = 2
  rows = aot.run(c, str(tmp_path))
  assert [r["name"] for r in rows] == ["train_step", "generator", "teacher_euler_50step"]
  assert all(r["total_bytes"] > 0 and r["compile_s"] >= 0 for r in rows)
  assert json.loads((tmp_path / "aot.json").read_text())["num_devices"] == 8


def test_a_restart_loads_every_program_from_the_cache(tmp_path):
  """The second start of a run (a resume) compiles nothing: every program comes from
  <workdir>/compilation_cache. Counted from jax's own cache events."""
  workdir = str(tmp_path / "run")
  c = helpers.tiny_teacher_config(num_steps=20, every=10)
  with compile_cache.counting() as first:
    loop.train(c, workdir, write_metrics=False, progress=False)
  assert first["compiled"] >= 2 and first["loaded"] == 0
  assert os.listdir(os.path.join(workdir, "compilation_cache"))
  c.num_steps = 40
  with compile_cache.counting() as second:
    loop.train(c, workdir, write_metrics=False, progress=False)
  assert second["compiled"] == 0 and second["loaded"] >= 1, dict(second)
  # jax's own "time saved" can be negative for programs this small (load vs compile noise);
  # the time spent in XLA's compile calls is what a restart saves.
  assert second["compile_s"] < first["compile_s"], (dict(first), dict(second))
  assert not jax.config.jax_compilation_cache_dir  # the run's setting does not leak

  off = str(tmp_path / "off")
  c.compilation_cache.enabled = False
  c.num_steps = 10
  with compile_cache.counting() as counts:
    loop.train(c, off, write_metrics=False, progress=False)
  assert not os.path.exists(os.path.join(off, "compilation_cache"))
  assert not counts["loaded"] and not counts["compiled"] and counts["compile_s"] > 0


def test_sd3_fgm_functions_lower_from_shapes_alone(tmp_path):
  """SD3 FGM: the step (CFG teacher, prompt embeddings as the cache holds them), the one-step
  generator and the teacher's CFG sampler trace and lower on 8 devices with no prompt cache
  and no weights read (:runlocal's tiny folder gives the shapes); only the compile is skipped.
  The built-in SD3-Medium shape needs no folder at all."""
  from configs import sd3_fgm
  from fgm_jax import sharding as sharding_lib
  from fgm_jax.sd3 import trainer as sd3_trainer
  from fgm_jax.train import trainers
  c = sd3_fgm.get_config("runlocal")
  c.job = "compile"
  c.mesh.fsdp = 2
  mesh = sharding_lib.mesh_from_config(c.mesh)
  c, trainer = trainers.build_abstract(c, str(tmp_path), mesh)
  assert not (tmp_path / "prompt_cache").exists()
  text_len = 77 + c.sd3.t5_length
  targets = trainer.compile_targets(16)
  assert list(targets) == ["train_step", "generator", "teacher_cfg_28step"]
  for name, (jitted, args) in targets.items():
    with trainer.sharding.active():
      traced = jitted.trace(*args)
    assert aot.jaxpr_flops(traced.jaxpr) > 0, name
    contexts = [a["context"] for a in args if isinstance(a, dict) and "context" in a]
    assert contexts and all(a.shape[1:] == (text_len, c.teacher.model.joint_attention_dim)
                            for a in contexts), name
    if name != "train_step":  # latents of the sampling batch
      assert jax.tree.leaves(traced.out_info)[0].shape == (16,) + tuple(c.teacher.latent_shape)
    traced.lower()

  medium = sd3_fgm.get_config()
  medium.aot.architecture = "sd3-medium"
  medium = sd3_trainer.prepare_architecture(medium, str(tmp_path / "none"))
  assert medium.teacher.model.num_layers == 24 and tuple(medium.teacher.latent_shape) == (64, 64, 16)
  assert not (tmp_path / "none").exists()


def test_collectives_are_counted_by_op_not_by_name():
  hlo = "\n".join([
      "  %all-reduce.3 = (f32[16]{0}, /*index=1*/f32[3]{0}) all-reduce(%a, %b), to_apply=%add",
      "  %ars = f32[2]{0} all-reduce-start(%x), to_apply=%add",
      "  %ard = f32[2]{0} all-reduce-done(%ars)",
      "  %f = f32[2]{0} fusion(%all-reduce.3), kind=kLoop, calls=%all-gather.2",
      "  %ag = f32[8]{0} all-gather(%y), dimensions={0}",
      "  %cp = f32[8]{0} collective-permute-start(%z), source_target_pairs={{0,1}}"])
  assert aot.collectives(hlo) == {"all-reduce": 2, "all-gather": 1, "collective-permute": 1}
