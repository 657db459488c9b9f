"""Diagonal blocks: the fallback for unrecognized parameters, and the inverse
of an exact diagonal Fisher (scale-and-shift parameters).

The fallback block is for parameters outside any detected layer.

Its curvature estimate is a moving average ``v`` of the squared batch gradient
(a diagonal empirical-Fisher proxy, as in RMSProp); the update is the
Tikhonov-damped solve ``g / (v + λ)``, with the same ``λ`` as the Kronecker
blocks so that one damping knob governs every block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def update_second_moment(v: jax.Array, grad: jax.Array, decay: jax.Array,
                         first: jax.Array) -> jax.Array:
  """``decay v + (1 - decay) g^2``; the first update takes ``g^2`` as is."""
  g2 = jnp.square(grad.astype(jnp.float32))
  decay = jnp.where(first, 0.0, decay)
  return decay * v + (1.0 - decay) * g2


def precondition(v: jax.Array, grad: jax.Array, damping: jax.Array) -> jax.Array:
  """``g / (v + λ)`` in float32."""
  return grad.astype(jnp.float32) / (v + damping)


def damped_inverse(fisher: jax.Array, damping: jax.Array) -> jax.Array:
  """``1 / (F + λ)`` for a diagonal Fisher ``F`` (clipped at 0)."""
  return 1.0 / (jnp.maximum(fisher.astype(jnp.float32), 0.0) + damping)
