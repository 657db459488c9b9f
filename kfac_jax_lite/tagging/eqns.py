"""Evaluate single jaxpr equations (the pieces of ``jax.core.eval_jaxpr``).

Public ``jax.extend`` API only; shared by every module that re-evaluates a
traced loss.
"""

from __future__ import annotations

from typing import Any, Sequence

from jax.extend import core as jex_core


def bind_eqn(eqn: jex_core.JaxprEqn, invals: Sequence[Any]) -> list[Any]:
  """Evaluates one equation as ``jax.core.eval_jaxpr`` does; returns a list."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bind_params, tuple):  # jax < 0.9.2 returned (subfuns, params).
    subfuns, bind_params = bind_params
    out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
  else:
    out = eqn.primitive.bind(*invals, **bind_params)
  return list(out) if eqn.primitive.multiple_results else [out]


def read(env: dict[Any, Any], atom: Any) -> Any:
  """Reads a jaxpr atom (a ``Var`` from ``env`` or a ``Literal``'s value)."""
  if isinstance(atom, jex_core.Literal):
    return atom.val
  return env[atom]
