"""Factored Tikhonov damping (Martens & Grosse 2015, §6.3; Ba et al. 2017, eq. 3, 12).

Adding ``λ I`` to a Kronecker product ``A_1 ⊗ ... ⊗ A_k`` is approximated by
adding ``π_i λ^{1/k} I`` to each factor, with ``prod π_i = 1`` and ``π_i``
chosen from the factors' average eigenvalues (trace norms):
``π_i = (tr A_i / dim A_i) / (prod_j tr A_j / dim A_j)^{1/k}``.
For ``k = 2`` this is ``π = sqrt((tr A / dim A) / (tr G / dim G))``, adding
``π √λ`` to ``A`` and ``√λ / π`` to ``G``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

_TINY = 1e-12


def _mean_eig(m: jax.Array) -> jax.Array:
  """``tr m / dim m``; a vector stands for a diagonal matrix."""
  diag = m if m.ndim == 1 else jnp.diagonal(m)
  return jnp.maximum(jnp.mean(diag), _TINY)


def pi_factors(factors: Sequence[jax.Array]) -> list[jax.Array]:
  """The ``π_i`` of Ba et al. eq. 12 for ``k = len(factors)`` factors.

  Args:
    factors: square symmetric positive semi-definite matrices (a vector is
      the diagonal of a diagonal factor).

  Returns:
    One scalar per factor; their product is 1.
  """
  logs = [jnp.log(_mean_eig(f)) for f in factors]
  mean_log = sum(logs) / len(logs)
  return [jnp.exp(l - mean_log) for l in logs]


def factored_damping(factors: Sequence[jax.Array],
                     damping: jax.Array | float) -> list[jax.Array]:
  """Per-factor diagonal shifts ``π_i λ^{1/k}`` (Ba et al. eq. 12).

  Args:
    factors: the ``k`` Kronecker factors.
    damping: the Tikhonov damping ``λ`` of the whole block.

  Returns:
    The scalar to add to each factor's diagonal.
  """
  root = jnp.asarray(damping, jnp.float32) ** (1.0 / len(factors))
  return [p * root for p in pi_factors(factors)]
