"""Automatic layer detection across the ways users write models.

For every model form the tests assert the exact set of
``(name, kind, bias name)`` records of :func:`kfl.find_layers`, that every
parameter leaf is in exactly one record, and that
:func:`kfl.estimate_curvature` returns exactly the dense layers, with factors of
the right sizes. Expected names are ``jax.tree_util.keystr`` of the parameter
paths, written out (dict / linen params) or read from
``tree_flatten_with_path`` (nnx states, dataclass pytrees).

The last part checks that preconditioning is mapped back to each parameter
layout: against closed-form factors of a one-layer softmax regression
(independent of the library), with a huge damping (update ≈ grad / λ), and by
comparing a model stored as ``W`` with the same model stored as ``W.T``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from helpers import key_name, path_name

keystr = jax.tree_util.keystr
Record = tuple[str, str, "str | None"]

B, T = 4, 3  # batch size, sequence length
D_IN, D_H, D_OUT = 3, 5, 2  # all different, so a transposed layout cannot pass


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Want:
  """One expected record.

  Attributes:
    name: expected ``Layer.name`` (keystr of the weight path).
    kind: ``"dense"`` or ``"rms"``.
    bias: keystr of the expected bias path, or ``None``.
    a_dim: expected size of ``A`` (``d_in + 1`` with a bias); dense only.
    g_dim: expected size of ``G`` (``d_out``); dense only.
    note: a substring the record's note must contain (rms only).
  """
  name: str
  kind: str
  bias: str | None = None
  a_dim: int = 0
  g_dim: int = 0
  note: str = ""


def dense(name: str, bias: str | None, d_in: int, d_out: int) -> Want:
  """An expected Kronecker layer with ``W`` of logical shape ``[d_in, d_out]``."""
  return Want(name, "dense", bias, d_in + (bias is not None), d_out)


def rms(name: str, note: str = "") -> Want:
  """An expected rms-fallback record."""
  return Want(name, "rms", note=note)


def records(layers: list[Any]) -> set[Record]:
  """``(name, kind, keystr(bias_path))`` of each layer record."""
  return {(l.name, l.kind, None if l.bias_path is None else keystr(l.bias_path))
          for l in layers}


def assert_partition(layers: list[Any], params: Any) -> None:
  """Every parameter leaf is in exactly one record, with consistent indices."""
  leaf_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  seen: list[tuple[Any, ...]] = []
  for l in layers:
    assert l.name == keystr(l.weight_path)
    assert tuple(l.weight_path) == tuple(leaf_paths[l.weight_index])
    seen.append(tuple(l.weight_path))
    if l.kind == "dense":
      assert l.note == "" or (len(l.matches) > 1 and "shared by" in l.note), l.note
      if l.bias_path is not None:
        assert tuple(l.bias_path) == tuple(leaf_paths[l.bias_index])
        seen.append(tuple(l.bias_path))
      else:
        assert l.bias_index is None
    else:
      assert l.kind == "rms", l.kind
      assert l.bias_path is None and l.note
  assert sorted(map(keystr, seen)) == sorted(map(keystr, leaf_paths))
  assert len(seen) == len(leaf_paths)


def check_case(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any,
               want: list[Want]) -> list[Any]:
  """find_layers gives exactly ``want``; estimate_curvature has its dense keys.

  Args:
    loss_fn: ``loss_fn(params, batch)``.
    params: parameter pytree.
    batch: batch pytree (arrays).
    want: the expected records.

  Returns:
    The layer records.
  """
  layers = kfl.find_layers(loss_fn, params, batch)
  assert len(layers) == len(want), [(l.name, l.kind, l.note) for l in layers]
  assert records(layers) == {(w.name, w.kind, w.bias) for w in want}
  assert_partition(layers, params)
  by_name = {l.name: l for l in layers}
  for w in want:
    if w.note:
      assert w.note in by_name[w.name].note, by_name[w.name].note
  # estimate_curvature(estimator="exact"), evaluated abstractly: the whole
  # estimator is traced (keys and shapes are static); values are checked
  # against closed forms in the last section.
  est = jax.eval_shape(functools.partial(
      kfl.estimate_curvature, loss_fn, key=jax.random.key(0),
      estimator="exact"), params, batch)
  dense_want = {w.name: w for w in want if w.kind == "dense"}
  assert set(est) == set(dense_want)
  for name, w in dense_want.items():
    assert set(est[name]) == {"A", "G"}
    assert est[name]["A"].shape == (w.a_dim, w.a_dim), name
    assert est[name]["G"].shape == (w.g_dim, w.g_dim), name
  return layers


def normal(seed: int, *shape: int) -> jax.Array:
  """Deterministic float32 normal array (numpy RNG: no per-shape compile)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def randint(seed: int, shape: tuple[int, ...], high: int) -> jax.Array:
  """Deterministic int32 array of values in ``[0, high)``."""
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


