"""Grafting (Agarwal et al. 2020): one update's direction with another's norm, leaf by leaf."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_lite as kfl


def test_graft_takes_direction_from_one_and_norm_from_the_other():
  rng = np.random.default_rng(0)
  g = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=2), jnp.float32), "z": jnp.zeros(2)}
  direction = optax.scale(-3.0)  # any direction: here, minus the gradient
  magnitude = optax.scale_by_adam()
  tx = kfl.graft(direction, magnitude)
  state = tx.init(g)
  out, state = tx.update(g, state)
  adam, _ = magnitude.update(g, magnitude.init(g))
  for k in ("w", "b"):
    o, d, m = (np.asarray(t[k], np.float64) for t in (out, g, adam))
    np.testing.assert_allclose(np.linalg.norm(o), np.linalg.norm(m), rtol=1e-5)
    np.testing.assert_allclose(o / np.linalg.norm(o), -d / np.linalg.norm(d), rtol=1e-5)
  np.testing.assert_array_equal(out["z"], 0.0)  # no direction: no step


def test_graft_forwards_extra_args_to_both():
  seen = []

  def recorder() -> optax.GradientTransformationExtraArgs:
    def update(u, s, params=None, *, batch=None, **extra):
      seen.append(batch)
      return u, s
    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

  tx = kfl.graft(recorder(), recorder())
  p = {"w": jnp.ones(2)}
  jax.jit(lambda s: tx.update(p, s, p, batch=1.0, other=2)[0])(tx.init(p))
  assert len(seen) == 2
