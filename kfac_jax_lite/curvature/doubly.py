"""The doubly-factored input factor ``A ≈ K ⊗ Ψ`` (Ba et al. 2017, §4).

A dense layer whose input is a flattened feature map (``[B, H, W, C] ->
[B, H·W·C]``) has an input factor too large to invert. Each example's
activations, viewed as a ``[T, C]`` matrix (``T = H·W`` spatial locations,
``C`` channels), are replaced by their best rank-1 approximation
``σ₁ u₁ v₁^T`` (eq. 5), split as ``k = √σ₁ u₁`` and ``ψ = √σ₁ v₁``; then
``E[vec(a) vec(a)^T] ≈ E[k k^T] ⊗ E[ψ ψ^T] = K ⊗ Ψ`` (eq. 6-8), so the layer's
block is the three-factor ``K ⊗ Ψ ⊗ G``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kfac_jax_lite.gram import gram


def rank_one(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example rank-1 factors of ``x`` by SVD (Ba et al. eq. 5).

  Args:
    x: ``[M, T, C]`` activation matrices, one per example.

  Returns:
    ``k [M, T]`` and ``ψ [M, C]`` with ``k ψ^T`` the best rank-1
    approximation of each ``x[m]`` in Frobenius norm, both scaled by
    ``√σ₁``. The sign ambiguity of the SVD cancels in ``k k^T`` and ``ψ ψ^T``.
  """
  u, s, vt = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=False)
  root = jnp.sqrt(s[:, :1])
  return u[:, :, 0] * root, vt[:, 0, :] * root


def input_factors(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One batch's ``K`` (spatial) and ``Ψ`` (channel) factors (eq. 8).

  Args:
    x: ``[M, T, C]`` activation matrices, one per example.

  Returns:
    ``K = mean_m k k^T`` of shape ``[T, T]`` and ``Ψ = mean_m ψ ψ^T`` of
    shape ``[C, C]`` (float32).
  """
  k, psi = rank_one(x)
  return gram(k) / x.shape[0], gram(psi) / x.shape[0]
