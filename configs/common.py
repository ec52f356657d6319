"""Pieces every config shares, and the variant-string parser.

A variant is the text after ':' in --config=configs/x.py:variant, comma separated, e.g.
``configs/toy2d_fgm.py:checkerboard,quick``.

Every default lives here, once: the code reads config fields directly (no ``.get(name,
default)`` in fgm_jax), so a field a config file does not set comes from these functions.
"""

import ml_collections


def parse_variant(variant, known):
  """Set of variant words; unknown words stop with the list of known ones."""
  words = {w.strip() for w in (variant or "").split(",") if w.strip()}
  unknown = words - set(known)
  if unknown:
    raise ValueError(f"unknown config variant(s) {sorted(unknown)}; known: {sorted(known)}.")
  return words


def optim(lr, b1=0.9, b2=0.999, warmup_steps=0, grad_clip=0.0, ema_decay=0.0,
          extra_ema_decays=(), decay_steps=(), final_lr_scale=0.0):
  """decay_steps: () for a constant learning rate after the warm-up, or (start, end): a cosine
  fall from lr to final_lr_scale * lr between those steps, held after.
  extra_ema_decays (an FGM run's config.optim only): more generator EMAs tracked beside
  ema_decay's, e.g. (0.9996, 0.9999); each is weights 'ema_<decay>' for job=sample,
  evaluate and export ('ema' is ema_decay's, 'raw' the trained weights)."""
  return ml_collections.ConfigDict(dict(lr=lr, b1=b1, b2=b2, eps=1e-8, weight_decay=0.0,
                                        warmup_steps=warmup_steps, grad_clip=grad_clip,
                                        decay_steps=tuple(decay_steps),
                                        final_lr_scale=final_lr_scale,
                                        ema_decay=ema_decay,
                                        extra_ema_decays=tuple(extra_ema_decays)))


