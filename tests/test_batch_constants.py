"""A batch may carry per-batch constants beside its examples.

The usual one is the dropout key (``batch["rng"] = jax.random.key(step)``):
a PRNG key (typed, or a raw ``uint32[2]``), or any scalar, is one value for
the whole batch. The
default ``kfl.kfac`` takes leading fractions of the batch (statistics on
half, diagnostics on a quarter of that) and noise scaling reads the number of
examples from it: both must look at the per-example leaves only (the key
once made noise scaling fail, and would have put the statistics on the whole
batch).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_lite as kfl
from kfac_jax_lite.noise_scaling import _batch_size  # pylint: disable=protected-access
from kfac_jax_lite.step.estimate import batch_examples, leading_fraction

N = 32


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dropout(0.2, deterministic=False)(nn.relu(nn.Dense(16)(x)))
    return nn.Dense(3)(h)


def _batch(seed: int) -> dict[str, jax.Array]:
  return {"x": jax.random.normal(jax.random.key(0), (N, 4)), "y": jnp.arange(N) % 3,
          "rng": jax.random.key(seed), "temperature": jnp.float32(1.0)}


def test_constants_are_not_examples():
  batch = _batch(0)
  assert batch_examples(batch) == N
  half = leading_fraction(batch, 0.5, "EstimatorOptions.batch_fraction")
  assert half["x"].shape == (N // 2, 4) and half["y"].shape == (N // 2,)
  assert half["rng"] is batch["rng"] and half["temperature"] is batch["temperature"]
  assert _batch_size(batch, micro_batches=2) == 2 * N
  legacy = {**batch, "rng": jax.random.PRNGKey(0)}  # a raw uint32[2] key
  assert batch_examples(legacy) == N and _batch_size(legacy, micro_batches=1) == N
  assert leading_fraction(legacy, 0.5, "f")["rng"] is legacy["rng"]


def test_default_kfac_trains_with_a_dropout_key_in_the_batch():
  net = _Net()
  params = net.init(jax.random.key(1), _batch(0)["x"])["params"]

  def loss_fn(p, b):
    logits = net.apply({"params": p}, b["x"] / b["temperature"], rngs={"dropout": b["rng"]})
    return kfl.losses.softmax_cross_entropy(logits, b["y"])

  tx = kfl.kfac(loss_fn, _batch(0))
  state = tx.init(params)

  @jax.jit
  def step(p, s, b):
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    updates, s = tx.update(grads, s, p, batch=b)
    return optax.apply_updates(p, updates), s, loss

  losses = []
  for i in range(12):
    params, state, loss = step(params, state, _batch(i))
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
