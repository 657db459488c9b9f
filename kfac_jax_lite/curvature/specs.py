"""One spec per curvature block kind: the only place factor names mean anything.

A layer's block (which one, tagging decides) is one of:

- :class:`Kronecker`: ``F ≈ F_1 ⊗ ... ⊗ F_k`` on ``vec([W; b])``: ``A ⊗ G``
  (Martens & Grosse 2015, eq. 1), or the doubly-factored ``K ⊗ Ψ ⊗ G`` whose
  bias row has its own full block ``B`` (Ba et al. 2017, §4). A factor is a
  symmetric matrix or a vector (the diagonal of a diagonal factor: an
  embedding's token frequencies, a factor over ``max_factor_dim``). Damped
  by factored Tikhonov damping over the ``k`` factors (Ba et al. eq. 3, 12),
  ``B`` by plain ``λ`` (relative damping:
  :mod:`kfac_jax_lite.curvature.damping`); applied factor by factor along the axes of the
  gradient viewed as a ``[d_1, ..., d_k]`` tensor (eq. 9).
- :class:`DiagonalFisher` (``"F"``): the exact diagonal Fisher of ``[W; b]``
  (scale-and-shift parameters), an elementwise ``[d_in(+1), d_out]`` array:
  ``g / (F + λ)``.
- :class:`Full` (``"full"``): the exact Fisher block of ``vec([W; b])``
  (row-major; a ``blocks`` choice for small layers): ``(F + λ I)^{-1} vec(g)``.

The squared-gradient fallback of parameters outside any layer is not a
block of factors (:mod:`kfac_jax_lite.curvature.diagonal`).

Every factor is stored under its name twice in the optimizer state (its
moving average, its damped inverse); code that sees only a state entry asks
:func:`symmetric_matrix` what it is. How factors are estimated from a batch
is :mod:`kfac_jax_lite.curvature.estimation`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Collection, Sequence

import jax
import jax.numpy as jnp

from kfac_jax_lite.curvature import diagonal, estimation, kronecker
from kfac_jax_lite.curvature.damping import diagonal_of, factored_damping, tikhonov
from kfac_jax_lite.tagging.layers import Layer

Shape = tuple[int, ...]
Arrays = dict[str, jax.Array]
Products = list[tuple[jax.Array, list[jax.Array]]]

_FISHER = "F"  # the only 2-D factor that is not a symmetric matrix


def symmetric_matrix(name: str, shape: Sequence[int]) -> bool:
  """Whether the state entry ``name`` (a factor, its inverse or a row slice of
  it) is a symmetric matrix, not a vector or an elementwise array."""
  return name != _FISHER and len(shape) == 2


def inversion_cost(name: str, shape: Sequence[int]) -> int:
  """``d³`` for a symmetric matrix, the size of a vector or elementwise array."""
  return shape[0] ** 3 if symmetric_matrix(name, shape) else math.prod(shape)


def identity(name: str, shape: Sequence[int]) -> jax.Array:
  """The inverse before the first refresh: an identity matrix, or ones."""
  if symmetric_matrix(name, shape):
    return jnp.eye(*shape, dtype=jnp.float32)
  return jnp.ones(shape, jnp.float32)


class Block:
  """What all block kinds share; see the subclasses."""

  label = ""  # the block column of the find_layers table

  @property
  def factor_shapes(self) -> dict[str, Shape]:
    """Factor name -> shape, in state order (Kronecker order, then ``B``)."""
    raise NotImplementedError

  def costs(self) -> dict[str, int]:
    """Factor name -> the cost of inverting it (see :func:`inversion_cost`)."""
    return {k: inversion_cost(k, s) for k, s in self.factor_shapes.items()}

  def inverses(self, factors: Arrays, damping: jax.Array | float, method: str,
               only: Collection[str] | None = None, relative: bool = False) -> Arrays:
    """The damped inverses of the factors in ``only`` (all if ``None``).

    Args:
      factors: the block's factor moving averages.
      damping: Tikhonov damping ``λ`` of the whole block.
      method: ``"eigh"`` or ``"cholesky"``
        (:func:`kfac_jax_lite.curvature.kronecker.damped_inverse`).
      only: factor names; a Kronecker factor's damping still comes from
        all of its block's factors.
      relative: ``λ`` is a fraction of the block's mean eigenvalue.

    Returns:
      Factor name -> inverse (float32).
    """
    shifts = self.shifts(factors, damping, relative)
    return {k: kronecker.damped_inverse(factors[k], shifts[k], method)
            for k in factors if only is None or k in only}

  def shifts(self, factors: Arrays, damping: jax.Array | float,
             relative: bool = False) -> Arrays:
    """Factor name -> the scalar added to its diagonal (or its entries)."""
    return {k: tikhonov(diagonal_of(f), damping, relative) for k, f in factors.items()}

  def products(self, inv: Arrays, mat: jax.Array) -> Products:
    """The block as products: (part of ``mat``, the inverses acting on it).

    Args:
      inv: the damped inverses.
      mat: the ``[d_in(+1), d_out]`` gradient matrix.

    Returns:
      Parts that concatenate (flattened) to ``mat``'s row-major ``vec``,
      each with its inverses in Kronecker order (a vector inverse scales
      its axis).
    """
    raise NotImplementedError

  def precondition(self, inv: Arrays, mat: jax.Array) -> jax.Array:
    """The block's damped inverse applied to ``mat``, same shape (float32)."""
    return jnp.concatenate([kronecker.precondition(invs, part).reshape(-1)
                            for part, invs in self.products(inv, mat)]).reshape(mat.shape)

  def estimate(self, layer: Layer, xs: Sequence[jax.Array], dss: Sequence[jax.Array],
               num_cases: int) -> Arrays:
    """One batch's estimate of every factor (see
    :mod:`kfac_jax_lite.curvature.estimation` for the arguments)."""
    raise NotImplementedError

  @property
  def row_averaged(self) -> tuple[str, ...]:
    """The factors averaged over the layer's input rows; the others are
    averaged over the loss's cases (``num_cases`` of :meth:`estimate`)."""
    return ()


