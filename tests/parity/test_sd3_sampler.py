"""The JAX SD3 teacher sampler equals diffusers' StableDiffusion3Pipeline: same initial
latents, 4 Euler steps with CFG and SD3's shift, then the VAE decode."""

import os

import numpy as np
import pytest

from fgm_jax import config_checks
from fgm_jax import flow
from fgm_jax.sd3 import sampler
from fgm_jax.sd3 import text
from tests import helpers
from tests.parity.reference import sd3_reference as ref

torch = pytest.importorskip("torch")
STEPS, GUIDANCE, T5_LENGTH = 4, 4.5, 32


@pytest.fixture(scope="module", autouse=True)
def _compile_once(tmp_path_factory):
  """Each sample job loads the models and jits them afresh: the jobs below (and the parity
  test's sampler) share their identical text-encoder, MM-DiT and VAE programs through the
  persistent compilation cache instead of compiling each one per job."""
  with helpers.compilation_cache(helpers.worker_cache_dir(tmp_path_factory)):
    yield


@pytest.fixture(scope="module")
def setup(sd3_tiny):
  folder, pipe = sd3_tiny
  return folder, pipe, sampler.load(folder, t5_length=T5_LENGTH)


def test_time_grid_is_the_schedulers(setup):
  _, pipe, sd3 = setup
  for steps in (1, 4, 28):
    pipe.scheduler.set_timesteps(steps)
    got = flow.diffusers_flow_match_grid(steps, sd3.shift)
    np.testing.assert_array_equal(got, pipe.scheduler.sigmas.numpy())


def test_latents_and_images_match_diffusers(setup):
  folder, pipe, sd3 = setup
  prompts = ref.PROMPT_TEXTS[:2] + [""]
  shape = (8, 8, sd3.mmdit.in_channels)
  noise = np.stack([sampler.initial_noise(0, i, shape) for i in range(len(prompts))])
  context, pooled = text.encode_prompt(sd3.encoders, prompts)
  null_ctx, null_pooled = text.encode_prompt(sd3.encoders, [""])
  n = len(prompts)
  fn = sampler._sampler(sd3, STEPS, GUIDANCE)
  latents, images = fn(sd3.mmdit_params, sd3.vae_params, noise,
                       {"context": context, "pooled": pooled},
                       {"context": np.repeat(null_ctx, n, 0), "pooled": np.repeat(null_pooled, n, 0)})
  kwargs = dict(prompt=prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                height=16, width=16, max_sequence_length=T5_LENGTH,
                latents=torch.from_numpy(noise).permute(0, 3, 1, 2))
  with torch.no_grad():
    want_latents = pipe(output_type="latent", **kwargs).images.permute(0, 2, 3, 1).numpy()
    want_images = pipe(output_type="np", **kwargs).images
  assert ref.max_rel_err(latents, want_latents) <= 1e-4
  assert images.shape == want_images.shape == (n, 16, 16, 3)
  assert ref.max_rel_err(images, want_images) <= 1e-4
  # Guidance matters here: without it the latents differ (the test would notice a CFG bug).
  assert ref.max_rel_err(np.asarray(latents), noise) > 1e-2


def test_sample_job_writes_named_images_and_a_grid(setup, tmp_path):
  from configs import sd3_teacher
  from fgm_jax import main as main_lib
  folder, _, _ = setup
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a photo of a cat\na red car\nthe lazy dog\n")
  c = sd3_teacher.get_config()
  c.sd3.folder, c.prompts, c.sd3.t5_length = folder, str(prompts), T5_LENGTH
  c.sample.steps, c.sample.height, c.sample.width, c.sample.batch_size = 2, 16, 16, 2
  main_lib.run(c, str(tmp_path / "out"))
  names = sorted(os.listdir(tmp_path / "out" / "images"))
  assert names == ["00000_seed0.png", "00001_seed0.png", "00002_seed0.png"]
  assert (tmp_path / "out" / "grid.png").stat().st_size > 100
  # Seeds are per image: the same prompt index and seed give the same file in any batch.
  c.sample.batch_size = 3
  main_lib.run(c, str(tmp_path / "again"))
  for name in names:
    a = (tmp_path / "out" / "images" / name).read_bytes()
    b = (tmp_path / "again" / "images" / name).read_bytes()
    assert a == b, name
  c.sample.height = 20
  with pytest.raises(config_checks.ConfigError, match="multiples of 16"):
    main_lib.run(c, str(tmp_path / "bad"))


