"""Where the factor inverses live on the devices of a ``pmap`` / ``shard_map`` axis.

The inverses are computed once across the devices: each device inverts a
cost-balanced share of the layers (:func:`kfac_jax_lite.schedule.balanced_groups`)
and splits every Kronecker inverse matrix into ``n`` row slices of
``ceil(d / n)`` rows (zero rows pad ``d`` to a multiple of ``n``); one
``all_to_all`` hands slice ``j`` of every layer to device ``j`` (each device
packs its slices into one float32 buffer per destination, padded to the
largest share's). Then, as in KAISA (Pauloski et al., SC21):

* ``"replicated"`` (KAISA's COMM-OPT): one ``all_gather`` of every device's
  slices (the same size on every device, whoever owns the layers) gives every
  device every inverse; the preconditioning needs no communication. A device
  receives about ``(n-1)/n`` of (all inverses + the largest share) per
  refresh, where a ``psum`` of zero-filled inverses costs twice all inverses.
* ``"sharded"`` (KAISA's MEM-OPT): every device keeps only its row slices, so
  the inverses take about ``1/n`` of the memory per device. The
  preconditioning is distributed: the factors of a layer act on the modes of
  its gradient in turn (``A^{-1}`` on the rows, then ``G^{-1}`` on the
  columns; both symmetric); for each, a device multiplies its row slice into
  the full gradient and one ``all_gather`` per factor, batched over all
  layers, assembles the product: two gathers of the gradients' size per step.

Diagonal inverses (the token-frequency input factor of an embedding, the
diagonal Fisher ``"F"`` of scale-and-shift parameters) are small and stay
whole in both placements: each owner packs its share's into one buffer, padded
to the largest share's, and one ``all_gather`` gives them to every device.
The factors themselves (the moving averages) are replicated in both.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from kfac_jax_lite import schedule
from kfac_jax_lite.curvature import specs
from kfac_jax_lite.tagging.layers import Layer

Inverses = dict[str, dict[str, jax.Array]]


def is_sharded(key: str, shape: Sequence[int]) -> bool:
  """Whether a factor's inverse is distributed (and, with ``"sharded"``,
  kept) in row slices: a symmetric matrix, not a vector or the elementwise
  diagonal Fisher (:func:`kfac_jax_lite.curvature.specs.symmetric_matrix`)."""
  return specs.symmetric_matrix(key, shape)


def _rows(d: int, n: int) -> int:
  """Rows of a ``d``-row matrix per device, padded to a multiple of ``n``."""
  return -(-d // n)


def _axis_size(axis_name: str) -> int:
  """The size of ``axis_name``; a ``ValueError`` outside its ``pmap`` / ``shard_map``."""
  try:
    return jax.lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
        f"inverse_placement='sharded': call init inside the pmap / shard_map "
        f"over {axis_name!r} (e.g. jax.pmap(tx.init, axis_name={axis_name!r}) on "
        "replicated parameters, or jax.shard_map(tx.init, ..., out_specs="
        "kfac_jax_lite.sharded_state_specs(...))), so each device builds its own "
        "slice of the inverses.") from e


def init_inverses(factors: Inverses, axis_name: str | None) -> Inverses:
  """The inverses before the first refresh: identities (or their row slices).

  Identities, not zeros, so that a first refresh that is not finite (an
  invalid traced damping) leaves plain gradient steps, not zero updates.

  Args:
    factors: layer name -> factor name -> factor (full shapes).
    axis_name: the axis the inverses are sharded over (``"sharded"``), or
      ``None`` for full inverses.

  Returns:
    Identity matrices (all-ones vectors for diagonal factors); a sharded
    matrix of ``d`` rows keeps this device's ``ceil(d / n)`` rows of it.
  """
  if axis_name is None:
    return {name: {k: specs.identity(k, f.shape) for k, f in fac.items()}
            for name, fac in factors.items()}
  n = _axis_size(axis_name)

  def rows(k: str, f: jax.Array) -> jax.Array:
    if not is_sharded(k, f.shape):
      return specs.identity(k, f.shape)
    r = _rows(f.shape[0], n)
    start = jax.lax.axis_index(axis_name) * r
    return (jnp.arange(r)[:, None] + start == jnp.arange(f.shape[1])[None, :]).astype(
        jnp.float32)

  return {name: {k: rows(k, f) for k, f in fac.items()} for name, fac in factors.items()}


def _pack(parts: list[jax.Array], size: int) -> jax.Array:
  """Concatenates the flattened ``parts`` (float32), zero-padded to ``size``."""
  return jnp.concatenate([p.reshape(-1).astype(jnp.float32) for p in parts]
                         + [jnp.zeros([size - sum(p.size for p in parts)], jnp.float32)])


def distribute(compute: Callable[[tuple[str, ...], Inverses], Inverses],
               names: tuple[str, ...],
               costs: Mapping[str, int], factors: Inverses, axis_name: str,
               sharded: bool) -> Inverses:
  """Each device inverts a cost-balanced share of ``names``; all get theirs.

  Args:
    compute: ``(layer names, factors) -> their inverses`` (full matrices).
    names: the layers to invert.
    costs: layer name -> inversion cost (see
      :func:`kfac_jax_lite.schedule.inversion_costs`).
    factors: layer name -> factor name -> factor.
    axis_name: the ``pmap`` / ``shard_map`` axis.
    sharded: keep only this device's row slice of every Kronecker matrix
      (``"sharded"``), or gather every inverse whole (``"replicated"``).

  Returns:
    Layer name -> factor name -> inverse (or row slice) for ``names``.
  """
  n = jax.lax.axis_size(axis_name)
  plan = _plan(names, costs, factors, n)
  mine_whole, mine_split = jax.lax.switch(
      jax.lax.axis_index(axis_name),
      [functools.partial(_owner, compute, factors, plan, n, i) for i in range(n)])
  out: Inverses = {m: {} for m in names}
  if plan.whole_size:
    rows = jax.lax.all_gather(mine_whole, axis_name, to="invarying")
    for i, share in enumerate(plan.whole):
      for m, k, s, span in _spans(share, math.prod):
        out[m][k] = rows[i, span].reshape(s)
  if plan.split_size:
    _exchange_slices(out, mine_split, plan.split, n, axis_name, sharded)
  return out


Entry = tuple[str, str, tuple[int, ...]]  # (layer name, factor name, factor shape)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Who inverts what: device ``i`` inverts the layers ``shares[i]``; of their
  inverses, ``whole[i]`` are gathered whole and ``split[i]`` go out in row
  slices. Every device's buffers have the largest share's sizes (float32
  entries): ``whole_size`` in all, ``split_size`` per destination device."""
  shares: list[tuple[str, ...]]
  whole: list[list[Entry]]
  split: list[list[Entry]]
  whole_size: int
  split_size: int


