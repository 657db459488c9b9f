"""Layers inside jit / checkpoint / remat, and custom_jvp / custom_vjp activations.

The layer records of :func:`kfl.find_layers` are the same as unwrapped
(see :mod:`_tagging_cases`), and so are the factors and the updates.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import pytest

import kfac_jax_lite as kfl
from _model_forms import dense_layer, my_softplus, my_tanh
from _tagging_cases import (
    DICT_MLP_WANT, assert_trees_close, kfac_update, check_case, class_batch, dict_mlp_params,
    xent)


WRAPPERS: dict[str, Callable[[Callable[..., jax.Array]], Callable[..., jax.Array]]] = {
    "jit": jax.jit,
    "checkpoint": jax.checkpoint,
    "remat": jax.remat,
    "checkpoint_policy": functools.partial(
        jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable),
    "jit_of_checkpoint": lambda f: jax.jit(jax.checkpoint(f)),
}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu,
    "custom_jvp": my_softplus, "custom_vjp": my_tanh,
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_layers_inside_wrappers(wrapper: str):
  layer = WRAPPERS[wrapper](dense_layer)

  def loss_fn(p, b):
    h = jax.nn.relu(layer(p["w1"], p["b1"], b["x"]))
    return xent(layer(p["w2"], p["b2"], h), b)

  check_case(loss_fn, dict_mlp_params(), class_batch(), DICT_MLP_WANT)


@pytest.mark.parametrize("wrapper", ["jit", "checkpoint", "jit_of_checkpoint"])
def test_wrapped_layers_give_the_same_factors_and_updates(wrapper: str):
  """Factors and K-FAC updates do not change when layers are wrapped."""
  layer = WRAPPERS[wrapper](dense_layer)

  def wrapped(p, b):
    h = jax.nn.relu(layer(p["w1"], p["b1"], b["x"]))
    return xent(layer(p["w2"], p["b2"], h), b)

  def plain(p, b):
    return xent(jax.nn.relu(b["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"], b)

  params, batch = dict_mlp_params(), class_batch()
  key = jax.random.key(0)
  assert_trees_close(
      kfl.estimate_curvature(wrapped, params, batch, key=key, estimator="exact"),
      kfl.estimate_curvature(plain, params, batch, key=key, estimator="exact"),
      rtol=1e-5, atol=1e-7)
  assert_trees_close(kfac_update(wrapped, params, batch, 1e-3)[0],
                      kfac_update(plain, params, batch, 1e-3)[0],
                      rtol=1e-4, atol=1e-6)


def test_whole_model_inside_jit_and_checkpoint():
  @jax.jit
  @jax.checkpoint
  def model(p, x):
    return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  check_case(lambda p, b: xent(model(p, b["x"]), b), dict_mlp_params(),
             class_batch(), DICT_MLP_WANT)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_activations(act: str):
  f = ACTIVATIONS[act]

  def loss_fn(p, b):
    return xent(f(b["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"], b)

  check_case(loss_fn, dict_mlp_params(), class_batch(), DICT_MLP_WANT)


def test_layer_in_jit_activation_in_custom_jvp_mixed():
  """A jitted layer followed by a custom_jvp activation, inside a checkpoint."""
  layer = jax.jit(dense_layer)

  @jax.checkpoint
  def block(w, b, x):
    return my_softplus(layer(w, b, x))

  def loss_fn(p, b):
    return xent(layer(p["w2"], p["b2"], block(p["w1"], p["b1"], b["x"])), b)

  check_case(loss_fn, dict_mlp_params(), class_batch(), DICT_MLP_WANT)
