"""Kronecker-factored blocks: moving averages, damped inverses, preconditioning.

A block ``F ≈ A ⊗ G`` for a weight matrix ``W`` of shape ``[d_in, d_out]``
(row-major ``vec``) is inverted factor by factor with factored Tikhonov
damping, and applied as ``(A + π√λ I)^{-1} ∇W (G + √λ/π I)^{-1}``
(Martens & Grosse 2015, eq. 4 / §6.3; Ba et al. 2017, eq. 3) without ever
forming the Kronecker product. The same holds for ``k`` factors
``F_1 ⊗ ... ⊗ F_k`` (the doubly-factored ``K ⊗ Ψ ⊗ G`` of Ba et al. 2017, §4,
eq. 9 and 12): the gradient is viewed as a ``[d_1, ..., d_k]`` tensor and each
damped inverse is applied along its own axis.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kfac_jax_lite import _cpu_blas
from kfac_jax_lite.curvature import diagonal

INVERSE_METHODS = ("eigh", "cholesky")


def ema(old: jax.Array, new: jax.Array, decay: jax.Array) -> jax.Array:
  """Moving average ``decay * old + (1 - decay) * new``."""
  return decay * old + (1.0 - decay) * new


def damped_inverse(m: jax.Array, shift: jax.Array, method: str) -> jax.Array:
  """``(m + shift I)^{-1}`` for a symmetric PSD ``m``, in float32.

  On a CPU backend both methods are LAPACK calls; the first trace of a matrix
  inverse limits the BLAS library behind them to one thread
  (:mod:`kfac_jax_lite._cpu_blas`).

  Args:
    m: square symmetric positive semi-definite matrix, or the diagonal (a
      vector) of a diagonal factor.
    shift: positive scalar added to the diagonal.
    method: ``"eigh"`` (eigenvalues clipped at 0 first: robust to a slightly
      indefinite estimate) or ``"cholesky"`` (faster).

  Returns:
    The symmetric inverse.
  """
  if m.ndim == 1:
    return diagonal.damped_inverse(m, shift)
  _cpu_blas.limit_lapack_threads()
  m = m.astype(jnp.float32)
  m = 0.5 * (m + m.T)
  if method == "eigh":
    evals, evecs = jnp.linalg.eigh(m)
    return (evecs / (jnp.maximum(evals, 0.0) + shift)) @ evecs.T
  eye = jnp.eye(m.shape[0], dtype=m.dtype)
  chol = jax.scipy.linalg.cho_factor(m + shift * eye, lower=True)
  return jax.scipy.linalg.cho_solve(chol, eye)


def precondition(invs: Sequence[jax.Array], grad: jax.Array) -> jax.Array:
  """``(F_1^{-1} ⊗ ... ⊗ F_k^{-1}) vec(grad)`` without forming the product.

  For two factors this is ``A^{-1} grad G^{-1}``.

  Args:
    invs: the symmetric damped inverses, in Kronecker order; a vector is the
      diagonal of a diagonal inverse.
    grad: ``[d_1 ... d_{k-1}, d_k]`` row-major (the weight matrix
      ``[d_in, d_out]``).

  Returns:
    The preconditioned gradient, shaped like ``grad`` (float32).
  """
  x = grad.astype(jnp.float32).reshape([inv.shape[0] for inv in invs])
  for axis, inv in enumerate(invs):
    if inv.ndim == 1:
      x = x * inv.reshape((-1,) + (1,) * (x.ndim - axis - 1))
    else:
      x = jnp.moveaxis(jnp.tensordot(inv, x, axes=((1,), (axis,))), 0, axis)
  return x.reshape(grad.shape)
