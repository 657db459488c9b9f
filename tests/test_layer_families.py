"""Kronecker factors of convolutions, embeddings and sequence dense layers.

Every factor is checked against an oracle that never calls the library:

* input factors ``A`` from input patches gathered with numpy loops (zero
  padding split ``(lo, hi)`` exactly as ``lax`` splits ``"SAME"``), with rows
  ordered channel-major then filter position row-major, i.e. matching the
  weight matrix ``kernel -> (I, *spatial, O) -> [d_in, d_out]``; the loops are
  validated by reproducing the convolution's output as ``patches @ W + b``;
* output factors ``G`` from ``jax.jacrev`` of the per-case negative
  log-likelihood of a forward pass written here (``lax.conv_general_dilated``,
  ``table[ids]``, ``x @ W``) in which a perturbation ``eps`` is added to the
  layer output, so ``d(-log p)/d eps`` is ``ds`` at every output location.
  The expectation over targets is exact: for a softmax, a sum over every
  class of every loss case weighted by its probability, targets of distinct
  cases being independent; for squared error (unit Gaussian),
  ``E_y[g g^T] = J^T J``.

The oracles average in float64 numpy; the library runs in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl
from kfac_jax_lite.tagging.conv import ConvMatch

Params = dict[str, Any]
Factors = dict[str, dict[str, jax.Array]]
HIGHEST = jax.lax.Precision.HIGHEST


def _assert_close(actual: Any, expected: Any, tol: float = 1e-4) -> None:
  """``actual == expected`` up to ``tol`` relative to the largest entry."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(float(np.max(np.abs(expected))), 1e-12)
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def _normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> jax.Array:
  """A float32 array of normal draws (numpy: no per-shape PRNG compilation)."""
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _flax_params(model: nn.Module, x: Any, rng: np.random.Generator,
                 scale: float = 1.0) -> Params:
  """Random parameters of a Flax model (shapes by tracing, values by numpy)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  return jax.tree.map(lambda s: _normal(rng, *s.shape, scale=scale), shapes)


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


def _channels_first(x: np.ndarray, spec: str) -> np.ndarray:
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
  x = _channels_first(np.asarray(x, np.float64), lhs_spec)
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


# ----------------------------------------------------------------------------
# 1. Convolutions: 1-D / 2-D / 3-D, both layouts, strides, padding, dilation.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvCase:
  """A conv layer followed by ``tanh``, flatten and a dense head."""
  name: str
  x_shape: tuple[int, ...]
  kernel_shape: tuple[int, ...]
  specs: tuple[str, str, str]  # lhs, rhs, out
  strides: tuple[int, ...]
  padding: Any  # "SAME" / "VALID" / ((lo, hi), ...)
  dilation: tuple[int, ...]
  bias: bool
  dist: str
  flax: bool = False

  @property
  def out_c(self) -> int:
    return self.kernel_shape[self.specs[1].index("O")]

  def pads(self) -> tuple[tuple[int, int], ...]:
    """Explicit ``(lo, hi)`` pads (lax's split of ``"SAME"``)."""
    in_sizes = tuple(self.x_shape[i] for i, c in enumerate(self.specs[0])
                     if c not in "NC")
    if self.padding == "SAME":  # here (0, 1): the odd pixel goes last
      return same_pads(in_sizes, self.filt, self.strides, self.dilation)
    if self.padding == "VALID":
      return tuple((0, 0) for _ in self.filt)
    return tuple(self.padding)

  @property
  def filt(self) -> tuple[int, ...]:
    return tuple(self.kernel_shape[i] for i, c in enumerate(self.specs[1])
                 if c not in "IO")


CONV_CASES = (
    ConvCase("2d_nhwc_flax_stride2_same_bias", (2, 6, 6, 2), (3, 3, 2, 3),
             ("NHWC", "HWIO", "NHWC"), (2, 2), "SAME", (1, 1), True, "softmax",
             flax=True),
    ConvCase("2d_nchw_oihw_explicit_pad_rhs_dilation2_nobias", (2, 2, 5, 6),
             (3, 2, 2, 3), ("NCHW", "OIHW", "NCHW"), (1, 1), ((1, 2), (0, 1)),
             (2, 2), False, "squared"),
    ConvCase("1d_nwc_stride2_nobias", (3, 7, 2), (3, 2, 4), ("NWC", "WIO", "NWC"),
             (2,), ((1, 1),), (1,), False, "softmax"),
    ConvCase("3d_ncdhw_valid_bias", (2, 1, 3, 4, 3), (2, 1, 2, 2, 2),
             ("NCDHW", "OIDHW", "NCDHW"), (1, 2, 1), "VALID", (1, 1, 1), True,
             "softmax"),
)
NUM_OUT = 3  # head outputs (classes, or squared-error outputs)


class FlaxCNN(nn.Module):
  """``nn.Conv`` (NHWC/HWIO, stride 2, SAME) -> tanh -> flatten -> ``nn.Dense``."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = nn.Conv(3, (3, 3), strides=2, padding="SAME")(x)
    return nn.Dense(NUM_OUT)(jnp.tanh(s).reshape(x.shape[0], -1))


def _conv_leaves(case: ConvCase, params: Params
                 ) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
  if case.flax:
    return (params["Conv_0"]["kernel"], params["Conv_0"]["bias"],
            params["Dense_0"]["kernel"], params["Dense_0"]["bias"])
  return params["kernel"], params.get("bias"), params.get("head"), None


def conv_layer(case: ConvCase, params: Params, x: jax.Array) -> jax.Array:
  """The conv layer's output (bias included), written with lax directly."""
  kernel, bias, _, _ = _conv_leaves(case, params)
  s = jax.lax.conv_general_dilated(
      x, kernel, case.strides, case.padding, rhs_dilation=case.dilation,
      dimension_numbers=case.specs, precision=HIGHEST)
  if bias is not None:
    shape = [1] * s.ndim
    shape[case.specs[2].index("C")] = bias.shape[0]
    s = s + bias.reshape(shape)
  return s


def conv_forward(case: ConvCase, params: Params, x: jax.Array,
                 eps: jax.Array | float = 0.0) -> jax.Array:
  """The whole model, ``eps`` added to the conv layer's output."""
  _, _, head_w, head_b = _conv_leaves(case, params)
  h = jnp.tanh(conv_layer(case, params, x) + eps).reshape(x.shape[0], -1)
  out = jnp.dot(h, head_w, precision=HIGHEST)
  return out if head_b is None else out + head_b


@functools.lru_cache(maxsize=None)
def conv_setup(case: ConvCase) -> tuple[Params, dict[str, jax.Array],
                                        Callable[[Any, Any], jax.Array], str]:
  """Params, batch, the library loss and the kernel's layer name."""
  rng = np.random.default_rng(sum(map(ord, case.name)))
  x = _normal(rng, *case.x_shape)
  if case.dist == "softmax":
    y = jnp.asarray(rng.integers(0, NUM_OUT, case.x_shape[0]))
    loss_of = kfl.losses.softmax_cross_entropy
  else:
    y = _normal(rng, case.x_shape[0], NUM_OUT)
    loss_of = kfl.losses.squared_error
  batch = {"x": x, "y": y}
  if case.flax:
    model = FlaxCNN()
    params = _flax_params(model, x, rng, 0.7)

    def loss_fn(p, b):
      return loss_of(model.apply({"params": p}, b["x"]), b["y"])

    # The oracle's own forward pass must be the model the library sees.
    _assert_close(*jax.jit(lambda p: (conv_forward(case, p, x), model.apply(
        {"params": p}, x)))(params))
    return params, batch, loss_fn, "['Conv_0']['kernel']"
  params = {"kernel": _normal(rng, *case.kernel_shape, scale=0.7)}
  if case.bias:
    params["bias"] = _normal(rng, case.out_c, scale=0.5)
  n_feat = math.prod(jax.eval_shape(
      lambda: conv_layer(case, params, x)).shape[1:])
  params["head"] = _normal(rng, n_feat, NUM_OUT, scale=0.5)

  def loss_fn(p, b):
    return loss_of(conv_forward(case, p, b["x"]), b["y"])

  return params, batch, loss_fn, "['kernel']"


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: c.name)
def test_conv_factors_match_oracle(case: ConvCase):
  params, batch, loss_fn, name = conv_setup(case)
  x = batch["x"]
  layers = {l.name: l for l in kfl.find_layers(loss_fn, params, batch)}
  assert layers[name].kind == "conv", layers[name]
  assert (layers[name].bias_path is not None) == case.bias

  kernel, bias, _, _ = _conv_leaves(case, params)
  rows = patch_rows(x, case.specs[0], case.filt, case.strides, case.pads(),
                    case.dilation)
  # The brute-force patches reproduce the layer: patches @ W (+ b) == conv(x).
  s = np.asarray(conv_layer(case, params, x), np.float64)
  c_out = case.specs[2].index("C")
  s_rows = np.moveaxis(s, c_out, -1).reshape(x.shape[0], -1, case.out_c)
  recon = rows @ kernel_matrix(kernel, case.specs[1])
  if bias is not None:
    recon = recon + np.asarray(bias, np.float64)
  _assert_close(recon, s_rows, 1e-5)

  eps_shape = s.shape[1:]
  out_fn = lambda e, xn: conv_forward(case, params, xn[None], e[None])[0]
  grads, weights = fisher_ds(out_fn, eps_shape, x, case.dist)
  out_layout = case.specs[2].replace("N", "")
  lib = library_factors(loss_fn, params, batch, "conv_approximation")
  for approx in ("expand", "reduce"):
    reduce = approx == "reduce"
    got = lib[approx][name]
    _assert_close(got["A"], input_factor_oracle(rows, case.bias, reduce))
    _assert_close(got["G"], output_factor_oracle(
        grads, weights, out_layout, x.shape[0], reduce))


