"""Flax's training APIs drive ``kfl.kfac`` like the functional loop.

``nnx.Optimizer`` initializes its transformation on the model's state of
``nnx.Param`` variables and updates it with their plain values
(``nnx.as_pure``). K-FAC names its layers (the keys of its state) from the
parameters' paths, so both must name them alike (a ``Variable`` adds a
``.value`` key of its own); the oracle is the same optimizer run on plain
arrays. Linen's ``TrainState.apply_gradients`` passes no ``batch``: the
README's recipe calls ``tx.update`` itself.
"""

from __future__ import annotations

from flax import nnx
from flax.training import train_state
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_lite as kfl

BATCH = {"x": jax.random.normal(jax.random.key(1), (16, 4)), "y": jnp.arange(16) % 3}
STEPS = 4


class Net(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.l2(jnp.tanh(self.l1(x)))


def _model_loss(model: Net, batch: dict[str, jax.Array]) -> jax.Array:
  return kfl.losses.softmax_cross_entropy(model(batch["x"]), batch["y"])


def test_nnx_optimizer_steps_equal_the_functional_loop():
  model = Net(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p, batch):
    return _model_loss(nnx.merge(graphdef, p), batch)

  tx = kfl.kfac(loss_fn, BATCH, stats_every=1, inverse_every=2)
  # The oracle: the same transformation on plain arrays.
  plain = nnx.as_pure(params)
  state = tx.init(plain)

  @jax.jit
  def functional_step(p, s):
    grads = jax.grad(loss_fn)(p, BATCH)
    updates, s = tx.update(grads, s, p, batch=BATCH)
    return optax.apply_updates(p, updates), s

  for _ in range(STEPS):
    plain, state = functional_step(plain, state)

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(m, opt):
    grads = nnx.grad(_model_loss)(m, BATCH)
    opt.update(m, grads, batch=BATCH)

  losses = []
  for _ in range(STEPS):
    losses.append(float(_model_loss(model, BATCH)))
    nnx_step(model, optimizer)
  assert losses[-1] < losses[0], losses
  got = nnx.as_pure(nnx.state(model, nnx.Param))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_layer_names_ignore_the_variable_wrapper():
  model = Net(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p, batch):
    return _model_loss(nnx.merge(graphdef, p), batch)

  wrapped = {l.name for l in kfl.find_layers(loss_fn, params, BATCH)}
  plain = {l.name for l in kfl.find_layers(loss_fn, nnx.as_pure(params), BATCH)}
  assert wrapped == plain == {"['l1']['kernel']", "['l2']['kernel']"}


def test_train_state_recipe_of_the_readme():
  model = nn.Dense(3)
  params = model.init(jax.random.key(0), BATCH["x"])["params"]

  def loss_fn(p, batch):
    return kfl.losses.softmax_cross_entropy(model.apply({"params": p}, batch["x"]), batch["y"])

  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=kfl.kfac(loss_fn, BATCH))
  grads = jax.grad(loss_fn)(state.params, BATCH)
  with np.testing.assert_raises_regex(ValueError, "batch=batch"):
    state.apply_gradients(grads=grads)

  @jax.jit
  def step(state):
    grads = jax.grad(loss_fn)(state.params, BATCH)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, batch=BATCH)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)

  losses = []
  for _ in range(STEPS):
    losses.append(float(loss_fn(state.params, BATCH)))
    state = step(state)
  assert losses[-1] < losses[0], losses
  assert int(state.step) == STEPS
