"""The padded-and-masked attention used for cuDNN equals plain softmax attention.

cuDNN's flash-attention backward rejects SD3's 1,024 + 333 tokens, so mmdit pads q/k/v and
masks the pad. Checked here with the XLA implementation (no GPU needed) against a numpy
softmax reference, forward and backward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgm_jax.models import mmdit


def numpy_attention(q, k, v):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", w, v)


@pytest.mark.parametrize("t,s,multiple", [(37, 45, 32), (24, 24, 16), (5, 130, 128)])
def test_padded_attention_matches_reference(t, s, multiple):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(t + s), 3)
  q = jax.random.normal(kq, (2, t, 3, 8))
  k, v = jax.random.normal(kk, (2, s, 3, 8)), jax.random.normal(kv, (2, s, 3, 8))
  out = mmdit.padded_attention(q, k, v, "xla", multiple)
  assert out.shape == q.shape
  np.testing.assert_allclose(out, numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_padded_attention_gradients_match_unpadded():
  kq, kk, kv, kr = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, (2, 29, 2, 8)) for key in (kq, kk, kv))
  r = jax.random.normal(kr, q.shape)
  loss = lambda attn: lambda *a: jnp.vdot(attn(*a), r)
  padded = jax.grad(loss(lambda *a: mmdit.padded_attention(*a, "xla", 16)), (0, 1, 2))
  plain = jax.grad(loss(lambda *a: jax.nn.dot_product_attention(*a)), (0, 1, 2))
  for a, b in zip(padded(q, k, v), plain(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
