"""Smoke tests of the "every layer of a real network" examples.

Each example's ``main`` runs in ``--quick`` mode (20 steps of every optimizer
on a narrower model, fast XLA compilation) in this process: it must write its
PNG, and every run's reported loss must stay finite and end below where it
started. The layer tables are checked against the models' parameter trees.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import jax
import pytest

import kfac_jax_lite as kfl

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")
sys.path.insert(0, EXAMPLES)
import resnet_digits  # pylint: disable=wrong-import-position
import transformer_tokens  # pylint: disable=wrong-import-position


def _check_runs(runs: dict[str, Any], labels: set[str]) -> None:
  assert set(runs) == labels
  for label, run in runs.items():
    assert run.steps[0] == 0 and run.steps[-1] == 20, label
    assert all(math.isfinite(x) for x in run.loss), (label, run.loss)
    assert run.loss[-1] < run.loss[0], (label, run.loss)
    assert run.seconds == sorted(run.seconds), label


@pytest.mark.slow
@pytest.mark.parametrize("module", [resnet_digits, transformer_tokens],
                         ids=["resnet_digits", "transformer_tokens"])
def test_quick_main_writes_plot_and_loss_decreases(module: Any, tmp_path: Any,
                                                   capsys: Any) -> None:
  out = tmp_path / "plot.png"
  runs = module.main(["--quick", "--out", str(out)])
  assert out.exists() and out.read_bytes().startswith(b"\x89PNG")
  _check_runs(runs, set(module.OPTIMIZERS))
  printed = capsys.readouterr().out
  assert "total" in printed and "step" in printed  # the layer table and the results


def _blocks(layers: list[kfl.Layer]) -> dict[str, str]:
  """Parameter path (``keystr``) -> kind, bias leaves included."""
  kinds = {}
  for l in layers:
    kinds[jax.tree_util.keystr(l.weight_path)] = l.kind
    if l.bias_path is not None:
      kinds[jax.tree_util.keystr(l.bias_path)] = l.kind
  return kinds


def test_resnet_layers_convs_kron_norms_diagonal_blocks() -> None:
  model = resnet_digits.ResNet(widths=(4, 4, 8))
  params, stats = resnet_digits.init_variables(model)
  _, kfac_loss, _ = resnet_digits.make_losses(model, stats)
  train, _ = resnet_digits.load_images()
  batch = {k: v[:8] for k, v in train.items()}
  kinds = _blocks(kfl.find_layers(kfac_loss, params, batch))
  paths = {jax.tree_util.keystr(p): p for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert set(kinds) == set(paths)
  for name, kind in kinds.items():
    leaf = paths[name][-1].key
    parent = paths[name][-2].key
    if parent.startswith("Conv"):
      assert kind == "conv", name
    elif parent.startswith("Dense"):
      assert kind == "dense", name
    else:
      # Train-mode BatchNorm multiplies its scale by the batch's rsqrt(var)
      # (no per-example axis): rms fallback; its offset is a shift.
      assert parent.startswith("BatchNorm") and leaf in ("scale", "bias"), name
      assert kind == ("rms" if leaf == "scale" else "shift"), name


def test_transformer_layers_attention_projections_dense() -> None:
  model = transformer_tokens.Transformer(width=8, num_heads=2)
  params = transformer_tokens.init_params(model)
  _, train, _ = transformer_tokens.make_data()
  batch = {k: train[k][:4] for k in ("x", "y")}
  kinds = _blocks(kfl.find_layers(transformer_tokens.make_loss(model), params, batch))
  paths = {jax.tree_util.keystr(p): p for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert set(kinds) == set(paths)
  for name, kind in kinds.items():
    keys = [k.key for k in paths[name]]
    if keys == ["pos_embedding"]:
      assert kind == "shift", name
    elif keys[-2] in ("query", "key", "value", "out") or keys[-2].startswith("Dense"):
      assert kind == "dense", name
    elif keys[-2].startswith("Embed"):
      assert kind == "embedding", name
    else:
      # LayerNorm scale/offset and the added positional table: diagonal Fisher.
      assert keys[-2].startswith("LayerNorm"), name
      assert kind == ("scale" if keys[-1] == "scale" else "shift"), name


def test_markov_floor_matches_bayes_optimal_loss() -> None:
  """The floor equals the cross-entropy of the true chain's own predictions."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  chain, _, held_out = transformer_tokens.make_data()
  seqs = held_out["seqs"]
  probs = np.empty(seqs[:, 1:].shape + (transformer_tokens.VOCAB,))
  probs[:, 0] = 1.0 / transformer_tokens.VOCAB
  probs[:, 1:] = chain.table[seqs[:, :-2], seqs[:, 1:-1]]
  entropy = -np.sum(probs * np.log(np.maximum(probs, 1e-300)), axis=-1).mean()
  nll = -np.log(np.take_along_axis(probs, seqs[:, 1:, None], -1)).mean()
  floor = chain.loss_floor(seqs)
  assert floor == pytest.approx(entropy, rel=1e-9)
  assert floor == pytest.approx(nll, abs=0.05)  # sampled tokens: same in expectation
