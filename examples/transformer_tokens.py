"""Every layer of a real network: K-FAC vs Adam on a small causal transformer.

The task (offline, synthetic, with an exactly known loss floor): token
sequences of a fixed random second-order Markov chain over ``VOCAB`` = 16
tokens. The first two tokens are uniform; every later token is drawn from
``T[previous-but-one, previous]``, a row of a fixed random transition table
(each row a Dirichlet(0.3) draw, so most of its mass is on a few tokens). The
model reads 16 tokens and predicts each next one (softmax cross-entropy over
all 16 positions); to do well it must attend to the previous two positions.
The lowest reachable loss is the mean entropy of the true next-token
distributions (uniform for the first prediction, ``T[a, b]`` after), computed
exactly for the evaluation set (``loss_floor``); the tables and plot show the
excess over that floor.

The model is a plain Flax ``linen`` pre-LayerNorm transformer: token
embedding (``nn.Embed``) plus a learned positional embedding, 2 blocks of
LayerNorm + ``nn.MultiHeadDotProductAttention`` (4 heads, causal mask) +
LayerNorm + MLP (``d -> 4d -> d``, gelu), a final LayerNorm and a dense
unembedding. Nothing in it is written for K-FAC; ``kfl.find_layers`` (printed
at the start) finds the query/key/value/output projections and the MLP and
unembedding layers as dense Kronecker blocks (the projections are
``DenseGeneral`` contractions with multi-axis kernels, preconditioned as
``d -> heads*head_dim`` and ``heads*head_dim -> d`` matrices, shared over the
sequence positions), the token embedding as an embedding block (diagonal
token-frequency input factor); the LayerNorm scales and shifts and the
positional embedding (an added parameter that varies along the sequence, not
a bias) get the exact diagonal Fisher from per-example gradients.

Three runs from the same initialization on the same batch sequence: K-FAC
with ``dense_approximation="expand"`` and ``"reduce"`` (Eschenhagen et al.
2023: positions as extra cases, or summed before the outer products), and
``optax.adam``. The loss reported is the held-out loss minus the floor,
evaluated every ``steps / 100`` steps outside the timed region; wall-clock
time counts only the train steps (the compile time is reported on its own).

Hyperparameters: a sweep at 300 steps, batch 64, seed 0, scored by the
held-out excess loss at steps 50, 100, 200 and 300 (the models sit on a
plateau near 0.8, the bigram-level loss, until attention to the
previous-but-one token is learned); each optimizer got the best setting of
its own grid:

* Adam: learning rate in {1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 3e-2}. Best: 3e-3
  (0.79, 0.76, 0.40, 0.205; 5e-3: 0.80, 0.75, 0.39, 0.211).
* K-FAC, both approximations: learning rate in {0.1, 0.3} (the KL clip
  always binds: both give the same runs), damping in {1e-3, 1e-2, 1e-1},
  ``kl_clip`` in {1e-3, 1e-2}, then damping 3e-2 and ``kl_clip`` in
  {1e-4, 3e-4, 3e-3} around the best. Best for expand: damping 1e-2,
  ``kl_clip`` 3e-4 (0.78, 0.56, 0.20, 0.137; ``kl_clip`` 1e-3: 0.78, 0.53,
  0.22, 0.162); reduce with the same setting: 0.79, 0.63, 0.27, 0.184 (its
  best, damping 0.1 with ``kl_clip`` 1e-3 gives 0.203 at step 300). Damping
  1e-3 or ``kl_clip`` 1e-2 stall on the plateau. Momentum 0.9,
  ``stats_every=1``, ``inverse_every=10``, ``ema_decay=0.95``, one-sample MC
  Fisher, ``eigh``.

Run ``python examples/transformer_tokens.py`` (``--steps``, ``--out``,
``--quick``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kfac_jax_lite as kfl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position

VOCAB = 16
SEQ_LEN = 16  # tokens read; sequences have SEQ_LEN + 1 tokens
CONCENTRATION = 0.3
NUM_TRAIN = 8192
NUM_EVAL = 1024
BATCH_SIZE = 64

# Tuned settings (see the module docstring).
ADAM_LR = 3e-3
KFAC_HPARAMS = dict(learning_rate=0.3, damping=1e-2, kl_clip=3e-4)
# label -> (optimizer, its settings beyond the tuned ones).
OPTIMIZERS = {"K-FAC expand": ("kfac", {"layers": kfl.LayerOptions(dense_approximation="expand")}),
              "K-FAC reduce": ("kfac", {"layers": kfl.LayerOptions(dense_approximation="reduce")}),
              "Adam": ("adam", {})}

Batch = common.Batch
LossFn = common.LossFn


@dataclasses.dataclass(frozen=True)
class MarkovChain:
  """A second-order Markov chain over ``vocab`` tokens.

  Attributes:
    table: ``[vocab, vocab, vocab]`` probabilities of the next token given
      the previous-but-one and the previous token.
  """
  table: np.ndarray

  @classmethod
  def random(cls, vocab: int = VOCAB, concentration: float = CONCENTRATION,
             seed: int = 0) -> MarkovChain:
    """Rows drawn from a symmetric Dirichlet(``concentration``)."""
    rng = np.random.default_rng(seed)
    return cls(rng.dirichlet(np.full(vocab, concentration), size=(vocab, vocab)))

  def sample(self, num: int, length: int, seed: int) -> np.ndarray:
    """``[num, length]`` int32 sequences (the first two tokens uniform)."""
    rng = np.random.default_rng(seed)
    vocab = self.table.shape[0]
    seqs = np.empty((num, length), np.int32)
    seqs[:, :2] = rng.integers(vocab, size=(num, 2))
    cdf = np.cumsum(self.table, axis=-1)
    for t in range(2, length):
      u = rng.random((num, 1))
      rows = cdf[seqs[:, t - 2], seqs[:, t - 1]]
      seqs[:, t] = np.minimum((u > rows).sum(axis=-1), vocab - 1)
    return seqs

  def loss_floor(self, seqs: np.ndarray) -> float:
    """Mean entropy of the true next-token distributions over ``seqs``.

    What a perfect model's expected next-token loss is on these contexts: the
    first prediction (one token seen) is uniform, every later one is a row of
    the table.

    Args:
      seqs: ``[n, SEQ_LEN + 1]`` sequences (inputs and targets).

    Returns:
      The floor, in nats per predicted token.
    """
    p = self.table
    row_entropy = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300)), 0.0), axis=-1)
    later = row_entropy[seqs[:, :-2], seqs[:, 1:-1]]  # predictions 2..L
    first = np.full((len(seqs), 1), np.log(p.shape[0]))
    return float(np.concatenate([first, later], axis=1).mean())


def make_data(seed: int = 0) -> tuple[MarkovChain, Batch, Batch]:
  """The chain, a training set and a held-out evaluation set.

  Returns:
    ``(chain, train, eval)``; each set is ``{"x": int32 [n, SEQ_LEN],
    "y": int32 [n, SEQ_LEN]}`` with ``y`` the next tokens.
  """
  chain = MarkovChain.random(seed=seed)
  sets = []
  for num, offset in ((NUM_TRAIN, 1), (NUM_EVAL, 2)):
    seqs = chain.sample(num, SEQ_LEN + 1, seed + offset)
    sets.append({"x": seqs[:, :-1], "y": seqs[:, 1:], "seqs": seqs})
  return chain, *sets


class Block(nn.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then an MLP.

  Attributes:
    num_heads: attention heads.
    mlp_ratio: hidden width of the MLP over the model width.
  """
  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    d = x.shape[-1]
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y, mask=mask)
    y = nn.gelu(nn.Dense(self.mlp_ratio * d)(nn.LayerNorm()(x)))
    return x + nn.Dense(d)(y)


