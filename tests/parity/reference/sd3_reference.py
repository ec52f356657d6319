"""A tiny random SD3 diffusers folder, built offline, for parity tests against diffusers.

Every component is a real diffusers / transformers class with tiny sizes and random weights;
the tokenizers are real CLIP (byte-level BPE) and T5 (unigram) tokenizers over tiny
vocabularies built here, since no tokenizer files can be downloaded.
"""

import os

import numpy as np

# Widths: CLIP-L 16 (+ projection 16), CLIP-G 24 (+ 24): context 40 zero-padded to T5's 48;
# pooled 16 + 24 = 40. Sizes and tokenizers are fgm_jax.sd3.tiny's (the :runlocal folder),
# here with torch-initialised models.
from fgm_jax.sd3.tiny import (CLIP_G, CLIP_L, CLIP_LENGTH, MMDIT, PROMPTS, T5, VAE,
                              clip_tokenizer, t5_tokenizer)

PROMPT_TEXTS = list(PROMPTS)


def build_pipeline(folder, with_t5=True, seed=0):
  """Saves a tiny StableDiffusion3Pipeline to ``folder``; returns the torch pipeline."""
  import torch
  from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler,
                         SD3Transformer2DModel, StableDiffusion3Pipeline)
  from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, T5Config,
                            T5EncoderModel)
  torch.manual_seed(seed)
  tok_l = clip_tokenizer(os.path.join(folder, "tokenizer"))
  tok_g = clip_tokenizer(os.path.join(folder, "tokenizer_2"), pad_token="!")
  vocab = len(tok_l)
  enc_l = CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=vocab, max_position_embeddings=CLIP_LENGTH, **CLIP_L))
  enc_g = CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=vocab, max_position_embeddings=CLIP_LENGTH,
      eos_token_id=tok_g.convert_tokens_to_ids("<|endoftext|>"), **CLIP_G))
  parts = dict(text_encoder=enc_l, tokenizer=tok_l, text_encoder_2=enc_g, tokenizer_2=tok_g,
               text_encoder_3=None, tokenizer_3=None)
  if with_t5:
    tok_t5 = t5_tokenizer(os.path.join(folder, "tokenizer_3"))
    parts["text_encoder_3"] = T5EncoderModel(T5Config(vocab_size=len(tok_t5), **T5))
    parts["tokenizer_3"] = tok_t5
  transformer = SD3Transformer2DModel(**MMDIT)
  vae = AutoencoderKL(**VAE)
  pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **parts)
  for part in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, transformer, vae):
    if part is not None:
      part.eval()  # T5's dropout_rate would otherwise act (from_pretrained sets eval too)
  pipe.save_pretrained(folder, safe_serialization=True)
  return pipe


def prompts_with_edge_cases(tokenizer):
  """Several prompts: plain ones, the empty one, and one longer than 77 CLIP tokens."""
  long = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
  assert len(tokenizer(long).input_ids) > CLIP_LENGTH
  return PROMPT_TEXTS[:3] + ["", long]


def max_rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))
