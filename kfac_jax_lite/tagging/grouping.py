"""Which matches of the walk form one layer: shared uses, slices, biases.

A parameter leaf (or a slice of one, in a scanned stack) becomes one layer
when every use of it is a matched product reading it the same way; its
slices must tile the leaf; a bias must be added after every use. Also where
the ``blocks`` overrides and hand registrations are checked against that.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Any, Mapping, Sequence

import jax

from kfac_jax_lite.tagging import patterns
from kfac_jax_lite.tagging.match import Match, Part

# Layer kinds a "full" override may give their exact Fisher block.
FULL_KINDS = ("dense", "conv", "scale", "shift")
UseKey = tuple[int, Part]


def match_override(name: str, blocks: Mapping[str, str]) -> str | None:
  for pattern, choice in blocks.items():
    if re.search(pattern, name):
      return choice
  return None


# Match fields that describe a use's activation or output, not its weight.
_USE_FIELDS = frozenset({"path", "out_path", "out_shape", "bias_index", "out_perm",
                         "weight_chain", "act_contract", "act_free", "bias_fused"})


def _weight_signature(m: Match) -> tuple[Any, ...]:
  """Equal for two uses that read the parameter leaf as the same matrix."""
  chain = tuple((e.primitive.name, str(sorted(e.params.items()))) for e in m.weight_chain)
  if m.weight_fused is not None:
    chain += (m.weight_fused.axis,) + tuple(
        (pv.index, tuple((e.primitive.name, str(sorted(e.params.items()))) for e in pv.chain))
        for pv in m.weight_fused.members)
  return (type(m), chain) + tuple((f.name, getattr(m, f.name))
                                  for f in dataclasses.fields(m)
                                  if f.name not in _USE_FIELDS | {"weight_fused"})


def weight_groups(found: patterns.WalkResult, paths: Sequence[tuple[Any, ...]],
                   shapes: Sequence[tuple[int, ...]], blocks: Mapping[str, str],
                   frozen: Mapping[int, str]) -> dict[UseKey, list[Match]]:
  """The uses of each weight (leaf or slice) that form one Kronecker layer.

  A weight qualifies when every use of it is a matched product reading it the
  same way, no override asks for another block, and, for slices of a leaf
  (a scanned stack), the accepted slices tile the whole leaf.
  """
  uses_of: dict[UseKey, list[Match]] = {}
  for m in found.layers:
    uses_of.setdefault((m.weight_index, m.weight_part), []).append(m)
  groups = {
      key: ms for key, ms in uses_of.items()
      if len({_weight_signature(m) for m in ms}) == 1 and all(
          sorted(found.uses.get(k, [])) == sorted(f"{m.kind}@{m.path}" for m in ms)
          and match_override(jax.tree_util.keystr(paths[k[0]]), blocks) not in ("rms", "none")
          and k[0] not in frozen for k in _member_keys(key, ms[0].weight_fused))}
  whole = _tiled_leaves(list(groups), found.uses, shapes)
  return {key: ms for key, ms in groups.items() if key[0] in whole}


def biases(groups: Mapping[UseKey, list[Match]], found: patterns.WalkResult,
            paths: Sequence[tuple[Any, ...]], shapes: Sequence[tuple[int, ...]],
            blocks: Mapping[str, str], frozen: Mapping[int, str]) -> dict[UseKey, UseKey]:
  """Each layer's bias ``(index, part)``, or ``(None, None)``."""
  candidates = {}
  for key, ms in groups.items():
    bias = (ms[0].bias_index, ms[0].bias_part)
    joined = lambda m: None if m.bias_fused is None else m.bias_fused.indices
    same = all((m.bias_index, m.bias_part, joined(m)) == bias + (joined(ms[0]),) for m in ms)
    if bias[0] is not None and same and all(
        k[0] not in frozen
        and sorted(found.uses.get(k, [])) == sorted(f"bias@{m.out_path}" for m in ms)
        and match_override(jax.tree_util.keystr(paths[k[0]]), blocks) in (None, "kron", "full")
        for k in _member_keys(bias, ms[0].bias_fused)):
      candidates[key] = bias
  whole = _tiled_leaves(list(candidates.values()), found.uses, shapes)
  return {key: candidates[key] if key in candidates and candidates[key][0] in whole
          else (None, None) for key in groups}


