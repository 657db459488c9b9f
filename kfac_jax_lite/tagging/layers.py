"""Layer records and ``tag``: which block preconditions each parameter.

A :class:`Layer` is static (frozen, hashable) and is all the curvature code
ever learns about the jaxpr: its kind, the parameter leaves it owns, and, for
Kronecker layers, how to read its inputs and output derivatives.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax

from kfac_jax_lite.losses import DISTRIBUTIONS
from kfac_jax_lite.tagging import grouping, patterns
from kfac_jax_lite.tagging.match import Match
from kfac_jax_lite.tagging.trace import TracedLoss


@dataclasses.dataclass(frozen=True)
class Layer:
  """One preconditioning block, as reported by :func:`kfac_jax_lite.find_layers`.

  Its factors (names, shapes, inverses) are its block spec's,
  :func:`kfac_jax_lite.curvature.specs.spec_for`.

  Attributes:
    name: ``jax.tree_util.keystr`` of the weight's path in ``params`` (the key
      used by :func:`kfac_jax_lite.estimate_curvature` and the optimizer state);
      for a fused weight, its leaves' joined by ``+``.
    kind: the layer family, Kronecker-factored (``"dense"``, ``"conv"``,
      ``"embedding"``: its input factor is a vector), ``"rms"`` (the
      squared-gradient fallback), ``"none"`` (not preconditioned, by a ``blocks`` override) or
      ``"frozen"`` (a non-trainable collection of a Flax variables dict, e.g.
      BatchNorm's ``batch_stats``: its update is zero).
    weight_path: key path of the weight leaf (for ``"rms"``: the leaf;
      for a fused weight: its first leaf, all are ``weight_indices``).
    bias_path: key path of the (first) bias leaf, or ``None``.
    note: why a parameter got the fallback, or how a large layer's factors
      were reduced (see ``max_factor_dim``); empty otherwise.
    weight_index: flat index of the weight leaf in ``params``.
    bias_index: flat index of the bias leaf, or ``None``.
    match: how the layer appears in the jaxpr (``None`` for ``"rms"``);
      for a weight shared by several uses, the first of ``matches``.
    matches: every use of the weight (one for an ordinary layer; the uses of
      a shared weight, e.g. an RNN cell unrolled over time, whose statistics
      are summed: Kronecker-factored weight sharing, K-FAC-expand over uses).
    approximation: ``"expand"`` or ``"reduce"`` for weights shared over extra
      axes (sequence positions, spatial locations), see
      :mod:`kfac_jax_lite.curvature.estimation`.
    input_form: the Kronecker input factor: ``"full"`` (``A``), ``"vector"``
      (``A`` kept as its diagonal: embeddings, or an input too large for
      ``max_factor_dim``) or ``"doubly"`` (``K ⊗ Ψ`` of a flattened feature map, Ba et al. 2017,
      §4; the bias then gets its own full block ``B``).
    output_form: ``"full"`` or ``"vector"`` (its diagonal: an output too
      large for ``max_factor_dim``) output factor ``G``.
  """

  name: str
  kind: str
  weight_path: tuple[Any, ...]
  bias_path: tuple[Any, ...] | None
  note: str = ""
  weight_index: int = dataclasses.field(default=-1, repr=False)
  bias_index: int | None = dataclasses.field(default=None, repr=False)
  match: Match | None = dataclasses.field(default=None, repr=False)
  matches: tuple[Match, ...] = dataclasses.field(default=(), repr=False)
  approximation: str = dataclasses.field(default="expand", repr=False)
  input_form: str = dataclasses.field(default="full", repr=False)
  output_form: str = dataclasses.field(default="full", repr=False)
  full_block: bool = dataclasses.field(default=False, repr=False)

  @property
  def weight_indices(self) -> tuple[int, ...]:
    """Flat indices of the weight leaves: one, or the leaves joined into a
    fused weight (:mod:`.fused`) in joining order."""
    fused = None if self.match is None else self.match.weight_fused
    return (self.weight_index,) if fused is None else fused.indices

  @property
  def bias_indices(self) -> tuple[int, ...]:
    """Flat indices of the bias leaves (none, one, or a fused bias's)."""
    if self.bias_index is None:
      return ()
    fused = None if self.match is None else self.match.bias_fused
    return (self.bias_index,) if fused is None else fused.indices

  @property
  def block(self) -> str:
    """``"kron"`` (Kronecker factors), ``"diagonal_fisher"`` (the exact diagonal
    of the Fisher, ``F``)
    or ``"full"`` (the exact Fisher block of ``[W; b]``, a ``blocks`` choice)."""
    assert self.match is not None
    return "full" if self.full_block else self.match.block

  @property
  def d_in(self) -> int:
    """Rows of the weight matrix, plus one for the bias (the ``A`` size)."""
    assert self.match is not None
    return self.match.d_in + (self.bias_index is not None)

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
  # Leaves a matrix product or convolution reads (see report.fallback_warning).
  products: frozenset[int] = frozenset()

  @property
  def factored(self) -> tuple[Layer, ...]:
    """The layers with curvature factors (Kronecker, or per-example diagonal)."""
    return tuple(l for l in self.layers if l.match is not None)

  @property
  def rms(self) -> tuple[Layer, ...]:
    """The leaves of the squared-gradient (RMSProp-like) fallback."""
    return tuple(l for l in self.layers if l.kind == "rms")

  @property
  def frozen(self) -> tuple[Layer, ...]:
    """Leaves of non-trainable collections (their updates are zero)."""
    return tuple(l for l in self.layers if l.kind == "frozen")


def _describe(uses: list[str], referenced: bool = False, joined: bool = False) -> str:
  if joined:
    return ("joined (concatenate / stack) into a fused weight whose leaves are not all "
            "used only by its products, or one is overridden: rms fallback")
  if not uses and referenced:
    return ("used only off the path to the registered distribution's predictions "
            "(e.g. a weight-decay term): no Fisher: rms fallback")
  if not uses:
    return "not used by the loss: rms fallback"
  kinds = sorted({u.split("@")[0] for u in uses})
  if len(uses) > 1 and set(kinds) & {"dense", "conv", "embedding"}:
    return (f"used {len(uses)} times ({', '.join(kinds)}): a weight shared by uses "
            "that read it differently (e.g. tied embedding and unembedding) or also "
            "used elsewhere is not one Kronecker layer: rms fallback")
  return f"used by {', '.join(kinds)}: no Kronecker pattern: rms fallback"


BLOCK_CHOICES = ("kron", "rms", "full", "none")
DEFAULT_MAX_FACTOR_DIM = 4096


def check_options(approximation: Mapping[str, str], blocks: Mapping[str, str]) -> None:
  """Raises ``ValueError`` for an unknown approximation or block override."""
  for kind, choice in approximation.items():
    if choice not in ("expand", "reduce"):
      raise ValueError(f"{kind}_approximation must be 'expand' or 'reduce', got {choice!r}.")
  for pattern, choice in blocks.items():
    if choice == "diag":
      raise ValueError(f"blocks[{pattern!r}] = 'diag': the squared-gradient fallback is "
                       "now called 'rms'; pass 'rms'.")
    if choice not in BLOCK_CHOICES:
      raise ValueError(f"blocks[{pattern!r}] = {choice!r}: use one of "
                       f"{', '.join(BLOCK_CHOICES)}.")
    re.compile(pattern)


def _fallback(path: tuple[Any, ...], index: int, note: str, kind: str = "rms") -> Layer:
  return Layer(name=jax.tree_util.keystr(path), kind=kind, weight_path=path,
               bias_path=None, note=note, weight_index=index)


def _factor_forms(m: Match, has_bias: bool, max_factor_dim: int) -> tuple[str, str, str]:
  """``(input_form, output_form, note)`` of a Kronecker layer (see :class:`Layer`)."""
  if m.block == "diagonal_fisher":
    return "full", "full", ""
  notes, input_form, output_form = [], "full", "full"
  d_in = m.d_in + has_bias
  split = getattr(m, "input_split", None)
  if m.vector_input:
    input_form = "vector"
  elif d_in > max_factor_dim and split is not None and max(split) <= max_factor_dim:
    input_form = "doubly"
    notes.append(f"input {d_in} > max_factor_dim: doubly factored, "
                 f"{split[0]} locations x {split[1]} channels")
  elif d_in > max_factor_dim:
    input_form = "vector"
    notes.append(f"input {d_in} > max_factor_dim and no flattened feature map: "
                 "vector A (its diagonal)")
  if m.d_out > max_factor_dim:
    output_form = "vector"
    notes.append(f"output {m.d_out} > max_factor_dim: vector G (its diagonal)")
  return input_form, output_form, "; ".join(notes)


def tag(traced: TracedLoss, approximation: Mapping[str, str] | None = None,
        blocks: Mapping[str, str] | None = None,
        max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM) -> TaggedLoss:
  """Assigns every parameter leaf of a traced loss to exactly one block.

  Args:
    traced: the output of :func:`trace_loss`.
    approximation: layer kind -> ``"expand"`` | ``"reduce"`` (default expand).
    blocks: user overrides, regex (searched in the ``keystr`` of a leaf's
      path) -> ``"kron"`` (must be a detected layer), ``"full"`` (the exact
      Fisher block of a detected dense / conv / scale layer's ``[W; b]``, at
      most ``max_factor_dim`` parameters), ``"rms"`` (the squared-gradient
      fallback) or ``"none"`` (gradient passed through unpreconditioned). The
      first matching pattern wins; a bias follows its own pattern, else its
      weight's.
    max_factor_dim: largest Kronecker factor kept as a dense matrix. A larger
      input factor becomes doubly factored (Ba et al. 2017, §4) when the
      input is a visibly flattened feature map, else a vector (its diagonal);
      a larger output factor becomes a vector.

  Returns:
    The :class:`TaggedLoss`.

  Raises:
    ValueError: if the loss registers no predictive distribution, or several,
      or an override asks for a Kronecker block where no layer was detected.
  """
  found = patterns.walk(traced.jaxpr, traced.num_params)
  marker = _the_marker(found)
  blocks = dict(blocks or {})
  approximation = dict(approximation or {})
  check_options(approximation, blocks)
  owned = _layers(traced, found, approximation, blocks, max_factor_dim)
  _add_fallbacks(owned, traced, found, blocks)
  unique = {id(l): l for ls in owned.values() for l in ls}.values()
  order = lambda l: (l.weight_index, l.match.weight_part or () if l.match else ())
  return TaggedLoss(traced=traced, marker=marker, products=frozenset(found.products),
                    layers=tuple(sorted(unique, key=order)))


def _the_marker(found: patterns.WalkResult) -> patterns.LossMarker:
  """The one registered predictive distribution; raises unless there is exactly one."""
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
  return marker


def _layers(traced: TracedLoss, found: patterns.WalkResult, approximation: Mapping[str, str],
            blocks: Mapping[str, str], max_factor_dim: int) -> dict[int, list[Layer]]:
  """Leaf index -> the layers that own it, one layer per group of matches."""
  paths, frozen = traced.param_paths, traced.frozen
  shapes = [tuple(v.aval.shape) for v in traced.jaxpr.jaxpr.invars[:traced.num_params]]
  groups = grouping.weight_groups(found, paths, shapes, blocks, frozen)
  bias_of = grouping.biases(groups, found, paths, shapes, blocks, frozen)
  grouping.check_registrations(found, groups, bias_of, paths, shapes, blocks)
  owned: dict[int, list[Layer]] = {}
  for (index, part), ms in groups.items():
    bias_index, bias_part = bias_of[index, part]
    ms = tuple(dataclasses.replace(m, bias_index=bias_index, bias_part=bias_part, bias_fused=(
        None if bias_index is None else m.bias_fused)) for m in ms)
    leaves = ms[0].weight_fused.indices if ms[0].weight_fused is not None else (index,)
    name = ("+".join(jax.tree_util.keystr(paths[i]) for i in leaves)
            + grouping.part_suffix(part, shapes[index]))
    full, input_form, output_form, note = _forms(name, ms[0], bias_index is not None, blocks,
                                                 max_factor_dim)
    if len(ms) > 1:
      note = "; ".join(filter(None, [f"shared by {len(ms)} uses: statistics summed", note]))
    layer = Layer(
        name=name, kind=ms[0].kind, full_block=full,
        weight_path=paths[index], bias_path=None if bias_index is None else paths[bias_index],
        weight_index=index, bias_index=bias_index, match=ms[0], matches=ms,
        approximation=approximation.get(ms[0].kind, "expand"),
        input_form=input_form, output_form=output_form, note=note)
    for i in set(layer.weight_indices + layer.bias_indices):
      owned.setdefault(i, []).append(layer)
  return owned


def _forms(name: str, m: Match, has_bias: bool, blocks: Mapping[str, str],
           max_factor_dim: int) -> tuple[bool, str, str, str]:
  """``(full, input_form, output_form, note)``: a ``"full"`` override, else
  the Kronecker factor forms (:func:`_factor_forms`)."""
  if grouping.match_override(name, blocks) == "full":
    grouping.check_full(name, m, has_bias, max_factor_dim)
    return True, "full", "full", "blocks override: full Fisher block"
  return (False, *_factor_forms(m, has_bias, max_factor_dim))


def _add_fallbacks(owned: dict[int, list[Layer]], traced: TracedLoss,
                   found: patterns.WalkResult, blocks: Mapping[str, str]) -> None:
  """Gives every leaf no layer owns its record: frozen, ``"none"`` or ``"rms"``."""
  joined = {i for m in found.layers if m.weight_fused is not None for i in m.weight_fused.indices}
  for i, path in enumerate(traced.param_paths):
    if i in traced.frozen:
      owned[i] = [_fallback(path, i, f"non-trainable collection {traced.frozen[i]!r}: update 0",
                            "frozen")]
    if i in owned:
      continue
    name = jax.tree_util.keystr(path)
    choice = grouping.match_override(name, blocks)
    why = _describe(grouping.leaf_uses(found.uses, i), i in found.referenced, i in joined)
    if choice in ("kron", "full"):
      raise ValueError(
          f"blocks asks for a {'Kronecker' if choice == 'kron' else 'full'} block for "
          f"{name}, but no layer was detected there ({why}).")
    owned[i] = [_fallback(path, i, "blocks override: not preconditioned", "none")
                if choice == "none" else _fallback(
                    path, i, "blocks override: rms" if choice == "rms" else why)]
