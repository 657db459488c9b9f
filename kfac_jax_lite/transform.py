"""``scale_by_kfac``: K-FAC preconditioning as an optax gradient transformation.

One call of ``update`` is the phases of :mod:`kfac_jax_lite.step`, all under
``jax.lax.cond`` inside a single compiled step (nothing recompiles after the
first call):

1. every ``stats_every`` steps: one Fisher estimate of every Kronecker factor
   from ``batch`` (Martens & Grosse 2015, §5), folded into moving averages;
2. every ``inverse_every`` steps: damped factor inverses with factored
   Tikhonov damping (Ba et al. 2017, eq. 3), or with EK-FAC the factors'
   eigenbases, whose scales phase 1 re-estimates (George et al. 2018;
   :mod:`kfac_jax_lite.step.scales`);
3. every step: the preconditioned gradient ``A^{-1} ∇W G^{-1}`` per layer, the
   rms fallback (squared-gradient averages) elsewhere;
4. optionally, the KL-clipped step-size scale (Ba et al. 2017, eq. 14), or
   the step size, momentum and damping of the quadratic model (Martens &
   Grosse 2015, §6.5, §7; :mod:`kfac_jax_lite.step.quadratic`).

Non-finite statistics or inverses are never committed to the state.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_lite import masking, placement, schedule
from kfac_jax_lite.curvature.specs import spec_for
from kfac_jax_lite.options import (AdaptiveOptions, EstimatorOptions, InverseOptions,
                                   LayerOptions, ParallelOptions, as_estimator, check_type)
from kfac_jax_lite.step import (checks, estimate, precondition, quadratic, refresh, scales,
                                step_size)
from kfac_jax_lite.step.layers import LayerCache
from kfac_jax_lite.tagging import report
from kfac_jax_lite.tagging.layers import TaggedLoss
from kfac_jax_lite.tagging.trace import abstractify


class KfacState(NamedTuple):
  """State of :func:`scale_by_kfac` (an immutable, checkpointable pytree).

  Attributes:
    count: number of ``update`` calls so far.
    key: raw ``uint32[2]`` PRNG key for Fisher sampling (a statistics step
      samples with it folded with ``count``; accumulate-only calls advance it).
    stats_count: number of factor estimates committed to the moving averages.
    factors: layer name -> ``{"A": ..., "G": ...}`` moving averages (float32).
    inverses: layer name -> ``{"A": ..., "G": ...}`` damped inverses (float32;
      identities before the first refresh; this device's row slices of the
      matrices with ``inverse_placement="sharded"``).
    rms: parameter-shaped tree: squared-gradient moving average for leaves
      under the rms fallback, ``None`` for Kronecker-owned leaves.
    pending: with ``EstimatorOptions(accumulate=True)``, ``{"count": n,
      "sums": factors}``: estimates of the micro-batches of the step being
      accumulated (see :func:`kfac_jax_lite.accumulate`); ``None`` otherwise.
    diagnostics: with ``EstimatorOptions(diagnostics=True)``, the
      :class:`kfac_jax_lite.Diagnostics` of the latest statistics batch
      (zeros before the first); ``None`` otherwise. Inside a chain, read it
      with ``optax.tree.get(opt_state, "diagnostics")``.
    adaptive: with ``adaptive=kfl.AdaptiveOptions(...)``, the quadratic
      model's :class:`kfac_jax_lite.step.quadratic.AdaptiveState` (damping,
      previous update, ``α``, ``μ``, ``ρ``); ``None`` otherwise.
    ekfac: with ``InverseOptions(method="ekfac")``, layer name -> the
      eigenbases ``"A"``, ``"G"`` and scales ``"S"`` of each EK-FAC layer
      (:mod:`kfac_jax_lite.step.scales`; such layers have no ``inverses``
      entry); ``None`` otherwise.
  """
  count: jax.Array
  key: jax.Array
  stats_count: jax.Array
  factors: dict[str, dict[str, jax.Array]]
  inverses: dict[str, dict[str, jax.Array]]
  rms: Any
  pending: Any = None
  diagnostics: Any = None
  adaptive: Any = None
  ekfac: Any = None


class _NotParams:
  """Stands in for layer-keyed state when ``init`` gets no parameters.

  ``optax.tree_utils.tree_map_params`` calls ``init`` on a leafless
  placeholder; a leaf here keeps the factor dicts out of the mapping.
  """


def _rms_tree(tagged: TaggedLoss, params: Any) -> Any:
  """Zero squared-gradient averages for the fallback's leaves, ``None`` elsewhere."""
  leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=masking.is_masked)
  rms_idx = {l.weight_index for l in tagged.rms}
  return jax.tree_util.tree_unflatten(treedef, [
      jnp.zeros(jnp.shape(x), jnp.float32) if i in rms_idx and not masking.is_masked(x)
      else None for i, x in enumerate(leaves)])


