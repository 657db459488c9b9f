"""Gradient accumulation that keeps K-FAC's statistics from every micro-batch.

``optax.MultiSteps`` calls its inner optimizer only on the emitting step (and
drops extra arguments inside ``chain``), so K-FAC would see one micro-batch
in ``every_k``. :func:`accumulate` instead calls the inner optimizer on every
micro-batch: on non-emitting micro-steps with ``kfac_accumulate_only=True``,
which only adds the micro-batch's factor estimate to K-FAC's buffer (every
other part of the inner state is kept as it was); on the emitting step with
the mean of the accumulated gradients, where K-FAC averages the buffered
estimates with its own, and with ``kfac_micro_batches=every_k``, from which
:func:`kfac_jax_lite.noise_scaled` knows the gradient's batch is
``every_k`` micro-batches. With equal micro-batches and no noise scaling
this is the step one big batch would take (exactly so with the ``"exact"``
or ``"empirical"`` estimator); noise scaling's diagnostics are of the
emitting micro-batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_lite.transform import KfacState


class AccumulateState(NamedTuple):
  """State of :func:`accumulate`.

  Attributes:
    mini_step: micro-batches accumulated since the last emitted step.
    grad_sum: sum of their gradients.
    inner_state: the wrapped optimizer's state.
  """
  mini_step: jax.Array
  grad_sum: Any
  inner_state: Any


def _keep_kfac(old: Any, new: Any) -> Any:
  """``old`` with every :class:`KfacState` inside taken from ``new``."""
  is_kfac = lambda x: isinstance(x, KfacState)
  return jax.tree.map(lambda o, n: n if is_kfac(n) else o, old, new, is_leaf=is_kfac)


def accumulate(inner: optax.GradientTransformation,
               every_k: int) -> optax.GradientTransformationExtraArgs:
  """Emits one update of ``inner`` every ``every_k`` micro-batches.

  Build the inner K-FAC with ``estimator=kfl.EstimatorOptions(accumulate=True)``
  (``kfl.kfac`` forwards it). Non-emitting micro-steps return zero updates.

  Args:
    inner: an optimizer containing :func:`kfac_jax_lite.scale_by_kfac`.
    every_k: micro-batches per emitted step (>= 1).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``batch=``
    (the micro-batch) like the inner K-FAC.

  Raises:
    ValueError: if ``every_k < 1``.
  """
  if every_k < 1:
    raise ValueError(f"every_k must be >= 1, got {every_k}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: Any) -> AccumulateState:
    return AccumulateState(
        mini_step=jnp.zeros([], jnp.int32),
        grad_sum=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
        inner_state=inner.init(params))

  def update_fn(updates: Any, state: AccumulateState, params: Any = None,
                **extra_args: Any) -> tuple[Any, AccumulateState]:
    grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), state.grad_sum, updates)
    zeros = jax.tree.map(jnp.zeros_like, updates)

    def emit():
      mean = jax.tree.map(lambda s, g: (s / every_k).astype(g.dtype), grad_sum, updates)
      out, inner_state = inner.update(mean, state.inner_state, params,
                                      kfac_micro_batches=every_k, **extra_args)
      return out, AccumulateState(jnp.zeros([], jnp.int32),
                                  jax.tree.map(jnp.zeros_like, grad_sum), inner_state)

    def gather():
      _, observed = inner.update(updates, state.inner_state, params,
                                 kfac_accumulate_only=True, **extra_args)
      return zeros, AccumulateState(state.mini_step + 1, grad_sum,
                                    _keep_kfac(state.inner_state, observed))

    return jax.lax.cond(state.mini_step + 1 == every_k, emit, gather)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
