"""MM-DiT-FGM end to end on a tiny random SD3 folder built by diffusers/transformers (torch):
prompt cache -> conditional FGM iterations with a CFG teacher -> one-step images -> export;
the exported folder in diffusers' StableDiffusion3Pipeline (1 step, no CFG) reproduces our
one-step sampler. Then: the conditional step on 8 devices equals 1 device, a SIGKILLed run
resumes exactly, and bad inputs stop with one line before anything compiles."""

import json
import os
import shutil
import time

import jax
import numpy as np
import pytest

from fgm_jax import config_checks
from fgm_jax import main as main_lib
from fgm_jax import sharding as sharding_lib
from fgm_jax.convert import diffusers as dconv
from fgm_jax.sd3 import one_step
from fgm_jax.sd3 import sampler
from fgm_jax.sd3 import text
from fgm_jax.train import loop
from fgm_jax.train import run_dir
from tests import extra_env
from tests import helpers
from tests.parity.reference import sd3_reference as ref

torch = pytest.importorskip("torch")
T5_LENGTH = 32
STEPS, EVERY, KILL_AFTER = 12, 4, 4


@pytest.fixture(scope="module", autouse=True)
def _compile_once(tmp_path_factory):
  """The runs below share one FGM step program (same mesh) through the persistent cache."""
  with helpers.compilation_cache(helpers.worker_cache_dir(tmp_path_factory)):
    yield


@pytest.fixture(scope="module")
def inputs(sd3_tiny, tmp_path_factory):
  """(teacher folder, prompt file, prompt cache) -- the cache written by the real job."""
  from configs import sd3_prompts
  folder, _ = sd3_tiny
  root = tmp_path_factory.mktemp("sd3_fgm")
  prompts = root / "prompts.txt"
  prompts.write_text("\n".join(ref.PROMPT_TEXTS) + "\n")
  c = sd3_prompts.get_config()
  c.sd3.folder, c.prompts, c.sd3.t5_length = folder, str(prompts), T5_LENGTH
  c.batch_size, c.shard_size = 8, 2
  main_lib.run(c, str(root / "cache"))
  return folder, str(prompts), str(root / "cache")