def _plan(names: tuple[str, ...], costs: Mapping[str, int], factors: Inverses,
          n: int) -> _Plan:
  """The cost-balanced shares of ``n`` devices and their buffer sizes."""
  shares = schedule.balanced_groups({m: costs[m] for m in names}, n)
  keys = [[(m, k, factors[m][k].shape) for m in share for k in factors[m]]
          for share in shares]
  whole = [[e for e in share if not is_sharded(e[1], e[2])] for share in keys]
  split = [[e for e in share if is_sharded(e[1], e[2])] for share in keys]
  return _Plan(shares, whole, split,
               max(sum(math.prod(s) for _, _, s in share) for share in whole),
               max(sum(_slice_size(s, n) for _, _, s in share) for share in split))


def _slice_size(shape: tuple[int, ...], n: int) -> int:
  """Entries of one device's row slice of a ``shape`` matrix."""
  return _rows(shape[0], n) * shape[1]


def _spans(entries: Sequence[Entry], size_of: Callable[[tuple[int, ...]], int]
           ) -> Iterator[tuple[str, str, tuple[int, ...], slice]]:
  """Each entry with its span in a buffer that packs them one after another."""
  offset = 0
  for m, k, s in entries:
    yield m, k, s, slice(offset, offset + size_of(s))
    offset += size_of(s)


