"""Framework compatibility: Flax linen and nnx, Equinox, Haiku and plain JAX.

For every framework and layer family a small model built from that
framework's own layers (``body -> tanh -> pool -> head``, the head a linear
layer) is traced by :func:`kfl.find_layers`. Each test asserts the exact set of
``(name, kind, bias name)`` records, names being ``jax.tree_util.keystr`` of
the parameter paths as the framework lays them out (read from
``tree_flatten_with_path``), and that every parameter leaf is in exactly one
record. Families tested elsewhere are not repeated here: linen dense / conv /
embedding / LayerNorm (``test_tagging``, ``test_layer_families``,
``test_scale_shift``), nnx dense and plain-JAX dense and attention
(``test_tagging``).

Expected kinds: ``"dense"``, ``"conv"``, ``"embedding"`` (Kronecker); a
normalization scale ``γ`` that multiplies the normalized activation gets an
exact diagonal-Fisher ``"scale"`` block, holding ``[γ; β]`` when the offset
``β`` is added right after it (Equinox, the plain forms here), or ``"scale"``
and ``"shift"`` records when the framework folds ``γ`` into the normalizer
first (``x̂ = (x - μ) · (γ · rsqrt(σ² + ε))``: linen, nnx and Haiku LayerNorm).
With batch statistics (train-mode BatchNorm) that folded ``γ`` multiplies a
batch-wide value, not a per-example activation: rms fallback, a
documented limitation. Attention projections are dense layers; the ``q·kᵀ``
and ``attn·v`` products of two activations are never layers.

Then: one short K-FAC training run per framework on a teacher's labels;
Haiku and Equinox softmax-regression updates against a numpy oracle of the
exact Fisher's Kronecker factors; BatchNorm statistics passed inside a linen
variables dict (or an nnx state) are never tagged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl
from helpers import path_name

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
  leaf_paths = [keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  owned = [l.name for l in layers] + [keystr(l.bias_path) for l in layers
                                      if l.bias_path is not None]
  assert sorted(owned) == sorted(leaf_paths)
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


@pytest.mark.parametrize("family", ["batchnorm", "attention"])
def test_linen_layer_records(family: str):
  check_records(*linen_case(family))


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


@pytest.mark.parametrize("family", ["conv", "embedding", "layernorm", "batchnorm", "attention"])
def test_nnx_layer_records(family: str):
  check_records(*nnx_case(family))


# ----------------------------------------------------------------------------
# 3. Equinox (eqx.partition into a params pytree; per-example layers vmapped).
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eqx() -> Any:
  """The ``equinox`` module (its tests are skipped without it)."""
  return pytest.importorskip("equinox")


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


@pytest.mark.parametrize("family,bias", [
    ("dense", True), ("dense", False), ("conv", True), ("conv", False), ("embedding", True),
    ("layernorm", True), ("batchnorm", True), ("attention", True), ("attention", False)])
def test_equinox_layer_records(eqx: Any, family: str, bias: bool):
  check_records(*eqx_case(eqx, family, bias))


# ----------------------------------------------------------------------------
# 4. Haiku (hk.transform; BatchNorm statistics in hk.transform_with_state's state).
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hk() -> Any:
  """The ``haiku`` module (its tests are skipped without it)."""
  return pytest.importorskip("haiku")


def haiku_case(hk: Any, family: str, bias: bool = True) -> Case:
  """(loss_fn, params, batch, want) of a Haiku ``body -> head`` model.

  Args:
    hk: the ``haiku`` module.
    family: the layer family.
    bias: whether the dense head (``"dense"``), the conv or the attention
      projections have biases.

  Returns:
    The case.
  """
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


@pytest.mark.parametrize("family,bias", [
    ("dense", True), ("dense", False), ("conv", True), ("conv", False),
    ("embedding", True), ("layernorm", True), ("batchnorm", True),
    ("attention", True), ("attention", False)])
def test_haiku_layer_records(hk: Any, family: str, bias: bool):
  check_records(*haiku_case(hk, family, bias))


# ----------------------------------------------------------------------------
# 5. Plain JAX (dicts of arrays; dense and attention: see test_tagging).
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


@pytest.mark.parametrize("family", ["conv", "embedding", "layernorm", "batchnorm"])
def test_plain_jax_layer_records(family: str):
  check_records(*plain_case(family))


# ----------------------------------------------------------------------------
# 6. Non-trainable collections are never tagged.
# ----------------------------------------------------------------------------


def assert_frozen(loss_fn: LossFn, variables: Any, batch: Any, stat_names: set[str],
                  want: set[Record]) -> None:
  """Statistics leaves are kind "frozen" (non-trainable), the rest as ``want``."""
  layers = kfl.find_layers(loss_fn, variables, batch)
  assert records(layers) == want | {(n, "frozen", None) for n in stat_names}, "\n" + str(layers)
  assert_partition(layers, variables)
  for l in layers:
    if l.name in stat_names:
      assert "non-trainable collection" in l.note, l.note


def linen_whole_case() -> tuple[LossFn, Any, dict[str, jax.Array], set[str], set[Record]]:
  """(loss_fn, variables, batch, statistics names, expected parameter records)."""
  model = linen_model("batchnorm")
  batch = family_batch("batchnorm")
  variables = random_like(jax.eval_shape(model.init, jax.random.key(0), batch["x"]))
  assert set(variables) == {"params", "batch_stats"}
  r = functools.partial(rec, variables)
  want = {r(("params", "head", "kernel"), "dense"),
          r(("params", "body", "scale"), "rms"),
          r(("params", "body", "bias"), "shift")}
  stats = {path_name(variables, "batch_stats", "body", s) for s in ("mean", "var")}
  return linen_loss(model, variables), variables, batch, stats, want


def test_linen_whole_variables_dict_leaves_batch_stats_untagged():
  loss_fn, variables, batch, stats, want = linen_whole_case()
  assert_frozen(loss_fn, variables, batch, stats, want)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_linen_batch_stats_get_zero_updates(weight_decay: float):
  loss_fn, variables, batch, stats, _ = linen_whole_case()
  tx = kfl.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2, weight_decay=weight_decay)

  def step(v, s):
    return tx.update(jax.grad(loss_fn)(v, batch), s, v, batch=batch)[0]

  state = tx.init(variables)
  updates = compiled(step, variables, state)(variables, state)
  flat = {keystr(p): np.asarray(u) for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
  assert all(np.all(np.isfinite(u)) for u in flat.values())
  assert all(np.any(u != 0) for n, u in flat.items() if n not in stats)
  for name in stats:
    assert np.all(flat[name] == 0.0), (name, flat[name])


def test_nnx_whole_state_leaves_batch_stats_untagged():
  graphdef, state = nnx.split(nnx.eval_shape(lambda: nnx_model("batchnorm")))
  state = random_like(state)

  def loss_fn(s, b):
    return xent(nnx.merge(graphdef, s, copy=True)(b["x"]), b)

  r = functools.partial(rec, state)
  want = {r(("head", "kernel"), "dense"), r(("body", "scale"), "rms"),
          r(("body", "bias"), "shift")}
  stats = {path_name(state, "body", s) for s in ("mean", "var")}
  assert_frozen(loss_fn, state, family_batch("batchnorm"), stats, want)


# ----------------------------------------------------------------------------
# 7. A short K-FAC training run per framework (MLP 16-8-4 on a teacher's labels).
# ----------------------------------------------------------------------------

STEPS = 20
N_TRAIN, D_X, D_HID, CLASSES = 128, 16, 8, 4
KFAC_SETTINGS = dict(learning_rate=0.1, damping=1e-2, kl_clip=1e-3, momentum=0.9, stats_every=1,
                     inverse_every=10)


@pytest.fixture(scope="module")
def teacher_batch() -> dict[str, jax.Array]:
  """Gaussian inputs labelled by a random linear teacher (a learnable task)."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal((N_TRAIN, D_X))
  y = np.argmax(x @ rng.standard_normal((D_X, CLASSES)), axis=1)
  return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.int32)}


