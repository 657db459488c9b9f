"""Per-layer curvature factor estimates from one batch.

This is where the tagging side (which jaxpr values are a layer's input and
output) meets the curvature side (what to do with them): one forward pass
with taps and one backward pass per Fisher cotangent give every layer's
activations and output derivatives; each layer's block spec
(:mod:`kfac_jax_lite.curvature.specs`) turns them into its factors
(:mod:`kfac_jax_lite.curvature.estimation` has the formulas).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_lite.curvature import specs, symmetric
from kfac_jax_lite.curvature.estimators import output_cotangents
from kfac_jax_lite.losses import DISTRIBUTIONS, CaseWeights, Distribution, case_weights
from kfac_jax_lite.tagging.interpret import tapped_loss, zero_perturbations
from kfac_jax_lite.tagging.layers import TaggedLoss
from kfac_jax_lite.tagging.trace import varying_axes

Factors = dict[str, dict[str, jax.Array]]


def factors_from_values(tagged: TaggedLoss, inputs: dict[str, Any], ds: dict[str, Any],
                        num_cases: int | jax.Array) -> Factors:
  """Every layer's factors from a tapped pass's values (see :func:`tapped_derivatives`)."""
  return {l.name: specs.spec_for(l).estimate(l, inputs[l.name], ds[l.name], num_cases)
          for l in tagged.factored}


def _varying_like(perturbations: Factors, batch_leaves: list[Any]) -> Factors:
  """Under ``shard_map``, makes perturbations vary over the batch's axes.

  Otherwise their cotangents (the per-shard output derivatives) would be
  summed across the axes by the transpose of the implicit broadcast.
  """
  axes = frozenset().union(*(varying_axes(x) for x in batch_leaves))
  if not axes:
    return perturbations
  return jax.tree.map(
      lambda z: jax.lax.pcast(z, tuple(sorted(axes)), to="varying"), perturbations)


Cotangents = Callable[[Distribution, jax.Array, jax.Array, CaseWeights], jax.Array]


def tapped_derivatives(tagged: TaggedLoss, params: Any, batch: Any, cotangents: Cotangents
                       ) -> tuple[dict[str, Any], dict[str, Any], tuple[int, ...], CaseWeights]:
  """Every layer's inputs and output derivatives for a set of logit cotangents.

  One forward pass with zero perturbations on the layer outputs, then one
  backward pass per cotangent column (vectorized).

  Args:
    tagged: the tagged loss (static).
    params: parameter pytree.
    batch: batch pytree.
    cotangents: ``(dist, logits, targets, weights) -> [S, *logits.shape]``,
      the columns pulled back to the layer outputs, each case's already
      weighted by the loss's :class:`~kfac_jax_lite.losses.CaseWeights`
      (e.g. :func:`fisher_cotangents`).

  Returns:
    ``(inputs, ds, logits_shape, weights)``: layer name -> the activation
    operand of each use; layer name -> ``[S, *out_shape]`` output
    derivatives of each use (zero from the cases a loss mask leaves out);
    the shape of the registered loss's logits; the
    :class:`~kfac_jax_lite.losses.CaseWeights` the columns were given (its
    ``num_cases``, ``Σ m`` with a mask, is what the loss averages over).
  """
  param_leaves = jax.tree_util.tree_leaves(params)
  batch_leaves = jax.tree_util.tree_leaves(batch)
  dist = DISTRIBUTIONS[tagged.marker.distribution]
  params_const = [jax.lax.stop_gradient(p) for p in param_leaves]

  def run(perts):
    t = tapped_loss(tagged, params_const, batch_leaves, perts)
    return t.logits, (t.inputs, t.targets, t.mask)

  logits, vjp_fn, (inputs, targets, mask) = jax.vjp(
      run, _varying_like(zero_perturbations(tagged), batch_leaves), has_aux=True)
  weights = case_weights(tuple(logits.shape), mask, dist)
  cot = cotangents(dist, logits, targets, weights)  # masked cases: no derivative
  (ds,) = jax.vmap(lambda c: vjp_fn(c.astype(logits.dtype)))(cot)
  return inputs, ds, tuple(logits.shape), weights


def fisher_cotangents(key: jax.Array, estimator: str, num_samples: int = 1) -> Cotangents:
  """The estimator's Fisher cotangent columns (:func:`output_cotangents`), each
  case's scaled by ``√m`` so that their outer products weigh it by ``m``."""
  def cotangents(dist: Distribution, logits: jax.Array, targets: jax.Array,
                 weights: CaseWeights) -> jax.Array:
    cot = output_cotangents(dist, logits, targets, key, estimator, num_samples)
    return cot * weights.fisher
  return cotangents


