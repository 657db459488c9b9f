"""Eigenvalue-corrected K-FAC (EK-FAC) of a two-factor Kronecker block.

George, Laurent, Bouthillier, Ballas & Vincent (NeurIPS 2018), "Fast
Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis".
K-FAC's block ``A ⊗ G = (U_A ⊗ U_G)(Λ_A ⊗ Λ_G)(U_A ⊗ U_G)ᵀ`` keeps the
Kronecker eigenbasis ``Q = U_A ⊗ U_G`` but replaces the eigenvalues
``λ_A λ_Gᵀ`` by the diagonal of the Fisher in that basis (the best diagonal
there in Frobenius norm, the paper's §3.1, eq. 6):

``S_ij = (1/M) Σ_{s,n} ((U_Aᵀ g_{s,n} U_G)_ij)²``,  ``g_{s,n} = Σ_t a_{n,t} ds_{s,n,t}ᵀ``

on the ``[d_in(+1), d_out]`` per-example gradient matrices ``g`` that the
statistics pass's activations ``a`` (a trailing 1 for a bias) and Fisher
cotangents ``ds`` give, ``M`` the number of cases the loss averages over:
the normalization of the library's factors and of its exact diagonal-Fisher
block (:func:`kfac_jax_lite.curvature.estimation.diagonal_fisher`), so with
identity bases ``S`` is that diagonal Fisher. The preconditioned gradient is
``U_A [(U_Aᵀ M U_G) / (S + λ)] U_Gᵀ`` (plain Tikhonov ``λ`` on ``S``, as the
paper does).

A factor kept as a vector (an embedding's token frequencies, a factor over
``max_factor_dim``) is a diagonal matrix: its basis is the identity (not
stored) and its eigenvalues are its entries.

A block here is a dict: ``"A"`` / ``"G"`` the eigenbases of the matrix
factors (absent for a vector factor), ``"S"`` the scales.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kfac_jax_lite import _cpu_blas
from kfac_jax_lite.curvature import specs
from kfac_jax_lite.curvature.damping import tikhonov
from kfac_jax_lite.tagging.layers import Layer

Block = dict[str, jax.Array]
FACTORS = ("A", "G")


def supports(spec: specs.Block) -> bool:
  """Whether a block spec is a two-factor ``A ⊗ G`` (the blocks EK-FAC replaces)."""
  return (isinstance(spec, specs.Kronecker) and spec.bias is None
          and tuple(k for k, _ in spec.kron) == FACTORS)


def init(spec: specs.Kronecker) -> Block:
  """Before the first refresh: identity bases and unit scales (``M / (1 + λ)``)."""
  shapes = dict(spec.kron)
  out = {k: jnp.eye(shapes[k][0], dtype=jnp.float32) for k in FACTORS if len(shapes[k]) == 2}
  return {**out, "S": jnp.ones((shapes["A"][0], shapes["G"][0]), jnp.float32)}


def _eigen(factor: jax.Array) -> tuple[jax.Array | None, jax.Array]:
  """The eigenbasis (``None`` for a vector factor) and the eigenvalues, clipped at 0."""
  if factor.ndim == 1:
    return None, jnp.maximum(factor.astype(jnp.float32), 0.0)
  _cpu_blas.limit_lapack_threads()
  m = factor.astype(jnp.float32)
  evals, evecs = jnp.linalg.eigh(0.5 * (m + m.T))
  return evecs, jnp.maximum(evals, 0.0)


def refresh(factors: dict[str, jax.Array]) -> Block:
  """New bases from the factors' moving averages, ``S`` reset to ``λ_A λ_Gᵀ``.

  Right after a refresh the block is K-FAC's ``A ⊗ G`` (eigenvalues clipped
  at 0), damped by plain Tikhonov ``λ`` instead of factored damping; the
  statistics steps then move ``S`` toward the Fisher's diagonal in the new
  basis. Starting ``S`` from K-FAC's eigenvalues (rather than from zero or
  from one batch's estimate) keeps a fresh basis well-conditioned: a
  coordinate no batch has excited yet is scaled as K-FAC would scale it.

  Args:
    factors: ``{"A": ..., "G": ...}`` (matrices or vectors).

  Returns:
    The block.
  """
  (u_a, l_a), (u_g, l_g) = _eigen(factors["A"]), _eigen(factors["G"])
  bases = {k: u for k, u in zip(FACTORS, (u_a, u_g)) if u is not None}
  return {**bases, "S": jnp.outer(l_a, l_g)}


def rotate(block: Block, mat: jax.Array) -> jax.Array:
  """``U_Aᵀ M U_G`` (a missing basis is the identity)."""
  x = mat.astype(jnp.float32)
  if "A" in block:
    x = block["A"].T @ x
  return x @ block["G"] if "G" in block else x


def unrotate(block: Block, x: jax.Array) -> jax.Array:
  """``U_A X U_Gᵀ``, the inverse of :func:`rotate`."""
  if "A" in block:
    x = block["A"] @ x
  return x @ block["G"].T if "G" in block else x


def precondition(block: Block, mat: jax.Array, damping: jax.Array | float,
                 relative: bool = False) -> jax.Array:
  """``U_A [(U_Aᵀ M U_G) / (S + λ)] U_Gᵀ`` for the ``[d_in(+1), d_out]`` gradient ``M``.

  Args:
    block: the bases and scales.
    mat: the gradient matrix ``[∇W; ∇b]``.
    damping: Tikhonov damping ``λ``.
    relative: ``λ`` is a fraction of the mean of ``S``.

  Returns:
    The preconditioned matrix (float32).
  """
  shift = tikhonov(block["S"], damping, relative)
  return unrotate(block, rotate(block, mat) / (block["S"] + shift))


def _rows(layer: Layer, xs: Sequence[jax.Array],
          dss: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Input rows ``[N, T, d_in(+1)]`` (ids ``[N, T]`` for an embedding) and
  output-derivative rows ``[S, N, T, d_out]`` over all uses of the weight.

  The uses of a shared weight add to one per-example gradient, so their rows
  are joined along ``T``; uses whose rows run along axes of different sizes
  (no common example axis) are joined along ``N`` instead.
  """
  bias = layer.bias_index is not None
  a, d = [], []
  for u, x, ds in zip(layer.matches, xs, dss):
    rows = u.input_rows(x if u.vector_input else x.astype(jnp.float32))
    if bias and not u.vector_input:
      rows = jnp.concatenate([rows, jnp.ones_like(rows[..., :1])], -1)
    a.append(rows)
    d.append(u.output_rows(u.unpermute(ds.astype(jnp.float32))))
  same_n = len({r.shape[0] for r in a}) == 1
  return jnp.concatenate(a, axis=1 if same_n else 0), jnp.concatenate(d, axis=2 if same_n else 1)


