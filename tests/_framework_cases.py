"""Small models of Flax linen and nnx and plain JAX, with their expected layer records.

For every framework and layer family a small model built from that
framework's own layers (``body -> tanh -> pool -> head``, the head a linear
layer) comes with the exact set of ``(name, kind, bias name)`` records
:func:`kfl.find_layers` must give, names being ``jax.tree_util.keystr`` of
the parameter paths as the framework lays them out (read from
``tree_flatten_with_path``); :func:`check_records` asserts them and that every
parameter leaf is in exactly one record. Equinox and Haiku: :mod:`_eqx_haiku_cases`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import kfac_jax_lite as kfl
from helpers import leaf_paths, path_name


keystr = jax.tree_util.keystr
Record = tuple[str, str, "str | None"]
LossFn = Callable[[Any, Any], jax.Array]
Case = tuple[LossFn, Any, dict[str, jax.Array], set[Record]]

B, T = 4, 3  # batch size, sequence length
D_IN, D_H, K = 3, 5, 2  # vector input, hidden and class sizes
HW, C, F = 5, 2, 3  # image side, input channels, conv filters (3x3, VALID)
CONV_OUT = F * (HW - 2) ** 2
VOCAB, EMB = 7, 4
D_MODEL, HEADS = 4, 2

# Features reaching the head, per family.
HEAD_IN = {"dense": D_H, "conv": CONV_OUT, "embedding": EMB, "layernorm": D_IN,
           "batchnorm": D_IN, "attention": D_MODEL}

# Kinds of leaves no layer owns: the rms fallback, "none" (a blocks
# override) and "frozen" (a non-trainable collection); each says why in its note.
FALLBACK_KINDS = ("rms", "none", "frozen")


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def records(layers: list[Any]) -> set[Record]:
  """``(name, kind, keystr(bias_path))`` of each layer record."""
  return {(l.name, l.kind, None if l.bias_path is None else keystr(l.bias_path))
          for l in layers}


def assert_partition(layers: list[Any], params: Any) -> None:
  """Every parameter leaf is the weight or bias of exactly one record."""
  paths = [keystr(p) for p in leaf_paths(params)]
  owned = [l.name for l in layers] + [keystr(l.bias_path) for l in layers
                                      if l.bias_path is not None]
  assert sorted(owned) == sorted(paths)
  for l in layers:
    assert l.name == keystr(l.weight_path)
    if l.kind in FALLBACK_KINDS:
      assert l.note and l.bias_path is None, (l.name, l.kind, l.note)


def check_records(loss_fn: LossFn, params: Any, batch: Any, want: set[Record]) -> list[Any]:
  """find_layers gives exactly the records ``want``, covering every leaf once.

  Args:
    loss_fn: ``loss_fn(params, batch)``.
    params: parameter pytree.
    batch: batch pytree.
    want: the expected ``(name, kind, bias name)`` records.

  Returns:
    The layer records.
  """
  layers = kfl.find_layers(loss_fn, params, batch)
  assert len(layers) == len(want), [(l.name, l.kind, l.note) for l in layers]
  assert records(layers) == want, "\n" + str(layers)
  assert_partition(layers, params)
  return layers


def rec(tree: Any, weight: tuple[Any, ...], kind: str,
        bias: tuple[Any, ...] | None = None) -> Record:
  """The expected record of the leaf ``weight`` (and ``bias``) of ``tree``."""
  return (path_name(tree, *weight), kind, None if bias is None else path_name(tree, *bias))


def normal(seed: int, *shape: int) -> jax.Array:
  """Deterministic float32 normal array (numpy RNG: no per-shape compile)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def random_like(tree: Any, seed: int = 0, scale: float = 0.5) -> Any:
  """``tree`` with its float leaves random, others zero; same structure.

  Models are initialized abstractly (``eval_shape``) and filled here: running
  the frameworks' initializers eagerly would compile every op on its own.

  Args:
    tree: a pytree of arrays or ``jax.ShapeDtypeStruct``.
    seed: numpy seed.
    scale: standard deviation of the float leaves.

  Returns:
    The filled pytree.
  """
  rng = np.random.default_rng(seed)
  def fill(leaf: Any) -> Any:
    if not hasattr(leaf, "dtype"):  # e.g. an Equinox module's activation function
      return leaf
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)
  return jax.tree.map(fill, tree)


