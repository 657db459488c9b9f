"""How a layer's curvature factors are estimated from one batch.

Tagging reads a layer's values as rows (:mod:`kfac_jax_lite.tagging.match`):
activations ``a[n, t]`` and output derivatives ``ds[s, n, t]`` (``t`` runs
over the axes the weight is shared over: sequence positions, spatial
locations; one position for an MLP; the rows of every use of a shared weight
are pooled, K-FAC-expand over uses). ``"expand"`` (the default) is

``A = (1/(N T)) sum_{n,t} a a^T``,  ``G = (1/M) sum_{s,n,t} ds ds^T``

and ``"reduce"`` sums over ``t`` before the outer products,

``A = (1/N) sum_n ā ā^T`` with ``ā = mean_t a``,  ``G = (1/M) sum_{s,n} d̄ d̄^T``
with ``d̄ = sum_t ds``,

where ``M`` is the number of cases the registered loss averages over and
``a`` ends in a 1 for a bias (Martens & Grosse 2015, eq. 1, §A; Ba et al.
2017, §2; for convolutions "expand" is KFC, Grosse & Martens 2016, "reduce"
Ba et al.'s Appendix A; for sequences K-FAC-expand / -reduce, Eschenhagen et
al. 2023). An embedding's ``A`` is the vector of token frequencies; a factor
kept diagonal (over ``max_factor_dim``) is the diagonal of the above; a
doubly-factored input is ``K ⊗ Ψ`` (:mod:`kfac_jax_lite.curvature.doubly`,
Ba et al. §4), its bias block ``B = (1/M) sum_{s,n} (sum_t ds)(sum_t ds)^T``.
The diagonal-Fisher and full blocks use the per-example gradients
``g = sum_t a ds^T`` those same values give. Which factors a layer has is its
spec (:mod:`kfac_jax_lite.curvature.specs`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kfac_jax_lite.curvature import doubly
from kfac_jax_lite.gram import gram
from kfac_jax_lite.tagging.layers import Layer
from kfac_jax_lite.tagging.match import Match


def _second_moment(rows: jax.Array, form: str, count: int) -> jax.Array:
  """``rows^T rows / count``, or only its diagonal for a ``"vector"`` form."""
  if form == "vector":
    return jnp.sum(jnp.square(rows), axis=0) / count
  return gram(rows) / count


def _token_frequencies(m: Match, x: jax.Array) -> jax.Array:
  """``[vocab]`` frequencies of the ids of a row lookup (out-of-range ids dropped)."""
  ids = m.input_rows(x).reshape(-1)
  counts = jnp.zeros((m.d_in,), jnp.float32).at[ids].add(1.0, mode="drop")
  return counts / ids.shape[0]


def input_factors(layer: Layer, xs: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
  """One batch's input factors: ``(A,)`` (a vector if diagonal) or ``(K, Ψ)``.

  Args:
    layer: a Kronecker layer.
    xs: the activation operand of each use of its weight.

  Returns:
    Float32 arrays, in Kronecker order.
  """
  m = layer.match
  if m.vector_input:
    counts = [m.input_rows(x).size for x in xs]
    return (sum(_token_frequencies(m, x) * c for x, c in zip(xs, counts)) / sum(counts),)
  split = layer.input_form == "doubly"
  rows = jnp.concatenate([
      u.input_matrix_rows(x, bias=layer.bias_index is not None and not split,
                          reduce=layer.approximation == "reduce")
      for u, x in zip(layer.matches, xs)])
  if split:
    return doubly.input_factors(rows.reshape(rows.shape[0], *m.input_split))
  return (_second_moment(rows, layer.input_form, rows.shape[0]),)


def output_factors(layer: Layer, dss: Sequence[jax.Array], num_cases: int,
                   bias_block: bool) -> tuple[jax.Array, jax.Array | None]:
  """One batch's ``G``, and the bias block ``B`` if asked for.

  Args:
    layer: a Kronecker layer.
    dss: output derivatives ``[S, *out_shape]`` of each use of its weight.
    num_cases: number of cases the loss averages over.
    bias_block: whether the bias has its own block (doubly factored).

  Returns:
    ``G`` (summed over uses) and ``B``, the exact Fisher of the bias,
    ``E[(Σ ds)(Σ ds)^T]`` summed over positions and uses (Ba et al. 2017,
    §4), or ``None``.
  """
  gs = [u.output_rows(u.unpermute(ds.astype(jnp.float32)))  # [S, N, T, d_out]
        for u, ds in zip(layer.matches, dss)]
  b = None
  if bias_block:
    summed = sum(jnp.sum(g, axis=2) for g in gs)
    b = _second_moment(summed.reshape(-1, summed.shape[-1]), layer.output_form, num_cases)
  if layer.approximation == "reduce":
    gs = [jnp.sum(g, axis=2) for g in gs]
  rows = jnp.concatenate([g.reshape(-1, g.shape[-1]) for g in gs])
  return _second_moment(rows, layer.output_form, num_cases), b


def per_example_grads(layer: Layer, xs: Sequence[jax.Array],
                      dss: Sequence[jax.Array]) -> jax.Array:
  """``[S, N, d_in(+1), d_out]`` per-example gradients, summed over uses
  (arguments as :func:`diagonal_fisher`)."""
  return sum(u.per_example_grads(x, u.unpermute(ds.astype(jnp.float32)),
                                 bias=layer.bias_index is not None)
             for u, x, ds in zip(layer.matches, xs, dss))


def diagonal_fisher(layer: Layer, xs: Sequence[jax.Array], dss: Sequence[jax.Array],
                    num_cases: int) -> jax.Array:
  """The diagonal Fisher ``F`` of ``[W; b]`` from per-example gradients.

  Args:
    layer: a layer with a match.
    xs: the activation operand of each use.
    dss: output derivatives ``[S, *out_shape]`` of each use.
    num_cases: number of cases the loss averages over.

  Returns:
    ``[d_in(+1), d_out]`` float32: ``Σ_{s,n} g ⊙ g / num_cases``.
  """
  return jnp.sum(jnp.square(per_example_grads(layer, xs, dss)), axis=(0, 1)) / num_cases


def full_fisher(layer: Layer, xs: Sequence[jax.Array], dss: Sequence[jax.Array],
                num_cases: int) -> jax.Array:
  """The whole Fisher block ``Σ_{s,n} vec(g) vec(g)^T / num_cases`` of ``[W; b]``
  (row-major ``vec``), from per-example gradients (arguments as
  :func:`diagonal_fisher`)."""
  g = per_example_grads(layer, xs, dss)
  return gram(g.reshape(-1, layer.d_in * layer.d_out)) / num_cases