@pytest.mark.parametrize("dist", ["softmax", "squared"])
def test_conv_per_location_outputs_factors_match_oracle(dist: str):
  """Fully-convolutional model with an output at every location.

  The second 3x3 conv mixes locations, so ``ds`` of the first conv at one
  location collects derivatives of the outputs at several locations.
  ``softmax``: one loss case per location (``N = B * H * W``), targets of
  distinct cases independent, so cross-case terms vanish in ``E_y[ds ds^T]``;
  ``squared``: one unit-Gaussian case per example over all ``H * W * C``
  outputs (``N = B``), whose Fisher is the identity on all of them.
  """
  rng = np.random.default_rng(7)
  dn = ("NHWC", "HWIO", "NHWC")
  params = {"k1": _normal(rng, 3, 3, 2, 3, scale=0.7),
            "k2": _normal(rng, 3, 3, 3, 3, scale=0.7)}
  x = _normal(rng, 2, 4, 4, 2)
  if dist == "softmax":
    y, loss_of = jnp.asarray(rng.integers(0, 3, (2, 4, 4))), kfl.losses.softmax_cross_entropy
  else:
    y, loss_of = _normal(rng, 2, 4, 4, 3), kfl.losses.squared_error
  batch = {"x": x, "y": y}

  def forward(p, xb, eps=0.0):
    s = jax.lax.conv_general_dilated(xb, p["k1"], (1, 1), "SAME",
                                     dimension_numbers=dn, precision=HIGHEST)
    return jax.lax.conv_general_dilated(jnp.tanh(s + eps), p["k2"], (1, 1), "SAME",
                                        dimension_numbers=dn, precision=HIGHEST)

  def loss_fn(p, b):
    return loss_of(forward(p, b["x"]), b["y"])

  got = library_factors(loss_fn, params, batch, "conv_approximation")["expand"]["['k1']"]
  rows = patch_rows(x, "NHWC", (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1))
  _assert_close(got["A"], input_factor_oracle(rows, False, False))
  grads, weights = fisher_ds(lambda e, xn: forward(params, xn[None], e[None])[0],
                             (4, 4, 3), x, dist)
  num_cases = 2 * 16 if dist == "softmax" else 2
  _assert_close(got["G"], output_factor_oracle(grads, weights, "HWC", num_cases, False))