def train_losses(loss_fn: LossFn, params: Any, batch: Any) -> np.ndarray:
  """Losses of ``STEPS + 1`` K-FAC steps on ``batch``: the last is after ``STEPS`` updates.

  Args:
    loss_fn: ``loss_fn(params, batch)``.
    params: initial parameters.
    batch: the (fixed) training batch.

  Returns:
    ``STEPS + 1`` losses.
  """
  tx = kfl.kfac(loss_fn, batch, **KFAC_SETTINGS)

  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, s = tx.update(grads, s, p, batch=batch)
    return optax.apply_updates(p, updates), s, loss

  state = tx.init(params)
  run = compiled(step, params, state)
  losses = []
  for _ in range(STEPS + 1):
    params, state, loss = run(params, state)
    losses.append(float(loss))
  return np.asarray(losses)


def mlp_case(framework: str) -> tuple[LossFn, Any]:
  """(loss_fn, params) of the framework's own MLP ``D_X -> D_HID -> tanh -> CLASSES``."""
  x = jax.ShapeDtypeStruct((1, D_X), jnp.float32)
  if framework == "linen":
    model = nn.Sequential([nn.Dense(D_HID), jnp.tanh, nn.Dense(CLASSES)])
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    loss_fn = lambda p, b: xent(model.apply({"params": p}, b["x"]), b)
  elif framework == "nnx":
    graphdef, params = nnx.split(nnx.eval_shape(lambda: nnx.Sequential(
        nnx.Linear(D_X, D_HID, rngs=nnx.Rngs(0)), jnp.tanh,
        nnx.Linear(D_HID, CLASSES, rngs=nnx.Rngs(1)))))
    loss_fn = lambda p, b: xent(nnx.merge(graphdef, p)(b["x"]), b)
  elif framework == "equinox":
    eqx = pytest.importorskip("equinox")
    model = eqx.filter_eval_shape(lambda: eqx.nn.MLP(
        D_X, CLASSES, D_HID, 1, activation=jnp.tanh, key=jax.random.key(0)))
    is_array = lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct)
    params = eqx.filter(model, is_array)
    static = eqx.filter(model, is_array, inverse=True)
    loss_fn = lambda p, b: xent(jax.vmap(eqx.combine(p, static))(b["x"]), b)
  elif framework == "haiku":
    hk = pytest.importorskip("haiku")
    model = hk.without_apply_rng(hk.transform(
        lambda x: hk.nets.MLP([D_HID, CLASSES], activation=jnp.tanh)(x)))
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    loss_fn = lambda p, b: xent(model.apply(p, b["x"]), b)
  else:
    params = {"w1": jax.ShapeDtypeStruct((D_X, D_HID), jnp.float32),
              "b1": jax.ShapeDtypeStruct((D_HID,), jnp.float32),
              "w2": jax.ShapeDtypeStruct((D_HID, CLASSES), jnp.float32),
              "b2": jax.ShapeDtypeStruct((CLASSES,), jnp.float32)}
    loss_fn = lambda p, b: xent(jnp.tanh(b["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"], b)
  return loss_fn, random_like(params, seed=6, scale=0.3)


@pytest.mark.parametrize("framework", ["linen", "nnx", "equinox", "haiku", "plain"])
def test_short_training_run_lowers_the_loss(framework: str,
                                            teacher_batch: dict[str, jax.Array]):
  loss_fn, params = mlp_case(framework)
  dense = [l for l in kfl.find_layers(loss_fn, params, teacher_batch) if l.kind == "dense"]
  assert len(dense) == 2
  losses = train_losses(loss_fn, params, teacher_batch)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses


# ----------------------------------------------------------------------------
# 8. Preconditioned updates against a numpy oracle (softmax regression).
# ----------------------------------------------------------------------------

N_OR, D_OR, K_OR = 8, 3, 4  # examples, inputs, classes (all different)
LAMBDA = 1e-2


def softmax_regression_oracle(x: jax.Array, w: jax.Array, b: jax.Array | None,
                              y: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """Gradient and K-FAC update of ``[W; b]`` for ``logits = x W + b``, in numpy.

  ``A = mean(a aᵀ)`` with ``a = [x; 1]`` (``x`` without a bias), ``G`` the
  average of ``diag(p) - p pᵀ`` (the exact Fisher of the softmax), and the
  update ``(A + π√λ I)⁻¹ grad (G + √λ/π I)⁻¹`` with
  ``π = sqrt((tr A / dim A) / (tr G / dim G))``.

  Args:
    x: inputs ``[N, d_in]``.
    w: weights ``[d_in, K]``.
    b: bias ``[K]`` or ``None``.
    y: integer labels ``[N]``.

  Returns:
    ``(grad, update)``, both ``[d_in (+1), K]`` float64.
  """
  x = np.asarray(x, np.float64)
  z = x @ np.asarray(w, np.float64)
  if b is not None:
    z = z + np.asarray(b, np.float64)
    x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  n = x.shape[0]
  grad = x.T @ (p - np.eye(z.shape[1])[np.asarray(y)]) / n
  big_a = x.T @ x / n
  big_g = np.mean([np.diag(q) - np.outer(q, q) for q in p], axis=0)
  pi = np.sqrt((np.trace(big_a) / big_a.shape[0]) / (np.trace(big_g) / big_g.shape[0]))
  ia = np.linalg.inv(big_a + pi * np.sqrt(LAMBDA) * np.eye(big_a.shape[0]))
  ig = np.linalg.inv(big_g + np.sqrt(LAMBDA) / pi * np.eye(big_g.shape[0]))
  return grad, ia @ grad @ ig


def one_step(loss_fn: LossFn, params: Any, batch: Any) -> tuple[Any, Any]:
  """(grads, updates) of one exact-Fisher K-FAC step with fresh factors."""
  tx = kfl.scale_by_kfac(loss_fn, batch, damping=LAMBDA, estimator="exact",
                         ema_decay=0.0, stats_every=1, inverse_every=1)

  def step(p, s):
    grads = jax.grad(loss_fn)(p, batch)
    return grads, tx.update(grads, s, p, batch=batch)[0]

  state = tx.init(params)
  return compiled(step, params, state)(params, state)


@pytest.fixture(scope="module")
def regression_batch() -> dict[str, jax.Array]:
  """``N_OR`` Gaussian inputs with random labels."""
  return {"x": normal(8, N_OR, D_OR),
          "y": jnp.asarray(np.random.default_rng(9).integers(0, K_OR, N_OR), jnp.int32)}


def assert_rows(actual_w: Any, actual_b: Any, want: np.ndarray, bias: bool,
                rtol: float) -> None:
  """``actual_w`` (``[d_in, K]``) and ``actual_b`` are the rows of ``want``."""
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(np.asarray(actual_w), want[:D_OR], rtol=rtol, atol=rtol * scale)
  if bias:
    np.testing.assert_allclose(np.asarray(actual_b), want[D_OR], rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("bias", [True, False])
def test_haiku_update_matches_oracle(hk: Any, regression_batch: dict[str, jax.Array],
                                     bias: bool):
  model = hk.without_apply_rng(hk.transform(
      lambda x: hk.Linear(K_OR, with_bias=bias, name="lin")(x)))
  params = random_like(jax.eval_shape(model.init, jax.random.key(0), regression_batch["x"]))
  loss_fn = lambda p, b: xent(model.apply(p, b["x"]), b)
  grads, updates = one_step(loss_fn, params, regression_batch)
  lin = params["lin"]
  grad, update = softmax_regression_oracle(regression_batch["x"], lin["w"], lin.get("b"),
                                           regression_batch["y"])
  assert_rows(grads["lin"]["w"], grads["lin"].get("b"), grad, bias, 1e-4)
  assert_rows(updates["lin"]["w"], updates["lin"].get("b"), update, bias, 2e-3)


@pytest.mark.parametrize("bias", [True, False])
def test_equinox_update_matches_oracle(eqx: Any, regression_batch: dict[str, jax.Array],
                                       bias: bool):
  model = random_like(eqx.filter_eval_shape(
      lambda: eqx.nn.Linear(D_OR, K_OR, use_bias=bias, key=jax.random.key(0))))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  loss_fn = lambda p, b: xent(jax.vmap(eqx.combine(p, static))(b["x"]), b)
  grads, updates = one_step(loss_fn, params, regression_batch)
  grad, update = softmax_regression_oracle(  # Equinox stores the weight [K, d_in]
      regression_batch["x"], params.weight.T, params.bias, regression_batch["y"])
  assert_rows(grads.weight.T, grads.bias, grad, bias, 1e-4)
  assert_rows(updates.weight.T, updates.bias, update, bias, 2e-3)
