"""The quadratic-model step (Martens & Grosse 2015, §6.5, §7) against its definition.

The oracle is written out in numpy: the Gauss–Newton matrix ``G = Jᵀ H J / N``
from the full Jacobian of the logits (``jax.jacfwd``) and each loss's Hessian
in the logits written by hand; the 2×2 model minimized by ``np.linalg.solve``;
the Levenberg–Marquardt rule as the paper states it.
"""

from __future__ import annotations


import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl
from kfac_jax_lite.step import quadratic
from kfac_jax_lite.step.layers import LayerCache

N, D_IN, D_HID, D_OUT = 6, 4, 5, 3
LOSSES = {"softmax": kfl.losses.softmax_cross_entropy,
          "sigmoid": kfl.losses.sigmoid_cross_entropy,
          "squared": kfl.losses.squared_error}


def _params(seed: int = 0) -> dict[str, jax.Array]:
  k = jax.random.split(jax.random.key(seed), 4)
  return {"w1": jax.random.normal(k[0], (D_IN, D_HID)) / 2, "b1": 0.1 * jax.random.normal(k[1], (D_HID,)),
          "w2": jax.random.normal(k[2], (D_HID, D_OUT)) / 2, "b2": 0.1 * jax.random.normal(k[3], (D_OUT,))}


def _apply(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _batch(loss: str, seed: int = 1) -> dict[str, jax.Array]:
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (N, D_IN))
  if loss == "softmax":
    y = jax.random.randint(ky, (N,), 0, D_OUT)
  elif loss == "sigmoid":
    y = jax.random.bernoulli(ky, 0.5, (N, D_OUT)).astype(jnp.float32)
  else:
    y = jax.random.normal(ky, (N, D_OUT))
  return {"x": x, "y": y}


def _loss_fn(loss: str):
  return lambda p, b: LOSSES[loss](_apply(p, b["x"]), b["y"])


def _output_hessian(loss: str, z: np.ndarray) -> np.ndarray:
  """Per example, the Hessian of its loss term in its logits (block diagonal)."""
  blocks = []
  for zn in z:
    if loss == "softmax":
      p = np.exp(zn - zn.max())
      p /= p.sum()
      blocks.append(np.diag(p) - np.outer(p, p))
    elif loss == "sigmoid":
      s = 1 / (1 + np.exp(-zn))
      blocks.append(np.diag(s * (1 - s)))
    else:
      blocks.append(np.eye(len(zn)))
  out = np.zeros((z.size, z.size))
  for i, b in enumerate(blocks):
    out[i * D_OUT:(i + 1) * D_OUT, i * D_OUT:(i + 1) * D_OUT] = b
  return out


def _gauss_newton(loss: str, params, batch) -> np.ndarray:
  """``G = Jᵀ H J / N`` over the flattened parameters (ravel_pytree order)."""
  flat, unravel = ravel_pytree(params)
  jac = jax.jacfwd(lambda f: _apply(unravel(f), batch["x"]).reshape(-1))(flat)
  jac = np.asarray(jac, np.float64)
  z = np.asarray(_apply(params, batch["x"]), np.float64)
  return jac.T @ _output_hessian(loss, z) @ jac / N


