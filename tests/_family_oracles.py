"""Oracles for the Kronecker factors of convolutions, embeddings and sequence layers.

Every oracle here never calls the library:

* input factors ``A`` from input patches gathered with numpy loops (zero
  padding split ``(lo, hi)`` exactly as ``lax`` splits ``"SAME"``), with rows
  ordered channel-major then filter position row-major, i.e. matching the
  weight matrix ``kernel -> (I, *spatial, O) -> [d_in, d_out]``;
* output factors ``G`` from ``jax.jacrev`` of the per-case negative
  log-likelihood of a forward pass written by the test (``lax.conv_general_dilated``,
  ``table[ids]``, ``x @ W``) in which a perturbation ``eps`` is added to the
  layer output, so ``d(-log p)/d eps`` is ``ds`` at every output location.
  The expectation over targets is exact: for a softmax, a sum over every
  class of every loss case weighted by its probability, targets of distinct
  cases being independent; for squared error (unit Gaussian),
  ``E_y[g g^T] = J^T J``.

The oracles average in float64 numpy; the library runs in float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kfac_jax_lite as kfl


Params = dict[str, Any]
Factors = dict[str, dict[str, jax.Array]]
HIGHEST = jax.lax.Precision.HIGHEST


def assert_close(actual: Any, expected: Any, tol: float = 1e-4) -> None:
  """``actual == expected`` up to ``tol`` relative to the largest entry."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(float(np.max(np.abs(expected))), 1e-12)
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> jax.Array:
  """A float32 array of normal draws (numpy: no per-shape PRNG compilation)."""
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def flax_params(model: nn.Module, x: Any, rng: np.random.Generator,
                 scale: float = 1.0) -> Params:
  """Random parameters of a Flax model (shapes by tracing, values by numpy)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  return jax.tree.map(lambda s: normal(rng, *s.shape, scale=scale), shapes)


def exact_factors(loss_fn: Callable[[Any, Any], jax.Array], params: Params,
                  batch: Any, **kwargs: Any) -> Factors:
  """``kfl.estimate_curvature(..., estimator="exact")`` under ``jax.jit``."""
  return jax.jit(lambda p, b: kfl.estimate_curvature(
      loss_fn, p, b, key=jax.random.key(0), estimator="exact", **kwargs))(
          params, batch)


# ----------------------------------------------------------------------------
# Oracles.
# ----------------------------------------------------------------------------


def same_pads(in_sizes: tuple[int, ...], filt: tuple[int, ...],
              strides: tuple[int, ...], dilation: tuple[int, ...]
              ) -> tuple[tuple[int, int], ...]:
  """``(lo, hi)`` zero padding of ``"SAME"``: ``ceil(in / stride)`` outputs,
  the odd pixel (if any) at the high end."""
  pads = []
  for n, f, s, d in zip(in_sizes, filt, strides, dilation):
    effective = (f - 1) * d + 1
    out = -(-n // s)
    total = max((out - 1) * s + effective - n, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


def channels_first(x: np.ndarray, spec: str) -> np.ndarray:
  """Transposes an array in layout ``spec`` (e.g. ``"NHWC"``) to ``N, C, spatial``."""
  spatial = [i for i, c in enumerate(spec) if c not in "NC"]
  return np.transpose(x, [spec.index("N"), spec.index("C"), *spatial])


def patch_rows(x: Any, lhs_spec: str, filt: tuple[int, ...],
               strides: tuple[int, ...], pads: tuple[tuple[int, int], ...],
               dilation: tuple[int, ...]) -> np.ndarray:
  """Input patches by brute force: ``[N, T, C * prod(filt)]``, float64.

  Row ``t`` is the output location (row-major); column
  ``c * prod(filt) + flat(f)`` is input channel ``c`` at filter position ``f``.
  """
  x = channels_first(np.asarray(x, np.float64), lhs_spec)
  xp = np.pad(x, [(0, 0), (0, 0), *pads])
  nd = len(filt)
  out = [(xp.shape[2 + i] - (filt[i] - 1) * dilation[i] - 1) // strides[i] + 1
         for i in range(nd)]
  rows = np.zeros((x.shape[0], math.prod(out), x.shape[1] * math.prod(filt)))
  for n in range(x.shape[0]):
    for t, o in enumerate(np.ndindex(*out)):
      col = 0
      for c in range(x.shape[1]):
        for f in np.ndindex(*filt):
          src = tuple(o[i] * strides[i] + f[i] * dilation[i] for i in range(nd))
          rows[n, t, col] = xp[(n, c) + src]
          col += 1
  return rows


def kernel_matrix(kernel: Any, rhs_spec: str) -> np.ndarray:
  """The ``[I * prod(filter), O]`` weight matrix of a kernel in layout ``rhs_spec``."""
  spatial = [i for i, c in enumerate(rhs_spec) if c not in "IO"]
  k = np.transpose(np.asarray(kernel, np.float64),
                   [rhs_spec.index("I"), *spatial, rhs_spec.index("O")])
  return k.reshape(-1, k.shape[-1])


def input_factor_oracle(rows: np.ndarray, bias: bool, reduce: bool) -> np.ndarray:
  """``A`` from activation rows ``[N, T, d]``: mean over ``(n, t)`` of
  ``[a; 1][a; 1]^T`` ("expand") or ``(1/N) sum_n abar abar^T`` with
  ``abar = mean_t [a; 1]`` ("reduce")."""
  rows = np.asarray(rows, np.float64)
  if bias:
    rows = np.concatenate([rows, np.ones((*rows.shape[:-1], 1))], -1)
  if reduce:
    rows = rows.mean(axis=1, keepdims=True)
  rows = rows.reshape(-1, rows.shape[-1])
  return rows.T @ rows / rows.shape[0]


def fisher_ds(out_fn: Callable[[jax.Array, jax.Array], jax.Array],
              eps_shape: tuple[int, ...], xs: Any, dist: str
              ) -> tuple[np.ndarray, np.ndarray]:
  """Derivatives ``ds = d(-log p(y|x_n))/d eps`` for every target, with weights.

  Args:
    out_fn: ``out_fn(eps, x_n)`` -> the model output of one example, with
      ``eps`` (shape ``eps_shape``) added to the layer output.
    eps_shape: the layer output shape of one example.
    xs: the examples, stacked on axis 0.
    dist: ``"softmax"`` (every leading output axis is a loss case, the last
      one the classes) or ``"squared"`` (one unit-Gaussian case per example).

  Returns:
    ``(grads [B, K, *eps_shape], weights [B, K])`` such that
    ``sum_K weights * g g^T`` is, for each example, the sum over its loss
    cases of ``E_y[ds ds^T]`` with independent targets per case.
  """
  eps0 = jnp.zeros(eps_shape, jnp.float32)

  def one_example(xn):
    if dist == "softmax":
      nll = lambda e: -jax.nn.log_softmax(out_fn(e, xn), axis=-1)
      return jax.jacrev(nll)(eps0), jax.nn.softmax(out_fn(eps0, xn), axis=-1)
    # -log p = |z - y|^2 / 2: E_y[g g^T] = J^T J = sum_k J^T e_k e_k^T J.
    jac = jax.jacrev(lambda e: out_fn(e, xn))(eps0)
    return jac, jnp.ones(jac.shape[:jac.ndim - len(eps_shape)])

  jac, weights = jax.jit(jax.vmap(one_example))(xs)
  b = jac.shape[0]
  return (np.asarray(jac, np.float64).reshape(b, -1, *eps_shape),
          np.asarray(weights, np.float64).reshape(b, -1))


def output_factor_oracle(grads: np.ndarray, weights: np.ndarray, out_layout: str,
                         num_cases: int, reduce: bool) -> np.ndarray:
  """``G = (1/N) sum_n E_y[...]`` from :func:`fisher_ds` output.

  Args:
    grads: ``[B, K, *eps_shape]``.
    weights: ``[B, K]``.
    out_layout: letters of the per-example output axes, ``"C"`` the features
      (e.g. ``"HWC"``, ``"CHW"``, ``"TC"``).
    num_cases: ``N``, the number of cases the loss averages over.
    reduce: sum ``ds`` over locations before the outer product.

  Returns:
    ``[d_out, d_out]`` float64.
  """
  c = out_layout.index("C")
  rows = np.moveaxis(grads, 2 + c, -1)
  rows = rows.reshape(*rows.shape[:2], -1, rows.shape[-1])  # [B, K, T, d_out]
  if reduce:
    dbar = rows.sum(axis=2)
    return np.einsum("bk,bkd,bke->de", weights, dbar, dbar) / num_cases
  return np.einsum("bk,bktd,bkte->de", weights, rows, rows) / num_cases


def library_factors(loss_fn: Callable[[Any, Any], jax.Array], params: Params,
                    batch: Any, approximation_kw: str) -> dict[str, Factors]:
  """The library's exact factors for ``"expand"`` and ``"reduce"`` (one jit)."""
  def both(p, b):
    key = jax.random.key(0)
    return tuple(kfl.estimate_curvature(
        loss_fn, p, b, key=key, estimator="exact",
        layers=kfl.LayerOptions(**{approximation_kw: a}))
        for a in ("expand", "reduce"))
  expand, reduce = jax.jit(both)(params, batch)
  return {"expand": expand, "reduce": reduce}
NUM_OUT = 3  # head outputs (classes, or squared-error outputs)
