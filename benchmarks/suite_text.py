"""The suite's language model: a character-level causal transformer on the
Python standard library's own source files (ships with Python: no download).

Text: the ``*.py`` files directly in ``sysconfig.get_paths()["stdlib"]``,
sorted by name, concatenated and cut at :data:`TEXT_BYTES` bytes (the exact
text depends on the Python version, which the suite's header reports). The
vocabulary is the set of byte values that occur. The first 90% of the text
trains, the last 10% (by position) is held out: the held-out loss is the
mean next-byte cross-entropy over non-overlapping windows of it.

Model: ``examples/transformer_tokens.py``'s pre-LayerNorm transformer (token
and learned positional embeddings, 2 blocks of 4-head causal attention and a
4x gelu MLP, final LayerNorm, dense unembedding), width 64, context 64.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import transformer_tokens  # pylint: disable=wrong-import-position

from suite_tasks import Task, common  # pylint: disable=wrong-import-position

TEXT_BYTES = 300_000
CONTEXT = 64
BATCH_SIZE = 32
WIDTH = 64
EVAL_WINDOWS = 256
TRAIN_FRACTION = 0.9


def load_text(max_bytes: int = TEXT_BYTES) -> tuple[bytes, list[str]]:
  """The first ``max_bytes`` bytes of the sorted standard-library sources.

  Returns:
    ``(text, file names read)``.
  """
  root = sysconfig.get_paths()["stdlib"]
  names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
  parts, used, total = [], [], 0
  for name in names:
    with open(os.path.join(root, name), "rb") as f:
      parts.append(f.read())
    used.append(name)
    total += len(parts[-1])
    if total >= max_bytes:
      break
  return b"".join(parts)[:max_bytes], used


def encode(text: bytes) -> tuple[np.ndarray, int]:
  """Byte values -> ids ``0..V-1`` of the sorted set of bytes that occur.

  Returns:
    ``(int32 ids, V)``.
  """
  raw = np.frombuffer(text, np.uint8)
  values = np.unique(raw)
  lookup = np.zeros(256, np.int32)
  lookup[values] = np.arange(len(values), dtype=np.int32)
  return lookup[raw], len(values)


def random_windows(ids: np.ndarray, context: int, batch_size: int, count: int,
                   seed: int = 0) -> list[dict[str, jax.Array]]:
  """``count`` batches of windows at uniformly random positions of ``ids``.

  Returns:
    Device batches ``{"x": [batch, context], "y": x shifted by one}``.
  """
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(ids) - context - 1, size=(count, batch_size))
  offsets = np.arange(context + 1)
  out = []
  for row in starts:
    seqs = ids[row[:, None] + offsets]
    out.append(jax.device_put({"x": seqs[:, :-1], "y": seqs[:, 1:]}))
  return out


def eval_windows(ids: np.ndarray, context: int,
                 count: int = EVAL_WINDOWS) -> dict[str, jax.Array]:
  """Up to ``count`` consecutive non-overlapping windows from the start of ``ids``."""
  n = min(count, (len(ids) - 1) // context)
  x = ids[:n * context].reshape(n, context)
  y = ids[1:n * context + 1].reshape(n, context)
  return jax.device_put({"x": x, "y": y})


def lm_task(steps: int, small: bool = False) -> Task:
  """The character-level transformer language model task (``small``: width
  32, context 32, for smoke tests)."""
  width, context = (32, 32) if small else (WIDTH, CONTEXT)
  text, names = load_text()
  ids, vocab = encode(text)
  split = int(TRAIN_FRACTION * len(ids))
  model = transformer_tokens.Transformer(vocab=vocab, max_len=context, width=width,
                                         depth=2, num_heads=4)
  loss_fn = transformer_tokens.make_loss(model)
  held_out = eval_windows(ids[split:], context)
  eval_loss = jax.jit(loss_fn)
  digest = hashlib.sha256(text).hexdigest()[:12]
  title = (f"char transformer d{width} x2, ctx {context} (stdlib {names[0]}..{names[-1]}, "
           f"{len(text) // 1000} KB sha {digest}, vocab {vocab}, batch {BATCH_SIZE})")
  return Task("lm", title, (transformer_tokens.init_params(model),), loss_fn,
              lambda tx: common.make_train_step(loss_fn, tx),
              random_windows(ids[:split], context, BATCH_SIZE, steps),
              lambda state: float(eval_loss(state[0], held_out)))