def _random_tree(params, seed: int):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _flat(tree) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0], np.float64)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_curvature_products_match_brute_force_gauss_newton(loss: str) -> None:
  params, batch = _params(), _batch(loss)
  tagged = LayerCache(_loss_fn(loss), batch, kfl.LayerOptions())(params)
  vs = [_random_tree(params, 2), _random_tree(params, 3)]
  value, gram = quadratic.curvature_products(tagged, params, batch, vs, None)
  g = _gauss_newton(loss, params, batch)
  flat = np.stack([_flat(v) for v in vs])
  np.testing.assert_allclose(np.asarray(gram), flat @ g @ flat.T, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(float(value), float(_loss_fn(loss)(params, batch)), rtol=1e-6)


def test_solve_minimizes_the_two_by_two_model() -> None:
  a = np.array([[3.0, 0.7], [0.7, 2.0]])
  b = np.array([-1.5, 0.4])
  x, m = quadratic.solve(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  want = np.linalg.solve(a, -b)
  np.testing.assert_allclose(np.asarray(x), want, rtol=1e-5)
  np.testing.assert_allclose(float(m), 0.5 * want @ a @ want + b @ want, rtol=1e-5)


def test_solve_without_previous_update_is_a_line_search() -> None:
  a = np.array([[4.0, 0.0], [0.0, 0.0]])  # δ₀ = 0 on the first step.
  x, m = quadratic.solve(jnp.asarray(a, jnp.float32), jnp.asarray([-2.0, 0.0]))
  np.testing.assert_allclose(np.asarray(x), [0.5, 0.0])
  np.testing.assert_allclose(float(m), -0.5)


@pytest.mark.parametrize("rho,want", [(0.9, 0.5), (0.5, 1.0), (0.1, 2.0), (float("nan"), 2.0),
                                      (-3.0, 2.0), (0.75, 1.0), (0.25, 1.0)])
def test_levenberg_marquardt_rule(rho: float, want: float) -> None:
  got = quadratic.adapt_damping(jnp.asarray(1.0), jnp.asarray(rho), 0.5, 1e-3, 1e3)
  np.testing.assert_allclose(float(got), want)


def test_damping_stays_in_bounds() -> None:
  low = quadratic.adapt_damping(jnp.asarray(1e-3), jnp.asarray(0.9), 0.5, 1e-3, 1e3)
  high = quadratic.adapt_damping(jnp.asarray(1e3), jnp.asarray(0.0), 0.5, 1e-3, 1e3)
  assert float(low) == pytest.approx(1e-3) and float(high) == pytest.approx(1e3)


def _two_steps(loss: str):
  """Two adaptive steps and, for the second, everything the oracle needs."""
  params, batch = _params(), _batch(loss)
  loss_fn = _loss_fn(loss)
  options = kfl.AdaptiveOptions(damping_every=1, damping_decay=0.5)
  common = dict(damping=0.1, stats_every=1, inverse_every=1, estimator="exact", seed=3)
  tx = kfl.scale_by_kfac(loss_fn, batch, adaptive=options, **common)
  plain = kfl.scale_by_kfac(loss_fn, batch, **common)  # Δ = -(its output).
  grad = jax.grad(loss_fn)
  state, plain_state = tx.init(params), plain.init(params)
  out, state = jax.jit(tx.update)(grad(params, batch), state, params, batch=batch)
  _, plain_state = plain.update(grad(params, batch), plain_state, params, batch=batch)
  params1 = optax.apply_updates(params, jax.tree.map(jnp.negative, out))
  g1 = grad(params1, batch)
  damping1 = float(state.adaptive.damping)
  plain = kfl.scale_by_kfac(loss_fn, batch, **(common | dict(damping=damping1)))
  direction, _ = plain.update(g1, plain_state, params1, batch=batch)
  out2, state2 = jax.jit(tx.update)(g1, state, params1, batch=batch)
  return params1, batch, g1, direction, state, state2, out2, damping1


def test_adaptive_step_is_the_model_minimizer() -> None:
  loss = "softmax"
  params1, batch, g1, direction, state, state2, out2, damping1 = _two_steps(loss)
  assert damping1 != 0.1  # Adapted after the first step (ρ is never in [1/4, 3/4] here)
  delta = -_flat(direction)  # Δ = -F̂⁻¹ g, with the damping of the second step.
  prev = _flat(state.adaptive.previous)
  g = _flat(g1)
  curv = _gauss_newton(loss, params1, batch) + damping1 * np.eye(g.size)
  vs = np.stack([delta, prev])
  x = np.linalg.solve(vs @ curv @ vs.T, -(vs @ g))
  np.testing.assert_allclose([float(state2.adaptive.alpha), float(state2.adaptive.mu)], x,
                             rtol=2e-3)
  step = x[0] * delta + x[1] * prev
  np.testing.assert_allclose(-_flat(out2), step, rtol=2e-3, atol=1e-6)
  model = 0.5 * step @ curv @ step + g @ step
  moved = ravel_pytree(params1)[1](_flat(params1) + step)
  loss_fn = _loss_fn(loss)
  rho = (float(loss_fn(moved, batch)) - float(loss_fn(params1, batch))) / model
  np.testing.assert_allclose(float(state2.adaptive.rho), rho, rtol=5e-3)
  want = damping1 * (0.5 if rho > 0.75 else 2.0 if rho < 0.25 else 1.0)
  np.testing.assert_allclose(float(state2.adaptive.damping), want, rtol=1e-6)


def test_kfac_adaptive_trains_under_jit_and_inject_hyperparams() -> None:
  params, batch = _params(), _batch("softmax")
  loss_fn = _loss_fn("softmax")
  tx = optax.inject_hyperparams(kfl.kfac, static_args="loss_fn")(
      loss_fn, batch, learning_rate=1.0, kl_clip=None, momentum=None, noise_scaling=None,
      adaptive=kfl.AdaptiveOptions())
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    l, g = jax.value_and_grad(loss_fn)(p, batch)
    u, s = tx.update(g, s, p, batch=batch)
    return optax.apply_updates(p, u), s, l

  losses = []
  for _ in range(8):
    params, state, l = step(params, state)
    losses.append(float(l))
  assert losses[-1] < 0.5 * losses[0]
  assert all(np.isfinite(losses))


@pytest.mark.parametrize("kwargs,match", [
    (dict(kl_clip=1e-3, learning_rate=0.3), "kl_clip=None"),
    (dict(damping=optax.constant_schedule(0.1)), "not a schedule"),
])
def test_scale_by_kfac_rejects_conflicting_settings(kwargs, match: str) -> None:
  batch = _batch("softmax")
  args = dict(damping=0.1) | kwargs
  with pytest.raises(ValueError, match=match):
    kfl.scale_by_kfac(_loss_fn("softmax"), batch, adaptive=kfl.AdaptiveOptions(), **args)


def test_kfac_adaptive_needs_no_clip_and_no_momentum() -> None:
  with pytest.raises(ValueError, match="momentum=None"):
    kfl.kfac(_loss_fn("softmax"), _batch("softmax"), adaptive=kfl.AdaptiveOptions())
  with pytest.raises(ValueError, match="noise_scaling=None"):
    kfl.kfac(_loss_fn("softmax"), _batch("softmax"), 1.0, kl_clip=None, momentum=None,
             adaptive=kfl.AdaptiveOptions())


@pytest.mark.parametrize("field,value", [("damping_every", 0), ("damping_decay", 1.0),
                                         ("min_damping", 0.0), ("batch_fraction", 1.5)])
def test_adaptive_options_validate(field: str, value: float) -> None:
  with pytest.raises(ValueError, match=field):
    kfl.AdaptiveOptions(**{field: value})


def test_masked_parameters_are_refused() -> None:
  params, batch = _params(), _batch("softmax")
  tx = optax.masked(kfl.scale_by_kfac(_loss_fn("softmax"), batch, damping=0.1,
                                      adaptive=kfl.AdaptiveOptions(), sample_params=params),
                    {"w1": True, "b1": True, "w2": False, "b2": False})
  with pytest.raises(ValueError, match="optax.masked"):
    tx.init(params)
