"""Diagnostics of layers without a bias, in both forms, against brute force.

The forms of :mod:`kfac_jax_lite.diagnostics` add a bias's 1 to ``||a||²`` /
``a·a'`` or as ``||Σ_t ds_t||²``; here no layer has a bias (the ResNet's
convolutions, before BatchNorm), so those terms must vanish. Oracle:
``jax.vmap(jax.grad)`` via :func:`test_diagnostics.check`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from kfac_jax_lite.diagnostics import use_gram
from test_diagnostics import K, B, check, flax_case


class BiasFreeCnn(nn.Module):
  """A same-padded 3x3 convolution (``g_n`` formed), a strided valid one (Gram
  form) and a dense head (one position), none with a bias."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x))
    h = jnp.tanh(nn.Conv(8, (3, 3), strides=(2, 2), padding="VALID", use_bias=False)(h))
    return nn.Dense(K, use_bias=False)(h.reshape(h.shape[0], -1))


def test_bias_free_conv_both_forms():
  assert not use_gram(25, 2 * 9, 4, columns=True)  # both forms run
  assert use_gram(4, 4 * 9, 8, columns=True)
  rng = np.random.default_rng(1)
  case = flax_case(BiasFreeCnn(), rng.normal(size=(B, 5, 5, 2)).astype(np.float32),
                   rng.integers(0, K, B))
  check(*case, {f"['{m}']['kernel']": [f"['{m}']['kernel']"]
                for m in ("Conv_0", "Conv_1", "Dense_0")})
