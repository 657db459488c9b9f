"""Staggered inverse refresh: every factor once per ``inverse_every`` steps.

With ``staggered_inverses=True`` each step refreshes a cost-balanced group of
single factors. Checked step by step: which inverses changed, that each
changed one equals the damped inverse of the current factor (π from the
trace norms of its block, written out in numpy), and that every factor is
refreshed exactly once per cycle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import kfac_jax_lite as kfl
from kfac_jax_lite import schedule
from kfac_jax_lite.tagging import tag, trace_loss

SIZES = (5, 7, 6, 3)
EVERY = 3
LAM = 0.1


def _params() -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  return {f"w{i}": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)
          for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))}


def _loss(p, b):
  h = b["x"]
  for i in range(len(SIZES) - 2):
    h = jnp.tanh(h @ p[f"w{i}"])
  return kfl.losses.softmax_cross_entropy(h @ p[f"w{len(SIZES) - 2}"], b["y"])


def _batch(seed: int) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(8, SIZES[0])), jnp.float32),
          "y": jnp.asarray(rng.integers(0, SIZES[-1], 8))}


def _damped_inverse(factors: dict[str, np.ndarray], key: str) -> np.ndarray:
  a, g = (np.asarray(factors[k], np.float64) for k in "AG")
  pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
  shift = {"A": pi * np.sqrt(LAM), "G": np.sqrt(LAM) / pi}[key]
  m = np.asarray(factors[key], np.float64)
  return np.linalg.inv(m + shift * np.eye(len(m)))


def test_staggered_refresh_covers_every_factor_once_per_cycle():
  params = _params()
  tx = kfl.scale_by_kfac(_loss, _batch(0), damping=LAM, ema_decay=0.5, inverse_every=EVERY,
                         estimator="exact", inverses=kfl.InverseOptions(staggered=True))
  update = jax.jit(tx.update)
  state = tx.init(params)
  all_keys = {(n, k) for n, f in state.factors.items() for k in f}
  refreshed: list[set[tuple[str, str]]] = []
  for step in range(1 + 2 * EVERY):
    prev = jax.device_get(state.inverses)
    _, state = update(jax.grad(_loss)(params, _batch(step)), state, params, batch=_batch(step))
    inv, fac = jax.device_get(state.inverses), jax.device_get(state.factors)
    changed = {(n, k) for n, k in all_keys if not np.array_equal(inv[n][k], prev[n][k])}
    for n, k in changed:
      np.testing.assert_allclose(inv[n][k], _damped_inverse(fac[n], k), rtol=2e-4, atol=1e-5)
    refreshed.append(changed)
  assert refreshed[0] == all_keys  # the first step computes everything
  for cycle in (refreshed[1:1 + EVERY], refreshed[1 + EVERY:]):
    assert all(c for c in cycle)
    assert sorted(k for c in cycle for k in c) == sorted(all_keys)  # each exactly once


def test_groups_are_balanced_per_factor():
  """The largest group is at most the largest single factor above the mean."""
  tagged = tag(trace_loss(_loss, _params(), _batch(0)))
  costs = schedule.factor_costs(tagged)
  groups = schedule.balanced_groups(costs, EVERY)
  loads = [sum(costs[k] for k in g) for g in groups]
  assert sorted(k for g in groups for k in g) == sorted(costs)
  assert max(loads) <= sum(costs.values()) / EVERY + max(costs.values())
