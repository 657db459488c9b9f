"""Convolutions that are other layers: whole-input, grouped, per-example under vmap.

A conv whose kernel covers the whole input is a dense layer (and, on one
example, the exact Fisher block); grouped and depthwise convolutions get the
rms fallback; Equinox-style per-example code under ``jax.vmap`` gives the
layers and factors of the batched forms.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from _family_oracles import (
    HIGHEST, assert_close, normal, exact_factors, kernel_matrix, library_factors)


# ----------------------------------------------------------------------------
# 1. A conv whose kernel covers the whole input is a dense layer.
# ----------------------------------------------------------------------------

_DN2 = ("NHWC", "HWIO", "NHWC")


def _whole_input_conv(kernel: jax.Array, bias: jax.Array, x: jax.Array) -> jax.Array:
  """VALID conv of ``[B, 3, 3, C]`` with a ``3x3`` kernel, plus bias -> ``[B, O]``.

  The bias is added to the conv output itself (before the reshape), where
  the tagger looks for it.
  """
  s = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                   dimension_numbers=_DN2, precision=HIGHEST)
  assert s.shape[1:3] == (1, 1)
  return (s + bias.reshape(1, 1, 1, -1)).reshape(x.shape[0], -1)


def test_whole_input_conv_equals_dense_layer():
  rng = np.random.default_rng(3)
  x = normal(rng, 3, 3, 3, 2)
  batch = {"x": x, "y": jnp.asarray([0, 2, 1])}
  conv_params = {"kernel": normal(rng, 3, 3, 2, 4, scale=0.5),
                 "bias": normal(rng, 4, scale=0.5),
                 "w2": normal(rng, 4, 3), "b2": normal(rng, 3, scale=0.5)}
  # Channel-major flattening of the input and the matching weight matrix.
  flat = lambda xb: jnp.transpose(xb, (0, 3, 1, 2)).reshape(xb.shape[0], -1)
  dense_params = dict(conv_params, kernel=jnp.asarray(
      kernel_matrix(conv_params["kernel"], "HWIO"), jnp.float32))

  def conv_loss(p, b):
    h = jnp.tanh(_whole_input_conv(p["kernel"], p["bias"], b["x"]))
    return kfl.losses.softmax_cross_entropy(h @ p["w2"] + p["b2"], b["y"])

  def dense_loss(p, b):
    h = jnp.tanh(jnp.dot(flat(b["x"]), p["kernel"], precision=HIGHEST) + p["bias"])
    return kfl.losses.softmax_cross_entropy(h @ p["w2"] + p["b2"], b["y"])

  layers = {l.name: l for l in kfl.find_layers(conv_loss, conv_params, batch)}
  assert layers["['kernel']"].kind == "conv" and layers["['w2']"].kind == "dense"
  assert layers["['kernel']"].bias_path is not None
  np.testing.assert_allclose(  # the two models are the same function
      conv_loss(conv_params, batch), dense_loss(dense_params, batch), rtol=1e-5)
  conv_f = library_factors(conv_loss, conv_params, batch, "conv_approximation")
  dense_f = exact_factors(dense_loss, dense_params, batch)
  for name in ("['kernel']", "['w2']"):
    for k in ("A", "G"):
      assert_close(conv_f["expand"][name][k], dense_f[name][k])
      assert_close(conv_f["reduce"][name][k], dense_f[name][k])  # T = 1
  a = np.concatenate([np.asarray(flat(x), np.float64), np.ones((3, 1))], 1)
  assert_close(conv_f["expand"]["['kernel']"]["A"], a.T @ a / 3)


def test_single_example_last_layer_conv_is_exact_fisher_block():
  """One example, one location: ``F = (a a^T) ⊗ F_z`` exactly."""
  rng = np.random.default_rng(4)
  x = normal(rng, 1, 3, 3, 2)
  params = {"kernel": normal(rng, 3, 3, 2, 3, scale=0.5),
            "bias": normal(rng, 3, scale=0.5)}
  batch = {"x": x, "y": jnp.asarray([1])}

  def logits_of(kernel, bias):
    return _whole_input_conv(kernel, bias, x)[0]

  def loss_fn(p, b):
    z = _whole_input_conv(p["kernel"], p["bias"], b["x"])
    return kfl.losses.softmax_cross_entropy(z, b["y"])

  jk, jb = jax.jacrev(logits_of, argnums=(0, 1))(params["kernel"], params["bias"])
  # d z_c / d theta with theta = [W; b] row-major, W[(i, h, w), o].
  jk = np.transpose(np.asarray(jk, np.float64), (0, 3, 1, 2, 4)).reshape(3, -1)
  jac = np.concatenate([jk, np.asarray(jb, np.float64)], 1)
  p = np.asarray(jax.nn.softmax(logits_of(params["kernel"], params["bias"])),
                 np.float64)
  fisher = jac.T @ (np.diag(p) - np.outer(p, p)) @ jac

  got = exact_factors(loss_fn, params, batch)["['kernel']"]
  assert got["A"].shape == (19, 19) and got["G"].shape == (3, 3)
  assert_close(np.kron(np.asarray(got["A"], np.float64),
                        np.asarray(got["G"], np.float64)), fisher)


# ----------------------------------------------------------------------------
# 2. Grouped convolutions get the rms fallback.
# ----------------------------------------------------------------------------


class FlaxDepthwise(nn.Module):
  """Depthwise ``nn.Conv`` (``feature_group_count = channels``) -> dense."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = nn.Conv(4, (3, 3), feature_group_count=4)(x)
    return nn.Dense(3)(s.reshape(x.shape[0], -1))


