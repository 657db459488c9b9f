"""Doubly-factored vs plain K-FAC on a flattened feature map, against Adam.

The model: digits (``examples/digits_data.py``) zero-padded to 12x12 images,
one 3x3 convolution to 32 channels with a ReLU, its ``[B, 12, 12, 32]``
feature map flattened (``d_in = 4608``) into a dense softmax head over the
10 classes; batch 128. The head's input factor is 4609 x 4609 with plain
K-FAC (``max_factor_dim=10**6``) and, doubly factored (Ba et al. 2017, §4;
the default ``max_factor_dim=4096``), ``K [144, 144] ⊗ Ψ [32, 32] ⊗ G [10, 10]``
with a bias block ``B [10, 10]``. In one process:

1. Step time: each optimizer's jitted full train step (``value_and_grad`` +
   ``update`` + ``apply_updates``), compiled ahead of time, a few warm-up
   steps run and discarded, then Adam and both K-FAC variants (statistics
   every step, inverses every 10) run in interleaved rounds (the order
   rotates every round), every call timed to ``jax.block_until_ready``.
   Reported: median and mean step (the mean carries the inverse steps) and
   their K-FAC/Adam ratios, and the compile time.
2. One inverse refresh: the damped inverses of every block
   (``Block.inverses`` of ``kfac_jax_lite.curvature.specs``) of the trained state's factors, jitted
   alone, median of a few calls.
3. Memory: the blocks' factors and inverses as ``kfl.find_layers`` counts
   them, the whole optimizer state (the ``nbytes`` of its leaves, momentum
   included), and the compiled step's temporaries and its arguments +
   outputs + temporaries from ``memory_analysis()`` ("n/a" where the backend
   gives none).
4. Quality: every optimizer's full training-set loss after its last step
   (all start from the same parameters and see the same batches, one epoch
   cycled). Adam's learning rate is tuned; K-FAC has the settings of
   ``examples/digits.py``.

``inverse_method`` defaults to ``"cholesky"``: one ``eigh`` of the plain
4609 x 4609 factor takes about 20 s on one CPU core (Cholesky about 7 s).
Run ``python benchmarks/doubly.py`` (``--rounds``, ``--round-steps``,
``--inverse-calls``, ``--inverse-method``, ``--quick``); it prints markdown
tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import common  # pylint: disable=wrong-import-position
import digits_data  # pylint: disable=wrong-import-position

import kfac_jax_lite as kfl  # pylint: disable=wrong-import-position
from kfac_jax_lite.curvature.specs import spec_for  # pylint: disable=wrong-import-position
from step_time import machine_info  # pylint: disable=wrong-import-position
import timing  # pylint: disable=wrong-import-position

SIDE, PAD, CHANNELS = 12, 2, 32  # 8x8 digits padded to 12x12; 12*12*32 = 4608 features
BATCH_SIZE = 128
WARMUP_STEPS = 3
NUM_BATCHES = 11  # one epoch of the 1438 training images
ADAM_LR = 3e-2  # The best of {1e-3, 3e-3, 1e-2, 3e-2, 1e-1} after 103 steps.
KFAC_HPARAMS = dict(learning_rate=0.3, damping=1e-2, kl_clip=1e-3)  # examples/digits.py
VARIANTS = {"plain": 10**6, "doubly": 4096}  # name -> max_factor_dim


class FlatConvNet(nn.Module):
  """A 3x3 convolution whose feature map is flattened into a softmax head."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(CHANNELS, (3, 3))(x))
    return nn.Dense(digits_data.NUM_CLASSES)(x.reshape((x.shape[0], -1)))


def load_images() -> common.Batch:
  """The digits training split as ``[n, 12, 12, 1]`` zero-padded images."""
  train, _ = digits_data.load_split()
  x = train["x"].reshape(-1, 8, 8, 1)
  return {"x": np.pad(x, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0))), "y": train["y"]}


def init_params(model: nn.Module, seed: int = 0) -> Any:
  """Flax's default initialization, drawn with numpy (``init`` compiles slowly)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, SIDE, SIDE, 1))))
  rng = np.random.default_rng(seed)

  def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
    if path[-1].key == "kernel":
      return common.lecun_normal(rng, leaf.shape, int(np.prod(leaf.shape[:-1])))
    return jnp.zeros(leaf.shape, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)["params"]


def make_loss(model: nn.Module) -> common.LossFn:
  """The mean softmax cross-entropy ``(params, batch) -> scalar``."""
  def loss_fn(params: Any, batch: common.Batch) -> jax.Array:
    logits = model.apply({"params": params}, batch["x"])
    return kfl.losses.softmax_cross_entropy(logits, batch["y"])
  return loss_fn


def tree_bytes(tree: Any) -> int:
  """Total ``nbytes`` of a pytree's array leaves."""
  return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree))


def memory(compiled: Any) -> tuple[int | None, int | None]:
  """Temporary and total bytes of a compiled step, ``None`` where unknown.

  Args:
    compiled: the ahead-of-time compiled step.

  Returns:
    The temporaries, and arguments + outputs + temporaries - aliased bytes
    (XLA:CPU's ``peak_memory_in_bytes`` leaves out the temporaries).
  """
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, AttributeError, RuntimeError):
    return None, None
  if stats is None:
    return None, None
  temp = stats.temp_size_in_bytes
  return temp, (stats.argument_size_in_bytes + stats.output_size_in_bytes + temp
                - stats.alias_size_in_bytes)


