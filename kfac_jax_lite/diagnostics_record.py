"""The :class:`Diagnostics` of one batch, held as one packed array.

An optimizer state that keeps the diagnostics carries them through every
step, statistics step or not (through the ``lax.cond`` of the statistics
phase, into and out of the jitted step). On XLA:CPU each array costs a copy
and a buffer per step whatever its size: the per-layer norms of a
28-layer transformer (56 arrays of ``[B]`` and scalars) cost a third of a
non-statistics step. So the record is one float32 vector with a static
layout, and its fields are slices of it, read when asked for.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where each field lies in the packed vector (static)."""
  batch_size: int
  layers: tuple[str, ...]
  uncovered: tuple[str, ...]

  def offsets(self) -> dict[str, int]:
    """The first index of each field (scalars after the per-example rows)."""
    b, n = self.batch_size, len(self.layers)
    scalars = b * (n + 1)
    return {"sq_norms": 0, "layer_sq_norms": b, "batch_grad_sq_norm": scalars,
            "layer_batch_grad_sq_norms": scalars + 1, "trace_sigma": scalars + n + 1,
            "grad_sq_norm": scalars + n + 2, "noise_scale": scalars + n + 3,
            "diversity": scalars + n + 4}


@jax.tree_util.register_pytree_node_class
class Diagnostics:
  """Gradient statistics of one batch, over the layers the statistics pass covers.

  Every Kronecker layer (dense, conv, embedding; weight and bias together)
  and every scale-and-shift layer is covered. Parameters with the rms
  fallback are not: ``uncovered`` names them, and every total below is over
  the covered layers only. A pytree with one leaf, the packed float32
  vector (a leading axis of it, e.g. from ``pmap``, carries over to every
  field); build one with :meth:`pack`.

  Attributes:
    sq_norms: ``[B]`` per-example squared gradient norms ``||g_n||²``.
    layer_sq_norms: layer name -> ``[B]`` its part of ``sq_norms``.
    batch_grad_sq_norm: ``||G_B||²`` of the batch's mean gradient
      ``G_B = (1/B) Σ_n g_n`` (the gradient of the registered loss).
    layer_batch_grad_sq_norms: layer name -> its part of ``batch_grad_sq_norm``.
    trace_sigma: unbiased ``tr Σ = (Σ_n ||g_n||² − B ||G_B||²) / (B − 1)``, the
      trace of the per-example gradient covariance.
    grad_sq_norm: unbiased ``||G||² = ||G_B||² − tr Σ / B`` (may be negative
      on a noisy batch; average it and ``trace_sigma`` over batches before
      dividing, as McCandlish et al. do).
    noise_scale: ``B_simple = trace_sigma / grad_sq_norm``.
    diversity: ``Σ_n ||g_n||² / ||Σ_n g_n||²`` (Yin et al. 2018).
    uncovered: names (as in :func:`kfac_jax_lite.find_layers`) of the
      layers not covered (static): the rms fallback, and layers whose
      rows do not run along the batch axis (e.g. a time-major ``[T, B, d]``
      input; the check is by size, so keep the batch axis leading).
  """

  def __init__(self, packed: jax.Array, layout: _Layout):
    self._packed = packed
    self._layout = layout

  @classmethod
  def pack(cls, *, sq_norms: jax.Array, layer_sq_norms: dict[str, jax.Array],
           batch_grad_sq_norm: jax.Array, layer_batch_grad_sq_norms: dict[str, jax.Array],
           trace_sigma: jax.Array, grad_sq_norm: jax.Array, noise_scale: jax.Array,
           diversity: jax.Array, uncovered: tuple[str, ...] = ()) -> Diagnostics:
    """The record of the fields (arguments as the attributes)."""
    layers = tuple(layer_sq_norms)
    parts = [sq_norms, *(layer_sq_norms[k] for k in layers), batch_grad_sq_norm,
             *(layer_batch_grad_sq_norms[k] for k in layers), trace_sigma, grad_sq_norm,
             noise_scale, diversity]
    packed = jnp.concatenate([jnp.ravel(p).astype(jnp.float32) for p in parts])
    return cls(packed, _Layout(int(sq_norms.shape[0]), layers, tuple(uncovered)))

  def totals(self) -> Diagnostics:
    """This record without its per-example rows (``sq_norms`` and
    ``layer_sq_norms`` become empty): the batch's totals, whose layout does
    not depend on the batch size."""
    start = self._layout.offsets()["batch_grad_sq_norm"]
    return Diagnostics(self._packed[..., start:],
                       dataclasses.replace(self._layout, batch_size=0))

  def tree_flatten(self) -> tuple[tuple[jax.Array], _Layout]:
    """One leaf, the packed vector; the layout is static."""
    return (self._packed,), self._layout

  @classmethod
  def tree_unflatten(cls, layout: _Layout, leaves: tuple[jax.Array]) -> Diagnostics:
    """The record of a packed vector (or whatever a tree map put in its place)."""
    return cls(leaves[0], layout)

  def _field(self, name: str, size: int | None = None) -> jax.Array:
    """``size`` entries (a scalar if ``None``) from the field's offset, along the last axis."""
    start = self._layout.offsets()[name]
    if size is None:
      return self._packed[..., start]
    return self._packed[..., start:start + size]

  @property
  def uncovered(self) -> tuple[str, ...]:
    return self._layout.uncovered

  @property
  def sq_norms(self) -> jax.Array:
    return self._field("sq_norms", self._layout.batch_size)

  @property
  def layer_sq_norms(self) -> dict[str, jax.Array]:
    b, start = self._layout.batch_size, self._layout.offsets()["layer_sq_norms"]
    return {k: self._packed[..., start + i * b:start + (i + 1) * b]
            for i, k in enumerate(self._layout.layers)}

  @property
  def batch_grad_sq_norm(self) -> jax.Array:
    return self._field("batch_grad_sq_norm")

  @property
  def layer_batch_grad_sq_norms(self) -> dict[str, jax.Array]:
    start = self._layout.offsets()["layer_batch_grad_sq_norms"]
    return {k: self._packed[..., start + i] for i, k in enumerate(self._layout.layers)}

  @property
  def trace_sigma(self) -> jax.Array:
    return self._field("trace_sigma")

  @property
  def grad_sq_norm(self) -> jax.Array:
    return self._field("grad_sq_norm")

  @property
  def noise_scale(self) -> jax.Array:
    return self._field("noise_scale")

  @property
  def diversity(self) -> jax.Array:
    return self._field("diversity")

  def __repr__(self) -> str:
    return (f"Diagnostics(batch_size={self._layout.batch_size}, "
            f"layers={len(self._layout.layers)}, uncovered={self._layout.uncovered})")