@pytest.mark.parametrize("flavor", ["lax_groups2", "flax_depthwise"])
def test_grouped_conv_gets_rms_fallback(flavor: str):
  x = jax.ShapeDtypeStruct((2, 4, 4, 4), jnp.float32)
  batch = {"x": x, "y": jax.ShapeDtypeStruct((2,), jnp.int32)}
  if flavor == "lax_groups2":
    params = {"kernel": jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32),
              "head": jax.ShapeDtypeStruct((2 * 2 * 4, 3), jnp.float32)}

    def loss_fn(p, b):
      s = jax.lax.conv_general_dilated(b["x"], p["kernel"], (1, 1), "VALID",
                                       dimension_numbers=_DN2, feature_group_count=2)
      return kfl.losses.softmax_cross_entropy(
          s.reshape(2, -1) @ p["head"], b["y"])
    kernel, head = "['kernel']", "['head']"
  else:
    model = FlaxDepthwise()
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(
        x.shape)))["params"]

    def loss_fn(p, b):
      return kfl.losses.softmax_cross_entropy(
          model.apply({"params": p}, b["x"]), b["y"])
    kernel, head = "['Conv_0']['kernel']", "['Dense_0']['kernel']"
  layers = {l.name: l for l in kfl.find_layers(loss_fn, params, batch)}
  assert layers[kernel].kind == "rms", layers[kernel]
  assert "grouped" in layers[kernel].note, layers[kernel].note
  assert layers[head].kind == "dense"
  leaves = jax.tree_util.tree_leaves_with_path(params)
  owned = [l.weight_path for l in layers.values()] + [
      l.bias_path for l in layers.values() if l.bias_path is not None]
  assert sorted(map(jax.tree_util.keystr, owned)) == sorted(
      jax.tree_util.keystr(p) for p, _ in leaves)


def test_vmapped_row_lookup_and_vmapped_conv_bias_equal_batched_forms():
  """Equinox-style per-example code under ``jax.vmap`` (a gather of a whole
  row by ``(id, 0)``; a conv whose bias is added after a unit-axis round
  trip) gives the same layers and factors as the batched forms."""
  rng = np.random.default_rng(3)
  params = {"table": jnp.asarray(rng.normal(size=(7, 4)), jnp.float32),
            "k": jnp.asarray(rng.normal(size=(3, 4, 2, 2)), jnp.float32),  # OIHW
            "kb": jnp.asarray(rng.normal(size=(3, 1, 1)), jnp.float32)}
  batch = {"tok": jnp.asarray(rng.integers(0, 7, (5, 3, 3))),
           "y": jnp.asarray(rng.integers(0, 3, 5))}

  def conv1(x, k):  # one example [C, H, W]
    return jax.lax.conv_general_dilated(x[None], k, (1, 1), "VALID")[0]

  def loss(vmapped):
    def fn(p, b):
      if vmapped:
        e = jax.vmap(jax.vmap(jax.vmap(lambda i: p["table"][i])))(b["tok"])
        h = jax.vmap(lambda x: conv1(x, p["k"]) + p["kb"])(jnp.moveaxis(e, -1, 1))
      else:
        e = p["table"][b["tok"]]
        h = jax.lax.conv_general_dilated(jnp.moveaxis(e, -1, 1), p["k"], (1, 1),
                                         "VALID") + p["kb"][None]
      return kfl.losses.softmax_cross_entropy(jnp.mean(h, (2, 3)), b["y"])
    return fn

  kinds = [sorted((l.name, l.kind, l.bias_path is not None)
                  for l in kfl.find_layers(loss(v), params, batch)) for v in (True, False)]
  assert kinds[0] == kinds[1] == [("['k']", "conv", True), ("['table']", "embedding", False)]
  got = [kfl.estimate_curvature(loss(v), params, batch, key=jax.random.key(0),
                                estimator="exact") for v in (True, False)]
  for name in ("['k']", "['table']"):
    for f in ("A", "G"):
      np.testing.assert_allclose(got[0][name][f], got[1][name][f], rtol=1e-5, atol=1e-7)
