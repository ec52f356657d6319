"""SD3 prompt encoding in JAX equals diffusers' StableDiffusion3Pipeline.encode_prompt.

A tiny random SD3 folder (CLIP-L-like, CLIP-G-like, T5-like encoders and real tokenizers over
tiny vocabularies) is saved with diffusers and read back by fgm_jax.sd3.text; context, pooled
and the negative (empty-prompt) embeddings must match diffusers' in fp32.
"""

import os
import shutil

import numpy as np
import pytest

from fgm_jax.sd3 import text
from tests.parity.reference import sd3_reference as ref

torch = pytest.importorskip("torch")
TOL = 1e-5


@pytest.fixture(scope="module")
def folders(sd3_tiny, tmp_path_factory):
  no_t5 = str(tmp_path_factory.mktemp("sd3") / "no_t5")
  return {"full": sd3_tiny, "no_t5": (no_t5, ref.build_pipeline(no_t5, with_t5=False))}


def _diffusers(pipe, prompts, t5_length):
  with torch.no_grad():
    ctx, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True,
        max_sequence_length=t5_length)
  return [x.numpy() for x in (ctx, pooled, neg, neg_pooled)]


@pytest.mark.parametrize("name,t5_length", [("full", 256), ("full", 77), ("no_t5", 256)])
def test_encode_prompt_matches_diffusers(folders, name, t5_length):
  folder, pipe = folders[name]
  prompts = ref.prompts_with_edge_cases(pipe.tokenizer)
  want_ctx, want_pooled, want_neg, want_neg_pooled = _diffusers(pipe, prompts, t5_length)
  encoders = text.load(folder, t5_length=t5_length)
  ctx, pooled = text.encode_prompt(encoders, prompts)
  neg, neg_pooled = text.encode_prompt(encoders, [""])
  assert ctx.shape == want_ctx.shape == (len(prompts), ref.CLIP_LENGTH + t5_length,
                                         ref.T5["d_model"])
  assert pooled.shape == want_pooled.shape == (len(prompts), 40)
  assert ref.max_rel_err(ctx, want_ctx) <= TOL
  assert ref.max_rel_err(pooled, want_pooled) <= TOL
  # diffusers repeats the empty prompt's embedding for every prompt of the batch.
  assert ref.max_rel_err(np.repeat(neg, len(prompts), 0), want_neg) <= TOL
  assert ref.max_rel_err(np.repeat(neg_pooled, len(prompts), 0), want_neg_pooled) <= TOL
  if name == "no_t5":
    assert not np.any(ctx[:, ref.CLIP_LENGTH:])  # zeros where T5 would be, as diffusers


def test_over_long_prompts_are_truncated_and_counted(folders, caplog):
  folder, pipe = folders["full"]
  encoders = text.load(folder)
  prompts = ref.prompts_with_edge_cases(pipe.tokenizer)
  ids = text.tokenize(encoders, prompts)
  assert ids["clip_l"].shape == (len(prompts), ref.CLIP_LENGTH)
  assert "1 of 5 prompts were longer than CLIP-L's 77 tokens" in caplog.text


def test_folder_missing_a_part_names_it(folders, tmp_path):
  folder, _ = folders["full"]
  broken = str(tmp_path / "broken")
  shutil.copytree(folder, broken)
  shutil.rmtree(os.path.join(broken, "tokenizer_2"))
  with pytest.raises(text.SD3FolderError, match="tokenizer_2.*CLIP-G tokenizer"):
    text.load(broken)
  with pytest.raises(text.SD3FolderError, match="is missing"):
    text.load(str(tmp_path / "nowhere"))