@dataclasses.dataclass(frozen=True)
class Kronecker(Block):
  """``F_1 ⊗ ... ⊗ F_k`` over the weight rows, an optional bias block ``B``.

  Attributes:
    kron: (name, shape) of each factor in Kronecker order: ``A``, ``G`` or
      ``K``, ``Psi``, ``G``; a 1-D shape is a diagonal factor.
    bias: the shape of the bias row's own block ``B`` (doubly factored), or
      ``None`` when the bias row is part of the Kronecker factors.
  """
  kron: tuple[tuple[str, Shape], ...]
  bias: Shape | None = None

  @property
  def factor_shapes(self) -> dict[str, Shape]:
    return {**dict(self.kron), **({"B": self.bias} if self.bias is not None else {})}

  @property
  def label(self) -> str:
    """``kron`` or ``kron3``, with ``(vector A)`` etc. for factors kept as vectors."""
    vectors = [f"vector {k}" for k, s in self.kron if len(s) == 1]
    kron = "kron3" if len(self.kron) == 3 else "kron"
    return f"{kron}({', '.join(vectors)})" if vectors else kron

  def shifts(self, factors: Arrays, damping: jax.Array | float,
             relative: bool = False) -> Arrays:
    names = [k for k, _ in self.kron]
    out = dict(zip(names, factored_damping([factors[k] for k in names], damping, relative)))
    if self.bias is not None:  # a full block: plain Tikhonov
      out["B"] = tikhonov(diagonal_of(factors["B"]), damping, relative)
    return out

  def products(self, inv: Arrays, mat: jax.Array) -> Products:
    kron = [inv[k] for k, _ in self.kron]
    if self.bias is None:
      return [(mat, kron)]
    return [(mat[:-1], kron), (mat[-1], [inv["B"]])]

  @property
  def row_averaged(self) -> tuple[str, ...]:
    return tuple(k for k, _ in self.kron[:-1])

  def estimate(self, layer: Layer, xs: Sequence[jax.Array], dss: Sequence[jax.Array],
               num_cases: int) -> Arrays:
    g, b = estimation.output_factors(layer, dss, num_cases, self.bias is not None)
    out = dict(zip([k for k, _ in self.kron], (*estimation.input_factors(layer, xs), g)))
    return out if b is None else {**out, "B": b}


@dataclasses.dataclass(frozen=True)
class DiagonalFisher(Block):
  """The exact diagonal Fisher ``F`` of ``[W; b]``, ``shape = [d_in(+1), d_out]``."""
  shape: Shape
  label = "diagonal_fisher"

  @property
  def factor_shapes(self) -> dict[str, Shape]:
    return {_FISHER: self.shape}

  def inverses(self, factors: Arrays, damping: jax.Array | float, method: str,
               only: Collection[str] | None = None, relative: bool = False) -> Arrays:
    del method, only  # elementwise, and its only factor
    fisher = factors[_FISHER]
    return {_FISHER: diagonal.damped_inverse(fisher, tikhonov(fisher, damping, relative))}

  def products(self, inv: Arrays, mat: jax.Array) -> Products:
    return [(mat.reshape(-1), [inv[_FISHER].reshape(-1)])]

  def estimate(self, layer: Layer, xs: Sequence[jax.Array], dss: Sequence[jax.Array],
               num_cases: int) -> Arrays:
    return {_FISHER: estimation.diagonal_fisher(layer, xs, dss, num_cases)}


@dataclasses.dataclass(frozen=True)
class Full(Block):
  """The whole Fisher block of ``vec([W; b])``, ``size = (d_in(+1)) d_out``."""
  size: int
  label = "full"

  @property
  def factor_shapes(self) -> dict[str, Shape]:
    return {"full": (self.size, self.size)}

  def products(self, inv: Arrays, mat: jax.Array) -> Products:
    return [(mat.reshape(-1), [inv["full"]])]

  def estimate(self, layer: Layer, xs: Sequence[jax.Array], dss: Sequence[jax.Array],
               num_cases: int) -> Arrays:
    return {"full": estimation.full_fisher(layer, xs, dss, num_cases)}


def spec_for(layer: Layer) -> Block:
  """The block spec of a layer with a match (``TaggedLoss.factored``).

  Args:
    layer: the tagging record: its ``block``, sizes and factor forms.

  Returns:
    Its :class:`Kronecker`, :class:`DiagonalFisher` or :class:`Full` spec.
  """
  if layer.block == "full":
    return Full(layer.d_in * layer.d_out)
  if layer.block == "diagonal_fisher":
    return DiagonalFisher((layer.d_in, layer.d_out))
  d = layer.d_out
  g = (d,) if layer.output_form == "vector" else (d, d)
  if layer.input_form == "doubly":
    t, c = layer.match.input_split
    return Kronecker((("K", (t, t)), ("Psi", (c, c)), ("G", g)),
                     g if layer.bias_index is not None else None)
  a = (layer.d_in,) if layer.input_form == "vector" else (layer.d_in, layer.d_in)
  return Kronecker((("A", a), ("G", g)))
