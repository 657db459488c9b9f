"""The optimizer state can be donated to a jitted train step.

``jax.jit(train_step, donate_argnums=(0, 1))`` (parameters and optimizer
state) is how a training loop lets XLA update them in place. XLA refuses a
call that donates one buffer twice, so no two leaves of the state (and no
state leaf and parameter) may share a buffer; this checks every state
``init`` builds, and runs donated steps on the configurations that build
different state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl


def _params() -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": jax.random.normal(k1, (4, 8)) * 0.5, "b1": jnp.zeros(8),
          "w2": jax.random.normal(k2, (8, 3)) * 0.5}


def _loss(params: dict[str, jax.Array], batch: dict[str, jax.Array]) -> jax.Array:
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  return kfl.losses.softmax_cross_entropy(h @ params["w2"], batch["y"])


BATCH = {"x": jax.random.normal(jax.random.key(1), (16, 4)),
         "y": jnp.arange(16) % 3}
NO_STEP_SIZE = dict(kl_clip=None, momentum=None, noise_scaling=None, learning_rate=1.0)
CONFIGS = {
    "kfac default": lambda: kfl.kfac(_loss, BATCH),
    "no noise scaling, weight decay": lambda: kfl.kfac(_loss, BATCH, noise_scaling=None,
                                                       weight_decay=1e-4),
    "graft adam": lambda: kfl.kfac(_loss, BATCH, 1e-3, graft="adam"),
    "adaptive": lambda: kfl.kfac(_loss, BATCH, adaptive=kfl.AdaptiveOptions(), **NO_STEP_SIZE),
    "ekfac, diagnostics": lambda: kfl.kfac(
        _loss, BATCH, inverses=kfl.InverseOptions("ekfac"),
        estimator=kfl.EstimatorOptions(diagnostics=True)),
    "accumulate": lambda: kfl.accumulate(kfl.kfac(
        _loss, BATCH, estimator=kfl.EstimatorOptions(accumulate=True)), 2),
}


def _buffers(tree: Any) -> list[int]:
  return [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree)
          if isinstance(leaf, jax.Array)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_shares_no_buffer_and_donated_steps_run(name):
  tx, params = CONFIGS[name](), _params()
  state = tx.init(params)
  buffers = _buffers((params, state))
  assert len(buffers) == len(set(buffers)), f"{name}: state leaves share a buffer"

  @jax.jit
  def loss_and_grad(p):
    return jax.value_and_grad(_loss)(p, BATCH)

  def step(p, s):
    loss, grads = loss_and_grad(p)
    updates, s = tx.update(grads, s, p, batch=BATCH)
    return optax.apply_updates(p, updates), s, loss

  donated = jax.jit(step, donate_argnums=(0, 1))
  losses = []
  for _ in range(4):
    params, state, loss = donated(params, state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses


def test_masked_placeholder_state_shares_no_buffer():
  """Inside ``optax.masked`` the masked-out branch is initialized on
  placeholders; that state must be donatable too."""
  params = _params()
  mask = {"w1": True, "b1": True, "w2": False}
  tx = optax.masked(kfl.scale_by_kfac(_loss, BATCH, damping=1e-3, sample_params=params), mask)
  buffers = _buffers((params, tx.init(params)))
  assert len(buffers) == len(set(buffers))
