"""KL-clipped step size (Ba et al. 2017, §5, eq. 14)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kl_scale(vg: jax.Array, learning_rate: jax.Array | float,
             kl_clip: jax.Array | float) -> jax.Array:
  """``η_eff / |η|`` with ``η_eff = min(|η|, sqrt(kl_clip / v·g))`` (Ba et al. eq. 14).

  Args:
    vg: inner product of the preconditioned update and the gradient.
    learning_rate: η (its sign is the caller's: the scale is positive).
    kl_clip: the KL bound.

  Returns:
    A scalar in ``(0, 1]`` (1 when ``v·g`` is not positive and finite).
  """
  lr = jnp.abs(jnp.asarray(learning_rate, jnp.float32))
  eff = jnp.sqrt(kl_clip / jnp.maximum(vg, 1e-30))
  ok = jnp.isfinite(vg) & (vg > 0)
  return jnp.where(ok, jnp.minimum(1.0, eff / lr), 1.0)
