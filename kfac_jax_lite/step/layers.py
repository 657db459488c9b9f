"""The traced and tagged loss of a transform, once per parameter/batch signature."""

from __future__ import annotations

from typing import Any, Callable

import jax

from kfac_jax_lite.curvature.specs import spec_for
from kfac_jax_lite.options import LayerOptions
from kfac_jax_lite.tagging.layers import TaggedLoss, tag
from kfac_jax_lite.tagging.trace import abstractify, trace_loss, type_key


def _structure(tagged: TaggedLoss) -> tuple[Any, ...]:
  """What must agree between two batches' layers (names, kinds and shapes)."""
  return tuple((l.name, l.kind, l.bias_index, l.input_form, l.output_form,
                spec_for(l).factor_shapes if l.match else None) for l in tagged.layers)


class LayerCache:
  """``loss_fn``'s layers for given parameters and batch, traced once each.

  Tracing is a static, Python-side computation (no arrays are computed), so
  the cache holds only values determined by ``loss_fn``, the options and the
  shapes and dtypes of its inputs: the transform stays pure.
  """

  def __init__(self, loss_fn: Callable[[Any, Any], jax.Array], sample_batch: Any,
               options: LayerOptions):
    self._loss_fn = loss_fn
    self._options = options
    self.sample_batch = abstractify(sample_batch)
    self._cache: dict[Any, TaggedLoss] = {}

  def _trace(self, params: Any, batch: Any, what: str) -> TaggedLoss:
    try:
      traced = trace_loss(self._loss_fn, params, batch)
    except Exception as e:  # The user's loss failed on our inputs: say which.
      e.add_note(f"kfac_jax_lite: tracing loss_fn(params, {what}) failed; {what} must "
                 "have the tree structure, shapes and dtypes of the batches your "
                 "loss_fn takes (arrays or jax.ShapeDtypeStruct).")
      raise
    return tag(traced, self._options.approximation, dict(self._options.blocks),
               self._options.max_factor_dim)

  def __call__(self, params: Any, batch: Any | None = None) -> TaggedLoss:
    """The layers for ``params`` and ``batch`` (``sample_batch`` if ``None``).

    Raises:
      ValueError: if ``batch``'s layers differ from ``sample_batch``'s.
    """
    reference = batch is None
    batch = self.sample_batch if reference else batch
    key = (type_key(params), type_key(batch))
    if key in self._cache:
      return self._cache[key]
    ref_key = (key[0], type_key(self.sample_batch))
    if ref_key != key:
      if jax.tree_util.tree_structure(batch) != jax.tree_util.tree_structure(
          self.sample_batch):
        raise ValueError(
            "batch has a different tree structure than sample_batch: "
            f"{jax.tree_util.tree_structure(batch)} vs "
            f"{jax.tree_util.tree_structure(self.sample_batch)}.")
      tagged = self._trace(params, batch, "batch")
      if _structure(tagged) != _structure(self(params)):
        raise ValueError(
            f"batch changes the layers K-FAC detected for sample_batch (batch "
            f"{key[1]} vs sample_batch {ref_key[1]}); pass a sample_batch with "
            "the shapes and dtypes of your training batches.")
    else:
      tagged = self._trace(params, batch, "sample_batch" if reference else "batch")
    self._cache[key] = tagged
    return tagged
