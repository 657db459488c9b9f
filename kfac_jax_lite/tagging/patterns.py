"""Walk a traced loss and match layer patterns in its equations.

The walk tracks, for every jaxpr variable, whether it is a *view* of a single
parameter leaf (reached only through reshape / transpose / dtype casts, or
broadcasts for biases) and whether it depends on the batch. A ``dot_general``
between a parameter view and a batch-dependent activation is a dense layer
(Ba et al. 2017, Appendix B: a parameter whose gradient's immediate parent is a
matrix product gets a Kronecker factorization); an ``add`` of a broadcast
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
from kfac_jax_lite.tagging.trace import inlined_body

Path = tuple[int, ...]

# Value-preserving reshapes of a parameter: the weight is still "the weight".
VIEW_PRIMITIVES = frozenset({
    "reshape", "transpose", "convert_element_type", "squeeze", "expand_dims",
    "copy", "copy_p"})
# Views that may only feed a bias (they repeat values).
BROADCAST_PRIMITIVES = frozenset({"broadcast_in_dim"})


@dataclasses.dataclass(frozen=True)
class ParamView:
  """A variable holding a parameter leaf seen through view equations."""
  index: int
  root_shape: tuple[int, ...]  # shape of the parameter leaf itself
  chain: tuple[Any, ...] = ()  # the view equations, in order of application
  broadcast: bool = False


@dataclasses.dataclass(frozen=True)
class DenseMatch:
  """A ``dot_general`` of a parameter view with an activation."""
  dot_path: Path
  weight_index: int
  weight_operand: int  # 0 (lhs) or 1 (rhs) of the dot_general
  weight_chain: tuple[Any, ...]
  act_contract: tuple[int, ...]
  weight_contract: tuple[int, ...]
  weight_free: tuple[int, ...]
  act_free: tuple[int, ...]
  weight_shape: tuple[int, ...]  # shape of the dot_general's weight operand
  out_path: Path  # equation whose output gets the perturbation
  out_shape: tuple[int, ...]
  bias_index: int | None = None


@dataclasses.dataclass(frozen=True)
class LossMarker:
  path: Path
  distribution: str
  logits_shape: tuple[int, ...]


@dataclasses.dataclass
class WalkResult:
  """Everything the walk found: dense matches, loss markers, parameter uses."""
  dense: list[DenseMatch] = dataclasses.field(default_factory=list)
  markers: list[LossMarker] = dataclasses.field(default_factory=list)
  # param index -> list of descriptions of each use ("dense@path", "bias@path",
  # or the primitive name of an unrecognized use).
  uses: dict[int, list[str]] = dataclasses.field(default_factory=dict)


def _use_counts(jaxpr: jex_core.Jaxpr) -> dict[Any, int]:
  counts: dict[Any, int] = {}
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if not isinstance(v, jex_core.Literal):
        counts[v] = counts.get(v, 0) + 1
  for v in jaxpr.outvars:
    if not isinstance(v, jex_core.Literal):
      counts[v] = counts.get(v, 0) + 1
  return counts


class _Walker:
  """One pass over the jaxpr tree; fills a :class:`WalkResult`."""

  def __init__(self):
    self.result = WalkResult()
    # Pending dense matches by id of their dot_general output variable.
    self._pending: dict[int, DenseMatch] = {}

  def _use(self, view: ParamView, what: str) -> None:
    self.result.uses.setdefault(view.index, []).append(what)

  def walk(self, jaxpr: jex_core.Jaxpr, views: list[ParamView | None],
           data: list[bool], prefix: Path) -> tuple[list[ParamView | None], list[bool]]:
    view_env: dict[Any, ParamView] = {}
    data_env: set[Any] = set()
    for v, pv, d in zip(jaxpr.invars, views, data):
      if pv is not None:
        view_env[v] = pv
      if d:
        data_env.add(v)
    counts = _use_counts(jaxpr)

    def view_of(atom):
      return None if isinstance(atom, jex_core.Literal) else view_env.get(atom)

    def is_data(atom):
      return not isinstance(atom, jex_core.Literal) and atom in data_env

    for i, eqn in enumerate(jaxpr.eqns):
      path = prefix + (i,)
      name = eqn.primitive.name
      in_views = [view_of(a) for a in eqn.invars]
      in_data = [is_data(a) for a in eqn.invars]
      any_data = any(in_data)

      if name in ("jit", "pjit") and str(eqn.params.get("name", "")).startswith(MARKER_PREFIX):
        self.result.markers.append(LossMarker(
            path, str(eqn.params["name"])[len(MARKER_PREFIX):],
            tuple(eqn.invars[0].aval.shape)))
        for pv in in_views:
          if pv is not None:
            self._use(pv, "loss")
        self._mark_data(eqn, data_env, any_data)
        continue

      body = inlined_body(eqn)
      if body is not None:
        sub_jaxpr, consts = body
        n_const = len(consts)
        sub_views = [None] * n_const + in_views
        sub_data = [False] * n_const + in_data
        # Some call primitives carry their constants as leading operands.
        sub_views = sub_views[len(sub_views) - len(sub_jaxpr.invars):]
        sub_data = sub_data[len(sub_data) - len(sub_jaxpr.invars):]
        out_views, out_data = self.walk(sub_jaxpr, sub_views, sub_data, path)
        for v, pv, d in zip(eqn.outvars, out_views, out_data):
          if pv is not None:
            view_env[v] = pv
          if d:
            data_env.add(v)
        continue

      if name in VIEW_PRIMITIVES | BROADCAST_PRIMITIVES and in_views[0] is not None:
        pv = in_views[0]
        view_env[eqn.outvars[0]] = ParamView(
            pv.index, pv.root_shape, pv.chain + (eqn,),
            pv.broadcast or name in BROADCAST_PRIMITIVES)
        continue

      if name == "dot_general" and self._match_dense(eqn, path, in_views, in_data, counts):
        self._mark_data(eqn, data_env, True)
        continue

      if name == "add" and self._match_bias(eqn, path, in_views):
        self._mark_data(eqn, data_env, True)
        continue

      for pv in in_views:
        if pv is not None:
          self._use(pv, name)
      self._mark_data(eqn, data_env, any_data)

    out_views = [view_of(v) for v in jaxpr.outvars]
    out_data = [is_data(v) for v in jaxpr.outvars]
    for pv in out_views:  # a parameter returned from a call is used outside
      if pv is not None and not prefix:
        self._use(pv, "output")
    self._flush(prefix)
    return out_views, out_data

  @staticmethod
  def _mark_data(eqn, data_env: set[Any], flag: bool) -> None:
    if flag:
      data_env.update(eqn.outvars)

  def _match_dense(self, eqn, path, in_views, in_data, counts) -> bool:
    (contract, batch_dims) = eqn.params["dimension_numbers"]
    if batch_dims[0] or batch_dims[1]:
      return False
    for w in (1, 0):
      pv, act = in_views[w], 1 - w
      if pv is None or pv.broadcast or in_views[act] is not None or not in_data[act]:
        continue
      w_shape = tuple(eqn.invars[w].aval.shape)
      a_ndim = len(eqn.invars[act].aval.shape)
      w_contract = tuple(contract[w])
      a_contract = tuple(contract[act])
      match = DenseMatch(
          dot_path=path, weight_index=pv.index, weight_operand=w,
          weight_chain=pv.chain, act_contract=a_contract,
          weight_contract=w_contract,
          weight_free=tuple(d for d in range(len(w_shape)) if d not in w_contract),
          act_free=tuple(d for d in range(a_ndim) if d not in a_contract),
          weight_shape=w_shape, out_path=path,
          out_shape=tuple(eqn.outvars[0].aval.shape))
      self._use(pv, f"dense@{path}")
      if counts.get(eqn.outvars[0], 0) == 1:
        self._pending[id(eqn.outvars[0])] = match
      else:
        self.result.dense.append(match)
      return True
    return False

  def _match_bias(self, eqn, path, in_views) -> bool:
    for k in (0, 1):
      match = self._pending.get(id(eqn.invars[k]))
      pv = in_views[1 - k]
      if match is None or pv is None:
        continue
      d_out = math.prod(match.weight_shape[d] for d in match.weight_free)
      b_shape = tuple(eqn.invars[1 - k].aval.shape)
      if tuple(eqn.outvars[0].aval.shape) != match.out_shape or math.prod(
          pv.root_shape) != d_out or not _bias_broadcasts(b_shape, match):
        continue
      del self._pending[id(eqn.invars[k])]
      self.result.dense.append(dataclasses.replace(
          match, out_path=path, bias_index=pv.index))
      self._use(pv, f"bias@{path}")
      return True
    return False

  def _flush(self, prefix: Path) -> None:
    """Commits matches of this jaxpr that found no bias."""
    for key, match in list(self._pending.items()):
      if match.dot_path[:len(prefix)] == prefix and len(match.dot_path) == len(prefix) + 1:
        self.result.dense.append(match)
        del self._pending[key]


def _bias_broadcasts(b_shape: tuple[int, ...], match: DenseMatch) -> bool:
  """True if the added operand varies only along the weight's free axes."""
  n_act_free = len(match.act_free)
  out_free_w = (range(n_act_free, len(match.out_shape)) if match.weight_operand == 1
                else range(len(match.weight_free)))
  if len(b_shape) != len(match.out_shape):
    return False
  return all(b_shape[d] == 1 for d in range(len(b_shape)) if d not in out_free_w)


def walk(closed: jex_core.ClosedJaxpr, num_params: int) -> WalkResult:
  """Finds dense matches, loss markers and all parameter uses.

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
  walker = _Walker()
  walker.walk(closed.jaxpr, views, data, ())
  return walker.result