def fgm_config(inputs, **overrides):
  from configs import sd3_fgm
  folder, prompts, cache = inputs
  c = sd3_fgm.get_config("runlocal")
  c.sd3.folder, c.prompts, c.prompt_cache = folder, prompts, cache
  c.log.every = 1000  # only at the end: fewer device reads
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
  """An uninterrupted STEPS-iteration run on the 8-device mesh (in this process)."""
  workdir = str(tmp_path_factory.mktemp("fgm_a"))
  config = fgm_config(inputs, num_steps=STEPS, **{"checkpoint.every": EVERY,
                                                  "checkpoint.keep": STEPS // EVERY})
  main_lib.run(config, workdir)
  return config, workdir


def _state(config, workdir, mesh=None, step=None):
  """(step, host state) of the newest checkpoint, or of ``step``."""
  from fgm_jax import checkpoint
  from fgm_jax.train import trainers
  config = trainers.prepare(config, workdir)
  if step is None:
    _, state = run_dir.restore_latest(config, workdir, mesh)
  else:
    trainer = trainers.build(config, mesh or sharding_lib.mesh_from_config(config.mesh))
    mgr = checkpoint.manager(checkpoint.checkpoint_dir(workdir), async_save=False)
    state, _ = run_dir.restore_or_init(trainer, mgr, step)
    mgr.close()
  return int(state.step), jax.device_get(state)


class OneStepCase:
  """Two prompts of the tiny folder with fixed noise, sampled in one step without guidance by
  our sampler (any transformer weights) and by diffusers' StableDiffusion3Pipeline (any
  folder it loads): the comparison both export tests make."""

  def __init__(self, folder):
    self.sd3 = sampler.load(folder, t5_length=T5_LENGTH)
    self.prompts = ref.PROMPT_TEXTS[:2]
    self.noise = np.stack([sampler.initial_noise(0, i, (8, 8, 4)) for i in range(2)])
    context, pooled = text.encode_prompt(self.sd3.encoders, self.prompts)
    self.cond = {"context": context, "pooled": pooled}

  def ours(self, params):
    """(latents, images) of our one-step sampler with transformer ``params``."""
    return sampler._sampler(self.sd3, 1, 1.0)(params, self.sd3.vae_params, self.noise,
                                              self.cond, self.cond)

  def diffusers(self, pipeline_folder, images=False):
    """diffusers' latents (NHWC), and its images too when asked."""
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(str(pipeline_folder))
    kwargs = dict(prompt=self.prompts, num_inference_steps=1, guidance_scale=1.0, height=16,
                  width=16, max_sequence_length=T5_LENGTH,
                  latents=torch.from_numpy(self.noise).permute(0, 3, 1, 2))
    with torch.no_grad():
      latents = pipe(output_type="latent", **kwargs).images.permute(0, 2, 3, 1).numpy()
      return (latents, pipe(output_type="np", **kwargs).images) if images else latents


def test_distill_sample_export_and_diffusers_reproduces_the_one_step_sampler(
    inputs, trained, tmp_path):
  folder, _, _ = inputs
  config, workdir = trained
  _, teacher = dconv.load_params(os.path.join(folder, "transformer"), "mmdit")
  _, _, step, gen, weights = one_step.restore_generator(config, workdir)
  assert step == STEPS
  assert config.optim.ema_decay == 0 and weights == "raw"  # no EMA kept: the raw weights
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(gen), jax.tree.leaves(teacher)))
  assert moved > 1e-6  # the generator trained (the loop stops on non-finite losses)
  np.testing.assert_array_equal(gen["pos_embed"], teacher["pos_embed"])  # frozen table

  sample = config.copy_and_resolve_references()
  sample.job, sample.sample.num = "sample", 2
  main_lib.run(sample, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "images"))) == [
      "00000_seed0.png", "00001_seed0.png"]

  # GenEval's layout from the same generator: 2 prompts x 2 images, resumable.
  from fgm_jax.evaluation import geneval
  metadata = tmp_path / "metadata.jsonl"
  lines = [json.dumps({"tag": "single_object", "include": [{"class": c, "count": 1}],
                       "prompt": f"a photo of a {c}"}) for c in ("cat", "dog")]
  metadata.write_text("\n".join(lines) + "\n")
  sample.sample.geneval, sample.sample.images_per_prompt = str(metadata), 2
  sample.sample.num = 1  # would silently score a subset: refused before anything is written
  with pytest.raises(config_checks.ConfigError,
                     match=r"config.sample.num=1 would keep only the first 1 of the 2 prompts"):
    main_lib.run(sample, workdir)
  assert not os.path.exists(os.path.join(workdir, "geneval"))
  sample.sample.num = 2  # all of them: accepted
  main_lib.run(sample, workdir)
  out = os.path.join(workdir, "geneval")
  assert geneval.check_folder(geneval.read_metadata(str(metadata)), out, 2)["incomplete"] == []
  for k, line in enumerate(lines):
    assert open(os.path.join(out, f"{k:05d}", "metadata.jsonl")).read() == line + "\n"
    assert sorted(os.listdir(os.path.join(out, f"{k:05d}", "samples"))) == ["0000.png",
                                                                           "0001.png"]

  export = config.copy_and_resolve_references()
  export.job, export.export.output = "export", str(tmp_path / "one_step")
  main_lib.run(export, workdir)
  _, exported = dconv.load_params(str(tmp_path / "one_step" / "transformer"), "mmdit")
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(gen)):
    np.testing.assert_array_equal(a, b)  # fp32 export: the checkpoint's EMA-less weights

  # Our one-step sampler (the checkpoint's generator) vs diffusers on the exported folder.
  case = OneStepCase(folder)
  prompts, noise = case.prompts, case.noise
  latents, images = case.ours(gen)
  want_latents, want_images = case.diffusers(tmp_path / "one_step", images=True)
  assert ref.max_rel_err(latents, want_latents) <= 1e-4
  assert ref.max_rel_err(images, want_images) <= 1e-4
  # The teacher's one step differs: the comparison sees the distilled weights.
  assert ref.max_rel_err(case.ours(teacher)[0], want_latents) > 1e-5
  # The same folder where users run it (README): the environment `pip install -e
  # ".[diffusers]"` gives, without torchvision, in a process without pytest's torchvision
  # hook (tests/extra_env.py says why it is built from this environment's files).
  python, versions = extra_env.build(str(tmp_path / "venv"), "diffusers")
  got_latents, got_images, seen = extra_env.sd3_one_step(
      python, tmp_path / "one_step", prompts, noise, str(tmp_path), height=16, width=16,
      max_sequence_length=T5_LENGTH)
  assert seen == {"versions": {k: versions[k] for k in ("torch", "diffusers", "transformers")},
                  "torchvision": False, "modules": []}
  assert ref.max_rel_err(latents, got_latents) <= 1e-4
  assert ref.max_rel_err(images, got_images) <= 1e-4
  note = json.loads((tmp_path / "one_step" / "fgm_jax.json").read_text())
  assert note["run"] == {"num_inference_steps": 1, "guidance_scale": 1.0}
  assert export.export.weights == "ema" and note["weights"] == "raw"  # what was written


