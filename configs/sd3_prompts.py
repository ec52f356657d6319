"""SD3 prompt-embedding cache: encode a prompt file with SD3's three text encoders, in JAX.

    python -m fgm_jax.main --config=configs/sd3_prompts.py --workdir=runs/prompts \\
        --config.sd3.folder=stable-diffusion-3-medium-diffusers --config.prompts=prompts.txt

Writes shards of (context, pooled) plus the unconditional embedding into --workdir
(fgm_jax/sd3/prompt_cache.py); a killed run resumes where it stopped.
"""

import ml_collections

from configs import common


def get_config():
  c = ml_collections.ConfigDict()
  c.job = "prompt_cache"
  c.seed = 0
  c.mesh = common.mesh()
  c.sd3 = common.sd3()
  c.prompts = ml_collections.config_dict.placeholder(str)  # .txt (one per line) or .jsonl
  c.batch_size = 64  # prompts per encoder call, over all devices
  c.shard_size = 1024  # prompts per shard file (~2.7 GB at SD3-Medium's 333 x 4096 bf16)
  return c
