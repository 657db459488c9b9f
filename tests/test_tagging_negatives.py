"""What must not become a (wrong) Kronecker layer, and the errors.

Activation × activation products (attention scores), tied weights, weights
read by a penalty, scalars and unused parameters; a loss that registers no
predictive distribution, or two.
"""

from __future__ import annotations

import functools
from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from helpers import path_name
from _model_forms import nnx_split
from _tagging_cases import (
    B, DICT_MLP_WANT, D_H, D_IN, D_OUT, T, check_case, class_batch, dense, dict_mlp_loss,
    dict_mlp_params, normal, randint, rms, xent)


# ----------------------------------------------------------------------------
# 1. Negatives: what must not become a (wrong) Kronecker layer.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("scores", ["batched_swapaxes", "einsum", "flat_k_transpose"])
def test_attention_activation_products_are_not_layers(scores: str):
  d_k, classes = 4, D_OUT
  params = {"wq": normal(1, D_IN, d_k), "wk": normal(2, D_IN, d_k),
            "wv": normal(3, D_IN, d_k), "wo": normal(4, d_k, classes)}

  def loss_fn(p, b):
    x = b["x"]
    q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
    if scores == "batched_swapaxes":
      s = q @ jnp.swapaxes(k, -1, -2)
    elif scores == "einsum":
      s = jnp.einsum("btd,bsd->bts", q, k)
    else:  # 2-D activations: literally q @ k.T (mixes rows, still not a layer)
      s4 = (q.reshape(-1, d_k) @ k.reshape(-1, d_k).T).reshape(B, T, B, T)
      s = s4[jnp.arange(B), :, jnp.arange(B), :]  # the per-example blocks
    attn = jax.nn.softmax(s / np.sqrt(d_k), axis=-1)
    ctx = attn @ v
    return xent(ctx @ p["wo"], b)

  check_case(loss_fn, params, class_batch(seq=True, classes=classes),
             [dense("['wq']", None, D_IN, d_k), dense("['wk']", None, D_IN, d_k),
              dense("['wv']", None, D_IN, d_k), dense("['wo']", None, d_k, classes)])


def _tied_note(note: str) -> bool:
  return "tied" in note or "shared" in note


def test_tied_weight_autoencoder():
  """h = x @ W; out = h @ W.T: W is used twice, never a dense layer."""
  params = {"w": normal(1, D_IN, D_H), "b": normal(2, D_H)}

  def loss_fn(p, b):
    h = jnp.tanh(b["x"] @ p["w"] + p["b"])
    return kfl.losses.squared_error(h @ p["w"].T, b["x"])

  layers = check_case(loss_fn, params, {"x": normal(100, B, D_IN)},
                      [rms("['w']"), rms("['b']")])
  by_name = {l.name: l for l in layers}
  assert _tied_note(by_name["['w']"].note), by_name["['w']"].note


@pytest.mark.parametrize("lookup", ["gather", "one_hot_matmul", "take"])
def test_tied_embedding_reused_as_output_projection(lookup: str):
  vocab, d = 6, 4
  params = {"embed": normal(1, vocab, d), "wh": normal(2, d, d), "bh": normal(3, d)}
  batch = {"tok": randint(5, (B, T), vocab), "y": randint(6, (B, T), vocab)}

  def loss_fn(p, b):
    if lookup == "gather":
      e = p["embed"][b["tok"]]
    elif lookup == "take":
      e = jnp.take(p["embed"], b["tok"], axis=0)
    else:
      e = jax.nn.one_hot(b["tok"], vocab) @ p["embed"]
    h = jnp.tanh(e @ p["wh"] + p["bh"])
    return xent(h @ p["embed"].T, b)

  layers = check_case(loss_fn, params, batch,
                      [rms("['embed']"), dense("['wh']", "['bh']", d, d)])
  note = {l.name: l.note for l in layers}["['embed']"]
  assert _tied_note(note), note


def test_output_projection_shared_by_two_heads():
  """The same W applied to two activations is one layer with two uses (its
  statistics summed; values checked in test_weight_sharing.py)."""
  params = {"w1": normal(1, D_IN, D_H), "w2": normal(2, D_IN, D_H),
            "out": normal(3, D_H, D_OUT)}

  def loss_fn(p, b):
    h1, h2 = jnp.tanh(b["x"] @ p["w1"]), jnp.tanh(b["x"] @ p["w2"])
    return xent(h1 @ p["out"] + h2 @ p["out"], b)

  layers = check_case(loss_fn, params, class_batch(),
                      [dense("['w1']", None, D_IN, D_H),
                       dense("['w2']", None, D_IN, D_H), dense("['out']", None, D_H, D_OUT)])
  out = {l.name: l for l in layers}["['out']"]
  assert len(out.matches) == 2 and "shared by 2 uses" in out.note