# ----------------------------------------------------------------------------
# 2. A conv whose kernel covers the whole input is a dense layer.
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
  x = _normal(rng, 3, 3, 3, 2)
  batch = {"x": x, "y": jnp.asarray([0, 2, 1])}
  conv_params = {"kernel": _normal(rng, 3, 3, 2, 4, scale=0.5),
                 "bias": _normal(rng, 4, scale=0.5),
                 "w2": _normal(rng, 4, 3), "b2": _normal(rng, 3, scale=0.5)}
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
      _assert_close(conv_f["expand"][name][k], dense_f[name][k])
      _assert_close(conv_f["reduce"][name][k], dense_f[name][k])  # T = 1
  a = np.concatenate([np.asarray(flat(x), np.float64), np.ones((3, 1))], 1)
  _assert_close(conv_f["expand"]["['kernel']"]["A"], a.T @ a / 3)


def test_single_example_last_layer_conv_is_exact_fisher_block():
  """One example, one location: ``F = (a a^T) ⊗ F_z`` exactly."""
  rng = np.random.default_rng(4)
  x = _normal(rng, 1, 3, 3, 2)
  params = {"kernel": _normal(rng, 3, 3, 2, 3, scale=0.5),
            "bias": _normal(rng, 3, scale=0.5)}
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
  _assert_close(np.kron(np.asarray(got["A"], np.float64),
                        np.asarray(got["G"], np.float64)), fisher)


