"""SD3 text-to-image teacher sampling in JAX, from a local SD3 diffusers folder.

    python -m fgm_jax.main --config=configs/sd3_teacher.py --config.job=sample \\
        --workdir=runs/sd3_samples --config.sd3.folder=stable-diffusion-3-medium-diffusers \\
        --config.prompts=prompts.txt

Writes <workdir>/images/<prompt index>_seed<seed>.png and <workdir>/grid.png. The sampler is
diffusers' (Euler on FlowMatchEulerDiscreteScheduler's grid with the folder's shift, 3.0 for
SD3, and classifier-free guidance; tests/parity/test_sd3_sampler.py checks equality).
Variants: 'runlocal' (tiny random components built offline into <workdir>/tiny_sd3).
Provenance: 28 steps and guidance 7.0 are diffusers' StableDiffusion3Pipeline defaults.
"""

import ml_collections

from configs import common


def get_config(variant=""):
  # c.prompts: a prompt file (.txt, one per line, or .jsonl), or a prompt cache folder written
  # by configs/sd3_prompts.py (its embeddings are used; no text encoder runs).
  c, words = common.sd3_run("sample", variant)
  c.sample = ml_collections.ConfigDict(dict(
      num=0,  # 0: every prompt of the file
      steps=28, guidance=7.0, height=1024, width=1024, seed=0, batch_size=4))
  if "runlocal" in words:
    c.sample.update(dict(steps=2, height=16, width=16, batch_size=2))
  return c
