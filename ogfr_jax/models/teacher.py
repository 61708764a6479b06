"""The holistic teacher: a ViT whose Feature Erasing and Purification Module (FEPM) replaces
the patch tokens its selection picks after block L by a learnable token, plus the reward
passes that train the agent.

The teacher holds no parameters of its own: its backbone, head, replacement token and agent
are modules created (and named) by `models.ogfr.OGFR`, which keeps the parameter paths that
checkpoints, pretrained import and export use. Everything that decides how the teacher
behaves is an explicit field; `models.build` is the only place that reads the config.

Selections (`FEPMSpec.selection`):
- 'agent': the REINFORCE policy over per-token actions (models/fepm.py);
- 'random': k tokens uniformly at random (ablation; nothing is learned);
- 'oracle': exactly the tokens covered by the planted contamination of the batch (key
  `contam_mask`, at least `min_cover` of a token's window): the upper bound of what a perfect
  agent could do on the synthetic benchmark.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from ogfr_jax.models import fepm as fepm_lib
from ogfr_jax.models import vit as vit_lib

SELECTIONS = ('agent', 'random', 'oracle')


@dataclasses.dataclass(frozen=True)
class FEPMSpec:
  """The purification module's choices (documented field by field in config_defaults)."""
  layer: int  # blocks that run before the selection acts, in [0, depth)
  selection: str = 'agent'
  k: int = 1  # tokens of the 'random' control
  prob_bounds: tuple[float, float] = fepm_lib.UNBOUNDED
  num_samples: int = 1  # sampled actions per image (leave-one-out baseline when > 1)
  greedy_pass: bool = True  # run the greedy action's reward pass (self-critical baseline)
  # The agent's identity-consistency auxiliary (loss.agent_consistency_weight): label the
  # `share` of the batch's tokens that the identity's other images explain least (within
  # CONSISTENCY_RADIUS grid cells, in the clean pass's tokens after `consistency_blocks`
  # blocks, in [layer, depth]; None: all of them).
  consistency: bool = False
  consistency_blocks: Optional[int] = None
  # Earlier images kept per training identity for those labels (0: the batch's only).
  consistency_memory: int = 0
  # Agent scores averaged over this (rows, cols) window of grid cells before any selection.
  score_window: tuple[int, int] = (1, 1)
  # The greedy action takes the tokens scored at or above a running average of the score
  # that selects `share` of each training batch's tokens, so evaluation needs no batch
  # statistics; the consistency labels label the same share.
  share: float = 0.1
  patch_size: int = 16  # of the backbone: the token windows of the oracle's pixel masks
  stride: int = 16
  min_cover: float = fepm_lib.MIN_COVER


# The consistency labels search the other images' tokens this many grid cells around a
# token's own cell (a person's parts shift by about one cell between views).
CONSISTENCY_RADIUS = 1
# Momentum of the greedy threshold's running average: about the last 100 training batches.
THRESHOLD_MOMENTUM = 0.99


