"""The suite's figures from the evaluation curves: time to tuned AdamW's loss,
ratios, the table and the plot."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from typing import Any, Mapping, Sequence

import numpy as np


@dataclasses.dataclass
class Curve:
  """One optimizer run's evaluation loss curve and its timing.

  Attributes:
    label: e.g. ``"adamw lr=0.003"``.
    spec: the optimizer family's name (``"adamw"``, ``"muon"``, ``"kfac"``, a variant).
    lr: the grid learning rate (``None`` for K-FAC).
    steps: steps at the evaluations (0 = init).
    seconds: cumulative train-step wall-clock at the evaluations (compile excluded).
    loss: evaluation loss at the evaluations.
    compile_s: compile time of the train step (shared by a grid).
  """
  label: str
  spec: str
  lr: float | None
  steps: list[int] = dataclasses.field(default_factory=list)
  seconds: list[float] = dataclasses.field(default_factory=list)
  loss: list[float] = dataclasses.field(default_factory=list)
  compile_s: float = 0.0

  @property
  def final(self) -> float:
    """The last evaluation loss (``inf`` if not finite)."""
    return self.loss[-1] if math.isfinite(self.loss[-1]) else math.inf

  @property
  def step_s(self) -> float:
    """Mean seconds per train step."""
    return self.seconds[-1] / max(self.steps[-1], 1)


def first_reach(curve: Curve, target: float) -> tuple[float, float] | None:
  """``(seconds, steps)`` when ``curve`` first reaches ``target``, linearly
  interpolated inside the evaluation interval; ``None`` if it never does."""
  for i, loss in enumerate(curve.loss):
    if loss <= target:
      if i == 0:
        return 0.0, 0.0
      prev = curve.loss[i - 1]
      frac = (prev - target) / (prev - loss) if prev != loss else 1.0
      return (curve.seconds[i - 1] + frac * (curve.seconds[i] - curve.seconds[i - 1]),
              curve.steps[i - 1] + frac * (curve.steps[i] - curve.steps[i - 1]))
  return None


def loss_at(curve: Curve, seconds: float) -> tuple[float, bool]:
  """The loss at ``seconds`` of train time (linear interpolation) and whether
  the run lasted that long (else its final loss)."""
  if seconds > curve.seconds[-1]:
    return curve.final, False
  return float(np.interp(seconds, curve.seconds, curve.loss)), True


def best(curves: Sequence[Curve]) -> Curve:
  """The grid point with the lowest final evaluation loss."""
  return min(curves, key=lambda c: c.final)


def summarize(curves: Sequence[Curve]) -> dict[str, Any]:
  """The model's figures relative to tuned AdamW.

  Args:
    curves: every run of one model (all grid points, every K-FAC config).

  Returns:
    ``{"target", "adamw": label, "rows": [...]}``; one row per tuned grid
    family and per K-FAC config, each with ``seconds_to_target``,
    ``time_ratio``, ``steps_ratio``, ``step_cost_ratio``, ``final_loss``,
    ``loss_at_adamw_seconds``, ``ran_that_long``, and for a grid its final
    losses and whether the best point is at the grid's edge.
  """
  families: dict[str, list[Curve]] = {}
  for c in curves:
    families.setdefault(c.spec, []).append(c)
  ref = best(families["adamw"])
  target = ref.final
  ref_s, ref_steps = first_reach(ref, target)
  rows = []
  for runs in families.values():
    c = best(runs)
    reach = first_reach(c, target)
    at, lasted = loss_at(c, ref.seconds[-1])
    rows.append({
        "optimizer": c.spec, "label": c.label, "lr": c.lr,
        "grid_final": {str(r.lr): r.final for r in runs} if len(runs) > 1 else None,
        "at_grid_edge": len(runs) > 1 and c.lr in (runs[0].lr, runs[-1].lr),
        "seconds_to_target": reach and reach[0], "steps_to_target": reach and reach[1],
        "time_ratio": reach and _ratio(reach[0], ref_s),
        "steps_ratio": reach and _ratio(reach[1], ref_steps),
        "step_cost_ratio": c.step_s / ref.step_s, "mean_step_ms": 1e3 * c.step_s,
        "total_seconds": c.seconds[-1], "final_loss": c.final,
        "loss_at_adamw_seconds": at, "ran_that_long": lasted,
        "compile_s": c.compile_s})
  return {"target": target, "adamw": ref.label, "adamw_seconds": ref.seconds[-1],
          "rows": rows}


def _ratio(num: float, den: float) -> float:
  return num / den if den > 0 else math.inf


def _fmt(x: float | None, spec: str = ".3g") -> str:
  return "never" if x is None else format(x, spec)


def format_table(summaries: Mapping[str, dict[str, Any]],
                 titles: Mapping[str, str]) -> str:
  """The figures of every model as a markdown table, plus the grid losses.

  Args:
    summaries: model -> :func:`summarize`'s output.
    titles: model -> description.

  Returns:
    The table text.
  """
  head = ("| model | optimizer | final eval loss | s to target | × AdamW s | × steps "
          "| × step cost | loss at AdamW's s |")
  lines = [head, "|" + " --- |" * 8]
  notes = []
  for model, s in summaries.items():
    for r in s["rows"]:
      name = r["label"]
      at = _fmt(r["loss_at_adamw_seconds"], ".4g") + ("" if r["ran_that_long"] else " (end)")
      lines.append(
          f"| {model} | {name} | {r['final_loss']:.4g} | {_fmt(r['seconds_to_target'], '.2f')} "
          f"| {_fmt(r['time_ratio'], '.2f')} | {_fmt(r['steps_ratio'], '.2f')} "
          f"| {r['step_cost_ratio']:.2f} | {at} |")
      if r["grid_final"]:
        grid = ", ".join(f"{lr}: {v:.4g}" for lr, v in r["grid_final"].items())
        edge = " (best at the grid's edge)" if r["at_grid_edge"] else ""
        notes.append(f"{model} {r['optimizer']} grid final losses: {grid}{edge}")
    notes.append(f"{model}: target {s['target']:.4g} = {s['adamw']}'s final eval loss "
                 f"({s['adamw_seconds']:.2f} s); {titles[model]}")
  return "\n".join(lines + [""] + notes)


def plot(curves: Mapping[str, Sequence[Curve]], summaries: Mapping[str, dict[str, Any]],
         titles: Mapping[str, str], floors: Mapping[str, float], path: str) -> None:
  """One panel per model: evaluation loss (minus its floor) vs train seconds, log y.

  Draws the tuned AdamW and Muon grid points and every K-FAC config (the other
  grid points faint) and the target as a dotted line.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  n = len(curves)
  cols = min(n, 3)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.4 * rows), squeeze=False)
  for ax, (model, runs) in zip(axes.flat, curves.items()):
    floor = floors.get(model, 0.0)
    tuned = {r["label"] for r in summaries[model]["rows"]}
    for i, c in enumerate(runs):
      y = np.maximum(np.asarray(c.loss) - floor, 1e-8)
      if c.label in tuned:
        ax.plot(c.seconds, y, label=c.label, lw=2, color=_color(c.spec, i))
      else:
        ax.plot(c.seconds, y, lw=0.8, alpha=0.35, ls="--", color=_color(c.spec, i))
    ax.axhline(max(summaries[model]["target"] - floor, 1e-8), color="k", ls=":", lw=1,
               label="target (tuned AdamW final)")
    ax.set_yscale("log")
    ax.set_xlabel("train seconds (compile excluded)")
    ax.set_ylabel("evaluation loss" + (f" − {floor:.3f} (floor)" if floor else ""))
    ax.set_title(textwrap.fill(titles[model], 70), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


_COLORS = {"adamw": "tab:blue", "muon": "tab:orange", "kfac": "tab:green"}
_EXTRA = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _color(spec: str, index: int) -> str:
  return _COLORS.get(spec, _EXTRA[index % len(_EXTRA)])
