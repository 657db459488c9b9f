"""Phase 1: a Fisher estimate of every layer's factors, folded into the averages.

Martens & Grosse (2015), §5: ``A = E[a aᵀ]``, ``G = E[ds dsᵀ]`` from one
forward pass and one backward pass per Fisher cotangent (see
:mod:`kfac_jax_lite.statistics`); the averages are exponential moving
averages (§5, "ε"), started from the first estimate. Non-finite estimates are
never committed.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kfac_jax_lite import guard
from kfac_jax_lite.curvature import kronecker
from kfac_jax_lite.curvature.specs import spec_for
from kfac_jax_lite.diagnostics import Diagnostics, values_and_diagnostics
from kfac_jax_lite.options import EstimatorOptions, ParallelOptions
from kfac_jax_lite.statistics import (Factors, PassValues, factors_from_values, fisher_values,
                                      pmean_factors)
from kfac_jax_lite.tagging.layers import TaggedLoss


def per_batch_constant(x: Any) -> bool:
  """Whether a batch leaf is one value for the whole batch, not a row per
  example: a scalar, a typed PRNG key (``jax.random.key``, e.g. the dropout
  key) or a raw one (``jax.random.PRNGKey``: ``uint32[2]``)."""
  shape, dtype = getattr(x, "shape", ()), getattr(x, "dtype", None)
  if not shape or dtype is None:
    return True
  return (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
          or (tuple(shape) == (2,) and dtype == jnp.uint32))


def _leading_sizes(batch: Any) -> set[int]:
  """The leading size of every per-example leaf (see :func:`per_batch_constant`)."""
  return {x.shape[0] for x in jax.tree_util.tree_leaves(batch) if not per_batch_constant(x)}


def batch_examples(batch: Any) -> int | None:
  """The batch's examples: its per-example leaves' common leading size
  (``None`` if they differ, e.g. time-major leaves, or there are none)."""
  sizes = _leading_sizes(batch)
  return sizes.pop() if len(sizes) == 1 else None


def fraction_size(n: int | None, fraction: float | None, minimum: int = 1) -> int | None:
  """How many of ``n`` examples a leading ``fraction`` keeps: ``ceil(fraction · n)``,
  at least ``minimum`` and at most ``n`` (``n`` if ``fraction`` is ``None``)."""
  if n is None or fraction is None:
    return n
  return min(n, max(minimum, math.ceil(fraction * n)))


def leading_fraction(batch: Any, fraction: float | None, field: str, minimum: int = 1) -> Any:
  """The first :func:`fraction_size` examples of every per-example leaf (all
  if ``None``; a ``jax.ShapeDtypeStruct`` leaf gives the shape of that slice);
  per-batch constants (:func:`per_batch_constant`) are kept whole.

  Raises:
    ValueError: naming ``field`` if the leaves' leading sizes differ (a
      fraction of the batch needs the batch axis leading on every leaf).
  """
  if fraction is None:
    return batch
  sizes = _leading_sizes(batch)
  if len(sizes) > 1:
    raise ValueError(f"{field}={fraction} takes a leading fraction of every batch leaf, but "
                     f"their leading sizes differ ({sorted(sizes, key=str)}): put the batch "
                     f"axis first on every leaf, or pass {field}=None.")

  def leading(x: Any) -> Any:
    if per_batch_constant(x):
      return x
    n = fraction_size(x.shape[0], fraction, minimum)
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype)
    return x[:n]

  return jax.tree.map(leading, batch)


def estimate_factors(tag_fn: Callable[[Any, Any], TaggedLoss], params: Any, batch: Any,
                     key: jax.Array, estimator: EstimatorOptions, parallel: ParallelOptions,
                     *, keep_values: bool = False
                     ) -> tuple[Factors, Diagnostics | None, PassValues | None]:
  """One estimate of every layer's factors, averaged over the device axis.

  One statistics pass (:func:`kfac_jax_lite.statistics.fisher_values`, with
  the true-label column for the diagnostics when asked for) gives the
  factors, the diagnostics and the values statistics beyond the factors
  need (EK-FAC's scales, :mod:`kfac_jax_lite.step.scales`).

  Args:
    tag_fn: ``(params, batch) -> TaggedLoss`` (the transform's layer cache).
    params: the parameters.
    batch: the batch (its leading ``estimator.batch_fraction`` is used).
    key: PRNG key for Monte-Carlo targets (distinct per device).
    estimator: the estimator options.
    parallel: with ``axis_name``, the estimates are averaged over that axis
      (upper triangles only with ``symmetry_aware``).
    keep_values: whether to return the pass's values.

  Returns:
    Layer name -> factor name -> estimate (float32); with
    ``estimator.diagnostics`` the batch's (this device's) diagnostics, else
    ``None`` (with ``diagnostics_fraction``, of that leading fraction of it,
    from a pass of their own with the true labels; only their totals
    without ``per_example_norms``); with ``keep_values`` the
    pass's values (this device's), else ``None``.
  """
  stats_batch = leading_fraction(batch, estimator.batch_fraction,
                                 "EstimatorOptions.batch_fraction")
  tagged = tag_fn(params, stats_batch)
  kind = {"estimator": estimator.kind, "num_samples": estimator.num_samples}
  if estimator.diagnostics and estimator.diagnostics_fraction is None:
    values, diag = values_and_diagnostics(tagged, params, stats_batch, key, **kind)
  else:
    values, diag = fisher_values(tagged, params, stats_batch, key, **kind), None
  if estimator.diagnostics and estimator.diagnostics_fraction is not None:
    diag_batch = leading_fraction(stats_batch, estimator.diagnostics_fraction,
                                  "EstimatorOptions.diagnostics_fraction", minimum=2)
    diag = values_and_diagnostics(tag_fn(params, diag_batch), params, diag_batch, key,
                                  estimator="empirical")[1]
  if diag is not None and not estimator.per_example_norms:
    diag = diag.totals()
  est = factors_from_values(tagged, values.inputs, values.ds, values.num_cases)
  return average(est, parallel, values), diag, values if keep_values else None


def device_share(num_cases: int | jax.Array, axis_name: str) -> jax.Array | float:
  """This device's share ``W_d / mean_d W_d`` of the loss's cases: 1 unless a
  loss mask leaves the devices different numbers; case-averaged estimates
  weighted by it average over the devices to the whole batch's."""
  if isinstance(num_cases, int):
    return 1.0
  return num_cases / jax.lax.pmean(num_cases, axis_name)


