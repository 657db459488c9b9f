"""Step sizes that shrink when the gradient is mostly noise.

McCandlish, Kaplan, Amodei et al. (2018), "An Empirical Model of Large-Batch
Training", §2.2: for a batch of ``B`` examples the best step is
``ε_max / (1 + B_noise / B)``, ``B_noise = tr Σ / ||G||²``. The factor
``B / (B + B_noise)`` equals ``||G||² / ||G_B||² = 1 − tr Σ / (B ||G_B||²)``
(``E||G_B||² = ||G||² + tr Σ / B``), the fraction of the batch gradient's
squared norm that is signal.

Late in training a KL-clipped K-FAC step no longer meets its clip: the
Fisher of a confident model is tiny, ``(F + λ)⁻¹ g ≈ g / λ``, and the step
is SGD at rate ``learning_rate / (λ (1 − momentum))``; where the gradient is
mostly noise (BatchNorm, small batches) that step makes the loss bounce.
:func:`noise_scaled` multiplies the updates by the factor above, from moving
averages of ``tr Σ`` and ``||G_B||²`` that the statistics pass gives at no
extra backward pass (:class:`kfac_jax_lite.Diagnostics`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_lite import guard
from kfac_jax_lite._checks import check_number


class NoiseScaledState(NamedTuple):
  """State of :func:`noise_scaled`.

  Attributes:
    inner: the wrapped optimizer's state.
    trace_sigma: moving average of ``tr Σ``.
    batch_grad_sq_norm: moving average of ``||G_B||²``.
    scale: the factor applied at the latest step.
  """
  inner: Any
  trace_sigma: jax.Array
  batch_grad_sq_norm: jax.Array
  scale: jax.Array


def signal_fraction(trace_sigma: jax.Array, batch_grad_sq_norm: jax.Array,
                    batch_size: int, floor: float | jax.Array) -> jax.Array:
  """``clip(1 − tr Σ / (B ||G_B||²), floor, 1)``, 1 before any statistics.

  Args:
    trace_sigma: ``tr Σ`` (or its moving average).
    batch_grad_sq_norm: ``||G_B||²`` (or its moving average).
    batch_size: ``B``.
    floor: the smallest factor.

  Returns:
    A float32 scalar in ``[floor, 1]``.
  """
  ratio = trace_sigma / (batch_size * jnp.maximum(batch_grad_sq_norm, 1e-30))
  return jnp.where(batch_grad_sq_norm > 0, jnp.clip(1.0 - ratio, floor, 1.0), 1.0)


def noise_scaled(inner: optax.GradientTransformation, *, floor: float = 0.2,
                 decay: float = 0.95) -> optax.GradientTransformationExtraArgs:
  """``inner``'s updates times the signal fraction of the batch gradient.

  ``inner`` must hold :class:`kfac_jax_lite.Diagnostics` in its state
  (:func:`kfac_jax_lite.kfac` or :func:`kfac_jax_lite.scale_by_kfac` with
  ``estimator=kfl.EstimatorOptions(diagnostics=True)``; ``kfl.kfac(...,
  noise_scaling=floor)`` builds the pair). On every step the latest
  diagnostics (renewed every ``stats_every`` steps) enter moving averages of
  ``tr Σ`` and ``||G_B||²`` with decay ``decay``, and the updates are
  multiplied by :func:`signal_fraction` of them (McCandlish et al. 2018, §2.2).

  Args:
    inner: the optimizer whose updates are scaled.
    floor: the smallest factor, in ``(0, 1]``.
    decay: the moving averages' decay per step, in ``[0, 1)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra arguments go to ``inner``).
  """
  check_number("floor", floor, low=0.0, high=1.0, high_open=False)
  check_number("decay", decay, low=0.0, low_open=False, high=1.0)

  def init_fn(params: Any) -> NoiseScaledState:
    state = inner.init(params)
    if optax.tree.get(state, "diagnostics", default=None) is None:
      raise ValueError("noise_scaled needs the diagnostics in the inner state: build it with "
                       "estimator=kfl.EstimatorOptions(diagnostics=True) (or use "
                       "kfl.kfac(..., noise_scaling=floor)).")
    zero = jnp.zeros([], jnp.float32)
    return NoiseScaledState(state, zero, zero, jnp.ones([], jnp.float32))

  def update_fn(updates: Any, state: NoiseScaledState, params: Any = None,
                **extra: Any) -> tuple[Any, NoiseScaledState]:
    out, inner_state = inner.update(updates, state.inner, params, **extra)
    diag = optax.tree.get(inner_state, "diagnostics")
    old = (state.trace_sigma, state.batch_grad_sq_norm)
    new = (decay * old[0] + (1 - decay) * diag.trace_sigma,
           decay * old[1] + (1 - decay) * diag.batch_grad_sq_norm)
    trace_sigma, grad_sq = optax.tree.where(guard.all_finite(new), new, old)
    scale = signal_fraction(trace_sigma, grad_sq, diag.sq_norms.shape[0], floor)
    out = jax.tree.map(lambda u: (u * scale).astype(u.dtype), out)
    return out, NoiseScaledState(inner_state, trace_sigma, grad_sq, scale)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