def mesh(data=-1, fsdp=1, tensor=1, rules=()):
  """data=-1 uses every device not taken by fsdp/tensor. rules map logical axis names to mesh
  axes; () means the model's own (mmdit.LOGICAL_RULES; shape-based FSDP for the others)."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, rules=rules))


def base(job, trainer):
  """trainer: the kind of training run this config describes (fgm_jax/train/kinds.py):
  'teacher' (flow matching on data), 'fgm' (FGM from a teacher run), 'sd3_fgm'."""
  c = ml_collections.ConfigDict()
  c.job = job
  c.trainer = trainer
  c.seed = 0
  c.mesh = mesh()
  c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True))
  # teacher_steps: the teacher's N-step panels in the training pictures (log.plot_every).
  c.log = ml_collections.ConfigDict(dict(every=100, plot_every=0, teacher_steps=(4, 50)))
  # weights (here, in export and in eval): which of the run's weights ('ema', 'raw', an FGM
  # run's 'ema_<decay>' of config.optim.extra_ema_decays).
  c.sample = ml_collections.ConfigDict(dict(steps=50, method="euler", shift=1.0, num=10000,
                                            seed=1, weights="ema", output="samples.npz"))
  # job=export (FGM runs): output folder (None: <workdir>/generator), which weights.
  c.export = ml_collections.ConfigDict(dict(
      output=ml_collections.config_dict.placeholder(str), weights="ema"))
  c.aot = aot()
  c.compilation_cache = compilation_cache()
  if trainer != "teacher":  # FGM runs: generator and online flow as adapters (off: rank 0)
    c.lora = lora()
  return c


def lora(rank=0, alpha=None, targets=("attention", "mlp")):
  """config.lora (fgm_jax/models/lora.py): low-rank adapters over the frozen teacher instead
  of two full trained copies. rank 0: off (full fine-tuning). alpha: scale s = alpha / rank
  (None: alpha = rank, s = 1, diffusers' convention). targets: which projections, from the
  model's LORA_TARGETS (MM-DiT: 'attention' (q/k/v/out of both streams), 'mlp', 'adaln')."""
  return ml_collections.ConfigDict(dict(
      rank=rank, alpha=ml_collections.config_dict.placeholder(float) if alpha is None
      else alpha, targets=targets))


def aot():
  """job=compile (fgm_jax/aot.py): compile the run's jitted functions ahead of time.

  topology: a TPU slice to compile for without one, e.g. 'v5p:2x2x1' (needs libtpu:
    pip install "jax[tpu]"); None: this machine's devices.
  architecture: SD3 FGM configs without an sd3.folder: a built-in MM-DiT shape
    ('sd3-medium'); None: read from sd3.folder's config.json files.
  num_layers: MM-DiT depth override for compile-time studies (0: the architecture's own).
  sample_batch: global batch of the compiled samplers (0: config.batch_size).
  functions: which to compile (names as printed; () all of them).
  output: the report, written into --workdir.
  """
  return ml_collections.ConfigDict(dict(
      topology=ml_collections.config_dict.placeholder(str),
      architecture=ml_collections.config_dict.placeholder(str), num_layers=0,
      sample_batch=0, functions=(), output="aot.json"))


def compilation_cache():
  """jax's persistent compilation cache for training runs: a restart (preemption, a second
  job of the same shape) loads its programs instead of compiling them. dir None:
  <workdir>/compilation_cache (on a pod, a shared bucket path lets every host and every
  restart share it; BUILD.md)."""
  return ml_collections.ConfigDict(dict(
      enabled=True, dir=ml_collections.config_dict.placeholder(str)))


def times(time_sampler="uniform", t_min=0.0, t_max=1.0, logit_mean=0.0, logit_std=1.0,
          shift=1.0):
  """How a flow-matching loss draws t (flow.sample_time): uniform on [t_min, t_max], or
  SD3's logit-normal with a time shift."""
  return dict(time_sampler=time_sampler, t_min=t_min, t_max=t_max, logit_mean=logit_mean,
              logit_std=logit_std, shift=shift)


def fgm(alpha=1.0, weighting="sid_norm", t_star=1.0):
  """FGM loss settings; the defaults are DESIGN.md's (uniform t in [0, 1], one online-flow
  update per generator update). guidance: the teacher's CFG scale in conditional runs (1: no
  guidance); teacher_dtype: how the frozen teacher is held on the devices; init_generator /
  init_online: 'teacher' (DESIGN.md) or 'random' (the model's own init; ablations);
  init_generator 'run': a fine-tuning stage, the generator starting from the weights
  init_weights ('ema', 'raw', 'ema_<decay>') of the finished FGM run at init_run.
  real_data: RealUID's real-data supervision (fgm.py; off: FGM is data-free); its alpha and
  beta are the paper's, not config.fgm.alpha (with it on, config.fgm.alpha must be 0.5)."""
  return dict(alpha=alpha, weighting=weighting, t_star=t_star, online_steps=1, guidance=1.0,
              teacher_dtype="float32", init_generator="teacher", init_online="teacher",
              init_run=ml_collections.config_dict.placeholder(str), init_weights="ema",
              real_data=real_data(), **times())


def real_data(enabled=False, alpha=1.0, beta=1.0, allow_beta_above_one=False):
  """config.fgm.real_data (RealUID, Kornilov et al. 2026; DESIGN.md §2): the FGM run reads
  its teacher's data source as a second, step-keyed stream. Their headline: unconditional
  alpha 0.92, beta 0.94 (beta/alpha about 1.02); conditional 0.98, 0.96. The paper keeps
  alpha, beta in (0, 1]; allow_beta_above_one opts into beta > 1 (a negative real-data target
  scale), which in our analysis (experiments/results/mnist5k_realuid.md) is the direction
  that pulls an imperfect teacher's student toward the data."""
  return dict(enabled=enabled, alpha=alpha, beta=beta,
              allow_beta_above_one=allow_beta_above_one)


def evaluation(num_samples):
  """job=evaluate / pipeline: teacher Euler 1, 4, 50 steps (and FGM 1 step) from seed 123.

  classifier_dir: where the digits classifier is cached (None: beside the run's workdir).
  fid: FID settings (``fid()``; off unless its ``inception`` weights are given).
  weights: the generator weights of the FGM 1-step set ('ema', 'raw', 'ema_<decay>').
  """
  return ml_collections.ConfigDict(dict(
      num_samples=num_samples, teacher_steps=(1, 4, 50), seed=123, output="eval.json",
      classifier_dir=ml_collections.config_dict.placeholder(str), fid=fid(), weights="ema"))


def fid():
  """config.eval.fid for image data sets without a metric of their own (tfds: CIFAR-10).

  inception: converted Inception weights (python -m fgm_jax.convert.inception); None: no FID,
    sample sets are still drawn for pictures.
  reference: an .npz with mu/sigma (EDM's cifar10-32x32.npz, pytorch-fid --save-stats); None:
    computed once from the tfds split ``reference_split`` and cached beside the run.
  quantize: 'round' (EDM, StyleGAN) or 'truncate' (score_sde / RectifiedFlow's own FIDs).
  image_size: 299 is FID's; smaller sizes (>= 75) only make CPU smoke tests cheap.
  batch_size: global images per feature batch (split over the data devices).
  every: during training, FID of what the run trains (generator, or the teacher with
    config.sample.steps) every this many steps, from ``every_num`` samples; 0: off.
  """
  return ml_collections.ConfigDict(dict(
      inception=ml_collections.config_dict.placeholder(str),
      reference=ml_collections.config_dict.placeholder(str),
      reference_split="train", quantize="round", image_size=299, batch_size=500,
      every=0, every_num=10_000))


def mmdit(**fields):
  """config.model of an MM-DiT: how it runs (dtype, attention_impl, remat) and its params
  layout (scan_layers: one nn.scan over the identical joint blocks, compile time flat in
  depth; False unrolls them). Its diffusers keys come from a folder's config.json at run time
  (sd3/trainer.FolderTeacher) or from ``fields``."""
  return dict(dict(name="mmdit", dtype="float32", attention_impl="xla", remat="none",
                   scan_layers=True), **fields)


def runlocal(c, batch_size, samples=None):
  """Shrinks a config to a 3-step CPU smoke run that still checkpoints and logs each step."""
  c.batch_size = batch_size
  c.num_steps = 3
  c.checkpoint.every = 3
  c.log.every = 1
  c.log.plot_every = 0
  if samples:
    c.sample.num = samples
    c.eval.num_samples = samples
  return c


def sd3():
  """The SD3 diffusers folder every SD3 config reads, and how its prompts are encoded."""
  return ml_collections.ConfigDict(dict(
      folder=ml_collections.config_dict.placeholder(str),  # a local SD3 diffusers folder
      t5_length=256,  # diffusers' max_sequence_length default; 77 as several peers use
      dtype="float32",  # compute dtype; "bfloat16" on accelerators
      # :runlocal smoke runs: build a tiny random folder in <workdir>/tiny_sd3 (and a prompt
      # file beside it) when folder / prompts are not given. Never a real model.
      tiny_random=False))


def sd3_run(job, variant):
  """(config, variant words) shared by the SD3 folder configs: the folder, the prompts (a
  file, or for sampling also a prompt cache) and the ':runlocal' tiny random components."""
  words = parse_variant(variant, ("runlocal",))
  c = ml_collections.ConfigDict()
  c.job = job
  # Sampling and prompt-cache configs train nothing; configs/sd3_fgm.py sets 'sd3_fgm'.
  c.trainer = "sd3_folder"
  c.seed = 0
  c.mesh = mesh()
  c.aot = aot()
  c.compilation_cache = compilation_cache()
  return sd3_inputs(c, words), words


def sd3_inputs(c, words):
  """Adds what every SD3 config reads (the folder, a prompt file) to ``c``; ':runlocal' in
  ``words``: tiny random SD3 components built on the fly, a CPU smoke run."""
  c.sd3 = sd3()
  c.prompts = ml_collections.config_dict.placeholder(str)
  if "runlocal" in words:
    c.sd3.tiny_random = True
    c.sd3.t5_length = 32
  return c