def class_batch(seq: bool = False, classes: int = D_OUT, d: int = D_IN) -> dict[str, jax.Array]:
  """A classification batch ``{"x", "y"}``; with ``seq`` x is ``[B, T, d]``."""
  lead = (B, T) if seq else (B,)
  return {"x": normal(100, *lead, d),
          "y": randint(101, lead, classes)}


def xent(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """The registered softmax cross-entropy against ``batch["y"]``."""
  return kfl.losses.softmax_cross_entropy(logits, batch["y"])


def dict_mlp_params(transposed: bool = False) -> dict[str, jax.Array]:
  """{"w1","b1","w2","b2"}; with ``transposed`` weights stored (d_out, d_in)."""
  w1, w2 = normal(1, D_IN, D_H), normal(2, D_H, D_OUT)
  if transposed:
    w1, w2 = w1.T, w2.T
  return {"w1": w1, "b1": 0.1 * normal(3, D_H), "w2": w2,
          "b2": 0.1 * normal(4, D_OUT)}


def dict_mlp_loss(p: dict[str, jax.Array], batch: dict[str, jax.Array]) -> jax.Array:
  """``x @ w1 + b1 -> tanh -> @ w2 + b2`` with weights stored (d_in, d_out)."""
  h = jnp.tanh(batch["x"] @ p["w1"] + p["b1"])
  return xent(h @ p["w2"] + p["b2"], batch)


def dict_mlp_t_loss(p: dict[str, jax.Array], batch: dict[str, jax.Array]) -> jax.Array:
  """The same MLP with weights stored (d_out, d_in), used as ``x @ W.T``."""
  h = jnp.tanh(batch["x"] @ p["w1"].T + p["b1"])
  return xent(h @ p["w2"].T + p["b2"], batch)


DICT_MLP_WANT = [dense("['w1']", "['b1']", D_IN, D_H),
                 dense("['w2']", "['b2']", D_H, D_OUT)]


# ----------------------------------------------------------------------------
# 1. Flax linen.
# ----------------------------------------------------------------------------


class LinenMLP(nn.Module):
  """Dense with bias -> relu -> Dense without bias -> gelu -> Dense with bias."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(D_H)(x))
    x = nn.gelu(nn.Dense(D_H, use_bias=False)(x))
    return nn.Dense(D_OUT)(x)


def random_like(tree: Any, seed: int = 0) -> Any:
  """Random float32 arrays with the structure and shapes of ``tree``."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return jax.tree_util.tree_unflatten(
      treedef, [0.5 * normal(seed + i, *l.shape) for i, l in enumerate(leaves)])


@functools.lru_cache(maxsize=None)
def linen_case() -> tuple[Callable[..., jax.Array], Any, dict[str, jax.Array]]:
  model = LinenMLP()
  batch = class_batch()
  # The structure flax's init gives, filled without running init eagerly.
  params = random_like(jax.eval_shape(model.init, jax.random.key(0), batch["x"])["params"])

  def loss_fn(p, b):
    return xent(model.apply({"params": p}, b["x"]), b)

  return loss_fn, params, batch


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


# ----------------------------------------------------------------------------
# 2. Flax nnx.
# ----------------------------------------------------------------------------


