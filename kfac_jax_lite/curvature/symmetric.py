"""A symmetric matrix as its upper triangle, packed without gathers.

Averaging factors over devices sends only their ``n(n+1)/2`` independent
entries. ``x[jnp.triu_indices(n)]`` would pack them, but gathers and scatters
are slow on CPU (milliseconds per step for a few 257 × 257 factors); this
packing uses only transposes, pads and masks (the rectangular full packed
layout): with ``n = 2k`` (an odd ``n`` is padded by one zero row and
column) and ``x = [[x11, x12], [x21, x22]]`` in ``k × k`` blocks, the block
``x12`` is kept whole and the triangles of ``x11`` and ``x22`` share one
``(k + 1) × k`` rectangle.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp


def packed_size(n: int) -> int:
  """Entries of :func:`pack` for an ``n × n`` matrix (``n(n+1)/2``, ``n`` even)."""
  m = n + n % 2
  return m * (m + 1) // 2


def _masks(k: int) -> np.ndarray:
  """``(k + 1) × k``: True where the rectangle holds ``triu(x11)``."""
  return np.arange(k + 1)[:, None] <= np.arange(k)[None, :]


def pack(x: jax.Array) -> jax.Array:
  """The independent entries of a symmetric ``x`` as a vector.

  Args:
    x: ``[n, n]`` symmetric.

  Returns:
    ``[packed_size(n)]``; only the upper triangle of ``x`` is read.
  """
  n = x.shape[0]
  m = n + n % 2
  x = jnp.pad(x, ((0, m - n), (0, m - n)))
  k = m // 2
  x11, x12, x22 = x[:k, :k], x[:k, k:], x[k:, k:]
  rect = jnp.where(_masks(k), jnp.pad(x11, ((0, 1), (0, 0))), jnp.pad(x22.T, ((1, 0), (0, 0))))
  return jnp.concatenate([x12.reshape(-1), rect.reshape(-1)])


def unpack(p: jax.Array, n: int) -> jax.Array:
  """Inverse of :func:`pack`: the symmetric ``[n, n]`` matrix."""
  m = n + n % 2
  k = m // 2
  x12 = p[:k * k].reshape(k, k)
  rect = p[k * k:].reshape(k + 1, k)
  mask = _masks(k)
  u11 = jnp.where(mask[:k], rect[:k], 0.0)  # triu(x11)
  u22 = jnp.where(mask[1:], 0.0, rect[1:]).T  # triu(x22)
  x11 = u11 + jnp.triu(u11, 1).T
  x22 = u22 + jnp.triu(u22, 1).T
  x = jnp.concatenate([jnp.concatenate([x11, x12], 1), jnp.concatenate([x12.T, x22], 1)], 0)
  return x[:n, :n]