class Transformer(nn.Module):
  """Decoder-only transformer returning next-token logits ``[B, L, vocab]``.

  Attributes:
    vocab: number of tokens.
    max_len: longest sequence (rows of the positional embedding).
    width: model width.
    depth: number of blocks.
    num_heads: attention heads per block.
  """
  vocab: int = VOCAB
  max_len: int = SEQ_LEN
  width: int = 64
  depth: int = 2
  num_heads: int = 4

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab, self.width)(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (self.max_len, self.width))
    x = x + pos[:tokens.shape[-1]]
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.depth):
      x = Block(self.num_heads)(x, mask)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def init_params(model: Transformer, seed: int = 0) -> Any:
  """Parameters drawn with numpy (``model.init`` compiles slowly on CPU).

  Flax's default distributions: kernels LeCun normal (variance ``1 / fan_in``,
  truncated at two standard deviations and rescaled; ``fan_in`` is the model
  width for the query/key/value kernels ``[d, heads, head_dim]`` and the
  product of all but the last axis otherwise), token embeddings normal with
  variance ``1 / width``, the positional embedding normal with standard
  deviation 0.02, LayerNorm scales 1, biases 0.

  Args:
    model: the :class:`Transformer`.
    seed: seed of the numpy generator.

  Returns:
    The ``params`` collection (float32 jax arrays).
  """
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, model.max_len), jnp.int32)))["params"]
  rng = np.random.default_rng(seed)

  def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
    keys = [getattr(k, "key", "") for k in path]
    shape = leaf.shape
    if keys[-1] == "kernel":
      qkv = len(keys) > 1 and keys[-2] in ("query", "key", "value")
      fan_in = shape[0] if qkv else int(np.prod(shape[:-1]))
      return common.lecun_normal(rng, shape, fan_in)
    if keys[-1] == "embedding":
      return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-1]), np.float32)
    if keys[-1] == "pos_embedding":
      return jnp.asarray(0.02 * rng.standard_normal(shape), np.float32)
    return jnp.full(shape, 1.0 if keys[-1] == "scale" else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def make_loss(model: Transformer) -> LossFn:
  """``loss_fn(params, batch)``: mean next-token cross-entropy."""
  def loss_fn(params: Any, batch: Batch) -> jax.Array:
    logits = model.apply({"params": params}, batch["x"])
    return kfl.losses.softmax_cross_entropy(logits, batch["y"])
  return loss_fn


@dataclasses.dataclass(frozen=True)
class Problem:
  """A model with its initial parameters and loss.

  Attributes:
    model: the :class:`Transformer`.
    params: initial parameters.
    loss_fn: see :func:`make_loss`.
    eval_loss: ``jax.jit`` of ``loss_fn``, shared by the runs.
  """
  model: Transformer
  params: Any
  loss_fn: LossFn
  eval_loss: LossFn


@functools.cache
def make_problem(width: int = 64, seed: int = 0) -> Problem:
  """The :class:`Problem` (cached: the runs of a comparison share compilations)."""
  model = Transformer(width=width)
  loss_fn = make_loss(model)
  return Problem(model, init_params(model, seed), loss_fn, jax.jit(loss_fn))


def train(label: str, num_steps: int, *, train_data: Batch, eval_data: Batch,
          batch_size: int = BATCH_SIZE, seed: int = 0, eval_every: int | None = None,
          width: int = 64, progress: bool = True,
          compiler_options: dict[str, Any] | None = None,
          **overrides: Any) -> common.Run:
  """Trains the transformer with one optimizer, timing only the train steps.

  Args:
    label: a key of ``OPTIMIZERS``.
    num_steps: number of train steps.
    train_data: the training set.
    eval_data: the held-out set of the reported loss.
    batch_size: minibatch size.
    seed: seed of the initialization and of the batch order.
    eval_every: evaluate every this many steps (default ``num_steps // 100``).
    width: model width.
    progress: show a tqdm progress bar.
    compiler_options: XLA options of the train step's compilation.
    **overrides: optimizer settings, see :func:`common.make_optimizer`.

  Returns:
    The :class:`common.Run`.
  """
  problem = make_problem(width, seed)
  params, loss_fn = problem.params, problem.loss_fn
  it = common.batches(train_data, batch_size, seed)
  first = next(it)
  name, settings = OPTIMIZERS[label]
  tx = common.make_optimizer(name, loss_fn, first, adam_lr=ADAM_LR,
                             kfac_hparams={**KFAC_HPARAMS, **settings}, **overrides)
  held_out = {k: jnp.asarray(eval_data[k]) for k in ("x", "y")}
  run, _ = common.fit(common.make_train_step(loss_fn, tx), (params, tx.init(params)),
                      itertools.chain([first], it), num_steps,
                      lambda state: float(problem.eval_loss(state[0], held_out)),
                      label=label, eval_every=eval_every, progress=progress,
                      compiler_options=compiler_options)
  return run


def main(argv: Sequence[str] | None = None) -> dict[str, common.Run]:
  """Runs the comparison; prints the layer table and the results, writes the plot."""
  args = common.make_parser(
      __doc__.splitlines()[0], 300, "transformer_tokens.png").parse_args(argv)
  steps = 20 if args.quick else args.steps
  width = 32 if args.quick else 64
  chain, train_data, eval_data = make_data()
  floor = chain.loss_floor(eval_data["seqs"])
  print(f"{common.platform_summary()}; second-order Markov chain over {VOCAB} tokens, "
        f"{len(train_data['x'])} training sequences of {SEQ_LEN} tokens, batch "
        f"{BATCH_SIZE}, {steps} steps, width {width}")
  problem = make_problem(width)
  sample = next(common.batches(train_data, BATCH_SIZE))
  print(kfl.find_layers(problem.loss_fn, problem.params, sample))
  print()
  quick = dict(eval_every=4, compiler_options=common.FAST_COMPILE) if args.quick else {}
  runs = {label: train(label, steps, train_data=train_data, eval_data=eval_data,
                       width=width, progress=not args.quick, **quick)
          for label in OPTIMIZERS}
  title = "Transformer on Markov tokens"
  print(common.format_table(f"{title}: held-out next-token loss (floor {floor:.4f}; "
                            "excess loss over the floor below)", runs, floor))
  common.plot({title: runs}, args.out, floors={title: floor},
              loss_name="held-out loss", min_loss=1e-6)
  print(f"plot written to {args.out}")
  return runs


if __name__ == "__main__":
  main()