def test_sample_job_reads_a_prompt_cache(setup, tmp_path):
  """config.prompts may name a prompt cache: the same images as from the prompt file, since
  the cache holds the same embeddings (bf16-rounded context: images within a few levels)."""
  from configs import sd3_prompts, sd3_teacher
  from fgm_jax import main as main_lib
  from PIL import Image
  folder, _, _ = setup
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a photo of a cat\na red car\n")
  cache = sd3_prompts.get_config()
  cache.sd3.folder, cache.prompts, cache.sd3.t5_length = folder, str(prompts), T5_LENGTH
  cache.batch_size = 8
  main_lib.run(cache, str(tmp_path / "cache"))
  c = sd3_teacher.get_config()
  c.sd3.folder, c.sd3.t5_length = folder, T5_LENGTH
  c.sample.steps, c.sample.height, c.sample.width = 2, 16, 16
  for name, source in (("from_file", str(prompts)), ("from_cache", str(tmp_path / "cache"))):
    c.prompts = source
    main_lib.run(c, str(tmp_path / name))
  for k in range(2):
    a, b = (np.asarray(Image.open(tmp_path / d / "images" / f"{k:05d}_seed0.png"), np.int32)
            for d in ("from_file", "from_cache"))
    assert np.abs(a - b).max() <= 3
  c.sd3.t5_length = 77  # a cache of other settings is refused
  with pytest.raises(config_checks.ConfigError, match="t5_length: 32 there, 77 here"):
    main_lib.run(c, str(tmp_path / "wrong"))


def test_runlocal_builds_a_tiny_folder_that_diffusers_reads_alike(tmp_path):
  """configs/sd3_teacher.py:runlocal runs end to end on components our own exporters wrote;
  diffusers loads that folder and encodes prompts as we do (the writers are right)."""
  from configs import sd3_teacher
  from diffusers import StableDiffusion3Pipeline
  from fgm_jax import main as main_lib
  c = sd3_teacher.get_config("runlocal")
  c.sample.num = 2
  main_lib.run(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "images")) == ["00000_seed0.png", "00001_seed0.png"]
  folder = str(tmp_path / "tiny_sd3")
  pipe = StableDiffusion3Pipeline.from_pretrained(folder)
  with torch.no_grad():
    want, _, want_pooled, _ = pipe.encode_prompt(prompt=ref.PROMPT_TEXTS, prompt_2=None,
                                                 prompt_3=None, max_sequence_length=32)
  got, got_pooled = text.encode_prompt(text.load(folder, t5_length=32), ref.PROMPT_TEXTS)
  assert ref.max_rel_err(got, want.numpy()) <= 1e-5
  assert ref.max_rel_err(got_pooled, want_pooled.numpy()) <= 1e-5


def test_tiny_t5_tokenizer_is_the_same_in_every_process(tmp_path):
  """The tiny folder's T5 tokenizer file (part of the folder identity a prompt cache
  records) is the same whichever process trains it: the tiny folder of a gs:// workdir is
  built on each VM, and a cache written on one must match the folder of another."""
  import subprocess
  import sys
  code = "import sys; from fgm_jax.sd3 import tiny; tiny.t5_tokenizer(sys.argv[1])"
  for name in ("a", "b"):
    subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True,
                   cwd=helpers.ROOT, env=dict(os.environ, PYTHONPATH=helpers.ROOT))
  a, b = ((tmp_path / name / "tokenizer.json").read_bytes() for name in ("a", "b"))
  assert a == b
