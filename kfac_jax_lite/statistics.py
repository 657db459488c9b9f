"""Per-layer Kronecker factor estimates from one batch.

This is where the tagging side (which jaxpr values are a layer's input and
output) meets the curvature side (what to do with them). For each Kronecker
layer with activation rows ``a[n, t]`` and output-derivative rows ``ds[s, n, t]``
(``t`` runs over the axes the weight is shared over: sequence positions,
spatial locations; one position for an MLP), ``"expand"`` (the default) is

``A = (1/(N T)) sum_{n,t} a a^T``,  ``G = (1/M) sum_{s,n,t} ds ds^T``

and ``"reduce"`` sums over ``t`` before the outer products,

``A = (1/N) sum_n ā ā^T`` with ``ā = mean_t a``,  ``G = (1/M) sum_{s,n} d̄ d̄^T``
with ``d̄ = sum_t ds``,

where ``M`` is the number of cases the registered loss averages over. For an
MLP both are the usual K-FAC estimate ``F ≈ A ⊗ G`` (Martens & Grosse 2015,
eq. 1; Ba et al. 2017, §2); for convolutions "expand" is KFC (Grosse & Martens
2016) and "reduce" Ba et al.'s Appendix A approximation; for sequences they
are K-FAC-expand / -reduce (Eschenhagen et al. 2023).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kfac_jax_lite.curvature.estimators import output_cotangents
from kfac_jax_lite.losses import DISTRIBUTIONS
from kfac_jax_lite.tagging import geometry
from kfac_jax_lite.tagging.interpret import tapped_loss, zero_perturbations
from kfac_jax_lite.tagging.layers import TaggedLoss

Factors = dict[str, dict[str, jax.Array]]


def _factors(tagged: TaggedLoss, inputs: dict[str, jax.Array],
             ds: dict[str, jax.Array], num_cases: int) -> Factors:
  return {l.name: {"A": geometry.input_factor(l, inputs[l.name]),
                   "G": geometry.output_factor(l, ds[l.name], num_cases)}
          for l in tagged.kron}


def value_grad_and_factors(
    tagged: TaggedLoss, params: Any, batch: Any, key: jax.Array, *,
    estimator: str, num_samples: int = 1,
) -> tuple[jax.Array, Any, Factors]:
  """Loss, gradients and one factor estimate from a single forward pass.

  One forward pass is shared by two backward passes: the gradient of the loss,
  and the output derivatives for the sampled (or exact) Fisher cotangents.

  Args:
    tagged: the tagged loss (static).
    params: parameter pytree.
    batch: batch pytree.
    key: PRNG key for ``"mc"`` sampling.
    estimator: ``"exact"``, ``"mc"`` or ``"empirical"``.
    num_samples: Monte-Carlo samples for ``"mc"``.

  Returns:
    ``(loss, grads, factors)`` with ``factors[name] = {"A": ..., "G": ...}``.
  """
  param_leaves = jax.tree_util.tree_leaves(params)
  batch_leaves = jax.tree_util.tree_leaves(batch)
  dist = DISTRIBUTIONS[tagged.marker.distribution]

  def run(leaves, perts):
    t = tapped_loss(tagged, leaves, batch_leaves, perts)
    return (t.loss, t.logits), (t.inputs, t.targets)

  (loss, logits), vjp_fn, (inputs, targets) = jax.vjp(
      run, param_leaves, zero_perturbations(tagged), has_aux=True)
  grad_leaves, _ = vjp_fn((jnp.ones_like(loss), jnp.zeros_like(logits)))
  cot = output_cotangents(dist, logits, targets, key, estimator, num_samples)
  _, ds = jax.vmap(lambda c: vjp_fn((jnp.zeros_like(loss), c.astype(logits.dtype))))(cot)
  grads = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), grad_leaves)
  factors = _factors(tagged, inputs, ds, dist.num_cases(tuple(logits.shape)))
  return loss, grads, factors


def factor_estimate(tagged: TaggedLoss, params: Any, batch: Any, key: jax.Array,
                    *, estimator: str, num_samples: int = 1) -> Factors:
  """One factor estimate (no gradient of the loss is computed)."""
  param_leaves = jax.tree_util.tree_leaves(params)
  batch_leaves = jax.tree_util.tree_leaves(batch)
  dist = DISTRIBUTIONS[tagged.marker.distribution]
  params_const = [jax.lax.stop_gradient(p) for p in param_leaves]

  def run(perts):
    t = tapped_loss(tagged, params_const, batch_leaves, perts)
    return t.logits, (t.inputs, t.targets)

  logits, vjp_fn, (inputs, targets) = jax.vjp(
      run, zero_perturbations(tagged), has_aux=True)
  cot = output_cotangents(dist, logits, targets, key, estimator, num_samples)
  (ds,) = jax.vmap(lambda c: vjp_fn(c.astype(logits.dtype)))(cot)
  return _factors(tagged, inputs, ds, dist.num_cases(tuple(logits.shape)))
