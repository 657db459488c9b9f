"""Which values of a traced loss reach the registered predictive distribution.

K-FAC approximates the Fisher of the model's predictive distribution, the one
whose parameters (logits, predictions) are passed to a
:mod:`kfac_jax_lite.losses` function (Martens & Grosse 2015, §3; the Fisher is
``E[J^T F_z J]`` with ``J`` the Jacobian of the logits ``z``). A use of a
parameter that does not lie on a path to those logits (a weight-decay term
written into the loss, a norm penalty, an auxiliary unregistered loss) adds
to the gradient but nothing to that Fisher, so layer detection must not see
it. This module computes the backward slice of the loss's jaxpr from every
loss marker's prediction operand (not its targets), through the calls the
tagger inlines (``jit``, ``custom_jvp`` / ``custom_vjp``, ``remat``); any other
equation (``cond``, ``while``, a rolled ``scan``, a hand registration) is
taken whole: all its operands are relevant when any of its outputs is.
"""

from __future__ import annotations

from typing import Any, Sequence

from jax.extend import core as jex_core

from kfac_jax_lite.losses import MARKER_PREFIX
from kfac_jax_lite.tagging.jaxpr import Path, body_operands, call_name, inlined_body, is_var

# Path of a jaxpr (() for the top level, else the path of the call equation
# whose body it is) -> the variables of that jaxpr that reach a registered
# distribution's prediction operand.
Relevant = dict[Path, set[Any]]


def is_marker(eqn: jex_core.JaxprEqn) -> bool:
  """Whether ``eqn`` is a :mod:`kfac_jax_lite.losses` marker."""
  return call_name(eqn).startswith(MARKER_PREFIX)


def _slice(jaxpr: jex_core.Jaxpr, live_out: Sequence[bool], prefix: Path,
           out: Relevant) -> list[bool]:
  """Fills ``out[prefix]``; returns which inputs of ``jaxpr`` are relevant."""
  live = {v for v, r in zip(jaxpr.outvars, live_out) if r and is_var(v)}
  for i in reversed(range(len(jaxpr.eqns))):
    eqn = jaxpr.eqns[i]
    needed = any(v in live for v in eqn.outvars)
    if is_marker(eqn):
      operands = eqn.invars if needed else eqn.invars[:1]  # the predictions only
      live.update(v for v in operands if is_var(v))
      continue
    body = inlined_body(eqn)
    if body is not None:
      sub = body.jaxpr
      sub_live = _slice(sub, [v in live for v in eqn.outvars], prefix + (i,), out)
      live.update(a for a, r in zip(body_operands(eqn.invars, len(sub.invars)), sub_live)
                  if r and a is not None and is_var(a))
    elif needed:
      live.update(v for v in eqn.invars if is_var(v))
  out[prefix] = live
  return [v in live for v in jaxpr.invars]


def relevant_vars(jaxpr: jex_core.Jaxpr) -> Relevant:
  """The backward slice of a loss from its registered predictions.

  Args:
    jaxpr: the traced loss (its output, the scalar loss, is not itself
      relevant: only what reaches a marker's prediction operand is).

  Returns:
    For the top-level jaxpr (key ``()``) and the body of every inlined call
    (key: the call equation's path), the set of its variables on a path to
    some registered distribution's predictions.
  """
  out: Relevant = {}
  _slice(jaxpr, [False] * len(jaxpr.outvars), (), out)
  return out


def use_counts(jaxpr: jex_core.Jaxpr, prefix: Path, relevant: Relevant) -> dict[Any, int]:
  """How many relevant consumers (equations, or the jaxpr's outputs) read each variable."""
  live = relevant.get(prefix, set())
  counts: dict[Any, int] = {}
  for i, eqn in enumerate(jaxpr.eqns):
    body = inlined_body(eqn)
    if is_marker(eqn):
      operands = eqn.invars[:1]
    elif body is not None:
      sub_live = relevant.get(prefix + (i,), set())
      sub = body.jaxpr
      operands = [a for a, v in zip(body_operands(eqn.invars, len(sub.invars)), sub.invars)
                  if a is not None and v in sub_live]
    else:
      operands = eqn.invars if any(v in live for v in eqn.outvars) else []
    for v in operands:
      if is_var(v):
        counts[v] = counts.get(v, 0) + 1
  for v in jaxpr.outvars:
    if is_var(v) and v in live:
      counts[v] = counts.get(v, 0) + 1
  return counts


def referenced(jaxpr: jex_core.Jaxpr, num_params: int) -> set[int]:
  """Indices of the parameter inputs that any top-level equation reads."""
  index = {v: i for i, v in enumerate(jaxpr.invars[:num_params])}
  used = {index[v] for eqn in jaxpr.eqns for v in eqn.invars if is_var(v) and v in index}
  return used | {index[v] for v in jaxpr.outvars if is_var(v) and v in index}
