"""Layer records and ``find_layers``: which block preconditions each parameter.

A :class:`Layer` is static (frozen, hashable) and is all the curvature code
ever learns about the jaxpr: its kind, the parameter leaves it owns, and, for
Kronecker layers, how to read its inputs and output derivatives.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from kfac_jax_lite.losses import DISTRIBUTIONS
from kfac_jax_lite.tagging import patterns
from kfac_jax_lite.tagging.match import Match
from kfac_jax_lite.tagging.trace import TracedLoss, trace_loss


@dataclasses.dataclass(frozen=True)
class Layer:
  """One preconditioning block, as reported by :func:`find_layers`.

  Attributes:
    name: ``jax.tree_util.keystr`` of the weight's path in ``params`` (the key
      used by :func:`kfac_jax_lite.estimate_curvature` and the optimizer state).
    kind: the layer family, Kronecker-factored (``"dense"``, ``"conv"``,
      ``"embedding"``: its input factor is diagonal), or
      ``"diagonal"`` (the fallback).
    weight_path: key path of the weight leaf (for ``"diagonal"``: the leaf).
    bias_path: key path of the bias leaf, or ``None``.
    note: why a parameter got the fallback (empty for detected layers).
    weight_index: flat index of the weight leaf in ``params``.
    bias_index: flat index of the bias leaf, or ``None``.
    match: how the layer appears in the jaxpr (``None`` for ``"diagonal"``).
    approximation: ``"expand"`` or ``"reduce"`` for weights shared over extra
      axes (sequence positions, spatial locations), see
      :mod:`kfac_jax_lite.statistics`.
  """

  name: str
  kind: str
  weight_path: tuple[Any, ...]
  bias_path: tuple[Any, ...] | None
  note: str = ""
  weight_index: int = dataclasses.field(default=-1, repr=False)
  bias_index: int | None = dataclasses.field(default=None, repr=False)
  match: Match | None = dataclasses.field(default=None, repr=False)
  approximation: str = dataclasses.field(default="expand", repr=False)

  @property
  def d_in(self) -> int:
    """Rows of the weight matrix, plus one for the bias (the ``A`` size)."""
    assert self.match is not None
    return self.match.d_in + (self.bias_index is not None)

  @property
  def factor_shapes(self) -> dict[str, tuple[int, ...]]:
    """Shapes of the ``A`` and ``G`` factors (``A`` is a vector if diagonal)."""
    assert self.match is not None
    a = (self.d_in,) if self.match.diagonal_input else (self.d_in, self.d_in)
    return {"A": a, "G": (self.d_out, self.d_out)}

  @property
  def d_out(self) -> int:
    """Columns of the weight matrix (the ``G`` size)."""
    assert self.match is not None
    return self.match.d_out


@dataclasses.dataclass(frozen=True)
class TaggedLoss:
  """A traced loss with its layers and its loss marker (static across steps)."""
  traced: TracedLoss
  layers: tuple[Layer, ...]
  marker: patterns.LossMarker

  @property
  def kron(self) -> tuple[Layer, ...]:
    """The Kronecker-factored layers."""
    return tuple(l for l in self.layers if l.match is not None)

  @property
  def diagonal(self) -> tuple[Layer, ...]:
    return tuple(l for l in self.layers if l.kind == "diagonal")


def _describe(uses: list[str]) -> str:
  if not uses:
    return "not used by the loss: diagonal fallback"
  kinds = sorted({u.split("@")[0] for u in uses})
  if len(uses) > 1 and set(kinds) & {"dense", "conv", "embedding"}:
    return (f"used {len(uses)} times ({', '.join(kinds)}): a tied or shared "
            "weight is not one Kronecker layer: diagonal fallback")
  return f"used by {', '.join(kinds)}: no Kronecker pattern: diagonal fallback"


def tag(traced: TracedLoss, approximation: Mapping[str, str] | None = None) -> TaggedLoss:
  """Assigns every parameter leaf of a traced loss to exactly one block.

  Args:
    traced: the output of :func:`trace_loss`.
    approximation: layer kind -> ``"expand"`` | ``"reduce"`` (default expand).

  Returns:
    The :class:`TaggedLoss`.

  Raises:
    ValueError: if the loss registers no predictive distribution, or several.
  """
  found = patterns.walk(traced.jaxpr, traced.num_params)
  if not found.markers:
    raise ValueError(
        "loss_fn registers no predictive distribution: compute the loss with "
        "one of kfac_jax_lite.losses (softmax_cross_entropy, "
        "sigmoid_cross_entropy, squared_error) so K-FAC knows the model's "
        "output distribution.")
  if len(found.markers) > 1:
    raise ValueError(
        f"loss_fn calls {len(found.markers)} kfac_jax_lite.losses functions; "
        "exactly one is supported: concatenate the outputs or sum the losses "
        "outside the registered one.")
  marker = found.markers[0]
  if marker.distribution not in DISTRIBUTIONS:
    raise ValueError(f"Unknown registered loss {marker.distribution!r}.")
  paths = traced.param_paths
  keystr = jax.tree_util.keystr
  owned: set[int] = set()
  layers: list[Layer] = []
  approximation = dict(approximation or {})
  for m in found.layers:
    if found.uses.get(m.weight_index) != [f"{m.kind}@{m.path}"]:
      continue
    bias = m.bias_index
    if bias is not None and found.uses.get(bias) != [f"bias@{m.out_path}"]:
      bias = None
    layers.append(Layer(
        name=keystr(paths[m.weight_index]), kind=m.kind,
        weight_path=paths[m.weight_index],
        bias_path=None if bias is None else paths[bias],
        weight_index=m.weight_index, bias_index=bias,
        match=dataclasses.replace(m, bias_index=bias),
        approximation=approximation.get(m.kind, "expand")))
    owned.add(m.weight_index)
    if bias is not None:
      owned.add(bias)
  for i, path in enumerate(paths):
    if i not in owned:
      layers.append(Layer(
          name=keystr(path), kind="diagonal", weight_path=path, bias_path=None,
          note=_describe(found.uses.get(i, [])), weight_index=i))
  order = {i: k for k, i in enumerate(range(len(paths)))}
  layers.sort(key=lambda l: order[l.weight_index])
  return TaggedLoss(traced=traced, layers=tuple(layers), marker=marker)


def find_layers(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                batch: Any) -> list[Layer]:
  """Lists the blocks K-FAC will use, one record per block.

  Every parameter leaf appears in exactly one record: as the weight or bias of
  a ``"dense"`` layer, or as a ``"diagonal"`` fallback with a ``note`` saying
  why. Nothing is run on data: the loss is traced on abstract values.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` built with a
      :mod:`kfac_jax_lite.losses` function.
    params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
    batch: a batch pytree (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    The list of :class:`Layer` records, in parameter order.
  """
  return list(tag(trace_loss(loss_fn, params, batch)).layers)
