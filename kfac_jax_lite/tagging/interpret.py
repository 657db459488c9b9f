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

from kfac_jax_lite.tagging.layers import Layer, TaggedLoss
from kfac_jax_lite.tagging.eqns import bind_eqn, read
from kfac_jax_lite.tagging.trace import inlined_body


@dataclasses.dataclass
class Tapped:
  """What one tapped evaluation returns.

  Attributes:
    loss: the scalar loss.
    logits: the first operand of the registered loss (the model output).
    targets: the second operand of the registered loss.
    inputs: layer name -> the activation operand of its product equation,
      one per use of the layer's weight (``Layer.matches``).
  """
  loss: jax.Array
  logits: jax.Array
  targets: jax.Array
  inputs: dict[str, tuple[jax.Array, ...]]


class _Taps:
  """Static lookup tables from equation paths to layer actions."""

  def __init__(self, tagged: TaggedLoss):
    self.capture: dict[tuple[int, ...], tuple[Layer, int]] = {}
    self.perturb: dict[tuple[int, ...], tuple[Layer, int]] = {}
    for layer in tagged.factored:
      for use, m in enumerate(layer.matches):
        self.capture[m.path] = (layer, use)
        self.perturb[m.out_path] = (layer, use)
    self.marker = tagged.marker.path
    paths = list(self.capture) + list(self.perturb) + [self.marker]
    self.prefixes = {p[:k] for p in paths for k in range(1, len(p))}


def _eval(jaxpr: jex_core.Jaxpr, consts: Sequence[Any], args: Sequence[Any],
          prefix: tuple[int, ...], taps: _Taps,
          perturbations: Mapping[str, jax.Array], out: dict[str, Any]) -> list[Any]:
  env: dict[Any, Any] = {}
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for i, eqn in enumerate(jaxpr.eqns):
    path = prefix + (i,)
    invals = [read(env, a) for a in eqn.invars]
    body = inlined_body(eqn) if path in taps.prefixes else None
    if body is not None:
      sub_jaxpr, sub_consts = body
      outvals = _eval(sub_jaxpr, sub_consts, invals, path, taps, perturbations, out)
    else:
      if path == taps.marker:
        out["logits"], out["targets"] = invals[0], invals[1]
      tap = taps.capture.get(path)
      if tap is not None:
        layer, use = tap
        out["inputs"].setdefault(layer.name, {})[use] = invals[
            layer.matches[use].activation_operand]
      outvals = bind_eqn(eqn, invals)
      tap = taps.perturb.get(path)
      if tap is not None and tap[0].name in perturbations:
        layer, use = tap
        outvals = [outvals[0] + perturbations[layer.name][use].astype(outvals[0].dtype)]
    env.update(zip(eqn.outvars, outvals))
  return [read(env, v) for v in jaxpr.outvars]


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
  out: dict[str, Any] = {"inputs": {}}
  closed = tagged.traced.jaxpr
  (loss,) = _eval(closed.jaxpr, closed.consts, [*param_leaves, *batch_leaves],
                  (), _Taps(tagged), perturbations, out)
  inputs = {name: tuple(by_use[u] for u in sorted(by_use))
            for name, by_use in out["inputs"].items()}
  return Tapped(loss=loss, logits=out["logits"], targets=out["targets"], inputs=inputs)


def zero_perturbations(tagged: TaggedLoss) -> dict[str, jax.Array]:
  """Zero perturbations (float32) for every use of every layer's output."""
  return {l.name: tuple(jnp.zeros(m.perturbed_shape, jnp.float32) for m in l.matches)
          for l in tagged.factored}