def _member_keys(key: UseKey, joined: Any) -> tuple[UseKey, ...]:
  """The key of a weight or bias, or the keys of each leaf of a fused one."""
  return (key,) if joined is None else tuple((i, None) for i in joined.indices)


def check_full(name: str, m: Match, has_bias: bool, max_factor_dim: int) -> None:
  """Raises unless a ``"full"`` override fits the layer."""
  if m.kind not in FULL_KINDS:
    raise ValueError(f"blocks asks for a full block for {name}, a {m.kind} layer; full "
                     f"blocks are for {', '.join(FULL_KINDS)} layers.")
  size = (m.d_in + has_bias) * m.d_out
  if size > max_factor_dim:
    raise ValueError(f"blocks asks for a full block for {name}: {size} parameters, more "
                     f"than max_factor_dim = {max_factor_dim}; use 'kron' or 'rms', or "
                     "raise max_factor_dim.")


def check_registrations(found: patterns.WalkResult, groups: Mapping[UseKey, Any],
                         biases: Mapping[UseKey, UseKey], paths: Sequence[tuple[Any, ...]],
                         shapes: Sequence[tuple[int, ...]], blocks: Mapping[str, str]) -> None:
  """Raises if a hand-registered parameter did not become its layer."""
  for key in sorted(found.registered, key=lambda k: (found.registered[k], str(k)), reverse=True):
    name = jax.tree_util.keystr(paths[key[0]]) + part_suffix(key[1], shapes[key[0]])
    if key in groups or key in biases.values() or match_override(name, blocks) in (
        "rms", "none"):
      continue
    raise ValueError(
        f"{name} is registered with kfl.register_dense but also used elsewhere in the "
        f"loss ({', '.join(leaf_uses(found.uses, key[0]))}): a registered parameter must "
        "be used only by its registration (else it would be counted twice); remove the "
        "other use, or the registration and let detection find the layer.")


def _tiled_leaves(keys: Sequence[UseKey], uses: Mapping[UseKey, list[str]],
                  shapes: Sequence[tuple[int, ...]]) -> set[int]:
  """Leaves whose accepted keys are all their uses and tile the leaf exactly."""
  parts: dict[int, list[Part]] = {}
  for index, part in keys:
    parts.setdefault(index, []).append(part)
  return {i for i, ps in parts.items()
          if {k for k in uses if k[0] == i} == {(i, p) for p in ps} and _tiles(ps, shapes[i])}


def _tiles(parts: Sequence[Part], shape: tuple[int, ...]) -> bool:
  if list(parts) == [None]:
    return True
  if None in parts or len(set(parts)) != len(parts):
    return False
  if sum(math.prod(b - a for a, b in p) for p in parts) != math.prod(shape):
    return False
  return not any(all(max(a1, a2) < min(b1, b2) for (a1, b1), (a2, b2) in zip(p, q))
                 for p, q in itertools.combinations(parts, 2))


def part_suffix(part: Part, shape: tuple[int, ...]) -> str:
  """``"[3]"`` for the 4th slice of a stacked leaf (``""`` for the whole leaf)."""
  if part is None:
    return ""
  return "[" + ",".join(str(a) if b - a == 1 else f"{a}:{b}" if (a, b) != (0, d) else ":"
                        for (a, b), d in zip(part, shape)).rstrip(",:") + "]"


def leaf_uses(uses: Mapping[UseKey, list[str]], index: int) -> list[str]:
  return [u for key, us in uses.items() if key[0] == index for u in us]