def _zero_diagnostics(config: _Config, params: Any) -> Any:
  """Zeros shaped like the diagnostics of one batch (``None`` if not asked for)."""
  if not config.estimator.diagnostics:
    return None
  shapes = jax.eval_shape(lambda p, b: estimate.estimate_factors(
      config.layer_cache, p, b, jax.random.key(0), config.estimator, ParallelOptions())[1],
      params, config.layer_cache.sample_batch)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _init_state(tagged: TaggedLoss, params: Any, config: _Config,
                diagnostics: Any, adaptive: Any) -> KfacState:
  """Zero factors, identity inverses (or EK-FAC bases), an empty accumulation buffer."""
  estimator, parallel = config.estimator, config.parallel
  factors = {l.name: {k: jnp.zeros(shape, jnp.float32)
                      for k, shape in spec_for(l).factor_shapes.items()}
             for l in tagged.factored}
  eigen = scales.init(tagged) if config.inverses.method == "ekfac" else None
  inverses = placement.init_inverses({n: f for n, f in factors.items() if n not in (eigen or {})},
                                     parallel.axis_name if parallel.sharded else None)
  pending = ({"count": _counter(), "sums": jax.tree.map(jnp.zeros_like, factors)}
             if estimator.accumulate else None)
  return KfacState(_counter(), jax.random.key_data(jax.random.key(config.seed)), _counter(),
                   factors, inverses, _rms_tree(tagged, params), pending, diagnostics, adaptive,
                   eigen)


def _counter() -> jax.Array:
  """A zero step counter, a buffer of its own: a state whose leaves share a
  buffer cannot be donated (``jax.jit(..., donate_argnums=...)``)."""
  return jnp.zeros([], jnp.int32)