def _owner(compute: Callable[[tuple[str, ...], Inverses], Inverses], factors: Inverses,
           plan: _Plan, n: int, i: int) -> tuple[jax.Array, jax.Array]:
  """Device ``i``'s share: its whole inverses packed, and ``[n, split_size]``
  row slices (row ``j`` for device ``j``)."""
  inv = compute(plan.shares[i], factors)
  blocks = [jnp.pad(inv[m][k], ((0, _rows(s[0], n) * n - s[0]), (0, 0))).reshape(n, -1)
            for m, k, s in plan.split[i]]
  slices = jnp.concatenate(blocks + [jnp.zeros((n, plan.split_size - sum(
      b.shape[1] for b in blocks)), jnp.float32)], axis=1)
  return _pack([inv[m][k] for m, k, _ in plan.whole[i]], plan.whole_size), slices


def _exchange_slices(out: Inverses, mine: jax.Array, split: list[list[Entry]], n: int,
                     axis_name: str, sharded: bool) -> None:
  """Hands row slice ``j`` of every split inverse to device ``j`` (one
  ``all_to_all``) into ``out``; with ``"replicated"`` then gathers them whole."""
  size = functools.partial(_slice_size, n=n)
  # Row j of every device's buffer goes to device j: row i here is owner i's.
  received = jax.lax.all_to_all(mine, axis_name, 0, 0)
  for i, share in enumerate(split):
    for m, k, s, span in _spans(share, size):
      out[m][k] = received[i, span].reshape(-1, s[1])
  if sharded:
    return
  entries = [e for share in split for e in share]
  everyone = jax.lax.all_gather(_pack([out[m][k] for m, k, _ in entries], sum(
      size(s) for _, _, s in entries)), axis_name, to="invarying")
  for m, k, s, span in _spans(entries, size):
    out[m][k] = everyone[:, span].reshape(-1, s[1])[:s[0]]


