"""The benchmark suite (``benchmarks/suite.py``): its figures from known
curves, its command-line values, and one ``--quick`` run on the MLP."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")
sys.path.insert(0, BENCHMARKS)
import suite  # pylint: disable=wrong-import-position
import suite_optim  # pylint: disable=wrong-import-position
from suite_report import Curve, first_reach, loss_at, summarize  # pylint: disable=wrong-import-position


def _curve(spec: str, lr: float | None, seconds: list[float], loss: list[float]) -> Curve:
  return Curve(f"{spec} {lr}", spec, lr, [0, 10, 20, 30], seconds, loss)


def test_first_reach_interpolates_inside_the_interval() -> None:
  c = _curve("kfac", None, [0.0, 1.0, 3.0, 4.0], [4.0, 2.0, 1.0, 0.5])
  # 1.5 lies halfway between 2.0 (1 s, step 10) and 1.0 (3 s, step 20).
  assert first_reach(c, 1.5) == pytest.approx((2.0, 15.0))
  assert first_reach(c, 4.0) == (0.0, 0.0)
  assert first_reach(c, 0.1) is None
  assert loss_at(c, 3.5) == (pytest.approx(0.75), True)
  assert loss_at(c, 9.0) == (0.5, False)


def test_summary_ratios_against_the_tuned_adamw_point() -> None:
  curves = [_curve("adamw", 1e-3, [0.0, 1.0, 2.0, 3.0], [4.0, 3.0, 2.5, 2.0]),
            _curve("adamw", 1e-2, [0.0, 1.0, 2.0, 4.0], [4.0, 2.0, 1.5, 1.0]),
            _curve("kfac", None, [0.0, 2.0, 4.0, 6.0], [4.0, 1.2, 0.8, 0.5])]
  s = summarize(curves)
  assert s["target"] == 1.0 and s["adamw"] == "adamw 0.01"
  adamw, kfac = s["rows"]
  assert adamw["time_ratio"] == 1.0 and adamw["steps_ratio"] == 1.0
  # K-FAC crosses 1.0 halfway between (2 s, step 10, 1.2) and (4 s, step 20, 0.8).
  assert kfac["seconds_to_target"] == pytest.approx(3.0)
  assert kfac["time_ratio"] == pytest.approx(3.0 / 4.0)
  assert kfac["steps_ratio"] == pytest.approx(15.0 / 30.0)
  assert kfac["step_cost_ratio"] == pytest.approx((6.0 / 30) / (4.0 / 30))
  assert kfac["loss_at_adamw_seconds"] == pytest.approx(0.8)
  assert adamw["grid_final"] == {"0.001": 2.0, "0.01": 1.0} and adamw["at_grid_edge"]


def test_command_line_values() -> None:
  assert suite_optim.parse_kwargs(["learning_rate=0.3", "kl_clip=None", "symmetry_aware=true",
                                   "stats_every=10", "inverse_method=cholesky"], "--kfac") == {
      "learning_rate": 0.3, "kl_clip": None, "symmetry_aware": True, "stats_every": 10,
      "inverse_method": "cholesky"}
  v = suite_optim.parse_variant("cheap:stats_every=10,inverse_every=50")
  assert (v.name, v.family, dict(v.kwargs)) == ("cheap", "kfac",
                                                {"stats_every": 10, "inverse_every": 50})
  with pytest.raises(ValueError, match="--variant"):
    suite_optim.parse_variant("no_colon")
  with pytest.raises(ValueError, match="key=value"):
    suite_optim.parse_kwargs(["damping"], "--kfac")


@pytest.mark.slow
def test_quick_run_on_the_mlp_writes_table_json_and_plot(tmp_path: Any) -> None:
  out = suite.main(["--quick", "--models", "mlp", "--no-layers",
                    "--json", str(tmp_path / "s.json"), "--png", str(tmp_path / "s.png")])
  assert (tmp_path / "s.png").read_bytes().startswith(b"\x89PNG")
  saved = json.loads((tmp_path / "s.json").read_text())
  rows = {r["optimizer"]: r for r in saved["summaries"]["mlp"]["rows"]}
  assert set(rows) == {"adamw", "muon", "kfac"}
  assert rows["adamw"]["time_ratio"] == 1.0
  curves = out["curves"]["mlp"]
  # every AdamW and Muon learning rate, and K-FAC
  assert len(curves) == len(suite_optim.ADAMW_GRID) + len(suite_optim.MUON_GRID) + 1
  finals = [c["loss"][-1] for c in curves if c["spec"] == "adamw"]
  assert saved["summaries"]["mlp"]["target"] == min(finals)
  for c in curves:
    assert c["steps"] == [0, 5, 10], c["label"]
    assert c["seconds"] == sorted(c["seconds"]) and all(map(math.isfinite, c["loss"]))
