"""Scale-out benchmark: weak scaling, inverse-step latency spikes, memory.

Three measurements on the digits models (``examples/digits_data.py``), with
the tuned optimizers of ``examples/digits.py``:

1. Weak scaling on 1, 2, 4 and 8 fake CPU devices
   (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which must be set
   before jax is imported, so every N runs in a child process of this script:
   ``--devices N`` prints one JSON line). The per-device batch is fixed (64);
   the train step is ``jax.pmap``-ed over ``axis_name="batch"`` and ``pmean``s
   the gradients; K-FAC (``stats_every=1``, ``inverse_every=10``, given the
   same ``axis_name`` so it averages its factor statistics) and Adam run under
   the same ``pmap``, in interleaved rounds, and so do (N > 1, chosen with
   ``--placement``) K-FAC with ``distribute_inverses=True`` (``kfac+dist``:
   inverses replicated, KAISA's COMM-OPT) and with
   ``inverse_placement="sharded"`` (``kfac+shard``: KAISA's MEM-OPT). The fake
   devices share the machine's cores, so absolute times grow with N: the
   K-FAC/Adam ratio is what matters. Also the communication per step and the
   inverse memory per device, from the parameter and factor sizes, checked
   against the collectives of the compiled HLO.
2. Step-time distribution of the autoencoder (1 device, batch 256,
   ``inverse_every=10``) with and without ``staggered_inverses``, for
   ``eigh`` and ``cholesky``: median, p90, max, max/median over steps 1..S
   (step 0 computes every inverse in both modes and is left out), and the
   worst median over the 10 phases (step % 10), which machine noise barely
   moves.
3. Memory of one compiled train step (``compile().memory_analysis()``) and the
   optimizer state size, K-FAC vs Adam, both models at batch 256.

Every step is timed to completion (``jax.block_until_ready``); compilation is
ahead of time and excluded (it dominates the run time: about 30 step
compilations). Run ``python benchmarks/scaling.py`` (``--quick``
for a short run on 1 and 8 devices, 60 steps in part 2; ``--scaling-only``
for part 1 alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import math
import time
from typing import Any, Sequence


def _requested_devices(argv: Sequence[str]) -> int | None:
  """The ``--devices N`` of a child process, read before jax is imported."""
  for i, arg in enumerate(argv):
    if arg == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
  return None


_CHILD_DEVICES = _requested_devices(sys.argv[1:])
if _CHILD_DEVICES is not None:  # Must precede the jax import.
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [
      os.environ.get("XLA_FLAGS", ""),
      f"--xla_force_host_platform_device_count={_CHILD_DEVICES}"]))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import digits  # pylint: disable=wrong-import-position
import digits_data  # pylint: disable=wrong-import-position
import timing  # pylint: disable=wrong-import-position

import kfac_jax_lite as kfl  # pylint: disable=wrong-import-position

AXIS = "batch"
PER_DEVICE_BATCH = 64
DEVICE_COUNTS = (1, 2, 4, 8)
QUICK_DEVICE_COUNTS = (1, 8)
STATS_EVERY, INVERSE_EVERY = 1, 10
ROUND = 20  # Steps per weak-scaling timing round: a multiple of INVERSE_EVERY.
NUM_BATCHES = 5


# ----------------------------------------------------------------- helpers --

def machine_info() -> str:
  """Platform, CPU count, load and library versions, one per line."""
  load = os.getloadavg()
  return "\n".join([
      f"platform: {platform.platform()} ({platform.machine()}, "
      f"{platform.processor() or 'unknown CPU'})",
      f"CPUs: {os.cpu_count()}, load average at start (1/5/15 min): "
      f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
      f"python {platform.python_version()}, jax {jax.__version__}, "
      f"optax {optax.__version__}, backend {jax.default_backend()}",
      f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}",
  ])


def tree_bytes(tree: Any) -> int:
  """Total ``nbytes`` of the array leaves of ``tree``."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.size(x))
                 for x in jax.tree_util.tree_leaves(tree)))


