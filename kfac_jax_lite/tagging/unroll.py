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
a longer scan stays rolled and its parameters get the diagonal fallback.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from kfac_jax_lite.losses import MARKER_PREFIX
from kfac_jax_lite.tagging.eqns import bind_eqn, read

MAX_UNROLL = 128
# Primitives through which a value is still "a parameter" (a view of one).
_VIEWS = frozenset({"reshape", "transpose", "convert_element_type", "squeeze",
                    "expand_dims", "copy", "copy_p", "pvary", "pcast", "slice"})
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr"}


def _scans_over_params(jaxpr: jex_core.Jaxpr, param_like: Sequence[bool]) -> bool:
  """Whether evaluating ``jaxpr`` would unroll any scan."""
  flags = dict(zip(jaxpr.invars, param_like))
  for eqn in jaxpr.eqns:
    ins = [not isinstance(a, jex_core.Literal) and flags.get(a, False) for a in eqn.invars]
    name = eqn.primitive.name
    if name == "scan" and _unrolls(eqn, ins):
      return True
    body = _call_body(eqn)
    if body is not None and _scans_over_params(body.jaxpr, ins[-len(body.jaxpr.invars):]):
      return True
    if name in _VIEWS and ins and ins[0]:
      flags[eqn.outvars[0]] = True
  return False


def _unrolls(eqn: jex_core.JaxprEqn, param_like: Sequence[bool]) -> bool:
  p = eqn.params
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  uses_params = any(param_like[:n_consts]) or any(param_like[n_consts + n_carry:])
  return uses_params and p["length"] <= MAX_UNROLL


def _call_body(eqn: jex_core.JaxprEqn) -> jex_core.ClosedJaxpr | None:
  key = _CALLS.get(eqn.primitive.name)
  body = eqn.params.get(key) if key else None
  if str(eqn.params.get("name", "")).startswith(MARKER_PREFIX):
    return None
  if isinstance(body, jex_core.Jaxpr):
    return jex_core.ClosedJaxpr(body, ())
  return body if isinstance(body, jex_core.ClosedJaxpr) else None


def _eval(jaxpr: jex_core.Jaxpr, consts: Sequence[Any], args: Sequence[Any],
          param_like: Sequence[bool]) -> list[Any]:
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  flags = dict(zip(jaxpr.invars, param_like))
  for eqn in jaxpr.eqns:
    invals = [read(env, a) for a in eqn.invars]
    ins = [not isinstance(a, jex_core.Literal) and flags.get(a, False) for a in eqn.invars]
    name = eqn.primitive.name
    body = _call_body(eqn)
    if name == "scan" and _unrolls(eqn, ins):
      outvals = _unrolled_scan(eqn, invals, ins)
    elif body is not None and _scans_over_params(body.jaxpr, ins[-len(body.jaxpr.invars):]):
      n = len(body.jaxpr.invars)
      outvals = _eval(body.jaxpr, body.consts, invals[-n:], ins[-n:])
    else:
      outvals = bind_eqn(eqn, invals)
    if name in _VIEWS and ins and ins[0]:
      flags[eqn.outvars[0]] = True
    env.update(zip(eqn.outvars, outvals))
  return [read(env, v) for v in jaxpr.outvars]


def _unrolled_scan(eqn: jex_core.JaxprEqn, invals: list[Any],
                   param_like: list[bool]) -> list[Any]:
  """A scan as a Python loop; scanned-over operands are sliced per step."""
  p = eqn.params
  n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
  body: jex_core.ClosedJaxpr = p["jaxpr"]
  consts, carry = invals[:n_consts], invals[n_consts:n_consts + n_carry]
  xs = invals[n_consts + n_carry:]
  flags = param_like[:n_consts] + [False] * n_carry + param_like[n_consts + n_carry:]
  ys: list[list[Any]] = [[None] * length for _ in range(len(body.jaxpr.outvars) - n_carry)]
  for i in (reversed(range(length)) if p["reverse"] else range(length)):
    x_i = [jax.lax.index_in_dim(x, i, 0, keepdims=False) for x in xs]
    out = _eval(body.jaxpr, body.consts, [*consts, *carry, *x_i], flags)
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
  flags = [True] * num_params + [False] * (len(args) - num_params)
  if not _scans_over_params(closed.jaxpr, flags):
    return closed
  return jax.make_jaxpr(lambda *a: _eval(closed.jaxpr, closed.consts, a, flags)[0])(*args)