class NnxMLP(nnx.Module):
  """nnx.Linear (bias) -> relu -> nnx.Linear (no bias) -> silu -> nnx.Linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(D_IN, D_H, rngs=rngs)
    self.l2 = nnx.Linear(D_H, D_H, use_bias=False, rngs=rngs)
    self.l3 = nnx.Linear(D_H, D_OUT, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.l3(jax.nn.silu(self.l2(jax.nn.relu(self.l1(x)))))


def nnx_split(make: Callable[[], nnx.Module]) -> tuple[Any, Any]:
  """``nnx.split`` of the module ``make()`` builds, filled with random arrays.

  The module is built abstractly (``nnx.eval_shape``) so that no initializer
  runs eagerly; the state keeps nnx's structure and paths.
  """
  graphdef, state = nnx.split(nnx.eval_shape(make))
  return graphdef, random_like(state)


@functools.lru_cache(maxsize=None)
def nnx_case() -> tuple[Callable[..., jax.Array], Any, dict[str, jax.Array]]:
  graphdef, state = nnx_split(lambda: NnxMLP(nnx.Rngs(0)))

  def loss_fn(s, b):
    return xent(nnx.merge(graphdef, s)(b["x"]), b)

  return loss_fn, state, class_batch()


def nnx_want(state: Any) -> list[Want]:
  n = functools.partial(path_name, state)
  return [dense(n("l1", "kernel"), n("l1", "bias"), D_IN, D_H),
          dense(n("l2", "kernel"), None, D_H, D_H),
          dense(n("l3", "kernel"), n("l3", "bias"), D_H, D_OUT)]


def test_nnx_split_merge():
  loss_fn, state, batch = nnx_case()
  check_case(loss_fn, state, batch, nnx_want(state))


# ----------------------------------------------------------------------------
# 3. Equinox-style plain JAX: weights stored (d_out, d_in).
# ----------------------------------------------------------------------------


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["weight", "bias"], meta_fields=[])
@dataclasses.dataclass
class EqxLinear:
  """An Equinox-like linear layer: ``weight`` is ``[d_out, d_in]``."""
  weight: jax.Array
  bias: jax.Array | None

  def batched(self, x: jax.Array) -> jax.Array:
    y = x @ self.weight.T
    return y if self.bias is None else y + self.bias

  def single(self, x: jax.Array) -> jax.Array:
    """One example ``x [d_in]`` (to be ``jax.vmap``-ed, the Equinox way)."""
    y = self.weight @ x
    return y if self.bias is None else y + self.bias


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["layers"], meta_fields=[])
@dataclasses.dataclass
class EqxMLP:
  layers: list[EqxLinear]


def eqx_mlp(bias: bool = True) -> EqxMLP:
  """Three layers; the middle one never has a bias."""
  return EqxMLP([EqxLinear(normal(1, D_H, D_IN), 0.1 * normal(2, D_H) if bias else None),
                 EqxLinear(normal(3, D_H, D_H), None),
                 EqxLinear(normal(4, D_OUT, D_H), 0.1 * normal(5, D_OUT) if bias else None)])


def eqx_want(model: EqxMLP) -> list[Want]:
  n = functools.partial(path_name, model)
  bias = model.layers[0].bias is not None
  return [dense(n("layers", 0, "weight"), n("layers", 0, "bias") if bias else None,
                D_IN, D_H),
          dense(n("layers", 1, "weight"), None, D_H, D_H),
          dense(n("layers", 2, "weight"), n("layers", 2, "bias") if bias else None,
                D_H, D_OUT)]


def eqx_batched_loss(m: EqxMLP, b: dict[str, jax.Array]) -> jax.Array:
  h = b["x"]
  for i, layer in enumerate(m.layers):
    h = layer.batched(h)
    if i < len(m.layers) - 1:
      h = jnp.tanh(h)
  return xent(h, b)


def eqx_vmapped_loss(m: EqxMLP, b: dict[str, jax.Array]) -> jax.Array:
  def forward(x):
    for i, layer in enumerate(m.layers):
      x = layer.single(x)
      if i < len(m.layers) - 1:
        x = jnp.tanh(x)
    return x
  return xent(jax.vmap(forward)(b["x"]), b)


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


# ----------------------------------------------------------------------------
# 4. einsum / dot / matmul, also on sequences.
# ----------------------------------------------------------------------------


def _einsum_io(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x · W`` for ``W [d_in, d_out]``, any leading axes."""
  return jnp.einsum("...i,io->...o", x, w)


