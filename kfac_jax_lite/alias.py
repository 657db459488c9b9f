"""``kfac``: the ready-to-use K-FAC optimizer, built with ``optax.chain``."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable

import jax
import optax

from kfac_jax_lite.tagging.trainable import non_trainable
from kfac_jax_lite import graft as graft_lib
from kfac_jax_lite.noise_scaling import noise_scaled
from kfac_jax_lite._checks import check_number
from kfac_jax_lite.options import (AdaptiveOptions, EstimatorOptions, InverseOptions,
                                   LayerOptions, ParallelOptions, as_estimator)
from kfac_jax_lite.step.estimate import batch_examples, fraction_size
from kfac_jax_lite.transform import scale_by_kfac


# The defaults of kfac, chosen on benchmarks/suite.py (README, "Choosing
# settings"): the KL clip bounds every step, so the learning rate is a ceiling;
# statistics every 10 steps, each followed by fresh inverses (Cholesky: 4-5x
# cheaper than eigh on CPU), took 0.5-0.9x the steps of inverses every 50 at
# about the same step cost. Damping 0.003 with noise scaling (below) took
# fewer steps than 0.01 on the MLP, LM and GRU, as many on the autoencoder
# and the ResNet (over three seeds); 0.001 lost on the autoencoder and the
# ResNet.
DEFAULT_LEARNING_RATE = 0.3
DEFAULT_DAMPING = 0.003
DEFAULT_KL_CLIP = 1e-3
DEFAULT_STATS_EVERY = 10
DEFAULT_INVERSE_EVERY = 10
DEFAULT_INVERSES = InverseOptions(method="cholesky")
# Noise scaling with floor 0.2 was the one setting under which default K-FAC
# reached tuned AdamW's loss sooner on every suite model (the ResNet's late
# phase bounces without it); its diagnostics come from a quarter of the
# statistics batch, which keeps their extra cost small.
DEFAULT_NOISE_SCALING = 0.2
DEFAULT_DIAGNOSTICS_FRACTION = 0.25
# With noise scaling, statistics from half the batch took fewer steps than
# from all of it on four suite models and as many on the LM, and cut the
# statistics step's cost (the ResNet: 1.25x AdamW's step instead of 1.47x);
# a quarter cost the GRU steps. Kept to batches where half is at least 8
# examples.
DEFAULT_STATS_FRACTION = 0.5
MIN_STATS_EXAMPLES = 8


def kfac(
    loss_fn: Callable[[Any, Any], jax.Array],
    sample_batch: Any,
    learning_rate: optax.ScalarOrSchedule = DEFAULT_LEARNING_RATE,
    *,
    damping: float | jax.Array | optax.Schedule = DEFAULT_DAMPING,
    kl_clip: float | jax.Array | None = DEFAULT_KL_CLIP,
    momentum: float | jax.Array | None = 0.9,
    weight_decay: float | jax.Array = 0.0,
    ema_decay: float | jax.Array | optax.Schedule = 0.95,
    stats_every: int | jax.Array = DEFAULT_STATS_EVERY,
    inverse_every: int | jax.Array = DEFAULT_INVERSE_EVERY,
    layers: LayerOptions = LayerOptions(),
    estimator: str | EstimatorOptions = "mc",
    inverses: InverseOptions = DEFAULT_INVERSES,
    parallel: ParallelOptions = ParallelOptions(),
    graft: str | None = None,
    adaptive: AdaptiveOptions | None = None,
    noise_scaling: float | None = DEFAULT_NOISE_SCALING,
    sample_params: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """K-FAC with KL-clipped step size, momentum and decoupled weight decay.

  ``chain(scale_by_kfac, add_decayed_weights, trace(momentum),
  scale_by_learning_rate)``: the preconditioned direction (Ba et al. 2017,
  §2) is scaled so one step's KL divergence stays under ``kl_clip`` (eq. 14),
  then heavy-ball momentum and the (negated) learning rate are applied.
  Every number is an explicit keyword and every structural choice an option
  value, so ``optax.inject_hyperparams(kfl.kfac, static_args="loss_fn")``
  works.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, computed with a
      :mod:`kfac_jax_lite.losses` function.
    sample_batch: a batch (arrays or ``jax.ShapeDtypeStruct``) for tracing.
    learning_rate: float or optax schedule; with ``kl_clip`` a ceiling on
      the KL-clipped rate (which is what usually sets the step).
    damping: Tikhonov damping λ (float or schedule).
    kl_clip: KL bound per step, or ``None`` for no clipping.
    momentum: heavy-ball decay, or ``None`` / 0 for none.
    weight_decay: decoupled weight decay, added after preconditioning (never
      to non-trainable collections of a whole Flax variables dict).
    ema_decay: as in :func:`kfac_jax_lite.scale_by_kfac`.
    stats_every: as in :func:`kfac_jax_lite.scale_by_kfac`.
    inverse_every: as in :func:`kfac_jax_lite.scale_by_kfac`.
    layers: as in :func:`kfac_jax_lite.scale_by_kfac`.
    estimator: as in :func:`kfac_jax_lite.scale_by_kfac`; a kind (string)
      estimates on the leading half of a batch-major batch of at least 16
      examples, an ``EstimatorOptions`` as given.
    inverses: as in :func:`kfac_jax_lite.scale_by_kfac`; Cholesky by default
      here (``scale_by_kfac``: eigh).
    parallel: as in :func:`kfac_jax_lite.scale_by_kfac`.
    graft: ``None``, or ``"adam"``: each leaf's step takes K-FAC's direction
      (of the gradients' moving average with decay ``momentum``) and the norm
      of Adam's step (``b1=momentum``), see :func:`kfac_jax_lite.graft`; the
      learning rate is then Adam's, and ``kl_clip`` is not used.
    adaptive: ``None``, or a :class:`kfac_jax_lite.AdaptiveOptions`: the step
      ``α Δ + μ δ₀`` minimizes the quadratic model and the damping adapts
      (Martens & Grosse 2015, §6.5, §7); needs ``kl_clip=None``,
      ``momentum=None`` and ``noise_scaling=None``, and ``learning_rate``
      multiplies the step (pass 1.0).
      Not the default: on the suite it took more steps than the default and
      cost 1.3-1.9x its step time (README, "Choosing settings").
    noise_scaling: a floor in ``(0, 1]``, or ``None`` for none: the update
      times the batch gradient's signal fraction ``B / (B + B_noise)``
      (McCandlish et al. 2018), at least ``floor``, from diagnostics of the
      statistics batch's leading quarter, averaged over
      ``parallel.axis_name`` (:func:`kfac_jax_lite.noise_scaled`). With it
      or the half-batch statistics, N devices match one device only in
      expectation (each reads its own examples); ``None`` and an
      ``EstimatorOptions`` match exactly.
    sample_params: as in :func:`kfac_jax_lite.scale_by_kfac`.
    seed: as in :func:`kfac_jax_lite.scale_by_kfac`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``batch=``.
  """
  check_number("momentum", momentum, low=0.0, low_open=False, high=1.0)
  check_number("weight_decay", weight_decay, low=0.0, low_open=False)
  if graft not in (None, "adam"):
    raise ValueError(f"graft must be None or 'adam', got {graft!r}.")
  estimator = _with_stats_fraction(estimator, sample_batch)
  if noise_scaling is not None:
    noisy = _with_diagnostics(estimator, sample_batch)
    estimator, noise_scaling = (estimator, None) if noisy is None else (noisy, noise_scaling)
  kfac_part = functools.partial(
      scale_by_kfac, loss_fn, sample_batch, damping=damping, ema_decay=ema_decay,
      stats_every=stats_every, inverse_every=inverse_every, layers=layers,
      estimator=estimator, inverses=inverses, parallel=parallel,
      sample_params=sample_params, seed=seed)
  parts = _direction(kfac_part, learning_rate, kl_clip, momentum, graft, adaptive, noise_scaling)
  if not _is_zero(weight_decay):
    parts.insert(1, optax.add_decayed_weights(weight_decay, mask=_trainable))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  if noise_scaling is None:
    return optax.chain(*parts)
  return noise_scaled(optax.chain(*parts), floor=noise_scaling, axis_name=parallel.axis_name)


def _direction(kfac_part: Callable[..., optax.GradientTransformationExtraArgs],
               learning_rate: optax.ScalarOrSchedule, kl_clip: Any, momentum: Any,
               graft: str | None, adaptive: AdaptiveOptions | None,
               noise_scaling: float | None) -> list[optax.GradientTransformation]:
  """The chain's parts up to the learning rate: the quadratic model's step,
  the grafted direction, or the KL-clipped direction with momentum.

  Args:
    kfac_part: ``scale_by_kfac`` with everything but the step-size keywords.
    learning_rate: ``kfac``'s learning rate (the KL clip's ceiling).
    kl_clip: ``kfac``'s KL bound, or ``None``.
    momentum: heavy-ball decay, or ``None`` / 0.
    graft: ``None`` or ``"adam"``.
    adaptive: the quadratic model's options, or ``None``.
    noise_scaling: the noise factor's floor, or ``None`` (checked against
      ``adaptive``).

  Returns:
    The transformations, in order.

  Raises:
    ValueError: ``adaptive`` with a KL clip, momentum, a graft or noise scaling.
  """
  if adaptive is not None:
    if (kl_clip is not None or not _is_zero(momentum) or graft is not None
        or noise_scaling is not None):
      raise ValueError("adaptive=kfl.AdaptiveOptions() chooses the step size and the "
                       "momentum: pass kl_clip=None, momentum=None, noise_scaling=None "
                       "and no graft "
                       "(learning_rate multiplies the chosen step; 1.0 takes it as is).")
    return [kfac_part(adaptive=adaptive)]
  if graft == "adam":
    b1 = 0.0 if _is_zero(momentum) else momentum
    return [graft_lib.graft(optax.chain(optax.ema(b1, debias=True), kfac_part()),
                            optax.scale_by_adam(b1=b1))]
  parts = [kfac_part(kl_clip=kl_clip,
                     learning_rate=learning_rate if kl_clip is not None else None)]
  if not _is_zero(momentum):
    parts.append(optax.trace(decay=momentum))
  return parts


def _with_stats_fraction(estimator: str | EstimatorOptions,
                         sample_batch: Any) -> EstimatorOptions:
  """An estimator kind (a string) with ``DEFAULT_STATS_FRACTION`` of the batch
  for the statistics, where that is at least ``MIN_STATS_EXAMPLES`` of a
  batch whose leaves all lead with the batch axis; an
  :class:`EstimatorOptions` as given."""
  if not isinstance(estimator, str):
    return as_estimator(estimator)
  examples = fraction_size(batch_examples(sample_batch), DEFAULT_STATS_FRACTION)
  enough = examples is not None and examples >= MIN_STATS_EXAMPLES
  return EstimatorOptions(kind=estimator, batch_fraction=DEFAULT_STATS_FRACTION if enough else None)


def _with_diagnostics(estimator: EstimatorOptions,
                      sample_batch: Any) -> EstimatorOptions | None:
  """``estimator`` with the diagnostics noise scaling reads (``None``: none possible).

  Kept as given if it asks for diagnostics; else their totals only (so
  the state takes any batch size), from the leading
  ``DEFAULT_DIAGNOSTICS_FRACTION`` of the statistics batch where that is at
  least two examples of a batch whose leaves all lead with the batch axis,
  and from the whole statistics batch otherwise (time-major leaves, small
  batches). ``None`` (with a warning) for a statistics batch of one example.
  """
  if estimator.diagnostics:
    return estimator
  stats = fraction_size(batch_examples(sample_batch), estimator.batch_fraction)
  if stats is not None and stats < 2:
    warnings.warn("kfl.kfac: noise scaling is off: it estimates the gradient's noise from "
                  "at least 2 examples per statistics batch, and this one has 1 (pass "
                  "noise_scaling=None to silence this).", UserWarning, stacklevel=3)
    return None
  fraction = DEFAULT_DIAGNOSTICS_FRACTION
  if stats is None or fraction_size(stats, fraction) < 2:
    fraction = None
  return dataclasses.replace(estimator, diagnostics=True, diagnostics_fraction=fraction,
                             per_example_norms=False)


def _trainable(params: Any) -> Any:
  """``False`` for the leaves of non-trainable collections (``batch_stats`` of
  a whole Flax variables dict), which must not decay."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  frozen = non_trainable(params)
  return jax.tree_util.tree_unflatten(treedef, [i not in frozen for i in range(len(leaves))])


def _is_zero(value: Any) -> bool:
  """``None`` or a Python zero; a traced hyperparameter is never "zero"."""
  return value is None or (isinstance(value, (int, float)) and value == 0)
