"""Dense layers: a ``dot_general`` of a parameter view with an activation.

Covers ``x @ W``, ``x @ W.T`` (Equinox), ``jnp.einsum`` / ``jnp.dot`` and
Flax ``Dense`` / ``nnx.Linear``, also with extra leading activation axes
(``[B, T, d_in] @ W``: the weight is shared over ``T``). The weight matrix is
the operand with its contracting axes first; activation rows have the
contracting axes last (Ba et al. 2017, Appendix B). A layer whose input is a
visibly flattened feature map records the map's ``(spatial, channels)`` split,
for the doubly-factored approximation of Ba et al. 2017, §4.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from kfac_jax_lite.tagging.match import Match, ParamView, Path


@dataclasses.dataclass(frozen=True)
class DenseMatch(Match):
  """A dense layer."""

  kind = "dense"
  act_contract: tuple[int, ...] = ()
  act_free: tuple[int, ...] = ()
  weight_contract: tuple[int, ...] = ()
  weight_free: tuple[int, ...] = ()
  # (T, C) when the input is a flattened [B, *spatial, C] feature map.
  input_split: tuple[int, int] | None = None

  @property
  def d_in(self) -> int:
    return math.prod(self.weight_shape[d] for d in self.weight_contract)

  @property
  def d_out(self) -> int:
    return math.prod(self.weight_shape[d] for d in self.weight_free)

  @property
  def out_feature_axes(self) -> tuple[int, ...]:
    n_w, n_a = len(self.weight_free), len(self.act_free)
    return tuple(range(n_a, n_a + n_w)) if self.weight_operand != 0 else tuple(range(n_w))

  def input_rows(self, x: jax.Array) -> jax.Array:
    x = jnp.transpose(x, self.act_free + self.act_contract)
    n = x.shape[0] if self.act_free else 1
    return x.reshape(n, -1, self.d_in)

  def output_rows(self, ds: jax.Array) -> jax.Array:
    lead = ds.ndim - len(self.out_shape)
    n_w, n_a = len(self.weight_free), len(self.act_free)
    if self.weight_operand == 0:  # output axes are [w_free..., act_free...]
      perm = tuple(range(lead)) + tuple(lead + n_w + k for k in range(n_a)) + tuple(
          lead + k for k in range(n_w))
      ds = jnp.transpose(ds, perm)
    n = ds.shape[lead] if n_a else 1
    return ds.reshape(*ds.shape[:lead], n, -1, self.d_out)

  def operand_to_matrix(self, w: jax.Array) -> jax.Array:
    w = jnp.transpose(w, self.weight_contract + self.weight_free)
    return w.reshape(self.d_in, self.d_out)


def match(eqn: Any, path: Path, in_views: Sequence[ParamView | None],
          in_data: Sequence[bool]) -> DenseMatch | str | None:
  """A :class:`DenseMatch` for a ``dot_general`` of a weight and an activation.

  Returns:
    The match; or a reason string when a parameter is used in a way this
    family cannot precondition; or ``None`` when no parameter is involved.
  """
  contract, batch_dims = eqn.params["dimension_numbers"]
  for w in (1, 0):
    pv, act = in_views[w], 1 - w
    if pv is None or pv.broadcast or in_views[act] is not None or not in_data[act]:
      continue
    if batch_dims[0] or batch_dims[1]:
      return "dot_general with batch dimensions"
    w_shape = tuple(eqn.invars[w].aval.shape)
    a_ndim = len(eqn.invars[act].aval.shape)
    return DenseMatch(
        path=path, weight_index=pv.index, weight_operand=w,
        weight_chain=pv.chain, weight_shape=w_shape, weight_fused=pv.fused,
        out_shape=tuple(eqn.outvars[0].aval.shape), out_path=path,
        act_contract=tuple(contract[act]),
        act_free=tuple(d for d in range(a_ndim) if d not in contract[act]),
        weight_contract=tuple(contract[w]),
        weight_free=tuple(d for d in range(len(w_shape)) if d not in contract[w]))
  return None


def registered(eqn: Any, path: Path, in_views: Sequence[ParamView | None],
               bias: bool) -> DenseMatch | str:
  """The :class:`DenseMatch` of a ``kfl.register_dense`` equation.

  Its last operands are ``x, w`` (``x, w, b`` with a bias); values the
  registered function closes over come first.

  Returns:
    The match, or what is wrong with the registration.
  """
  n = 3 if bias else 2
  if len(eqn.invars) < n:
    return "unexpected operands"
  act, w = len(eqn.invars) - n, len(eqn.invars) - n + 1
  if any(v is not None for v in in_views[:act]):
    return "the registered function closes over parameters; pass only x, w and b"
  pv, x_shape = in_views[w], tuple(eqn.invars[act].aval.shape)
  w_shape = tuple(eqn.invars[w].aval.shape)
  if pv is None or pv.broadcast or in_views[act] is not None:
    return "w must be a parameter (or a reshape / transpose / cast of one), x must not"
  out = tuple(eqn.outvars[0].aval.shape) if len(eqn.outvars) == 1 else None
  if (len(w_shape) != 2 or not x_shape or x_shape[-1] != w_shape[0]
      or out != x_shape[:-1] + (w_shape[1],)):
    return (f"expected x [..., d_in], w [d_in, d_out] and one output [..., d_out]; got x "
            f"{list(x_shape)}, w {list(w_shape)}, outputs "
            f"{[list(v.aval.shape) for v in eqn.outvars]}")
  b_view = in_views[-1] if bias else None
  if bias and (b_view is None or math.prod(b_view.shape) != w_shape[1]):
    return f"b must be a parameter with d_out = {w_shape[1]} entries"
  nd = len(x_shape)
  return DenseMatch(
      path=path, weight_index=pv.index, weight_operand=w, weight_chain=pv.chain,
      weight_shape=w_shape, out_shape=out, out_path=path, act_operand=act,
      act_contract=(nd - 1,), act_free=tuple(range(nd - 1)), weight_contract=(0,),
      weight_free=(1,), weight_part=pv.part, weight_fused=pv.fused,
      bias_fused=None if b_view is None else b_view.fused,
      bias_index=None if b_view is None else b_view.index,
      bias_part=None if b_view is None else b_view.part)


def with_flatten_origin(m: DenseMatch, act_shape: tuple[int, ...],
                        unflattened: tuple[int, ...] | None) -> DenseMatch:
  """Records the ``(spatial, channels)`` split of a flattened input, if any.

  Args:
    m: a dense match.
    act_shape: shape of the layer's activation operand.
    unflattened: shape of the activation before the ``reshape`` that produced
      it, or ``None``.

  Returns:
    ``m``, with ``input_split = (prod(spatial), channels)`` when the input is
    ``[B, *spatial, C]`` flattened to ``[B, prod(spatial) * C]`` and the layer
    contracts the flattened axis; the trailing axis is taken as the channels
    (the NHWC layout of Flax and Haiku).
  """
  if (unflattened is None or len(unflattened) < 3 or m.act_free != (0,)
      or m.act_contract != (1,) or unflattened[0] != act_shape[0]
      or math.prod(unflattened[1:]) != m.d_in):
    return m
  return dataclasses.replace(
      m, input_split=(math.prod(unflattened[1:-1]), unflattened[-1]))