def family_batch(family: str, channels_first: bool = False) -> dict[str, jax.Array]:
  """``{"x", "y"}`` with the input a family's layer takes, batch first.

  Args:
    family: the layer family.
    channels_first: images as ``[B, C, H, W]`` (Equinox) instead of NHWC.

  Returns:
    The batch.
  """
  if family == "conv":
    x = normal(1, B, C, HW, HW) if channels_first else normal(1, B, HW, HW, C)
  elif family == "embedding":
    x = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (B, T)), jnp.int32)
  elif family == "attention":
    x = normal(1, B, T, D_MODEL)
  else:
    x = normal(1, B, D_IN)
  return {"x": x, "y": jnp.asarray(np.random.default_rng(2).integers(0, K, B), jnp.int32)}


def compiled(fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
  """``jax.jit(fn)`` compiled for ``args`` with XLA's backend optimizations off.

  These tests check values, not speed: on a busy 2-core machine this halves
  the compile time of a K-FAC step, which dominates their run time.
  """
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def xent(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """The registered softmax cross-entropy against ``batch["y"]``."""
  return kfl.losses.softmax_cross_entropy(logits, batch["y"])


def pool(h: jax.Array) -> jax.Array:
  """``[B, ...] -> [B, features]``: flattens a feature map, averages a sequence."""
  if h.ndim == 4:
    return h.reshape(h.shape[0], -1)
  return jnp.mean(h, axis=1) if h.ndim == 3 else h


# ----------------------------------------------------------------------------
# 1. Flax linen (BatchNorm and attention; other families: see the docstring).
# ----------------------------------------------------------------------------


class LinenNet(nn.Module):
  """``body -> tanh -> pool -> Dense`` without bias, named ``head``."""
  body: nn.Module

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(K, use_bias=False, name="head")(pool(jnp.tanh(self.body(x))))


def linen_model(family: str) -> LinenNet:
  """The linen model of ``"batchnorm"`` (train mode) or ``"attention"``."""
  if family == "batchnorm":
    return LinenNet(nn.BatchNorm(use_running_average=False))
  return LinenNet(nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D_MODEL))


def linen_loss(model: LinenNet, variables: Any) -> LossFn:
  """``loss_fn(variables, batch)``, batch statistics updated (and dropped)."""
  def loss_fn(v, b):
    out, _ = model.apply(v, b["x"], mutable=["batch_stats"])
    return xent(out, b)
  return loss_fn


def linen_case(family: str) -> Case:
  """(loss_fn, params, batch, want) of the linen model of one layer family."""
  model = linen_model(family)
  batch = family_batch(family)
  variables = random_like(jax.eval_shape(model.init, jax.random.key(0), batch["x"]))
  others = {k: v for k, v in variables.items() if k != "params"}
  loss = linen_loss(model, variables)
  params = variables["params"]
  head = rec(params, ("head", "kernel"), "dense")
  if family == "batchnorm":
    return (lambda p, b: loss({"params": p, **others}, b), params, batch,
            {head, rec(params, ("body", "scale"), "rms"),
             rec(params, ("body", "bias"), "shift")})
  return (lambda p, b: loss({"params": p}, b), params, batch,
          {head} | {rec(params, ("body", proj, "kernel"), "dense", ("body", proj, "bias"))
                    for proj in ("query", "key", "value", "out")})


# ----------------------------------------------------------------------------
# 2. Flax nnx (split into a params state and the rest, merged in the loss).
# ----------------------------------------------------------------------------


class NnxNet(nnx.Module):
  """``body -> tanh -> pool -> nnx.Linear`` without bias."""

  def __init__(self, body: nnx.Module, d_feat: int, rngs: nnx.Rngs):
    self.body = body
    self.head = nnx.Linear(d_feat, K, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(pool(jnp.tanh(self.body(x))))


def nnx_model(family: str) -> NnxNet:
  """The nnx model of one layer family (BatchNorm in train mode)."""
  rngs = nnx.Rngs(0)
  body = {
      "conv": lambda: nnx.Conv(C, F, (3, 3), padding="VALID", rngs=rngs),
      "embedding": lambda: nnx.Embed(VOCAB, EMB, rngs=rngs),
      "layernorm": lambda: nnx.LayerNorm(D_IN, rngs=rngs),
      "batchnorm": lambda: nnx.BatchNorm(D_IN, use_running_average=False, rngs=rngs),
      "attention": lambda: nnx.MultiHeadAttention(HEADS, D_MODEL, decode=False, rngs=rngs),
  }[family]()
  return NnxNet(body, HEAD_IN[family], rngs)


def nnx_case(family: str) -> Case:
  """(loss_fn, params, batch, want) of the nnx model of one layer family."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: nnx_model(family)), nnx.Param, ...)
  params, rest = random_like(params), random_like(rest)

  def loss_fn(p, b):
    # copy: BatchNorm writes its statistics into the merged module's variables.
    return xent(nnx.merge(graphdef, p, rest, copy=True)(b["x"]), b)

  r = functools.partial(rec, params)
  body = {
      "conv": lambda: {r(("body", "kernel"), "conv", ("body", "bias"))},
      "embedding": lambda: {r(("body", "embedding"), "embedding")},
      "layernorm": lambda: {r(("body", "scale"), "scale"), r(("body", "bias"), "shift")},
      "batchnorm": lambda: {r(("body", "scale"), "rms"), r(("body", "bias"), "shift")},
      "attention": lambda: {r(("body", proj, "kernel"), "dense", ("body", proj, "bias"))
                            for proj in ("query", "key", "value", "out")},
  }[family]()
  return loss_fn, params, family_batch(family), body | {r(("head", "kernel"), "dense")}


# ----------------------------------------------------------------------------
# 3. Plain JAX (dicts of arrays; dense and attention: see test_tagging_forms).
# ----------------------------------------------------------------------------


def plain_body(family: str, p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """One layer family written with jax.numpy / lax, parameters ``p``."""
  if family == "conv":
    return jax.lax.conv_general_dilated(
        x, p["w"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["b"]
  if family == "embedding":
    return p["table"][x]
  axis = -1 if family == "layernorm" else 0  # BatchNorm: statistics of the batch
  mu = jnp.mean(x, axis=axis, keepdims=True)
  var = jnp.mean((x - mu) ** 2, axis=axis, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["offset"]


def plain_case(family: str) -> Case:
  """(loss_fn, params, batch, want) of the plain-JAX model of one layer family."""
  body = {"conv": {"w": normal(3, 3, 3, C, F), "b": normal(4, F)},
          "embedding": {"table": normal(3, VOCAB, EMB)},
          "layernorm": {"scale": 1 + normal(3, D_IN), "offset": normal(4, D_IN)},
          "batchnorm": {"scale": 1 + normal(3, D_IN), "offset": normal(4, D_IN)}}[family]
  params = {"body": body, "head": normal(5, HEAD_IN[family], K)}

  def loss_fn(p, b):
    return xent(pool(jnp.tanh(plain_body(family, p["body"], b["x"]))) @ p["head"], b)

  r = functools.partial(rec, params)
  want = {"conv": lambda: r(("body", "w"), "conv", ("body", "b")),
          "embedding": lambda: r(("body", "table"), "embedding"),
          "layernorm": lambda: r(("body", "scale"), "scale", ("body", "offset")),
          "batchnorm": lambda: r(("body", "scale"), "scale", ("body", "offset"))}[family]()
  return loss_fn, params, family_batch(family), {want, r(("head",), "dense")}