def test_export_from_an_incomplete_teacher_folder_is_refused(inputs, trained, tmp_path):
  """Without text_encoder_2/ (listed in model_index.json) diffusers could not load the
  export: refused before anything is written, the part named."""
  folder, _, _ = inputs
  config, workdir = trained
  partial = tmp_path / "partial"
  shutil.copytree(folder, partial, ignore=shutil.ignore_patterns("text_encoder_2"))
  export = config.copy_and_resolve_references()
  export.job, export.export.output = "export", str(tmp_path / "one_step")
  export.sd3.folder = str(partial)
  status, message = main_lib.run_with_status(export, workdir)
  assert status == 2, message
  assert "\n" not in message and "lacks text_encoder_2/" in message, message
  assert "--config.sd3.folder" in message, message
  assert not os.path.exists(tmp_path / "one_step")


def test_one_step_restore_gives_the_whole_states_generator(trained):
  """job=sample/export's restore reads the generator's weights alone (bytes counted in
  test_generator_restore.py: here every array is smaller than TensorStore's 1 MB read
  coalescing, which reads the gaps between them too); they are the whole state's."""
  config, workdir = trained
  _, _, step, gen, weights = one_step.restore_generator(config, workdir)
  _, state = _state(config, workdir)
  assert step == STEPS and weights == "raw"
  for a, b in zip(jax.tree.leaves(gen), jax.tree.leaves(state.gen_params)):
    np.testing.assert_array_equal(a, b)


def test_conditional_step_on_one_device_equals_eight(inputs, trained, tmp_path):
  """EVERY conditional iterations on one device equal the 8-device run's checkpoint there
  (prompt rows and noise are keyed by step, so the longer run's first steps are the same)."""
  config, workdir = trained
  one = sharding_lib.make_mesh(devices=jax.devices()[:1])
  short = config.copy_and_resolve_references()
  short.num_steps = EVERY
  loop.train(short, str(tmp_path / "one"), mesh=one, write_metrics=False, progress=False)
  (_, a), (_, b) = _state(short, str(tmp_path / "one"), one), _state(config, workdir,
                                                                     step=EVERY)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=2e-5)


def test_stopped_conditional_run_resumes_exactly(inputs, trained, tmp_path):
  """A run that ends at its step-KILL_AFTER checkpoint and is started again with the full
  config ends where the uninterrupted run ends: generator, online flow, optimisers, EMA and
  the prompt stream's position. (A real SIGKILL mid-run of this trainer is the LoRA run's in
  test_sd3_lora.py; here both parts run in this process and share the compiled step.)"""
  config, workdir_a = trained
  workdir = str(tmp_path / "fgm_b")
  first = config.copy_and_resolve_references()
  first.num_steps = KILL_AFTER
  loop.train(first, workdir, write_metrics=False, progress=False)
  assert helpers.complete_steps(os.path.join(workdir, "checkpoints"))[-1] == KILL_AFTER
  loop.train(config, workdir, write_metrics=False, progress=False)
  (step_a, a), (step_b, b) = _state(config, workdir_a), _state(config, workdir)
  assert step_a == step_b == STEPS
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


# --- bad inputs: one line each, before compiling ----------------------------------------------


def _fake_cache(path, folder, context_width=48, pooled_width=40, rows=2, uncond=True):
  """A cache whose cache.json matches ``folder`` (as the prompt_cache job would write it)
  and whose arrays are as asked."""
  os.makedirs(path)
  manifest = {"settings": text.folder_settings(folder, T5_LENGTH), "complete": True,
              "num_shards": 1 if rows else 0}
  with open(os.path.join(path, "cache.json"), "w") as f:
    json.dump(manifest, f)
  bits = lambda n: np.zeros((n, 5, context_width), np.uint16)
  if rows:
    np.savez(os.path.join(path, "shard-00000.npz"), context=bits(rows),
             pooled=np.zeros((rows, pooled_width), np.float32), prompt=np.array(["a"] * rows),
             index=np.arange(rows))
  if uncond:
    np.savez(os.path.join(path, "uncond.npz"), context=bits(1),
             pooled=np.zeros((1, pooled_width), np.float32))
  return str(path)


