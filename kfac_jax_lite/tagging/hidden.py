"""Matrix products hidden inside equations the tagger does not open.

``lax.cond`` / ``switch`` branches, ``while`` loops and scans over the unroll
limit stay opaque to layer detection: their parameters get the rms
fallback. Whether such a parameter is a weight a user expects in a Kronecker
block (one read by a ``dot_general`` or a convolution) is only visible
inside; this module looks, so that the fallback can be reported loudly
(:func:`kfac_jax_lite.tagging.report.fallback_warning`).
"""

from __future__ import annotations

from typing import Any

from jax.extend import core as jex_core

from kfac_jax_lite.tagging.jaxpr import BROADCASTS, PRODUCTS, SLICES, VIEWS, is_var, trailing_bodies


def multiplied_operands(eqn: jex_core.JaxprEqn) -> set[int]:
  """Operand positions of ``eqn`` that a product inside its sub-jaxprs reads.

  A sub-jaxpr's inputs are bound to the equation's trailing operands (a
  ``cond``'s branches: all but the predicate; a scan's or a call's body: all;
  a ``while``'s body: its constants and carry), and the operand is followed
  through views, slices and nested higher-order equations.

  Args:
    eqn: any equation.

  Returns:
    The positions in ``eqn.invars``.
  """
  out: set[int] = set()
  n_ops = len(eqn.invars)
  for sub in trailing_bodies(eqn):
    offset = n_ops - len(sub.invars)
    out |= {offset + j for j in _multiplied_inputs(sub) if offset + j >= 0}
  return out


def concatenated_into_product(jaxpr: jex_core.Jaxpr, index: int) -> bool:
  """Whether the output of ``jaxpr.eqns[index]`` (a ``concatenate`` of
  parameters: a fused kernel, Flax's ``OptimizedLSTMCell``) reaches a product."""
  return bool(_multiplied_inputs(jaxpr, {jaxpr.eqns[index].outvars[0]: frozenset({0})},
                                 index + 1))


def _multiplied_inputs(jaxpr: jex_core.Jaxpr, origin: dict[Any, frozenset[int]] | None = None,
                       start: int = 0) -> set[int]:
  """Input positions of ``jaxpr`` (or labels of ``origin``'s variables) whose
  values reach a product's operand, from equation ``start`` on."""
  if origin is None:
    origin = {v: frozenset({j}) for j, v in enumerate(jaxpr.invars)}
  hits: set[int] = set()
  for eqn in jaxpr.eqns[start:]:
    sources = [origin.get(v, frozenset()) if is_var(v) else frozenset() for v in eqn.invars]
    name = eqn.primitive.name
    if name in PRODUCTS:
      hits.update(*sources)
    elif name in VIEWS | SLICES | BROADCASTS and sources and sources[0]:
      origin[eqn.outvars[0]] = sources[0]
    elif name == "concatenate" and any(sources):
      origin[eqn.outvars[0]] = frozenset().union(*sources)
    elif any(sources):  # products inside a cond, while or rolled scan
      for k in multiplied_operands(eqn):
        hits.update(sources[k])
  return hits
