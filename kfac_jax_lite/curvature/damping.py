"""Factored Tikhonov damping (Martens & Grosse 2015, §6.3; Ba et al. 2017, eq. 3, 12).

Adding ``λ I`` to a Kronecker product ``A_1 ⊗ ... ⊗ A_k`` is approximated by
adding ``π_i λ^{1/k} I`` to each factor, with ``prod π_i = 1`` and ``π_i``
chosen from the factors' average eigenvalues (trace norms):
``π_i = (tr A_i / dim A_i) / (prod_j tr A_j / dim A_j)^{1/k}``.
For ``k = 2`` this is ``π = sqrt((tr A / dim A) / (tr G / dim G))``, adding
``π √λ`` to ``A`` and ``√λ / π`` to ``G``.

Relative damping (``InverseOptions(relative_damping=True)``) reads ``λ`` as a
fraction of the block's mean eigenvalue ``prod_i tr A_i / dim A_i`` (that of
``A_1 ⊗ ... ⊗ A_k``), so factor ``i`` gets ``λ^{1/k} tr A_i / dim A_i``: one
value suits layers and models whose curvature differs by orders of magnitude
(inputs' scale, classes, confidence), and a layer whose inputs are scaled by
``c`` (weights by ``1/c``) gets the same step in function space.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

_TINY = 1e-12


def diagonal_of(m: jax.Array) -> jax.Array:
  """The diagonal of a square matrix; a vector is a diagonal matrix's own."""
  return m if m.ndim == 1 else jnp.diagonal(m)


def mean_eig(m: jax.Array) -> jax.Array:
  """``tr m / dim m`` (at least 1e-12); a vector stands for a diagonal matrix."""
  return jnp.maximum(jnp.mean(diagonal_of(m)), _TINY)


def pi_factors(factors: Sequence[jax.Array]) -> list[jax.Array]:
  """The ``π_i`` of Ba et al. eq. 12 for ``k = len(factors)`` factors.

  Args:
    factors: square symmetric positive semi-definite matrices (a vector is
      the diagonal of a diagonal factor).

  Returns:
    One scalar per factor; their product is 1.
  """
  logs = [jnp.log(mean_eig(f)) for f in factors]
  mean_log = sum(logs) / len(logs)
  return [jnp.exp(l - mean_log) for l in logs]


def factored_damping(factors: Sequence[jax.Array], damping: jax.Array | float,
                     relative: bool = False) -> list[jax.Array]:
  """Per-factor diagonal shifts ``π_i λ^{1/k}`` (Ba et al. eq. 12).

  Args:
    factors: the ``k`` Kronecker factors.
    damping: the Tikhonov damping ``λ`` of the whole block.
    relative: ``λ`` is a fraction of the block's mean eigenvalue: the shifts
      are ``λ^{1/k} tr A_i / dim A_i`` (those of the absolute damping
      ``λ prod_j tr A_j / dim A_j``).

  Returns:
    The scalar to add to each factor's diagonal.
  """
  root = jnp.asarray(damping, jnp.float32) ** (1.0 / len(factors))
  if relative:
    return [mean_eig(f) * root for f in factors]
  return [p * root for p in pi_factors(factors)]


def tikhonov(diagonal: jax.Array, damping: jax.Array | float,
             relative: bool = False) -> jax.Array:
  """Plain Tikhonov ``λ`` for a block that is not a Kronecker product.

  Args:
    diagonal: the block's diagonal entries (any shape).
    damping: ``λ``.
    relative: ``λ`` is a fraction of the block's mean eigenvalue (its mean
      diagonal entry).

  Returns:
    The scalar to add to the block's diagonal.
  """
  lam = jnp.asarray(damping, jnp.float32)
  return lam * mean_eig(diagonal.reshape(-1)) if relative else lam