def _fails(config, tmp_path, *needles):
  start = time.time()
  status, message = main_lib.run_with_status(config, str(tmp_path / "run"))
  assert status == 2, message
  assert "\n" not in message and all(n in message for n in needles), message
  assert not os.path.isdir(tmp_path / "run" / "checkpoints")
  assert time.time() - start < 20  # no FGM step was compiled (that takes longer here)


def test_bad_inputs_stop_with_one_line(inputs, tmp_path):
  folder = inputs[0]
  c = fgm_config(inputs, prompt_cache=_fake_cache(tmp_path / "narrow", folder, context_width=7))
  _fails(c, tmp_path / "a", "7 wide", "joint_attention_dim=48", "same SD3 folder")
  c = fgm_config(inputs, prompt_cache=_fake_cache(tmp_path / "nouncond", folder, uncond=False))
  _fails(c, tmp_path / "b", "uncond.npz", "CFG")
  c = fgm_config(inputs, prompt_cache=_fake_cache(tmp_path / "empty", folder, rows=0))
  _fails(c, tmp_path / "c", "holds no prompts")
  other = tmp_path / "flux"
  shutil.copytree(inputs[0], other)
  (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
  _fails(fgm_config(inputs, **{"sd3.folder": str(other)}), tmp_path / "d", "FluxPipeline",
         "not an SD3 one")
  index = json.loads((tmp_path / "flux" / "transformer" / "config.json").read_text())
  (other / "model_index.json").write_text(json.dumps({"_class_name":
                                                     "StableDiffusion3Pipeline"}))
  index["_class_name"] = "FluxTransformer2DModel"
  (other / "transformer" / "config.json").write_text(json.dumps(index))
  _fails(fgm_config(inputs, **{"sd3.folder": str(other)}), tmp_path / "e",
         "FluxTransformer2DModel")
  for field, value, needle in (("fgm.t_star", 0.5, "t_star=1"),
                               ("fgm.guidance", 0.5, "must be >= 1"),
                               ("fgm.teacher_dtype", "float16", "fgm.teacher_dtype='float16'"),
                               ("teacher.model.dtype", "float16",
                                "config.teacher.model.dtype='float16': choose"),
                               ("teacher.model.remat", "some", "config.teacher.model.remat="),
                               ("resolution", 24, "multiple of 16")):
    with pytest.raises(config_checks.ConfigError, match=needle):
      config_checks.validate(fgm_config(inputs, **{field: value}))


def test_cache_of_other_text_encoders_is_refused(inputs, tmp_path):
  """Caches with the MM-DiT's widths but other embeddings, refused as job=sample refuses them:
  one written from the folder without T5 (zeros in T5's place), and a teacher folder whose
  CLIP-G differs from the one the cache was encoded with."""
  from configs import sd3_prompts
  folder, prompts, cache = inputs
  no_t5 = tmp_path / "no_t5"
  shutil.copytree(folder, no_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
  c = sd3_prompts.get_config()
  c.sd3.folder, c.prompts, c.sd3.t5_length = str(no_t5), prompts, T5_LENGTH
  c.batch_size, c.shard_size = 8, 2
  main_lib.run(c, str(tmp_path / "cache_no_t5"))
  _fails(fgm_config(inputs, prompt_cache=str(tmp_path / "cache_no_t5")), tmp_path / "a",
         "config.prompt_cache=", "t5: False there, True here",
         "text_encoder_3 and tokenizer_3 differ", "rebuild it with configs/sd3_prompts.py")
  other = tmp_path / "other_clip_g"
  shutil.copytree(folder, other)
  clip_g = json.loads((other / "text_encoder_2" / "config.json").read_text())
  clip_g["hidden_act"] = "quick_gelu" if clip_g["hidden_act"] != "quick_gelu" else "gelu"
  (other / "text_encoder_2" / "config.json").write_text(json.dumps(clip_g))
  _fails(fgm_config(inputs, **{"sd3.folder": str(other)}), tmp_path / "b",
         f"config.prompt_cache={cache!r}", "folder_identity: text_encoder_2 differ")