def distribute_on_mesh(compute: Callable[[tuple[str, ...], Inverses], Inverses],
                       names: tuple[str, ...], costs: Mapping[str, int],
                       factors: Inverses) -> Inverses:
  """:func:`distribute` under ``jax.jit`` on a mesh (GSPMD, no ``axis_name``).

  The inversions are spread over all the devices of the context mesh (set by
  ``jax.set_mesh``) by a ``shard_map`` over its axes: the factors go in
  replicated, each device inverts its share, the replicated inverses come out.

  Args:
    compute: ``(layer names, factors) -> inverses``.
    names: the layers to invert.
    costs: layer name -> inversion cost.
    factors: layer name -> factor name -> factor (replicated).

  Returns:
    Layer name -> factor name -> inverse, replicated.

  Raises:
    ValueError: without a mesh in context.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError(
        "distribute_inverses under jax.jit without axis_name spreads the inversions "
        "over the mesh set with jax.set_mesh(mesh); run the step under it, or use "
        "pmap / shard_map with axis_name.")
  axes = tuple(mesh.axis_names)

  def spread(facs: Inverses) -> Inverses:
    return distribute(compute, names, costs, facs, axes, False)

  return jax.shard_map(spread, in_specs=PartitionSpec(), out_specs=PartitionSpec())(
      {n: factors[n] for n in names})


def all_devices(ok: jax.Array, axis_name: str) -> jax.Array:
  """``ok`` on every device of the axis (a boolean that all devices agree on)."""
  return jax.lax.pmin(ok.astype(jnp.int32), axis_name) > 0


def precondition(mats: Mapping[Layer, jax.Array], inverses: Inverses,
                 axis_name: str | None) -> dict[Layer, jax.Array]:
  """Preconditioned gradient matrices, distributed where inverses are sharded.

  A layer with row-sharded inverses: its gradient is seen as a tensor with
  one mode per Kronecker factor, in Kronecker order (``[d_in, d_out]`` for
  ``A``, ``G``; ``[t, c, d_out]`` for ``K``, ``Ψ``, ``G``; a doubly-factored
  bias row is a one-mode tensor of its block ``B``, as is a full block's
  ``vec``; see :meth:`kfac_jax_lite.curvature.specs.Block.products`). Factor by factor, each
  device contracts its row slice of the (symmetric) inverse with the
  factor's mode, giving its block of that mode, and one ``all_gather`` per
  factor position, batched over all layers, assembles the products; a
  diagonal factor scales its mode locally.

  Args:
    mats: layer -> gradient matrix ``[∇W; ∇b]`` (float32, replicated).
    inverses: layer name -> factor name -> inverse (or row slice).
    axis_name: the axis the inverses are sharded over, or ``None``.

  Returns:
    Layer -> preconditioned gradient matrix.
  """
  out = {}
  counts = {}  # layer -> number of its products
  products = []  # (layer, part index, its inverses)
  tensors = {}
  for layer, mat in mats.items():
    inv = inverses[layer.name]
    if axis_name is None or not any(is_sharded(k, x.shape) for k, x in inv.items()):
      out[layer] = specs.spec_for(layer).precondition(inv, mat)
      continue
    parts = specs.spec_for(layer).products(inv, mat)
    counts[layer] = len(parts)
    for i, (part, invs) in enumerate(parts):
      products.append(((layer, i), invs))
      tensors[layer, i] = part.astype(jnp.float32).reshape([x.shape[-1] for x in invs])
  for mode in range(max((len(invs) for _, invs in products), default=0)):
    pieces = {}
    for key, invs in products:
      if mode >= len(invs):
        continue
      x, t = invs[mode], tensors[key]
      if x.ndim == 1:
        tensors[key] = t * x.reshape([-1 if i == mode else 1 for i in range(t.ndim)])
      else:
        pieces[key] = jnp.tensordot(x, t, axes=(1, mode))  # this mode first
    if not pieces:
      continue
    gathered = jax.lax.all_gather(_pack(list(pieces.values()), sum(
        p.size for p in pieces.values())), axis_name, to="invarying")
    offset = 0
    for key, piece in pieces.items():
      block = gathered[:, offset:offset + piece.size].reshape(-1, *piece.shape[1:])
      tensors[key] = jnp.moveaxis(block[:tensors[key].shape[mode]], 0, mode)
      offset += piece.size
  for layer, mat in mats.items():
    if layer not in out:
      parts = [tensors[layer, i].reshape(-1) for i in range(counts[layer])]
      out[layer] = jnp.concatenate(parts).reshape(mat.shape)
  return out


def sharded_state_specs(init_fn: Callable[[Any], Any], params: Any,
                        mesh: jax.sharding.Mesh, axis_name: str) -> Any:
  """``shard_map`` specs of an optimizer state with sharded K-FAC inverses.

  With ``scale_by_kfac(..., inverse_placement="sharded")`` under
  ``jax.shard_map``, each device's state holds its own row slices of the
  Kronecker inverses: they are ``PartitionSpec(axis_name)`` (a global shape
  of ``[n * ceil(d / n), d]``), every other leaf is replicated,
  ``PartitionSpec()``. Use the result as the state's ``in_specs`` /
  ``out_specs``, and build the state inside ``shard_map`` too::

    specs = kfl.sharded_state_specs(tx.init, params, mesh, "batch")
    state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(),
                                  out_specs=specs))(params)

  Args:
    init_fn: the optimizer's ``init`` (``scale_by_kfac``'s, or a chain's
      holding it).
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    mesh: the ``shard_map`` mesh.
    axis_name: the mesh axis the K-FAC ``axis_name`` names.

  Returns:
    A tree of ``PartitionSpec`` with the state's structure.
  """
  local = jax.eval_shape(jax.shard_map(init_fn, mesh=mesh, in_specs=PartitionSpec(),
                                       out_specs=PartitionSpec(), check_vma=False), params)

  def spec(path: tuple[Any, ...], leaf: Any) -> PartitionSpec:
    keys = [getattr(p, "name", getattr(p, "key", None)) for p in path]
    inverse = len(keys) >= 3 and keys[-3] == "inverses"
    return (PartitionSpec(axis_name) if inverse and is_sharded(keys[-1], leaf.shape)
            else PartitionSpec())

  return jax.tree_util.tree_map_with_path(spec, local)
