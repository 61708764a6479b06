"""OGFR losses: ID, batch-hard triplet, distillation, pattern CE, and the agent's REINFORCE.

Every function computes in float32 whatever the model's compute dtype, and returns a scalar
mean over the batch. Inputs with a part axis ([B, P, ...]) are supported where noted; labels
then broadcast over the parts.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _f32(x) -> jax.Array:
  return jnp.asarray(x).astype(_F32)


# --- identity ---------------------------------------------------------------------------------


def id_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Cross-entropy with label smoothing: targets (1 - eps) * onehot + eps / C.

  logits [..., C]; labels broadcast to logits.shape[:-1] (so [B] labels serve [B, P, C] part
  logits when given as labels[:, None]).
  """
  logits = _f32(logits)
  num_classes = logits.shape[-1]
  labels = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), logits.shape[:-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  target = jax.nn.one_hot(labels, num_classes, dtype=_F32)
  if label_smoothing:
    target = (1.0 - label_smoothing) * target + label_smoothing / num_classes
  return -jnp.mean(jnp.sum(target * logp, axis=-1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  labels = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), logits.shape[:-1])
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(_F32))


def pairwise_distances(x: jax.Array) -> jax.Array:
  """Euclidean distances [B, B]; the diagonal is exactly 0 and the gradient stays finite."""
  x = _f32(x)
  sq = jnp.sum(x * x, axis=-1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
  # The clamp keeps sqrt's gradient finite where rounding makes d2 ~ 0 or negative.
  dist = jnp.sqrt(jnp.maximum(d2, 1e-12))
  return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, dist)


def triplet_loss(feat: jax.Array, labels: jax.Array, margin: float = 0.0,
                 anchors: Optional[jax.Array] = None) -> jax.Array:
  """Batch-hard triplet loss over the whole batch.

  For each anchor: the farthest sample of its identity (itself if alone) and the closest of any
  other identity. margin 0 -> soft margin log(1 + exp(d_ap - d_an)); margin > 0 -> hinge
  max(0, d_ap - d_an + margin). Anchors without any negative in the batch are left out.
  `anchors` (bool [B], optional) restricts anchors and positives to the marked samples;
  negatives still come from the whole batch.
  """
  dist = pairwise_distances(feat)
  labels = jnp.asarray(labels)
  same = labels[:, None] == labels[None, :]
  positive = same if anchors is None else same & anchors[None, :]
  d_ap = jnp.max(jnp.where(positive, dist, 0.0), axis=1)
  d_an = jnp.min(jnp.where(same, jnp.inf, dist), axis=1)
  valid = jnp.any(~same, axis=1)
  if anchors is not None:
    valid = valid & anchors
  gap = d_ap - jnp.where(valid, d_an, 0.0)
  per_anchor = jax.nn.softplus(gap) if margin == 0 else jax.nn.relu(gap + margin)
  per_anchor = jnp.where(valid, per_anchor, 0.0)
  return jnp.sum(per_anchor) / jnp.maximum(jnp.sum(valid.astype(_F32)), 1.0)


def part_triplet_loss(part_feats: jax.Array, labels: jax.Array, margin: float = 0.0,
                      anchors: Optional[jax.Array] = None):
  """Mean over parts of the triplet loss of each part's feature ([B, P, D])."""
  per_part = jax.vmap(lambda f: triplet_loss(f, labels, margin, anchors), in_axes=1)(part_feats)
  return jnp.mean(per_part)


# --- distillation -----------------------------------------------------------------------------


def _unit(x: jax.Array) -> jax.Array:
  """x / max(|x|, 1e-12) along the last axis, with a finite gradient at x = 0.

  The clamp sits on the squared norm: the gradient of sqrt at 0 is infinite, and 0 * inf is
  NaN even where the clamp makes the value constant (an all-zero feature, e.g. in bfloat16).
  """
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def kd_feature_loss(student_feat: jax.Array, teacher_feat: jax.Array,
                    kind: str = 'cos') -> jax.Array:
  """Feature distillation; the teacher side is a constant (stop_gradient).

  'mse': mean over all elements of (s - t)^2; 'cos': mean of 1 - cos(s, t) over the last axis;
  'both': their sum. Works on [B, D] and [B, P, D].
  """
  s = _f32(student_feat)
  t = jax.lax.stop_gradient(_f32(teacher_feat))
  if kind not in ('mse', 'cos', 'both'):
    raise ValueError(f"loss.kd_feature={kind!r}: use 'mse', 'cos' or 'both'")
  total = jnp.zeros((), _F32)
  if kind in ('mse', 'both'):
    total += jnp.mean(jnp.square(s - t))
  if kind in ('cos', 'both'):
    total += jnp.mean(1.0 - jnp.sum(_unit(s) * _unit(t), axis=-1))
  return total


