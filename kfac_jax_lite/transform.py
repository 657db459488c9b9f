"""``scale_by_kfac``: K-FAC preconditioning as an optax gradient transformation.

One call of ``update`` (all under ``jax.lax.cond`` inside a single compiled
step, so nothing recompiles after the first call):

1. every ``stats_every`` steps: one Fisher estimate of every Kronecker factor
   from ``batch`` (Martens & Grosse 2015, §5), folded into moving averages;
2. every ``inverse_every`` steps: damped factor inverses with factored
   Tikhonov damping (Ba et al. 2017, eq. 3);
3. every step: the preconditioned gradient ``A^{-1} ∇W G^{-1}`` per layer, the
   diagonal fallback elsewhere, and optionally the KL-clipped step-size
   scale (Ba et al. 2017, eq. 14).

Non-finite statistics or inverses are never committed to the state.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_lite import blocks as blocks_lib, guard, masking, placement, schedule
from kfac_jax_lite.curvature import diagonal, kl_clip as kl_clip_lib, kronecker
from kfac_jax_lite.curvature.estimators import check_estimator
from kfac_jax_lite.statistics import factor_estimate, pmean_factors
from kfac_jax_lite.tagging import geometry, report
from kfac_jax_lite.tagging.layers import (DEFAULT_MAX_FACTOR_DIM, TaggedLoss, check_options,
                                         tag)
from kfac_jax_lite.tagging.trace import abstractify, trace_loss, type_key, varying_axes

ScalarOrSchedule = float | jax.Array | optax.Schedule


class KfacState(NamedTuple):
  """State of :func:`scale_by_kfac` (an immutable, checkpointable pytree).

  Attributes:
    count: number of ``update`` calls so far.
    key: raw ``uint32[2]`` PRNG key for Fisher sampling.
    stats_count: number of factor estimates committed to the moving averages.
    factors: layer name -> ``{"A": ..., "G": ...}`` moving averages (float32).
    inverses: layer name -> ``{"A": ..., "G": ...}`` damped inverses (float32;
      this device's row slices of the matrices with
      ``inverse_placement="sharded"``).
    diag: parameter-shaped tree: squared-gradient moving average for leaves
      under the diagonal fallback, ``None`` for Kronecker-owned leaves.
    pending: with ``accumulate_statistics``, ``{"count": n, "sums": factors}``:
      estimates of the micro-batches of the step being accumulated (see
      :func:`kfac_jax_lite.accumulate`); ``None`` otherwise.
  """
  count: jax.Array
  key: jax.Array
  stats_count: jax.Array
  factors: dict[str, dict[str, jax.Array]]
  inverses: dict[str, dict[str, jax.Array]]
  diag: Any
  pending: Any = None


class _NotParams:
  """Stands in for layer-keyed state when ``init`` gets no parameters.

  ``optax.tree_utils.tree_map_params`` calls ``init`` on a leafless
  placeholder; a leaf here keeps the factor dicts out of the mapping.
  """


def _structure(tagged: TaggedLoss) -> tuple[Any, ...]:
  return tuple((l.name, l.kind, l.bias_index, l.input_form, l.output_form,
                l.factor_shapes if l.match else None) for l in tagged.layers)


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    if value < 0 or (value == 0 and not allow_zero):
      raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}.")


def scale_by_kfac(
    loss_fn: Callable[[Any, Any], jax.Array],
    sample_batch: Any,
    *,
    damping: float | jax.Array,
    ema_decay: float | jax.Array = 0.95,
    stats_every: int = 1,
    inverse_every: int = 10,
    estimator: str = "mc",
    num_samples: int = 1,
    kl_clip: float | jax.Array | None = None,
    learning_rate: ScalarOrSchedule | None = None,
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
  """Preconditions gradients with K-FAC (a direction, to be scaled by a rate).

  Layers are found automatically by tracing ``loss_fn`` (see
  :func:`kfac_jax_lite.tagging.find_layers`). With ``kl_clip`` and
  ``learning_rate`` η, the output is scaled by ``η_eff / η`` with
  ``η_eff = min(η, sqrt(kl_clip / Σ v·g))`` (Ba et al. 2017, eq. 14), so that a
  following ``optax.scale_by_learning_rate(η)`` applies the clipped rate.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, computed with a
      :mod:`kfac_jax_lite.losses` function.
    sample_batch: a batch (arrays or ``jax.ShapeDtypeStruct``) used only to
      trace ``loss_fn``.
    damping: Tikhonov damping λ > 0 of every block.
    ema_decay: moving-average decay of the factor estimates, in ``[0, 1)``.
    stats_every: estimate the factors every this many steps.
    inverse_every: recompute the damped inverses every this many steps.
    estimator: ``"mc"`` (sampled targets), ``"exact"`` or ``"empirical"``.
    num_samples: Monte-Carlo samples per example for ``"mc"``.
    kl_clip: KL-divergence bound of one step; requires ``learning_rate``.
    learning_rate: η (float or optax schedule), used only for KL clipping.
    inverse_method: ``"eigh"`` (robust) or ``"cholesky"`` (faster).
    conv_approximation: ``"expand"`` (KFC, Grosse & Martens 2016) or
      ``"reduce"`` (Ba et al. 2017, Appendix A: cheaper, spatially averaged).
    dense_approximation: ``"expand"`` or ``"reduce"`` for dense layers applied
      over extra axes (sequence positions; Eschenhagen et al. 2023).
    blocks: overrides of the detected blocks: regex (searched in the
      ``keystr`` of a parameter's path) -> ``"kron"`` | ``"full"`` |
      ``"diag"`` | ``"none"`` (see :func:`kfac_jax_lite.tagging.tag`).
    max_factor_dim: largest Kronecker factor kept as a dense matrix (``None``:
      4096; static under ``optax.inject_hyperparams``): a larger
      input factor is doubly factored (``K ⊗ Ψ``, Ba et al. 2017, §4) when the
      layer's input is a visibly flattened feature map, else diagonal; a
      larger output factor is diagonal. ``find_layers`` notes each case.
    staggered_inverses: instead of refreshing every inverse on one step in
      ``inverse_every`` (a latency spike), refresh a cost-balanced
      ``1/inverse_every`` share of the layers on every step (the functional
      analogue of Ba et al. 2017, §3's asynchronous inverses); all are
      computed on the first step. Needs a Python-int ``inverse_every``.
    stats_batch_fraction: estimate the factors on this leading fraction in
      ``(0, 1]`` of every batch leaf's first axis (curvature needs fewer
      samples than the gradient); ``None`` uses the whole batch, and then,
      inside one ``jit`` with ``stats_every=1``, XLA shares the statistics
      pass's forward computation with the gradient's. Static: under
      ``optax.inject_hyperparams`` list it in ``static_args``.
    accumulate_statistics: keep a buffer of micro-batch estimates in the
      state, for gradient accumulation with :func:`kfac_jax_lite.accumulate`
      (``update(..., kfac_accumulate_only=True)`` adds a micro-batch's
      estimate to it; the next ordinary update averages them all with its
      own before the moving average).
    distribute_inverses: every device inverts only a cost-balanced share of
      the layers, exchanged with an ``all_to_all`` of row slices and an
      ``all_gather``, so each inverse is computed once across the devices
      instead of on every device: over ``axis_name`` under ``pmap`` /
      ``shard_map``; under ``jit`` on a mesh (no ``axis_name``), over all the
      devices of the mesh set with ``jax.set_mesh``.
    symmetry_aware: with ``axis_name``, all-reduce only the upper triangles
      of the symmetric factors (packed by transposes and masks): half the
      bytes of the factor all-reduce, most of K-FAC's traffic, for some
      packing work on every device; worth it where the interconnect, not
      compute, is the limit (off by default, as in KAISA's kfac-pytorch).
    inverse_placement: where the inverses live (see
      :mod:`kfac_jax_lite.placement`; KAISA, Pauloski et al. 2021):
      ``"replicated"`` (COMM-OPT), every device keeps every inverse;
      ``"sharded"`` (MEM-OPT; needs ``axis_name``, implies
      ``distribute_inverses``), every device keeps a ``ceil(d / n)``-row slice
      of each Kronecker inverse matrix (about ``1/n`` of the inverse memory;
      diagonal inverses stay whole) and the preconditioning is distributed:
      two ``all_gather`` of the gradients' size per step. Then ``init`` must
      run inside the ``pmap`` / ``shard_map`` (``jax.pmap(tx.init,
      axis_name=...)``; under ``shard_map``, use
      :func:`kfac_jax_lite.sharded_state_specs` as the state's specs). Not
      for ``jit`` on a mesh without ``axis_name`` (a ``ValueError``): use
      ``shard_map`` with ``axis_name`` there.
    sample_params: the full parameters (arrays or ``jax.ShapeDtypeStruct``),
      needed only inside ``optax.masked`` / ``optax.partition``, which hide
      the masked-out parameters from ``init``. There, ``update`` also needs
      the full parameter values as ``kfac_params=`` (masked forwards extra
      arguments); layers are preconditioned for the leaves inside the mask
      (a masked-out bias counts as a zero gradient row).
    seed: seed of the state's PRNG key.
    axis_name: a ``pmap`` / ``shard_map`` axis over which the factor
      statistics are averaged (the gradients are averaged by the caller).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` requires the
    keyword argument ``batch`` and ignores other extra arguments.

  Raises:
    ValueError: for invalid settings.
  """
  _check_positive("damping", damping)
  _check_positive("inverse_every", inverse_every)
  _check_positive("stats_every", stats_every)
  if max_factor_dim is None:
    max_factor_dim = DEFAULT_MAX_FACTOR_DIM
  if not isinstance(max_factor_dim, int) or max_factor_dim < 1:
    raise ValueError("max_factor_dim must be None or a positive Python int (under "
                     "optax.inject_hyperparams, list it in static_args), got "
                     f"{max_factor_dim!r}.")
  _check_positive("kl_clip", kl_clip if kl_clip is not None else 1.0)
  if isinstance(ema_decay, (int, float)) and not 0 <= ema_decay < 1:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}.")
  check_estimator(estimator, num_samples)
  if inverse_method not in kronecker.INVERSE_METHODS:
    raise ValueError(f"Unknown inverse_method {inverse_method!r}; use one of "
                     f"{', '.join(kronecker.INVERSE_METHODS)}.")
  approximation = {"conv": conv_approximation, "dense": dense_approximation}
  blocks = dict(blocks or {})
  check_options(approximation, blocks)
  if kl_clip is not None and learning_rate is None:
    raise ValueError("kl_clip needs the learning_rate: pass learning_rate= "
                     "(the same value or schedule as the optimizer's).")
  if stats_batch_fraction is not None and not (
      isinstance(stats_batch_fraction, (int, float)) and 0.0 < stats_batch_fraction <= 1.0):
    raise ValueError("stats_batch_fraction must be None or a Python float in (0, 1] "
                     f"(under optax.inject_hyperparams, list it in static_args), got "
                     f"{stats_batch_fraction}.")
  placement.check_placement(inverse_placement, axis_name)
  sharded = inverse_placement == "sharded"
  distribute_inverses = distribute_inverses or sharded
  if staggered_inverses and not isinstance(inverse_every, int):
    raise ValueError("staggered_inverses needs a Python-int inverse_every (under "
                     "optax.inject_hyperparams, list it in static_args).")
  if not isinstance(num_samples, int):
    raise ValueError("num_samples must be a Python int (under "
                     "optax.inject_hyperparams, list it in static_args).")
  sample_batch = abstractify(sample_batch)
  cache: dict[Any, TaggedLoss] = {}

  def tagged_for(params: Any, batch: Any) -> TaggedLoss:
    """Traces once per parameter/batch signature; checks the layers agree."""
    key = (type_key(params), type_key(batch))
    if key not in cache:
      cache[key] = tag(trace_loss(loss_fn, params, batch), approximation, blocks,
                       max_factor_dim)
      ref_key = (key[0], type_key(sample_batch))
      if ref_key != key:
        if jax.tree_util.tree_structure(batch) != jax.tree_util.tree_structure(sample_batch):
          raise ValueError(
              "batch has a different tree structure than sample_batch: "
              f"{jax.tree_util.tree_structure(batch)} vs "
              f"{jax.tree_util.tree_structure(sample_batch)}.")
        reference = tagged_for(params, sample_batch)
        if _structure(cache[key]) != _structure(reference):
          raise ValueError(
              "batch changes the layers K-FAC detected for sample_batch "
              f"(batch {type_key(batch)[1]} vs sample_batch "
              f"{type_key(sample_batch)[1]}); pass a sample_batch with the "
              "shapes and dtypes of your training batches.")
    return cache[key]

  def init_fn(params: Any) -> KfacState:
    key = jax.random.key_data(jax.random.key(seed))
    zero = jnp.zeros([], jnp.int32)
    if not jax.tree_util.tree_leaves(params):
      return KfacState(zero, key, zero, _NotParams(), _NotParams(), params)
    if masking.has_masked(params):
      if sample_params is None:
        raise masking.masked_error("pass scale_by_kfac(..., sample_params=params)")
      tagged = tagged_for(abstractify(sample_params), sample_batch)
    else:
      tagged = tagged_for(params, sample_batch)
    if (msg := report.fallback_warning(tagged, blocks)) is not None:
      warnings.warn(msg, UserWarning, stacklevel=2)
    factors = {l.name: {k: jnp.zeros(shape, jnp.float32)
                        for k, shape in l.factor_shapes.items()}
               for l in tagged.factored}
    inverses = placement.init_inverses(factors, axis_name if sharded else None)
    pending = ({"count": zero, "sums": jax.tree.map(jnp.zeros_like, factors)}
               if accumulate_statistics else None)
    return KfacState(zero, key, zero, factors, inverses, _diag_tree(tagged, params),
                     pending)

  def update_fn(updates: Any, state: KfacState, params: Any = None, *,
                batch: Any = None, kfac_accumulate_only: bool = False,
                kfac_params: Any = None, **extra_args: Any) -> tuple[Any, KfacState]:
    del extra_args
    if kfac_accumulate_only and not accumulate_statistics:
      raise ValueError("kfac_accumulate_only needs scale_by_kfac(..., "
                       "accumulate_statistics=True) (kfl.accumulate sets it up).")
    if params is None or batch is None:
      raise ValueError("scale_by_kfac.update needs params and batch: call "
                       "tx.update(grads, state, params, batch=batch).")
    if masking.has_masked(params):
      if kfac_params is None:
        raise masking.masked_error("pass the full parameters as update(..., kfac_params=params)")
      params = kfac_params
    varying = frozenset().union(*map(varying_axes, jax.tree_util.tree_leaves(batch)))
    if varying and axis_name is None:
      raise ValueError(
          f"batch varies over the shard_map axes {sorted(varying)}, but "
          "scale_by_kfac has no axis_name: pass axis_name= (one of them) so the "
          "factor statistics are averaged over the devices.")
    tagged = tagged_for(params, batch)
    key, subkey = jax.random.split(jax.random.wrap_key_data(state.key))
    if axis_name is not None:
      subkey = jax.random.fold_in(subkey, jax.lax.axis_index(axis_name))

    def estimate():
      stats_batch = batch
      if stats_batch_fraction is not None:
        stats_batch = jax.tree.map(
            lambda x: x[:max(1, math.ceil(stats_batch_fraction * x.shape[0]))], batch)
      est = factor_estimate(tagged_for(params, stats_batch), params, stats_batch,
                            subkey, estimator=estimator, num_samples=num_samples)
      if axis_name is None:
        return est
      return (pmean_factors(est, axis_name) if symmetry_aware
              else jax.lax.pmean(est, axis_name))

    if kfac_accumulate_only:
      def add_pending():
        est = estimate()
        ok = guard.all_finite(est)
        sums = jax.tree.map(jnp.add, state.pending["sums"], est)
        return {"count": state.pending["count"] + ok,
                "sums": guard.select(ok, sums, state.pending["sums"])}
      pending = schedule.every(stats_every, state.count, add_pending, lambda: state.pending)
      return updates, state._replace(key=jax.random.key_data(key), pending=pending)

    def new_factors():
      est = estimate()
      if accumulate_statistics:
        n = state.pending["count"]
        est = jax.tree.map(lambda s, e: (s + e) / (n + 1.0), state.pending["sums"], est)
      decay = jnp.where(state.stats_count == 0, 0.0, ema_decay)
      avg = jax.tree.map(lambda o, n: kronecker.ema(o, n, decay), state.factors, est)
      ok = guard.all_finite(avg)
      return guard.select(ok, avg, state.factors), state.stats_count + ok

    factors, stats_count = schedule.every(
        stats_every, state.count, new_factors,
        lambda: (state.factors, state.stats_count))

    costs = schedule.inversion_costs(tagged)

    by_name = {l.name: l for l in tagged.factored}

    def compute(names: tuple[str, ...], facs: Any = None) -> dict[str, dict[str, jax.Array]]:
      facs = factors if facs is None else facs
      return {n: blocks_lib.inverses(by_name[n], facs[n], damping, inverse_method)
              for n in names}

    def refresh(names: tuple[str, ...]) -> dict[str, dict[str, jax.Array]]:
      if not distribute_inverses:
        fresh = compute(names)
      elif axis_name is None:
        fresh = placement.distribute_on_mesh(compute, names, costs, factors)
      else:
        fresh = placement.distribute(compute, names, costs, factors, axis_name, sharded)
      ok = guard.all_finite(fresh)
      ok = placement.all_devices(ok, axis_name) if sharded else ok
      fresh = guard.select(ok, fresh, {n: state.inverses[n] for n in names})
      return {**state.inverses, **fresh}

    def refresh_factors(keys: tuple[tuple[str, str], ...]) -> dict[str, dict[str, jax.Array]]:
      """Refreshes single factors (a layer's factors may be due on different steps)."""
      wanted: dict[str, list[str]] = {}
      for name, k in keys:
        wanted.setdefault(name, []).append(k)
      fresh = {n: blocks_lib.inverses(by_name[n], factors[n], damping, inverse_method, ks)
               for n, ks in wanted.items()}
      old = {n: {k: state.inverses[n][k] for k in ks} for n, ks in wanted.items()}
      fresh = guard.select(guard.all_finite(fresh), fresh, old)
      return {n: {**inv, **fresh.get(n, {})} for n, inv in state.inverses.items()}

    everything = tuple(factors)
    if staggered_inverses:
      # Balanced per factor (finer than per layer, so one large layer does not
      # fill a step); per layer when the layers are also spread over devices.
      groups = (schedule.balanced_groups(costs, inverse_every) if distribute_inverses else
                schedule.balanced_groups(schedule.factor_costs(tagged), inverse_every))
      due = refresh if distribute_inverses else refresh_factors
      inverses = jax.lax.cond(
          state.count == 0, lambda: refresh(everything),
          lambda: jax.lax.switch(state.count % inverse_every,
                                 [functools.partial(due, g) for g in groups]))
    else:
      inverses = schedule.every(inverse_every, state.count, lambda: refresh(everything),
                                lambda: state.inverses)

    # Masked-out leaves (optax.masked) are MaskedNode placeholders here.
    leaves, treedef = jax.tree_util.tree_flatten(updates, is_leaf=masking.is_masked)
    full_leaves = jax.tree_util.tree_leaves(params)
    diag_leaves = treedef.flatten_up_to(state.diag)
    out = list(leaves)
    new_diag = list(diag_leaves)
    written: set[int] = set()

    def put(i: int, value: jax.Array) -> None:
      """Writes a leaf's update; the slice layers of a stacked leaf add up."""
      out[i] = out[i] + value if i in written else value
      written.add(i)

    mats = {}
    for layer in tagged.factored:
      w = leaves[layer.weight_index]
      if masking.is_masked(w):
        continue
      b = None
      if layer.bias_index is not None:
        b = leaves[layer.bias_index]
        b = jnp.zeros_like(full_leaves[layer.bias_index], w.dtype) if masking.is_masked(b) else b
      mats[layer] = (b, geometry.params_to_matrix(layer, w.astype(jnp.float32),
                                                  None if b is None else b.astype(jnp.float32)))
    pres = placement.precondition({l: mat for l, (_, mat) in mats.items()}, inverses,
                                  axis_name if sharded else None)
    for layer, (b, _) in mats.items():
      w_out, b_out = geometry.matrix_to_params(layer, pres[layer], leaves[layer.weight_index], b)
      put(layer.weight_index, w_out)
      if b is not None and not masking.is_masked(leaves[layer.bias_index]):
        put(layer.bias_index, b_out)
    for layer in tagged.frozen:
      if not masking.is_masked(leaves[layer.weight_index]):
        out[layer.weight_index] = jnp.zeros_like(leaves[layer.weight_index])
    for layer in tagged.diagonal:
      i = layer.weight_index
      if masking.is_masked(leaves[i]):
        continue
      v = diagonal.update_second_moment(diag_leaves[i], leaves[i], ema_decay,
                                        state.count == 0)
      new_diag[i] = guard.select(guard.all_finite(v), v, diag_leaves[i])
      out[i] = diagonal.precondition(v, leaves[i], damping).astype(leaves[i].dtype)

    if kl_clip is not None:
      vg = sum(jnp.vdot(o.astype(jnp.float32), g.astype(jnp.float32))
               for o, g in zip(out, leaves) if not masking.is_masked(g))
      lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
      scale = kl_clip_lib.kl_scale(vg, lr, kl_clip)
      out = [o if masking.is_masked(o) else (o * scale).astype(o.dtype) for o in out]

    new_state = KfacState(
        count=optax.safe_increment(state.count), key=jax.random.key_data(key),
        stats_count=stats_count, factors=factors, inverses=inverses,
        diag=jax.tree_util.tree_unflatten(treedef, new_diag),
        pending=None if state.pending is None else jax.tree.map(jnp.zeros_like, state.pending))
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)



def _diag_tree(tagged: TaggedLoss, params: Any) -> Any:
  leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=masking.is_masked)
  diag_idx = {l.weight_index for l in tagged.diagonal}
  return jax.tree_util.tree_unflatten(treedef, [
      jnp.zeros(jnp.shape(x), jnp.float32) if i in diag_idx and not masking.is_masked(x) else None
      for i, x in enumerate(leaves)])



