"""Per-layer Kronecker factor estimates from one batch.

This is where the tagging side (which jaxpr values are a layer's input and
output) meets the curvature side (what to do with them). For each dense layer
with activation rows ``a`` and output-derivative rows ``ds``:

``A = (1/rows) sum a a^T``,  ``G = (1/N) sum_s sum_rows ds ds^T``

where ``N`` is the number of cases the registered loss averages over. For an
MLP (``rows = N``) this is the usual K-FAC estimate of the Fisher block
``F ≈ A ⊗ G`` (Martens & Grosse 2015, eq. 1; Ba et al. 2017, §2); for weights
shared over extra axes it is the "expand" variant (Eschenhagen et al. 2023).
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
  out = {}
  for layer in tagged.dense:
    a = geometry.input_rows(layer, inputs[layer.name])
    g = geometry.output_rows(layer, ds[layer.name].astype(jnp.float32))
    g = g.reshape(-1, g.shape[-1])
    out[layer.name] = {"A": a.T @ a / a.shape[0], "G": g.T @ g / num_cases}
  return out


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
