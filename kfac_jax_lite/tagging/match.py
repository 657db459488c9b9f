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

Path = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ParamView:
  """A variable holding a parameter leaf seen through view equations."""
  index: int
  root_shape: tuple[int, ...]  # shape of the parameter leaf itself
  chain: tuple[Any, ...] = ()  # the view equations, in order of application
  broadcast: bool = False


@dataclasses.dataclass(frozen=True)
class Match:
  """A layer's product equation with a parameter weight (abstract)."""

  kind: ClassVar[str] = ""
  path: Path
  weight_index: int
  weight_operand: int  # operand position of the weight in the equation
  weight_chain: tuple[Any, ...]
  weight_shape: tuple[int, ...]  # shape of the equation's weight operand
  out_shape: tuple[int, ...]
  out_path: Path = ()  # equation whose output is perturbed (the bias add, if any)
  bias_index: int | None = None

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

  def output_rows(self, ds: jax.Array) -> jax.Array:
    """Output derivative ``[..., *out_shape]`` -> ``[..., N, T, d_out]``."""
    raise NotImplementedError

  def operand_to_matrix(self, w: jax.Array) -> jax.Array:
    """Weight operand (as the equation sees it) -> ``[d_in, d_out]``."""
    raise NotImplementedError