def average(est: Factors, parallel: ParallelOptions, values: PassValues) -> Factors:
  """Factor estimates averaged over ``parallel.axis_name`` (if any; upper
  triangles only with ``symmetry_aware``), each device's case-averaged
  factors weighted by its :func:`device_share`."""
  if parallel.axis_name is None:
    return est
  share = device_share(values.num_cases, parallel.axis_name)
  if not isinstance(share, float):
    rows = {l.name: spec_for(l).row_averaged for l in values.tagged.factored}
    est = {n: {k: f if k in rows[n] else f * share for k, f in fs.items()}
           for n, fs in est.items()}
  if parallel.symmetry_aware:
    return pmean_factors(est, parallel.axis_name)
  return jax.lax.pmean(est, parallel.axis_name)


def add_pending(pending: dict[str, Any], est: Factors) -> dict[str, Any]:
  """Adds a micro-batch's estimate to the accumulation buffer (if finite).

  Args:
    pending: ``{"count": n, "sums": factors}``.
    est: the micro-batch's estimate.

  Returns:
    The buffer with ``est`` added and the count incremented.
  """
  ok = guard.all_finite(est)
  sums = jax.tree.map(jnp.add, pending["sums"], est)
  return {"count": pending["count"] + ok,
          "sums": optax.tree.where(ok, sums, pending["sums"])}


def moving_average(factors: Factors, stats_count: jax.Array, est: Factors,
                   pending: dict[str, Any] | None,
                   ema_decay: jax.Array | float) -> tuple[Factors, jax.Array]:
  """Folds an estimate (and any buffered micro-batch estimates) into the averages.

  Args:
    factors: the moving averages.
    stats_count: how many estimates they hold (the first replaces them).
    est: this step's estimate.
    pending: the accumulation buffer, or ``None``.
    ema_decay: the averages' decay.

  Returns:
    The new averages and count; unchanged if the result is not finite.
  """
  if pending is not None:
    n = pending["count"]
    est = jax.tree.map(lambda s, e: (s + e) / (n + 1.0), pending["sums"], est)
  decay = jnp.where(stats_count == 0, 0.0, ema_decay)
  avg = jax.tree.map(lambda o, e: kronecker.ema(o, e, decay), factors, est)
  ok = guard.all_finite(avg)
  return optax.tree.where(ok, avg, factors), stats_count + ok