def _einsum_oi(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x · W.T`` for ``W [d_out, d_in]``, any leading axes."""
  return jnp.einsum("...i,oi->...o", x, w)


def _einsum_bi_io(x: jax.Array, w: jax.Array) -> jax.Array:
  """``einsum("bi,io->bo")`` (``"bti,io->bto"`` on sequences)."""
  return jnp.einsum("bi,io->bo", x, w) if x.ndim == 2 else jnp.einsum("bti,io->bto", x, w)


def _einsum_bi_oi(x: jax.Array, w: jax.Array) -> jax.Array:
  """``einsum("bi,oi->bo")`` (``"bti,oi->bto"`` on sequences)."""
  return jnp.einsum("bi,oi->bo", x, w) if x.ndim == 2 else jnp.einsum("bti,oi->bto", x, w)


PRODUCTS: dict[str, tuple[Callable[[jax.Array, jax.Array], jax.Array], bool]] = {
    # name: (x, w) -> x·W, and whether w is stored (d_out, d_in).
    "einsum_bi_io": (_einsum_bi_io, False),
    "einsum_bi_oi": (_einsum_bi_oi, True),
    "einsum_ellipsis_io": (_einsum_io, False),
    "einsum_ellipsis_oi": (_einsum_oi, True),
    "jnp_dot": (jnp.dot, False),
    "jnp_matmul": (jnp.matmul, False),
    "at_operator": (lambda x, w: x @ w, False),
    "at_transpose": (lambda x, w: x @ w.T, True),
    "dot_transpose": (lambda x, w: jnp.dot(x, jnp.transpose(w)), True),
}


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
# 5. Plain dict parameters.
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
# 6. Layers inside jit / checkpoint / remat, custom_jvp and custom_vjp activations.
# ----------------------------------------------------------------------------


@jax.custom_jvp
def my_softplus(x: jax.Array) -> jax.Array:
  """A user-defined ``custom_jvp`` activation."""
  return jnp.logaddexp(x, 0.0)


@my_softplus.defjvp
def _my_softplus_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return my_softplus(x), jax.nn.sigmoid(x) * t


@jax.custom_vjp
def my_tanh(x: jax.Array) -> jax.Array:
  """A user-defined ``custom_vjp`` activation."""
  return jnp.tanh(x)


def _my_tanh_fwd(x):
  y = jnp.tanh(x)
  return y, y


def _my_tanh_bwd(y, g):
  return (g * (1.0 - y * y),)


my_tanh.defvjp(_my_tanh_fwd, _my_tanh_bwd)


def _dense_layer(w: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
  """A layer function, to be wrapped in ``jit`` / ``checkpoint``."""
  return x @ w + b


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
  layer = WRAPPERS[wrapper](_dense_layer)

  def loss_fn(p, b):
    h = jax.nn.relu(layer(p["w1"], p["b1"], b["x"]))
    return xent(layer(p["w2"], p["b2"], h), b)

  check_case(loss_fn, dict_mlp_params(), class_batch(), DICT_MLP_WANT)


@pytest.mark.parametrize("wrapper", ["jit", "checkpoint", "jit_of_checkpoint"])
def test_wrapped_layers_give_the_same_factors_and_updates(wrapper: str):
  """Factors and K-FAC updates do not change when layers are wrapped."""
  layer = WRAPPERS[wrapper](_dense_layer)

  def wrapped(p, b):
    h = jax.nn.relu(layer(p["w1"], p["b1"], b["x"]))
    return xent(layer(p["w2"], p["b2"], h), b)

  def plain(p, b):
    return xent(jax.nn.relu(b["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"], b)

  params, batch = dict_mlp_params(), class_batch()
  key = jax.random.key(0)
  _assert_trees_close(
      kfl.estimate_curvature(wrapped, params, batch, key=key, estimator="exact"),
      kfl.estimate_curvature(plain, params, batch, key=key, estimator="exact"),
      rtol=1e-5, atol=1e-7)
  _assert_trees_close(_kfac_update(wrapped, params, batch, 1e-3)[0],
                      _kfac_update(plain, params, batch, 1e-3)[0],
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
  layer = jax.jit(_dense_layer)

  @jax.checkpoint
  def block(w, b, x):
    return my_softplus(layer(w, b, x))

  def loss_fn(p, b):
    return xent(layer(p["w2"], p["b2"], block(p["w1"], p["b1"], b["x"])), b)

  check_case(loss_fn, dict_mlp_params(), class_batch(), DICT_MLP_WANT)


# ----------------------------------------------------------------------------
# 7. Negatives: what must not become a (wrong) Kronecker layer.
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
# 8. Errors.
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


# ----------------------------------------------------------------------------
# 9. Abstract sample batches; tracing never runs the model.
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


# ----------------------------------------------------------------------------
# 10. Curvature values and the parameter-layout round trip of preconditioning.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Form:
  """A one-layer softmax regression ``logits = x·W + b`` written some way.

  Attributes:
    make: ``(W [d_in, d_out], b [d_out]) -> params`` in this form's layout
      (linear: also maps a ``[d_in, d_out]`` update matrix to update leaves);
      bias-free forms ignore ``b``.
    logits: ``(params, x) -> logits``.
    names: ``params -> (weight name, bias name or None)`` (keystr of paths).
    seq: whether x is ``[B, T, d_in]``.
    bias: whether the form has a bias.
  """
  make: Callable[[jax.Array, jax.Array], Any]
  logits: Callable[[Any, jax.Array], jax.Array]
  names: Callable[[Any], tuple[str, str | None]]
  seq: bool = False
  bias: bool = True


_LIN = nn.Dense(D_OUT)
_NNX_GRAPHDEF, _NNX_STATE = nnx.split(nnx.eval_shape(
    lambda: nnx.Linear(D_IN, D_OUT, rngs=nnx.Rngs(0))))


def _nnx_make(w: jax.Array, b: jax.Array) -> Any:
  """An nnx.Linear state holding ``kernel = w`` and ``bias = b``."""
  values = {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: values[key_name(path[0])], _NNX_STATE)


def _dict_w(p: Any) -> tuple[str, str]:
  return "['w']", "['b']"


FORMS: dict[str, Form] = {
    "x@W": Form(lambda w, b: {"w": w, "b": b},
                lambda p, x: x @ p["w"] + p["b"], _dict_w),
    "x@W.T": Form(lambda w, b: {"w": w.T, "b": b},
                  lambda p, x: x @ p["w"].T + p["b"], _dict_w),
    "einsum_oi": Form(lambda w, b: {"w": w.T, "b": b},
                      lambda p, x: jnp.einsum("bi,oi->bo", x, p["w"]) + p["b"], _dict_w),
    "einsum_oi_seq": Form(lambda w, b: {"w": w.T, "b": b},
                          lambda p, x: jnp.einsum("bti,oi->bto", x, p["w"]) + p["b"],
                          _dict_w, seq=True),
    "x@W_seq": Form(lambda w, b: {"w": w, "b": b},
                    lambda p, x: x @ p["w"] + p["b"], _dict_w, seq=True),
    "eqx_vmap": Form(lambda w, b: EqxLinear(w.T, b),
                     lambda m, x: jax.vmap(m.single)(x), lambda m: (".weight", ".bias")),
    "eqx_vmap_nobias": Form(lambda w, b: EqxLinear(w.T, None),
                            lambda m, x: jax.vmap(m.single)(x),
                            lambda m: (".weight", None), bias=False),
    "x@W.T_nobias": Form(lambda w, b: {"w": w.T}, lambda p, x: x @ p["w"].T,
                         lambda p: ("['w']", None), bias=False),
    "linen": Form(lambda w, b: {"kernel": w, "bias": b},
                  lambda p, x: _LIN.apply({"params": p}, x), lambda p: ("['kernel']", "['bias']")),
    "nnx": Form(_nnx_make, lambda s, x: nnx.merge(_NNX_GRAPHDEF, s)(x),
                lambda s: (path_name(s, "kernel"), path_name(s, "bias"))),
}


def _one_layer(form: Form) -> tuple[Callable[..., jax.Array], Any, dict[str, jax.Array],
                                    jax.Array, jax.Array]:
  """(loss_fn, params, batch, W [d_in, d_out], b) for a one-layer form."""
  w, b = normal(11, D_IN, D_OUT), 0.3 * normal(12, D_OUT)
  batch = class_batch(seq=form.seq)
  return (lambda p, bt: xent(form.logits(p, bt["x"]), bt),
          form.make(w, b), batch, w, b)


def _oracle(x: jax.Array, logits: jax.Array, y: jax.Array, bias: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Closed-form A, G and gradient matrix [gW; gb] of softmax regression.

  Every leading axis of ``x`` is a case (the loss averages over them).
  """
  x = np.asarray(x, np.float64).reshape(-1, D_IN)
  a = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1) if bias else x
  z = np.asarray(logits, np.float64).reshape(-1, D_OUT)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(D_OUT)[np.asarray(y).reshape(-1)]
  n = a.shape[0]
  big_a = a.T @ a / n
  big_g = np.mean([np.diag(q) - np.outer(q, q) for q in p], axis=0)
  grad = a.T @ (p - onehot) / n
  return big_a, big_g, grad


