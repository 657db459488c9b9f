"""What a matched Kronecker layer is: the common record of every layer family.

A :class:`Match` says which equation is the layer's product, which operand is
the weight (and through which view equations it comes from the parameter leaf),
and where its output is. Each family (:mod:`.dense`, :mod:`.conv`) adds how to
read that layer's activations and output derivatives as rows:
``input_rows(x) -> [N, T, d_in]`` and ``output_rows(ds) -> [..., N, T, d_out]``
where ``N`` is the batch axis and ``T`` the axes the weight is shared over
(sequence positions, spatial locations; ``T = 1`` for a plain MLP), and how to
view the weight operand as the ``[d_in, d_out]`` matrix those rows multiply.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from kfac_jax_lite.tagging.jaxpr import Path


# A box of a parameter leaf: (start, limit) per axis; None for the whole leaf.
Part = tuple[tuple[int, int], ...] | None


@dataclasses.dataclass(frozen=True)
class ParamView:
  """A variable holding a parameter leaf (or a box of it) seen through view
  equations."""
  index: int
  root_shape: tuple[int, ...]  # shape of the parameter leaf itself
  chain: tuple[Any, ...] = ()  # the view equations, in order of application
  broadcast: bool = False
  # The slice of the leaf this view reads (a layer of a scanned stack).
  part: Part = None
  # Several leaves concatenated into one operand (:mod:`.fused`); ``index``
  # is then the first member's, ``root_shape`` the joined shape.
  fused: Any = None

  @property
  def keys(self) -> tuple[tuple[int, Part], ...]:
    """What a use of this view is a use of: the leaf, a box of it, or each
    leaf of a fused view."""
    if self.fused is not None:
      return tuple((m.index, None) for m in self.fused.members)
    return ((self.index, self.part),)

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the leaf or of its box."""
    return self.root_shape if self.part is None else tuple(b - a for a, b in self.part)


@dataclasses.dataclass(frozen=True)
class Match:
  """A layer's product equation with a parameter weight (abstract)."""

  kind: ClassVar[str] = ""
  # "kron": a Kronecker-factored block; "diagonal_fisher": the exact diagonal of the
  # Fisher from per-example gradients (scale-and-shift parameters).
  block: ClassVar[str] = "kron"
  # A row lookup whose input_rows are ids (embeddings): a vector input factor.
  vector_input: ClassVar[bool] = False
  # Whether an added broadcast parameter may be taken as this layer's bias.
  takes_bias: ClassVar[bool] = True
  # Whether input_columns is built directly (input_rows is then its transpose).
  builds_columns: ClassVar[bool] = False
  path: Path
  weight_index: int
  weight_operand: int  # operand position of the weight in the equation
  weight_chain: tuple[Any, ...]
  weight_shape: tuple[int, ...]  # shape of the equation's weight operand
  out_shape: tuple[int, ...]
  out_path: Path = ()  # equation whose output is perturbed (the bias add, if any)
  bias_index: int | None = None
  # Permutation from the product's output to the perturbed output (transposes
  # between a product and its bias add): perturbed axis i = product axis perm[i].
  out_perm: tuple[int, ...] | None = None
  # The boxes of the weight and bias leaves used (slices of a scanned stack).
  weight_part: Part = None
  bias_part: Part = None
  # Operand position of the activation, if not the other of two operands.
  act_operand: int | None = None
  # The leaves joined into a fused weight / bias (:class:`.fused.Fused`).
  weight_fused: Any = None
  bias_fused: Any = None

  @property
  def activation_operand(self) -> int:
    """Operand position of the activation in the equation."""
    return 1 - self.weight_operand if self.act_operand is None else self.act_operand

  @property
  def perturbed_shape(self) -> tuple[int, ...]:
    """Shape of the perturbed output (``out_shape`` permuted by ``out_perm``)."""
    if self.out_perm is None:
      return self.out_shape
    return tuple(self.out_shape[d] for d in self.out_perm)

  def unpermute(self, ds: jax.Array) -> jax.Array:
    """Derivative w.r.t. the perturbed output -> layout of the product output."""
    if self.out_perm is None:
      return ds
    lead = ds.ndim - len(self.out_perm)
    return jnp.transpose(ds, tuple(range(lead)) + tuple(
        lead + self.out_perm.index(d) for d in range(len(self.out_perm))))

  @property
  def d_in(self) -> int:
    """Rows of the weight matrix (without a bias row)."""
    raise NotImplementedError

  @property
  def d_out(self) -> int:
    """Columns of the weight matrix."""
    raise NotImplementedError

  @property
  def out_feature_axes(self) -> tuple[int, ...]:
    """Output axes indexed by the weight's output features (bias axes)."""
    raise NotImplementedError

  def input_rows(self, x: jax.Array) -> jax.Array:
    """Activation operand -> ``[N, T, d_in]``."""
    raise NotImplementedError

  def input_columns(self, x: jax.Array) -> jax.Array:
    """Activation operand -> ``[N, d_in, T]``, :meth:`input_rows` transposed
    (a family whose rows are built as columns returns them without the copy)."""
    return jnp.swapaxes(self.input_rows(x), 1, 2)

  def output_rows(self, ds: jax.Array) -> jax.Array:
    """Output derivative ``[..., *out_shape]`` -> ``[..., N, T, d_out]``."""
    raise NotImplementedError

  def operand_to_matrix(self, w: jax.Array) -> jax.Array:
    """Weight operand (as the equation sees it) -> ``[d_in, d_out]``."""
    raise NotImplementedError

  def per_example_grads(self, x: jax.Array, ds: jax.Array, *, bias: bool) -> jax.Array:
    """``[S, N, d_in(+1), d_out]`` per-example gradients ``Σ_t a_t ds_t^T``
    (``"diagonal_fisher"`` and ``"full"`` blocks), ``ds`` in the product's layout."""
    rows = self.input_rows(x.astype(jnp.float32))
    if bias:
      rows = jnp.concatenate([rows, jnp.ones_like(rows[..., :1])], -1)
    return jnp.einsum("ntd,sntk->sndk", rows, self.output_rows(ds))

  def input_matrix_rows(self, x: jax.Array, *, bias: bool, reduce: bool) -> jax.Array:
    """The activation rows the input factor is built from.

    Args:
      x: the activation operand.
      bias: append a constant 1 to every row (the layer has a bias).
      reduce: average the rows over the shared axis ``T`` first.

    Returns:
      ``[M, d_in(+1)]`` float32 rows (``M = N T``, or ``N`` with ``reduce``).
    """
    rows = self.input_rows(x.astype(jnp.float32))
    if bias:
      rows = jnp.concatenate([rows, jnp.ones_like(rows[..., :1])], -1)
    if reduce:
      rows = jnp.mean(rows, axis=1)
    return rows.reshape(-1, rows.shape[-1])