PENALTIES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "square_pow": lambda w: jnp.sum(w ** 2),
    "jnp_square": lambda w: jnp.sum(jnp.square(w)),
    "vdot": lambda w: jnp.vdot(w, w),
    "norm": jnp.linalg.norm,
}


@pytest.mark.parametrize("penalty", sorted(PENALTIES))
def test_weight_in_l2_penalty_keeps_its_block(penalty: str):
  """A penalty is off the path to the logits: it adds no Fisher, so the
  penalized weight and its bias stay one dense layer (a parameter used only
  by the penalty gets the fallback, saying why)."""
  reg = PENALTIES[penalty]
  params = dict(dict_mlp_params(), aux=normal(9, 3, 2))

  def loss_fn(p, b):
    return dict_mlp_loss(p, b) + 1e-4 * reg(p["w1"]) + 1e-4 * reg(p["aux"])

  check_case(loss_fn, params, class_batch(),
             DICT_MLP_WANT + [rms("['aux']", note="off the path to the registered")])


def test_penalized_bias_stays_the_bias():
  def loss_fn(p, b):
    return dict_mlp_loss(p, b) + 1e-4 * jnp.sum(p["b2"] ** 2)

  check_case(loss_fn, dict_mlp_params(), class_batch(), DICT_MLP_WANT)


@pytest.mark.parametrize("how", ["divide", "multiply_exp"])
def test_scalar_temperature_gets_rms_fallback(how: str):
  params = dict(dict_mlp_params(), temp=jnp.asarray(1.5, jnp.float32))

  def loss_fn(p, b):
    h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    logits = logits / p["temp"] if how == "divide" else logits * jnp.exp(p["temp"])
    return xent(logits, b)

  check_case(loss_fn, params, class_batch(), DICT_MLP_WANT + [rms("['temp']")])


def test_unused_parameter_is_rms_not_used():
  params = dict(dict_mlp_params(), unused=normal(9, 3, 2))
  check_case(dict_mlp_loss, params, class_batch(),
             DICT_MLP_WANT + [rms("['unused']", note="not used")])


def test_unused_nnx_submodule_is_rms_not_used():
  class WithSpare(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.l1 = nnx.Linear(D_IN, D_OUT, rngs=rngs)
      self.spare = nnx.Linear(D_IN, D_OUT, use_bias=False, rngs=rngs)

    def __call__(self, x):
      return self.l1(x)

  graphdef, state = nnx_split(lambda: WithSpare(nnx.Rngs(0)))
  n = functools.partial(path_name, state)
  check_case(lambda s, b: xent(nnx.merge(graphdef, s)(b["x"]), b), state,
             class_batch(),
             [dense(n("l1", "kernel"), n("l1", "bias"), D_IN, D_OUT),
              rms(n("spare", "kernel"), note="not used")])


# ----------------------------------------------------------------------------
# 2. Errors.
# ----------------------------------------------------------------------------


def _plain_jax_loss(p, b):
  logits = jnp.tanh(b["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, b["y"][:, None], axis=-1))


def _two_losses_loss(p, b):
  logits = jnp.tanh(b["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  return xent(logits, b) + kfl.losses.squared_error(logits, jnp.zeros_like(logits))


def _same_loss_twice(p, b):
  logits = jnp.tanh(b["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  return xent(logits, b) + 0.5 * xent(2.0 * logits, b)


def test_loss_without_registered_distribution_raises():
  params, batch = dict_mlp_params(), class_batch()
  with pytest.raises(ValueError, match=r"kfac_jax_lite\.losses"):
    kfl.find_layers(_plain_jax_loss, params, batch)
  with pytest.raises(ValueError, match=r"kfac_jax_lite\.losses"):
    kfl.estimate_curvature(_plain_jax_loss, params, batch, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"kfac_jax_lite\.losses"):
    kfl.scale_by_kfac(_plain_jax_loss, batch, damping=1e-3).init(params)


@pytest.mark.parametrize("loss_fn", [_two_losses_loss, _same_loss_twice],
                         ids=["two_functions", "same_function_twice"])
def test_loss_with_two_registered_distributions_raises(loss_fn):
  params, batch = dict_mlp_params(), class_batch()
  with pytest.raises(ValueError, match=r"kfac_jax_lite\.losses"):
    kfl.find_layers(loss_fn, params, batch)
  with pytest.raises(ValueError):
    kfl.scale_by_kfac(loss_fn, batch, damping=1e-3).init(params)
