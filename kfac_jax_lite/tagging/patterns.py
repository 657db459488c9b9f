"""Walk a traced loss and match layer patterns in its equations.

The walk tracks, for every jaxpr variable (:mod:`.values`), whether it is a
*view* of a single parameter leaf (reached only through reshape / transpose /
dtype casts, or broadcasts for biases) and whether it depends on the batch. A
product of a parameter view and a batch-dependent activation is a layer (Ba et
al. 2017, Appendix B: a parameter whose gradient's immediate parent is a
matrix product or a convolution gets a Kronecker factorization); each family's
matcher lives in its own module (:mod:`.dense`, :mod:`.conv`, :mod:`.embedding`,
:mod:`.scale` for scale-and-shift parameters). An ``add`` of a broadcast
parameter to such a product's (otherwise unused) output is its bias. Every
other use of a parameter is recorded, so a weight used twice (tied) or also
elsewhere is never mistaken for an independent layer.

Equations are addressed by their *path*: the tuple of equation indices from
the top-level jaxpr through inlined calls (``jit``, ``custom_jvp_call``,
``remat``) down to the equation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax.extend import core as jex_core

from kfac_jax_lite.losses import MARKER_PREFIX
from kfac_jax_lite.registration import REGISTRATION_PREFIX
from kfac_jax_lite.tagging import conv, dense, embedding, fused, hidden, relevance, scale, values
from kfac_jax_lite.tagging.jaxpr import PRODUCTS, body_operands, call_name, inlined_body, is_var
from kfac_jax_lite.tagging.match import Match, ParamView, Path

# One matcher per layer family: primitive name -> matcher.
MATCHERS = {"dot_general": dense.match, "conv_general_dilated": conv.match,
            "gather": embedding.match, "mul": scale.match_scale, "add": scale.match_shift}


@dataclasses.dataclass(frozen=True)
class LossMarker:
  path: Path
  distribution: str
  logits_shape: tuple[int, ...]


@dataclasses.dataclass
class WalkResult:
  """Everything the walk found: layer matches, loss markers, parameter uses."""
  layers: list[Match] = dataclasses.field(default_factory=list)
  markers: list[LossMarker] = dataclasses.field(default_factory=list)
  # (param index, part) -> list of descriptions of each use ("dense@path",
  # "bias@path", or the primitive name (and why it was not matched) of any
  # other use); part is None for the whole leaf, or a box of it (a slice).
  uses: dict[tuple[int, Any], list[str]] = dataclasses.field(default_factory=dict)
  # (param index, part) -> "weight" | "bias", for layers registered by hand.
  registered: dict[tuple[int, Any], str] = dataclasses.field(default_factory=dict)
  # Parameter indices read by any equation of the loss (relevant or not).
  referenced: set[int] = dataclasses.field(default_factory=set)
  # Parameter indices a matrix product or convolution on the path to the
  # predictions reads (as a detected layer or not).
  products: set[int] = dataclasses.field(default_factory=set)


class _Walker:
  """One pass over the jaxpr tree; fills a :class:`WalkResult`."""

  def __init__(self, relevant: relevance.Relevant):
    self.result = WalkResult()
    # Variables on a path to a registered distribution's predictions, per
    # jaxpr: only their equations are layers or uses (see :mod:`.relevance`).
    self._relevant = relevant
    # Matches still looking for a bias, by id of their product's output variable.
    # Each entry also holds the permutation of transposes between the product
    # and the current variable (``jax.vmap(lambda x: W @ x + b)`` transposes).
    self._pending: dict[int, tuple[Match, tuple[int, ...] | None]] = {}
    # Pending products that are zero (an RNN's zero initial carry times its
    # hidden-to-hidden kernel): a use of the weight only if a bias is added.
    self._zero: dict[int, ParamView] = {}

  def _use(self, view: ParamView, what: str) -> None:
    for key in view.keys:  # each leaf of a fused view
      self.result.uses.setdefault(key, []).append(what)

  def walk(self, jaxpr: jex_core.Jaxpr, views: list[ParamView | None],
           data: list[bool], prefix: Path) -> tuple[list[ParamView | None], list[bool]]:
    """Walks one jaxpr (inlined call bodies recursively), equation by equation.

    Args:
      jaxpr: the loss's jaxpr, or an inlined call's body.
      views: the parameter view of each input (``None``: not a parameter).
      data: whether each input depends on the batch.
      prefix: the path of the call equation (``()`` for the loss).

    Returns:
      The parameter views and batch dependence of the jaxpr's outputs.
    """
    env = values.Values(counts=relevance.use_counts(jaxpr, prefix, self._relevant),
                        live=self._relevant.get(prefix, set()))
    env.bind(jaxpr.invars, views, data)
    for i in range(len(jaxpr.eqns)):
      self._visit(jaxpr, prefix + (i,), env)
    out_views = [env.view(v) for v in jaxpr.outvars]
    for v, pv in zip(jaxpr.outvars, out_views):  # a parameter returned from a call
      if pv is not None and not prefix and v in env.live:  # is used outside
        self._use(pv, "output")
    self._flush(prefix)
    return out_views, [env.is_data(v) for v in jaxpr.outvars]

  def _visit(self, jaxpr: jex_core.Jaxpr, path: Path, env: values.Values) -> None:
    """Equation ``path[-1]`` of ``jaxpr``: a loss marker, a registration, an
    inlined call, a view, a bias, a layer, or a use of each parameter it reads."""
    eqn = jaxpr.eqns[path[-1]]
    in_views = [env.view(a) for a in eqn.invars]
    in_data = [env.is_data(a) for a in eqn.invars]
    if relevance.is_marker(eqn):
      self._add_marker(eqn, path, in_views)
      env.mark_data(eqn, any(in_data))
    elif call_name(eqn).startswith(REGISTRATION_PREFIX):
      if env.needed(eqn):
        self._add_registered(eqn, path, in_views)
        env.mark_data(eqn, True)
    elif (body := inlined_body(eqn)) is not None:
      n_body = len(body.jaxpr.invars)
      env.bind(eqn.outvars, *self.walk(body.jaxpr, body_operands(in_views, n_body),
                                       body_operands(in_data, n_body), path))
    elif not env.needed(eqn):  # off the path to the predictions
      pass
    elif env.is_zero(eqn):
      env.zeros.add(eqn.outvars[0])
      self._zero_product(eqn, path, in_views, env)
    elif (view := values.derived_view(eqn, in_views)) is not None:
      env.views[eqn.outvars[0]] = view
    elif (eqn.invars and id(eqn.invars[0]) in self._pending
          and env.counts.get(eqn.outvars[0], 0) == 1 and self._follow_pending(eqn)):
      env.mark_data(eqn, True)
    else:
      self._visit_product(jaxpr, path, env, in_views, in_data)

  def _visit_product(self, jaxpr: jex_core.Jaxpr, path: Path, env: values.Values,
                     in_views: list[ParamView | None], in_data: list[bool]) -> None:
    """A bias add, a layer's product, or an unmatched use of its parameters."""
    eqn = jaxpr.eqns[path[-1]]
    env.track_flatten(eqn, in_data)
    name = eqn.primitive.name
    if name == "add" and self._match_bias(eqn, path, in_views):
      env.mark_data(eqn, True)
      return
    matcher = MATCHERS.get(name)
    found = matcher(eqn, path, in_views, in_data) if matcher else None
    if isinstance(found, Match):
      found = fused.admit(found, in_views[found.weight_operand])
    if isinstance(found, dense.DenseMatch):
      act = eqn.invars[1 - found.weight_operand]
      found = dense.with_flatten_origin(found, tuple(act.aval.shape), env.flat.get(act))
    if isinstance(found, Match):
      self._add_layer(found, in_views[found.weight_operand], eqn, env.counts)
      env.mark_data(eqn, True)
      return
    if isinstance(found, str):
      name = f"{name} ({found})"
    self._use_all(eqn, in_views, name, name == "concatenate"
                  and hidden.concatenated_into_product(jaxpr, path[-1]))
    env.mark_data(eqn, any(in_data))

  def _add_marker(self, eqn, path: Path, in_views: list[ParamView | None]) -> None:
    """A registered loss: its distribution and the predictions' shape."""
    self.result.markers.append(LossMarker(
        path, call_name(eqn)[len(MARKER_PREFIX):], tuple(eqn.invars[0].aval.shape)))
    if in_views[0] is not None:  # the predictions are a parameter
      self._use(in_views[0], "loss")

  def _use_all(self, eqn, in_views: list[ParamView | None], what: str,
               into_product: bool = False) -> None:
    """Records an unmatched use of every parameter operand, and which of them
    a matrix product or convolution reads (here, inside a ``cond`` / ``while``
    / rolled ``scan``, or, ``into_product``, after this equation)."""
    if all(pv is None for pv in in_views):
      return
    inside = hidden.multiplied_operands(eqn)
    for k, pv in enumerate(in_views):
      if pv is not None:
        self._use(pv, what)
        if into_product or eqn.primitive.name in PRODUCTS or k in inside:
          self.result.products.update(i for i, _ in pv.keys)

  def _add_registered(self, eqn, path: Path, in_views: list[ParamView | None]) -> None:
    """A ``kfl.register_dense`` equation: one dense layer, body not inspected."""
    bias = str(eqn.params["name"]).endswith("_bias")
    found = dense.registered(eqn, path, in_views, bias)
    if isinstance(found, str):
      raise ValueError(f"kfl.register_dense: {found}.")
    self.result.layers.append(found)
    self.result.registered[found.weight_index, found.weight_part] = "weight"
    self._use(in_views[found.weight_operand], f"dense@{path}")
    self.result.products.add(found.weight_index)
    if bias:
      self._use(in_views[-1], f"bias@{path}")
      self.result.registered[found.bias_index, found.bias_part] = "bias"

  def _add_layer(self, match: Match, pv: ParamView, eqn, counts) -> None:
    match = dataclasses.replace(match, weight_part=pv.part)
    self._use(pv, f"{match.kind}@{match.path}")
    if match.kind in ("dense", "conv"):
      self.result.products.update(i for i, _ in pv.keys)
    if match.takes_bias and counts.get(eqn.outvars[0], 0) == 1:  # a bias add may follow
      self._pending[id(eqn.outvars[0])] = (match, None)
    else:
      self.result.layers.append(match)

  def _zero_product(self, eqn, path: Path, in_views: list[ParamView | None],
                    env: values.Values) -> None:
    """A product of a weight and an all-zero activation (``h_0 @ W_h`` with a
    zero initial carry) waits for a bias: ``0 @ W_h + b_h`` reads ``b_h`` as
    that use's bias, with input ``[0; 1]`` (so the bias joins ``W_h``'s
    block); without a bias add it is no use of ``W_h`` at all."""
    matcher = MATCHERS.get(eqn.primitive.name)
    if eqn.primitive.name not in PRODUCTS or env.counts.get(eqn.outvars[0], 0) != 1:
      return
    zeros = [is_var(a) and a in env.zeros for a in eqn.invars]
    found = matcher(eqn, path, in_views, zeros)
    pv = in_views[found.weight_operand] if isinstance(found, Match) else None
    if isinstance(found, Match) and found.takes_bias and fused.admit(found, pv) is found:
      self._pending[id(eqn.outvars[0])] = (dataclasses.replace(found, weight_part=pv.part), None)
      self._zero[id(eqn.outvars[0])] = pv

  def _follow_pending(self, eqn) -> bool:
    """Carries a product still looking for its bias through a transpose, or a
    reshape / squeeze that only adds or drops unit axes (``jax.vmap`` of an
    Equinox conv does both); the bias add must see the product's values."""
    match, perm = self._pending[id(eqn.invars[0])]
    name = eqn.primitive.name
    shape_in = tuple(eqn.invars[0].aval.shape)
    shape_out = tuple(eqn.outvars[0].aval.shape)
    current = dataclasses.replace(match, out_perm=perm).perturbed_shape
    if name == "transpose" and shape_in == current:
      step = tuple(eqn.params["permutation"])
      perm = step if perm is None else tuple(perm[i] for i in step)
    elif name in ("reshape", "squeeze", "expand_dims") and _drop_ones(shape_in) == _drop_ones(
        shape_out) and (shape_in == current or shape_out == current):
      pass
    else:
      return False
    del self._pending[id(eqn.invars[0])]
    self._pending[id(eqn.outvars[0])] = (match, perm)
    if id(eqn.invars[0]) in self._zero:
      self._zero[id(eqn.outvars[0])] = self._zero.pop(id(eqn.invars[0]))
    return True

  def _match_bias(self, eqn, path, in_views) -> bool:
    for k in (0, 1):
      pending = self._pending.get(id(eqn.invars[k]))
      pv = in_views[1 - k]
      if pending is None or pv is None:
        continue
      match = dataclasses.replace(pending[0], out_perm=pending[1])
      if tuple(eqn.outvars[0].aval.shape) != match.perturbed_shape or math.prod(
          pv.shape) != match.d_out or not _bias_broadcasts(_varying_axes(pv, eqn.invars[1 - k]),
                                                           match):
        continue
      del self._pending[id(eqn.invars[k])]
      weight = self._zero.pop(id(eqn.invars[k]), None)
      if weight is not None:  # a zero product: its bias makes it a use
        self._use(weight, f"{match.kind}@{match.path}")
        self.result.products.update(i for i, _ in weight.keys)
      self.result.layers.append(dataclasses.replace(
          match, out_path=path, bias_index=pv.index, bias_part=pv.part, bias_fused=pv.fused))
      self._use(pv, f"bias@{path}")
      return True
    return False

  def _flush(self, prefix: Path) -> None:
    """Commits matches of this jaxpr that found no bias."""
    for key, (match, _) in list(self._pending.items()):
      if match.path[:len(prefix)] == prefix and len(match.path) == len(prefix) + 1:
        if self._zero.pop(key, None) is None:  # a zero product with no bias is no use
          self.result.layers.append(match)
        del self._pending[key]


