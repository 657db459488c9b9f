"""Automatic layer detection across the ways users write models.

For every model form (Flax linen and nnx, Equinox-style weights stored
``(d_out, d_in)``, einsum / dot / matmul on 2-D and sequence inputs, plain and
nested dicts, abstract sample batches) the exact layer records of
:func:`kfl.find_layers` (see :mod:`_tagging_cases`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import pytest

import kfac_jax_lite as kfl
from helpers import path_name
from _model_forms import (
    EqxMLP, PRODUCTS, eqx_batched_loss, eqx_mlp, eqx_vmapped_loss, linen_case, nnx_case)
from _tagging_cases import (
    DICT_MLP_WANT, D_H, D_IN, D_OUT, Want, assert_partition, check_case, class_batch, dense,
    dict_mlp_loss, dict_mlp_params, dict_mlp_t_loss, normal, records, xent)


LINEN_WANT = [dense("['Dense_0']['kernel']", "['Dense_0']['bias']", D_IN, D_H),
              dense("['Dense_1']['kernel']", None, D_H, D_H),
              dense("['Dense_2']['kernel']", "['Dense_2']['bias']", D_H, D_OUT)]


def test_linen_mlp():
  loss_fn, params, batch = linen_case()
  check_case(loss_fn, params, batch, LINEN_WANT)


def test_linen_sequence_input():
  """nn.Dense on [B, T, d] inputs: still one layer per Dense."""
  loss_fn, params, _ = linen_case()  # Dense params do not depend on T
  check_case(loss_fn, params, class_batch(seq=True), LINEN_WANT)


def nnx_want(state: Any) -> list[Want]:
  n = functools.partial(path_name, state)
  return [dense(n("l1", "kernel"), n("l1", "bias"), D_IN, D_H),
          dense(n("l2", "kernel"), None, D_H, D_H),
          dense(n("l3", "kernel"), n("l3", "bias"), D_H, D_OUT)]


def test_nnx_split_merge():
  loss_fn, state, batch = nnx_case()
  check_case(loss_fn, state, batch, nnx_want(state))


def eqx_want(model: EqxMLP) -> list[Want]:
  n = functools.partial(path_name, model)
  bias = model.layers[0].bias is not None
  return [dense(n("layers", 0, "weight"), n("layers", 0, "bias") if bias else None,
                D_IN, D_H),
          dense(n("layers", 1, "weight"), None, D_H, D_H),
          dense(n("layers", 2, "weight"), n("layers", 2, "bias") if bias else None,
                D_H, D_OUT)]


def test_eqx_style_transposed_weights():
  model = eqx_mlp()
  want = eqx_want(model)
  assert want[0].name == ".layers[0].weight"  # keystr of a dataclass pytree
  check_case(eqx_batched_loss, model, class_batch(), want)


def test_eqx_style_vmapped_single_example():
  """The Equinox way: a per-example ``W @ x + b`` mapped with ``jax.vmap``."""
  model = eqx_mlp()
  check_case(eqx_vmapped_loss, model, class_batch(), eqx_want(model))


def test_eqx_style_vmapped_single_example_without_bias():
  model = eqx_mlp(bias=False)
  check_case(eqx_vmapped_loss, model, class_batch(), eqx_want(model))


def test_dict_weights_stored_transposed():
  check_case(dict_mlp_t_loss, dict_mlp_params(transposed=True), class_batch(),
             DICT_MLP_WANT)


@pytest.mark.parametrize("seq", [False, True], ids=["2d", "seq"])
@pytest.mark.parametrize("form", sorted(PRODUCTS))
def test_products(form: str, seq: bool):
  prod, transposed = PRODUCTS[form]
  params = dict_mlp_params(transposed)

  def loss_fn(p, b):
    h = jax.nn.relu(prod(b["x"], p["w1"]) + p["b1"])
    return xent(prod(h, p["w2"]) + p["b2"], b)

  check_case(loss_fn, params, class_batch(seq=seq), DICT_MLP_WANT)


def test_sequence_bias_free_and_shared_over_time():
  """x [B, T, d] @ W: one dense layer, not one per position."""
  params = {"w": normal(1, D_IN, D_OUT)}
  layers = check_case(lambda p, b: xent(b["x"] @ p["w"], b), params,
                      class_batch(seq=True), [dense("['w']", None, D_IN, D_OUT)])
  assert len(layers) == 1


# ----------------------------------------------------------------------------
# 1. Plain dict parameters.
# ----------------------------------------------------------------------------


def test_plain_dict_mlp():
  check_case(dict_mlp_loss, dict_mlp_params(), class_batch(), DICT_MLP_WANT)


def test_plain_dict_bias_added_first():
  """``b + x @ W`` (bias as the left operand of the add) is still attached."""
  def loss_fn(p, b):
    h = jnp.tanh(p["b1"] + b["x"] @ p["w1"])
    return xent(p["b2"] + h @ p["w2"], b)
  check_case(loss_fn, dict_mlp_params(), class_batch(), DICT_MLP_WANT)


def test_nested_dict_and_list_params():
  params = {"net": [{"w": normal(1, D_IN, D_H), "b": normal(2, D_H)},
                    {"w": normal(3, D_H, D_OUT)}]}

  def loss_fn(p, b):
    l0, l1 = p["net"]
    return xent(jnp.tanh(b["x"] @ l0["w"] + l0["b"]) @ l1["w"], b)

  check_case(loss_fn, params, class_batch(),
             [dense("['net'][0]['w']", "['net'][0]['b']", D_IN, D_H),
              dense("['net'][1]['w']", None, D_H, D_OUT)])


# ----------------------------------------------------------------------------
# 2. Abstract sample batches; tracing never runs the model.
# ----------------------------------------------------------------------------


def test_shape_dtype_struct_batch_and_no_execution():
  calls = []

  def loss_fn(p, b):
    h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
    jax.debug.callback(lambda v: calls.append(1), h)
    return xent(h @ p["w2"] + p["b2"], b)

  params = dict_mlp_params()
  concrete = class_batch()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), concrete)
  assert all(isinstance(l, jax.ShapeDtypeStruct) for l in jax.tree.leaves(abstract))

  layers = kfl.find_layers(loss_fn, params, abstract)
  assert records(layers) == {(w.name, w.kind, w.bias) for w in DICT_MLP_WANT}
  assert_partition(layers, params)
  abstract_params = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  assert records(kfl.find_layers(loss_fn, abstract_params, abstract)) == records(layers)

  tx = kfl.scale_by_kfac(loss_fn, abstract, damping=1e-3, estimator="exact")
  state = tx.init(params)
  assert set(state.factors) == {"['w1']", "['w2']"}
  assert state.factors["['w1']"]["A"].shape == (D_IN + 1, D_IN + 1)
  assert state.factors["['w2']"]["G"].shape == (D_OUT, D_OUT)
  assert calls == []  # nothing was run on data

  # The counter works: an actual evaluation runs the callback.
  jax.block_until_ready(loss_fn(params, concrete))
  jax.effects_barrier()
  assert calls == [1]
  # ... and the transform built from the abstract batch updates on real data.
  grads = jax.grad(loss_fn)(params, concrete)
  updates, _ = tx.update(grads, state, params, batch=concrete)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
