"""The warning for weight matrices that got no Kronecker block."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping

from kfac_jax_lite.tagging.grouping import match_override

if TYPE_CHECKING:
  from kfac_jax_lite.tagging.layers import TaggedLoss


def fallback_warning(tagged: TaggedLoss, blocks: Mapping[str, str] | None) -> str | None:
  """The warning for weights a user expects in a Kronecker block that did not get one.

  A parameter of two or more axes read by a matrix product or a convolution
  on the path to the predictions is a weight matrix (or kernel); when it
  ends up in the rms fallback (tied, read inside ``lax.cond``, a scan
  over the unroll limit, ...) the optimizer is no longer K-FAC for it
  (Martens & Grosse 2015, §3: the Kronecker block needs the layer's
  activations and output derivatives). An explicit ``blocks`` choice of
  ``"rms"`` or ``"none"`` for the path says the user knows.

  Args:
    tagged: the tagged loss.
    blocks: the user's ``blocks`` overrides (regex -> choice), or ``None``.

  Returns:
    The message, naming each path and why, and how to fix or silence it; or
    ``None`` when there is nothing to report.
  """
  invars = tagged.traced.jaxpr.jaxpr.invars
  missed = [l for l in tagged.rms if l.weight_index in tagged.products
            and len(invars[l.weight_index].aval.shape) >= 2
            and match_override(l.name, blocks or {}) not in ("rms", "none")]
  if not missed:
    return None
  rows = "\n".join(f"  {l.name}: {l.note}" for l in missed)
  return (
      f"K-FAC found no Kronecker block for {len(missed)} weight(s) read by a matrix "
      f"product or convolution; they get the rms fallback (an RMSProp-like "
      f"g / (v + damping) step, not K-FAC):\n{rows}\n"
      "Fix: read each weight once, as a plain x @ W / convolution outside lax.cond, "
      "lax.while_loop and long scans (see kfl.find_layers for the layer table), or "
      "register the layer by hand with kfl.register_dense(fn, x, w, b). To keep the "
      "rms fallback and silence this warning, say so with layers=kfl.LayerOptions("
      f"blocks={{{re.escape(missed[0].name)!r}: 'rms'}}) (one regex per path, or "
      "'none' to leave it unpreconditioned).")