def _drop_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(d for d in shape if d != 1)


def _varying_axes(pv: ParamView, operand: Any) -> tuple[int, ...]:
  """The axes of an added parameter operand along which its values vary.

  For ``jnp.broadcast_to(b, shape)`` (Haiku) the operand has the full shape;
  its values still vary only along the axes the broadcast maps ``b``'s
  non-unit axes to.
  """
  last = pv.chain[-1] if pv.chain else None
  if last is not None and last.primitive.name == "broadcast_in_dim":
    src = tuple(last.invars[0].aval.shape)
    return tuple(d for d, n in zip(last.params["broadcast_dimensions"], src) if n != 1)
  return tuple(d for d, n in enumerate(operand.aval.shape) if n != 1)


def _bias_broadcasts(varying: tuple[int, ...], match: Match) -> bool:
  """True if the added operand varies only along the output feature axes."""
  perm = match.out_perm or tuple(range(len(match.out_shape)))
  return all(perm[d] in match.out_feature_axes for d in varying)


def walk(closed: jex_core.ClosedJaxpr, num_params: int) -> WalkResult:
  """Finds layer matches, loss markers and all parameter uses.

  Args:
    closed: the traced loss; its first ``num_params`` inputs are parameters,
      the rest are the batch.
    num_params: number of parameter leaves.

  Returns:
    The :class:`WalkResult`.
  """
  n_in = len(closed.jaxpr.invars)
  views: list[ParamView | None] = [
      ParamView(i, tuple(v.aval.shape))
      for i, v in enumerate(closed.jaxpr.invars[:num_params])]
  views += [None] * (n_in - num_params)
  data = [False] * num_params + [True] * (n_in - num_params)
  walker = _Walker(relevance.relevant_vars(closed.jaxpr))
  walker.walk(closed.jaxpr, views, data, ())
  walker.result.referenced = relevance.referenced(closed.jaxpr, num_params)
  return walker.result
