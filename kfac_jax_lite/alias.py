"""``kfac``: the ready-to-use K-FAC optimizer, built with ``optax.chain``."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from kfac_jax_lite.transform import ScalarOrSchedule, scale_by_kfac


def kfac(
    loss_fn: Callable[[Any, Any], jax.Array],
    sample_batch: Any,
    learning_rate: ScalarOrSchedule,
    *,
    damping: float | jax.Array = 1e-3,
    kl_clip: float | jax.Array | None = 1e-3,
    momentum: float | None = 0.9,
    weight_decay: float = 0.0,
    **kfac_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """K-FAC with KL-clipped step size, momentum and decoupled weight decay.

  ``chain(scale_by_kfac, add_decayed_weights, trace(momentum),
  scale_by_learning_rate)``: the preconditioned direction (Ba et al. 2017,
  §2) is scaled so one step's KL divergence stays under ``kl_clip`` (eq. 14),
  then heavy-ball momentum and the (negated) learning rate are applied.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, computed with a
      :mod:`kfac_jax_lite.losses` function.
    sample_batch: a batch (arrays or ``jax.ShapeDtypeStruct``) for tracing.
    learning_rate: float or optax schedule.
    damping: Tikhonov damping λ.
    kl_clip: KL bound per step, or ``None`` for no clipping.
    momentum: heavy-ball decay, or ``None`` / 0 for none.
    weight_decay: decoupled weight decay, added after preconditioning.
    **kfac_kwargs: forwarded to :func:`scale_by_kfac` (``ema_decay``,
      ``stats_every``, ``inverse_every``, ``estimator``, ``num_samples``,
      ``inverse_method``, ``seed``, ``axis_name``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``batch=``.
  """
  parts = [scale_by_kfac(loss_fn, sample_batch, damping=damping, kl_clip=kl_clip,
                         learning_rate=learning_rate if kl_clip is not None else None,
                         **kfac_kwargs)]
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  if momentum:
    parts.append(optax.trace(decay=momentum))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
