"""A tiny random SD3 diffusers folder, built offline, for parity tests against diffusers.

Every component is a real diffusers / transformers class with tiny sizes and random weights;
the tokenizers are real CLIP (byte-level BPE) and T5 (unigram) tokenizers over tiny
vocabularies built here, since no tokenizer files can be downloaded.
"""

import json
import os

import numpy as np

# Widths: CLIP-L 16 (+ projection 16), CLIP-G 24 (+ 24): context 40 zero-padded to T5's 48;
# pooled 16 + 24 = 40.
CLIP_L = dict(hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=3,
              num_attention_heads=2, hidden_act="quick_gelu", eos_token_id=2)
CLIP_G = dict(hidden_size=24, intermediate_size=48, projection_dim=24, num_hidden_layers=3,
              num_attention_heads=3, hidden_act="gelu")
T5 = dict(d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, feed_forward_proj="gated-gelu")
CLIP_LENGTH = 77
PROMPT_TEXTS = ["a photo of a cat", "a red car and a blue dog", "two bananas on a table",
                "the quick brown fox jumps over the lazy dog"]


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
  tk.train_from_iterator(PROMPT_TEXTS * 20, trainer)
  tk.post_processor = processors.TemplateProcessing(
      single="$A </s>", special_tokens=[("</s>", tk.token_to_id("</s>"))])
  tok = T5TokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                        unk_token="<unk>", extra_ids=0)
  tok.save_pretrained(folder)
  return tok


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
  transformer = SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=T5["d_model"], caption_projection_dim=16,
      pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
      out_channels=4, pos_embed_max_size=8)
  vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                      up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                      block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                      use_quant_conv=False, use_post_quant_conv=False,
                      shift_factor=0.0609, scaling_factor=1.5035)
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
