"""Shared pieces of the MM-DiT tests: random inputs and diffusers' forward on them."""

import numpy as np
import torch


def random_inputs(config, batch, height, width, text_len, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, height, width, config["in_channels"])).astype(np.float32)
  t = rng.uniform(size=batch).astype(np.float32)
  cond = {"context": rng.standard_normal(
              (batch, text_len, config["joint_attention_dim"])).astype(np.float32),
          "pooled": rng.standard_normal(
              (batch, config["pooled_projection_dim"])).astype(np.float32)}
  return x, t, cond


def torch_forward(model, x, t, cond):
  """diffusers forward on our NHWC / t-in-[0,1] inputs, returned as NHWC numpy."""
  with torch.no_grad():
    out = model(hidden_states=torch.from_numpy(x).permute(0, 3, 1, 2),
                encoder_hidden_states=torch.from_numpy(cond["context"]),
                pooled_projections=torch.from_numpy(cond["pooled"]),
                timestep=torch.from_numpy(t) * 1000, return_dict=False)[0]
  return out.permute(0, 2, 3, 1).numpy()