def kd_logit_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                  temperature: float) -> jax.Array:
  """KL(softmax(t/T) || softmax(s/T)) * T^2 summed over classes, mean over the rest.

  The T^2 factor keeps the gradient scale independent of T (Hinton et al.). Teacher side is a
  constant.
  """
  t = jax.lax.stop_gradient(_f32(teacher_logits)) / temperature
  s = _f32(student_logits) / temperature
  t_logp = jax.nn.log_softmax(t, axis=-1)
  s_logp = jax.nn.log_softmax(s, axis=-1)
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
  return jnp.mean(kl) * temperature ** 2


def occluder_token_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Binary cross-entropy of per-token occluder logits [B, N] against bool/0-1 `target`,
  mean over tokens."""
  logits, target = _f32(logits), _f32(target)
  return -jnp.mean(target * jax.nn.log_sigmoid(logits)
                   + (1.0 - target) * jax.nn.log_sigmoid(-logits))


def pattern_loss(pattern_logits: jax.Array, pattern: jax.Array) -> jax.Array:
  """Cross-entropy of the occlusion-pattern classifier (id 0 = no occluder)."""
  return id_loss(pattern_logits, pattern, 0.0)


# --- agent ------------------------------------------------------------------------------------


def agent_reward(lp_sampled: jax.Array, lp_clean: jax.Array, select_rate: jax.Array,
                 eta: float) -> jax.Array:
  """Per-image reward: the gain in the teacher's true-class log-probability from purification,
  minus eta times the fraction of tokens replaced (so erasing has a price)."""
  return (_f32(lp_sampled) - _f32(lp_clean)) - eta * _f32(select_rate)


def reinforce_loss(logp: jax.Array, reward: jax.Array, baseline: Any, entropy: jax.Array,
                   entropy_weight: float) -> jax.Array:
  """-mean(stop_grad(R - b) * log pi(a)) - w * mean(H).

  Its gradient with respect to the policy parameters is the REINFORCE estimate of
  -grad E[R] (minus the entropy bonus); `baseline` may be a scalar or per image, and must not
  depend on the sampled action for the estimate to stay unbiased.
  """
  advantage = jax.lax.stop_gradient(_f32(reward) - _f32(baseline))
  return -jnp.mean(advantage * _f32(logp)) - entropy_weight * jnp.mean(_f32(entropy))


def agent_baseline(kind: str, reward: jax.Array, baseline_ema: jax.Array, *,
                   greedy_reward: Optional[jax.Array] = None,
                   momentum: float = 0.9) -> tuple[jax.Array, jax.Array]:
  """(baseline used this step, new moving average).

  'self_critical': b = reward of the greedy action on the same image; the average is carried
  unchanged. 'moving_average': b = the average of past batch-mean rewards (before this step's
  update, so it does not depend on this step's actions), then updated with momentum.
  """
  baseline_ema = _f32(baseline_ema)
  if kind == 'self_critical':
    if greedy_reward is None:
      raise ValueError("fepm.baseline='self_critical' needs the greedy action's reward")
    return _f32(greedy_reward), baseline_ema
  if kind == 'moving_average':
    new = momentum * baseline_ema + (1.0 - momentum) * jnp.mean(_f32(reward))
    return baseline_ema, jax.lax.stop_gradient(new)
  raise ValueError(f"fepm.baseline={kind!r}: use 'self_critical' or 'moving_average'")


# --- the OGFR objective -----------------------------------------------------------------------


def _global_and_parts(global_term: jax.Array, part_term: Optional[jax.Array]) -> jax.Array:
  """TransReID weighting with a part branch: half global, half the mean over parts."""
  return global_term if part_term is None else 0.5 * global_term + 0.5 * part_term


def branch_losses(out: dict[str, jax.Array], pid: jax.Array, loss_cfg: Any,
                  triplet_anchors: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """(ID loss, triplet loss) of one branch: ID on the BNNeck logits, triplet on the pre-BN
  features (or the BNNeck outputs, loss.triplet_feature_input), each over the global feature
  and (if present) the JPM parts. `triplet_anchors`: see `triplet_loss`."""
  ls = float(loss_cfg.label_smoothing)
  margin = float(loss_cfg.triplet_margin)
  key = 'bn_feat' if loss_cfg.get('triplet_feature_input', 'feat') == 'bn_feat' else 'feat'
  parts = 'part_logits' in out
  ident = _global_and_parts(id_loss(out['logits'], pid, ls),
                            id_loss(out['part_logits'], pid[:, None], ls) if parts else None)
  tri = _global_and_parts(
      triplet_loss(out[key], pid, margin, triplet_anchors),
      part_triplet_loss(out[f'part_{key}s'], pid, margin, triplet_anchors) if parts else None)
  return ident, tri


def ogfr_loss(outputs: dict[str, Any], batch: dict[str, jax.Array], config: Any,
              baseline_ema: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """Total OGFR loss, scalar metrics and the updated reward moving average.

  total = w_t (w_id ID_t + w_tri TRI_t) + w_s (w_id ID_s + w_tri TRI_s)
          + w_kd KD_feat + w_kdl KD_logit + w_occ CE_pattern + w_agent REINFORCE
          + w_tok BCE_occluder_tokens
  with each term present only when its part of the model exists (no teacher: student only;
  FEPM off or random selection: no agent term; pattern embeddings off: no pattern term;
  model.student_erase off: no occluder-token term).
  Distillation covers the global feature/logits and, with JPM, the parts (half and half).
  """
  lc, fc = config.loss, config.fepm
  pid = jnp.asarray(batch['pid'], jnp.int32)
  metrics: dict[str, jax.Array] = {}
  total = jnp.zeros((), _F32)
  baseline_ema = _f32(baseline_ema)
  new_ema = baseline_ema

  student = outputs['student']
  anchors = None
  if lc.get('student_triplet_views', 'all') == 'unoccluded':
    anchors = jnp.asarray(batch['pattern']) == 0
  s_id, s_tri = branch_losses(student, pid, lc, anchors)
  total += lc.student_weight * (lc.id_weight * s_id + lc.triplet_weight * s_tri)
  metrics.update({'loss/student_id': s_id, 'loss/student_triplet': s_tri,
                  'student/accuracy': accuracy(student['logits'], pid)})

  if 'pattern_logits' in student:
    pattern = jnp.asarray(batch['pattern'], jnp.int32)
    p_loss = pattern_loss(student['pattern_logits'], pattern)
    total += lc.pattern_weight * p_loss
    metrics.update({'loss/pattern': p_loss,
                    'pattern/accuracy': accuracy(student['pattern_logits'], pattern)})

  if 'occluder_target' in student:
    logits, target = student['occluder_logits'], student['occluder_target']
    o_loss = occluder_token_loss(logits, target)
    total += lc.get('occluder_token_weight', 1.0) * o_loss
    predicted = _f32(logits) > 0
    metrics.update({'loss/occluder_token': o_loss,
                    'occluder/token_accuracy': jnp.mean(_f32(predicted == target)),
                    'occluder/predicted_rate': jnp.mean(_f32(predicted)),
                    'occluder/target_rate': jnp.mean(_f32(target))})

  teacher = outputs.get('teacher')
  if teacher is not None:
    t_id, t_tri = branch_losses(teacher, pid, lc)
    total += lc.teacher_weight * (lc.id_weight * t_id + lc.triplet_weight * t_tri)
    parts = 'part_feats' in teacher and 'part_feats' in student
    key = 'bn_feat' if lc.get('kd_feature_input', 'bn_feat') == 'bn_feat' else 'feat'
    kd_feat = _global_and_parts(
        kd_feature_loss(student[key], teacher[key], lc.kd_feature),
        kd_feature_loss(student[f'part_{key}s'], teacher[f'part_{key}s'], lc.kd_feature)
        if parts else None)
    kd_logit = _global_and_parts(
        kd_logit_loss(student['logits'], teacher['logits'], lc.kd_temperature),
        kd_logit_loss(student['part_logits'], teacher['part_logits'], lc.kd_temperature)
        if parts else None)
    total += lc.kd_weight * kd_feat + lc.kd_logit_weight * kd_logit
    metrics.update({'loss/teacher_id': t_id, 'loss/teacher_triplet': t_tri,
                    'loss/kd_feature': kd_feat, 'loss/kd_logit': kd_logit,
                    'teacher/accuracy': accuracy(teacher['logits'], pid)})

  agent = outputs.get('agent')
  if agent is not None:
    reward = agent_reward(agent['lp_sampled'], agent['lp_clean'], agent['select_rate'], fc.eta)
    metrics.update({'agent/reward': jnp.mean(reward),
                    'agent/select_rate': jnp.mean(_f32(agent['select_rate'])),
                    'agent/logprob_gain': jnp.mean(_f32(agent['lp_sampled'])
                                                   - _f32(agent['lp_clean']))})
    if 'logp' in agent:
      greedy_reward = agent_reward(agent['lp_greedy'], agent['lp_clean'],
                                   agent['greedy_select_rate'], fc.eta)
      baseline, new_ema = agent_baseline(fc.baseline, reward, baseline_ema,
                                         greedy_reward=greedy_reward,
                                         momentum=fc.baseline_momentum)
      a_loss = reinforce_loss(agent['logp'], reward, baseline, agent['entropy'],
                              fc.entropy_weight)
      total += lc.agent_weight * a_loss
      metrics.update({'loss/agent': a_loss,
                      'agent/baseline': jnp.mean(_f32(baseline)),
                      'agent/advantage_std': jnp.std(reward - baseline),
                      'agent/greedy_reward': jnp.mean(greedy_reward),
                      'agent/greedy_select_rate': jnp.mean(_f32(agent['greedy_select_rate'])),
                      'agent/entropy': jnp.mean(_f32(agent['entropy']))})

  metrics['loss/total'] = total
  return total, metrics, new_ema
