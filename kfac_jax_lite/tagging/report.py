"""A readable table of the blocks K-FAC uses (what ``print(find_layers(...))`` shows)."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Mapping, Sequence

from kfac_jax_lite.tagging.grouping import match_override

if TYPE_CHECKING:
  from kfac_jax_lite.tagging.layers import Layer, TaggedLoss

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


def fallback_warning(tagged: TaggedLoss, blocks: Mapping[str, str] | None) -> str | None:
  """The warning for weights a user expects in a Kronecker block that did not get one.

  A parameter of two or more axes read by a matrix product or a convolution
  on the path to the predictions is a weight matrix (or kernel); when it
  ends up in the diagonal fallback (tied, read inside ``lax.cond``, a scan
  over the unroll limit, ...) the optimizer is no longer K-FAC for it
  (Martens & Grosse 2015, §3: the Kronecker block needs the layer's
  activations and output derivatives). An explicit ``blocks`` choice of
  ``"diag"`` or ``"none"`` for the path says the user knows.

  Args:
    tagged: the tagged loss.
    blocks: the user's ``blocks`` overrides (regex -> choice), or ``None``.

  Returns:
    The message, naming each path and why, and how to fix or silence it; or
    ``None`` when there is nothing to report.
  """
  invars = tagged.traced.jaxpr.jaxpr.invars
  missed = [l for l in tagged.diagonal if l.weight_index in tagged.products
            and len(invars[l.weight_index].aval.shape) >= 2
            and match_override(l.name, blocks or {}) not in ("diag", "none")]
  if not missed:
    return None
  rows = "\n".join(f"  {l.name}: {l.note}" for l in missed)
  return (
      f"K-FAC found no Kronecker block for {len(missed)} weight(s) read by a matrix "
      f"product or convolution; they get the diagonal fallback (an Adam-like "
      f"g / (v + damping) step, not K-FAC):\n{rows}\n"
      "Fix: read each weight once, as a plain x @ W / convolution outside lax.cond, "
      "lax.while_loop and long scans (see kfl.find_layers for the layer table), or "
      "register the layer by hand with kfl.register_dense(fn, x, w, b). To keep the "
      "diagonal fallback and silence this warning, say so with layers=kfl.LayerOptions("
      f"blocks={{{re.escape(missed[0].name)!r}: 'diag'}}) (one regex per path, or "
      "'none' to leave it unpreconditioned).")
