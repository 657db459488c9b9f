"""Phases 1-2 for EK-FAC layers: their eigenbases and scales.

With ``InverseOptions(method="ekfac")`` every two-factor ``A ⊗ G`` layer
(dense, convolution, sequence-dense, embedding) keeps, instead of damped
factor inverses, the eigenbases of its factors and the scales ``S`` of
:mod:`kfac_jax_lite.curvature.ekfac` (George et al. 2018), in
``KfacState.ekfac``. On a step:

1. the bases are refreshed when the inverses would be (every
   ``inverse_every`` steps), from the factors' moving averages after this
   step's statistics, and ``S`` is reset to ``λ_A λ_Gᵀ``;
2. on a statistics step, ``S`` is folded (``ema_decay``) with the batch's
   second moments of the per-example gradients in the bases now current.

So a refresh and a statistics update on the same step (``kfac``'s default
10 / 10) give ``S = ε λ_A λ_Gᵀ + (1 - ε) Ŝ``, not a bare reset. Non-finite
bases or scales are never committed.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from kfac_jax_lite import guard, schedule
from kfac_jax_lite.curvature import ekfac, kronecker
from kfac_jax_lite.curvature.specs import spec_for
from kfac_jax_lite.options import EstimatorOptions, InverseOptions, ParallelOptions
from kfac_jax_lite.statistics import PassValues
from kfac_jax_lite.step import estimate
from kfac_jax_lite.tagging.layers import Layer, TaggedLoss

Blocks = dict[str, ekfac.Block]
Factors = dict[str, dict[str, jax.Array]]


def layers(tagged: TaggedLoss) -> list[Layer]:
  """The layers EK-FAC preconditions (a two-factor ``A ⊗ G`` block)."""
  return [l for l in tagged.factored if ekfac.supports(spec_for(l))]


def init(tagged: TaggedLoss) -> Blocks:
  """Identity bases and unit scales for every EK-FAC layer."""
  return {l.name: ekfac.init(spec_for(l)) for l in layers(tagged)}


def check_options(estimator: EstimatorOptions, inverses: InverseOptions,
                  parallel: ParallelOptions) -> None:
  """Raises ``ValueError`` for options EK-FAC does not support (names the fix)."""
  if inverses.method != "ekfac":
    return
  if inverses.staggered:
    raise ValueError("InverseOptions(method='ekfac') refreshes every eigenbasis on one "
                     "step: pass InverseOptions(method='ekfac', staggered=False).")
  if parallel.distribute_inverses:
    raise ValueError("InverseOptions(method='ekfac') computes its eigenbases on every "
                     "device: pass ParallelOptions(distribute_inverses=False, "
                     "inverse_placement='replicated') (axis_name still averages the "
                     "statistics).")
  if estimator.accumulate:
    raise ValueError("InverseOptions(method='ekfac') does not support "
                     "EstimatorOptions(accumulate=True): pass accumulate=False, or use "
                     "method='eigh' / 'cholesky'.")


def warning(tagged: TaggedLoss) -> str | None:
  """The message naming Kronecker layers that keep plain K-FAC (``None`` if none)."""
  kept = [l.name for l in tagged.factored
          if spec_for(l).label.startswith("kron") and not ekfac.supports(spec_for(l))]
  if not kept:
    return None
  return ("InverseOptions(method='ekfac'): these layers have a doubly-factored block "
          "(K ⊗ Ψ ⊗ G) and keep plain K-FAC with eigh inverses: " + ", ".join(kept) +
          ". Raise LayerOptions(max_factor_dim=...) above their input size to give "
          "them an A ⊗ G block.")


def _refresh(blocks: Blocks, factors: Factors) -> Blocks:
  fresh = {n: ekfac.refresh(factors[n]) for n in blocks}
  return optax.tree.where(guard.all_finite(fresh), fresh, blocks)


def _fold(blocks: Blocks, values: PassValues, ema_decay: Any,
          axis_name: str | None) -> Blocks:
  """``S`` moved toward this batch's estimate in the current bases."""
  by_name = {l.name: l for l in values.tagged.factored}
  est = {n: ekfac.scale_estimate(by_name[n], b, values.inputs[n], values.ds[n],
                                 values.num_cases) for n, b in blocks.items()}
  if axis_name is not None:
    share = estimate.device_share(values.num_cases, axis_name)
    if not isinstance(share, float):  # a loss mask: S is the weighted mean over the cases
      est = jax.tree.map(lambda s: s * share, est)
    est = jax.lax.pmean(est, axis_name)
  scales = {n: kronecker.ema(b["S"], est[n], ema_decay) for n, b in blocks.items()}
  old = {n: b["S"] for n, b in blocks.items()}
  scales = optax.tree.where(guard.all_finite(scales), scales, old)
  return {n: {**b, "S": scales[n]} for n, b in blocks.items()}


def update(blocks: Blocks | None, factors: Factors, values: PassValues | None,
           count: jax.Array, inverse_every: Any, ema_decay: Any,
           axis_name: str | None) -> Blocks | None:
  """The EK-FAC blocks after this step's refresh (if due) and statistics.

  Args:
    blocks: the current blocks, or ``None`` (not EK-FAC: returned as is).
    factors: the factors' moving averages after this step's statistics.
    values: this step's statistics pass, or ``None`` on other steps.
    count: the step number.
    inverse_every: the refresh period.
    ema_decay: the moving-average decay of ``S``.
    axis_name: a device axis the batch is split over (the estimates are
      averaged over it), or ``None``.

  Returns:
    The new blocks.
  """
  if blocks is None:
    return None
  blocks = schedule.every(inverse_every, count, lambda: _refresh(blocks, factors),
                          lambda: blocks)
  return blocks if values is None else _fold(blocks, values, ema_decay, axis_name)
