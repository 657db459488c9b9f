"""Kronecker factors of convolutions: 1-D / 2-D / 3-D, both layouts, strides, padding, dilation.

Checked against the oracles of :mod:`_family_oracles` (the patch loops are
validated by reproducing the convolution's output as ``patches @ W + b``), and
the statistics' strided-slice patches against XLA's patches op.
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
import pytest

import kfac_jax_lite as kfl
from kfac_jax_lite.tagging.conv import ConvMatch
from _family_oracles import (
    HIGHEST, NUM_OUT, Params, assert_close, flax_params, normal, fisher_ds,
    input_factor_oracle, kernel_matrix, library_factors, output_factor_oracle, patch_rows,
    same_pads)


# ----------------------------------------------------------------------------
# Convolutions: 1-D / 2-D / 3-D, both layouts, strides, padding, dilation.
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
  x = normal(rng, *case.x_shape)
  if case.dist == "softmax":
    y = jnp.asarray(rng.integers(0, NUM_OUT, case.x_shape[0]))
    loss_of = kfl.losses.softmax_cross_entropy
  else:
    y = normal(rng, case.x_shape[0], NUM_OUT)
    loss_of = kfl.losses.squared_error
  batch = {"x": x, "y": y}
  if case.flax:
    model = FlaxCNN()
    params = flax_params(model, x, rng, 0.7)

    def loss_fn(p, b):
      return loss_of(model.apply({"params": p}, b["x"]), b["y"])

    # The oracle's own forward pass must be the model the library sees.
    assert_close(*jax.jit(lambda p: (conv_forward(case, p, x), model.apply(
        {"params": p}, x)))(params))
    return params, batch, loss_fn, "['Conv_0']['kernel']"
  params = {"kernel": normal(rng, *case.kernel_shape, scale=0.7)}
  if case.bias:
    params["bias"] = normal(rng, case.out_c, scale=0.5)
  n_feat = math.prod(jax.eval_shape(
      lambda: conv_layer(case, params, x)).shape[1:])
  params["head"] = normal(rng, n_feat, NUM_OUT, scale=0.5)

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
  assert_close(recon, s_rows, 1e-5)

  eps_shape = s.shape[1:]
  out_fn = lambda e, xn: conv_forward(case, params, xn[None], e[None])[0]
  grads, weights = fisher_ds(out_fn, eps_shape, x, case.dist)
  out_layout = case.specs[2].replace("N", "")
  lib = library_factors(loss_fn, params, batch, "conv_approximation")
  for approx in ("expand", "reduce"):
    reduce = approx == "reduce"
    got = lib[approx][name]
    assert_close(got["A"], input_factor_oracle(rows, case.bias, reduce))
    assert_close(got["G"], output_factor_oracle(
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
  params = {"k1": normal(rng, 3, 3, 2, 3, scale=0.7),
            "k2": normal(rng, 3, 3, 3, 3, scale=0.7)}
  x = normal(rng, 2, 4, 4, 2)
  if dist == "softmax":
    y, loss_of = jnp.asarray(rng.integers(0, 3, (2, 4, 4))), kfl.losses.softmax_cross_entropy
  else:
    y, loss_of = normal(rng, 2, 4, 4, 3), kfl.losses.squared_error
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
  assert_close(got["A"], input_factor_oracle(rows, False, False))
  grads, weights = fisher_ds(lambda e, xn: forward(params, xn[None], e[None])[0],
                             (4, 4, 3), x, dist)
  num_cases = 2 * 16 if dist == "softmax" else 2
  assert_close(got["G"], output_factor_oracle(grads, weights, "HWC", num_cases, False))


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
