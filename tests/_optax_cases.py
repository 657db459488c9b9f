"""The tiny model, data, oracles and fixtures of the optax-contract tests.

A plain-JAX MLP (4 -> 8 -> 3, batch 8, softmax cross-entropy) keeps everything
fast; the oracles give the damped inverses and the K-FAC direction from a
state's factors in numpy.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl


Params = dict[str, dict[str, jax.Array]]
Batch = dict[str, jax.Array]
Tx = optax.GradientTransformationExtraArgs
Step = Callable[..., Any]

D_IN, D_HIDDEN, D_OUT, BATCH = 4, 8, 3, 8
LAYERS = ("['dense1']['kernel']", "['dense2']['kernel']")


# ----------------------------------------------------------------------------
# Model, data and shared helpers.
# ----------------------------------------------------------------------------


def mlp(params: Params, x: jax.Array) -> jax.Array:
  """Two dense layers with a tanh in between (``x @ kernel + bias``)."""
  h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  return h @ params["dense2"]["kernel"] + params["dense2"]["bias"]


def loss_fn(params: Params, batch: Batch) -> jax.Array:
  """Mean softmax cross-entropy of the MLP."""
  return kfl.losses.softmax_cross_entropy(mlp(params, batch["x"]), batch["y"])


def make_params(seed: int = 0, dtype: Any = jnp.float32) -> Params:
  """Random MLP parameters (non-zero biases, so that biases matter)."""
  rng = np.random.default_rng(seed)
  params = {
      "dense1": {"kernel": rng.normal(size=(D_IN, D_HIDDEN)) * 0.7,
                 "bias": rng.normal(size=(D_HIDDEN,)) * 0.1},
      "dense2": {"kernel": rng.normal(size=(D_HIDDEN, D_OUT)) * 0.7,
                 "bias": rng.normal(size=(D_OUT,)) * 0.1},
  }
  return jax.tree.map(lambda p: jnp.asarray(p, dtype), params)


def make_batch(seed: int = 1, n: int = BATCH, d_in: int = D_IN,
               dtype: Any = jnp.float32) -> Batch:
  """A random classification batch with integer labels."""
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(n, d_in)), dtype),
          "y": jnp.asarray(rng.integers(0, D_OUT, size=(n,)), jnp.int32)}


loss_jit = jax.jit(loss_fn)
grad_jit = jax.jit(jax.grad(loss_fn))


def find_state(state: Any, cls: type) -> Any:
  """The one ``cls`` (a state NamedTuple) inside an (optax-wrapped) state."""
  found = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda s: isinstance(s, cls))
           if isinstance(s, cls)]
  assert len(found) == 1, f"expected one {cls.__name__} in {state}"
  return found[0]


def kfac_state(state: Any) -> kfl.KfacState:
  """The :class:`kfl.KfacState` inside an (optax-wrapped) state."""
  return find_state(state, kfl.KfacState)


def assert_trees_equal(a: Any, b: Any) -> None:
  """Same structure and bit-identical leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_trees_close(a: Any, b: Any, rtol: float = 1e-5,
                       atol: float = 1e-6) -> None:
  """Same structure and numerically close leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol, atol=atol)


def trees_differ(a: Any, b: Any) -> bool:
  """Whether any pair of leaves differs."""
  return any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def all_finite(tree: Any) -> bool:
  """Whether every floating leaf is finite."""
  return all(np.all(np.isfinite(np.asarray(x, np.float64)))
             for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.floating))


def damped_inverses_oracle(a: np.ndarray, g: np.ndarray,
                           damping: float) -> tuple[np.ndarray, np.ndarray]:
  """Factored-Tikhonov inverses (Ba et al. eq. 3), numpy float64."""
  a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
  pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
  root = np.sqrt(damping)
  return (np.linalg.inv(a + pi * root * np.eye(a.shape[0])),
          np.linalg.inv(g + root / pi * np.eye(g.shape[0])))


def kfac_direction_oracle(factors: dict[str, dict[str, jax.Array]],
                          grads: Params, *, damping: float,
                          kl_clip: float | None = None,
                          learning_rate: float | None = None) -> Params:
  """KL-clipped ``A^-1 [gW; gb] G^-1`` for the MLP, numpy float64."""
  out, vg = {}, 0.0
  for name in grads:
    f = factors[f"['{name}']['kernel']"]
    a_inv, g_inv = damped_inverses_oracle(f["A"], f["G"], damping)
    gw = np.asarray(grads[name]["kernel"], np.float64)
    gb = np.asarray(grads[name]["bias"], np.float64)
    pre = a_inv @ np.concatenate([gw, gb[None]], axis=0) @ g_inv
    out[name] = {"kernel": pre[:-1], "bias": pre[-1]}
    vg += np.sum(pre[:-1] * gw) + np.sum(pre[-1] * gb)
  scale = 1.0
  if kl_clip is not None and vg > 0:
    scale = min(1.0, np.sqrt(kl_clip / vg) / learning_rate)
  return jax.tree.map(lambda x: x * scale, out)


def make_train_step(tx: Tx) -> Step:
  """Jitted ``(params, state, batch) -> (params, state, loss, updates)``."""

  @jax.jit
  def step(params: Params, state: Any,
           batch: Batch) -> tuple[Params, Any, jax.Array, Params]:
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, loss, updates

  return step


def make_update(tx: Tx) -> Step:
  """Jitted ``(grads, state, params, batch) -> (updates, state)``."""
  return jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))


@pytest.fixture(scope="module")
def params() -> Params:
  return make_params()


@pytest.fixture(scope="module")
def batch() -> Batch:
  return make_batch()


@pytest.fixture(scope="module")
def grads(params: Params, batch: Batch) -> Params:
  return grad_jit(params, batch)


SCHEDULE = optax.linear_schedule(0.1, 0.02, transition_steps=10)
KFAC_DAMPING = 1e-2
