"""The batch-size scaling study's output: markdown table, JSON header and file,
log-log plot (``batch_scaling.py`` runs the study)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Any, Mapping

import jax
import numpy as np

NAMES = {"adamw": "AdamW", "kfac": "K-FAC"}
COLORS = {"adamw": "tab:blue", "kfac": "tab:red"}


def git_commit(repo: str) -> str:
  """``repo``'s commit, with ``+dirty`` when it has uncommitted changes."""
  def git(*args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                          check=False).stdout.strip()
  return (git("rev-parse", "--short", "HEAD") or "unknown") + (
      "+dirty" if git("status", "--porcelain") else "")


def header(load_start: tuple[float, ...], load_end: tuple[float, ...], seconds: float,
           quick: bool, commit: str) -> dict[str, str]:
  """Machine, load averages (``uptime``'s 1/5/15 min) at start and end, the
  commit at the start, versions, wall-clock of the whole run."""
  import optax  # pylint: disable=import-outside-toplevel
  fmt = lambda load: " ".join(f"{x:.2f}" for x in load)
  return {"machine": f"{platform.platform()} ({platform.machine()}), {os.cpu_count()} CPUs, "
                     f"backend {jax.default_backend()}",
          "versions": f"python {platform.python_version()}, jax {jax.__version__}, "
                      f"optax {optax.__version__}",
          "commit": commit,
          "load": f"load average at start {fmt(load_start)}, at end {fmt(load_end)}",
          "wall": f"{seconds:.0f} s{' (--quick)' if quick else ''}"}


def header_text(head: Mapping[str, str]) -> str:
  """The header as ``key: value`` lines."""
  return "\n".join(f"{k}: {v}" for k, v in head.items())


def _cell(point: Mapping[str, Any]) -> tuple[str, str]:
  """(best value, steps) of one batch size, "not reached" when none did."""
  if point["steps"] is None:
    return "–", f"not reached ({point['max_steps']})"
  return f"{point['best']:g}", f"{point['steps']:.0f}"


def model_table(name: str, model: Mapping[str, Any]) -> str:
  """The markdown table of one model, its fits and noise scales."""
  opts = model["optimizers"]
  hypers = {f: "lr" if o["hyper"] == "learning_rate" else o["hyper"] for f, o in opts.items()}
  cols = [f"{NAMES[f]} {part}" for f in opts for part in (f"best {hypers[f]}", "steps")]
  lines = [f"\n{name}: {model['title']}, target loss {model['config']['target']}",
           "| B | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for i, b in enumerate(model["config"]["sizes"]):
    cells = [c for o in opts.values() for c in _cell(o["points"][i])]
    lines.append(f"| {b} | " + " | ".join(cells) + " |")
  for family, o in opts.items():
    fit = o["fit"]
    text = ("no fit" if fit is None else f"S_min {fit['s_min']:.1f}, E_min "
            f"{fit['e_min']:.0f}, B_crit {fit['b_crit']:.1f}")
    lines.append(f"\n{NAMES[family]}: {text}; first doubling with S(B)/S(2B) < 1.5: "
                 f"B = {o['halving_limit']}")
  for where, n in model["noise"].items():
    lines.append(f"noise scale at {where}: B_simple {n['b_simple']:.1f}, gradient diversity "
                 f"{n['diversity']:.3f} ({n['batches']} batches of {n['batch_size']}; "
                 f"uncovered {n['uncovered'] or 'none'})")
  return "\n".join(lines)


def _plain(obj: Any) -> Any:
  """``obj`` with dict keys as strings and floats rounded (for the JSON)."""
  if isinstance(obj, dict):
    return {f"{k:g}" if isinstance(k, float) else str(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  if isinstance(obj, float):
    return round(obj, 5)
  return obj


def write_json(result: Mapping[str, Any], path: str) -> None:
  """Writes ``result`` to ``path`` (folders created)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(_plain(result), f, indent=1)
  print(f"wrote {path}")


def _panel(ax: Any, name: str, model: Mapping[str, Any]) -> None:
  """One model's steps-vs-batch panel."""
  for family, o in model["optimizers"].items():
    pts = [(p["batch_size"], p["steps"]) for p in o["points"] if p["steps"] is not None]
    if not pts:
      continue
    b, s = np.array(pts, float).T
    color = COLORS[family]
    ax.plot(b, s, "o-", color=color, label=f"{NAMES[family]} (best of grid)")
    ax.plot(b, s[0] * b[0] / b, ":", color=color, alpha=0.6,
            label=f"{NAMES[family]} perfect scaling")
    if o["fit"] is not None:
      fit = o["fit"]
      grid = np.geomspace(b[0], b[-1], 100)
      ax.plot(grid, fit["s_min"] + fit["e_min"] / grid, "--", color=color, alpha=0.5)
      if fit["b_crit"] > 0:
        ax.axvline(fit["b_crit"], color=color, lw=1, alpha=0.6)
        ax.text(fit["b_crit"], s.max(),
                f" B_crit {fit['b_crit']:.0f}", color=color, fontsize=8, va="top")
  for where, style in (("init", (0, (1, 3))), ("target", "-.")):
    if where in model["noise"]:
      value = model["noise"][where]["b_simple"]
      ax.axvline(value, color="k", lw=1, ls=style, label=f"B_simple at {where}: {value:.0f}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("batch size B (examples)")
  ax.set_ylabel(f"steps to evaluation loss {model['config']['target']}")
  ax.set_title(f"{name}: {model['title'].split(' (')[0]}", fontsize=9)
  ax.legend(fontsize=7, loc="lower left")  # the curves fall from the upper left


def plot(models: Mapping[str, Mapping[str, Any]], path: str) -> None:
  """Log-log steps vs batch size, one panel per model (dotted: perfect scaling
  through the smallest batch's point; dashed: the fitted ``S_min + E_min/B``;
  vertical: each optimizer's fitted ``B_crit`` and the measured ``B_simple``)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
  for ax, (name, model) in zip(axes[0], models.items()):
    _panel(ax, name, model)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"wrote {path}")
