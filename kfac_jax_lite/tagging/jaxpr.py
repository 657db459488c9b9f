"""The one jaxpr evaluator and the one table of primitives the tagger knows.

Every module that reads a traced loss (unrolling scans, the layer walk, the
backward slice, the tapped re-evaluation) takes its primitive names from the
tables here, and every module that re-evaluates one uses :func:`evaluate`.
Only public ``jax.extend`` APIs are used; nothing here knows layers or
optimizers.
"""

from __future__ import annotations

from typing import Any, Callable, Container, Iterator, Sequence, TypeVar

from jax.extend import core as jex_core

from kfac_jax_lite.losses import MARKER_PREFIX
from kfac_jax_lite.registration import REGISTRATION_PREFIX

# An equation's address: equation indices from the top-level jaxpr through
# the bodies of inlined calls (or of an unrolled scan) down to the equation.
Path = tuple[int, ...]

# Calls whose body is inlined, so that layers inside a user's ``jit``, a
# ``custom_jvp`` / ``custom_vjp`` function or ``jax.checkpoint`` are seen:
# primitive name -> the params key of the body.
CALLS: dict[str, str] = {
    "jit": "jaxpr", "pjit": "jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}
# ``jit`` calls kept whole: loss markers and hand registrations (by name prefix).
OPAQUE_PREFIXES = (MARKER_PREFIX, REGISTRATION_PREFIX)
# Equations that change only a value's type (dtype casts; shard_map's
# invariant -> varying casts), not its values.
TYPE_ONLY = frozenset({"convert_element_type", "pvary", "pcast"})
# Equations whose output holds the operand's values, rearranged: a view of a
# parameter is still "the parameter".
VIEWS = TYPE_ONLY | {"reshape", "transpose", "squeeze", "expand_dims", "copy", "copy_p"}
# Equations whose output repeats the operand's values (a bias's broadcast).
BROADCASTS = frozenset({"broadcast_in_dim"})
# Equations whose output is a part of the operand's values.
SLICES = frozenset({"slice", "dynamic_slice"})
# Products whose parameter operand makes a layer (a Kronecker-factored block).
PRODUCTS = frozenset({"dot_general", "conv_general_dilated"})

T = TypeVar("T")
# (equation, operand values, path) -> output values.
OnEquation = Callable[[jex_core.JaxprEqn, list[Any], Path], list[Any]]


def is_var(atom: Any) -> bool:
  """Whether a jaxpr atom is a variable (not a ``Literal``)."""
  return not isinstance(atom, jex_core.Literal)


def _read(env: dict[Any, T], atom: Any) -> T:
  """Reads a jaxpr atom (a variable from ``env`` or a ``Literal``'s value)."""
  return env[atom] if is_var(atom) else atom.val


def call_name(eqn: jex_core.JaxprEqn) -> str:
  """The function name of a ``jit`` equation (``""`` for other primitives)."""
  if eqn.primitive.name not in ("jit", "pjit"):
    return ""
  return str(eqn.params.get("name", ""))


def inlined_body(eqn: jex_core.JaxprEqn) -> jex_core.ClosedJaxpr | None:
  """The body of a call the tagger inlines (see :data:`CALLS`), else None."""
  key = CALLS.get(eqn.primitive.name)
  if key is None or call_name(eqn).startswith(OPAQUE_PREFIXES):
    return None
  body = eqn.params.get(key)
  if isinstance(body, jex_core.Jaxpr):
    return jex_core.ClosedJaxpr(body, ())
  return body if isinstance(body, jex_core.ClosedJaxpr) else None


def body_operands(operands: Sequence[T], n_body: int) -> list[T | None]:
  """The equation operand (or its value, view, flag) bound to each body input.

  Call primitives may carry their constants as leading operands; a body
  input is bound to the operand at the same position from the end, and the
  body inputs left over (``None``) are constants.
  """
  lead = n_body - len(operands)
  return [None] * max(lead, 0) + list(operands[max(-lead, 0):])


def trailing_bodies(eqn: jex_core.JaxprEqn) -> Iterator[jex_core.Jaxpr]:
  """Sub-jaxprs of ``eqn`` whose inputs are bound to its trailing operands.

  A ``cond``'s branches (all operands but the predicate), a scan's or a
  call's body (all), a ``while``'s body (its constants and carry; not its
  ``cond_jaxpr``).
  """
  for key, value in eqn.params.items():
    if key != "cond_jaxpr":
      yield from _jaxprs_in(value)


def _jaxprs_in(value: Any) -> Iterator[jex_core.Jaxpr]:
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _jaxprs_in(v)


def prefixes(paths: Sequence[Path]) -> set[Path]:
  """Every strict, non-empty prefix of ``paths``: the calls to inline to reach them."""
  return {p[:k] for p in paths for k in range(1, len(p))}


def bind(eqn: jex_core.JaxprEqn, invals: Sequence[Any], path: Path = ()) -> list[Any]:
  """Evaluates one equation as ``jax.core.eval_jaxpr`` does; returns a list."""
  del path  # the signature of an :data:`OnEquation` hook
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bind_params, tuple):  # jax < 0.9.2 returned (subfuns, params).
    subfuns, bind_params = bind_params
    out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
  else:
    out = eqn.primitive.bind(*invals, **bind_params)
  return list(out) if eqn.primitive.multiple_results else [out]


def evaluate(jaxpr: jex_core.Jaxpr, consts: Sequence[Any], args: Sequence[Any], *,
             inline: Container[Path] = frozenset(), on_equation: OnEquation = bind,
             path: Path = ()) -> list[Any]:
  """Evaluates a jaxpr (as ``jax.core.eval_jaxpr``), inlining calls, with a hook.

  Args:
    jaxpr: the jaxpr.
    consts: values of its constant variables.
    args: values of its inputs.
    inline: paths of the call equations (:data:`CALLS`) whose bodies are
      evaluated equation by equation (e.g. :func:`prefixes` of the paths
      ``on_equation`` acts on); other calls are bound whole.
    on_equation: evaluates every equation not inlined; the default binds it.
      A hook may evaluate a sub-jaxpr with this function (path: its own).
    path: the path of ``jaxpr`` itself (``()`` for the top level).

  Returns:
    The values of ``jaxpr``'s outputs.
  """
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for i, eqn in enumerate(jaxpr.eqns):
    here = path + (i,)
    invals = [_read(env, a) for a in eqn.invars]
    body = inlined_body(eqn) if here in inline else None
    if body is None:
      outvals = on_equation(eqn, invals, here)
    else:
      outvals = evaluate(body.jaxpr, body.consts, body_operands(invals, len(body.jaxpr.invars)),
                         inline=inline, on_equation=on_equation, path=here)
    env.update(zip(eqn.outvars, outvals))
  return [_read(env, v) for v in jaxpr.outvars]
