"""MM-DiT-FGM: SD3's MM-DiT distilled by FGM into a one-step text-to-image generator.

    # 1. prompt embeddings (text encoders run once, here, not during distillation)
    python -m fgm_jax.main --config=configs/sd3_prompts.py --workdir=runs/prompts \\
        --config.sd3.folder=stable-diffusion-3-medium-diffusers --config.prompts=prompts.txt
    # 2. distil (teacher, online flow and generator all start from the folder's MM-DiT)
    python -m fgm_jax.main --config=configs/sd3_fgm.py --workdir=runs/sd3_fgm \\
        --config.sd3.folder=stable-diffusion-3-medium-diffusers --config.prompt_cache=runs/prompts
    # 3. one-step images (prompts -> one MM-DiT forward -> VAE), or GenEval's folder layout
    python -m fgm_jax.main --config=configs/sd3_fgm.py --config.job=sample --workdir=runs/sd3_fgm \\
        --config.sd3.folder=... --config.prompts=prompts.txt
    # 0. before renting a slice: does the step fit, and how fast would it go? (no TPU needed)
    python -m fgm_jax.main --config=configs/sd3_fgm.py --config.job=compile --workdir=runs/aot \
        --config.aot.architecture=sd3-medium --config.aot.topology=v5p:2x2x1 --config.mesh.fsdp=4
    # 4. a diffusers StableDiffusion3Pipeline folder (run it with num_inference_steps=1,
    #    guidance_scale=1.0)
    python -m fgm_jax.main --config=configs/sd3_fgm.py --config.job=export --workdir=runs/sd3_fgm \\
        --config.sd3.folder=...

Variant 'runlocal': tiny random SD3 components, a 4-prompt cache, 3 iterations on a CPU
(everything built under --workdir).

Provenance of the values (paper = FGM, Huang et al. 2024; SD3 = Esser et al. 2024; ours =
chosen here, not published for MM-DiT-FGM):
  t* = 1, alpha = 1, data-free, all three nets from the teacher ........... paper
  time sampler logit-normal(0, 1) with shift 3.0 ............................ SD3 (training
      distribution and the scheduler's shift in the SD3-Medium folder)
  CFG scale 7.0 on the teacher .............................................. ours (diffusers'
      StableDiffusion3Pipeline default; the paper does not state its scale)
  512 x 512, batch 32, Adam b1 = 0 lr 1e-5 (both nets), no EMA ............. ours
  teacher held in bf16, bf16 compute, fp32 weights/Adam, remat 'dots' ...... ours (memory:
      experiments/sd3_memory_estimate.md)
"""

import ml_collections

from configs import common


def get_config(variant=""):
  words = common.parse_variant(variant, ("runlocal",))
  c = common.sd3_inputs(common.base("train", "sd3_fgm"), words)
  # A prompt cache folder (configs/sd3_prompts.py) for distillation; config.prompts (a file)
  # for job=sample. ':runlocal' builds both from the tiny folder.
  c.prompt_cache = ml_collections.config_dict.placeholder(str)
  c.resolution = 512  # generated images are resolution x resolution (latents / 8)
  c.batch_size = 32
  c.num_steps = 20_000
  # The teacher is the folder's MM-DiT (sd3/trainer.FolderTeacher): its architecture is read
  # from <sd3.folder>/transformer at run time; these fields say how the three networks run
  # and how the teacher samples (job=compile's sampler).
  c.teacher = ml_collections.ConfigDict(dict(
      model=common.mmdit(dtype="bfloat16", remat="dots"),
      sample=dict(steps=28, method="euler", shift=3.0),
      # (height, width, channels) of one latent: from resolution and the folder's VAE.
      latent_shape=ml_collections.config_dict.placeholder(tuple)))
  c.fgm = ml_collections.ConfigDict(dict(
      common.fgm(), time_sampler="logit_normal", shift=3.0, guidance=7.0,
      teacher_dtype="bfloat16"))
  c.optim = common.optim(lr=1e-5, b1=0.0, b2=0.999)  # generator
  c.online_optim = common.optim(lr=1e-5, b1=0.0, b2=0.999)
  c.checkpoint.every = 500
  c.log.every = 10
  c.eval = ml_collections.ConfigDict(dict(fid=dict(every=0)))  # GenEval instead (job=sample)
  # job=sample: one step, no CFG (the generator has it built in). geneval: the path of
  # GenEval's evaluation_metadata.jsonl to write its folder layout instead of config.prompts.
  c.sample = ml_collections.ConfigDict(dict(
      num=0, seed=0, batch_size=4, weights="ema", output="images",
      geneval=ml_collections.config_dict.placeholder(str), images_per_prompt=4))
  # job=export: a diffusers folder; the teacher folder's other parts are hard-linked where
  # the file system allows (else copied).
  c.export.dtype = "float32"
  # A LoRA run (config.lora.rank > 0) also writes its adapters as diffusers' SD3 LoRA file
  # (None: <workdir>/lora/pytorch_lora_weights.safetensors).
  c.export.lora_output = ml_collections.config_dict.placeholder(str)
  if "runlocal" in words:
    common.runlocal(c, batch_size=8)  # 3 steps, a checkpoint and a log line each
    c.resolution = 16
    c.teacher.model.dtype = "float32"
    c.teacher.model.remat = "none"
    c.fgm.teacher_dtype = "float32"
    c.fgm.guidance = 3.0
    c.sample.batch_size = 8
  return c