# ----------------------------------------------------------------------------
# 3. Grouped convolutions get the rms fallback.
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


# ----------------------------------------------------------------------------
# 4. Embeddings.
# ----------------------------------------------------------------------------

VOCAB, EMB, B_TOK, T_TOK = 7, 3, 3, 4
IDS = np.array([[0, 1, 1, 3], [3, 3, 5, 0], [6, 1, 0, 0]])  # ids 2 and 4 unused


class FlaxTokenModel(nn.Module):
  """``nn.Embed`` -> tanh -> ``nn.Dense``."""
  num_out: int

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    return nn.Dense(self.num_out)(jnp.tanh(nn.Embed(VOCAB, EMB)(ids)))


def _token_leaves(params: Params) -> tuple[jax.Array, jax.Array, jax.Array]:
  if "Embed_0" in params:
    return (params["Embed_0"]["embedding"], params["Dense_0"]["kernel"],
            params["Dense_0"]["bias"])
  return params["table"], params["w"], params["b"]


def token_forward(params: Params, ids: jax.Array, eps: jax.Array | float = 0.0
                  ) -> jax.Array:
  """The oracle's own forward pass, ``eps`` added to the looked-up rows."""
  table, w, b = _token_leaves(params)
  return jnp.dot(jnp.tanh(table[ids] + eps), w, precision=HIGHEST) + b


@functools.lru_cache(maxsize=None)
def token_setup(flavor: str, dist: str) -> tuple[Params, dict[str, jax.Array],
                                                 Callable[[Any, Any], jax.Array], str]:
  """Params, batch, library loss and table name of an embedding model."""
  rng = np.random.default_rng(11)
  num_out = VOCAB if dist == "softmax" else 2
  if dist == "softmax":
    y = jnp.asarray(rng.integers(0, VOCAB, IDS.shape))
    loss_of = kfl.losses.softmax_cross_entropy
  else:
    y = _normal(rng, *IDS.shape, num_out)
    loss_of = kfl.losses.squared_error
  ids = jnp.asarray(IDS, jnp.int32)
  batch = {"ids": ids, "y": y}
  if flavor == "flax":
    model = FlaxTokenModel(num_out)
    params = _flax_params(model, ids, rng)

    def loss_fn(p, b):
      return loss_of(model.apply({"params": p}, b["ids"]), b["y"])

    _assert_close(*jax.jit(lambda p: (token_forward(p, ids), model.apply(
        {"params": p}, ids)))(params))
    return params, batch, loss_fn, "['Embed_0']['embedding']"
  params = {"table": _normal(rng, VOCAB, EMB), "w": _normal(rng, EMB, num_out),
            "b": _normal(rng, num_out, scale=0.3)}
  lookup = {"index": lambda t, i: t[i],
            "take": lambda t, i: jnp.take(t, i, axis=0)}[flavor]

  def loss_fn(p, b):
    z = jnp.dot(jnp.tanh(lookup(p["table"], b["ids"])), p["w"], precision=HIGHEST)
    return loss_of(z + p["b"], b["y"])

  return params, batch, loss_fn, "['table']"


@functools.lru_cache(maxsize=None)
def token_oracle(flavor: str, dist: str) -> tuple[np.ndarray, np.ndarray]:
  """``A`` (token frequencies) and ``G`` of the embedding table."""
  params = token_setup(flavor, dist)[0]
  a = np.bincount(IDS.reshape(-1), minlength=VOCAB) / IDS.size
  grads, weights = fisher_ds(lambda e, idn: token_forward(params, idn, e),
                             (T_TOK, EMB), jnp.asarray(IDS), dist)
  num_cases = IDS.size if dist == "softmax" else B_TOK
  return a, output_factor_oracle(grads, weights, "TC", num_cases, False)


@pytest.mark.parametrize("flavor,dist", [("index", "softmax"), ("take", "squared"),
                                         ("flax", "softmax")])
def test_embedding_factors_match_oracle(flavor: str, dist: str):
  params, batch, loss_fn, name = token_setup(flavor, dist)
  layers = {l.name: l for l in kfl.find_layers(loss_fn, params, batch)}
  assert layers[name].kind == "embedding", layers[name]
  assert layers[name].bias_path is None
  got = exact_factors(loss_fn, params, batch)[name]
  a, g = token_oracle(flavor, dist)
  assert got["A"].shape == (VOCAB,)
  _assert_close(got["A"], a, 1e-6)
  _assert_close(got["G"], g)


