"""Per-example gradient norms, gradient noise scale and gradient diversity from
the statistics pass (the "bonus" of PyTorch-SSO, Osawa & Bulatov).

The statistics pass already has, for every layer, the activation rows
``a[n, t]`` (``t`` over the positions the weight is shared over, and over the
uses of a shared weight; a trailing 1 for the bias) and the output derivatives
``ds[n, t]``. Pulled back from the true-label cotangent, the per-example
gradient of ``[W; b]`` is ``g_n = c Σ_t a_{n,t} ds_{n,t}^T``, with
``c = B / M`` (``B`` the batch size, ``M`` the number of cases the registered
loss averages over, ``Σ m`` with case weights ``m``: the pass's cotangents are
per-case derivatives, each times its ``m``, and ``g_n`` is the gradient of
example ``n``'s term ``ℓ_n`` of the loss ``(1/B) Σ_n ℓ_n``). Its squared norm
needs no ``d_in × d_out`` matrix:

``||g_n||² = c² Σ_{t,t'} (a_t · a_t') (ds_t · ds_t')``

(``||a_n||² ||ds_n||²`` for one position), costing ``T² (d_in + d_out)`` per
example against ``T d_in d_out`` for forming ``g_n``; :func:`use_gram` picks
by these counts and the activations' layout.
An embedding's ``a_t`` are one-hot, so ``a_t · a_t'`` is ``[id_t = id_t']``.
Scale-and-shift layers have their per-example gradients already. The batch
gradient ``Σ_n g_n = c Σ_{n,t} a ds^T`` is one more product per layer (none
where ``g_n`` is formed, or where the caller passes the gradient).

Everything is read through the very expressions the factor estimates use
(the input rows and output-derivative rows of
:mod:`kfac_jax_lite.curvature.estimation`, a scale-and-shift layer's
per-example gradients), so that under ``jit`` XLA computes them once for
both; a convolution's patches are read as ``[N, d_in, T]`` columns, the
layout they are built in, and the bias's 1 is added to ``||a||²`` or
``a · a'`` rather than concatenated.

From these, with ``s = Σ_n ||g_n||²`` and ``G_B = (1/B) Σ_n g_n``, the
unbiased estimates of McCandlish et al. (2018, "An Empirical Model of
Large-Batch Training", App. A, batch sizes 1 and ``B``) are

``tr Σ ≈ (s − B ||G_B||²) / (B − 1)``,
``||G||² ≈ (B ||G_B||² − s / B) / (B − 1) = ||G_B||² − tr Σ / B``,

the simple noise scale ``B_simple = tr Σ / ||G||²`` and Yin et al.'s (2018,
"Gradient Diversity") gradient diversity ``s / ||Σ_n g_n||²``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from kfac_jax_lite.curvature import estimation
from kfac_jax_lite.curvature.estimators import check_estimator, output_cotangents
from kfac_jax_lite.diagnostics_record import Diagnostics
from kfac_jax_lite.losses import CaseWeights, Distribution
from kfac_jax_lite.options import LayerOptions
from kfac_jax_lite.statistics import (Factors, PassValues, factors_from_values,
                                      fisher_cotangents, tapped_derivatives)
from kfac_jax_lite.tagging import geometry
from kfac_jax_lite.tagging.layers import Layer, TaggedLoss, tag
from kfac_jax_lite.tagging.trace import trace_loss


def use_gram(positions: int, d_in: int, d_out: int, *, columns: bool) -> bool:
  """Whether the Gram form ``Σ_{t,t'} (a·a')(ds·ds')`` is used rather than
  forming ``g_n``.

  The Gram form costs ``T² (d_in + d_out)`` per example, ``g_n`` costs
  ``T d_in d_out``. With activations stored as rows ``[T, d_in]``, forming
  ``g_n`` contracts the leading axis of both operands, which XLA:CPU runs at
  about half the rate of the Gram form's products (BUILD.md, "Diagnostics'
  cost"), so for rows the Gram form is kept up to twice ``g_n``'s flops.

  Args:
    positions: ``T``, the positions (and uses) the weight is shared over.
    d_in: rows of ``[W; b]`` (the bias's 1 included).
    d_out: its columns.
    columns: whether the activations are stored as columns ``[d_in, T]``
      (convolution patches).

  Returns:
    ``True`` for the Gram form.
  """
  return positions * (d_in + d_out) <= (1 if columns else 2) * d_in * d_out


def _output_rows(m: Any, ds: jax.Array) -> jax.Array:
  """``[S, N, T, d_out]``: the expression the factor ``G`` is built from, so
  that XLA computes it once for both."""
  return m.output_rows(m.unpermute(ds.astype(jnp.float32)))


def _kron_terms(a: jax.Array, d: jax.Array, bias: bool, c2: float,
                columns: bool) -> tuple[jax.Array, jax.Array | None]:
  """``||g_n||²`` of ``g_n = Σ_t [a_t; 1] ds_tᵀ``, and ``||Σ_n g_n||²`` where
  ``g_n`` is formed anyway.

  Args:
    a: ``[N, d_in, T]`` (``columns``) or ``[N, T, d_in]`` activations,
      without the bias's 1.
    d: ``[N, T, d_out]`` output derivatives.
    bias: whether the layer has a bias (the constant 1 in ``a``).
    c2: ``c²``, applied inside the reductions (no extra pass over ``[N]``).
    columns: the layout of ``a`` (whichever its family builds, so that no
      transposed copy is made).

  Returns:
    ``[N]``, and ``[]`` or ``None``. The bias's 1 enters as ``+1`` in
    ``||a||²`` or ``a·a'``, or as ``||Σ_t ds_t||²``: no column of ones.
  """
  positions, d_out = d.shape[1], d.shape[2]
  d_in, spec = (a.shape[1], "ni{}") if columns else (a.shape[2], "n{}i")
  if positions == 1:  # ||[a; 1]||² ||ds||², elementwise (no batched product)
    return (jnp.sum(jnp.square(a), axis=(1, 2)) + float(bias)) * jnp.sum(
        jnp.square(d) * c2, axis=(1, 2)), None
  if use_gram(positions, d_in + bias, d_out, columns=columns):
    return _gram_sq(a, d, bias, columns) * c2, None
  g = jnp.einsum(f"{spec.format('t')},ntk->nik", a, d)
  sq, total = jnp.sum(jnp.square(g) * c2, axis=(1, 2)), jnp.sum(jnp.square(jnp.sum(g, axis=0)))
  if bias:
    d_sum = jnp.sum(d, axis=1)  # [N, d_out]: the bias row of g_n
    sq += jnp.sum(jnp.square(d_sum) * c2, axis=1)
    total += jnp.sum(jnp.square(jnp.sum(d_sum, axis=0)))
  return sq, total * c2


def _gram_sq(a: jax.Array, d: jax.Array, bias: bool, columns: bool) -> jax.Array:
  """``Σ_{s,t} (a_s·a_t + [bias]) (ds_s·ds_t)`` per example, as
  ``Σ (K a) ∘ a`` with ``K`` the ``[T, T]`` Gram matrix of the output
  derivatives (activations as columns) or ``Σ (K ds) ∘ ds`` with ``K`` that of
  the activations (rows).

  The same flops as multiplying the two Gram matrices elementwise, but each
  batched product reads its operands in their stored layout (on XLA:CPU the
  transformer's diagnostics went from +22% to +7% of its statistics pass;
  BUILD.md, "Diagnostics' cost").
  """
  if columns:  # a: [N, d_in, T]
    kd = jnp.einsum("nsk,ntk->nst", d, d)
    ones = float(bias) * jnp.sum(kd, axis=(1, 2))
    return jnp.sum(jnp.einsum("nst,nit->nis", kd, a) * a, axis=(1, 2)) + ones
  ka = jnp.einsum("nsi,nti->nst", a, a) + float(bias)  # a: [N, T, d_in]
  return jnp.sum(jnp.einsum("nst,ntk->nsk", ka, d) * d, axis=(1, 2))


def _summed_sq(layer: Layer, xs: Sequence[jax.Array], dss: Sequence[jax.Array]) -> jax.Array:
  """``||Σ_n g_n||²`` from one product ``Σ_{n,t} [a; 1] dsᵀ`` of the very
  ``[N T, ·]`` rows the factors ``A`` and ``G`` are built from."""
  bias = layer.bias_index is not None
  total = sum(u.input_matrix_rows(x, bias=bias, reduce=False).T
              @ _output_rows(u, ds).reshape(-1, layer.d_out)
              for u, x, ds in zip(layer.matches, xs, dss))
  return jnp.sum(jnp.square(total))


def _embedding_terms(ids: jax.Array, d: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
  same = (ids[:, :, None] == ids[:, None, :]).astype(d.dtype)
  sq = jnp.einsum("nst,nsk,ntk->n", same, d, d)
  total = jnp.zeros((vocab, d.shape[-1]), d.dtype).at[ids.reshape(-1)].add(
      d.reshape(-1, d.shape[-1]), mode="drop")
  return sq, jnp.sum(jnp.square(total))


def layer_terms(layer: Layer, xs: Sequence[jax.Array], dss: Sequence[jax.Array],
                scale: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  """One layer's per-example squared gradient norms and squared batch-gradient norm.

  The values are read through the very expressions the factor estimates
  use (:mod:`kfac_jax_lite.curvature.estimation`), so that under ``jit``
  XLA computes the activation rows, output-derivative rows and a
  scale-and-shift layer's per-example gradients once for both.

  Args:
    layer: a layer with a match (``TaggedLoss.factored``).
    xs: the activation operand of each use of its weight.
    dss: the true-label output derivatives ``[1, *out_shape]`` of each use.
    scale: ``c = B / M``, from per-case derivatives to per-example gradients.

  Returns:
    ``([N] ||g_n||², ||Σ_n g_n||²)`` in float32.
  """
  m, c2 = layer.match, scale**2
  if m.block == "diagonal_fisher":
    g = estimation.per_example_grads(layer, xs, dss)[0]
    return (jnp.sum(jnp.square(g) * c2, axis=(1, 2)),
            jnp.sum(jnp.square(jnp.sum(g, axis=0))) * c2)
  d = jnp.concatenate([_output_rows(u, ds)[0] for u, ds in zip(layer.matches, dss)], axis=1)
  if m.vector_input:
    ids = jnp.concatenate([u.input_rows(x) for u, x in zip(layer.matches, xs)], axis=1)
    sq, total = _embedding_terms(ids, d, m.d_in)
    return sq * c2, total * c2
  # Columns where a family builds them (conv patches), else rows.
  columns = m.builds_columns
  a = jnp.concatenate([u.input_columns(x.astype(jnp.float32)) if columns
                       else u.input_rows(x.astype(jnp.float32))
                       for u, x in zip(layer.matches, xs)], axis=2 if columns else 1)
  sq, total = _kron_terms(a, d, layer.bias_index is not None, c2, columns)
  return sq, (_summed_sq(layer, xs, dss) * c2 if total is None else total)


def _rows_per_example(m: Any) -> int:
  """The size of the axis a use's per-example terms are read along (its ``N``)."""
  if m.block == "diagonal_fisher":
    return m.out_shape[0] if m.out_shape else 1
  return jax.eval_shape(m.output_rows, jax.ShapeDtypeStruct(m.out_shape, jnp.float32)).shape[0]


def from_values(tagged: TaggedLoss, inputs: dict[str, Sequence[jax.Array]],
                true_ds: dict[str, Sequence[jax.Array]], logits_shape: tuple[int, ...],
                num_cases: int | jax.Array, *, batch_grads: Any = None) -> Diagnostics:
  """The diagnostics from values a statistics pass already has (no further pass).

  Args:
    tagged: the tagged loss.
    inputs: layer name -> the activation operand of each use (the pass's
      ``inputs``, :func:`kfac_jax_lite.statistics.tapped_derivatives`).
    true_ds: layer name -> each use's output derivatives ``[1, *out_shape]``
      for the true-label (empirical-Fisher) cotangent.
    logits_shape: shape of the registered loss's logits; its leading axis is
      the batch axis ``B`` (at least 2).
    num_cases: number of cases the registered loss averages over (traced
      with a loss mask).
    batch_grads: optional gradient of the registered loss (the batch mean
      ``G_B``, shaped like the parameters) if the caller has it already (an
      optimizer's incoming gradient when ``loss_fn`` is the registered loss
      alone): its layers' parts replace the products ``Σ_{n,t} a ds^T``,
      the one cost here that grows like the layers' weights.

  Returns:
    The :class:`Diagnostics`.

  Raises:
    ValueError: for a batch of fewer than two examples.
  """
  batch_size = logits_shape[0] if logits_shape else 1
  if batch_size < 2:
    raise ValueError(f"diagnostics need a batch of at least 2 examples (the logits have "
                     f"shape {logits_shape}); pass a larger batch.")
  covered = [l for l in tagged.factored
             if all(_rows_per_example(u) == batch_size for u in l.matches)]
  uncovered = tuple(l.name for l in tagged.layers if l.kind in ("rms", "none")
                    or (l.match is not None and l not in covered))
  scale = batch_size / num_cases
  terms = {l.name: layer_terms(l, inputs[l.name], true_ds[l.name], scale) for l in covered}
  if batch_grads is not None:  # Under jit, the products replaced here are never run.
    leaves = jax.tree_util.tree_leaves(batch_grads)
    terms = {l.name: (terms[l.name][0], _batch_grad_sq(l, leaves) * batch_size**2)
             for l in covered}
  sq_norms = sum((t[0] for t in terms.values()), jnp.zeros((batch_size,), jnp.float32))
  summed_sq = sum((t[1] for t in terms.values()), jnp.zeros((), jnp.float32))
  return _summary(sq_norms, summed_sq, terms, batch_size, uncovered)


def _batch_grad_sq(layer: Layer, grad_leaves: Sequence[jax.Array]) -> jax.Array:
  bias = [grad_leaves[i] for i in layer.bias_indices] or None
  mat = geometry.params_to_matrix(layer, [grad_leaves[i] for i in layer.weight_indices], bias)
  return jnp.sum(jnp.square(mat.astype(jnp.float32)))


def _summary(sq_norms: jax.Array, summed_sq: jax.Array,
             terms: dict[str, tuple[jax.Array, jax.Array]], batch_size: int,
             uncovered: tuple[str, ...]) -> Diagnostics:
  """The estimators of the module docstring from ``||g_n||²`` and ``||Σ g_n||²``."""
  b = float(batch_size)
  s = jnp.sum(sq_norms)
  batch_grad_sq = summed_sq / b**2
  trace_sigma = (s - b * batch_grad_sq) / (b - 1)
  grad_sq = batch_grad_sq - trace_sigma / b
  return Diagnostics.pack(
      sq_norms=sq_norms, layer_sq_norms={k: t[0] for k, t in terms.items()},
      batch_grad_sq_norm=batch_grad_sq,
      layer_batch_grad_sq_norms={k: t[1] / b**2 for k, t in terms.items()},
      trace_sigma=trace_sigma, grad_sq_norm=grad_sq, noise_scale=trace_sigma / grad_sq,
      diversity=s / summed_sq, uncovered=uncovered)


def _true_labels(dist: Distribution, logits: jax.Array, targets: jax.Array,
                 weights: CaseWeights) -> jax.Array:
  """The true-label column: each case's loss gradient, times its weight ``m``."""
  return output_cotangents(dist, logits, targets, jax.random.key(0),
                           "empirical") * weights.gradient


def _column(ds: dict[str, Sequence[jax.Array]], index: slice) -> dict[str, tuple[jax.Array, ...]]:
  return {name: tuple(d[index] for d in by_use) for name, by_use in ds.items()}


def values_and_diagnostics(tagged: TaggedLoss, params: Any, batch: Any, key: jax.Array,
                           *, estimator: str, num_samples: int = 1,
                           batch_grads: Any = None) -> tuple[PassValues, Diagnostics]:
  """One statistics pass giving both the Fisher pass's values and the diagnostics.

  With ``estimator="empirical"`` (and a loss without case weights other
  than a boolean mask) the diagnostics read the very output derivatives the
  factors are built from; otherwise the true-label cotangent is one more
  column of the same vectorized backward pass (no second forward pass): the
  Fisher columns weigh a case by ``√m``, the gradient by ``m``.

  Args:
    tagged: the tagged loss (static).
    params: parameter pytree.
    batch: batch pytree.
    key: PRNG key for ``"mc"`` sampling.
    estimator: ``"exact"``, ``"mc"`` or ``"empirical"``.
    num_samples: Monte-Carlo samples for ``"mc"``.
    batch_grads: optional gradient of the registered loss, see :func:`from_values`.

  Returns:
    ``(values, diagnostics)``: what
    :func:`kfac_jax_lite.statistics.fisher_values` returns, and the
    :class:`Diagnostics` of the batch.
  """
  check_estimator(estimator, num_samples)
  fisher = fisher_cotangents(key, estimator, num_samples)

  def shared(weights: CaseWeights) -> bool:
    """Whether the Fisher column is the true-label one (then it is the only one)."""
    return estimator == "empirical" and weights.binary

  def cotangents(dist: Distribution, logits: jax.Array, targets: jax.Array,
                 weights: CaseWeights) -> jax.Array:
    cot = fisher(dist, logits, targets, weights)
    if shared(weights):
      return cot
    return jnp.concatenate([cot, _true_labels(dist, logits, targets, weights)])

  inputs, ds, logits_shape, weights = tapped_derivatives(tagged, params, batch, cotangents)
  num_cases = weights.num_cases
  if shared(weights):  # the factors' own derivatives
    fisher_ds = true_ds = ds
  else:
    fisher_ds, true_ds = _column(ds, slice(0, -1)), _column(ds, slice(-1, None))
  return (PassValues(tagged, inputs, fisher_ds, num_cases),
          from_values(tagged, inputs, true_ds, logits_shape, num_cases,
                      batch_grads=batch_grads))


def factors_and_diagnostics(tagged: TaggedLoss, params: Any, batch: Any, key: jax.Array,
                            *, estimator: str, num_samples: int = 1,
                            batch_grads: Any = None) -> tuple[Factors, Diagnostics]:
  """The factor estimates and the diagnostics from one pass
  (:func:`values_and_diagnostics`, same arguments).

  Returns:
    ``(factors, diagnostics)``: what
    :func:`kfac_jax_lite.statistics.factor_estimate` returns, and the
    :class:`Diagnostics` of the batch.
  """
  values, diag = values_and_diagnostics(tagged, params, batch, key, estimator=estimator,
                                        num_samples=num_samples, batch_grads=batch_grads)
  return factors_from_values(tagged, values.inputs, values.ds, values.num_cases), diag


def diagnostics(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any, *,
                layers: LayerOptions = LayerOptions()) -> Diagnostics:
  """Per-example gradient norms, gradient noise scale and diversity of one batch.

  One forward and one backward pass (the statistics pass with the true
  labels, no per-example gradient materialized where a Gram form is
  cheaper); see :mod:`kfac_jax_lite.diagnostics` for the formulas.
  The gradients are those of the registered loss (terms added outside it,
  e.g. an L2 penalty, are not seen), per example ``n`` of its term ``ℓ_n`` in
  ``(1/B) Σ_n ℓ_n``. Where examples interact (BatchNorm in training mode),
  ``g_n`` is example ``n``'s share of the batch gradient. Jit-compatible.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` built with a
      :mod:`kfac_jax_lite.losses` function.
    params: parameter pytree.
    batch: batch pytree; the logits' leading axis is the batch axis.
    layers: as given to :func:`kfac_jax_lite.scale_by_kfac`.

  Returns:
    The :class:`Diagnostics` over the layers :func:`kfac_jax_lite.find_layers`
    lists as Kronecker or scale-and-shift layers (``uncovered`` names the rest).
  """
  tagged = tag(trace_loss(loss_fn, params, batch), layers.approximation,
               dict(layers.blocks), layers.max_factor_dim)
  inputs, ds, logits_shape, weights = tapped_derivatives(tagged, params, batch, _true_labels)
  return from_values(tagged, inputs, ds, logits_shape, weights.num_cases)
