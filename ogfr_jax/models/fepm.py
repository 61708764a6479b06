"""Feature Erasing and Purification Module: the token-scoring agent, its policies and the
token replacement.

The agent scores every patch token after block L; a selection (boolean mask over the fixed
number of patch tokens, so shapes stay static) picks tokens to erase, and each erased token is
replaced by a learnable embedding plus that token's position embedding.

Policies over a mask a in {0,1}^N given logits l:
- 'bernoulli': independent tokens, a_i ~ Bernoulli(sigmoid(l_i));
  log pi(a) = sum_i [a_i log sigmoid(l_i) + (1 - a_i) log sigmoid(-l_i)]. Greedy: l_i > 0.
- 'topk': exactly k tokens drawn without replacement with probability proportional to exp(l)
  (Plackett-Luce). Sampled with the Gumbel-top-k trick: the k largest of l_i + G_i, G_i iid
  Gumbel, in decreasing order, are distributed as an ordered PL draw i_1..i_k, whose probability
  is prod_j exp(l_{i_j}) / sum_{m not in i_<j} exp(l_m). We use the probability of the ordered
  draw as log pi: the reward depends only on the unordered set, so E[R * grad log p(order)] is
  still the exact gradient of E[R] (the order is an auxiliary variable of the sampler), and it
  avoids summing over k! orderings. Greedy: the k largest logits.
- 'random' (ablation): k tokens uniformly without replacement; nothing is learned.
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


def covered_tokens(mask: jax.Array, patch: int, stride: int,
                   min_cover: float = 0.5) -> jax.Array:
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
  """k for 'topk' and 'random' selection: round(fraction * N), which must be in [1, N]."""
  k = int(round(fraction * num_tokens))
  if not 1 <= k <= num_tokens:
    raise ValueError(f'fepm.topk_fraction={fraction} selects {k} of {num_tokens} patch tokens; '
                     f'it must select between 1 and {num_tokens}')
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


def expected_count_mask(logits: jax.Array, bounds: tuple[float, float] = UNBOUNDED
                        ) -> jax.Array:
  """The greedy action that selects as many tokens as the policy does on average: the
  round(sum_i p_i) highest-scored tokens of each row. Unlike `logits > 0` it is not empty
  while the agent starts from a low prior, so a self-critical baseline built on it compares
  two purifications of the same size from the first step on."""
  logits = logits.astype(jnp.float32)
  count = jnp.round(jnp.sum(selection_probs(logits, bounds), axis=-1, keepdims=True))
  rank = jnp.argsort(jnp.argsort(-logits, axis=-1), axis=-1)
  return rank < count


# --- Plackett-Luce (top-k without replacement) policy -----------------------------------------


def gumbel_topk(key: jax.Array, logits: jax.Array, k: int) -> jax.Array:
  """Ordered indices [..., k] of a Plackett-Luce draw without replacement (Gumbel-top-k)."""
  perturbed = logits.astype(jnp.float32) + jax.random.gumbel(key, logits.shape, jnp.float32)
  return jax.lax.top_k(perturbed, k)[1]


def order_to_mask(order: jax.Array, num_tokens: int) -> jax.Array:
  """Ordered indices [..., k] -> boolean mask [..., N]."""
  return jnp.any(jax.nn.one_hot(order, num_tokens, dtype=jnp.bool_), axis=-2)


def _pl_step_logits(logits: jax.Array, order: jax.Array) -> jax.Array:
  """[..., k, N]: the logits at each draw j with the tokens drawn before j masked to -inf."""
  n = logits.shape[-1]
  picked = jax.nn.one_hot(order, n, dtype=jnp.int32)  # [..., k, N]
  before = jnp.cumsum(picked, axis=-2) - picked  # drawn strictly before step j
  return jnp.where(before > 0, -jnp.inf, logits[..., None, :].astype(jnp.float32))


def plackett_luce_log_prob(logits: jax.Array, order: jax.Array) -> jax.Array:
  """log p(i_1, ..., i_k) = sum_j [l_{i_j} - logsumexp(l over tokens not drawn before j)]."""
  step = jax.nn.log_softmax(_pl_step_logits(logits, order), axis=-1)
  chosen = jnp.take_along_axis(step, order[..., None], axis=-1)[..., 0]
  return jnp.sum(chosen, axis=-1)


def plackett_luce_entropy(logits: jax.Array, order: jax.Array) -> jax.Array:
  """Sum of the entropies of each draw's conditional distribution along the sampled order.

  By the chain rule its expectation over orders is the entropy of the ordered draw, so it is an
  unbiased single-sample estimate; as a regulariser it is differentiated with the prefix held
  fixed (the usual surrogate: there is no closed form for the entropy of a PL draw).
  """
  step = _pl_step_logits(logits, order)
  logp = jax.nn.log_softmax(step, axis=-1)
  # Tokens drawn before step j have p = 0 and logp = -inf; zero them before multiplying so that
  # neither the value nor the gradient sees 0 * inf.
  drawn = jnp.isneginf(step)
  p = jnp.where(drawn, 0.0, jnp.exp(logp))
  ent = -jnp.sum(p * jnp.where(drawn, 0.0, logp), axis=-1)
  return jnp.sum(ent, axis=-1)


def topk_mask(logits: jax.Array, k: int) -> jax.Array:
  return order_to_mask(jax.lax.top_k(logits.astype(jnp.float32), k)[1], logits.shape[-1])


def random_mask(key: jax.Array, shape: tuple[int, ...], k: int) -> jax.Array:
  """k tokens per row, uniformly without replacement."""
  return order_to_mask(gumbel_topk(key, jnp.zeros(shape, jnp.float32), k), shape[-1])


# --- One policy step --------------------------------------------------------------------------


GREEDY_RULES = ('positive', 'expected_count', 'quantile')


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


def select(logits: jax.Array, *, action: str, k: int, key: Optional[jax.Array],
           bounds: tuple[float, float] = UNBOUNDED, greedy: str = 'positive',
           threshold: Optional[jax.Array] = None) -> Selection:
  """Samples an action (when `key` is given) or takes the greedy one (key None), with log pi.

  logits [B, N] float32. With key None the returned mask is the greedy action and log_prob is
  its log-probability, which is what an evaluation pass reports. `greedy` (Bernoulli only):
  'positive' takes the tokens with p > 1/2 of the unbounded policy (logit > 0);
  'expected_count' the round(sum p) best-scored tokens (`expected_count_mask`); 'quantile'
  the tokens scored at or above `threshold`.
  """
  if action == 'bernoulli':
    if greedy == 'positive':
      greedy_mask = logits > 0
    elif greedy == 'expected_count':
      greedy_mask = expected_count_mask(logits, bounds)
    elif greedy == 'quantile':
      if threshold is None:
        raise ValueError("fepm.greedy='quantile' needs the running score threshold")
      greedy_mask = logits >= threshold
    else:
      raise ValueError(f'fepm.greedy={greedy!r}: use one of {list(GREEDY_RULES)}')
    mask = greedy_mask if key is None else bernoulli_sample(key, logits, bounds)
    return Selection(mask, greedy_mask, bernoulli_log_prob(logits, mask, bounds),
                     bernoulli_entropy(logits, bounds))
  if action == 'topk':
    greedy_order = jax.lax.top_k(logits.astype(jnp.float32), k)[1]
    order = greedy_order if key is None else gumbel_topk(key, logits, k)
    n = logits.shape[-1]
    return Selection(order_to_mask(order, n), order_to_mask(greedy_order, n),
                     plackett_luce_log_prob(logits, order), plackett_luce_entropy(logits, order))
  raise ValueError(f"fepm.action={action!r}: use 'bernoulli' or 'topk'")


# What the agent sees of a token's image besides the token itself (fepm.agent_context).
AGENT_CONTEXTS = ('none', 'global')


class Agent(nn.Module):
  """Token-scoring policy network.

  context 'none': LayerNorm -> Dense(hidden) -> GELU -> Dense(1), each patch token on its own.
  context 'global' (the local + global predictor of DynamicViT): after LayerNorm -> Dense(hidden)
  -> GELU, the second half of every token's hidden features is replaced by that half averaged
  over the image's patch tokens, then Dense(hidden) -> GELU -> Dense(1). A token is then scored
  against a summary of its whole image: a patch of clothing is contamination or the target's
  own only relative to what the rest of the image wears.

  Its input is under stop_gradient, so the policy gradient never reaches the backbone and the
  backbone's losses never reach the agent; it runs in float32 whatever the backbone dtype, since
  it is small and its log-probabilities feed REINFORCE directly.
  """
  hidden: int = 128
  prior_logit: float = -2.0
  context: str = 'none'

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    """patches [B, N, D] -> logits [B, N] float32."""
    if self.context not in AGENT_CONTEXTS:
      raise ValueError(f'fepm.agent_context={self.context!r}: use one of {AGENT_CONTEXTS}')
    x = jax.lax.stop_gradient(patches).astype(jnp.float32)
    x = nn.LayerNorm(vit_lib.LN_EPS, name='norm')(x)
    x = nn.Dense(self.hidden, kernel_init=vit_lib.TRUNC_INIT, name='fc1')(x)
    x = nn.gelu(x, approximate=False)
    if self.context == 'global':
      half = self.hidden // 2
      pooled = jnp.mean(x[..., half:], axis=1, keepdims=True)
      x = jnp.concatenate([x[..., :half], jnp.broadcast_to(pooled, x[..., half:].shape)], -1)
      x = nn.Dense(self.hidden, kernel_init=vit_lib.TRUNC_INIT, name='mix')(x)
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
