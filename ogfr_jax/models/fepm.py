"""Feature Erasing and Purification Module: the token-scoring agent, its policies and the
token replacement.

The agent scores every patch token after block L; a selection (boolean mask over the fixed
number of patch tokens, so shapes stay static) picks tokens to erase, and each erased token is
replaced by a learnable embedding plus that token's position embedding.

The policy over a mask a in {0,1}^N given logits l is Bernoulli per token:
a_i ~ Bernoulli(p_i), p_i = lo + (hi - lo) sigmoid(l_i), and
log pi(a) = sum_i [a_i log p_i + (1 - a_i) log (1 - p_i)]. Its greedy action takes the tokens
scored at or above a threshold calibrated on training batches (`top_share_threshold`). The
'random' control draws k tokens uniformly without replacement; nothing is learned.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from ogfr_jax.models import vit as vit_lib


class Selection(NamedTuple):
  """The outcome of one policy step; log_prob/entropy are None for random selection."""
  mask: jax.Array  # [B, N] bool, the action taken
  greedy_mask: Optional[jax.Array]  # [B, N] bool
  log_prob: Optional[jax.Array]  # [B] float32, log pi(mask)
  entropy: Optional[jax.Array]  # [B] float32


def replace_tokens(tokens: jax.Array, mask: jax.Array, replacement: jax.Array,
                   pos_embed: jax.Array) -> jax.Array:
  """Replaces the selected patch tokens; the CLS token (index 0) is never touched.

  tokens [B, 1 + N, D]; mask [B, N] bool over patch tokens; replacement [D];
  pos_embed [1, N, D] (the patch tokens' position embeddings).
  """
  patches = tokens[:, 1:]
  fill = (replacement[None, None, :] + pos_embed).astype(tokens.dtype)
  patches = jnp.where(mask[..., None], fill, patches)
  return jnp.concatenate([tokens[:, :1], patches], axis=1)


# A token counts as covered by a pixel mask (planted contamination for the oracle and the
# selection report, an occluder for the student's erasure) when at least this share of its
# window is masked.
MIN_COVER = 0.5


def covered_tokens(mask: jax.Array, patch: int, stride: int,
                   min_cover: float = MIN_COVER) -> jax.Array:
  """Pixel mask [B, H, W] -> bool [B, N]: the patch tokens (row-major over the grid of an
  unpadded patch convolution) whose window is at least `min_cover` masked pixels. The numpy
  counterpart for stored masks is `data.synthetic.clutter_token_mask`."""
  m = jnp.asarray(mask).astype(jnp.float32)
  total = jax.lax.reduce_window(m, 0.0, jax.lax.add, (1, patch, patch), (1, stride, stride),
                                'VALID')
  return (total / (patch * patch) >= min_cover - 1e-6).reshape(total.shape[0], -1)


def _unit(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def identity_match(tokens: jax.Array, pid: jax.Array, grid: tuple[int, int],
                   radius: int, memory: Optional[jax.Array] = None,
                   memory_valid: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """How well the other images of the same identity explain each patch token.

  tokens [B, N, D] (patch tokens, row-major over `grid`), pid [B]. For token n of image b:
  the best cosine similarity to any token of another image of b's identity within `radius`
  grid cells (Chebyshev) of n's cell. The other images are those of the batch and, when
  given, `memory` [B, M, N, D]: M earlier images of row b's identity (`memory_valid` [B, M],
  required with it, marks the slots that hold one). Returns (match [B, N] float32, has_other [B] bool); where
  an identity has no other image, match is +1 (nothing to compare).

  Computed one grid offset at a time ([B, N, B + M] per offset), so memory stays
  O(B (B + M) N) whatever the token width.
  """
  b, n, d = tokens.shape
  gh, gw = grid
  if gh * gw != n:
    raise ValueError(f'identity_match: {n} patch tokens do not form the {gh}x{gw} grid')
  x = _unit(tokens).reshape(b, gh, gw, d)
  same = (pid[:, None] == pid[None, :]) & ~jnp.eye(b, dtype=jnp.bool_)  # [B, B]
  if memory is not None:
    m = memory.shape[1]
    mem = _unit(memory).reshape(b, m, gh, gw, d)
    valid = memory_valid.astype(jnp.bool_)
  rows, cols = jnp.arange(gh)[:, None], jnp.arange(gw)[None, :]
  best = jnp.full((b, gh, gw), -jnp.inf, jnp.float32)
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      # shifted[c, i, j] = x[c, i + dy, j + dx]; cells whose neighbour falls off the grid
      # are left out rather than wrapped.
      shifted = jnp.roll(x, (-dy, -dx), axis=(1, 2))
      inside = ((rows + dy >= 0) & (rows + dy < gh) & (cols + dx >= 0) & (cols + dx < gw))
      sim = jnp.einsum('bhwd,chwd->bhwc', x, shifted)
      ok = same[:, None, None, :] & inside[None, :, :, None]
      best = jnp.maximum(best, jnp.max(jnp.where(ok, sim, -jnp.inf), axis=-1))
      if memory is not None:
        sim = jnp.einsum('bhwd,bmhwd->bhwm', x, jnp.roll(mem, (-dy, -dx), axis=(2, 3)))
        ok = valid[:, None, None, :] & inside[None, :, :, None]
        best = jnp.maximum(best, jnp.max(jnp.where(ok, sim, -jnp.inf), axis=-1))
  has_other = jnp.any(same, axis=-1)
  if memory is not None:
    has_other |= jnp.any(valid, axis=-1)
  match = jnp.where(has_other[:, None, None], best, 1.0)
  return match.reshape(b, n), has_other


def unexplained_tokens(tokens: jax.Array, pid: jax.Array, grid: tuple[int, int], radius: int,
                       share: float, memory: Optional[jax.Array] = None,
                       memory_valid: Optional[jax.Array] = None) -> jax.Array:
  """bool [B, N]: the `share` of the batch's patch tokens that the other images of the same
  identity (in the batch, and in `memory` when given) explain least (`identity_match`). A
  pedestrian's own body and clothes recur in every image of that identity, so what matches
  nothing there is contamination (another person's clothing, a passer-by, clutter) or a
  view-specific background. Images whose identity has no other image get no token."""
  match, has_other = identity_match(tokens, pid, grid, radius, memory, memory_valid)
  # Only rows with a comparison take part; the others sit at -inf, below every threshold.
  score = jnp.where(has_other[:, None], -match, -jnp.inf)
  return (score >= top_share_threshold(score, share)) & has_other[:, None]


def memory_read(tokens: jax.Array, index_table: jax.Array, pid: jax.Array, index: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """The identity memory's slots for each row of a batch: (tokens [B, M, N, D], valid [B, M]).
  A slot is valid when it holds an image (index >= 0) other than the row's own image, which
  would otherwise explain its own contamination from an earlier augmented view."""
  slots = index_table[pid]
  return tokens[pid], (slots >= 0) & (slots != index[:, None])


def memory_write(tokens: jax.Array, index_table: jax.Array, next_slot: jax.Array,
                 batch_tokens: jax.Array, pid: jax.Array, index: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Ring-buffer write of a batch into the identity memory (tokens [I, M, N, D], index_table
  [I, M], next_slot [I], for I identities): the j-th row of an identity in the batch goes to
  slot (next_slot + j) mod M, for j < M; later rows of that identity are not stored, so no two
  rows write one slot and the result does not depend on scatter order."""
  m = tokens.shape[1]
  same = pid[:, None] == pid[None, :]
  rank = jnp.sum(jnp.tril(same, -1), axis=1)  # earlier rows of the same identity
  count = jnp.minimum(jnp.sum(same, axis=1), m)
  slot = (next_slot[pid] + rank) % m
  ids = jnp.where(rank < m, pid, tokens.shape[0])  # out of range: dropped
  tokens = tokens.at[ids, slot].set(batch_tokens.astype(tokens.dtype), mode='drop')
  index_table = index_table.at[ids, slot].set(index.astype(index_table.dtype), mode='drop')
  # Every row of an identity writes the same value here.
  next_slot = next_slot.at[pid].set((next_slot[pid] + count) % m)
  return tokens, index_table, next_slot


def blend_tokens(tokens: jax.Array, weight: jax.Array, replacement: jax.Array,
                 pos_embed: jax.Array) -> jax.Array:
  """Soft replacement: patch token i becomes (1 - w_i) x_i + w_i (replacement + pos_i); the CLS
  token is untouched. tokens [B, 1 + N, D]; weight [B, N] in [0, 1]."""
  fill = (replacement[None, None, :] + pos_embed).astype(jnp.float32)
  w = weight.astype(jnp.float32)[..., None]
  patches = (1.0 - w) * tokens[:, 1:].astype(jnp.float32) + w * fill
  return jnp.concatenate([tokens[:, :1], patches.astype(tokens.dtype)], axis=1)


def num_selected(fraction: float, num_tokens: int) -> int:
  """k of the 'random' control: round(fraction * N), which must be in [1, N]."""
  k = int(round(fraction * num_tokens))
  if not 1 <= k <= num_tokens:
    raise ValueError(f'fepm.random_fraction={fraction} selects {k} of {num_tokens} patch '
                     f'tokens; it must select between 1 and {num_tokens}')
  return k


# --- Bernoulli policy -----------------------------------------------------------------------
#
# `bounds` (lo, hi) maps the agent's logit l to the selection probability
# p = lo + (hi - lo) * sigmoid(l), as PatchDrop bounds its policy: with lo > 0 every token keeps
# a chance of being tried, with hi < 1 of being kept, so exploration cannot collapse however
# far the logits move. (0, 1) is the plain sigmoid, computed through log_sigmoid for stability.

UNBOUNDED = (0.0, 1.0)


def token_log_probs(logits: jax.Array, bounds: tuple[float, float] = UNBOUNDED
                     ) -> tuple[jax.Array, jax.Array]:
  """(log p_i, log (1 - p_i)) per token, float32."""
  logits = logits.astype(jnp.float32)
  if tuple(bounds) == UNBOUNDED:
    return jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  lo, hi = bounds
  p = lo + (hi - lo) * jax.nn.sigmoid(logits)
  return jnp.log(p), jnp.log1p(-p)


def selection_probs(logits: jax.Array, bounds: tuple[float, float] = UNBOUNDED) -> jax.Array:
  """p_i of the Bernoulli policy, float32."""
  return jnp.exp(token_log_probs(logits, bounds)[0])


def bernoulli_sample(key: jax.Array, logits: jax.Array,
                     bounds: tuple[float, float] = UNBOUNDED) -> jax.Array:
  return jax.random.uniform(key, logits.shape) < selection_probs(logits, bounds)


def bernoulli_log_prob(logits: jax.Array, mask: jax.Array,
                       bounds: tuple[float, float] = UNBOUNDED) -> jax.Array:
  """log pi(mask), summed over the last axis."""
  log_p, log_q = token_log_probs(logits, bounds)
  return jnp.sum(jnp.where(mask, log_p, log_q), axis=-1)


def bernoulli_entropy(logits: jax.Array, bounds: tuple[float, float] = UNBOUNDED) -> jax.Array:
  """Exact entropy of the joint (independent) policy: the sum of per-token entropies."""
  log_p, log_q = token_log_probs(logits, bounds)
  per_token = -(jnp.exp(log_p) * log_p + jnp.exp(log_q) * log_q)
  return jnp.sum(per_token, axis=-1)


# --- The random control ------------------------------------------------------------------


def gumbel_topk(key: jax.Array, logits: jax.Array, k: int) -> jax.Array:
  """Indices [..., k] of a draw without replacement with probability proportional to exp(l)
  (Gumbel-top-k)."""
  perturbed = logits.astype(jnp.float32) + jax.random.gumbel(key, logits.shape, jnp.float32)
  return jax.lax.top_k(perturbed, k)[1]


def order_to_mask(order: jax.Array, num_tokens: int) -> jax.Array:
  """Indices [..., k] -> boolean mask [..., N]."""
  return jnp.any(jax.nn.one_hot(order, num_tokens, dtype=jnp.bool_), axis=-2)


def random_mask(key: jax.Array, shape: tuple[int, ...], k: int) -> jax.Array:
  """k tokens per row, uniformly without replacement."""
  return order_to_mask(gumbel_topk(key, jnp.zeros(shape, jnp.float32), k), shape[-1])


# --- One policy step --------------------------------------------------------------------------



def window_mean(logits: jax.Array, grid: tuple[int, int], window: tuple[int, int]) -> jax.Array:
  """Each token's score averaged over the `window` (rows, cols; odd) of grid cells centred on
  it, counting only the cells inside the grid. logits [B, N] row-major over `grid`."""
  wh, ww = (int(v) for v in window)
  if (wh, ww) == (1, 1):
    return logits
  b, n = logits.shape
  gh, gw = grid
  if gh * gw != n or wh % 2 == 0 or ww % 2 == 0:
    raise ValueError(f'window_mean: window {window} (odd sizes) over {n} tokens in {grid}')
  x = logits.astype(jnp.float32).reshape(b, gh, gw)
  pad = ((0, 0), (wh // 2, wh // 2), (ww // 2, ww // 2))
  dims = (1, wh, ww)
  total = jax.lax.reduce_window(jnp.pad(x, pad), 0.0, jax.lax.add, dims, (1, 1, 1), 'VALID')
  # Cells inside the grid per window: the same for every row.
  count = jax.lax.reduce_window(jnp.pad(jnp.ones((1, gh, gw), jnp.float32), pad), 0.0,
                                jax.lax.add, dims, (1, 1, 1), 'VALID')
  return (total / count).reshape(b, n)


def top_share_threshold(logits: jax.Array, share: float) -> jax.Array:
  """The score of the round(share x size)-th best token of the whole batch (at least one)."""
  flat = logits.astype(jnp.float32).reshape(-1)
  k = max(1, int(round(share * flat.shape[0])))
  return jax.lax.top_k(flat, k)[0][-1]


def select(logits: jax.Array, *, key: Optional[jax.Array], threshold: jax.Array,
           bounds: tuple[float, float] = UNBOUNDED) -> Selection:
  """Samples an action (when `key` is given) or takes the greedy one (key None), with log pi.

  logits [B, N] float32. The greedy action takes the tokens scored at or above `threshold`.
  With key None the returned mask is the greedy action and log_prob is its log-probability,
  which is what an evaluation pass reports.
  """
  greedy_mask = logits >= threshold
  mask = greedy_mask if key is None else bernoulli_sample(key, logits, bounds)
  return Selection(mask, greedy_mask, bernoulli_log_prob(logits, mask, bounds),
                   bernoulli_entropy(logits, bounds))


class Agent(nn.Module):
  """Token-scoring policy network: LayerNorm -> Dense(hidden) -> GELU -> Dense(1), each patch
  token on its own.

  Its input is under stop_gradient, so the policy gradient never reaches the backbone and the
  backbone's losses never reach the agent; it runs in float32 whatever the backbone dtype, since
  it is small and its log-probabilities feed REINFORCE directly.
  """
  hidden: int = 128
  prior_logit: float = -2.0

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    """patches [B, N, D] -> logits [B, N] float32."""
    x = jax.lax.stop_gradient(patches).astype(jnp.float32)
    x = nn.LayerNorm(vit_lib.LN_EPS, name='norm')(x)
    x = nn.Dense(self.hidden, kernel_init=vit_lib.TRUNC_INIT, name='fc1')(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dense(1, kernel_init=vit_lib.TRUNC_INIT,
                 bias_init=nn.initializers.constant(self.prior_logit), name='fc2')(x)
    return x[..., 0]


class TokenReplacement(nn.Module):
  """Holds the learnable replacement token. It is trained by the losses of the branch whose
  forward pass it sits in (the teacher's for FEPM), not by REINFORCE, so it is kept outside
  the 'agent' module."""

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array, pos_embed: jax.Array) -> jax.Array:
    """Hard replacement where bool `mask` [B, N] is set; a float mask blends (`blend_tokens`)."""
    token = self.param('replace_token', vit_lib.TRUNC_INIT, (tokens.shape[-1],), jnp.float32)
    if mask.dtype == jnp.bool_:
      return replace_tokens(tokens, mask, token, pos_embed)
    return blend_tokens(tokens, mask, token, pos_embed)