def kib(n: float) -> str:
  """``n`` bytes in KiB, one decimal."""
  return f"{n / 1024:.1f}"


_HLO_ARRAY = re.compile(r"\b(pred|bf16|[fsu]\d+)\[([\d,]*)\]")
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all")
_HLO_COLLECTIVE = re.compile(r"=\s*(.*?)\s+(all-reduce|all-gather|all-to-all)(?:-start)?\(")


def hlo_collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of every collective op of an HLO module, all branches, by kind.

  Each ``all-reduce`` / ``all-gather`` / ``all-to-all`` (or its ``-start``)
  is counted once, with the size of its result (an array or a tuple of
  arrays), whether or not it sits in a conditional branch.

  Args:
    hlo_text: the compiled module's text (``compiled.as_text()``).

  Returns:
    ``{kind: bytes}`` for the kinds in :data:`COLLECTIVES`.
  """
  total = dict.fromkeys(COLLECTIVES, 0)
  for line in hlo_text.splitlines():
    match = _HLO_COLLECTIVE.search(line)
    if not match:
      continue
    for dtype, dims in _HLO_ARRAY.findall(match.group(1)):
      size = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
      total[match.group(2)] += size * (1 if dtype == "pred" else
                                       int(re.sub(r"\D", "", dtype)) // 8)
  return total


class Timed(timing.TimedSteps):
  """A compiled train step, its running state and its per-step times.

  Attributes:
    name: label of the configuration.
    step: the compiled ``(params, state, batch) -> (params, state, loss)``.
    compile_s: seconds the ahead-of-time compilation took.
  """

  def __init__(self, name: str, step: Any, params: Any, state: Any,
               batches: list[Any]):
    self.name = name
    start = time.perf_counter()
    compiled = step.lower(params, state, batches[0]).compile()
    self.compile_s = time.perf_counter() - start
    super().__init__(compiled, (params, state), batches)


# ----------------------------------------------------- 1. weak scaling ------

def make_pmap_step(loss_fn: digits_data.LossFn,
                   tx: optax.GradientTransformationExtraArgs) -> Any:
  """Data-parallel train step: local gradients, ``pmean``, optimizer update."""
  def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any, jax.Array]:
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    grads = jax.lax.pmean(grads, AXIS)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, jax.lax.pmean(loss, AXIS)
  return jax.pmap(step, axis_name=AXIS)


PLACEMENT_CONFIGS = {
    "kfac+dist": dict(distribute_inverses=True),
    "kfac+shard": dict(inverse_placement="sharded"),
}


def _placement_configs(placement: str) -> list[str]:
  """The distributed K-FAC configurations ``--placement`` selects."""
  return {"replicated": ["kfac+dist"], "sharded": ["kfac+shard"],
          "both": list(PLACEMENT_CONFIGS)}[placement]


def weak_scaling_child(num_devices: int, rounds: int, placement: str) -> dict[str, Any]:
  """Times Adam and K-FAC under ``pmap`` on this process's devices.

  Args:
    num_devices: expected ``jax.device_count()``.
    rounds: interleaved rounds of ``ROUND`` steps per configuration.
    placement: ``"replicated"``, ``"sharded"`` or ``"both"``: the
      distributed-inverse configurations to time (N > 1).

  Returns:
    ``{problem: {config: {"times", "compile_s", "hlo_bytes"}}}``.
  """
  if jax.device_count() != num_devices:
    raise SystemExit(f"expected {num_devices} devices, got {jax.devices()}")
  n = num_devices
  mesh = jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = NamedSharding(mesh, P(AXIS))

  def replicate(tree: Any) -> Any:
    # The sharding pmap gives its outputs, so the inputs match them.
    return jax.tree.map(lambda a: jax.device_put(
        np.broadcast_to(np.asarray(a), (n, *np.shape(a))), sharded), tree)

  def split(batch: digits_data.Batch) -> Any:
    return jax.device_put(
        jax.tree.map(lambda a: a.reshape(n, -1, *a.shape[1:]), batch), sharded)

  train, _ = digits_data.load_split()
  out: dict[str, Any] = {}
  for problem in digits.PROBLEMS:
    model, loss_fn = digits_data.make_problem(problem)
    params = digits_data.init_params(model)
    it = digits_data.batches(train, PER_DEVICE_BATCH * n)
    batches = [split(next(it)) for _ in range(NUM_BATCHES)]
    local = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                         batches[0])
    configs: dict[str, tuple[str, dict[str, Any]]] = {
        "adam": ("adam", {}),
        "kfac": ("kfac", dict(parallel=kfl.ParallelOptions(axis_name=AXIS))),
    }
    if n > 1:
      configs.update({name: ("kfac", dict(parallel=kfl.ParallelOptions(axis_name=AXIS, **PLACEMENT_CONFIGS[name])))
                      for name in _placement_configs(placement)})
    runners = []
    for name, (opt, kwargs) in configs.items():
      tx = digits.make_optimizer(opt, problem, loss_fn, local, stats_every=STATS_EVERY,
                                 inverse_every=INVERSE_EVERY, **kwargs)
      # Built inside pmap: a sharded state differs per device.
      state = jax.pmap(tx.init, axis_name=AXIS)(replicate(params))
      runner = Timed(name, make_pmap_step(loss_fn, tx), replicate(params), state, batches)
      runner.run(1, record=False)  # Step 0: every K-FAC inverse, first dispatch.
      runners.append(runner)
    timing.interleave(runners, rounds, ROUND)
    out[problem] = {r.name: {"times": r.times, "counts": r.counts,
                             "compile_s": r.compile_s,
                             "hlo_bytes": hlo_collective_bytes(r.step.as_text())}
                    for r in runners}
  return out


def run_child(num_devices: int, rounds: int, placement: str) -> dict[str, Any]:
  """Runs this script with ``--devices num_devices``; returns its JSON."""
  cmd = [sys.executable, os.path.abspath(__file__), "--devices", str(num_devices),
         "--rounds", str(rounds), "--placement", placement]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                        env=dict(os.environ))
  if proc.returncode != 0:
    raise RuntimeError(f"child with {num_devices} devices failed "
                       f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def communication(problem: str, n: int) -> dict[str, dict[str, float]]:
  """Collective payloads per step and inverse memory per device (float32).

  From the factor shapes and the library's cost-balanced shares. Payloads are
  result sizes in bytes, ``{config: {kind: bytes}}`` for the kinds of
  :data:`COLLECTIVES`, split into ``"grads"`` (every step), ``"stats"`` (on
  statistics steps) and ``"inverses"`` (on inverse steps) parts, plus
  ``"memory"``, a device's inverse bytes. Both distributed configurations
  all-to-all the owners' row slices (``ceil(d / n)`` rows of each inverse,
  padded to the largest share's); ``kfac+dist`` then all-gathers every
  device's slices; ``kfac+shard`` keeps them, adds a 4-byte ``pmin`` of the
  finiteness flag, and all-gathers the preconditioned gradient twice per step
  (``A^{-1}`` row blocks, then ``G^{-1}``). Every digits layer is dense: no
  diagonal inverses to gather.

  Args:
    problem: ``"mlp"`` or ``"autoencoder"``.
    n: number of devices.

  Returns:
    The payloads of ``adam``, ``kfac``, ``kfac+dist`` and ``kfac+shard``.
  """
  from kfac_jax_lite import schedule  # pylint: disable=import-outside-toplevel
  from kfac_jax_lite.tagging import tag, trace_loss  # pylint: disable=import-outside-toplevel
  model, loss_fn = digits_data.make_problem(problem)
  params = digits_data.init_params(model)
  sample = {"x": jax.ShapeDtypeStruct((PER_DEVICE_BATCH, digits_data.NUM_FEATURES), np.float32),
            "y": jax.ShapeDtypeStruct((PER_DEVICE_BATCH,), np.int32)}
  tagged = tag(trace_loss(loss_fn, params, sample))
  shares = schedule.balanced_groups(schedule.inversion_costs(tagged), n)
  dims = {l.name: (l.d_in, l.d_out) for l in tagged.factored}
  grads, f32 = tree_bytes(params), 4
  factors = f32 * sum(a * a + g * g for a, g in dims.values())

  def rows(d: int) -> int:
    return math.ceil(d / n)

  slices = max(sum(rows(dims[m][0]) * dims[m][0] + rows(dims[m][1]) * dims[m][1]
                   for m in share) for share in shares)
  memory = f32 * sum(rows(a) * a + rows(g) * g for a, g in dims.values())
  precondition = n * sum(rows(a) * g + rows(g) * a for a, g in dims.values())
  zero = dict.fromkeys(COLLECTIVES, 0.0)
  adam = {"grads": {**zero, "all-reduce": grads + f32}, "stats": zero, "inverses": zero,
          "memory": 0.0}
  kfac = {**adam, "stats": {**zero, "all-reduce": factors}, "memory": factors}
  return {
      "adam": adam, "kfac": kfac,
      "kfac+dist": {**kfac, "inverses": {**zero, "all-to-all": f32 * n * slices,
                                          "all-gather": n * memory}},
      "kfac+shard": {
          "grads": {**zero, "all-reduce": grads + f32, "all-gather": f32 * precondition},
          "stats": kfac["stats"],
          "inverses": {**zero, "all-reduce": f32, "all-to-all": f32 * n * slices},
          "memory": memory},
  }


def weak_scaling(device_counts: Sequence[int], rounds: int, placement: str) -> None:
  """Part 1: runs one child per device count and prints the tables."""
  print(f"1. Weak scaling: pmap over N fake CPU devices, {PER_DEVICE_BATCH} "
        f"examples per device, K-FAC stats_every={STATS_EVERY}, "
        f"inverse_every={INVERSE_EVERY} ({rounds} interleaved rounds of {ROUND} "
        "steps per configuration after step 0)")
  print("   The N devices share the machine's cores: absolute times grow with N; "
        "compare the ratios.")
  results: dict[int, dict[str, Any]] = {}
  for n in device_counts:
    start = time.perf_counter()
    results[n] = run_child(n, rounds, placement)
    print(f"   (N={n}: child process {time.perf_counter() - start:.1f}s, "
          f"load {os.getloadavg()[0]:.2f})", flush=True)
  header = (f"{'model':<12}{'N':>3}  {'optimizer':<11}{'median ms':>10}{'mean ms':>10}"
            f"{'med/Adam':>10}{'mean/Adam':>10}{'inv step ms':>12}{'compile s':>10}")
  print()
  print(header)
  print("-" * len(header))
  for problem in digits.PROBLEMS:
    for n in device_counts:
      runs = results[n][problem]
      med_a = np.median(runs["adam"]["times"])
      mean_a = np.mean(runs["adam"]["times"])
      for name, run in runs.items():
        times = np.asarray(run["times"])
        med, mean = np.median(times), np.mean(times)
        due = np.asarray(run["counts"]) % INVERSE_EVERY == 0
        inv = f"{np.median(times[due]) * 1e3:.2f}" if name != "adam" else "-"
        print(f"{problem:<12}{n:>3}  {name:<11}{med * 1e3:>10.2f}{mean * 1e3:>10.2f}"
              f"{med / med_a:>9.2f}x{mean / mean_a:>9.2f}x{inv:>12}"
              f"{run['compile_s']:>10.1f}")
    print()
  print(f"   inv step ms: median of the steps that refresh the inverses (step % "
        f"{INVERSE_EVERY} == 0); kfac+dist: each device inverts a share, an "
        "all-gather gives every device all inverses; kfac+shard: each device keeps "
        "row slices of the inverses (all-to-all) and the preconditioning is "
        "distributed (two all-gathers per step). Neither at N=1.")
  print()

  n_max = max(device_counts)
  print(f"Communication per step on N={n_max} devices (float32 payloads, amortized over "
        "the statistics / inverse steps) and inverse memory per device")
  header = (f"{'model':<12}{'optimizer':<19}{'all-reduce':>11}{'all-gather':>11}"
            f"{'all-to-all':>11}{'recv/dev':>10}{'/Adam':>7}{'inv mem/dev':>12}"
            f"{'HLO = model':>12}")
  print(header + "\n" + "-" * len(header))
  for problem in digits.PROBLEMS:
    model_bytes = communication(problem, n_max)
    configs = [("adam", "adam", 1, 1)] + [
        (name + suffix, name, s_every, i_every)
        for suffix, s_every, i_every in (("", STATS_EVERY, INVERSE_EVERY), (" s10/i50", 10, 50))
        for name in ("kfac", "kfac+dist", "kfac+shard")]
    adam_recv = None
    for label, name, s_every, i_every in configs:
      parts = model_bytes[name]
      per_step = {k: parts["grads"][k] + parts["stats"][k] / s_every
                  + parts["inverses"][k] / i_every for k in COLLECTIVES}
      # Ring algorithms: a device receives 2(N-1)/N of an all-reduce's payload
      # and (N-1)/N of an all-gather's or all-to-all's.
      recv = (n_max - 1) / n_max * (2 * per_step["all-reduce"] + per_step["all-gather"]
                                    + per_step["all-to-all"])
      adam_recv = adam_recv or recv
      # The HLO counts every collective once per step, whether due or not.
      hlo = results[n_max][problem].get(name, {}).get("hlo_bytes")
      check = "-" if hlo is None or n_max == 1 or label != name else (
          "yes" if all(hlo[k] == parts["grads"][k] + parts["stats"][k] + parts["inverses"][k]
                       for k in COLLECTIVES) else
          "no: " + "/".join(kib(hlo[k]) for k in COLLECTIVES))
      print(f"{problem:<12}{label:<19}" + "".join(f"{kib(per_step[k]):>11}" for k in COLLECTIVES)
            + f"{kib(recv):>10}{recv / adam_recv:>6.2f}x{kib(parts['memory']):>12}{check:>12}")
  print("   KiB. recv/dev: received per device per step by ring algorithms (2(N-1)/N of "
        "an all-reduce's payload, (N-1)/N of an all-gather's / all-to-all's). HLO = model: "
        f"the collectives of the compiled N={n_max} step (each counted once, due or not) "
        "have the modelled sizes, per kind.")
  print()


# ------------------------------------------------ 2. latency spikes ---------

def spikes(steps: int, round_steps: int,
           cache: dict[tuple[str, str], tuple[Any, int]]) -> None:
  """Part 2: step-time distribution with and without staggered inverses.

  Args:
    steps: timed steps per configuration (after step 0).
    round_steps: steps per interleaved round.
    cache: filled with the compiled non-staggered ``eigh`` step and its state
      bytes, under ``("autoencoder", "kfac")``, for part 3.
  """
  problem = "autoencoder"
  model, loss_fn = digits_data.make_problem(problem)
  params = digits_data.init_params(model)
  train, _ = digits_data.load_split()
  it = digits_data.batches(train)
  batches = [jax.device_put(next(it)) for _ in range(NUM_BATCHES)]
  runners = []
  for method in ("eigh", "cholesky"):
    for staggered in (False, True):
      tx = digits.make_optimizer("kfac", problem, loss_fn, batches[0],
                                 stats_every=STATS_EVERY, inverse_every=INVERSE_EVERY,
                                 inverses=kfl.InverseOptions(method, staggered))
      state = tx.init(params)
      runner = Timed(f"{method} {'staggered' if staggered else 'all at once'}",
                     digits.make_train_step(loss_fn, tx), params, state, batches)
      if method == "eigh" and not staggered:
        cache[(problem, "kfac")] = (runner.step, tree_bytes(state))
      runner.run(1, record=False)  # Step 0 computes every inverse in both modes.
      runners.append(runner)
  timing.interleave(runners, steps // round_steps, round_steps)

  print(f"2. Step-time distribution: {problem}, 1 device, batch "
        f"{digits_data.BATCH_SIZE}, stats_every={STATS_EVERY}, "
        f"inverse_every={INVERSE_EVERY}, steps 1..{steps} (step 0 excluded), "
        f"interleaved rounds of {round_steps}")
  header = (f"{'inverses':<24}{'median ms':>10}{'p90 ms':>9}{'max ms':>9}"
            f"{'max/med':>9}{'worst phase/med':>17}{'mean ms':>9}{'compile s':>10}")
  print(header)
  print("-" * len(header))
  for r in runners:
    t = np.asarray(r.times) * 1e3
    med = np.median(t)
    phase = np.asarray(r.counts) % INVERSE_EVERY
    worst = max(np.median(t[phase == k]) for k in range(INVERSE_EVERY))
    print(f"{r.name:<24}{med:>10.2f}{np.percentile(t, 90):>9.2f}{t.max():>9.2f}"
          f"{t.max() / med:>8.2f}x{worst / med:>16.2f}x{t.mean():>9.2f}"
          f"{r.compile_s:>10.1f}")
  print("   worst phase/med: the largest median over the steps of one phase "
        f"(step % {INVERSE_EVERY}), over the median of all steps; noise-robust.")
  print()
  print("   median ms per phase (step % 10):")
  print(f"   {'':<24}" + "".join(f"{k:>7}" for k in range(INVERSE_EVERY)))
  for r in runners:
    t = np.asarray(r.times) * 1e3
    phase = np.asarray(r.counts) % INVERSE_EVERY
    print(f"   {r.name:<24}" + "".join(f"{np.median(t[phase == k]):>7.1f}"
                                      for k in range(INVERSE_EVERY)))
  costs = _inversion_shares(loss_fn, params, batches[0])
  print(f"   inversion cost per staggered group (d^3 per factor, share of all): {costs}")
  print()


def _inversion_shares(loss_fn: digits_data.LossFn, params: Any, batch: Any) -> str:
  """The cost shares of the staggered groups, largest first."""
  from kfac_jax_lite import schedule  # pylint: disable=import-outside-toplevel
  from kfac_jax_lite.tagging import tag, trace_loss  # pylint: disable=import-outside-toplevel
  costs = schedule.factor_costs(tag(trace_loss(loss_fn, params, batch)))
  total = sum(costs.values())
  groups = schedule.balanced_groups(costs, INVERSE_EVERY)
  shares = sorted((sum(costs[n] for n in g) / total for g in groups), reverse=True)
  return ", ".join(f"{s:.0%}" for s in shares)


# -------------------------------------------------------- 3. memory ---------

def memory(cache: dict[tuple[str, str], tuple[Any, int]]) -> None:
  """Part 3: compiled step memory and optimizer state, K-FAC vs Adam."""
  train, _ = digits_data.load_split()
  batch = jax.device_put(next(digits_data.batches(train)))
  print(f"3. Memory of one compiled train step (memory_analysis, 1 device, batch "
        f"{digits_data.BATCH_SIZE}; K-FAC eigh, stats_every={STATS_EVERY}, "
        f"inverse_every={INVERSE_EVERY}) and optimizer state, KiB")
  header = (f"{'model':<12}{'optimizer':<10}{'params':>9}{'opt state':>11}"
            f"{'argument':>10}{'output':>10}{'alias':>8}{'temp':>10}{'peak*':>10}")
  print(header)
  print("-" * len(header))
  for problem in digits.PROBLEMS:
    model, loss_fn = digits_data.make_problem(problem)
    params = digits_data.init_params(model)
    rows = {}
    for name in ("kfac", "adam"):
      if (problem, name) not in cache:
        tx = digits.make_optimizer(name, problem, loss_fn, batch,
                                   stats_every=STATS_EVERY, inverse_every=INVERSE_EVERY)
        state = tx.init(params)
        compiled, _ = digits.compile_step(digits.make_train_step(loss_fn, tx),
                                          params, state, batch)
        cache[(problem, name)] = (compiled, tree_bytes(state))
      compiled, state_bytes = cache[(problem, name)]
      mem = compiled.memory_analysis()
      row = {"params": tree_bytes(params), "state": state_bytes,
             "argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
             "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes}
      row["peak"] = row["argument"] + row["output"] - row["alias"] + row["temp"]
      rows[name] = row
      print(f"{problem:<12}{name:<10}{kib(row['params']):>9}{kib(row['state']):>11}"
            f"{kib(row['argument']):>10}{kib(row['output']):>10}{kib(row['alias']):>8}"
            f"{kib(row['temp']):>10}{kib(row['peak']):>10}")
    ratio = {k: rows["kfac"][k] / rows["adam"][k] if rows["adam"][k] else float("nan")
             for k in rows["kfac"]}
    print(f"{problem:<12}{'K-FAC/Adam':<10}{'':>9}{ratio['state']:>10.2f}x"
          f"{ratio['argument']:>9.2f}x{ratio['output']:>9.2f}x{'':>8}"
          f"{ratio['temp']:>9.2f}x{ratio['peak']:>9.2f}x")
  print("   peak* = argument + output - alias + temp (no buffer donation: the "
        "step keeps its inputs alive).")
  print()


# ---------------------------------------------------------------- main ------

def main(argv: list[str] | None = None) -> None:
  """Runs the benchmark (or, with ``--devices``, one weak-scaling child)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="short run: N in {1, 8}, fewer steps")
  parser.add_argument("--devices", type=int, default=None,
                      help="internal: run the weak-scaling child on N fake devices")
  parser.add_argument("--rounds", type=int, default=None,
                      help=f"weak-scaling rounds of {ROUND} steps per configuration")
  parser.add_argument("--placement", choices=("replicated", "sharded", "both"),
                      default="both", help="distributed-inverse configurations in part 1: "
                      "kfac+dist (replicated inverses), kfac+shard (sharded), or both")
  parser.add_argument("--scaling-only", action="store_true", help="run part 1 only")
  parser.add_argument("--spike-steps", type=int, default=None,
                      help="timed steps per configuration in part 2 (default 200)")
  args = parser.parse_args(argv)
  rounds = args.rounds or (1 if args.quick else 2)
  if args.devices is not None:
    print(json.dumps(weak_scaling_child(args.devices, rounds, args.placement)))
    return

  start = time.perf_counter()
  print(machine_info())
  print()
  device_counts = QUICK_DEVICE_COUNTS if args.quick else DEVICE_COUNTS
  weak_scaling(device_counts, rounds, args.placement)
  part1 = time.perf_counter() - start
  if args.scaling_only:
    print(f"runtime {part1:.0f}s")
    return

  cache: dict[tuple[str, str], tuple[Any, int]] = {}
  spike_steps = args.spike_steps or (60 if args.quick else 200)
  spikes(spike_steps, 20 if args.quick else 50, cache)
  part2 = time.perf_counter() - start - part1
  memory(cache)
  total = time.perf_counter() - start
  load = os.getloadavg()
  print(f"runtime {total:.0f}s (weak scaling {part1:.0f}s, spikes {part2:.0f}s, "
        f"memory {total - part1 - part2:.0f}s); load average at end "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")


if __name__ == "__main__":
  main()
