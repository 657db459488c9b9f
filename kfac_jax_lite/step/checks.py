"""Validation of :func:`kfac_jax_lite.scale_by_kfac`'s arguments and of ``update`` calls.

Every error names the argument and the fix.
"""

from __future__ import annotations

from typing import Any

import jax

from kfac_jax_lite._checks import check_number
from kfac_jax_lite.options import (AdaptiveOptions, EstimatorOptions, InverseOptions,
                                   ParallelOptions)
from kfac_jax_lite.tagging.trace import varying_axes


def check_numbers(damping: Any, ema_decay: Any, stats_every: Any, inverse_every: Any,
                  kl_clip: Any, learning_rate: Any, inverses: InverseOptions,
                  adaptive: AdaptiveOptions | None) -> None:
  """Raises ``ValueError`` for concrete numbers out of range (NaN included)."""
  check_number("damping", damping, low=0.0,
               hint="It is the Tikhonov damping λ > 0 added to every block.")
  check_number("ema_decay", ema_decay, low=0.0, low_open=False, high=1.0)
  check_number("stats_every", stats_every, low=0.0)
  check_number("inverse_every", inverse_every, low=0.0)
  check_number("kl_clip", kl_clip, low=0.0, hint="Pass kl_clip=None for no clipping.")
  check_number("learning_rate", learning_rate)
  if kl_clip is not None and learning_rate is None:
    raise ValueError("kl_clip needs the learning_rate: pass learning_rate= "
                     "(the same value or schedule as the optimizer's).")
  if inverses.staggered and not isinstance(inverse_every, int):
    raise ValueError("InverseOptions(staggered=True) needs a Python-int inverse_every "
                     "(under optax.inject_hyperparams, list it in static_args).")
  if adaptive is not None and kl_clip is not None:
    raise ValueError("adaptive=kfl.AdaptiveOptions() chooses the step size itself: "
                     "pass kl_clip=None.")
  if adaptive is not None and callable(damping):
    raise ValueError("adaptive=kfl.AdaptiveOptions() adapts the damping from its "
                     "initial value: pass a number as damping, not a schedule.")


def check_update_args(params: Any, batch: Any, positional: tuple[Any, ...],
                      accumulate_only: bool, estimator: EstimatorOptions,
                      parallel: ParallelOptions) -> None:
  """Raises a ``ValueError`` / ``TypeError`` that says how to call ``update``."""
  if positional:
    raise TypeError("scale_by_kfac.update takes the batch as a keyword: "
                    "tx.update(grads, state, params, batch=batch).")
  if accumulate_only and not estimator.accumulate:
    raise ValueError("kfac_accumulate_only needs scale_by_kfac(..., estimator="
                     "kfl.EstimatorOptions(accumulate=True)) (kfl.accumulate sets it up).")
  if params is None or batch is None:
    raise ValueError("scale_by_kfac.update needs params and batch: call "
                     "tx.update(grads, state, params, batch=batch).")
  varying = frozenset().union(*map(varying_axes, jax.tree_util.tree_leaves(batch)))
  if varying and parallel.axis_name is None:
    raise ValueError(
        f"batch varies over the shard_map axes {sorted(varying)}, but "
        "scale_by_kfac has no axis_name: pass parallel=kfl.ParallelOptions("
        "axis_name=...) (one of them) so the factor statistics are averaged over "
        "the devices.")


def check_layers(factors: Any, names: list[str]) -> None:
  """Raises ``ValueError`` if the state's factors are of other layers than
  ``names`` (the parameters given to ``update`` name them otherwise than those
  given to ``init``); a placeholder state (a masked-out branch) is not checked.

  Args:
    factors: the state's factors (layer name -> factors), or a placeholder.
    names: the names of the layers ``update``'s parameters give.
  """
  if isinstance(factors, dict) and sorted(factors) != sorted(names):
    raise ValueError(
        f"update's parameters give the layers {sorted(names)}, but the optimizer state was "
        f"built for {sorted(factors)}: pass update parameters of the structure init had "
        "(layers are named by their parameters' paths).")


def check_diagnostics_layout(kept: Any, fresh: Any) -> None:
  """Raises ``ValueError`` if this batch's diagnostics do not fit the state's
  (their per-example rows fix the batch size)."""
  if jax.tree_util.tree_structure(kept) != jax.tree_util.tree_structure(fresh):
    raise ValueError(
        f"this batch's diagnostics ({fresh!r}) do not fit the optimizer state's ({kept!r}): "
        "EstimatorOptions(diagnostics=True) keeps per-example norms, which fix the batch "
        "size. Keep the batch size, or pass EstimatorOptions(per_example_norms=False) to "
        "keep the batch's totals only.")
