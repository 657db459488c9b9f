"""Kronecker-factored blocks: moving averages, damped inverses, preconditioning.

A block ``F ≈ A ⊗ G`` for a weight matrix ``W`` of shape ``[d_in, d_out]``
(row-major ``vec``) is inverted factor by factor with factored Tikhonov
damping, and applied as ``(A + π√λ I)^{-1} ∇W (G + √λ/π I)^{-1}``
(Martens & Grosse 2015, eq. 4 / §6.3; Ba et al. 2017, eq. 3) without ever
forming the Kronecker product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kfac_jax_lite.curvature.damping import factored_damping

INVERSE_METHODS = ("eigh", "cholesky")


def ema(old: jax.Array, new: jax.Array, decay: jax.Array) -> jax.Array:
  """Moving average ``decay * old + (1 - decay) * new``."""
  return decay * old + (1.0 - decay) * new


def damped_inverse(m: jax.Array, shift: jax.Array, method: str) -> jax.Array:
  """``(m + shift I)^{-1}`` for a symmetric PSD ``m``, in float32.

  Args:
    m: square symmetric positive semi-definite matrix, or the diagonal (a
      vector) of a diagonal factor.
    shift: positive scalar added to the diagonal.
    method: ``"eigh"`` (eigenvalues clipped at 0 first: robust to a slightly
      indefinite estimate) or ``"cholesky"`` (faster).

  Returns:
    The symmetric inverse.
  """
  m = m.astype(jnp.float32)
  if m.ndim == 1:
    return 1.0 / (jnp.maximum(m, 0.0) + shift)
  m = 0.5 * (m + m.T)
  if method == "eigh":
    evals, evecs = jnp.linalg.eigh(m)
    return (evecs / (jnp.maximum(evals, 0.0) + shift)) @ evecs.T
  eye = jnp.eye(m.shape[0], dtype=m.dtype)
  chol = jax.scipy.linalg.cho_factor(m + shift * eye, lower=True)
  return jax.scipy.linalg.cho_solve(chol, eye)


def inverses(a: jax.Array, g: jax.Array, damping: jax.Array,
             method: str) -> tuple[jax.Array, jax.Array]:
  """Damped inverses of the two factors of one block (Ba et al. eq. 3)."""
  shift_a, shift_g = factored_damping([a, g], damping)
  return damped_inverse(a, shift_a, method), damped_inverse(g, shift_g, method)


def precondition(a_inv: jax.Array, g_inv: jax.Array, grad: jax.Array) -> jax.Array:
  """``A^{-1} grad G^{-1}`` for ``grad`` of shape ``[d_in, d_out]``.

  A vector ``a_inv`` is the diagonal of a diagonal ``A^{-1}``.
  """
  grad = grad.astype(jnp.float32)
  left = a_inv[:, None] * grad if a_inv.ndim == 1 else a_inv @ grad
  return left @ g_inv
