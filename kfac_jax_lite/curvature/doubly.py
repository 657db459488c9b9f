"""The doubly-factored input factor ``A ≈ K ⊗ Ψ`` (Ba et al. 2017, §4).

A dense layer whose input is a flattened feature map (``[B, H, W, C] ->
[B, H·W·C]``) has an input factor too large to invert. Each example's
activations, viewed as a ``[T, C]`` matrix (``T = H·W`` spatial locations,
``C`` channels), are replaced by their best rank-1 approximation
``σ₁ u₁ v₁^T`` (eq. 5; found by power iteration on the smaller Gram matrix
rather than an SVD), split as ``k = √σ₁ u₁`` and ``ψ = √σ₁ v₁``; then
``E[vec(a) vec(a)^T] ≈ E[k k^T] ⊗ E[ψ ψ^T] = K ⊗ Ψ`` (eq. 6-8), so the layer's
block is the three-factor ``K ⊗ Ψ ⊗ G``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kfac_jax_lite.gram import gram


_SQUARINGS = 16  # power iteration by repeated squaring: error ~ (σ₂/σ₁)^(2^17)


def _top_eigenvector(gram: jax.Array) -> jax.Array:
  """Unit top eigenvector of each PSD matrix of ``gram [M, d, d]``.

  Repeated squaring ``P ← P² / max|P²|`` makes ``P ∝ gram^(2^k)``, whose
  columns all point along the top eigenvector once ``(λ₂/λ₁)^(2^k)`` is
  negligible; the largest column is taken, then one more multiplication by
  ``gram`` refines it. A few ``d × d`` products instead of an SVD per example
  (several times cheaper on CPU, exact up to that power).
  """
  p = gram
  for _ in range(_SQUARINGS):
    p = p @ p
    p = p / jnp.maximum(jnp.max(jnp.abs(p), axis=(1, 2), keepdims=True), 1e-30)
  col = jnp.argmax(jnp.sum(p * p, axis=1), axis=-1)
  v = jnp.take_along_axis(p, col[:, None, None], axis=2)[..., 0]
  v = jnp.einsum("mij,mj->mi", gram, v)
  return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-30)


def rank_one(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example rank-1 factors of ``x`` (Ba et al. eq. 5).

  The top singular pair comes from the top eigenvector of the smaller Gram
  matrix (``x^T x`` or ``x x^T``), found by :func:`_top_eigenvector`.

  Args:
    x: ``[M, T, C]`` activation matrices, one per example.

  Returns:
    ``k [M, T]`` and ``ψ [M, C]`` with ``k ψ^T`` the best rank-1
    approximation of each ``x[m]`` in Frobenius norm, both scaled by
    ``√σ₁``. The sign ambiguity of the singular vectors cancels in ``k k^T``
    and ``ψ ψ^T``.
  """
  x = x.astype(jnp.float32)
  if x.shape[2] <= x.shape[1]:
    v = _top_eigenvector(jnp.einsum("mtc,mtd->mcd", x, x))  # right singular vector
    xv = jnp.einsum("mtc,mc->mt", x, v)  # σ₁ u₁
    sigma = jnp.linalg.norm(xv, axis=-1, keepdims=True)
    root = jnp.sqrt(sigma)
    return xv / jnp.maximum(root, 1e-30), v * root
  psi, k = rank_one(jnp.swapaxes(x, 1, 2))
  return k, psi


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
