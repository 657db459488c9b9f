"""Convolutions: ``conv_general_dilated`` with a parameter kernel.

Any number of spatial dimensions and any ``dimension_numbers`` (NHWC/HWIO as in
Flax, NCHW/OIHW as in Equinox / PyTorch-style code), strides, padding and
dilations. Activation rows are the input patches (the values of
``jax.lax.conv_general_dilated_patches``, ordered channel-major then filter
position, built by strided slicing), one row per output location: the KFC approximation of Grosse &
Martens (2016), with locations as the shared axis ``T``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from kfac_jax_lite.tagging.match import Match, ParamView, Path


@dataclasses.dataclass(frozen=True)
class ConvMatch(Match):
  """A convolution layer (``feature_group_count == 1``)."""

  kind = "conv"
  builds_columns = True
  lhs_spec: tuple[int, ...] = ()
  rhs_spec: tuple[int, ...] = ()
  out_spec: tuple[int, ...] = ()
  window_strides: tuple[int, ...] = ()
  padding: tuple[tuple[int, int], ...] = ()
  lhs_dilation: tuple[int, ...] = ()
  rhs_dilation: tuple[int, ...] = ()

  @property
  def filter_shape(self) -> tuple[int, ...]:
    return tuple(self.weight_shape[d] for d in self.rhs_spec[2:])

  @property
  def d_in(self) -> int:
    return self.weight_shape[self.rhs_spec[1]] * math.prod(self.filter_shape)

  @property
  def d_out(self) -> int:
    return self.weight_shape[self.rhs_spec[0]]

  @property
  def out_feature_axes(self) -> tuple[int, ...]:
    return (self.out_spec[1],)

  def input_rows(self, x: jax.Array) -> jax.Array:
    return jnp.swapaxes(self.input_columns(x), 1, 2)

  def input_columns(self, x: jax.Array) -> jax.Array:
    patches = self.patches(jnp.transpose(x, self.lhs_spec))  # [N, C, F, out spatial...]
    return patches.reshape(patches.shape[0], self.d_in, -1)

  def patches(self, x: jax.Array) -> jax.Array:
    """The input patches, by padding and strided slicing.

    The values of ``jax.lax.conv_general_dilated_patches`` (channel-major,
    then filter position), which XLA:CPU runs as a grouped convolution,
    several times slower than these ``prod(filter)`` slices.

    Args:
      x: ``[N, C, *spatial]``.

    Returns:
      ``[N, C, prod(filter), *out_spatial]``.
    """
    n_sp = len(self.filter_shape)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] * 2 + [
        (lo, hi, d - 1) for (lo, hi), d in zip(self.padding, self.lhs_dilation)])
    span = [r * (f - 1) + 1 for f, r in zip(self.filter_shape, self.rhs_dilation)]
    out = [(xp.shape[2 + i] - span[i]) // self.window_strides[i] + 1 for i in range(n_sp)]
    slices = []
    for offsets in itertools.product(*map(range, self.filter_shape)):
      start = [o * r for o, r in zip(offsets, self.rhs_dilation)]
      limit = [s + (m - 1) * st + 1 for s, m, st in zip(start, out, self.window_strides)]
      slices.append(jax.lax.slice(xp, [0, 0, *start], [*xp.shape[:2], *limit],
                                  [1, 1, *self.window_strides]))
    return jnp.stack(slices, axis=2)

  def output_rows(self, ds: jax.Array) -> jax.Array:
    lead = ds.ndim - len(self.out_shape)
    perm = tuple(range(lead)) + tuple(lead + d for d in (
        self.out_spec[0], *self.out_spec[2:], self.out_spec[1]))
    ds = jnp.transpose(ds, perm)
    return ds.reshape(*ds.shape[:lead], ds.shape[lead], -1, self.d_out)

  def operand_to_matrix(self, w: jax.Array) -> jax.Array:
    w = jnp.transpose(w, (self.rhs_spec[1], *self.rhs_spec[2:], self.rhs_spec[0]))
    return w.reshape(self.d_in, self.d_out)


def match(eqn: Any, path: Path, in_views: Sequence[ParamView | None],
          in_data: Sequence[bool]) -> ConvMatch | str | None:
  """A :class:`ConvMatch` for a convolution of an activation with a kernel.

  Returns:
    The match; a reason string for a kernel this family cannot precondition
    (grouped / depthwise convolutions get the rms fallback); or ``None``.
  """
  pv = in_views[1]
  if pv is None or pv.broadcast or in_views[0] is not None or not in_data[0]:
    return None
  p = eqn.params
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    return (f"grouped convolution (feature_group_count="
            f"{p['feature_group_count']}, batch_group_count="
            f"{p['batch_group_count']})")
  dn = p["dimension_numbers"]
  return ConvMatch(
      path=path, weight_index=pv.index, weight_operand=1, weight_chain=pv.chain,
      weight_shape=tuple(eqn.invars[1].aval.shape),
      out_shape=tuple(eqn.outvars[0].aval.shape), out_path=path,
      lhs_spec=tuple(dn.lhs_spec), rhs_spec=tuple(dn.rhs_spec),
      out_spec=tuple(dn.out_spec), window_strides=tuple(p["window_strides"]),
      padding=tuple(tuple(pd) for pd in p["padding"]),
      lhs_dilation=tuple(p["lhs_dilation"]), rhs_dilation=tuple(p["rhs_dilation"]))
