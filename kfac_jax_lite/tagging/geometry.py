"""A Kronecker layer's tensors as the matrices K-FAC works with.

Each layer family (:mod:`.dense`, :mod:`.conv`) knows how its activations and
output derivatives become rows ``[N, T, d]``; this module adds what all
families share: the factors of one batch, the bias (``[W; b]`` is
``[d_in + 1, d_out]``, Martens & Grosse 2015, §A), the parameter's view
equations (a weight stored transposed or reshaped), and the way back from the
preconditioned matrix to the parameter leaves.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kfac_jax_lite.curvature import doubly as doubly_lib
from kfac_jax_lite.gram import gram
from kfac_jax_lite.tagging.layers import Layer
from kfac_jax_lite.tagging.match import Part
from kfac_jax_lite.tagging.jaxpr import TYPE_ONLY as TYPE_ONLY_PRIMITIVES, bind as bind_eqn


def _second_moment(rows: jax.Array, form: str, count: int) -> jax.Array:
  """``rows^T rows / count``, or only its diagonal for a ``"diagonal"`` form."""
  if form == "diagonal":
    return jnp.sum(jnp.square(rows), axis=0) / count
  return gram(rows) / count


def input_factors(layer: Layer, xs: Sequence[jax.Array]) -> dict[str, jax.Array]:
  """One batch's input factors: ``A`` (a vector if diagonal), or ``K`` and ``Ψ``.

  Args:
    layer: a Kronecker layer.
    xs: the activation operand of each use of its weight; the rows of all
      uses are pooled (K-FAC-expand over uses, for shared weights).

  Returns:
    Factor name -> float32 array.
  """
  m = layer.match
  reduce = layer.approximation == "reduce"
  if m.diagonal_input:
    counts = [m.input_rows(x).size for x in xs]
    return {"A": sum(m.input_factor(x, bias=False, reduce=reduce) * c
                     for x, c in zip(xs, counts)) / sum(counts)}
  doubly = layer.input_form == "doubly"
  rows = jnp.concatenate([
      u.input_matrix_rows(x, bias=layer.bias_index is not None and not doubly, reduce=reduce)
      for u, x in zip(layer.matches, xs)])
  if doubly:
    return dict(zip(("K", "Psi"), doubly_lib.input_factors(
        rows.reshape(rows.shape[0], *m.input_split))))
  return {"A": _second_moment(rows, layer.input_form, rows.shape[0])}


def output_factors(layer: Layer, dss: Sequence[jax.Array], num_cases: int) -> dict[str, jax.Array]:
  """One batch's ``G`` (and a doubly-factored layer's bias block ``B``).

  Args:
    layer: a Kronecker layer.
    dss: output derivatives ``[S, *out_shape]`` of each use of its weight.
    num_cases: number of cases the loss averages over.

  Returns:
    ``{"G": ...}`` (summed over uses), plus ``"B"``: the exact Fisher of the
    bias, ``E[(Σ ds)(Σ ds)^T]`` summed over positions and uses (Ba et al.
    2017, §4: the bias gets a full block).
  """
  gs = [u.output_rows(u.unpermute(ds.astype(jnp.float32)))  # [S, N, T, d_out]
        for u, ds in zip(layer.matches, dss)]
  out = {}
  if "B" in layer.factor_shapes:
    summed = sum(jnp.sum(g, axis=2) for g in gs)
    out["B"] = _second_moment(summed.reshape(-1, summed.shape[-1]), layer.output_form,
                              num_cases)
  if layer.approximation == "reduce":
    gs = [jnp.sum(g, axis=2) for g in gs]
  rows = jnp.concatenate([g.reshape(-1, g.shape[-1]) for g in gs])
  out["G"] = _second_moment(rows, layer.output_form, num_cases)
  return out


def diagonal_fisher(layer: Layer, xs: Sequence[jax.Array], dss: Sequence[jax.Array],
                    num_cases: int) -> jax.Array:
  """The diagonal Fisher ``F`` of ``[W; b]`` from per-example gradients.

  Args:
    layer: a layer whose ``block`` is ``"diag"`` (or ``"full"``).
    xs: the activation operand of each use.
    dss: output derivatives ``[S, *out_shape]`` of each use.
    num_cases: number of cases the loss averages over.

  Returns:
    ``[d_in(+1), d_out]`` float32: ``Σ_{s,n} g ⊙ g / num_cases``, ``g`` the
    per-example gradient summed over uses.
  """
  return jnp.sum(jnp.square(_per_example_grads(layer, xs, dss)), axis=(0, 1)) / num_cases


def full_fisher(layer: Layer, xs: Sequence[jax.Array], dss: Sequence[jax.Array],
                num_cases: int) -> jax.Array:
  """The whole Fisher block ``Σ_{s,n} vec(g) vec(g)^T / num_cases`` of ``[W; b]``
  (row-major ``vec``), from per-example gradients (``"full"`` blocks)."""
  g = _per_example_grads(layer, xs, dss)
  return gram(g.reshape(-1, layer.d_in * layer.d_out)) / num_cases


def _per_example_grads(layer: Layer, xs: Sequence[jax.Array],
                       dss: Sequence[jax.Array]) -> jax.Array:
  """``[S, N, d_in(+1), d_out]`` per-example gradients, summed over uses."""
  return sum(u.per_example_grads(x, u.unpermute(ds.astype(jnp.float32)),
                                 bias=layer.bias_index is not None)
             for u, x, ds in zip(layer.matches, xs, dss))


def layer_factors(layer: Layer, xs: Sequence[jax.Array], dss: Sequence[jax.Array],
                  num_cases: int) -> dict[str, jax.Array]:
  """One batch's estimate of every factor of a layer (see ``Layer.factor_shapes``).

  Args:
    layer: a layer with a match.
    xs: the activation operand of each use of its weight (``Layer.matches``).
    dss: output derivatives ``[S, *out_shape]`` of each use.
    num_cases: number of cases the loss averages over.

  Returns:
    Factor name -> float32 array.
  """
  if layer.block == "full":
    return {"full": full_fisher(layer, xs, dss, num_cases)}
  if layer.block == "diag":
    return {"F": diagonal_fisher(layer, xs, dss, num_cases)}
  return {**input_factors(layer, xs), **output_factors(layer, dss, num_cases)}


def _leaf_to_matrix(layer: Layer, w: jax.Array) -> jax.Array:
  for eqn in layer.match.weight_chain:
    if eqn.primitive.name not in TYPE_ONLY_PRIMITIVES:
      (w,) = bind_eqn(eqn, [w])
  return layer.match.operand_to_matrix(w)


def _box(part: Part) -> tuple[slice, ...]:
  return tuple(slice(a, b) for a, b in part)


def params_to_matrix(layer: Layer, weight: jax.Array,
                     bias: jax.Array | None) -> jax.Array:
  """Weight (and bias) leaves -> the ``[d_in(+1), d_out]`` matrix ``[W; b]``.

  For a layer of a scanned stack, only its slices of the leaves are read.
  """
  mat = _leaf_to_matrix(layer, weight)
  if bias is not None:
    if layer.match.bias_part is not None:
      bias = bias[_box(layer.match.bias_part)]
    mat = jnp.concatenate([mat, bias.reshape(1, -1).astype(mat.dtype)], axis=0)
  return mat


def matrix_to_params(layer: Layer, mat: jax.Array, weight_like: jax.Array,
                     bias_like: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
  """Inverse of :func:`params_to_matrix` (a permutation, so its transpose).

  For a layer of a scanned stack the leaves are zero outside its slices.
  """
  w_mat = mat[:mat.shape[0] - (bias_like is not None)]
  to_mat = jax.linear_transpose(
      lambda w: _leaf_to_matrix(layer, w),
      jax.ShapeDtypeStruct(weight_like.shape, w_mat.dtype))
  (weight,) = to_mat(w_mat)
  weight = weight.astype(weight_like.dtype)
  if bias_like is None:
    return weight, None
  part = layer.match.bias_part
  if part is None:
    return weight, mat[-1].reshape(bias_like.shape).astype(bias_like.dtype)
  box = _box(part)
  bias = jnp.zeros(bias_like.shape, bias_like.dtype)
  return weight, bias.at[box].set(mat[-1].reshape(bias[box].shape).astype(bias.dtype))