def _embedding_squares(ids: jax.Array, d: jax.Array, vocab: int) -> jax.Array:
  """``Σ_{s,n} (Σ_t [id_t = i] d_{s,n,t,k})²`` as ``[vocab, d_out]``, without forming
  the per-example ``[vocab, d_out]`` gradients: ``d_t · Σ_{t'} [id_t' = id_t] d_t'``
  summed into row ``id_t``."""
  same = (ids[:, :, None] == ids[:, None, :]).astype(d.dtype)
  h = jnp.sum(d * jnp.einsum("ntu,snuk->sntk", same, d), axis=0)
  return jnp.zeros((vocab, d.shape[-1]), d.dtype).at[ids.reshape(-1)].add(
      h.reshape(-1, d.shape[-1]), mode="drop")


def scale_estimate(layer: Layer, block: Block, xs: Sequence[jax.Array],
                   dss: Sequence[jax.Array], num_cases: int) -> jax.Array:
  """One batch's ``S`` in the block's current bases (see the module docstring).

  Args:
    layer: a layer whose spec :func:`supports`.
    block: its bases (``"S"`` is not read).
    xs: the activation operand of each use of its weight.
    dss: the Fisher output derivatives ``[S, *out_shape]`` of each use.
    num_cases: the number of cases the loss averages over.

  Returns:
    ``[d_in(+1), d_out]`` float32.
  """
  a, d = _rows(layer, xs, dss)
  if "G" in block:
    d = d @ block["G"]
  if layer.match.vector_input:
    return _embedding_squares(a, d, layer.d_in) / num_cases
  if "A" in block:
    a = a @ block["A"]
  if a.shape[1] == 1:  # one position: Σ_{s,n} a_i² d_k², a matrix product
    return jnp.einsum("ni,snk->ik", jnp.square(a[:, 0]), jnp.square(d[:, :, 0])) / num_cases
  g = jnp.einsum("nti,sntk->snik", a, d)
  return jnp.sum(jnp.square(g), axis=(0, 1)) / num_cases