class Runner(timing.TimedSteps):
  """One optimizer's compiled step, its running state and its step times."""

  def __init__(self, loss_fn: common.LossFn, params: Any, batches: list[common.Batch],
               name: str, **settings: Any):
    """Builds and compiles the step, then runs the warm-up steps.

    Args:
      loss_fn: the loss.
      params: the initial parameters.
      batches: training batches, cycled.
      name: ``"adam"`` or ``"kfac"``.
      **settings: K-FAC settings beyond :data:`KFAC_HPARAMS`.
    """
    tx = common.make_optimizer(name, loss_fn, batches[0], adam_lr=ADAM_LR,
                               kfac_hparams=KFAC_HPARAMS, **settings)
    state = (params, tx.init(params))
    step, self.compile_s = common.compile_step(
        common.make_train_step(loss_fn, tx), *state, batches[0])
    super().__init__(step, state, batches)
    self.temp_bytes, self.total_bytes = memory(step)
    self.run(WARMUP_STEPS, record=False)


def kfac_state(opt_state: Any) -> kfl.KfacState:
  """The :class:`kfl.KfacState` inside ``kfl.kfac``'s chained state."""
  def is_kfac(node: Any) -> bool:
    return isinstance(node, kfl.KfacState)
  return next(filter(is_kfac, jax.tree_util.tree_leaves(opt_state, is_leaf=is_kfac)))


def inverse_refresh(layers: Sequence[Any], factors: dict[str, dict[str, jax.Array]],
                    method: str, calls: int) -> float:
  """Median seconds of one jitted refresh of every block's damped inverses.

  Args:
    layers: the ``kfl.find_layers`` records.
    factors: the state's factor moving averages, by layer name.
    method: ``"eigh"`` or ``"cholesky"``.
    calls: timed calls (after an ahead-of-time compilation).

  Returns:
    The median wall-clock seconds of a call.
  """
  by_name = {l.name: l for l in layers if l.name in factors}

  def refresh(facs: dict[str, dict[str, jax.Array]]) -> dict[str, dict[str, jax.Array]]:
    return {n: spec_for(by_name[n]).inverses(facs[n], KFAC_HPARAMS["damping"], method)
            for n in by_name}

  fn = jax.jit(refresh).lower(factors).compile()
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(factors))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _mib(n: int | None) -> str:
  return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def _dense_factors(layers: Sequence[Any]) -> str:
  head = next(l for l in layers if "Dense" in l.name)
  return " ".join(f"{k}{list(s)}" for k, s in spec_for(head).factor_shapes.items())


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the benchmark and prints the tables."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  parser.add_argument("--round-steps", type=int, default=20,
                      help="steps per optimizer per round (a multiple of 10 for the mean)")
  parser.add_argument("--inverse-calls", type=int, default=3,
                      help="timed calls of the inverse refresh alone")
  parser.add_argument("--inverse-method", choices=("eigh", "cholesky"), default="cholesky")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: one round of 10 steps, one inverse call")
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds, args.round_steps, args.inverse_calls = 1, 10, 1
  start = time.perf_counter()
  print(machine_info())
  model = FlatConvNet()
  loss_fn = make_loss(model)
  params = init_params(model)
  data = load_images()
  it = common.batches(data, BATCH_SIZE)
  batches = [jax.device_put(next(it)) for _ in range(NUM_BATCHES)]
  layers = {v: kfl.find_layers(loss_fn, params, batches[0],
                               layers=kfl.LayerOptions(max_factor_dim=d))
            for v, d in VARIANTS.items()}
  runners = {"adam": Runner(loss_fn, params, batches, "adam")}
  runners.update({v: Runner(loss_fn, params, batches, "kfac",
                            layers=kfl.LayerOptions(max_factor_dim=d),
                            inverses=kfl.InverseOptions(args.inverse_method))
                  for v, d in VARIANTS.items()})
  timing.interleave(list(runners.values()), args.rounds, args.round_steps)
  full_loss = jax.jit(loss_fn)
  data = jax.device_put(data)
  adam = runners["adam"]
  med_a, mean_a = np.median(adam.times), np.mean(adam.times)
  steps = adam.count

  print(f"\nStep time ({args.rounds} interleaved rounds of {args.round_steps} steps, "
        f"{WARMUP_STEPS} warm-up steps excluded; K-FAC stats 1, inverses 10, "
        f"{args.inverse_method}), batch {BATCH_SIZE}\n")
  print("| optimizer | head factors | median ms K-FAC / Adam | median ratio | mean ratio "
        "| one inverse refresh | compile s K-FAC / Adam |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for v in VARIANTS:
    x = runners[v]
    med, mean = np.median(x.times), np.mean(x.times)
    inv_s = inverse_refresh(layers[v], kfac_state(x.state[1]).factors, args.inverse_method,
                            args.inverse_calls)
    print(f"| K-FAC {v} | {_dense_factors(layers[v])} | {med * 1e3:.1f} / {med_a * 1e3:.1f} "
          f"| {med / med_a:.2f}x | {mean / mean_a:.2f}x | {inv_s * 1e3:.0f} ms "
          f"| {x.compile_s:.1f} / {adam.compile_s:.1f} |", flush=True)

  print(f"\nMemory and training loss (full training set, {len(data['y'])} images) after "
        f"{steps} steps from the same initialization\n")
  print("| optimizer | blocks (find_layers) | optimizer state (nbytes) | step temporaries "
        f"| step args + outputs + temps | loss after {steps} steps |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, x in runners.items():
    blocks_bytes = _mib(layers[name].total_bytes()) if name in layers else "-"
    label = "Adam" if name == "adam" else f"K-FAC {name}"
    loss = float(full_loss(x.state[0], data))
    print(f"| {label} | {blocks_bytes} | {_mib(tree_bytes(x.state[1]))} "
          f"| {_mib(x.temp_bytes)} | {_mib(x.total_bytes)} | {loss:.4f} |", flush=True)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"\nload average (1 min) at the end: {load:.2f}; "
        f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
