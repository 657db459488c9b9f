"""A readable table of the blocks K-FAC uses (what ``print(find_layers(...))`` shows)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
  from kfac_jax_lite.tagging.layers import Layer

_BYTES = 4  # factors and inverses are float32


def block_type(layer: Layer) -> str:
  """``"kron"``, ``"kron3"`` (doubly factored), with ``(diag A)`` /
  ``(diag G)`` for diagonal factors; ``"diag fisher"``, ``"diag"``, ``"none"``
  or ``"zero"`` (frozen)."""
  if layer.match is None:
    return {"diagonal": "diag", "frozen": "zero"}.get(layer.kind, "none")
  if layer.block != "kron":
    return {"diag": "diag fisher", "full": "full"}[layer.block]
  diag = [f"diag {k}" for k, form in (("A", layer.input_form), ("G", layer.output_form))
          if form == "diagonal"]
  kron = "kron3" if layer.input_form == "doubly" else "kron"
  return f"{kron}({', '.join(diag)})" if diag else kron


def state_bytes(layer: Layer, leaf_size: int) -> int:
  """Bytes of optimizer state for the block (factors + inverses, or ``v``)."""
  if layer.match is None:
    return leaf_size * _BYTES if layer.kind == "diagonal" else 0
  return 2 * _BYTES * sum(math.prod(s) for s in layer.factor_shapes.values())


def format_table(layers: Sequence[Layer], leaf_sizes: Mapping[int, int]) -> str:
  """One row per block: layer, kind, block type, factor shapes, state memory, note."""
  rows = [("layer", "kind", "block", "factors", "state", "note")]
  total = 0
  for l in layers:
    size = leaf_sizes.get(l.weight_index, 0)
    shapes = (" ".join(f"{k}{list(s)}" for k, s in l.factor_shapes.items())
              if l.match is not None else f"v[{size}]" if l.kind == "diagonal" else "-")
    total += state_bytes(l, size)
    rows.append((l.name + (" +bias" if l.bias_index is not None else ""), l.kind,
                 block_type(l), shapes, _human(state_bytes(l, size)), l.note))
  rows.append(("total", "", "", "", _human(total), ""))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  return "\n".join(("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) +
                     ("  " + r[5] if r[5] else "")).rstrip() for r in rows)


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)