def test_tied_embedding_gets_rms_fallback():
  params = {"table": jax.ShapeDtypeStruct((VOCAB, EMB), jnp.float32)}
  batch = {"ids": jax.ShapeDtypeStruct(IDS.shape, jnp.int32),
           "y": jax.ShapeDtypeStruct(IDS.shape, jnp.int32)}

  def loss_fn(p, b):
    h = jnp.tanh(p["table"][b["ids"]])
    return kfl.losses.softmax_cross_entropy(h @ p["table"].T, b["y"])

  (layer,) = kfl.find_layers(loss_fn, params, batch)
  assert layer.name == "['table']"
  assert layer.kind == "rms", layer
  assert layer.note


def test_embedding_preconditioning_is_damped_kronecker_solve():
  params, batch, loss_fn, name = token_setup("index", "softmax")
  lam = 1e-2
  tx = kfl.scale_by_kfac(loss_fn, batch, damping=lam, ema_decay=0.0,
                         inverse_every=1, estimator="exact")
  grads = jax.jit(jax.grad(loss_fn))(params, batch)
  updates = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, batch=batch)[0])(
      grads, params)

  a, g = token_oracle("index", "softmax")
  pi = np.sqrt(np.mean(a) / (np.trace(g) / g.shape[0]))
  block = np.kron(np.diag(a) + pi * np.sqrt(lam) * np.eye(VOCAB),
                  g + np.sqrt(lam) / pi * np.eye(EMB))
  grad = np.asarray(grads["table"], np.float64).reshape(-1)  # row-major vec
  expected = np.linalg.solve(block, grad).reshape(VOCAB, EMB)
  _assert_close(updates["table"], expected, 1e-3)


# ----------------------------------------------------------------------------
# 5. Dense layers over a sequence axis: [B, T, d] @ W.
# ----------------------------------------------------------------------------

B_SEQ, T_SEQ, D_SEQ, H_SEQ, C_SEQ = 3, 4, 2, 3, 3


def seq_forward(params: Params, x: jax.Array, head: str,
                eps: jax.Array | float = 0.0) -> jax.Array:
  """``tanh(x @ w1 + b1)`` -> flattened head ``[B, C]`` or per-position ``[B, T, C]``."""
  h = jnp.tanh(jnp.dot(x, params["w1"], precision=HIGHEST) + params["b1"] + eps)
  if head == "flatten":
    h = h.reshape(h.shape[0], -1)
  return jnp.dot(h, params[head], precision=HIGHEST)


@functools.lru_cache(maxsize=None)
def seq_setup(head: str) -> tuple[Params, dict[str, jax.Array], dict[str, Factors]]:
  """Params, batch and the library's expand/reduce factors."""
  rng = np.random.default_rng(5)
  params = {"w1": _normal(rng, D_SEQ, H_SEQ), "b1": _normal(rng, H_SEQ, scale=0.5),
            "flatten": _normal(rng, T_SEQ * H_SEQ, C_SEQ),
            "per_position": _normal(rng, H_SEQ, C_SEQ)}
  params = {k: v for k, v in params.items() if k in ("w1", "b1", head)}
  y_shape = (B_SEQ,) if head == "flatten" else (B_SEQ, T_SEQ)
  batch = {"x": _normal(rng, B_SEQ, T_SEQ, D_SEQ),
           "y": jnp.asarray(rng.integers(0, C_SEQ, y_shape))}

  def loss_fn(p, b):
    return kfl.losses.softmax_cross_entropy(seq_forward(p, b["x"], head), b["y"])

  kinds = {l.name: l.kind for l in kfl.find_layers(loss_fn, params, batch)}
  assert kinds["['w1']"] == "dense", kinds
  return params, batch, library_factors(loss_fn, params, batch, "dense_approximation")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("head", ["flatten", "per_position"])
def test_sequence_dense_factors_match_oracle(head: str, approx: str):
  """``flatten``: one loss case per sequence; ``per_position``: one per token."""
  params, batch, lib = seq_setup(head)
  reduce = approx == "reduce"
  got = lib[approx]["['w1']"]
  _assert_close(got["A"], input_factor_oracle(np.asarray(batch["x"]), True, reduce))
  grads, weights = fisher_ds(lambda e, xn: seq_forward(params, xn[None], head, e[None])[0],
                             (T_SEQ, H_SEQ), batch["x"], "softmax")
  num_cases = B_SEQ if head == "flatten" else B_SEQ * T_SEQ
  _assert_close(got["G"], output_factor_oracle(grads, weights, "TC", num_cases, reduce))