def scale_by_kfac(
    loss_fn: Callable[[Any, Any], jax.Array],
    sample_batch: Any,
    *,
    damping: float | jax.Array | optax.Schedule,
    ema_decay: float | jax.Array | optax.Schedule = 0.95,
    stats_every: int | jax.Array = 1,
    inverse_every: int | jax.Array = 10,
    kl_clip: float | jax.Array | None = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
    layers: LayerOptions = LayerOptions(),
    estimator: str | EstimatorOptions = "mc",
    inverses: InverseOptions = InverseOptions(),
    parallel: ParallelOptions = ParallelOptions(),
    adaptive: AdaptiveOptions | None = None,
    sample_params: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Preconditions gradients with K-FAC (a direction, to be scaled by a rate).

  Layers are found automatically by tracing ``loss_fn`` (see
  :func:`kfac_jax_lite.find_layers`). With ``kl_clip`` and ``learning_rate``
  η, the output is scaled by ``η_eff / |η|`` with ``η_eff = min(|η|,
  sqrt(kl_clip / Σ v·g))`` (Ba et al. 2017, eq. 14), so that a following
  ``optax.scale_by_learning_rate(η)`` applies the clipped rate.

  The numbers may be traced (``optax.inject_hyperparams``); concrete ones are
  validated here. A traced ``damping`` that is not positive makes the
  refreshed inverses non-finite, which are never committed: the previous
  inverses stay (identities before the first refresh, so the steps are plain
  KL-clipped gradient steps, not zero); a NaN damping gives NaN updates.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, computed with a
      :mod:`kfac_jax_lite.losses` function.
    sample_batch: a batch (arrays or ``jax.ShapeDtypeStruct``) used only to
      trace ``loss_fn``.
    damping: Tikhonov damping λ > 0 of every block, or an optax schedule of
      the step count (Osawa et al. 2019 decay it during training).
    ema_decay: moving-average decay of the factor estimates, in ``[0, 1)``,
      or a schedule.
    stats_every: estimate the factors every this many steps.
    inverse_every: recompute the damped inverses every this many steps.
    kl_clip: KL-divergence bound of one step; requires ``learning_rate``.
    learning_rate: η (float or optax schedule), used only for KL clipping.
    layers: which block preconditions each parameter, and the approximations
      (:class:`kfac_jax_lite.LayerOptions`).
    estimator: the Fisher estimator, ``"mc"`` | ``"exact"`` | ``"empirical"``
      or a :class:`kfac_jax_lite.EstimatorOptions` (samples, batch fraction,
      accumulation).
    inverses: how the damped inverses are computed
      (:class:`kfac_jax_lite.InverseOptions`: eigh/Cholesky, staggered), or
      ``method="ekfac"``: eigenvalue-corrected K-FAC (George et al. 2018).
    parallel: the device axis and where inverse work happens
      (:class:`kfac_jax_lite.ParallelOptions`).
    adaptive: ``None``, or a :class:`kfac_jax_lite.AdaptiveOptions`: the
      output is then the negated update ``-(α Δ + μ δ₀)`` of the quadratic
      model, with ``damping`` its initial damping (Martens & Grosse 2015,
      §6.5, §7); a following ``scale_by_learning_rate(1.0)`` applies it.
    sample_params: the full parameters (arrays or ``jax.ShapeDtypeStruct``),
      needed only inside ``optax.masked`` / ``optax.partition``, which hide
      the masked-out parameters from ``init``. There, ``update`` also needs
      the full parameter values as ``kfac_params=`` (masked forwards extra
      arguments); layers are preconditioned for the leaves inside the mask
      (a masked-out bias counts as a zero gradient row).
    seed: seed of the state's PRNG key.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` requires the
    keyword argument ``batch`` and ignores other extra arguments.

  Raises:
    ValueError: for invalid settings.
  """
  estimator = as_estimator(estimator)
  for name, value, cls in (("layers", layers, LayerOptions), ("inverses", inverses,
                           InverseOptions), ("parallel", parallel, ParallelOptions)):
    check_type(name, value, cls)
  if adaptive is not None:
    check_type("adaptive", adaptive, AdaptiveOptions)
  checks.check_numbers(damping, ema_decay, stats_every, inverse_every, kl_clip,
                       learning_rate, inverses, adaptive)
  scales.check_options(estimator, inverses, parallel)
  config = _Config(loss_fn, LayerCache(loss_fn, sample_batch, layers), damping, ema_decay,
                   stats_every, inverse_every, kl_clip, learning_rate, layers, estimator,
                   inverses, parallel, adaptive, sample_params, seed)
  return optax.GradientTransformationExtraArgs(functools.partial(_init, config),
                                               functools.partial(_update, config))


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static of one :func:`scale_by_kfac` (its arguments, validated)."""
  loss_fn: Callable[[Any, Any], jax.Array]
  layer_cache: LayerCache
  damping: Any
  ema_decay: Any
  stats_every: Any
  inverse_every: Any
  kl_clip: Any
  learning_rate: Any
  layers: LayerOptions
  estimator: EstimatorOptions
  inverses: InverseOptions
  parallel: ParallelOptions
  adaptive: AdaptiveOptions | None
  sample_params: Any
  seed: int


def _now(value: Any, count: jax.Array) -> Any:
  """A number, or a schedule's value at ``count``."""
  return value(count) if callable(value) else value


def _full_params(config: _Config, params: Any) -> Any:
  """The parameters ``init`` traces: ``sample_params`` inside ``optax.masked``."""
  if not masking.has_masked(params):
    return params
  if config.adaptive is not None:
    raise ValueError("adaptive=kfl.AdaptiveOptions() needs all the parameters: it "
                     "does not work inside optax.masked / optax.partition.")
  if config.sample_params is None:
    raise masking.masked_error("pass scale_by_kfac(..., sample_params=params)")
  return abstractify(config.sample_params)


def _init(config: _Config, params: Any) -> KfacState:
  """``init``: zero statistics, identity inverses; warns about fallbacks."""
  if not jax.tree_util.tree_leaves(params):  # also optax.tree.map_params' placeholders
    return KfacState(_counter(), jax.random.key_data(jax.random.key(config.seed)), _counter(),
                     _NotParams(), _NotParams(), params,
                     pending=_NotParams() if config.estimator.accumulate else None,
                     diagnostics=_NotParams() if config.estimator.diagnostics else None,
                     ekfac=_NotParams() if config.inverses.method == "ekfac" else None)
  full = _full_params(config, params)
  tagged = config.layer_cache(full)
  if (message := report.fallback_warning(tagged, config.layers.blocks)) is not None:
    warnings.warn(message, UserWarning, stacklevel=2)
  if config.inverses.method == "ekfac" and (message := scales.warning(tagged)) is not None:
    warnings.warn(message, UserWarning, stacklevel=2)
  diagnostics = _zero_diagnostics(config, full)
  adaptive = None if config.adaptive is None else quadratic.init(params, config.damping)
  return _init_state(tagged, params, config, diagnostics, adaptive)


def _estimate(config: _Config, params: Any, batch: Any,
              key: jax.Array) -> tuple[Any, Any, Any]:
  """One factor estimate of ``batch``, averaged over the devices, its
  diagnostics (if asked for) and, for EK-FAC, the pass's values."""
  return estimate.estimate_factors(config.layer_cache, params, batch, key, config.estimator,
                                   config.parallel,
                                   keep_values=config.inverses.method == "ekfac")


def _sample_key(config: _Config, key: jax.Array, step: jax.Array | None) -> jax.Array:
  """The Fisher sampling key of a statistics pass: the state's key folded with
  the step count (or, for an accumulate-only call, the key itself: those advance
  the state's key), and with the device's index under ``axis_name``.

  Called inside the statistics branch, so that steps without statistics do no
  random-number work."""
  key = jax.random.wrap_key_data(key)
  if step is not None:
    key = jax.random.fold_in(key, step)
  if config.parallel.axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(config.parallel.axis_name))
  return key


