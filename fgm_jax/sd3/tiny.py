"""A tiny random SD3 diffusers folder, built offline without torch: the `:runlocal` smoke runs.

Every component is written by our own exporters in the formats a real SD3 folder uses
(diffusers safetensors for the MM-DiT and VAE, transformers safetensors for CLIP-L, CLIP-G
and T5, tokenizer files, the scheduler config), so a smoke run goes through exactly the
loading code a real folder does. The tokenizers are real CLIP (byte-level BPE) and T5
(unigram) tokenizers over tiny vocabularies built here. Sizes are the tests' (tests use the
same tokenizers, with torch-initialised models, against diffusers).
"""

import hashlib
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from fgm_jax import paths

CLIP_LENGTH = 77
PROMPTS = ("a photo of a cat", "a red car and a blue dog", "two bananas on a table",
           "the quick brown fox jumps over the lazy dog")
CLIP_L = dict(hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=3,
              num_attention_heads=2, hidden_act="quick_gelu", eos_token_id=2)
CLIP_G = dict(hidden_size=24, intermediate_size=48, projection_dim=24, num_hidden_layers=3,
              num_attention_heads=3, hidden_act="gelu")
T5 = dict(d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=16,
          feed_forward_proj="gated-gelu")
MMDIT = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=T5["d_model"],
             caption_projection_dim=16,
             pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
             out_channels=4, pos_embed_max_size=8)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
           block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
           use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
           scaling_factor=1.5035, sample_size=16)


