"""Phase 2: the damped inverses that are due this step.

Every ``inverse_every`` steps all of them, or, staggered, a cost-balanced
``1/inverse_every`` share of the factors on every step (all on the first);
each computed here, or spread over the devices (:mod:`kfac_jax_lite.placement`).
How each block is damped and inverted (factored Tikhonov damping, Ba et al.
2017, eq. 3, 12, for Kronecker factors) is its spec's
(:mod:`kfac_jax_lite.curvature.specs`). A non-finite inverse is never committed: the
previous one (the identity before the first refresh) stays.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import optax

from kfac_jax_lite import guard, placement, schedule
from kfac_jax_lite.curvature.specs import spec_for
from kfac_jax_lite.options import InverseOptions, ParallelOptions
from kfac_jax_lite.tagging.layers import TaggedLoss

Inverses = dict[str, dict[str, jax.Array]]
FactorKey = tuple[str, str]  # (layer name, factor name)


def _all_keys(factors: Inverses) -> tuple[FactorKey, ...]:
  return tuple((n, k) for n, fac in factors.items() for k in fac)


def _by_layer(keys: Sequence[FactorKey]) -> dict[str, list[str]]:
  out: dict[str, list[str]] = {}
  for name, k in keys:
    out.setdefault(name, []).append(k)
  return out


def _invert_here(tagged: TaggedLoss, names: Sequence[str], factors: Inverses,
                 damping: jax.Array | float, options: InverseOptions,
                 only: dict[str, list[str]] | None = None) -> Inverses:
  """The inverses of ``names``' factors (those in ``only``), on this device
  (``"eigh"`` for the blocks EK-FAC does not replace)."""
  by_name = {l.name: l for l in tagged.factored}
  method = "eigh" if options.method == "ekfac" else options.method
  return {n: spec_for(by_name[n]).inverses(factors[n], damping, method,
                                           None if only is None else only[n],
                                           options.relative_damping)
          for n in names}


def _fresh(tagged: TaggedLoss, keys: Sequence[FactorKey], factors: Inverses,
           damping: jax.Array | float, options: InverseOptions,
           parallel: ParallelOptions) -> Inverses:
  """Inverses of ``keys`` (whole layers when distributed over devices)."""
  wanted = _by_layer(keys)
  if not parallel.distribute_inverses:
    return _invert_here(tagged, list(wanted), factors, damping, options, wanted)
  compute = functools.partial(_invert_here, tagged, damping=damping, options=options)
  costs = schedule.inversion_costs(tagged)
  if parallel.axis_name is None:
    return placement.distribute_on_mesh(compute, tuple(wanted), costs, factors)
  return placement.distribute(compute, tuple(wanted), costs, factors,
                              parallel.axis_name, parallel.sharded)


def _refresh(tagged: TaggedLoss, keys: Sequence[FactorKey], factors: Inverses,
             old: Inverses, damping: jax.Array | float, options: InverseOptions,
             parallel: ParallelOptions) -> Inverses:
  """``old`` with ``keys`` recomputed, where the results are finite."""
  if not keys:
    return old
  fresh = _fresh(tagged, keys, factors, damping, options, parallel)
  ok = guard.all_finite(fresh)
  if parallel.sharded:
    ok = placement.all_devices(ok, parallel.axis_name)
  previous = {n: {k: old[n][k] for k in ks} for n, ks in fresh.items()}
  fresh = optax.tree.where(ok, fresh, previous)
  return {n: {**inv, **fresh.get(n, {})} for n, inv in old.items()}


def _staggered_groups(tagged: TaggedLoss, inverse_every: int,
                      parallel: ParallelOptions) -> list[tuple[FactorKey, ...]]:
  """The factors due on each step of a period, balanced by cost.

  Per factor (so one large layer does not fill a step); per layer when the
  layers are also spread over devices.
  """
  if not parallel.distribute_inverses:
    return schedule.balanced_groups(schedule.factor_costs(tagged), inverse_every)
  shapes = {l.name: spec_for(l).factor_shapes for l in tagged.factored}
  return [tuple((n, k) for n in names for k in shapes[n])
          for names in schedule.balanced_groups(schedule.inversion_costs(tagged),
                                                inverse_every)]


def refresh_inverses(tagged: TaggedLoss, factors: Inverses, old: Inverses,
                     count: jax.Array, damping: jax.Array | float,
                     inverse_every: int | jax.Array, options: InverseOptions,
                     parallel: ParallelOptions) -> Inverses:
  """The inverses after this step's refresh (if any is due).

  Args:
    tagged: the tagged loss (static).
    factors: the factors' moving averages.
    old: the current inverses (row slices with a sharded placement); layers
      without one (EK-FAC's) are skipped.
    count: the step number.
    damping: Tikhonov damping ``λ``.
    inverse_every: refresh period.
    options: method, damping and staggering.
    parallel: where the inversions run and where the inverses live.

  Returns:
    The inverses, shaped like ``old``.
  """
  factors = {n: f for n, f in factors.items() if n in old}  # not EK-FAC's (step.scales)
  refresh = functools.partial(_refresh, tagged, factors=factors, old=old, damping=damping,
                              options=options, parallel=parallel)
  everything = _all_keys(factors)
  if not options.staggered:
    return schedule.every(inverse_every, count, lambda: refresh(everything), lambda: old)
  groups = _staggered_groups(tagged, inverse_every, parallel)
  return jax.lax.cond(
      count == 0, lambda: refresh(everything),
      lambda: jax.lax.switch(count % inverse_every,
                             [functools.partial(refresh, g) for g in groups]))