def true_class_log_prob(logits: jax.Array, labels: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def branch_outputs(head: vit_lib.ReIDHead, part_head: Optional[vit_lib.ReIDHead],
                   feat: jax.Array, parts: Optional[jax.Array], *, train: bool
                   ) -> tuple[dict[str, jax.Array], tuple[jax.Array, jax.Array]]:
  """The outputs every branch reports (`feat`, `bn_feat`, `logits`, and with JPM the part
  versions) and the BNNeck statistics used."""
  out = head(feat, train=train)
  res = {'feat': feat, 'bn_feat': out['bn_feat'], 'logits': out['logits']}
  if parts is not None:
    part_out = part_head(parts, train=train)
    res.update(part_feats=parts, part_bn_feats=part_out['bn_feat'],
               part_logits=part_out['logits'])
  return res, out['stats']


def _f32(x: Optional[jax.Array]) -> Optional[jax.Array]:
  return None if x is None else x.astype(jnp.float32)


class Teacher(nn.Module):
  """Holistic branch with FEPM (`fepm` None: a plain ViT branch)."""
  vit: vit_lib.ViT
  head: vit_lib.ReIDHead
  part_head: Optional[vit_lib.ReIDHead] = None
  fepm: Optional[FEPMSpec] = None
  replacement: Optional[fepm_lib.TokenReplacement] = None
  agent: Optional[fepm_lib.Agent] = None

  def setup(self):
    f = self.fepm
    if f is not None and f.selection == 'agent':
      # A bias-corrected moving average (as Adam's moments): the threshold is sum / weight.
      self.threshold_sum = self.variable('batch_stats', 'greedy_threshold_sum', jnp.zeros, (),
                                         jnp.float32)
      self.threshold_weight = self.variable('batch_stats', 'greedy_threshold_weight', jnp.zeros,
                                            (), jnp.float32)
    if f is not None and f.consistency and f.consistency_memory:
      # The identity memory of the consistency labels: for every training identity the
      # compared tokens of its last `consistency_memory` images, their split indices (-1: an
      # empty slot) and the next slot to write. It lives in 'batch_stats', the collection
      # the train step updates, checkpoints and keeps out of the gradient.
      ids, m = self.head.num_classes, f.consistency_memory
      n = self.vit.grid[0] * self.vit.grid[1]
      self.memory_tokens = self.variable('batch_stats', 'consistency_memory', jnp.zeros,
                                         (ids, m, n, self.vit.dim), jnp.float32)
      self.memory_index = self.variable('batch_stats', 'consistency_memory_index',
                                        lambda: jnp.full((ids, m), -1, jnp.int32))
      self.memory_next = self.variable('batch_stats', 'consistency_memory_next', jnp.zeros,
                                       (ids,), jnp.int32)

  # --- selection ------------------------------------------------------------------------------

  def planted_tokens(self, contam_mask: Optional[jax.Array]) -> jax.Array:
    if contam_mask is None:
      raise ValueError("fepm.selection='oracle' reads the planted contamination of the batch "
                       "('contam_mask', pixels of the model input), which this batch lacks")
    f = self.fepm
    return fepm_lib.covered_tokens(contam_mask, f.patch_size, f.stride, f.min_cover)

  def _select(self, mid: jax.Array, contam_mask: Optional[jax.Array], *, sample: bool
              ) -> tuple[list[fepm_lib.Selection], Optional[jax.Array]]:
    """Selections over the patch tokens of `mid` (tokens after block L): `num_samples`
    sampled actions when `sample`, else the greedy one. Returns (selections, agent scores)."""
    f = self.fepm
    b, n = mid.shape[0], mid.shape[1] - 1
    if f.selection == 'oracle':
      return [fepm_lib.Selection(self.planted_tokens(contam_mask), None, None, None)], None
    if f.selection == 'random':
      key = self.make_rng('agent') if self.has_rng('agent') else jax.random.PRNGKey(0)
      mask = fepm_lib.random_mask(key, (b, n), f.k)
      return [fepm_lib.Selection(mask, None, None, None)], None
    scores = fepm_lib.window_mean(self.agent(mid[:, 1:]), self.vit.grid, f.score_window)
    keys = jax.random.split(self.make_rng('agent'), f.num_samples) if sample else [None]
    threshold = self._greedy_threshold(scores, update=sample)
    return [fepm_lib.select(scores, key=key, threshold=threshold, bounds=f.prob_bounds)
            for key in keys], scores

  def _greedy_threshold(self, scores: jax.Array, *, update: bool) -> jax.Array:
    """The running score threshold of the greedy action, updated with this batch when
    training. Before any training step it is this batch's own threshold. A bias-corrected
    moving average (as Adam's moments): the threshold is sum / weight."""
    batch = jax.lax.stop_gradient(fepm_lib.top_share_threshold(scores, self.fepm.share))
    total, weight = self.threshold_sum.value, self.threshold_weight.value
    if update and self.is_mutable_collection('batch_stats'):
      m = THRESHOLD_MOMENTUM
      total, weight = m * total + (1 - m) * batch, m * weight + (1 - m)
      self.threshold_sum.value, self.threshold_weight.value = total, weight
    return jnp.where(weight > 0, total / jnp.maximum(weight, 1e-12), batch)

  # --- forward passes -----------------------------------------------------------------------

  def _plain(self, image, camid, *, train: bool):
    out, parts = self.vit.tail(self.vit.embed(image, camid), 0, train=train, cls_only=True)
    return branch_outputs(self.head, self.part_head, _f32(out[:, 0]), _f32(parts), train=train)

  def __call__(self, image: jax.Array, camid: jax.Array, pid: jax.Array, *, train: bool,
               contam_mask: Optional[jax.Array] = None, purify: Any = True,
               index: Optional[jax.Array] = None) -> dict[str, Any]:
    """{'teacher': branch outputs[, 'agent': what the agent's loss and metrics read]}.

    The paper's loop: score the patch tokens after block L, sample a mask, replace the
    selected tokens by the learnable token, finish the teacher's pass on the purified
    sequence; in training, the reward passes give REINFORCE its reward.

    `purify` (a bool, possibly traced) switches the replacement off while keeping every
    shape: the teacher's warm-up phase trains on the clean sequence with the same program.
    `index` (the images' training-split indices) is read by the identity memory only.
    """
    if self.fepm is None:
      res, _ = self._plain(image, camid, train=train)
      return {'teacher': res}
    f, vit = self.fepm, self.vit
    mid = vit.run_blocks(vit.embed(image, camid), 0, f.layer, train=train)
    sels, scores = self._select(mid, contam_mask, sample=train)
    own = sels[0].mask & jnp.asarray(purify, jnp.bool_)
    pos = vit.patch_pos_embed()
    out, parts = vit.tail(self.replacement(mid, own, pos), f.layer, train=train,
                          cls_only=True)
    res, stats = branch_outputs(self.head, self.part_head, _f32(out[:, 0]), _f32(parts),
                                train=train)
    agent = {'mask': sels[0].mask,
             'select_rate': jnp.mean(sels[0].mask.astype(jnp.float32), axis=-1)}
    if f.selection == 'oracle' or not train:
      return {'teacher': res, 'agent': agent}
    frozen = jax.lax.stop_gradient(mid)
    agent.update(self._rewards(frozen, sels, pos, stats, pid))
    if scores is not None:
      agent.update(self._policy(sels, scores))
    if f.consistency:
      agent.update(self._consistency_targets(frozen, pid, index))
    return {'teacher': res, 'agent': agent}

  def _rewards(self, frozen: jax.Array, sels: list[fepm_lib.Selection], pos: jax.Array,
               stats: tuple[jax.Array, jax.Array], pid: jax.Array) -> dict[str, jax.Array]:
    """The teacher's true-class log-probabilities after purification with each sampled
    action, clean, and (for a self-critical baseline) with the greedy action.

    The passes are batched into one call through blocks [L, depth). They are deterministic
    (no stochastic depth: the reward is a difference of log-probabilities and must not carry
    drop-path noise) and use the global branch only. Their BNNeck normalises with the
    statistics of the real teacher batch so the reward scores exactly the classifier the ID
    loss trains, while the concatenated rows never enter the batch statistics or the running
    averages.
    """
    f, vit = self.fepm, self.vit
    masks = [s.mask for s in sels]
    greedy = sels[0].greedy_mask
    if greedy is not None and f.greedy_pass:
      masks.append(greedy)
    rows = [self.replacement(frozen, m, pos) for m in masks] + [frozen]
    batch = frozen.shape[0]
    reward_tokens = jax.lax.stop_gradient(jnp.concatenate(rows, axis=0))
    reward_out = vit.final_norm(vit.run_blocks(reward_tokens, f.layer, vit.depth, train=False,
                                               cls_only=True))
    reward_logits = self.head.logits_with_stats(reward_out[:, 0].astype(jnp.float32),
                                                jax.lax.stop_gradient(stats))
    lp = jax.lax.stop_gradient(true_class_log_prob(reward_logits, jnp.tile(pid, len(rows))))
    lp = lp.reshape(len(rows), batch)
    num = len(sels)
    out = {'lp_sampled': lp[0], 'lp_clean': lp[-1], 'lp_samples': lp[:num]}
    if len(masks) > num:
      out['lp_greedy'] = lp[num]
    return out

  def _policy(self, sels: list[fepm_lib.Selection], scores: jax.Array) -> dict[str, jax.Array]:
    """What REINFORCE and the agent's metrics read of the sampled and greedy actions."""
    rate = lambda mask: jnp.mean(mask.astype(jnp.float32), axis=-1)
    return {'logp': jnp.stack([s.log_prob for s in sels]),
            'sample_rates': jnp.stack([rate(s.mask) for s in sels]),
            'entropy': sels[0].entropy, 'scores': scores, 'greedy_mask': sels[0].greedy_mask,
            'greedy_select_rate': rate(sels[0].greedy_mask),
            'probs': fepm_lib.selection_probs(scores, self.fepm.prob_bounds)}

  def _consistency_targets(self, frozen: jax.Array, pid: jax.Array,
                           index: Optional[jax.Array]) -> dict[str, jax.Array]:
    """The agent's logits on the clean tokens after block L (held) and the identity-consistency
    pseudo-labels: patch tokens, after `consistency_blocks` blocks of a clean deterministic
    pass, that no other image of the same identity (in the batch, and in the identity memory
    when `consistency_memory` > 0) matches nearby (`fepm.unexplained_tokens`). Both under
    stop_gradient: the labels only teach the scorer. The batch is written to the memory after
    its labels are drawn, so an image is never compared with itself."""
    f, vit = self.fepm, self.vit
    stop = vit.depth if f.consistency_blocks is None else f.consistency_blocks
    compared = jax.lax.stop_gradient(vit.run_blocks(frozen, f.layer, stop, train=False))[:, 1:]
    memory = valid = None
    if f.consistency_memory:
      if index is None:
        raise ValueError("fepm.consistency_memory needs the batch's 'index' (the images' "
                         'training-split indices), which this batch lacks')
      memory, valid = fepm_lib.memory_read(self.memory_tokens.value, self.memory_index.value,
                                           pid, index)
    target = fepm_lib.unexplained_tokens(compared, pid, vit.grid, CONSISTENCY_RADIUS, f.share,
                                         memory, valid)
    if f.consistency_memory and self.is_mutable_collection('batch_stats'):
      (self.memory_tokens.value, self.memory_index.value,
       self.memory_next.value) = fepm_lib.memory_write(
           self.memory_tokens.value, self.memory_index.value, self.memory_next.value,
           compared, pid, index)
    return {'consistency_scores': self.agent(frozen[:, 1:]),
            'consistency_target': jax.lax.stop_gradient(target)}

  def selection(self, image: jax.Array, camid: jax.Array,
                contam_mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """The evaluation-time (greedy) selection: {'mask' [B, N] bool, 'scores' [B, N]}."""
    if self.fepm is None:
      raise ValueError('the teacher has no FEPM (model.teacher and fepm.enabled)')
    mid = self.vit.run_blocks(self.vit.embed(image, camid), 0, self.fepm.layer, train=False)
    sels, scores = self._select(mid, contam_mask, sample=False)
    if scores is None:
      scores = jnp.zeros(sels[0].mask.shape, jnp.float32)
    return {'mask': sels[0].mask, 'scores': scores}

  def features(self, image: jax.Array, camid: jax.Array, *, purify: bool,
               contam_mask: Optional[jax.Array] = None, feature: str = 'pre_bn'
               ) -> jax.Array:
    """The teacher's inference feature [B, D], with the greedy purification or without."""
    if self.fepm is None or not purify:
      res, _ = self._plain(image, camid, train=False)
    else:
      vit, f = self.vit, self.fepm
      mid = vit.run_blocks(vit.embed(image, camid), 0, f.layer, train=False)
      mask = self._select(mid, contam_mask, sample=False)[0][0].mask
      out, parts = vit.tail(self.replacement(mid, mask, vit.patch_pos_embed()), f.layer,
                            train=False, cls_only=True)
      res, _ = branch_outputs(self.head, self.part_head, _f32(out[:, 0]), _f32(parts),
                              train=False)
    return res['feat'] if feature == 'pre_bn' else res['bn_feat']
