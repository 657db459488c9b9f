"""Unroll ``lax.scan`` loops over parameters, so every step's layers are seen.

A scan hides layers in its body: a stack of layers (``nn.scan`` /
``nnx.scan`` / ``lax.scan`` over stacked parameters, one slice per step) or a
recurrent cell (parameters closed over, used at every step). For tagging and
for the statistics pass the traced loss is rewritten with such scans
unrolled, which turns the stack into ordinary layers on slices of the
stacked leaf (each slice gets its own factors) and the recurrent cell into
one weight with a use per step (its statistics summed over the steps). The
user's own gradient computation keeps the rolled scan.

Only scans that take a parameter (or a view of one) as a constant or as a
scanned-over operand are unrolled, and only up to :data:`MAX_UNROLL` steps;
a longer scan stays rolled and its parameters get the rms fallback.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from kfac_jax_lite.tagging.jaxpr import (
    SLICES, VIEWS, Path, bind, body_operands, evaluate, inlined_body, is_var, prefixes)

MAX_UNROLL = 128


def _unrolled_scans(jaxpr: jex_core.Jaxpr, param_like: Sequence[bool | None], path: Path,
                    out: list[Path]) -> None:
  """Appends to ``out`` the path of every scan that evaluation would unroll.

  ``param_like`` flags the inputs that are parameters (or views or slices of
  one); calls are followed into their bodies, and unrolled scans into theirs.
  """
  flags = dict(zip(jaxpr.invars, param_like))
  for i, eqn in enumerate(jaxpr.eqns):
    here = path + (i,)
    ins = [is_var(a) and bool(flags.get(a)) for a in eqn.invars]
    body, scan_flags = inlined_body(eqn), _scan_body_flags(eqn, ins)
    if scan_flags is not None:
      out.append(here)
      _unrolled_scans(eqn.params["jaxpr"].jaxpr, scan_flags, here, out)
    elif body is not None:
      _unrolled_scans(body.jaxpr, body_operands(ins, len(body.jaxpr.invars)), here, out)
    if eqn.primitive.name in VIEWS | SLICES and ins and ins[0]:
      flags[eqn.outvars[0]] = True


def _scan_body_flags(eqn: jex_core.JaxprEqn, param_like: list[bool]) -> list[bool] | None:
  """Which body inputs of a scan to unroll are parameters; None for any other
  equation (a scan taking no parameter, or longer than :data:`MAX_UNROLL`)."""
  if eqn.primitive.name != "scan" or eqn.params["length"] > MAX_UNROLL:
    return None
  n_consts, n_carry = _scan_counts(eqn.params)
  flags = param_like[:n_consts] + [False] * n_carry + param_like[n_consts + n_carry:]
  return flags if any(flags) else None


def _scan_counts(params: dict[str, Any]) -> tuple[int, int]:
  """The numbers of constant and carry operands of a scan equation.

  jax < 0.11 stores them as ``num_consts`` / ``num_carry``; jax 0.11 as
  ``ft_in``, the flat tree of its ``(consts, carry, xs)`` operands.
  """
  if "num_consts" in params:
    return params["num_consts"], params["num_carry"]
  consts, carry, _ = params["ft_in"].unpack()
  return len(consts), len(carry)


class _Unroller:
  """The evaluation hook: binds every equation but the scans to unroll."""

  def __init__(self, scans: list[Path]):
    self.scans = frozenset(scans)
    self.inline = prefixes(scans)

  def __call__(self, eqn: jex_core.JaxprEqn, invals: list[Any], path: Path) -> list[Any]:
    """Evaluates one equation not inlined (an unrolled scan: a Python loop)."""
    if path not in self.scans:
      return bind(eqn, invals)
    p = eqn.params
    (n_consts, n_carry), length = _scan_counts(p), p["length"]
    body: jex_core.ClosedJaxpr = p["jaxpr"]
    consts, carry = invals[:n_consts], invals[n_consts:n_consts + n_carry]
    xs = invals[n_consts + n_carry:]
    ys: list[list[Any]] = [[None] * length for _ in range(len(body.jaxpr.outvars) - n_carry)]
    for i in (reversed(range(length)) if p["reverse"] else range(length)):
      x_i = [jax.lax.index_in_dim(x, i, 0, keepdims=False) for x in xs]
      out = evaluate(body.jaxpr, body.consts, [*consts, *carry, *x_i], inline=self.inline,
                     on_equation=self, path=path)
      carry = out[:n_carry]
      for k, y in enumerate(out[n_carry:]):
        ys[k][i] = y
    return [*carry, *(jnp.stack(y) for y in ys)]


def unroll_scans(closed: jex_core.ClosedJaxpr, args: Sequence[Any],
                 num_params: int) -> jex_core.ClosedJaxpr:
  """Re-traces ``closed`` with its scans over parameters unrolled.

  Args:
    closed: the traced loss; its first ``num_params`` inputs are parameters.
    args: the values (or abstract values) it was traced with.
    num_params: number of parameter inputs.

  Returns:
    ``closed`` itself when no scan takes a parameter, else an equivalent
    closed jaxpr without those scans.
  """
  scans: list[Path] = []
  flags = [True] * num_params + [False] * (len(args) - num_params)
  _unrolled_scans(closed.jaxpr, flags, (), scans)
  if not scans:
    return closed
  unroller = _Unroller(scans)
  return jax.make_jaxpr(lambda *a: evaluate(
      closed.jaxpr, closed.consts, a, inline=unroller.inline, on_equation=unroller)[0])(*args)
