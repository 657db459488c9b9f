"""What the pattern walk knows about the values of one jaxpr.

For every variable of a jaxpr (the loss, or the body of an inlined call) the
walk (:mod:`.patterns`) tracks whether it is a *view* of a parameter leaf
(reached only through reshape / transpose / dtype casts, a slice, a join of
leaves, or broadcasts for biases), whether it depends on the batch, whether
it is known to be all zeros (an RNN's initial state), and whether it is a
flattened feature map (for doubly-factored dense layers, Ba et al. 2017, §4).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from jax.extend import core as jex_core
import numpy as np

from kfac_jax_lite.tagging import fused
from kfac_jax_lite.tagging.jaxpr import BROADCASTS, PRODUCTS, TYPE_ONLY, VIEWS, is_var
from kfac_jax_lite.tagging.match import ParamView

# Equations whose output is zero when any operand is / when the first one is.
_ZERO_IF_ANY = PRODUCTS | {"mul"}
_ZERO_IF_FIRST = VIEWS | BROADCASTS


@dataclasses.dataclass
class Values:
  """Facts about the variables of one jaxpr, filled equation by equation.

  Attributes:
    views: variable -> the parameter view it is.
    data: the batch-dependent variables.
    flat: batch-dependent 2-D variables made by flattening a feature map ->
      the shape before the flatten.
    zeros: variables known to be all zeros (a product with one is no use of
      the parameter at all).
    counts: variable -> its number of uses on the path to the predictions.
    live: the variables on that path (only their equations are layers or uses).
  """

  views: dict[Any, ParamView] = dataclasses.field(default_factory=dict)
  data: set[Any] = dataclasses.field(default_factory=set)
  flat: dict[Any, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  zeros: set[Any] = dataclasses.field(default_factory=set)
  counts: dict[Any, int] = dataclasses.field(default_factory=dict)
  live: set[Any] = dataclasses.field(default_factory=set)

  def bind(self, variables: Sequence[Any], views: Sequence[ParamView | None],
           data: Sequence[bool]) -> None:
    """Records the views and batch dependence of ``variables``."""
    for v, pv, d in zip(variables, views, data):
      if pv is not None:
        self.views[v] = pv
      if d:
        self.data.add(v)

  def view(self, atom: Any) -> ParamView | None:
    return self.views.get(atom) if is_var(atom) else None

  def is_data(self, atom: Any) -> bool:
    return is_var(atom) and atom in self.data

  def mark_data(self, eqn: jex_core.JaxprEqn, flag: bool) -> None:
    """Marks ``eqn``'s outputs batch-dependent if ``flag``."""
    if flag:
      self.data.update(eqn.outvars)

  def needed(self, eqn: jex_core.JaxprEqn) -> bool:
    """Whether an output of ``eqn`` is on the path to the predictions."""
    return any(v in self.live for v in eqn.outvars)

  def track_flatten(self, eqn: jex_core.JaxprEqn, in_data: Sequence[bool]) -> None:
    """Remembers a batch-dependent feature map flattened to 2-D (through casts)."""
    name = eqn.primitive.name
    if name == "reshape" and in_data[0] and len(eqn.outvars[0].aval.shape) == 2:
      self.flat[eqn.outvars[0]] = tuple(eqn.invars[0].aval.shape)
    elif name in TYPE_ONLY and in_data[0] and eqn.invars[0] in self.flat:
      self.flat[eqn.outvars[0]] = self.flat[eqn.invars[0]]

  def is_zero(self, eqn: jex_core.JaxprEqn) -> bool:
    """Whether ``eqn``'s output is all zeros (``jnp.zeros`` and what it feeds)."""
    name = eqn.primitive.name
    first = eqn.invars[0] if eqn.invars else None
    if name == "broadcast_in_dim" and isinstance(first, jex_core.Literal):
      return not np.any(first.val)
    if name in _ZERO_IF_FIRST:
      return is_var(first) and first in self.zeros
    if name in _ZERO_IF_ANY:
      return any(is_var(a) and a in self.zeros for a in eqn.invars)
    return False


def derived_view(eqn: jex_core.JaxprEqn,
                 in_views: Sequence[ParamView | None]) -> ParamView | None:
  """The parameter view ``eqn`` makes of its operands' views, if any.

  A unit-stride slice of a whole leaf is a view of a box of it; a
  ``concatenate`` / ``stack`` of leaves read by one product is a fused view
  (:mod:`.fused`); a view or broadcast equation extends its operand's chain.
  """
  name = eqn.primitive.name
  pv = in_views[0] if in_views else None
  if name == "slice" and _is_root(pv) and all(st == 1 for st in (eqn.params["strides"] or ())):
    return dataclasses.replace(pv, chain=(eqn,), part=tuple(
        zip(eqn.params["start_indices"], eqn.params["limit_indices"])))
  joined = fused.view(eqn, in_views)
  if joined is not None:
    return ParamView(pv.index, tuple(eqn.outvars[0].aval.shape), fused=joined)
  if name in VIEWS | BROADCASTS and pv is not None:
    return dataclasses.replace(pv, chain=pv.chain + (eqn,),
                               broadcast=pv.broadcast or name in BROADCASTS)
  return None


def _is_root(pv: ParamView | None) -> bool:
  """A whole parameter leaf, before any view equation."""
  return pv is not None and not pv.chain and pv.part is None and pv.fused is None
