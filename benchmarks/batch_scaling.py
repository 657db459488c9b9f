"""Does K-FAC keep turning larger batches into fewer steps after AdamW stops?

The batch-size scaling study (Ba, Grosse & Martens 2017; Osawa et al. 2019
claim K-FAC's perfect-scaling region extends several times further than
SGD's or Adam's; McCandlish et al. 2018 model where it ends).

Protocol. For each model (``batch_scaling_tasks.py``: the digits deep
autoencoder and a small character transformer LM), each optimizer
(``optax.adamw(lr, weight_decay=1e-4)`` tuned over lr in {1e-3, 3e-3, 1e-2,
3e-2}; ``kfl.kfac(loss_fn, batch, kl_clip=c)``, everything else the library's
defaults, tuned over c in {1e-4, 1e-3, 1e-2, 1e-1}: see :data:`GRIDS` for
why the KL clip and not the learning rate) and each batch size ``B`` (a 128x
range for the autoencoder, 64x for the LM; every batch is a plain batch of
``B`` examples: neither the data, 1438 images and 270 KB of text, nor the
memory needs ``kfl.accumulate`` micro-batches at these sizes), every value
of the optimizer's four-point grid trains from the same initialization until the loss on the fixed evaluation
set (never the current batch) first reaches the model's target loss, or
until the step budget ``MAX_FACTOR * BASE_STEPS * max(1, B_mid / B)`` runs
out ("not reached"). The evaluation loss is computed after every step up to
step 20, then at steps spaced by at most 5%; the step of first reaching the
target is interpolated linearly inside the interval where it was crossed.

One train step is compiled per (optimizer, batch size) and reused across the
grid (the learning rate is injected state). The grid at each batch size is
tried starting from the previous batch size's best learning rate, nearest
first; a later run is stopped as soon as it can no longer beat the best so
far (its steps are then only a lower bound, recorded as such), and a run
whose evaluation loss is non-finite or above ``DIVERGED`` x its initial value
is stopped as diverged. Steps, not seconds, are the figure: the machine's
load does not change them.

Definitions. ``S(B)``: the best grid value's steps to the target at batch
size ``B``. McCandlish et al.'s model ``S(B) = S_min (1 + B_crit / B)``,
i.e. ``S = S_min + E_min / B`` with ``B_crit = E_min / S_min``, is fitted
by least squares linear in ``1 / B``, each point weighted by ``1 / S(B)``
(relative errors, so the small-batch points with many steps do not dominate).
The halving limit is the first measured doubling ``B -> 2B`` with
``S(B) / S(2B) < 1.5`` (perfect scaling gives 2). The gradient noise scale
``B_simple = tr Σ / ||G||²`` and the gradient diversity come from
``kfl.diagnostics`` averaged over 8 batches of ``min(4 B_mid, largest B)``
examples, at the initialization and at the
parameters where the mid batch size's best AdamW run first reached the target.

Run ``python benchmarks/batch_scaling.py`` (about 30 minutes on 2 CPU cores;
``--quick``: a smoke run of a few steps; ``--models ae``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batch_scaling_report as report  # pylint: disable=wrong-import-position
from batch_scaling_fit import fit_critical_batch, halving_limit  # pylint: disable=wrong-import-position
import batch_scaling_tasks as tasks  # pylint: disable=wrong-import-position
import suite_optim  # pylint: disable=wrong-import-position

# Per optimizer: the keyword tuned and its grid. K-FAC's ``learning_rate`` is
# only a ceiling under its KL clip (README): with the default kl_clip=1e-3 the
# grid {0.03, 0.1, 0.3, 1.0} gave identical runs on the autoencoder at B=64,
# and without the clip every rate of {0.01, ..., 0.3} diverged there, so the
# knob that sets K-FAC's step, ``kl_clip``, is tuned (``--kfac-grid
# learning_rate`` runs the inert learning-rate grid instead).
GRIDS = {"adamw": ("learning_rate", (1e-3, 3e-3, 1e-2, 3e-2)),
         "kfac": ("kl_clip", (1e-4, 1e-3, 1e-2, 1e-1))}
KFAC_LR_GRID = ("learning_rate", (0.03, 0.1, 0.3, 1.0))
# Per model: batch sizes, the mid size (the target's reference), the target
# evaluation loss, and the step budget's base (steps at the mid size).
CONFIGS = {
    "ae": {"sizes": (8, 16, 32, 64, 128, 256, 512, 1024), "mid": 64, "target": 15.0,
           "base_steps": 400},
    "lm": {"sizes": (4, 8, 16, 32, 64, 128, 256), "mid": 32, "target": 1.6,
           "base_steps": 400},
}
QUICK = {"ae": {"sizes": (8, 32), "mid": 8, "target": 25.0, "base_steps": 15},
         "lm": {"sizes": (4, 16), "mid": 4, "target": 3.5, "base_steps": 15}}
MAX_FACTOR = 2.0
EVAL_SPACING = 0.05
EVERY_STEP_UNTIL = 20
DIVERGED = 1.5
NOISE_BATCHES = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def eval_schedule(max_steps: int) -> list[int]:
  """Steps after which the evaluation loss is computed: every step up to
  ``EVERY_STEP_UNTIL``, then spaced by at most ``EVAL_SPACING``, and ``max_steps``."""
  steps, k = [], 1
  while k < max_steps:
    steps.append(k)
    k = k + 1 if k < EVERY_STEP_UNTIL else max(k + 1, math.floor(k * (1 + EVAL_SPACING)))
  return steps + [max_steps]


def crossing(prev: tuple[int, float], cur: tuple[int, float], target: float) -> float:
  """The step where the loss, linear between two evaluations, meets ``target``."""
  (k0, l0), (k1, l1) = prev, cur
  if l1 >= l0:
    return float(k1)
  return k0 + (k1 - k0) * (l0 - target) / (l0 - l1)


def run_to_target(step: Any, state: tuple[Any, Any], task: tasks.ScalingTask,
                  indices: np.ndarray, target: float, cap: float
                  ) -> tuple[dict[str, Any], Any]:
  """Trains until the evaluation loss reaches ``target`` or ``cap`` steps pass.

  Args:
    step: the compiled ``(params, opt_state, data, idx) -> (params, opt_state)``.
    state: the initial ``(params, opt_state)``.
    task: the model.
    indices: ``[max_steps, B]`` batch indices.
    target: the target evaluation loss.
    cap: stop after this many steps (the budget, or the best run so far).

  Returns:
    ``({"steps": interpolated steps or None, "status": "reached" | "budget" |
    "beaten" | "diverged", "curve": [[step, loss], ...]}, params at the
    first evaluation at or below the target, or None)``.
  """
  params, opt_state = state
  curve = [(0, task.evaluate(params))]
  done = 0
  for k in eval_schedule(min(len(indices), math.ceil(cap))):
    for i in range(done, k):
      params, opt_state = step(params, opt_state, task.data, indices[i])
    done = k
    curve.append((k, task.evaluate(params)))
    loss = curve[-1][1]
    if loss <= target:
      steps = crossing(curve[-2], curve[-1], target)
      status = "reached" if steps <= cap else "beaten"
      return ({"steps": steps if status == "reached" else None, "status": status,
               "curve": curve}, params)
    if not math.isfinite(loss) or loss > DIVERGED * curve[0][1]:
      return {"steps": None, "status": "diverged", "curve": curve}, None
  status = "budget" if math.ceil(cap) >= len(indices) else "beaten"
  return {"steps": None, "status": status, "curve": curve}, None


def grid_order(grid: Sequence[float], start: float | None) -> list[float]:
  """The grid, nearest (in log scale) to ``start`` first (``None``: the middle)."""
  center = start if start is not None else grid[(len(grid) - 1) // 2]
  return sorted(grid, key=lambda v: (abs(math.log(v / center)), v))


def tune_batch(task: tasks.ScalingTask, family: str, grid: tuple[str, Sequence[float]],
               batch_size: int, config: dict[str, Any], start: float | None,
               fast_compile: bool) -> dict[str, Any]:
  """Every value of ``grid`` (keyword, values) for ``family`` at ``batch_size``.

  Returns:
    ``{"batch_size", "max_steps", "compile_s", "seconds", "best", "steps",
    "runs": {value: run}, "params_at_target"}`` (``steps`` None: not reached).
  """
  hyper, values = grid
  clock = time.perf_counter()
  max_steps = math.ceil(MAX_FACTOR * config["base_steps"]
                        * max(1.0, config["mid"] / batch_size))
  rng = np.random.default_rng(batch_size)
  indices = task.draw(rng, batch_size, max_steps)
  step, fresh, compile_s = tasks.compile_step(task, family, hyper, batch_size, values[0],
                                              fast_compile)
  best = {"best": None, "steps": None, "params_at_target": None}
  runs = {}
  for value in grid_order(values, start):
    cap = best["steps"] if best["steps"] is not None else max_steps
    run, params = run_to_target(step, fresh(value), task, indices, config["target"], cap)
    runs[value] = run
    if run["status"] == "reached":
      best = {"best": value, "steps": run["steps"], "params_at_target": params}
  print(f"  {task.name} {family:5s} B={batch_size:5d}: best {hyper} {best['best']}, steps "
        f"{best['steps'] if best['steps'] is None else round(best['steps'], 1)} "
        f"({', '.join(f'{v:g}: ' + r['status'] for v, r in runs.items())}) "
        f"compile {compile_s:.1f} s, total {time.perf_counter() - clock:.1f} s", flush=True)
  return {"batch_size": batch_size, "max_steps": max_steps, "compile_s": compile_s,
          "seconds": time.perf_counter() - clock, "runs": runs, **best}


def study_model(task: tasks.ScalingTask, config: dict[str, Any],
                grids: dict[str, tuple[str, Sequence[float]]], fast_compile: bool
                ) -> dict[str, Any]:
  """Every optimizer and batch size of one model, the fits and the noise scales.

  Returns:
    The model's part of the JSON: ``config``, per optimizer its ``points``
    (:func:`tune_batch` without parameters), ``fit`` and ``halving_limit``,
    and ``noise`` (at ``"init"`` and ``"target"``).
  """
  out: dict[str, Any] = {"title": task.title, "config": dict(config), "optimizers": {}}
  at_target = None
  for family, grid in grids.items():
    points, start = [], None
    for batch_size in config["sizes"]:
      point = tune_batch(task, family, grid, batch_size, config, start, fast_compile)
      start = point["best"] if point["best"] is not None else start
      params = point.pop("params_at_target")
      if family == "adamw" and batch_size == config["mid"]:
        at_target = params
      points.append(point)
    sizes, steps = [p["batch_size"] for p in points], [p["steps"] for p in points]
    out["optimizers"][family] = {"hyper": grid[0], "grid": list(grid[1]), "points": points,
                                 "fit": fit_critical_batch(sizes, steps),
                                 "halving_limit": halving_limit(sizes, steps)}
  noise_batch = min(config["sizes"][-1], 4 * config["mid"])
  out["noise"] = {"init": tasks.noise_scale(task, task.params, noise_batch, NOISE_BATCHES)}
  if at_target is not None:
    out["noise"]["target"] = tasks.noise_scale(task, at_target, noise_batch, NOISE_BATCHES)
  return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The command line (see the module docstring)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="ae,lm", help="comma-separated subset of ae,lm")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: two batch sizes, a loose target, a few steps")
  parser.add_argument("--kfac-grid", choices=("kl_clip", "learning_rate"), default="kl_clip",
                      help="K-FAC's tuned keyword (learning_rate: the grid {0.03, 0.1, 0.3, 1})")
  parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results",
                                                     "batch_scaling.json"))
  parser.add_argument("--png", default=os.path.join(REPO, "docs", "batch_scaling.png"))
  parser.add_argument("--replot", metavar="JSON",
                      help="only redraw --png from a saved JSON of this script")
  args = parser.parse_args(argv)
  args.models = suite_optim.parse_models(parser, args.models, list(CONFIGS))
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the study; prints the tables, writes the JSON and the PNG.

  Returns:
    What the JSON holds: ``header`` and ``models``.
  """
  args = parse_args(argv)
  if args.replot:
    with open(args.replot, encoding="utf-8") as f:
      result = json.load(f)
    report.plot(result["models"], args.png)
    return result
  clock, load = time.perf_counter(), os.getloadavg()
  commit = report.git_commit(REPO)
  configs = QUICK if args.quick else CONFIGS
  grids = dict(GRIDS, **({"kfac": KFAC_LR_GRID} if args.kfac_grid == "learning_rate" else {}))
  if args.quick:
    grids = {f: (h, v[1:2]) for f, (h, v) in grids.items()}
  makers = {"ae": tasks.autoencoder_task, "lm": tasks.lm_task}
  models = {}
  for name in args.models:
    models[name] = study_model(makers[name](), configs[name], grids, args.quick)
    print(report.model_table(name, models[name]), flush=True)
  result = {"header": report.header(load, os.getloadavg(), time.perf_counter() - clock,
                                    args.quick, commit), "models": models}
  report.write_json(result, args.json)
  report.plot(models, args.png)
  print(report.header_text(result["header"]))
  return result


if __name__ == "__main__":
  main()
