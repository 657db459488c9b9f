"""The ways users write a small MLP, for the layer-detection tests.

Flax linen and nnx, Equinox-style dataclass pytrees with weights stored
``(d_out, d_in)`` (batched, or one example under ``jax.vmap``), einsum / dot /
matmul products with either weight layout, and user-defined ``custom_jvp`` /
``custom_vjp`` activations.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

from _tagging_cases import D_H, D_IN, D_OUT, class_batch, normal, xent


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


# ----------------------------------------------------------------------------
# 4. einsum / dot / matmul, also on sequences.
# ----------------------------------------------------------------------------


def einsum_io(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x · W`` for ``W [d_in, d_out]``, any leading axes."""
  return jnp.einsum("...i,io->...o", x, w)


def einsum_oi(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x · W.T`` for ``W [d_out, d_in]``, any leading axes."""
  return jnp.einsum("...i,oi->...o", x, w)


def einsum_bi_io(x: jax.Array, w: jax.Array) -> jax.Array:
  """``einsum("bi,io->bo")`` (``"bti,io->bto"`` on sequences)."""
  return jnp.einsum("bi,io->bo", x, w) if x.ndim == 2 else jnp.einsum("bti,io->bto", x, w)


def einsum_bi_oi(x: jax.Array, w: jax.Array) -> jax.Array:
  """``einsum("bi,oi->bo")`` (``"bti,oi->bto"`` on sequences)."""
  return jnp.einsum("bi,oi->bo", x, w) if x.ndim == 2 else jnp.einsum("bti,oi->bto", x, w)


PRODUCTS: dict[str, tuple[Callable[[jax.Array, jax.Array], jax.Array], bool]] = {
    # name: (x, w) -> x·W, and whether w is stored (d_out, d_in).
    "einsum_bi_io": (einsum_bi_io, False),
    "einsum_bi_oi": (einsum_bi_oi, True),
    "einsum_ellipsis_io": (einsum_io, False),
    "einsum_ellipsis_oi": (einsum_oi, True),
    "jnp_dot": (jnp.dot, False),
    "jnp_matmul": (jnp.matmul, False),
    "at_operator": (lambda x, w: x @ w, False),
    "at_transpose": (lambda x, w: x @ w.T, True),
    "dot_transpose": (lambda x, w: jnp.dot(x, jnp.transpose(w)), True),
}


# ----------------------------------------------------------------------------
# 5. Layers inside jit / checkpoint / remat, custom_jvp and custom_vjp activations.
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


def dense_layer(w: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
  """A layer function, to be wrapped in ``jit`` / ``checkpoint``."""
  return x @ w + b
