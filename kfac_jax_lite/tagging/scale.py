"""Scale-and-shift parameters: ``x * γ`` and ``x + β`` with broadcast parameters.

LayerNorm, RMSNorm and BatchNorm scales and offsets, Equinox / Flax forms
alike: a ``mul`` (or ``add``) of a batch-dependent value and a parameter that
is broadcast along every axis but its own. Their blocks are small, so instead
of a Kronecker factorization they get the exact diagonal of the Fisher,
``F = E[g ⊙ g]`` from per-example gradients ``g_γ = Σ ds ⊙ x`` and
``g_β = Σ ds`` (sums over the axes the parameter is broadcast along), read
from the same output derivatives as every other layer (Ba et al. 2017,
Appendix B: parameters outside matrix products get small exact blocks).
A ``mul`` whose output gets a broadcast ``add`` holds both as ``[γ; β]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from kfac_jax_lite.tagging.match import Match, ParamView, Path


@dataclasses.dataclass(frozen=True)
class ScaleMatch(Match):
  """A scale (``multiplicative``) or shift parameter; ``block == "diagonal_fisher"``."""

  kind = "scale"
  block = "diagonal_fisher"
  feature_axes: tuple[int, ...] = ()
  multiplicative: bool = True

  @property
  def d_in(self) -> int:
    return 1

  @property
  def d_out(self) -> int:
    return math.prod(self.out_shape[d] for d in self.feature_axes)

  @property
  def out_feature_axes(self) -> tuple[int, ...]:
    return self.feature_axes

  def operand_to_matrix(self, w: jax.Array) -> jax.Array:
    return w.reshape(1, self.d_out)

  def per_example_grads(self, x: jax.Array, ds: jax.Array, *, bias: bool) -> jax.Array:
    """``[S, N, 1(+1), d_out]`` per-example gradients of ``[γ; β]``."""
    lead = ds.ndim - len(self.out_shape)
    keep = {0, *self.feature_axes}
    axes = tuple(lead + d for d in range(len(self.out_shape)) if d not in keep)
    rows = []
    if self.multiplicative:
      x = jnp.broadcast_to(x.astype(jnp.float32), self.out_shape)
      rows.append(jnp.sum(ds * x, axis=axes))
    if bias or not self.multiplicative:
      rows.append(jnp.sum(ds, axis=axes))
    g = jnp.stack(rows, axis=lead + 1)  # [S, N, k, *features]
    return g.reshape(*g.shape[:lead + 2], self.d_out)


@dataclasses.dataclass(frozen=True)
class ShiftMatch(ScaleMatch):
  """A shift parameter on its own (not the bias of a layer)."""

  kind = "shift"
  takes_bias = False


def _feature_axes(pv: ParamView, op_shape: tuple[int, ...]) -> tuple[int, ...] | None:
  """The operand axes along which a (broadcast) parameter operand varies.

  For ``jnp.broadcast_to(γ, x.shape)`` (kfac-jax's and Haiku's LayerNorm
  forms) the operand has the activation's full shape, but its values vary
  only along the axes the broadcast maps ``γ``'s non-unit axes to; ``None``
  when the broadcast reorders them.
  """
  last = pv.chain[-1] if pv.chain else None
  if last is None or last.primitive.name != "broadcast_in_dim":
    return tuple(d for d, o in enumerate(op_shape) if o != 1)
  src = tuple(last.invars[0].aval.shape)
  dims = tuple(d for d, n in zip(last.params["broadcast_dimensions"], src) if n != 1)
  return dims if list(dims) == sorted(dims) else None


def _match(eqn: Any, path: Path, in_views: Sequence[ParamView | None],
           in_data: Sequence[bool], cls: type[ScaleMatch]) -> ScaleMatch | None:
  out_shape = tuple(eqn.outvars[0].aval.shape)
  for w in (1, 0):
    pv, act = in_views[w], 1 - w
    if pv is None or in_views[act] is not None or not in_data[act]:
      continue
    op_shape = tuple(eqn.invars[w].aval.shape)
    features = _feature_axes(pv, op_shape)
    # out_shape[0] > 1: the product must carry a batch axis. (BatchNorm's
    # scale * rsqrt(batch variance) does not: per-example gradients cannot be
    # read there, and the scale keeps the rms fallback.)
    if (features is None or len(op_shape) != len(out_shape) or not out_shape
        or out_shape[0] == 1 or any(o not in (1, n) for o, n in zip(op_shape, out_shape))
        or any(e.primitive.name == "transpose" for e in pv.chain)):
      return None
    if 0 in features or math.prod(out_shape[d] for d in features) != math.prod(pv.root_shape):
      return None  # varies along the batch axis, or repeats its values
    return cls(path=path, weight_index=pv.index, weight_operand=w, weight_chain=(),
               weight_shape=op_shape, out_shape=out_shape, out_path=path,
               feature_axes=features, multiplicative=cls is ScaleMatch)
  return None


def match_scale(eqn: Any, path: Path, in_views: Sequence[ParamView | None],
                in_data: Sequence[bool]) -> ScaleMatch | None:
  """A scale parameter: ``mul`` of an activation and a broadcast parameter."""
  return _match(eqn, path, in_views, in_data, ScaleMatch)


def match_shift(eqn: Any, path: Path, in_views: Sequence[ParamView | None],
                in_data: Sequence[bool]) -> ScaleMatch | None:
  """A shift parameter on its own: ``add`` of an activation and a broadcast parameter."""
  return _match(eqn, path, in_views, in_data, ShiftMatch)
