"""Fused kernels: one weight operand concatenated from several parameter leaves.

Flax's ``nn.OptimizedLSTMCell`` concatenates its four gate kernels (and
biases) and multiplies once; a fused QKV projection built from separate
``q``, ``k``, ``v`` leaves does the same. The product is one layer over the
concatenated weight: the leaves are joined into the weight operand the
equation sees, that matrix gets one Kronecker block (Martens & Grosse 2015,
§3: the block is defined by the product, not by how its weight is stored), and
the preconditioned matrix is split back into the leaves' updates (the join is
a permutation, so its transpose splits it, see :mod:`.geometry`).

``jnp.stack`` of leaves (a ``stack`` equation: a fused QKV kernel
``[3, d_in, d_out]``) joins them along a new axis. The members of a fused view
keep their own view equations (a leaf stored transposed).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from kfac_jax_lite.tagging.jaxpr import BROADCASTS, TYPE_ONLY, bind


@dataclasses.dataclass(frozen=True)
class Fused:
  """How a fused weight (or bias) is joined from parameter leaves.

  Attributes:
    members: one view per joined leaf, in the ``concatenate``'s operand order
      (a :class:`~kfac_jax_lite.tagging.match.ParamView` of a whole leaf).
    axis: the ``concatenate``'s dimension, or the ``stack``'s new axis.
    stacked: joined by ``stack`` (a new axis) rather than ``concatenate``.
  """
  members: tuple[Any, ...]
  axis: int
  stacked: bool = False

  @property
  def indices(self) -> tuple[int, ...]:
    """Flat parameter indices of the joined leaves, in joining order."""
    return tuple(m.index for m in self.members)


def view(eqn: Any, in_views: Sequence[Any]) -> Fused | None:
  """The :class:`Fused` join of a ``concatenate`` / ``stack`` of distinct whole leaves.

  Args:
    eqn: any equation (only ``concatenate`` and ``stack`` join).
    in_views: the parameter view of each operand (``None`` for non-parameters).

  Returns:
    The join; ``None`` unless every operand views a different whole
    parameter leaf through reshapes / transposes / casts (no broadcast, slice
    or nested join).
  """
  name = eqn.primitive.name
  if name not in ("concatenate", "stack") or len(in_views) < 2 or any(
      pv is None or pv.broadcast or pv.part is not None or pv.fused is not None
      or any(e.primitive.name in BROADCASTS for e in pv.chain) for pv in in_views):
    return None
  if len({pv.index for pv in in_views}) != len(in_views):
    return None
  stacked = name == "stack"
  return Fused(members=tuple(in_views), stacked=stacked,
               axis=int(eqn.params["axis" if stacked else "dimension"]))


def join(fused: Fused, leaves: Sequence[jax.Array]) -> jax.Array:
  """The joined operand from the member leaves (each through its view chain).

  Args:
    fused: the join.
    leaves: one array per member, shaped like its leaf.

  Returns:
    The concatenated array, as the ``concatenate`` equation produced it.
  """
  parts = []
  for member, leaf in zip(fused.members, leaves):
    for eqn in member.chain:
      if eqn.primitive.name not in TYPE_ONLY:
        (leaf,) = bind(eqn, [leaf])
    parts.append(leaf)
  dtype = jnp.result_type(*parts)
  parts = [p.astype(dtype) for p in parts]
  return jnp.stack(parts, fused.axis) if fused.stacked else jnp.concatenate(parts, fused.axis)


def admit(found: Any, pv: Any) -> Any:
  """Declines a fused weight in any family but dense (which records it).

  Args:
    found: a matcher's ``Match``.
    pv: the parameter view of the match's weight operand.

  Returns:
    ``found``, or a reason string when a family other than dense reads a
    fused weight.
  """
  if pv is None or pv.fused is None or found.kind == "dense":
    return found
  return f"a fused (concatenated) weight read by {found.kind}"
