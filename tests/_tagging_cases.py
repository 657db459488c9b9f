"""Model forms and expectations shared by the layer-detection tests.

Each form (Flax linen, nnx, Equinox-style dataclass pytrees, dicts with
weights stored either way, einsum / dot / matmul products, custom_jvp /
custom_vjp activations) comes with the exact records
:func:`kfl.find_layers` must give: ``(name, kind, bias name)``, names being
``jax.tree_util.keystr`` of the parameter paths, written out (dict / linen
params) or read from ``tree_flatten_with_path`` (nnx states, dataclass
pytrees). :func:`check_case` asserts them, that every parameter leaf is in
exactly one record, and that :func:`kfl.estimate_curvature` returns exactly
the dense layers, with factors of the right sizes; :func:`kfac_update` is
one K-FAC update of a model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import kfac_jax_lite as kfl
import helpers


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
  paths = helpers.leaf_paths(params)
  seen: list[tuple[Any, ...]] = []
  for l in layers:
    assert l.name == keystr(l.weight_path)
    assert tuple(l.weight_path) == tuple(paths[l.weight_index])
    seen.append(tuple(l.weight_path))
    if l.kind == "dense":
      assert l.note == "" or (len(l.matches) > 1 and "shared by" in l.note), l.note
      if l.bias_path is not None:
        assert tuple(l.bias_path) == tuple(paths[l.bias_index])
        seen.append(tuple(l.bias_path))
      else:
        assert l.bias_index is None
    else:
      assert l.kind == "rms", l.kind
      assert l.bias_path is None and l.note
  assert sorted(map(keystr, seen)) == sorted(map(keystr, paths))
  assert len(seen) == len(paths)


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


def kfac_update(loss_fn: Callable[..., jax.Array], params: Any, batch: Any,
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


def assert_trees_close(actual: Any, expected: Any, rtol: float, atol: float) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.shape == e.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)
