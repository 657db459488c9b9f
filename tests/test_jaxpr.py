"""The one jaxpr evaluator and its primitive tables (kfac_jax_lite/tagging/jaxpr.py).

Oracles: the function itself and ``jax.extend.core.jaxpr_as_fun`` (JAX's own
evaluator), values and gradients; the primitive names JAX emits for each
table entry.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
import numpy as np
import pytest

import kfac_jax_lite as kfl
from kfac_jax_lite.tagging import jaxpr as jx
from kfac_jax_lite.tagging import unroll
from kfac_jax_lite.tagging.trace import trace_loss


class _Everywhere:
  """A container of every path: inline every call."""

  def __contains__(self, path: Any) -> bool:
    return True


@jax.custom_vjp
def _sin(x):
  return jnp.sin(x)


_sin.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda cos, g: (g * cos,))


@jax.custom_jvp
def _tanh(x):
  return jnp.tanh(x)


_tanh.defjvp(lambda p, t: (jnp.tanh(p[0]), t[0] * (1 - jnp.tanh(p[0]) ** 2)))


def _nested(w: jax.Array, x: jax.Array) -> jax.Array:
  """A jit around a custom_vjp, a remat around a custom_jvp, a scan over w."""
  y = jax.jit(lambda a: _sin(a) * 2.0)(x @ w)
  y = jax.checkpoint(_tanh)(y)
  h, ys = jax.lax.scan(lambda c, xi: (jnp.tanh(c @ w + xi), c), jnp.zeros(w.shape[1]), y)
  return jnp.sum(h) + jnp.sum(ys ** 2)


@pytest.fixture(scope="module")
def nested():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  w = jax.random.normal(k1, (3, 3)) / 2
  x = jax.random.normal(k2, (4, 3))
  return w, x, jax.make_jaxpr(_nested)(w, x)


def _names(closed: jex_core.ClosedJaxpr, args: list[jax.Array], inline: Any) -> list[str]:
  seen: list[str] = []

  def hook(eqn, invals, path):
    seen.append(eqn.primitive.name)
    return jx.bind(eqn, invals)

  jx.evaluate(closed.jaxpr, closed.consts, args, inline=inline, on_equation=hook)
  return seen


@pytest.mark.parametrize("inline", [frozenset(), _Everywhere()], ids=["bound", "inlined"])
def test_evaluate_equals_the_function_and_jax(nested, inline):
  w, x, closed = nested
  run = lambda w, x: jx.evaluate(closed.jaxpr, closed.consts, [w, x], inline=inline)[0]
  want = _nested(w, x)
  np.testing.assert_allclose(run(w, x), want, rtol=1e-6)
  np.testing.assert_allclose(jex_core.jaxpr_as_fun(closed)(w, x)[0], want, rtol=1e-6)
  for got, ref in zip(jax.grad(run, (0, 1))(w, x), jax.grad(_nested, (0, 1))(w, x)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_inlining_opens_every_call_and_only_calls(nested):
  w, x, closed = nested
  top = [e.primitive.name for e in closed.jaxpr.eqns]
  assert {"jit", "remat2", "scan"} <= set(top)
  assert _names(closed, [w, x], frozenset()) == top  # nothing inlined: the top level
  inner = _names(closed, [w, x], _Everywhere())
  assert not set(inner) & set(jx.CALLS)  # jit, custom_vjp, remat, custom_jvp all opened
  assert {"sin", "tanh", "scan"} <= set(inner)  # control flow is not a call


def test_hook_paths_address_equations_inside_calls(nested):
  _, _, closed = nested
  jit_index = [e.primitive.name for e in closed.jaxpr.eqns].index("jit")
  seen: dict[tuple[int, ...], str] = {}

  def hook(eqn, invals, path):
    seen[path] = eqn.primitive.name
    return jx.bind(eqn, invals)

  jx.evaluate(closed.jaxpr, closed.consts, [*nested[:2]], inline={(jit_index,)},
              on_equation=hook)
  body = closed.jaxpr.eqns[jit_index].params["jaxpr"].jaxpr
  assert [seen[(jit_index, i)] for i in range(len(body.eqns))] == [
      e.primitive.name for e in body.eqns]
  assert (jit_index,) not in seen


@pytest.mark.parametrize("fn, key", [
    (jax.jit(jnp.sin), "jit"), (_sin, "custom_vjp_call"), (_tanh, "custom_jvp_call"),
    (jax.checkpoint(jnp.sin), "remat2")])
def test_calls_table_names_what_jax_emits(fn, key):
  (eqn,) = jax.make_jaxpr(fn)(jnp.ones(3)).jaxpr.eqns
  assert eqn.primitive.name == key and jx.inlined_body(eqn) is not None


@pytest.mark.parametrize("fn, name, table", [
    (lambda w: w.reshape(-1), "reshape", jx.VIEWS), (lambda w: w.T, "transpose", jx.VIEWS),
    (lambda w: w.astype(jnp.bfloat16), "convert_element_type", jx.TYPE_ONLY),
    (jnp.copy, "copy", jx.VIEWS), (lambda w: jnp.squeeze(w[:1]), "squeeze", jx.VIEWS),
    (lambda w: w[:1, :], "slice", jx.SLICES),
    (lambda w: jax.lax.dynamic_slice_in_dim(w, jnp.argmax(w[0]), 1), "dynamic_slice", jx.SLICES),
    (lambda w: jnp.broadcast_to(w, (2, 2, 3)), "broadcast_in_dim", jx.BROADCASTS),
    (lambda w: w @ w.T, "dot_general", jx.PRODUCTS),
    (lambda w: jax.lax.conv(w[None, None], w[None, None], (1, 1), "SAME"),
     "conv_general_dilated", jx.PRODUCTS)])
def test_primitive_tables_name_what_jax_emits(fn, name, table):
  names = {e.primitive.name for e in jax.make_jaxpr(fn)(jnp.ones((2, 3))).jaxpr.eqns}
  assert name in names and name in table, names
  assert jx.TYPE_ONLY <= jx.VIEWS and not jx.VIEWS & (jx.SLICES | jx.BROADCASTS | jx.PRODUCTS)


def test_markers_and_registrations_stay_whole():
  def loss(w, y):
    z = kfl.register_dense(lambda x, w: x @ w, y, w)
    return kfl.losses.softmax_cross_entropy(z, y)

  eqns = jax.make_jaxpr(loss)(jnp.ones((3, 3)), jnp.ones((2, 3))).jaxpr.eqns
  names = [jx.call_name(e) for e in eqns if e.primitive.name in ("jit", "pjit")]
  assert len(names) == 2 and all(n.startswith(jx.OPAQUE_PREFIXES) for n in names)
  assert all(jx.inlined_body(e) is None for e in eqns)


def _scan_names(jaxpr: jex_core.Jaxpr) -> list[str]:
  out = []
  for eqn in jaxpr.eqns:
    out.append(eqn.primitive.name)
    for sub in jx.trailing_bodies(eqn):
      out += _scan_names(sub)
  return [n for n in out if n == "scan"]


@pytest.mark.parametrize("wrap", ["jit", "custom_jvp", "checkpoint"])
def test_unrolling_opens_the_calls_tagging_opens(wrap):
  """A recurrent cell inside any inlined call is unrolled, and its weight
  becomes one dense layer with a use per step (it used to stay rolled inside
  a custom_jvp: the fallback)."""
  steps = 3

  def rnn(w, xs):
    h, _ = jax.lax.scan(lambda c, x: (jnp.tanh(c @ w + x), None), jnp.tanh(xs[0]), xs)
    return h

  if wrap == "custom_jvp":
    cell = jax.custom_jvp(rnn)
    cell.defjvp(lambda p, t: jax.jvp(rnn, p, t))
  else:
    cell = getattr(jax, wrap)(rnn)

  def loss(params, batch):
    h = jax.vmap(lambda xs: cell(params["w"], xs))(batch["x"])
    return kfl.losses.softmax_cross_entropy(h @ params["out"], batch["y"])

  params = {"w": jnp.eye(3) / 2, "out": jnp.ones((3, 4)) / 3}
  batch = {"x": jnp.linspace(-1, 1, 2 * steps * 3).reshape(2, steps, 3),
           "y": jax.nn.one_hot(jnp.arange(2), 4)}
  traced = trace_loss(loss, params, batch)
  assert not _scan_names(traced.jaxpr.jaxpr)
  flat = [*jax.tree.leaves(params), *jax.tree.leaves(batch)]
  np.testing.assert_allclose(jex_core.jaxpr_as_fun(traced.jaxpr)(*flat)[0], loss(params, batch),
                             rtol=1e-6)
  layers = {l.name: l for l in kfl.find_layers(loss, params, batch)}
  assert layers["['w']"].kind == "dense" and len(layers["['w']"].matches) == steps


def test_scan_operand_counts_are_read_from_this_jax_versions_params():
  """A scan closing over one array with a two-leaf carry has 1 constant and
  2 carry operands, whichever form the installed jax stores them in
  (``num_consts`` / ``num_carry`` before 0.11, the ``ft_in`` tree after)."""
  def f(carry, xs, w):
    return jax.lax.scan(lambda c, x: ((c[0] * x + w.sum(), c[1] + x), x), carry, xs)

  eqn = jax.make_jaxpr(f)((1.0, 2.0), jnp.ones(3), jnp.ones((2, 2))).jaxpr.eqns[-1]
  assert eqn.primitive.name == "scan"
  assert unroll._scan_counts(eqn.params) == (1, 2)  # pylint: disable=protected-access
