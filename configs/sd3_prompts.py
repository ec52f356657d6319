"""SD3 prompt-embedding cache: encode a prompt file with SD3's three text encoders, in JAX.

    python -m fgm_jax.main --config=configs/sd3_prompts.py --workdir=runs/prompts \\
        --config.sd3.folder=stable-diffusion-3-medium-diffusers --config.prompts=prompts.txt

Writes shards of (context, pooled) plus the unconditional embedding into --workdir
(fgm_jax/sd3/prompt_cache.py); a killed run resumes where it stopped.
Variants: 'runlocal' (tiny random components built offline into <workdir>/tiny_sd3).
"""

from configs import common


def get_config(variant=""):
  c, words = common.sd3_run("prompt_cache", variant)  # c.prompts: .txt (one per line) / .jsonl
  c.batch_size = 64  # prompts per encoder call, over all devices
  c.shard_size = 1024  # prompts per shard file (~2.7 GB at SD3-Medium's 333 x 4096 bf16)
  if "runlocal" in words:
    c.shard_size = 2
    c.batch_size = 8
  return c
