"""Short K-FAC training runs of a tiny CNN and a tiny token model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl
from _family_oracles import flax_params, normal


# ----------------------------------------------------------------------------
# Short training runs.
# ----------------------------------------------------------------------------


class TinyCNN(nn.Module):
  """Conv -> relu -> flatten -> dense."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    return nn.Dense(3)(h.reshape(x.shape[0], -1))


class TinyTokenModel(nn.Module):
  """Embed -> tanh -> dense over the vocabulary."""

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    return nn.Dense(8)(jnp.tanh(nn.Embed(8, 6)(ids)))


def _train(model: nn.Module, inputs: jax.Array, labels: jax.Array,
           kinds: dict[str, str], steps: int = 20) -> list[float]:
  """Full-batch K-FAC; returns the loss before each step.

  ``kinds`` maps layer names to the kind ``find_layers`` must report.
  """
  params = flax_params(model, inputs, np.random.default_rng(0), 0.3)
  batch = {"x": inputs, "y": labels}

  def loss_fn(p, b):
    return kfl.losses.softmax_cross_entropy(model.apply({"params": p}, b["x"]), b["y"])

  found = {l.name: l.kind for l in kfl.find_layers(loss_fn, params, batch)}
  assert {k: found[k] for k in kinds} == kinds, found
  tx = kfl.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2, kl_clip=1e-2,
                inverse_every=5)

  @jax.jit
  def step(p, state, b):
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    updates, state = tx.update(grads, state, p, batch=b)
    return optax.apply_updates(p, updates), state, loss

  state, losses = tx.init(params), []
  for _ in range(steps):
    params, state, loss = step(params, state, batch)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  return losses


@pytest.mark.slow
def test_training_tiny_cnn_and_token_model():
  rng = np.random.default_rng(9)
  images = normal(rng, 16, 6, 6, 1)
  proj = rng.standard_normal((36, 3))
  labels = jnp.asarray(np.argmax(np.asarray(images).reshape(16, -1) @ proj, -1))
  cnn = _train(TinyCNN(), images, labels, {"['Conv_0']['kernel']": "conv",
                                            "['Dense_0']['kernel']": "dense"})
  assert cnn[-1] < 0.5 * cnn[0], cnn

  ids = jnp.asarray(rng.integers(0, 8, (8, 6)), jnp.int32)
  tok = _train(TinyTokenModel(), ids, (ids + 1) % 8,
               {"['Embed_0']['embedding']": "embedding",
                "['Dense_0']['kernel']": "dense"})
  assert tok[-1] < 0.5 * tok[0], tok
