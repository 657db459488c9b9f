"""Phase 4, adaptive: step size, momentum and damping from the quadratic model.

Martens & Grosse (2015), §7: the update is ``δ = α Δ + μ δ₀``, with ``Δ`` the
K-FAC direction (``-F̂⁻¹ ∇h``) and ``δ₀`` the previous update, where ``α`` and
``μ`` minimize the damped quadratic model of the loss on the batch

``M(δ) = ½ δᵀ (G + λ I) δ + ∇hᵀ δ``,

``G`` the exact generalized Gauss–Newton matrix (the Fisher of the registered
loss): a 2×2 linear system whose entries need ``G``-products with ``Δ`` and
``δ₀``, computed as ``vᵢᵀ G vⱼ = (J vᵢ)ᵀ H (J vⱼ)`` from one linearization of
the model's predictions (``J v`` by forward mode) and the loss's Hessian in
the predictions ``H`` (for these exponential-family losses, the derivative of
the mean, divided by the number of cases).

§6.5: every ``damping_every`` steps, the reduction ratio
``ρ = (h(θ + δ) - h(θ)) / M(δ)`` adapts ``λ`` Levenberg–Marquardt style:
``λ ← ω λ`` if ``ρ > 3/4``, ``λ ← λ / ω`` if ``ρ < 1/4`` (a non-finite new
loss counts as ``ρ < 1/4``), with ``ω = decay``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_lite import guard, schedule
from kfac_jax_lite.losses import DISTRIBUTIONS, case_weights
from kfac_jax_lite.options import AdaptiveOptions
from kfac_jax_lite.tagging.interpret import tapped_loss
from kfac_jax_lite.tagging.layers import TaggedLoss


class AdaptiveState(NamedTuple):
  """The quadratic model's part of :class:`kfac_jax_lite.KfacState`.

  Attributes:
    damping: the current damping ``λ`` (float32 scalar).
    previous: the previous update ``δ₀`` (shaped like the parameters).
    alpha: the latest step size ``α``.
    mu: the latest momentum ``μ``.
    rho: the latest reduction ratio ``ρ`` (NaN before the first).
  """
  damping: jax.Array
  previous: Any
  alpha: jax.Array
  mu: jax.Array
  rho: jax.Array


def init(params: Any, damping: float) -> AdaptiveState:
  """Damping ``damping``, a zero previous update, no step taken yet."""
  # Distinct buffers: a state whose leaves share one cannot be donated.
  return AdaptiveState(jnp.array(damping, jnp.float32), jax.tree.map(jnp.zeros_like, params),
                       jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32),
                       jnp.full([], jnp.nan, jnp.float32))


def _vdot(a: Any, b: Any) -> jax.Array:
  """``Σ a·b`` over the leaves of two trees, in float32."""
  return sum((jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), jnp.zeros([]))


def _pmean(x: Any, axis_name: str | None) -> Any:
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def curvature_products(tagged: TaggedLoss, params: Any, batch: Any, vectors: list[Any],
                       axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """The loss and the Gram matrix ``vᵢᵀ G vⱼ`` of the Gauss–Newton matrix.

  Args:
    tagged: the tagged loss (static).
    params: the parameters ``θ``.
    batch: the batch the model is formed on.
    vectors: parameter-shaped trees ``vᵢ``.
    axis_name: a device axis the batch is split over (the results are
      averaged over it), or ``None``.

  Returns:
    ``h(θ)`` on ``batch`` and the ``[k, k]`` matrix ``vᵢᵀ G vⱼ`` (float32).
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  batch_leaves = jax.tree_util.tree_leaves(batch)
  dist = DISTRIBUTIONS[tagged.marker.distribution]

  def model(param_leaves: list[jax.Array]) -> tuple[tuple[jax.Array, jax.Array], Any]:
    tapped = tapped_loss(tagged, param_leaves, batch_leaves, {})
    return (tapped.loss, tapped.logits), tapped.mask

  (loss, logits), linear, mask = jax.linearize(model, leaves, has_aux=True)
  jvs = [linear([t.astype(p.dtype) for p, t in zip(leaves, treedef.flatten_up_to(v))])[1]
         for v in vectors]
  weights = case_weights(tuple(logits.shape), mask, dist)
  hjvs = [jax.jvp(dist.mean, (logits,), (u,))[1] * weights.gradient for u in jvs]
  gram = jnp.stack([jnp.stack([_vdot(u, hv) for hv in hjvs]) for u in jvs]) / weights.num_cases
  return _pmean((loss.astype(jnp.float32), gram), axis_name)


