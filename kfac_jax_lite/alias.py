"""``kfac``: the ready-to-use K-FAC optimizer, built with ``optax.chain``."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import optax

from kfac_jax_lite.tagging.trainable import non_trainable
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
    ema_decay: float | jax.Array = 0.95,
    stats_every: int = 1,
    inverse_every: int = 10,
    estimator: str = "mc",
    num_samples: int = 1,
    inverse_method: str = "eigh",
    conv_approximation: str = "expand",
    dense_approximation: str = "expand",
    blocks: Mapping[str, str] | None = None,
    max_factor_dim: int | None = None,
    staggered_inverses: bool = False,
    stats_batch_fraction: float | None = None,
    accumulate_statistics: bool = False,
    distribute_inverses: bool = False,
    symmetry_aware: bool = False,
    inverse_placement: str = "replicated",
    sample_params: Any = None,
    seed: int = 0,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """K-FAC with KL-clipped step size, momentum and decoupled weight decay.

  ``chain(scale_by_kfac, add_decayed_weights, trace(momentum),
  scale_by_learning_rate)``: the preconditioned direction (Ba et al. 2017,
  §2) is scaled so one step's KL divergence stays under ``kl_clip`` (eq. 14),
  then heavy-ball momentum and the (negated) learning rate are applied.
  Every argument is explicit, so ``optax.inject_hyperparams(kfl.kfac,
  static_args=("loss_fn", "num_samples"))`` works.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, computed with a
      :mod:`kfac_jax_lite.losses` function.
    sample_batch: a batch (arrays or ``jax.ShapeDtypeStruct``) for tracing.
    learning_rate: float or optax schedule.
    damping: Tikhonov damping λ.
    kl_clip: KL bound per step, or ``None`` for no clipping.
    momentum: heavy-ball decay, or ``None`` / 0 for none.
    weight_decay: decoupled weight decay, added after preconditioning (never
      to non-trainable collections of a whole Flax variables dict).
    ema_decay: see :func:`kfac_jax_lite.scale_by_kfac`.
    stats_every: see :func:`kfac_jax_lite.scale_by_kfac`.
    inverse_every: see :func:`kfac_jax_lite.scale_by_kfac`.
    estimator: see :func:`kfac_jax_lite.scale_by_kfac`.
    num_samples: see :func:`kfac_jax_lite.scale_by_kfac`.
    inverse_method: see :func:`kfac_jax_lite.scale_by_kfac`.
    conv_approximation: see :func:`kfac_jax_lite.scale_by_kfac`.
    dense_approximation: see :func:`kfac_jax_lite.scale_by_kfac`.
    blocks: see :func:`kfac_jax_lite.scale_by_kfac`.
    max_factor_dim: see :func:`kfac_jax_lite.scale_by_kfac`.
    staggered_inverses: see :func:`kfac_jax_lite.scale_by_kfac`.
    stats_batch_fraction: see :func:`kfac_jax_lite.scale_by_kfac`.
    accumulate_statistics: see :func:`kfac_jax_lite.scale_by_kfac`.
    distribute_inverses: see :func:`kfac_jax_lite.scale_by_kfac`.
    symmetry_aware: see :func:`kfac_jax_lite.scale_by_kfac`.
    inverse_placement: see :func:`kfac_jax_lite.scale_by_kfac`.
    sample_params: see :func:`kfac_jax_lite.scale_by_kfac`.
    seed: see :func:`kfac_jax_lite.scale_by_kfac`.
    axis_name: see :func:`kfac_jax_lite.scale_by_kfac`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``batch=``.
  """
  parts = [scale_by_kfac(
      loss_fn, sample_batch, damping=damping, ema_decay=ema_decay,
      stats_every=stats_every, inverse_every=inverse_every, estimator=estimator,
      num_samples=num_samples, kl_clip=kl_clip,
      learning_rate=learning_rate if kl_clip is not None else None,
      inverse_method=inverse_method, conv_approximation=conv_approximation,
      dense_approximation=dense_approximation, blocks=blocks,
      max_factor_dim=max_factor_dim, staggered_inverses=staggered_inverses,
      stats_batch_fraction=stats_batch_fraction,
      accumulate_statistics=accumulate_statistics,
      distribute_inverses=distribute_inverses, symmetry_aware=symmetry_aware,
      inverse_placement=inverse_placement,
      sample_params=sample_params,
      seed=seed, axis_name=axis_name)]
  if not _is_zero(weight_decay):
    parts.append(optax.add_decayed_weights(weight_decay, mask=_trainable))
  if not _is_zero(momentum):
    parts.append(optax.trace(decay=momentum))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def _trainable(params: Any) -> Any:
  """``False`` for the leaves of non-trainable collections (``batch_stats`` of
  a whole Flax variables dict), which must not decay."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  frozen = non_trainable(params)
  return jax.tree_util.tree_unflatten(treedef, [i not in frozen for i in range(len(leaves))])


def _is_zero(value: Any) -> bool:
  """``None`` or a Python zero; a traced hyperparameter is never "zero"."""
  return value is None or (isinstance(value, (int, float)) and value == 0)