# ----------------------------------------------------------------------------
# 6. Short training runs.
# ----------------------------------------------------------------------------


class TinyCNN(nn.Module):
  """Conv -> relu -> flatten -> dense."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    return nn.Dense(3)(h.reshape(x.shape[0], -1))


class TinyTokenModel(nn.Module):
  """Embed -> tanh -> dense over the vocabulary."""

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    return nn.Dense(8)(jnp.tanh(nn.Embed(8, 6)(ids)))


def _train(model: nn.Module, inputs: jax.Array, labels: jax.Array,
           kinds: dict[str, str], steps: int = 20) -> list[float]:
  """Full-batch K-FAC; returns the loss before each step.

  ``kinds`` maps layer names to the kind ``find_layers`` must report.
  """
  params = _flax_params(model, inputs, np.random.default_rng(0), 0.3)
  batch = {"x": inputs, "y": labels}

  def loss_fn(p, b):
    return kfl.losses.softmax_cross_entropy(model.apply({"params": p}, b["x"]), b["y"])

  found = {l.name: l.kind for l in kfl.find_layers(loss_fn, params, batch)}
  assert {k: found[k] for k in kinds} == kinds, found
  tx = kfl.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2, kl_clip=1e-2,
                inverse_every=5)

  @jax.jit
  def step(p, state, b):
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    updates, state = tx.update(grads, state, p, batch=b)
    return optax.apply_updates(p, updates), state, loss

  state, losses = tx.init(params), []
  for _ in range(steps):
    params, state, loss = step(params, state, batch)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  return losses


def test_training_tiny_cnn_and_token_model():
  rng = np.random.default_rng(9)
  images = _normal(rng, 16, 6, 6, 1)
  proj = rng.standard_normal((36, 3))
  labels = jnp.asarray(np.argmax(np.asarray(images).reshape(16, -1) @ proj, -1))
  cnn = _train(TinyCNN(), images, labels, {"['Conv_0']['kernel']": "conv",
                                            "['Dense_0']['kernel']": "dense"})
  assert cnn[-1] < 0.5 * cnn[0], cnn

  ids = jnp.asarray(rng.integers(0, 8, (8, 6)), jnp.int32)
  tok = _train(TinyTokenModel(), ids, (ids + 1) % 8,
               {"['Embed_0']['embedding']": "embedding",
                "['Dense_0']['kernel']": "dense"})
  assert tok[-1] < 0.5 * tok[0], tok


@pytest.mark.parametrize("shape,filt,strides,padding,lhs_d,rhs_d", [
    ((2, 3, 7, 6), (3, 2), (1, 1), ((1, 1), (0, 1)), (1, 1), (1, 1)),
    ((2, 3, 9, 8), (3, 3), (2, 3), ((2, 1), (1, 0)), (1, 1), (2, 1)),
    ((1, 2, 5, 5), (2, 2), (1, 2), ((0, 0), (1, 1)), (2, 1), (1, 2)),
    ((2, 2, 8), (3,), (2,), ((-1, 2),), (1,), (2,)),
    ((1, 2, 4, 4, 4), (2, 2, 2), (1, 1, 1), ((0, 1), (1, 0), (0, 0)), (1, 1, 1), (1, 1, 1)),
])
def test_sliced_patches_equal_conv_general_dilated_patches(shape, filt, strides, padding,
                                                           lhs_d, rhs_d):
  """The statistics' patches (strided slices) are exactly XLA's patches op."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  spec = tuple(range(len(shape)))
  m = ConvMatch(path=(), weight_index=0, weight_operand=1, weight_chain=(),
                weight_shape=(1, 1, *filt), out_shape=(), lhs_spec=spec, rhs_spec=spec,
                out_spec=spec, window_strides=strides, padding=padding, lhs_dilation=lhs_d,
                rhs_dilation=rhs_d)
  want = jax.lax.conv_general_dilated_patches(x, filt, strides, padding, lhs_dilation=lhs_d,
                                              rhs_dilation=rhs_d,
                                              precision=jax.lax.Precision.HIGHEST)
  got = m.patches(x)
  np.testing.assert_array_equal(got.reshape(got.shape[0], -1, *got.shape[3:]), want)


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
