"""Learning-rate grafting: one optimizer's direction with another's step norms.

Agarwal, Anil, Hazan, Koren & Zhang (2020), "Disentangling Adaptive Gradient
Methods from Learning Rates": each parameter block takes the *direction* of
one update rule and the *norm* of another's. Distributed Shampoo grafts its
preconditioned directions onto Adam's (or SGD's) per-layer step sizes; here
K-FAC's natural-gradient direction is grafted onto Adam's, so the learning
rate of an Adam run a user already has carries over.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_lite import masking


class GraftState(NamedTuple):
  """State of :func:`graft`: the two inner optimizers' states."""
  direction: Any
  magnitude: Any


def _grafted(d: Any, m: Any, eps: float) -> Any:
  """``d`` rescaled to ``m``'s Frobenius norm (zero where ``d`` is zero)."""
  if masking.is_masked(d):
    return d
  d32, m32 = d.astype(jnp.float32), m.astype(jnp.float32)
  d_norm, m_norm = jnp.linalg.norm(d32), jnp.linalg.norm(m32)
  scale = jnp.where(d_norm > eps, m_norm / jnp.maximum(d_norm, eps), 0.0)
  return (d32 * scale).astype(d.dtype)


def graft(direction: optax.GradientTransformation, magnitude: optax.GradientTransformation,
          eps: float = 1e-30) -> optax.GradientTransformationExtraArgs:
  """Each leaf's update has ``direction``'s direction and ``magnitude``'s norm.

  Both inner transforms receive the same gradients (and extra arguments);
  leaf by leaf (a weight and its bias separately, like Shampoo's per-block
  grafting), the output is ``d · ‖m‖ / ‖d‖``.

  Args:
    direction: e.g. ``chain(optax.ema(0.9), kfl.scale_by_kfac(...))``.
    magnitude: e.g. ``optax.scale_by_adam()``.
    eps: a direction with a norm at most this is taken as zero.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra arguments go to both).
  """
  direction = optax.with_extra_args_support(direction)
  magnitude = optax.with_extra_args_support(magnitude)

  def init_fn(params: Any) -> GraftState:
    return GraftState(direction.init(params), magnitude.init(params))

  def update_fn(updates: Any, state: GraftState, params: Any = None,
                **extra_args: Any) -> tuple[Any, GraftState]:
    d, d_state = direction.update(updates, state.direction, params, **extra_args)
    m, m_state = magnitude.update(updates, state.magnitude, params, **extra_args)
    out = jax.tree.map(lambda a, b: _grafted(a, b, eps), d, m, is_leaf=masking.is_masked)
    return out, GraftState(d_state, m_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
