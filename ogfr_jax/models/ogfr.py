"""OGFR: holistic teacher with feature purification, occlusion-aware student, one Flax module.

Parameter tree (top-level names under 'params'):
  teacher_vit, student_vit   the two backbones (or one `vit` with model.shared_backbone;
                             only `student_vit` without a teacher)
  teacher_head, student_head BNNeck + ID classifier of each branch (always separate)
  teacher_part_head, student_part_head   per-part BNNeck + classifiers (model.jpm)
  pattern_embed              [K+1, D] occlusion pattern embeddings (model.pattern_embed)
  pattern_head               linear pattern classifier on the student's BNNeck (or CLS) feature
  fepm                       the replacement token ('replace_token'), trained by the teacher's
                             losses like any backbone parameter
  student_erase, occluder_head   the student's replacement token and its per-token occluder
                             classifier (model.student_erase)
  occluder_vit               the occluder classifier's own patch embedding and first blocks
                             (model.student_erase_detector='separate'); filled from
                             init_from like the backbones (the blocks it has)
  agent                      the token-scoring policy: the only module named 'agent', so the
                             optimizer can give it its own update rule by path
'batch_stats' holds the BNNeck running statistics of each head.

The module's `config` field must be hashable: pass an `ml_collections.FrozenConfigDict`
(a plain ConfigDict is frozen on construction).

Rng streams: 'dropout' (stochastic depth, pattern dropout) and 'agent' (action sampling) in
training; evaluation needs none, except random selection, which falls back to a fixed key.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import flax.linen as nn

from ogfr_jax.config_defaults import VIT_SIZES
from ogfr_jax.models import fepm as fepm_lib
from ogfr_jax.models import vit as vit_lib

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def token_grid(config: Any) -> tuple[int, int]:
  """(gh, gw) of the patch-token grid for config.input and config.model."""
  return vit_lib.patch_grid(config.input.height, config.input.width, config.model.patch_size,
                            config.model.stride)


def vit_size(config: Any) -> tuple[int, int, int]:
  """(width, depth, heads) of config.model.size."""
  if config.model.size not in VIT_SIZES:
    raise ValueError(f'model.size={config.model.size!r}: use one of {sorted(VIT_SIZES)}')
  return VIT_SIZES[config.model.size]


def fepm_layer(config: Any) -> int:
  """L: the number of teacher blocks that run before the agent acts (fepm.layer resolved)."""
  depth = vit_size(config)[1]
  layer = config.fepm.layer
  resolved = depth + layer if layer < 0 else layer
  if not 0 <= resolved < depth:
    raise ValueError(f'fepm.layer={layer} resolves to {resolved}; the agent must act before one '
                     f'of the {depth} blocks, so it must be in [0, {depth - 1}] '
                     f'(or [-{depth}, -1] from the end)')
  return resolved


def student_erase_layer(config: Any) -> int:
  """The number of student blocks whose output the occluder head reads (validated)."""
  depth = vit_size(config)[1]
  layer = int(config.model.get('student_erase_layer', 1))
  if not 0 <= layer <= depth:
    raise ValueError(f'model.student_erase_layer={layer}: the occluder head reads the tokens '
                     f'after that many of the {depth} student blocks, so it must be in '
                     f'[0, {depth}]')
  return layer


def erase_detector(config: Any) -> str:
  """model.student_erase_detector, validated."""
  detector = config.model.get('student_erase_detector', 'student')
  if detector not in ('student', 'separate'):
    raise ValueError(f"model.student_erase_detector={detector!r}: use 'student' or 'separate'")
  return detector


def num_patterns(config: Any) -> int:
  """K + 1: the occlusion pattern ids 0 (none) .. K."""
  return len(config.occlusion.patterns) + 1


def compute_dtype(config: Any):
  if config.model.dtype not in _DTYPES:
    raise ValueError(f'model.dtype={config.model.dtype!r}: use one of {sorted(_DTYPES)}')
  return _DTYPES[config.model.dtype]


def has_teacher(config: Any) -> bool:
  return bool(config.model.teacher)


def has_fepm(config: Any) -> bool:
  """FEPM lives in the teacher; without a teacher it does not exist."""
  return has_teacher(config) and bool(config.fepm.enabled)


def backbone_names(config: Any) -> tuple[str, ...]:
  """Top-level parameter names holding a ViT backbone (for pretrained-weight import)."""
  extra = (('occluder_vit',) if config.model.get('student_erase', False)
           and erase_detector(config) == 'separate' else ())
  if has_teacher(config) and config.model.shared_backbone:
    return ('vit',) + extra
  return (('teacher_vit', 'student_vit') if has_teacher(config) else ('student_vit',)) + extra


def freeze_config(config: Any) -> ml_collections.FrozenConfigDict:
  """An immutable copy. FrozenConfigDict keeps a reference to the ConfigDict it was built
  from and compares and hashes through it, so freezing a live ConfigDict that is edited later
  would make two different configs equal (and share jit caches): copy first."""
  if isinstance(config, ml_collections.FrozenConfigDict):
    return config
  return ml_collections.FrozenConfigDict(copy.deepcopy(config))


def _true_class_log_prob(logits: jax.Array, labels: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


class OGFR(nn.Module):
  """Teacher (with FEPM and its agent) and occlusion-aware student.

  Fields: `config` (the full config, frozen), `num_classes` (training identities) and
  `num_cameras` (size of the SIE table; at least 1).
  """
  config: Any
  num_classes: int
  num_cameras: int

  def __post_init__(self):
    object.__setattr__(self, 'config', freeze_config(self.config))
    super().__post_init__()

  def setup(self):
    cfg = self.config
    m = cfg.model
    dim, depth, heads = vit_size(cfg)
    if m.pattern_test_policy not in ('none', 'soft'):
      raise ValueError(f"model.pattern_test_policy={m.pattern_test_policy!r}: use 'none' or "
                       f"'soft'")
    attention = m.get('attention_impl', 'xla')
    if attention not in ('xla', 'cudnn'):
      raise ValueError(f"model.attention_impl={attention!r}: use 'xla' or 'cudnn'")
    backbone = dict(
        dim=dim, depth=depth, num_heads=heads, grid=token_grid(cfg),
        patch_size=m.patch_size, stride=m.stride, mlp_ratio=m.mlp_ratio,
        num_cameras=self.num_cameras, sie=bool(m.sie), sie_weight=m.sie_weight,
        drop_path=m.drop_path, jpm=bool(m.jpm), jpm_shift=m.jpm_shift,
        jpm_shuffle_groups=m.jpm_shuffle_groups, jpm_parts=m.jpm_parts,
        dtype=compute_dtype(cfg), attention_impl=attention, remat=m.get('remat', 'none'))
    if has_teacher(cfg) and m.shared_backbone:
      self.vit = vit_lib.ViT(**backbone)
    else:
      self.student_vit = vit_lib.ViT(**backbone)
      if has_teacher(cfg):
        self.teacher_vit = vit_lib.ViT(**backbone)

    self.student_head = vit_lib.ReIDHead(self.num_classes)
    if m.jpm:
      self.student_part_head = vit_lib.ReIDHead(self.num_classes)
    if m.pattern_embed:
      self.pattern_embed = self.param('pattern_embed', vit_lib.TRUNC_INIT,
                                      (num_patterns(cfg), dim), jnp.float32)
      self.pattern_head = nn.Dense(num_patterns(cfg), kernel_init=vit_lib.TRUNC_INIT)

    if m.get('student_erase', False):
      student_erase_layer(cfg)
      self.student_erase = fepm_lib.TokenReplacement()
      if erase_detector(cfg) == 'separate':
        # The student's patch embedding and first blocks, with parameters of its own.
        self.occluder_vit = vit_lib.ViT(**dict(backbone, depth=student_erase_layer(cfg),
                                               jpm=False))
      # Starts by predicting ~12% occluder probability everywhere, as the FEPM agent does.
      self.occluder_head = nn.Dense(1, kernel_init=vit_lib.TRUNC_INIT,
                                    bias_init=nn.initializers.constant(-2.0))
    if has_teacher(cfg):
      self.teacher_head = vit_lib.ReIDHead(self.num_classes)
      if m.jpm:
        self.teacher_part_head = vit_lib.ReIDHead(self.num_classes)
    if has_fepm(cfg):
      fepm_lib.describe(cfg)  # validates the choices
      fepm_layer(cfg)
      self.fepm = fepm_lib.TokenReplacement()
      if cfg.fepm.selection == 'agent':
        self.agent = fepm_lib.Agent(hidden=cfg.fepm.agent_hidden,
                                    prior_logit=cfg.fepm.prior_logit)

  # --- pieces -------------------------------------------------------------------------------

  def _backbone(self, branch: str) -> vit_lib.ViT:
    if has_teacher(self.config) and self.config.model.shared_backbone:
      return self.vit
    return self.teacher_vit if branch == 'teacher' else self.student_vit

  def _heads(self, branch: str, feat: jax.Array, parts: Optional[jax.Array],
             *, train: bool) -> tuple[dict[str, jax.Array], tuple[jax.Array, jax.Array]]:
    head = self.teacher_head if branch == 'teacher' else self.student_head
    out = head(feat, train=train)
    res = {'feat': feat, 'bn_feat': out['bn_feat'], 'logits': out['logits']}
    if parts is not None:
      part_head = self.teacher_part_head if branch == 'teacher' else self.student_part_head
      part_out = part_head(parts, train=train)
      res.update(part_feats=parts, part_bn_feats=part_out['bn_feat'],
                 part_logits=part_out['logits'])
    return res, out['stats']

  def _student_forward(self, image: jax.Array, camid: jax.Array,
                       extra: Optional[jax.Array], *, train: bool,
                       occ_mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    vit = self._backbone('student')
    tokens = vit.embed(image, camid, extra)
    erase = {}
    if self.config.model.get('student_erase', False):
      tokens, erase = self._erase_occluders(vit, tokens, image, camid, occ_mask, train=train)
    out, parts = vit.tail(tokens, 0, train=train, cls_only=True)
    feat = out[:, 0].astype(jnp.float32)
    parts = None if parts is None else parts.astype(jnp.float32)
    res, _ = self._heads('student', feat, parts, train=train)
    res.update(erase)
    if self.config.model.pattern_embed:
      head_input = self.config.model.get('pattern_head_input', 'bn_feat')
      res['pattern_logits'] = self.pattern_head(res['bn_feat'] if head_input == 'bn_feat'
                                                else feat)
    return res

  def _erase_occluders(self, vit: vit_lib.ViT, tokens: jax.Array, image: jax.Array,
                       camid: jax.Array, occ_mask: Optional[jax.Array], *, train: bool
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Blends the embedded patch tokens towards the learnable token by the head's occluder
    probability, read after the first model.student_erase_layer blocks of the student (or of
    the classifier's own copy, model.student_erase_detector='separate'). The blend stays
    differentiable, so the ReID losses train the head along with its own cross-entropy
    against `occ_mask` (the synthesised view's occluder pixels, required in training)."""
    cfg = self.config
    if erase_detector(cfg) == 'separate':
      det = self.occluder_vit
      mid = det.run_blocks(det.embed(image, camid), 0, det.depth, train=train)
    else:
      mid = vit.run_blocks(tokens, 0, student_erase_layer(cfg), train=train)
    logits = self.occluder_head(mid[:, 1:].astype(jnp.float32))[..., 0]
    out = {'occluder_logits': logits}
    if occ_mask is not None:
      out['occluder_target'] = fepm_lib.covered_tokens(occ_mask, cfg.model.patch_size,
                                                       cfg.model.stride)
    elif train:
      raise ValueError("model.student_erase trains the occluder head on the batch's 'occ_mask' "
                       '(the synthesised occluder pixels), which this batch lacks')
    blended = self.student_erase(tokens, jax.nn.sigmoid(logits), vit.patch_pos_embed())
    return blended, out

  def _pattern_extra(self, pattern: jax.Array, *, train: bool) -> Optional[jax.Array]:
    """E[pattern] per image; with model.pattern_dropout some are replaced by E[0] in training
    so that the student (and the pattern head) also learn to work without the hint, which is
    the situation at test time."""
    if not self.config.model.pattern_embed:
      return None
    pattern = jnp.asarray(pattern, jnp.int32)
    drop = float(self.config.model.get('pattern_dropout', 0.0))
    if train and drop > 0:
      keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - drop, pattern.shape)
      pattern = jnp.where(keep, pattern, 0)
    # Ids outside [0, K] give NaN (jnp.take's fill mode): loud rather than silently clamped.
    return jnp.take(self.pattern_embed, pattern, axis=0)

  def _select(self, mid: jax.Array, *, train: bool
              ) -> tuple[fepm_lib.Selection, Optional[jax.Array]]:
    """The teacher's selection over the patch tokens of `mid` (tokens after block L)."""
    f = self.config.fepm
    b, n = mid.shape[0], mid.shape[1] - 1
    if f.selection == 'random':
      key = self.make_rng('agent') if self.has_rng('agent') else jax.random.PRNGKey(0)
      mask = fepm_lib.random_mask(key, (b, n), fepm_lib.num_selected(f.topk_fraction, n))
      return fepm_lib.Selection(mask, None, None, None), None
    scores = self.agent(mid[:, 1:])
    k = fepm_lib.num_selected(f.topk_fraction, n) if f.action == 'topk' else 0
    key = self.make_rng('agent') if train else None
    return fepm_lib.select(scores, action=f.action, k=k, key=key), scores

  def _teacher_forward(self, image: jax.Array, camid: jax.Array, pid: jax.Array,
                       *, train: bool) -> dict[str, Any]:
    vit = self._backbone('teacher')
    tokens = vit.embed(image, camid)
    if not has_fepm(self.config):
      out, parts = vit.tail(tokens, 0, train=train, cls_only=True)
      res, _ = self._heads('teacher', out[:, 0].astype(jnp.float32),
                           None if parts is None else parts.astype(jnp.float32), train=train)
      return {'teacher': res}

    layer = fepm_layer(self.config)
    mid = vit.run_blocks(tokens, 0, layer, train=train)
    sel, scores = self._select(mid, train=train)
    pos = vit.patch_pos_embed()
    out, parts = vit.tail(self.fepm(mid, sel.mask, pos), layer, train=train, cls_only=True)
    res, stats = self._heads('teacher', out[:, 0].astype(jnp.float32),
                             None if parts is None else parts.astype(jnp.float32), train=train)

    # Reward passes, batched into one call through blocks [L, depth): purified with the taken
    # action, clean, and (when sampling) purified with the greedy action. They are
    # deterministic (no stochastic depth: the reward is a difference of log-probabilities and
    # must not carry drop-path noise) and use the global branch only. Their BNNeck normalises
    # with the statistics of the real teacher batch (running ones in evaluation) so the reward
    # scores exactly the classifier the ID loss trains, while the concatenated rows never
    # enter the batch statistics or the running averages.
    frozen = jax.lax.stop_gradient(mid)
    rows = [self.fepm(frozen, sel.mask, pos), frozen]
    with_greedy = sel.greedy_mask is not None and train
    if with_greedy:
      rows.append(self.fepm(frozen, sel.greedy_mask, pos))
    batch = mid.shape[0]
    reward_tokens = jax.lax.stop_gradient(jnp.concatenate(rows, axis=0))
    reward_out = vit.final_norm(vit.run_blocks(reward_tokens, layer, vit.depth, train=False,
                                               cls_only=True))
    reward_logits = self.teacher_head.logits_with_stats(
        reward_out[:, 0].astype(jnp.float32), jax.lax.stop_gradient(stats))
    lp = jax.lax.stop_gradient(
        _true_class_log_prob(reward_logits, jnp.tile(pid, len(rows))))
    lp = lp.reshape(len(rows), batch)

    agent = {'mask': sel.mask, 'select_rate': jnp.mean(sel.mask.astype(jnp.float32), axis=-1),
             'lp_sampled': lp[0], 'lp_clean': lp[1]}
    if sel.log_prob is not None:
      agent.update(
          logp=sel.log_prob, entropy=sel.entropy, scores=scores, greedy_mask=sel.greedy_mask,
          greedy_select_rate=jnp.mean(sel.greedy_mask.astype(jnp.float32), axis=-1),
          lp_greedy=lp[2] if with_greedy else lp[0])
    return {'teacher': res, 'agent': agent}

  # --- entry points -------------------------------------------------------------------------

  def __call__(self, batch: dict[str, jax.Array], *, train: bool) -> dict[str, Any]:
    """Training forward of both branches.

    batch: image [B,H,W,3] (x), occluded [B,H,W,3] (occ(x)), camid, pattern, pid ([B] int32),
    and with model.student_erase occ_mask [B,H,W] (1 on the synthesised occluder's pixels).
    Returns {'teacher', 'student'[, 'agent']} (see the package docs for the keys). The student
    always gets the batch's pattern embedding here; `extract` applies the test-time policy.
    In training the teacher's action is sampled, otherwise greedy. Call with
    mutable=['batch_stats'] when train=True.
    """
    out = {}
    if has_teacher(self.config):
      out.update(self._teacher_forward(batch['image'], batch['camid'], batch['pid'],
                                       train=train))
    extra = self._pattern_extra(batch['pattern'], train=train)
    out['student'] = self._student_forward(batch['occluded'], batch['camid'], extra,
                                           train=train, occ_mask=batch.get('occ_mask'))
    return out

  def extract(self, image: jax.Array, camid: jax.Array, *,
              feature: str = 'pre_bn') -> jax.Array:
    """Student inference features, not normalised: [B, D], or with JPM the TransReID
    concatenation [global, part_1/P, ..., part_P/P] of width (1 + P) * D.

    Pattern policy (model.pattern_test_policy): 'none' adds E[0]; 'soft' runs the student
    twice, first with E[0] to predict p = softmax(pattern_logits), then with sum_k p_k E[k].
    With model.student_erase the tokens are blended by the occluder head's own prediction.
    """
    if feature not in ('pre_bn', 'post_bn'):
      raise ValueError(f"eval.feature={feature!r}: use 'pre_bn' or 'post_bn'")
    extra = None
    if self.config.model.pattern_embed:
      extra = jnp.broadcast_to(self.pattern_embed[0], (image.shape[0], self.pattern_embed.shape[1]))
      if self.config.model.pattern_test_policy == 'soft':
        first = self._student_forward(image, camid, extra, train=False)
        extra = jax.nn.softmax(first['pattern_logits'], axis=-1) @ self.pattern_embed
    res = self._student_forward(image, camid, extra, train=False)
    glob = res['feat'] if feature == 'pre_bn' else res['bn_feat']
    parts = res.get('part_feats' if feature == 'pre_bn' else 'part_bn_feats')
    if parts is None:
      return glob
    b, p, d = parts.shape
    return jnp.concatenate([glob, parts.reshape(b, p * d) / p], axis=-1)

  def teacher_selection(self, image: jax.Array, camid: jax.Array) -> dict[str, jax.Array]:
    """The teacher's evaluation-time selection on a batch: {'mask' [B, N] bool, 'scores'
    [B, N] float32 (agent logits; zeros for random selection)}. N = gh * gw patch tokens in
    row-major order of `token_grid(config)`."""
    if not has_fepm(self.config):
      raise ValueError('teacher_selection needs a teacher with FEPM (model.teacher and '
                       'fepm.enabled)')
    vit = self._backbone('teacher')
    mid = vit.run_blocks(vit.embed(image, camid), 0, fepm_layer(self.config), train=False)
    sel, scores = self._select(mid, train=False)
    if scores is None:
      scores = jnp.zeros(sel.mask.shape, jnp.float32)
    return {'mask': sel.mask, 'scores': scores}
