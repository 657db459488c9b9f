"""Embeddings: a ``gather`` of rows of a parameter table by integer ids.

Covers ``jnp.take(table, ids, axis=0)``, ``table[ids]``, Flax ``nn.Embed`` and
``nnx.Embed``. The layer is ``onehot(ids) @ table``, so its input factor
``A = E[onehot onehot^T]`` is diagonal: a vector of token frequencies (``vector_input``;
estimated by :mod:`kfac_jax_lite.curvature.estimation` from the ids that
``input_rows`` returns), never a dense ``vocab × vocab`` matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

from kfac_jax_lite.tagging.match import Match, ParamView, Path


@dataclasses.dataclass(frozen=True)
class EmbeddingMatch(Match):
  """An embedding lookup in a ``[vocab, d]`` table."""

  kind = "embedding"
  vector_input = True
  takes_bias = False

  @property
  def d_in(self) -> int:
    return self.weight_shape[0]

  @property
  def d_out(self) -> int:
    return self.weight_shape[1]

  @property
  def out_feature_axes(self) -> tuple[int, ...]:
    return (len(self.out_shape) - 1,)

  def input_rows(self, x: jax.Array) -> jax.Array:
    ids = x[..., 0]
    n = ids.shape[0] if ids.ndim else 1
    return ids.reshape(n, -1)

  def output_rows(self, ds: jax.Array) -> jax.Array:
    lead = ds.ndim - len(self.out_shape)
    n = ds.shape[lead] if len(self.out_shape) > 1 else 1
    return ds.reshape(*ds.shape[:lead], n, -1, self.d_out)

  def operand_to_matrix(self, w: jax.Array) -> jax.Array:
    return w


def match(eqn: Any, path: Path, in_views: Sequence[ParamView | None],
          in_data: Sequence[bool]) -> EmbeddingMatch | str | None:
  """An :class:`EmbeddingMatch` for a row lookup in a 2-D parameter table."""
  pv = in_views[0]
  if pv is None or pv.broadcast or in_views[1] is not None or not in_data[1]:
    return None
  dn = eqn.params["dimension_numbers"]
  table = tuple(eqn.invars[0].aval.shape)
  out = tuple(eqn.outvars[0].aval.shape)
  # table[ids] gathers rows by one index; under jax.vmap (Equinox) the index
  # also names column 0 of a whole-row slice, kept as a unit axis.
  row_map = tuple(dn.start_index_map) == (0,) and tuple(dn.collapsed_slice_dims) == (0,)
  vmapped = (tuple(dn.start_index_map) == (0, 1) and tuple(dn.collapsed_slice_dims) == ()
             and ("CLIP" in str(eqn.params.get("mode")) or
                  "PROMISE" in str(eqn.params.get("mode"))))
  offsets = (len(out) - 1,) if row_map else (len(out) - 2, len(out) - 1)
  if (len(table) != 2 or not (row_map or vmapped) or tuple(dn.offset_dims) != offsets
      or tuple(eqn.params["slice_sizes"]) != (1, table[1])
      or getattr(dn, "operand_batching_dims", ()) != ()):
    return "gather that is not a row lookup"
  return EmbeddingMatch(
      path=path, weight_index=pv.index, weight_operand=0, weight_chain=pv.chain,
      weight_shape=table, out_shape=out, out_path=path)