def _kfac_oracle(big_a: np.ndarray, big_g: np.ndarray, grad: np.ndarray,
                 lam: float) -> np.ndarray:
  """(A + π√λ I)^-1 grad (G + √λ/π I)^-1 with π from trace norms."""
  pi = np.sqrt((np.trace(big_a) / big_a.shape[0]) / (np.trace(big_g) / big_g.shape[0]))
  ia = np.linalg.inv(big_a + pi * np.sqrt(lam) * np.eye(big_a.shape[0]))
  ig = np.linalg.inv(big_g + np.sqrt(lam) / pi * np.eye(big_g.shape[0]))
  return ia @ grad @ ig


def _kfac_update(loss_fn: Callable[..., jax.Array], params: Any, batch: Any,
                 damping: float) -> tuple[Any, Any]:
  """(updates, grads) of one exact-Fisher K-FAC step with no moving average."""
  # Eager on purpose: with the small fixed shapes used here, op-by-op
  # execution reuses compiled kernels across tests and is cheaper than a jit
  # compile per test.
  tx = kfl.scale_by_kfac(loss_fn, batch, damping=damping, estimator="exact",
                         ema_decay=0.0, inverse_every=1)
  grads = jax.grad(loss_fn)(params, batch)
  updates, _ = tx.update(grads, tx.init(params), params, batch=batch)
  return updates, grads


