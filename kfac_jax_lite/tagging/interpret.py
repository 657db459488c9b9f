"""Evaluate a tagged loss with taps: read layer inputs, perturb layer outputs.

This is the zero-perturbation trick (Martens & Grosse 2015, §5; Ba et al.
2017, Appendix B): a zero tensor is added to every layer's output; the
derivative of a loss with respect to it is the layer's output derivative
``ds``, computed by one ordinary reverse-mode pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from kfac_jax_lite.tagging.jaxpr import Path, bind, evaluate, prefixes
from kfac_jax_lite.tagging.layers import Layer, TaggedLoss


@dataclasses.dataclass
class Tapped:
  """What one tapped evaluation returns.

  Attributes:
    loss: the loss value.
    logits: the first operand of the registered loss (the model output).
    targets: the second operand of the registered loss.
    mask: its third operand (the cases that count), or ``None``.
    inputs: layer name -> the activation operand of its product equation,
      one per use of the layer's weight (``Layer.matches``).
  """
  loss: jax.Array
  logits: jax.Array
  targets: jax.Array
  mask: jax.Array | None
  inputs: dict[str, tuple[jax.Array, ...]]


class _Taps:
  """The evaluation hook: reads the loss marker's operands and layer inputs,
  adds perturbations to layer outputs (equations addressed by path)."""

  def __init__(self, tagged: TaggedLoss, perturbations: Mapping[str, jax.Array]):
    self.capture: dict[Path, tuple[Layer, int]] = {}
    self.perturb: dict[Path, tuple[Layer, int]] = {}
    for layer in tagged.factored:
      for use, m in enumerate(layer.matches):
        self.capture[m.path] = (layer, use)
        self.perturb[m.out_path] = (layer, use)
    self.marker = tagged.marker.path
    self.prefixes = prefixes([*self.capture, *self.perturb, self.marker])
    self.perturbations = perturbations
    self.marker_operands: list[Any] = []
    self.inputs: dict[str, list[Any]] = {l.name: [None] * len(l.matches) for l in tagged.factored}

  def __call__(self, eqn: jex_core.JaxprEqn, invals: list[Any], path: Path) -> list[Any]:
    """Evaluates one equation not inlined, reading and perturbing at the taps."""
    if path == self.marker:
      self.marker_operands = invals
    tap = self.capture.get(path)
    if tap is not None:
      layer, use = tap
      self.inputs[layer.name][use] = invals[layer.matches[use].activation_operand]
    outvals = bind(eqn, invals)
    tap = self.perturb.get(path)
    if tap is not None and tap[0].name in self.perturbations:
      layer, use = tap
      outvals = [outvals[0] + self.perturbations[layer.name][use].astype(outvals[0].dtype)]
    return outvals


def tapped_loss(tagged: TaggedLoss, param_leaves: Sequence[jax.Array],
                batch_leaves: Sequence[jax.Array],
                perturbations: Mapping[str, jax.Array]) -> Tapped:
  """Evaluates the loss, adding ``perturbations[name]`` to each layer output.

  Args:
    tagged: the tagged loss.
    param_leaves: flattened parameters (in ``tagged.traced`` order).
    batch_leaves: flattened batch.
    perturbations: layer name -> one array per use of the layer, of that
      use's output shape (zeros, to be differentiated). Layers not present
      are not perturbed.

  Returns:
    The :class:`Tapped` values.
  """
  closed = tagged.traced.jaxpr
  taps = _Taps(tagged, perturbations)
  (loss,) = evaluate(closed.jaxpr, closed.consts, [*param_leaves, *batch_leaves],
                     inline=taps.prefixes, on_equation=taps)
  logits, targets, *mask = taps.marker_operands
  return Tapped(loss=loss, logits=logits, targets=targets, mask=mask[0] if mask else None,
                inputs={name: tuple(by_use) for name, by_use in taps.inputs.items()})


def zero_perturbations(tagged: TaggedLoss) -> dict[str, jax.Array]:
  """Zero perturbations (float32) for every use of every layer's output."""
  return {l.name: tuple(jnp.zeros(m.perturbed_shape, jnp.float32) for m in l.matches)
          for l in tagged.factored}