def _statistics(config: _Config, state: KfacState, params: Any,
                batch: Any) -> tuple[Any, jax.Array, Any, Any]:
  """Phase 1 when due: the factors' moving averages, their count, diagnostics;
  and EK-FAC's bases (refreshed when due) and scales."""
  def eigen(factors: Any, values: Any) -> Any:
    return scales.update(state.ekfac, factors, values, state.count, config.inverse_every,
                         _now(config.ema_decay, state.count), config.parallel.axis_name)

  def due() -> tuple[Any, jax.Array, Any, Any]:
    key = _sample_key(config, state.key, state.count)
    est, diagnostics, values = _estimate(config, params, batch, key)
    checks.check_diagnostics_layout(state.diagnostics, diagnostics)
    factors, stats_count = estimate.moving_average(
        state.factors, state.stats_count, est, state.pending,
        _now(config.ema_decay, state.count))
    return factors, stats_count, diagnostics, eigen(factors, values)

  return schedule.every(config.stats_every, state.count, due, lambda: (
      state.factors, state.stats_count, state.diagnostics, eigen(state.factors, None)))


def _accumulate_only(config: _Config, state: KfacState, params: Any, batch: Any,
                     key: jax.Array) -> Any:
  """A micro-batch's estimate added to the pending sums (when due)."""
  def due() -> Any:
    sample_key = _sample_key(config, key, None)
    return estimate.add_pending(state.pending, _estimate(config, params, batch, sample_key)[0])

  return schedule.every(config.stats_every, state.count, due, lambda: state.pending)


def _step_size(config: _Config, updates: Any, out: Any, state: KfacState, params: Any,
               batch: Any) -> tuple[Any, Any]:
  """Phase 4: the KL-clipped direction, or the quadratic model's step."""
  if config.adaptive is not None:
    model_batch = estimate.leading_fraction(batch, config.adaptive.batch_fraction,
                                            "AdaptiveOptions.batch_fraction")
    delta, adaptive = quadratic.update(
        config.layer_cache(params, model_batch), config.loss_fn, updates, out,
        state.adaptive, params, model_batch, state.count, config.adaptive,
        config.parallel.axis_name)
    return jax.tree.map(jnp.negative, delta), adaptive
  if config.kl_clip is not None:
    out = step_size.clip(out, updates, _now(config.learning_rate, state.count),
                         config.kl_clip)
  return out, state.adaptive


def _update(config: _Config, updates: Any, state: KfacState, params: Any = None,
            *positional: Any, batch: Any = None, kfac_accumulate_only: bool = False,
            kfac_params: Any = None, **extra_args: Any) -> tuple[Any, KfacState]:
  """``update``: the phases of one step (see the module docstring)."""
  del extra_args
  checks.check_update_args(params, batch, positional, kfac_accumulate_only,
                           config.estimator, config.parallel)
  if masking.has_masked(params):
    if kfac_params is None:
      raise masking.masked_error("pass the full parameters as update(..., kfac_params=params)")
    params = kfac_params
  tagged = config.layer_cache(params, batch)
  checks.check_layers(state.factors, [l.name for l in tagged.factored])
  if kfac_accumulate_only:  # micro-batches share the count: each takes a fresh key
    key, subkey = jax.random.split(jax.random.wrap_key_data(state.key))
    return updates, state._replace(key=jax.random.key_data(key), pending=_accumulate_only(
        config, state, params, batch, jax.random.key_data(subkey)))
  damping = (state.adaptive.damping if config.adaptive is not None
             else _now(config.damping, state.count))
  factors, stats_count, diagnostics, eigen = _statistics(config, state, params, batch)
  inverses = refresh.refresh_inverses(tagged, factors, state.inverses, state.count, damping,
                                      config.inverse_every, config.inverses, config.parallel)
  out, rms = precondition.precondition(tagged, updates, params, inverses, state.rms,
                                       state.count == 0, damping,
                                       _now(config.ema_decay, state.count), config.parallel,
                                       eigen, config.inverses.relative_damping)
  out, adaptive = _step_size(config, updates, out, state, params, batch)
  return out, KfacState(
      count=optax.safe_increment(state.count), key=state.key,
      stats_count=stats_count, factors=factors, inverses=inverses, rms=rms,
      pending=None if state.pending is None else jax.tree.map(jnp.zeros_like, state.pending),
      diagnostics=diagnostics, adaptive=adaptive, ekfac=eigen)
