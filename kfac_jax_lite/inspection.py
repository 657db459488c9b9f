"""Look before you train: the detected layers as a table, and one curvature estimate."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax

from kfac_jax_lite.curvature.specs import spec_for
from kfac_jax_lite.options import EstimatorOptions, LayerOptions, as_estimator, check_type
from kfac_jax_lite.statistics import Factors, factor_estimate
from kfac_jax_lite.tagging.layers import Layer, TaggedLoss, tag
from kfac_jax_lite.tagging.trace import trace_loss

_BYTES = 4  # factors and inverses are float32


def _block_label(layer: Layer) -> str:
  """The spec's label (``kron``, ``kron3(vector G)``, ``diagonal_fisher``,
  ``full``), or ``rms`` (the fallback), ``none`` or ``zero`` (frozen)."""
  if layer.match is None:
    return "zero" if layer.kind == "frozen" else layer.kind
  return spec_for(layer).label


def state_bytes(layer: Layer, leaf_size: int) -> int:
  """Bytes of optimizer state for the block (factors + inverses, or ``v``)."""
  if layer.match is None:
    return leaf_size * _BYTES if layer.kind == "rms" else 0
  return 2 * _BYTES * sum(math.prod(s) for s in spec_for(layer).factor_shapes.values())


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def format_table(layers: list[Layer], leaf_sizes: Mapping[int, int]) -> str:
  """One row per block: layer, kind, block type, factor shapes, state memory, note."""
  rows = [("layer", "kind", "block", "factors", "state", "note")]
  total = 0
  for l in layers:
    size = leaf_sizes.get(l.weight_index, 0)
    shapes = (" ".join(f"{k}{list(s)}" for k, s in spec_for(l).factor_shapes.items())
              if l.match is not None else f"v[{size}]" if l.kind == "rms" else "-")
    total += state_bytes(l, size)
    rows.append((l.name + (" +bias" if l.bias_index is not None else ""), l.kind,
                 _block_label(l), shapes, _human(state_bytes(l, size)), l.note))
  rows.append(("total", "", "", "", _human(total), ""))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  return "\n".join(("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) +
                     ("  " + r[5] if r[5] else "")).rstrip() for r in rows)


class LayerList(list):
  """What :func:`find_layers` returns: a list of :class:`Layer` that prints as a table."""

  def __init__(self, layers: list[Layer], leaf_sizes: Mapping[int, int]):
    super().__init__(layers)
    self.leaf_sizes = dict(leaf_sizes)

  def total_bytes(self) -> int:
    """Optimizer-state bytes of all blocks (factors + inverses, the fallback's ``v``)."""
    return sum(state_bytes(l, self.leaf_sizes.get(l.weight_index, 0)) for l in self)

  def __str__(self) -> str:
    return format_table(self, self.leaf_sizes)


def _tagged(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any,
            layers: LayerOptions) -> TaggedLoss:
  check_type("layers", layers, LayerOptions)
  return tag(trace_loss(loss_fn, params, batch), layers.approximation,
             dict(layers.blocks), layers.max_factor_dim)


def find_layers(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any, *,
                layers: LayerOptions = LayerOptions()) -> LayerList:
  """Lists the blocks K-FAC will use, one record per block.

  Every parameter leaf appears in exactly one record (a stacked leaf of a
  scanned stack of layers: in one record per slice, named ``...[i]``): as the
  weight or bias of a layer (``"dense"``, ``"conv"``, ``"embedding"``,
  ``"scale"``, ``"shift"``; a weight used at several places, such as an RNN
  cell, is one layer with several ``matches``), or as an ``"rms"``
  fallback (or ``"none"``, ``"frozen"``) with a ``note`` saying why. Nothing
  is run on data: the loss is traced on abstract values. ``print`` the result
  for a table of blocks, factor shapes and optimizer-state memory.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` built with a
      :mod:`kfac_jax_lite.losses` function.
    params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
    batch: a batch pytree (arrays or ``jax.ShapeDtypeStruct``).
    layers: block overrides and approximations, as given to
      :func:`kfac_jax_lite.scale_by_kfac`.

  Returns:
    The :class:`~kfac_jax_lite.Layer` records, in parameter order.
  """
  tagged = _tagged(loss_fn, params, batch, layers)
  sizes = {i: math.prod(jax.numpy.shape(l))
           for i, l in enumerate(jax.tree_util.tree_leaves(params))}
  return LayerList(list(tagged.layers), sizes)


def estimate_curvature(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                       batch: Any, *, key: jax.Array,
                       estimator: str | EstimatorOptions = "exact",
                       layers: LayerOptions = LayerOptions()) -> Factors:
  """One estimate of every detected layer's curvature factors (no moving average).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` built with a
      :mod:`kfac_jax_lite.losses` function.
    params: parameter pytree.
    batch: batch pytree.
    key: PRNG key (used by ``"mc"``).
    estimator: ``"exact"``, ``"mc"``, ``"empirical"`` or a
      :class:`~kfac_jax_lite.EstimatorOptions` (its ``num_samples``; the
      whole batch is used).
    layers: as given to :func:`kfac_jax_lite.scale_by_kfac`.

  Returns:
    ``{name: {"A": [d_in(+1), d_in(+1)], "G": [d_out, d_out]}}`` keyed by the
    ``keystr`` of each Kronecker layer's weight path; ``F ≈ kron(A, G)`` for
    ``θ = [W; b]`` flattened row-major, ``W`` the ``[d_in, d_out]`` matrix
    (for a convolution: ``d_in`` = input channels × filter positions,
    channel-major; for an embedding ``A`` is the vector of token
    frequencies). Scale-and-shift layers give ``{"F": [1(+1), d]}``, the
    diagonal Fisher of ``[γ; β]``. Layers over ``max_factor_dim`` have the
    factors of their block spec (``kfac_jax_lite.curvature.specs``: ``K``,
    ``Psi``, ``G``, ``B`` when doubly factored; a vector
    for a factor kept as its diagonal).
  """
  estimator = as_estimator(estimator)
  return factor_estimate(_tagged(loss_fn, params, batch, layers), params, batch, key,
                         estimator=estimator.kind, num_samples=estimator.num_samples)
