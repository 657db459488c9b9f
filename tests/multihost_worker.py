"""One process of a 2-process K-FAC run on CPU, for ``test_multihost.py``.

Run as ``python multihost_worker.py OUT_DIR PORT PROCESS_ID [MODE ...]`` in
two processes (``PROCESS_ID`` 0 and 1, the same free ``PORT``), each with
``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=2``:
``jax.distributed.initialize`` joins them into one system of 4 CPU devices
whose cross-process collectives go through gloo (jax's CPU default).

Every mode trains the MLP of ``_distributed_setup.py`` for its ``NUM_STEPS``
steps on its global batches (``estimator="exact"``, so the result does not
depend on how the batch is split). Each process builds only its own rows of
every global batch and assembles the global array with
``jax.make_array_from_process_local_data``; parameters and K-FAC state are
replicated. Modes:

* ``gspmd_auto``: ``jax.jit`` (GSPMD, no ``axis_name``) on an Auto mesh.
* ``gspmd_explicit``: the same on ``jax.make_mesh``'s default (Explicit)
  mesh, under ``jax.set_mesh``.
* ``shard_map``: ``jax.shard_map`` with ``axis_name="batch"`` (K-FAC
  ``pmean``s its statistics across both processes), gradient of the
  ``pmean``-ed loss (``check_vma=True``).
* ``shard_map_spread``: the same with ``distribute_inverses=True`` (each
  device inverts a share of the layers, a ``psum`` gathers them).

Without MODE arguments it runs ``DEFAULT_MODES`` (all but ``gspmd_explicit``).

Writes ``OUT_DIR/process{PROCESS_ID}.npz`` (``"{mode}|{kind}|{name}"``:
final parameters, factors and inverses read from this process's first
replica, and ``"{mode}|batch{step}|{x,y}"``: the global batches gathered back
with ``process_allgather``) and ``OUT_DIR/process{PROCESS_ID}.json`` (the
topology, and per mode ``ok``/``error``/``traceback``, traces per step,
whether every output leaf was fully replicated and whether this process's
replicas agreed bit for bit). A mode that raises is recorded, not fatal.

Exits with ``ENV_ERROR_EXIT`` if the distributed system cannot be set up or
its first cross-process collective fails (an environment limitation, which
the test reports as a skip); every later failure is the test's to judge.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import _distributed_setup as dw




NUM_PROCESSES = 2
LOCAL_DEVICES = 2
NUM_DEVICES = NUM_PROCESSES * LOCAL_DEVICES
AXIS = dw.AXIS
ENV_ERROR_EXIT = 77
INIT_TIMEOUT_S = 30  # jax.distributed.initialize gives up after this

Arrays = dict[str, np.ndarray]


def local_rows(sharding: NamedSharding, n: int) -> np.ndarray:
  """Global row indices of a ``(n, ...)`` array held by this process, in order.

  ``make_array_from_process_local_data`` expects this process's rows in
  increasing global order; with ``jax.make_mesh`` they are one contiguous half.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map((n,)).values():
    rows.update(range(*index[0].indices(n)))
  return np.array(sorted(rows))


def global_batch(batch: dw.Batch, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """The global batch sharded over ``mesh``, built from this process's rows only."""
  sharding = NamedSharding(mesh, P(AXIS))
  rows = local_rows(sharding, dw.GLOBAL_BATCH)
  local = {k: v[rows] for k, v in batch.items()}  # this process's share
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (dw.GLOBAL_BATCH, *v.shape[1:])) for k, v in local.items()}


def host_copy(leaf: jax.Array) -> tuple[np.ndarray, bool, bool]:
  """A replicated array's value as this process holds it.

  Returns:
    ``(value of the first local replica, fully replicated?, all local
    replicas bitwise equal?)``.
  """
  shards = [np.asarray(s.data) for s in leaf.addressable_shards]
  equal = all(np.array_equal(s, shards[0]) for s in shards[1:])
  return shards[0], bool(leaf.sharding.is_fully_replicated), equal