def solve(gram: jax.Array, linear: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Minimizes ``½ xᵀ A x + bᵀ x`` over ``x = (α, μ)``.

  Args:
    gram: the damped ``[2, 2]`` curvature ``A`` over ``(Δ, δ₀)``.
    linear: ``b = (∇h·Δ, ∇h·δ₀)``.

  Returns:
    ``x`` and the model's value ``M = ½ xᵀ A x + bᵀ x`` at it. When ``δ₀``
    carries no curvature (the first step) or the system is singular, ``μ =
    0`` and ``α = -b₀ / A₀₀``; ``x = 0`` if ``A₀₀`` is not positive either.
  """
  det = gram[0, 0] * gram[1, 1] - gram[0, 1] ** 2
  full_ok = det > 1e-6 * gram[0, 0] * gram[1, 1]
  safe_det = jnp.where(full_ok, det, 1.0)
  both = jnp.stack([gram[1, 1] * linear[0] - gram[0, 1] * linear[1],
                    gram[0, 0] * linear[1] - gram[0, 1] * linear[0]]) / -safe_det
  pos = gram[0, 0] > 0
  alone = jnp.stack([jnp.where(pos, -linear[0] / jnp.where(pos, gram[0, 0], 1.0), 0.0), 0.0])
  x = jnp.where(full_ok, both, alone)
  return x, 0.5 * x @ gram @ x + linear @ x


def adapt_damping(damping: jax.Array, rho: jax.Array, decay: float, low: float,
                  high: float) -> jax.Array:
  """The Levenberg–Marquardt rule (Martens & Grosse 2015, §6.5), clipped to ``[low, high]``."""
  shrink = rho > 0.75
  grow = ~(rho >= 0.25)  # NaN (a non-finite new loss) grows λ.
  new = jnp.where(shrink, damping * decay, jnp.where(grow, damping / decay, damping))
  return jnp.clip(new, low, high)


def reduction_ratio(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any,
                    step: Any, loss: jax.Array, model_change: jax.Array,
                    axis_name: str | None) -> jax.Array:
  """``ρ = (h(θ + δ) - h(θ)) / M(δ)`` on ``batch`` (NaN if the new loss is not finite)."""
  moved = jax.tree.map(lambda p, d: p + d.astype(p.dtype), params, step)
  new_loss = _pmean(loss_fn(moved, batch).astype(jnp.float32), axis_name)
  rho = (new_loss - loss) / jnp.where(model_change < 0, model_change, -1.0)
  return jnp.where(jnp.isfinite(new_loss) & (model_change < 0), rho, jnp.nan)


def combine(direction: Any, previous: Any, x: jax.Array) -> Any:
  """``δ = α Δ + μ δ₀`` leaf by leaf, in each leaf's dtype."""
  return jax.tree.map(lambda d, p: (x[0] * d + x[1] * p).astype(d.dtype), direction, previous)


def linear_terms(grads: Any, direction: Any, previous: Any) -> jax.Array:
  """``b = (∇h·Δ, ∇h·δ₀)``."""
  return jnp.stack([_vdot(grads, direction), _vdot(grads, previous)])


def damped_gram(gram: jax.Array, direction: Any, previous: Any,
                damping: jax.Array) -> jax.Array:
  """``vᵢᵀ (G + λ I) vⱼ`` from ``vᵢᵀ G vⱼ``."""
  vs = [direction, previous]
  norms = jnp.stack([jnp.stack([_vdot(a, b) for b in vs]) for a in vs])
  return gram + damping * norms


def update(tagged: TaggedLoss, loss_fn: Callable[[Any, Any], jax.Array], grads: Any,
           preconditioned: Any, state: AdaptiveState, params: Any, batch: Any,
           count: jax.Array, options: AdaptiveOptions,
           axis_name: str | None) -> tuple[Any, AdaptiveState]:
  """The quadratic model's update ``δ`` and the adapted state.

  Args:
    tagged: the tagged loss on ``batch`` (static).
    loss_fn: the loss, for ``h(θ + δ)``.
    grads: the gradient ``∇h``.
    preconditioned: ``F̂⁻¹ ∇h`` (the K-FAC direction is its negative).
    state: the current :class:`AdaptiveState`.
    params: the parameters ``θ``.
    batch: the batch the model is formed on (see
      ``AdaptiveOptions.batch_fraction``; ``tagged`` must be its).
    count: the step count (the damping adapts when ``count % every == 0``).
    options: the :class:`kfac_jax_lite.AdaptiveOptions`.
    axis_name: the device axis the batch is split over, or ``None``.

  Returns:
    ``δ`` (to be added to the parameters; zero if the model is not finite)
    and the new state.
  """
  direction = jax.tree.map(jnp.negative, preconditioned)
  loss, gram = curvature_products(tagged, params, batch, [direction, state.previous],
                                  axis_name)
  x, change = solve(damped_gram(gram, direction, state.previous, state.damping),
                    linear_terms(grads, direction, state.previous))
  finite = guard.all_finite((x, change))
  x, change = jnp.where(finite, x, 0.0), jnp.where(finite, change, 0.0)
  delta = combine(direction, state.previous, x)
  if not options.adapt_damping:
    return delta, state._replace(previous=delta, alpha=x[0], mu=x[1])

  def adapt() -> tuple[jax.Array, jax.Array]:
    rho = reduction_ratio(loss_fn, params, batch, delta, loss, change, axis_name)
    return rho, adapt_damping(state.damping, rho, options.damping_decay,
                              options.min_damping, options.max_damping)

  rho, damping = schedule.every(options.damping_every, count, adapt,
                                lambda: (state.rho, state.damping))
  return delta, AdaptiveState(damping, delta, x[0], x[1], rho)
