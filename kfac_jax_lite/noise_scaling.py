"""Step sizes that shrink when the gradient is mostly noise.

McCandlish, Kaplan, Amodei et al. (2018), "An Empirical Model of Large-Batch
Training", §2.2: for a batch of ``B`` examples the best step is
``ε_max / (1 + B_noise / B)``, ``B_noise = tr Σ / ||G||²``. The factor

``B / (B + B_noise) = ||G||² / (||G||² + tr Σ / B) = ||G||² / E||G_B||²``

(``E||G_B||² = ||G||² + tr Σ / B``) is the fraction of the batch gradient's
expected squared norm that is signal; with ``||G_B||²`` for its expectation
it is ``1 − tr Σ / (B ||G_B||²)``.

Late in training a KL-clipped K-FAC step no longer meets its clip: the
Fisher of a confident model is tiny, ``(F + λ)⁻¹ g ≈ g / λ``, and the step
is SGD at rate ``learning_rate / (λ (1 − momentum))``; where the gradient is
mostly noise (BatchNorm, small batches) that step makes the loss bounce.
:func:`noise_scaled` multiplies the updates by the factor above, from moving
averages of the unbiased estimates of ``tr Σ`` and ``||G||²`` (App. A) that
the statistics pass gives at no extra backward pass
(:class:`kfac_jax_lite.Diagnostics`).

Data parallelism: under ``pmap`` / ``shard_map`` with an axis name, each
device's diagnostics are of its own ``B`` examples, while the update is of
the gradient averaged over all ``B·D``. Each device's estimates of ``tr Σ``
and ``||G||²`` are unbiased, so their mean over the axis is too, and the
factor is that of the global batch ``B·D``; every device then computes the
same factor from the same (replicated) state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_lite import guard
from kfac_jax_lite._checks import check_number
from kfac_jax_lite.diagnostics import Diagnostics
from kfac_jax_lite.step.estimate import batch_examples, per_batch_constant


class NoiseScaledState(NamedTuple):
  """State of :func:`noise_scaled` (the same on every device of the axis).

  Attributes:
    inner: the wrapped optimizer's state.
    trace_sigma: moving average of ``tr Σ`` (averaged over the devices).
    grad_sq_norm: moving average of the unbiased ``||G||²`` (averaged over
      the devices; may be negative when the gradient is mostly noise).
    scale: the factor applied at the latest step.
  """
  inner: Any
  trace_sigma: jax.Array
  grad_sq_norm: jax.Array
  scale: jax.Array


def signal_fraction(trace_sigma: jax.Array, grad_sq_norm: jax.Array,
                    batch_size: int, floor: float | jax.Array) -> jax.Array:
  """``clip(||G||² / (||G||² + tr Σ / B), floor, 1)``, the signal fraction of a batch.

  ``||G||² + tr Σ / B`` is ``E||G_B||²`` (McCandlish et al. 2018, App. A),
  so with ``||G||² = ||G_B||² − tr Σ / B`` this is
  ``1 − tr Σ / (B ||G_B||²)``. Where ``E||G_B||² ≤ 0`` (pure noise in the
  averages) it is ``floor``; with no statistics yet (both zero), 1.

  Args:
    trace_sigma: ``tr Σ`` (or its moving average).
    grad_sq_norm: the unbiased ``||G||²`` (or its moving average).
    batch_size: ``B``, the examples the scaled gradient averages over (all
      devices' together).
    floor: the smallest factor.

  Returns:
    A float32 scalar in ``[floor, 1]``.
  """
  expected = grad_sq_norm + trace_sigma / batch_size
  fraction = grad_sq_norm / jnp.where(expected > 0, expected, 1.0)
  unmeasured = jnp.where(trace_sigma > 0, floor, 1.0)
  return jnp.where(expected > 0, jnp.clip(fraction, floor, 1.0), unmeasured)


def device_mean(diag: Diagnostics, axis_name: str | None, batch_size: int
                ) -> tuple[jax.Array, jax.Array, int]:
  """``tr Σ`` and ``||G||²`` averaged over ``axis_name`` (one all-reduce), and ``B·D``.

  Args:
    diag: this device's diagnostics.
    axis_name: the ``pmap`` / ``shard_map`` axis of ``D`` devices, or
      ``None`` (one device, or ``jit`` on a mesh, whose diagnostics are of
      the global batch already).
    batch_size: ``B``, the examples the device's gradient averages over
      (more than the diagnostics' with a ``batch_fraction`` or
      ``diagnostics_fraction``).

  Returns:
    ``(tr Σ, ||G||², B·D)``.

  Raises:
    ValueError: if ``axis_name`` is not bound (the step is not run under
      ``pmap`` / ``shard_map`` over it).
  """
  pair = jnp.stack([diag.trace_sigma, diag.grad_sq_norm])
  if axis_name is None:
    return pair[0], pair[1], batch_size
  try:
    devices = jax.lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(f"noise_scaled(axis_name={axis_name!r}): run the update under "
                     f"jax.pmap / jax.shard_map over {axis_name!r}, or pass axis_name=None "
                     "(one device, or jit on a mesh).") from e
  pair = jax.lax.pmean(pair, axis_name)
  return pair[0], pair[1], batch_size * devices


def _batch_size(batch: Any, micro_batches: int) -> int:
  """The examples the gradient averages over: ``micro_batches`` times the
  leading size of the batch's per-example leaves (the first one's where they
  differ, e.g. time-major leaves; scalars and PRNG keys are not per-example:
  :func:`kfac_jax_lite.step.estimate.per_batch_constant`)."""
  leaves = [x for x in jax.tree_util.tree_leaves(batch) if not per_batch_constant(x)]
  if not leaves:
    raise ValueError("noise_scaled.update needs the gradient's batch, with an array whose "
                     "leading size is the number of examples B: call update(grads, state, "
                     "params, batch=batch).")
  return (batch_examples(batch) or leaves[0].shape[0]) * micro_batches


def noise_scaled(inner: optax.GradientTransformation, *, floor: float = 0.2,
                 decay: float = 0.95,
                 axis_name: str | None = None) -> optax.GradientTransformationExtraArgs:
  """``inner``'s updates times the signal fraction of the batch gradient.

  ``inner`` must hold :class:`kfac_jax_lite.Diagnostics` in its state
  (:func:`kfac_jax_lite.kfac` or :func:`kfac_jax_lite.scale_by_kfac` with
  ``estimator=kfl.EstimatorOptions(diagnostics=True)``; ``kfl.kfac(...,
  noise_scaling=floor)`` builds the pair). On every step the latest
  diagnostics (renewed every ``stats_every`` steps), averaged over
  ``axis_name``, enter moving averages of ``tr Σ`` and ``||G||²`` with decay
  ``decay``, and the updates are multiplied by :func:`signal_fraction` of
  them for the global batch ``B·D`` (McCandlish et al. 2018, §2.2, App. A;
  ``B`` is the leading dimension of the ``batch=`` extra argument, times
  ``kfac_micro_batches`` under :func:`kfac_jax_lite.accumulate`):

  ``clip(||G||² / (||G||² + tr Σ / (B·D)), floor, 1)``.

  The averages are taken over the devices before the moving averages, so
  the state is replicated. Under ``jax.jit`` with the batch sharded over a
  mesh (no axis name) the diagnostics are of the global batch already:
  leave ``axis_name=None`` there.

  Args:
    inner: the optimizer whose updates are scaled.
    floor: the smallest factor, in ``(0, 1]``.
    decay: the moving averages' decay per step, in ``[0, 1)``.
    axis_name: the ``pmap`` / ``shard_map`` axis the gradient is averaged
      over (``ParallelOptions.axis_name`` of ``inner``), or ``None``.

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
    # Distinct buffers: a state whose leaves share one cannot be donated.
    return NoiseScaledState(state, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32),
                            jnp.ones([], jnp.float32))

  def update_fn(updates: Any, state: NoiseScaledState, params: Any = None,
                **extra: Any) -> tuple[Any, NoiseScaledState]:
    out, inner_state = inner.update(updates, state.inner, params, **extra)
    trace_sigma, grad_sq, batch = device_mean(
        optax.tree.get(inner_state, "diagnostics"), axis_name,
        _batch_size(extra.get("batch"), extra.get("kfac_micro_batches", 1)))
    old = (state.trace_sigma, state.grad_sq_norm)
    new = (decay * old[0] + (1 - decay) * trace_sigma,
           decay * old[1] + (1 - decay) * grad_sq)
    trace_sigma, grad_sq = optax.tree.where(guard.all_finite(new), new, old)
    scale = signal_fraction(trace_sigma, grad_sq, batch, floor)
    out = jax.tree.map(lambda u: (u * scale).astype(u.dtype), out)
    return out, NoiseScaledState(inner_state, trace_sigma, grad_sq, scale)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
