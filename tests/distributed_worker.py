"""Runs K-FAC data-parallel on 8 fake CPU devices for ``test_distributed.py``.

Run as ``python distributed_worker.py OUT_DIR [MODE ...]`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set
before jax is imported, which is why this is a separate process). Every mode
trains the same tiny MLP of :mod:`_distributed_setup` (6 -> 8 -> 3, softmax
cross-entropy) for ``NUM_STEPS`` steps on the same global batches of
``GLOBAL_BATCH`` examples, distributed in a different way, and writes:

* ``OUT_DIR/results.npz``: ``"{mode}|{kind}|{name}"`` arrays (final
  parameters, factors and inverses, and per-mode extras);
* ``OUT_DIR/meta.json``: ``{mode: {"ok", "error", "traceback", "seconds",
  "cpu_seconds", ...}}``; a mode that raises is recorded, not fatal.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kfac_jax_lite as kfl
from _distributed_setup import (
    AXIS, Arrays, DAMPING, D_OUT, EMBED, GLOBAL_BATCH, LEARNING_RATE, MAX_FACTOR_DIM, MC_SEED,
    NUM_DEVICES, NUM_STEPS, TOKENS, VOCAB, replicate, sgd_step, split_batch, init_params,
    local_batch, loss_fn, make_batches, make_optimizer, regression_loss_fn, run_modes, snapshot,
    token_loss_fn)


def run_pmap(**kwargs: Any) -> tuple[Arrays, dict[str, Any]]:
  """``jax.pmap``: per-device batch of 2, the user ``pmean``s the gradients.

  K-FAC averages its factor statistics itself through ``axis_name``. The
  arrays keep the device axis so the test can check the replicas agree.
  ``kwargs`` go to the optimizer (``distribute_inverses=True`` for the mode
  that spreads the inversions over the devices, ``inverse_placement=
  "sharded"`` for the one that also shards the inverses: its state is built
  inside ``pmap``, each device's holding its own slices).
  """
  batches = make_batches()
  tx = make_optimizer(local_batch(batches[0]), axis_name=AXIS, **kwargs)

  def grads_fn(params: Any, batch: Any) -> Any:
    return jax.lax.pmean(jax.grad(loss_fn)(params, batch), AXIS)

  step = jax.pmap(sgd_step(tx, grads_fn), axis_name=AXIS)
  params = replicate(init_params())
  if kwargs.get("inverse_placement") == "sharded":
    state = jax.pmap(tx.init, axis_name=AXIS)(params)
  else:
    state = replicate(tx.init(init_params()))
  for batch in batches:
    params, state = step(params, state, split_batch(batch))
  return snapshot(params, state), {}


def run_shard_map(check_vma: bool, **kwargs: Any) -> tuple[Arrays, dict[str, Any]]:
  """Top-level ``jax.shard_map`` over a 1-D ``"batch"`` mesh.

  What jax 0.10.2 does with the gradient of a replicated parameter (``P()``
  in_spec) of a loss computed on the local shard (checked by the
  ``shard_map_grads`` mode and its test):

  * ``check_vma=True`` (the default): the parameter is "invariant", the loss is
    "varying", and the transpose of the implicit invariant->varying cast is a
    ``psum``, so ``jax.grad(loss_fn)`` of the LOCAL mean is already SUMMED
    over the axis (8x the global-mean gradient), and ``pmean`` of it is a
    no-op (it stays 8x). The right pattern is to differentiate the global
    mean, ``jax.grad(lambda p: lax.pmean(loss_fn(p, b), axis))``, which
    yields the global-mean gradient directly (no pmean of grads).
  * ``check_vma=False``: the gradient is the local-shard gradient, exactly as
    under ``pmap``; ``lax.pmean(grads, axis)`` gives the global-mean gradient.
    (Differentiating ``pmean(loss)`` here would NOT: it gives the local
    gradient.)

  With ``inverse_placement="sharded"`` the state is built inside
  ``shard_map`` and its sharded inverses are ``P(AXIS)`` (global shape
  ``[NUM_DEVICES * rows, d]``), see ``kfl.sharded_state_specs``.

  Args:
    check_vma: passed to ``jax.shard_map``.
    **kwargs: passed to the optimizer.

  Returns:
    ``(snapshot, meta)``.
  """
  batches = make_batches()
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,))
  tx = make_optimizer(local_batch(batches[0]), axis_name=AXIS, **kwargs)
  # The default (Explicit) mesh makes shard_map check the in_specs against
  # the arguments' shardings, so the inputs must be placed accordingly.
  params = jax.device_put(init_params(), NamedSharding(mesh, P()))
  state, specs = _shard_map_state(tx, params, mesh, check_vma,
                                  kwargs.get("inverse_placement") == "sharded")
  step = jax.jit(jax.shard_map(
      sgd_step(tx, _shard_map_grads_fn(check_vma)), mesh=mesh, in_specs=(P(), specs, P(AXIS)),
      out_specs=(P(), specs), check_vma=check_vma))
  for batch in batches:
    params, state = step(params, state,
                         jax.device_put(batch, NamedSharding(mesh, P(AXIS))))
  shards = {f"{name}|{k}": list(leaf.addressable_shards[0].data.shape)
            for name, fac in state[0].inverses.items() for k, leaf in fac.items()}
  return snapshot(params, state), {"axis_types": str(mesh.axis_types),
                                   "inverse_shard_shapes": shards}


def _shard_map_grads_fn(check_vma: bool) -> Callable[[Any, Any], Any]:
  """The global-mean gradient under ``shard_map`` (see :func:`run_shard_map`)."""
  if check_vma:
    return lambda params, batch: jax.grad(
        lambda p: jax.lax.pmean(loss_fn(p, batch), AXIS))(params)
  return lambda params, batch: jax.lax.pmean(jax.grad(loss_fn)(params, batch), AXIS)


def _shard_map_state(tx: optax.GradientTransformationExtraArgs, params: Any,
                     mesh: jax.sharding.Mesh, check_vma: bool, sharded: bool) -> tuple[Any, Any]:
  """The initial state and its ``shard_map`` specs: built inside ``shard_map``
  with sharded inverses, else replicated."""
  if sharded:
    specs = kfl.sharded_state_specs(tx.init, params, mesh, AXIS)
    return jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=specs,
                                 check_vma=check_vma))(params), specs
  return jax.device_put(tx.init(init_params()), NamedSharding(mesh, P())), P()


def run_gspmd(axis_type: jax.sharding.AxisType | None,
              **kwargs: Any) -> tuple[Arrays, dict[str, Any]]:
  """``jax.jit`` on a batch sharded over the mesh; no ``axis_name``.

  Args:
    axis_type: the mesh axis type, or ``None`` for ``jax.make_mesh``'s
      default (Explicit in jax 0.10.2).
    **kwargs: passed to the optimizer.

  Returns:
    ``(snapshot, meta)``; meta holds the number of traces and backend
    compilations of each call, the output state's shardings per step and the
    collectives of the compiled step.
  """
  batches = make_batches()
  axis_types = None if axis_type is None else (axis_type,)
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=axis_types)
  tx = make_optimizer(batches[0], **kwargs)
  compiles = []

  def on_event(event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  step, traces = _counting_jit(sgd_step(tx, jax.grad(loss_fn)))
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(init_params(), replicated)
  state = jax.device_put(tx.init(init_params()), replicated)
  meta: dict[str, Any] = {"axis_types": str(mesh.axis_types), "traces": [],
                          "compiles": [], "state_shardings": [],
                          "factors_replicated": []}
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    for batch in batches:
      sharded = jax.device_put(batch, NamedSharding(mesh, P(AXIS)))
      n_traces, n_compiles = len(traces), len(compiles)
      # The mesh context, as JAX asks for Explicit axes: the user's own
      # gradient contracts the sharded batch axis.
      with jax.set_mesh(mesh):
        params, state = step(params, state, sharded)
      jax.block_until_ready((params, state))
      meta["traces"].append(len(traces) - n_traces)
      meta["compiles"].append(len(compiles) - n_compiles)
      leaves = jax.tree_util.tree_flatten_with_path(state[0])[0]
      meta["state_shardings"].append(
          {jax.tree_util.keystr(p): str(leaf.sharding) for p, leaf in leaves})
      meta["factors_replicated"].append(all(
          leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state[0].factors)))
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  with jax.set_mesh(mesh):
    hlo = step.lower(params, state, sharded).compile().as_text()
  meta["collectives"] = [c for c in ("all-to-all", "all-gather") if c in hlo]
  return snapshot(params, state), meta


def _counting_jit(body: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
  """``jax.jit(body)``, and a list that grows by one each time ``body`` is traced."""
  traces: list[int] = []

  def counted(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
    traces.append(1)
    return body(params, state, batch)

  return jax.jit(counted), traces


def run_pmap_tokens(**kwargs: Any) -> tuple[Arrays, dict[str, Any]]:
  """``pmap`` on ``token_loss_fn``: ``"sharded"`` inverses and the default.

  The default placement (every device inverts everything itself) is the
  reference here; the arrays are ``"{placement}|{kind}|{name}"``.

  Args:
    **kwargs: passed to the optimizer.
  """
  rng = np.random.default_rng(1)
  params = {"table": rng.normal(size=(VOCAB, EMBED)).astype(np.float32),
            "gamma": (1 + 0.1 * rng.normal(size=EMBED)).astype(np.float32),
            "w": (rng.normal(size=(TOKENS * EMBED, D_OUT)) / 2).astype(np.float32),
            "b": np.zeros(D_OUT, np.float32)}
  batches = [{"ids": rng.integers(0, VOCAB, (GLOBAL_BATCH, TOKENS)).astype(np.int32),
              "y": rng.integers(0, D_OUT, GLOBAL_BATCH).astype(np.int32)}
             for _ in range(NUM_STEPS)]
  out = {}
  for placement in ("replicated", "sharded"):
    tx = kfl.kfac(token_loss_fn, local_batch(batches[0]), LEARNING_RATE, damping=DAMPING,
                  stats_every=1, inverse_every=1, estimator=kfl.EstimatorOptions("exact"),
                  noise_scaling=None,
                  parallel=kfl.ParallelOptions(axis_name=AXIS, inverse_placement=placement),
                  layers=kfl.LayerOptions(max_factor_dim=MAX_FACTOR_DIM, **kwargs))

    def grads_fn(p: Any, batch: Any) -> Any:
      return jax.lax.pmean(jax.grad(token_loss_fn)(p, batch), AXIS)

    step = jax.pmap(sgd_step(tx, grads_fn), axis_name=AXIS)
    p = replicate(params)
    state = jax.pmap(tx.init, axis_name=AXIS)(p)
    for batch in batches:
      p, state = step(p, state, split_batch(batch))
    out.update(snapshot(p, state, prefix=f"{placement}|"))
  return out, {}


def run_pmap_mc() -> tuple[Arrays, dict[str, Any]]:
  """``pmap`` with the Monte-Carlo estimator, the SAME batch on every device.

  With identical data the per-device estimates differ only by their samples,
  so the averaged factor shows whether devices drew different targets. The
  squared-error loss makes the samples continuous, so different keys give
  different estimates. One update: its factors are the first estimate.
  """
  batch = local_batch(make_batches()[0])
  tx = kfl.scale_by_kfac(regression_loss_fn, batch, damping=DAMPING, seed=MC_SEED,
                         estimator="mc", parallel=kfl.ParallelOptions(axis_name=AXIS))

  def step(params: Any, state: Any, batch: Any) -> Any:
    grads = jax.lax.pmean(jax.grad(regression_loss_fn)(params, batch), AXIS)
    return tx.update(grads, state, params, batch=batch)[1]

  state = jax.pmap(step, axis_name=AXIS)(
      replicate(init_params()), replicate(tx.init(init_params())),
      replicate(batch))
  out = {}
  for name, fac in state.factors.items():
    for which, leaf in fac.items():
      out[f"factors|{name}|{which}"] = np.asarray(leaf)
  return out, {}


def run_shard_map_grads() -> tuple[Arrays, dict[str, Any]]:
  """Plain-jax gradients of the MLP loss under ``shard_map`` (no K-FAC).

  For both ``check_vma`` settings, the gradient of the replicated parameters
  with three patterns: ``grad`` of the local loss, ``pmean`` of that, and
  ``grad`` of the ``pmean``-ed loss. The test compares them with the global
  batch gradient.
  """
  batch = make_batches()[0]
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,))
  patterns = {
      "grad_local": lambda p, b: jax.grad(loss_fn)(p, b),
      "pmean_grad_local": lambda p, b: jax.lax.pmean(jax.grad(loss_fn)(p, b), AXIS),
      "grad_pmean_loss": lambda p, b: jax.grad(
          lambda q: jax.lax.pmean(loss_fn(q, b), AXIS))(p),
  }
  params = jax.device_put(init_params(), NamedSharding(mesh, P()))
  sharded = jax.device_put(batch, NamedSharding(mesh, P(AXIS)))

  def all_patterns(p: Any, b: Any) -> dict[str, Any]:
    return {name: fn(p, b) for name, fn in patterns.items()}

  out = {}
  for check_vma in (True, False):
    # out_specs=P(): with check_vma=False jax does not check replication and
    # returns one shard's value (device 0's local gradient for grad_local).
    grads = jax.jit(jax.shard_map(all_patterns, mesh=mesh, in_specs=(P(), P(AXIS)),
                                  out_specs=P(), check_vma=check_vma))(params, sharded)
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
      name, rest = path[0].key, jax.tree_util.keystr(path[1:])
      out[f"vma={check_vma}|{name}|{rest}"] = np.asarray(leaf)
  return out, {}


RUNNERS: dict[str, Callable[[], tuple[Arrays, dict[str, Any]]]] = {
    "pmap": run_pmap,
    "pmap_spread": lambda: run_pmap(distribute_inverses=True),
    "pmap_symmetric": lambda: run_pmap(symmetry_aware=True),
    "shard_map_symmetric": lambda: run_shard_map(check_vma=True, symmetry_aware=True),
    "shard_map_novma": lambda: run_shard_map(check_vma=False),
    "shard_map_vma": lambda: run_shard_map(check_vma=True),
    "shard_map_spread": lambda: run_shard_map(check_vma=True, distribute_inverses=True),
    "pmap_sharded": lambda: run_pmap(inverse_placement="sharded"),
    "shard_map_sharded_vma": lambda: run_shard_map(check_vma=True,
                                                   inverse_placement="sharded"),
    "shard_map_sharded_novma": lambda: run_shard_map(check_vma=False,
                                                     inverse_placement="sharded"),
    "gspmd_auto": lambda: run_gspmd(jax.sharding.AxisType.Auto),
    "gspmd_explicit": lambda: run_gspmd(None),
    "gspmd_spread": lambda: run_gspmd(None, distribute_inverses=True),
    "pmap_tokens": run_pmap_tokens,
    "pmap_tokens_full": lambda: run_pmap_tokens(blocks={r"\['gamma'\]": "full"}),
    "pmap_mc": run_pmap_mc,
    "shard_map_grads": run_shard_map_grads,
}


def main(argv: list[str]) -> int:
  """Runs the requested modes (all by default) and writes the results."""
  out_dir = argv[1]
  modes = argv[2:] or list(RUNNERS)
  if jax.device_count() != NUM_DEVICES:
    raise SystemExit(f"need {NUM_DEVICES} devices (XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={NUM_DEVICES}), "
                     f"got {jax.devices()}")
  arrays, meta = run_modes(RUNNERS, modes)
  np.savez(os.path.join(out_dir, "results.npz"), **arrays)
  with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  for m, v in meta.items():
    print(f"{m}: ok={v['ok']} wall={v['seconds']}s cpu={v['cpu_seconds']}s "
          f"{v['error'] or ''}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
