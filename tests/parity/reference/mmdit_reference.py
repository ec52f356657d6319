"""Shared pieces of the MM-DiT tests: random inputs and weights, diffusers' forward."""

import numpy as np

from fgm_jax.convert import common


def random_inputs(config, batch, height, width, text_len, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, height, width, config["in_channels"])).astype(np.float32)
  t = rng.uniform(size=batch).astype(np.float32)
  cond = {"context": rng.standard_normal(
              (batch, text_len, config["joint_attention_dim"])).astype(np.float32),
          "pooled": rng.standard_normal(
              (batch, config["pooled_projection_dim"])).astype(np.float32)}
  return x, t, cond


def random_params(abstract_params, seed=0):
  """Random float32 weights for an (unboxed) abstract parameter tree: kernels scaled by
  1/sqrt(fan-in), norm scales near 1, so activations stay O(1) through the blocks."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, a in common.flatten(abstract_params).items():
    z = rng.standard_normal(a.shape).astype(np.float32)
    scale = 1 / np.sqrt(np.prod(a.shape[:-1])) if path[-1] == "kernel" else 0.2
    out[path] = (z * scale + (1.0 if path[-1] == "scale" else 0.0)).astype(np.float32)
  return common.unflatten(out)


def torch_forward(model, x, t, cond):
  """diffusers forward on our NHWC / t-in-[0,1] inputs, returned as NHWC numpy."""
  import torch
  with torch.no_grad():
    out = model(hidden_states=torch.from_numpy(x).permute(0, 3, 1, 2),
                encoder_hidden_states=torch.from_numpy(cond["context"]),
                pooled_projections=torch.from_numpy(cond["pooled"]),
                timestep=torch.from_numpy(t) * 1000, return_dict=False)[0]
  return out.permute(0, 2, 3, 1).numpy()