def _assert_trees_close(actual: Any, expected: Any, rtol: float, atol: float) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.shape == e.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


@pytest.mark.parametrize("form_name", [
    f
    for f in sorted(FORMS)])
def test_one_layer_factors_and_update_match_closed_form(form_name: str):
  form = FORMS[form_name]
  loss_fn, params, batch, w, b = _one_layer(form)
  name, bias = form.names(params)
  check_case(loss_fn, params, batch, [dense(name, bias, D_IN, D_OUT)])

  logits = form.logits(params, batch["x"])
  big_a, big_g, grad = _oracle(batch["x"], logits, batch["y"], form.bias)
  est = kfl.estimate_curvature(loss_fn, params, batch, key=jax.random.key(0),
                               estimator="exact")[name]
  np.testing.assert_allclose(est["A"], big_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(est["G"], big_g, rtol=1e-5, atol=1e-6)

  lam = 1e-2
  updates, grads = _kfac_update(loss_fn, params, batch, lam)
  def to_params(mat: np.ndarray) -> Any:  # [W; b] (or W) -> this layout
    w_rows = mat[:D_IN]
    b_row = mat[D_IN] if form.bias else np.zeros(D_OUT)
    return form.make(jnp.asarray(w_rows, jnp.float32), jnp.asarray(b_row, jnp.float32))

  # The gradient in this form's layout is the oracle's matrix mapped by make.
  _assert_trees_close(grads, to_params(grad), rtol=1e-4, atol=1e-6)
  pre = _kfac_oracle(big_a, big_g, grad, lam)
  _assert_trees_close(updates, to_params(pre), rtol=2e-3, atol=1e-5)


def _assert_update_is_grad_over_lambda(loss_fn: Callable[..., jax.Array],
                                       params: Any, batch: Any) -> None:
  lam = 1e6
  updates, grads = _kfac_update(loss_fn, params, batch, lam)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    assert u.shape == g.shape
    u, g = np.asarray(u, np.float64), np.asarray(g, np.float64) / lam
    assert np.linalg.norm(g) > 0
    assert np.linalg.norm(u - g) <= 1e-2 * np.linalg.norm(g), (u, g)


LARGE_DAMPING_CASES: dict[str, Callable[[], tuple[Callable[..., jax.Array], Any, Any]]] = {
    "linen": linen_case,
    "nnx": nnx_case,
    "dict_W.T": lambda: (dict_mlp_t_loss, dict_mlp_params(True), class_batch()),
    "einsum_oi_seq": lambda: (
        lambda p, b: xent(_einsum_bi_oi(jax.nn.relu(_einsum_bi_oi(b["x"], p["w1"]) + p["b1"]),
                                        p["w2"]) + p["b2"], b),
        dict_mlp_params(True), class_batch(seq=True)),
    "eqx_vmap": lambda: (eqx_vmapped_loss, eqx_mlp(), class_batch()),
    "with_rms_leaves": lambda: (
        lambda p, b: dict_mlp_loss(p, b) / p["temp"] + 1e-4 * jnp.sum(p["w1"] ** 2),
        dict(dict_mlp_params(), temp=jnp.asarray(1.5, jnp.float32)), class_batch()),
}


@pytest.mark.parametrize("case", sorted(LARGE_DAMPING_CASES))
def test_large_damping_update_is_grad_over_lambda(case: str):
  """With λ ≫ the factors, every update leaf ≈ grad leaf / λ (layout round trip)."""
  loss_fn, params, batch = LARGE_DAMPING_CASES[case]()
  _assert_update_is_grad_over_lambda(loss_fn, params, batch)


def _mlp2_loss(prod: Callable[[jax.Array, jax.Array], jax.Array]
               ) -> Callable[[Any, dict[str, jax.Array]], jax.Array]:
  """Two-layer tanh MLP on dict params, biases used when present."""
  def loss_fn(p, b):
    h = prod(b["x"], p["w1"])
    h = jnp.tanh(h + p["b1"] if "b1" in p else h)
    out = prod(h, p["w2"])
    return xent(out + p["b2"] if "b2" in p else out, b)
  return loss_fn


@pytest.mark.parametrize("product,bias", [
    ("at_transpose", True), ("einsum_bi_oi", True), ("eqx_vmap", False),
    ("eqx_vmap", True)])
def test_transposed_storage_gives_transposed_updates(product: str, bias: bool):
  """The same MLP stored as W and as W.T: K-FAC updates are transposes."""
  params = dict_mlp_params()
  if not bias:
    params = {"w1": params["w1"], "w2": params["w2"]}
  loss_fn = _mlp2_loss(jnp.matmul)
  batch = class_batch()
  # The vmapped form sums in another order; at λ = 1e-3 float32 rounding is
  # amplified to ~1% in the small output bias (both forms agree exactly in
  # float64), so that form is compared where the solve is better conditioned.
  lam = 1e-2 if product == "eqx_vmap" else 1e-3
  updates, _ = _kfac_update(loss_fn, params, batch, lam)

  if product == "eqx_vmap":
    t_params: Any = EqxMLP([EqxLinear(params["w1"].T, params.get("b1")),
                            EqxLinear(params["w2"].T, params.get("b2"))])
    t_loss = eqx_vmapped_loss
  else:
    t_params = {k: v.T for k, v in params.items()}
    t_loss = _mlp2_loss(PRODUCTS[product][0])

  # Same function of the same numbers.
  np.testing.assert_allclose(t_loss(t_params, batch), loss_fn(params, batch), rtol=1e-6)
  t_updates, _ = _kfac_update(t_loss, t_params, batch, lam)
  if product == "eqx_vmap":
    t_updates = {"w1": t_updates.layers[0].weight, "b1": t_updates.layers[0].bias,
                 "w2": t_updates.layers[1].weight, "b2": t_updates.layers[1].bias}
  for k in params:
    np.testing.assert_allclose(t_updates[k], updates[k].T, rtol=1e-4, atol=1e-6)
  # Not trivially equal to the scaled gradient: the preconditioner matters here.
  grads = jax.grad(loss_fn)(params, batch)
  ratio = np.asarray(updates["w1"]) / np.asarray(grads["w1"])
  assert np.ptp(ratio) > 1e-3 * np.abs(ratio).max()