def _bytes_to_unicode():
  """CLIP's reversible byte -> printable-character table (the BPE alphabet)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  extra = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + extra)
      extra += 1
  return dict(zip(bs, [chr(c) for c in cs]))


def clip_tokenizer(folder, pad_token="<|endoftext|>"):
  """A CLIP tokenizer with the byte alphabet and a few merges (model_max_length 77)."""
  from transformers import CLIPTokenizer
  os.makedirs(folder, exist_ok=True)
  chars = list(_bytes_to_unicode().values())
  merges = ["t h", "th e</w>", "a n", "an d</w>", "o n</w>", "c a", "ca t</w>", "d o", "do g</w>"]
  vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                      pad_token=pad_token, model_max_length=CLIP_LENGTH)
  tok.save_pretrained(folder)
  return tok


def t5_tokenizer(folder):
  """A T5 (unigram, sentencepiece-style) tokenizer trained on a few sentences."""
  import tokenizers
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
  from transformers import T5TokenizerFast
  tk = tokenizers.Tokenizer(models.Unigram())
  tk.normalizer = normalizers.NFKC()
  tk.pre_tokenizer = pre_tokenizers.Metaspace()
  tk.decoder = decoders.Metaspace()
  trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                    unk_token="<unk>")
  tk.train_from_iterator(list(PROMPTS) * 20, trainer)
  # The trainer's scores differ in their last bits between processes (summation order), and
  # it orders pieces of equal score by hash: rounded and sorted, every build gives the same
  # file and ids (a gs:// workdir's tiny folder is built on each VM).
  model = json.loads(tk.to_str())["model"]
  vocab = [(piece, round(score, 6)) for piece, score in model["vocab"]]
  special, pieces = vocab[:3], vocab[3:]  # <pad>, </s>, <unk> keep ids 0-2
  tk.model = models.Unigram(special + sorted(pieces, key=lambda p: (-p[1], p[0])),
                            unk_id=model["unk_id"], byte_fallback=model["byte_fallback"])
  tk.post_processor = processors.TemplateProcessing(
      single="$A </s>", special_tokens=[("</s>", tk.token_to_id("</s>"))])
  tok = T5TokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                        unk_token="<unk>", extra_ids=0)
  tok.save_pretrained(folder)
  return tok


# What diffusers' StableDiffusion3Pipeline.from_pretrained reads to find the parts.
MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _write_transformers(folder, config, state):
  from safetensors.numpy import save_file
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def _draw(shapes, rng):
  """Random weights for a shape tree, drawn on the host: normal(0, 0.02) for kernels and
  embeddings, 1 for norm scales, small normals for biases. No init program is compiled
  (five of them took ~35 s of a smoke run on 2 cores)."""
  gen = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())

  def draw(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "weight") and len(a.shape) == 1:
      return np.ones(a.shape, np.float32)
    std = 0.01 if name == "bias" else 0.02
    return (std * gen.standard_normal(a.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _random(module, rng, *args):
  from flax import linen as nn
  shapes = nn.unbox(jax.eval_shape(module.init, rng, *args))["params"]
  return _draw(shapes, rng)


def build(folder: str, seed: int = 0) -> str:
  """Writes the tiny folder (skipped when it is already complete); returns its path."""
  from fgm_jax.convert import clip_keys, diffusers as dconv, t5_keys
  from fgm_jax.models import clip, mmdit, t5, vae
  if os.path.isfile(os.path.join(folder, "model_index.json")):
    return folder
  rngs = jax.random.split(jax.random.PRNGKey(seed), 5)
  tok_l = clip_tokenizer(os.path.join(folder, "tokenizer"))
  clip_tokenizer(os.path.join(folder, "tokenizer_2"), pad_token="!")
  tok_t5 = t5_tokenizer(os.path.join(folder, "tokenizer_3"))
  ids = jnp.zeros((1, CLIP_LENGTH), jnp.int32)
  for sub, encoder_kwargs, rng in (("text_encoder", CLIP_L, rngs[0]),
                                   ("text_encoder_2", CLIP_G, rngs[1])):
    config = dict(clip.TRANSFORMERS_DEFAULTS, vocab_size=len(tok_l),
                  max_position_embeddings=CLIP_LENGTH, **encoder_kwargs)
    if sub == "text_encoder_2":
      config["eos_token_id"] = tok_l.convert_tokens_to_ids("<|endoftext|>")
    module = clip.from_transformers_config(config)
    config = clip.transformers_config(module)
    _write_transformers(os.path.join(folder, sub), config,
                        clip_keys.state_from_params(_random(module, rng, ids), config))
  config = dict(t5.TRANSFORMERS_DEFAULTS, vocab_size=len(tok_t5), **T5)
  module = t5.from_transformers_config(config)
  config = dict(t5.transformers_config(module), architectures=["T5EncoderModel"],
                model_type="t5")
  _write_transformers(os.path.join(folder, "text_encoder_3"), config,
                      t5_keys.state_from_params(_random(module, rngs[2], ids[:, :8]), config))
  module = mmdit.from_diffusers_config(MMDIT)
  x, t, cond = mmdit.dummy_inputs(module, height=8, width=8)
  dconv.save_params(os.path.join(folder, "transformer"), "mmdit", mmdit.diffusers_config(module),
                    _random(module, rngs[3], x, t, cond))
  module = vae.from_config(VAE)
  dconv.save_params(os.path.join(folder, "vae"), "vae", VAE,
                    {"params": _draw(vae.param_shapes(module)["params"], rngs[4])})
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
               "shift": 3.0}, f)
  with open(os.path.join(folder, "model_index.json"), "w") as f:  # written last: complete
    json.dump(MODEL_INDEX, f, indent=2)
  return folder


def prompts_file(folder: str) -> str:
  path = os.path.join(folder, "prompts.txt")
  paths.write_text(path, "\n".join(PROMPTS) + "\n")
  return path


def folder_for(workdir: str) -> str:
  """Where a :runlocal run's tiny folder is: <workdir>/tiny_sd3; for a gs:// workdir a local
  folder named after it, since diffusers and transformers (and our loaders) read an SD3
  folder with local file calls."""
  if not paths.is_remote(workdir):
    return os.path.join(workdir, "tiny_sd3")
  digest = hashlib.sha256(str(workdir).rstrip("/").encode("utf-8")).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), "fgm_jax_tiny_sd3", digest)


def _build_shared(folder: str) -> str:
  """build() into a temporary sibling renamed into place: processes of one host sharing the
  folder of a gs:// workdir never see a half-built one."""
  if os.path.isfile(os.path.join(folder, "model_index.json")):
    return folder
  tmp = f"{folder}.{os.getpid()}.tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  build(tmp)
  try:
    os.rename(tmp, folder)
  except OSError:  # another process's folder got there first: use that one
    shutil.rmtree(tmp, ignore_errors=True)
  return folder


def resolve(config, workdir):
  """``config`` with sd3.folder / prompts filled in for a :runlocal run (built on first use
  under <workdir>, the folder locally for a gs:// workdir: folder_for); unchanged for a real
  folder."""
  if not config.sd3.tiny_random or (config.sd3.folder and config.prompts):
    return config
  c = config.copy_and_resolve_references()
  if not c.sd3.folder:
    folder = folder_for(workdir)
    c.sd3.folder = _build_shared(folder) if paths.is_remote(workdir) else build(folder)
  if not c.prompts:
    paths.makedirs(workdir)
    c.prompts = prompts_file(workdir)
  return c
