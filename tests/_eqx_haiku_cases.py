"""Small Equinox and Haiku models, with their expected layer records.

As :mod:`_framework_cases`: Equinox models are ``eqx.partition``-ed into a
params pytree (per-example layers vmapped); Haiku models are ``hk.transform``-ed
(BatchNorm statistics in ``hk.transform_with_state``'s state). The ``eqx`` /
``hk`` fixtures skip where the package is missing.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import pytest

from _framework_cases import (
    C, Case, D_H, D_IN, D_MODEL, EMB, F, HEADS, HEAD_IN, K, VOCAB, family_batch, pool,
    random_like, rec, xent)


@pytest.fixture(scope="module")
def eqx() -> Any:
  """The ``equinox`` module (its tests are skipped without it)."""
  return pytest.importorskip("equinox")


@pytest.fixture(scope="module")
def hk() -> Any:
  """The ``haiku`` module (its tests are skipped without it)."""
  return pytest.importorskip("haiku")


# ----------------------------------------------------------------------------
# 1. Equinox (eqx.partition into a params pytree; per-example layers vmapped).
# ----------------------------------------------------------------------------


def eqx_case(eqx: Any, family: str, bias: bool = True) -> Case:
  """(loss_fn, params, batch, want) of an Equinox ``[body, head]`` model.

  Args:
    eqx: the ``equinox`` module.
    family: the layer family.
    bias: whether the dense head (``"dense"``), the conv or the attention
      projections have biases.

  Returns:
    The case; images are ``[B, C, H, W]`` and the conv weight OIHW, as
    Equinox lays them out.
  """
  def make() -> tuple[Any, Any]:
    k1, k2 = jax.random.split(jax.random.key(0))
    body = {
        "dense": lambda: eqx.nn.Linear(D_IN, D_H, use_bias=False, key=k1),
        "conv": lambda: eqx.nn.Conv2d(C, F, 3, use_bias=bias, key=k1),
        "embedding": lambda: eqx.nn.Embedding(VOCAB, EMB, key=k1),
        "layernorm": lambda: eqx.nn.LayerNorm(D_IN),
        "batchnorm": lambda: eqx.nn.BatchNorm(D_IN, axis_name="batch", mode="batch"),
        "attention": lambda: eqx.nn.MultiheadAttention(
            HEADS, D_MODEL, use_query_bias=bias, use_key_bias=bias,
            use_value_bias=bias, use_output_bias=bias, key=k1),
    }[family]()
    head = eqx.nn.Linear(HEAD_IN[family], K, use_bias=bias and family == "dense", key=k2)
    return eqx.nn.make_with_state(lambda: (body, head))()

  (body, head), state = random_like(eqx.filter_eval_shape(make))
  params, static = eqx.partition((body, head), eqx.is_inexact_array)

  def forward(model: Any, x: jax.Array) -> jax.Array:
    body, head = model
    if family == "batchnorm":
      h = jax.vmap(lambda v: body(v, state)[0], axis_name="batch")(x)
    elif family == "embedding":
      h = jax.vmap(jax.vmap(body))(x)
    elif family == "attention":
      h = jax.vmap(lambda s: body(s, s, s))(x)
    else:
      h = jax.vmap(body)(x)
    return jax.vmap(head)(pool(jnp.tanh(h)))

  def loss_fn(p, b):
    return xent(forward(eqx.combine(p, static), b["x"]), b)

  r = functools.partial(rec, params)
  bias_at = lambda *keys: keys if bias else None
  want = {
      "dense": lambda: {r((0, "weight"), "dense")},
      "conv": lambda: {r((0, "weight"), "conv", bias_at(0, "bias"))},
      "embedding": lambda: {r((0, "weight"), "embedding")},
      "layernorm": lambda: {r((0, "weight"), "scale", (0, "bias"))},
      "batchnorm": lambda: {r((0, "weight"), "scale", (0, "bias"))},
      "attention": lambda: {
          r((0, proj, "weight"), "dense", bias_at(0, proj, "bias"))
          for proj in ("query_proj", "key_proj", "value_proj", "output_proj")},
  }[family]() | {r((1, "weight"), "dense", bias_at(1, "bias") if family == "dense" else None)}
  return loss_fn, params, family_batch(family, channels_first=True), want


# ----------------------------------------------------------------------------
# 2. Haiku (hk.transform; BatchNorm statistics in hk.transform_with_state's state).
# ----------------------------------------------------------------------------


def haiku_case(hk: Any, family: str, bias: bool = True) -> Case:
  """(loss_fn, params, batch, want) of a Haiku ``body -> head`` model; the
  arguments as :func:`eqx_case`'s, ``hk`` the ``haiku`` module."""
  def body(x: jax.Array) -> jax.Array:
    if family == "dense":
      return hk.Linear(D_H, with_bias=False, name="body")(x)
    if family == "conv":
      return hk.Conv2D(F, 3, padding="VALID", with_bias=bias, name="body")(x)
    if family == "embedding":
      return hk.Embed(VOCAB, EMB, name="body")(x)
    if family == "layernorm":
      return hk.LayerNorm(-1, create_scale=True, create_offset=True, name="body")(x)
    if family == "batchnorm":
      return hk.BatchNorm(True, True, 0.9, name="body")(x, is_training=True)
    return hk.MultiHeadAttention(HEADS, D_MODEL // HEADS, w_init=hk.initializers.VarianceScaling(),
                                 with_bias=bias, model_size=D_MODEL, name="body")(x, x, x)

  def forward(x: jax.Array) -> jax.Array:
    head_bias = bias and family == "dense"
    return hk.Linear(K, with_bias=head_bias, name="head")(pool(jnp.tanh(body(x))))

  batch = family_batch(family)
  model = hk.transform_with_state(forward)
  params, state = random_like(jax.eval_shape(model.init, jax.random.key(0), batch["x"]))

  def loss_fn(p, b):
    return xent(model.apply(p, state, None, b["x"])[0], b)

  if family == "batchnorm":  # running statistics live in the state only
    assert set(params["body"]) == {"scale", "offset"} and state, state
  r = functools.partial(rec, params)
  attn = lambda proj: r((f"body/{proj}", "w"), "dense", (f"body/{proj}", "b") if bias else None)
  want = {
      "dense": lambda: {r(("body", "w"), "dense")},
      "conv": lambda: {r(("body", "w"), "conv", ("body", "b") if bias else None)},
      "embedding": lambda: {r(("body", "embeddings"), "embedding")},
      "layernorm": lambda: {r(("body", "scale"), "scale"), r(("body", "offset"), "shift")},
      "batchnorm": lambda: {r(("body", "scale"), "rms"), r(("body", "offset"), "shift")},
      "attention": lambda: {attn(proj) for proj in ("query", "key", "value", "linear")},
  }[family]() | {r(("head", "w"), "dense",
                   ("head", "b") if bias and family == "dense" else None)}
  return loss_fn, params, batch, want