def snapshot(params: Any, opt_state: Any) -> tuple[Arrays, bool, bool]:
  """Final parameters, factors and inverses (``_distributed_setup.snapshot`` keys).

  Returns:
    ``(arrays, every leaf fully replicated, local replicas all equal)``.
  """
  kstate = opt_state[0]
  leaves = [(f"params|{jax.tree_util.keystr(path)}", leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
  for kind, tree in (("factors", kstate.factors), ("inverses", kstate.inverses)):
    leaves += [(f"{kind}|{name}|{which}", leaf)
               for name, fac in tree.items() for which, leaf in fac.items()]
  out: Arrays = {}
  replicated, equal = True, True
  for key, leaf in leaves:
    out[key], rep, eq = host_copy(leaf)
    replicated, equal = replicated and rep, equal and eq
  for leaf in jax.tree.leaves(opt_state):  # the rest of the state too
    _, rep, eq = host_copy(leaf)
    replicated, equal = replicated and rep, equal and eq
  return out, replicated, equal


def train(mesh: jax.sharding.Mesh, step: Callable[..., Any],
          tx: optax.GradientTransformationExtraArgs,
          traces: list[int]) -> tuple[Arrays, dict[str, Any]]:
  """Runs ``step`` on every global batch from replicated initial values.

  Args:
    mesh: the 1-D ``"batch"`` mesh over the 4 global devices.
    step: the jitted ``(params, state, batch) -> (params, state)``.
    tx: the optimizer (for ``init``).
    traces: appended to whenever ``step`` is traced.

  Returns:
    ``(arrays, meta)``.
  """
  replicated = NamedSharding(mesh, P())
  # Every process passes the same host values: a replicated global array.
  params = jax.device_put(dw.init_params(), replicated)
  state = jax.jit(tx.init, out_shardings=replicated)(params)
  arrays: Arrays = {}
  meta: dict[str, Any] = {"traces": []}
  for i, batch in enumerate(dw.make_batches()):
    sharded = global_batch(batch, mesh)
    for k, v in multihost_utils.process_allgather(sharded, tiled=True).items():
      arrays[f"batch{i}|{k}"] = np.asarray(v)
    n = len(traces)
    params, state = step(params, state, sharded)
    meta["traces"].append(len(traces) - n)
  out, meta["replicated"], meta["replicas_equal"] = snapshot(params, state)
  arrays.update(out)
  return arrays, meta


def _sgd_step(tx: optax.GradientTransformationExtraArgs,
              grads_fn: Callable[[Any, Any], Any],
              traces: list[int]) -> Callable[..., Any]:
  def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
    traces.append(1)
    grads = grads_fn(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state
  return step


def run_gspmd(explicit: bool) -> tuple[Arrays, dict[str, Any]]:
  """``jax.jit`` on the batch-sharded global arrays, no ``axis_name``."""
  axis_types = None if explicit else (jax.sharding.AxisType.Auto,)
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=axis_types)
  tx = dw.make_optimizer(dw.make_batches()[0])
  traces: list[int] = []
  step = jax.jit(_sgd_step(tx, jax.grad(dw.loss_fn), traces))
  if explicit:
    with jax.set_mesh(mesh):
      return train(mesh, step, tx, traces)
  return train(mesh, step, tx, traces)


def run_shard_map(**kwargs: Any) -> tuple[Arrays, dict[str, Any]]:
  """``jax.shard_map`` over the 4 devices, K-FAC with ``axis_name``."""
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,))
  tx = dw.make_optimizer(dw.local_batch(dw.make_batches()[0], NUM_DEVICES),
                         axis_name=AXIS, **kwargs)

  def grads_fn(params: Any, batch: Any) -> Any:
    return jax.grad(lambda p: jax.lax.pmean(dw.loss_fn(p, batch), AXIS))(params)

  traces: list[int] = []
  step = jax.jit(jax.shard_map(_sgd_step(tx, grads_fn, traces), mesh=mesh,
                               in_specs=(P(), P(), P(AXIS)), out_specs=(P(), P())))
  return train(mesh, step, tx, traces)


RUNNERS: dict[str, Callable[[], tuple[Arrays, dict[str, Any]]]] = {
    "gspmd_auto": lambda: run_gspmd(explicit=False),
    "gspmd_explicit": lambda: run_gspmd(explicit=True),
    "shard_map": run_shard_map,
    "shard_map_spread": lambda: run_shard_map(distribute_inverses=True),
}
# What the test runs (and a run without MODE arguments). gspmd_explicit is
# left out for time: its compile costs as much CPU as gspmd_auto's (the
# largest share of the run), and across processes it adds nothing that
# gspmd_auto lacks (test_distributed covers Explicit meshes on one process).
DEFAULT_MODES = ("gspmd_auto", "shard_map", "shard_map_spread")


def connect(port: int, process_id: int) -> dict[str, Any]:
  """Joins the 2-process system and checks one cross-process all-reduce.

  Returns:
    The topology as this process sees it, with the global batch rows it
    feeds on a ``jax.make_mesh`` mesh.
  """
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=NUM_PROCESSES, process_id=process_id,
                             initialization_timeout=INIT_TIMEOUT_S)
  total = multihost_utils.process_allgather(np.array([jax.process_index()]))
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  rows = local_rows(NamedSharding(mesh, P(AXIS)), dw.GLOBAL_BATCH)
  return {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "device_count": jax.device_count(),
          "local_device_count": jax.local_device_count(),
          "allgathered_process_ids": np.asarray(total).ravel().tolist(),
          "local_rows": rows.tolist()}


def main(argv: list[str]) -> int:
  """Connects, runs the requested modes (all by default), writes the results."""
  out_dir, port, process_id = argv[1], int(argv[2]), int(argv[3])
  modes = argv[4:] or list(DEFAULT_MODES)
  start = time.perf_counter()
  try:
    meta: dict[str, Any] = {"topology": connect(port, process_id)}
  except Exception as exc:  # pylint: disable=broad-except
    print(f"ENVIRONMENT: multi-process jax did not start: {type(exc).__name__}: {exc}",
          file=sys.stderr, flush=True)
    return ENV_ERROR_EXIT
  meta["connect_seconds"] = round(time.perf_counter() - start, 2)
  arrays, results = dw.run_modes(RUNNERS, modes)
  meta.update(results)
  np.savez(os.path.join(out_dir, f"process{process_id}.npz"), **arrays)
  with open(os.path.join(out_dir, f"process{process_id}.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