class PassValues(NamedTuple):
  """A statistics pass's values (see :func:`tapped_derivatives`).

  Attributes:
    tagged: the tagged loss of the batch the pass ran on.
    inputs: layer name -> the activation operand of each use.
    ds: layer name -> ``[S, *out_shape]`` Fisher output derivatives of each use.
    num_cases: the number of cases the registered loss averages over.
  """
  tagged: TaggedLoss
  inputs: dict[str, Any]
  ds: dict[str, Any]
  num_cases: int | jax.Array


def fisher_values(tagged: TaggedLoss, params: Any, batch: Any, key: jax.Array,
                  *, estimator: str, num_samples: int = 1) -> PassValues:
  """The statistics pass with the estimator's Fisher cotangents (arguments as
  :func:`factor_estimate`)."""
  inputs, ds, _, weights = tapped_derivatives(
      tagged, params, batch, fisher_cotangents(key, estimator, num_samples))
  return PassValues(tagged, inputs, ds, weights.num_cases)


def factor_estimate(tagged: TaggedLoss, params: Any, batch: Any, key: jax.Array,
                    *, estimator: str, num_samples: int = 1) -> Factors:
  """One estimate of every Kronecker layer's factors from one batch.

  Args:
    tagged: the tagged loss (static).
    params: parameter pytree.
    batch: batch pytree.
    key: PRNG key for ``"mc"`` sampling.
    estimator: ``"exact"``, ``"mc"`` or ``"empirical"``.
    num_samples: Monte-Carlo samples for ``"mc"``.

  Returns:
    ``{name: {"A": ..., "G": ...}}`` (float32).
  """
  values = fisher_values(tagged, params, batch, key, estimator=estimator,
                         num_samples=num_samples)
  return factors_from_values(tagged, values.inputs, values.ds, values.num_cases)


def pmean_factors(est: Factors, axis_name: str) -> Factors:
  """``lax.pmean`` of factor estimates over a device axis, in one all-reduce.

  Only the upper triangle of each symmetric factor matrix is sent
  (:mod:`kfac_jax_lite.curvature.symmetric`): about half the traffic of
  averaging the matrices, which is most of K-FAC's communication per
  statistics step.

  Args:
    est: layer name -> factor name -> estimate.
    axis_name: the ``pmap`` / ``shard_map`` axis.

  Returns:
    The averages, shaped like ``est``.
  """
  if jax.lax.axis_size(axis_name) == 1:
    return est
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(est)
  symmetric_leaf = [specs.symmetric_matrix(getattr(path[-1], "key", None), x.shape)
                    for path, x in path_leaves]
  leaves = [x for _, x in path_leaves]
  parts = [symmetric.pack(x) if sym else x.reshape(-1)
           for x, sym in zip(leaves, symmetric_leaf)]
  flat = jax.lax.pmean(jnp.concatenate(parts), axis_name)
  out, offset = [], 0
  for x, sym, part in zip(leaves, symmetric_leaf, parts):
    chunk = flat[offset:offset + part.size]
    offset += part.size
    out.append(symmetric.unpack(chunk, x.shape[0]) if sym else chunk.reshape(x.shape))
  return jax.tree_util.tree_unflatten(treedef, out)
