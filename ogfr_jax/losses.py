"""OGFR losses: ID, batch-hard triplet, distillation, pattern CE, and the agent's REINFORCE.

Every function computes in float32 whatever the model's compute dtype, and returns a scalar
mean over the batch. Inputs with a part axis ([B, P, ...]) are supported where noted; labels
then broadcast over the parts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ogfr_jax.models import build
from ogfr_jax.models import fepm as fepm_lib

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


def kd_feature_loss(student_feat: jax.Array, teacher_feat: jax.Array) -> jax.Array:
  """Feature distillation, the mean of 1 - cos(s, t) over the last axis; the teacher side is
  a constant (stop_gradient). Works on [B, D] and [B, P, D]."""
  s = _f32(student_feat)
  t = jax.lax.stop_gradient(_f32(teacher_feat))
  return jnp.mean(1.0 - jnp.sum(_unit(s) * _unit(t), axis=-1))


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


def agent_baseline(kind: str, reward: jax.Array, *,
                   greedy_reward: Optional[jax.Array] = None) -> jax.Array:
  """The baseline of each sampled action's reward. `reward` is [B] or [S, B] (S sampled
  actions per image).

  'self_critical': b = reward of the greedy action on the same image. 'leave_one_out':
  b_s = mean reward of the image's other S - 1 actions (needs S >= 2), which does not depend
  on action s, so the estimate stays unbiased.
  """
  reward = _f32(reward)
  if kind == 'self_critical':
    if greedy_reward is None:
      raise ValueError("fepm.baseline='self_critical' needs the greedy action's reward")
    return _f32(greedy_reward)
  if kind == 'leave_one_out':
    num = reward.shape[0] if reward.ndim == 2 else 1
    if num < 2:
      raise ValueError("fepm.baseline='leave_one_out' needs fepm.num_samples >= 2")
    return (jnp.sum(reward, axis=0, keepdims=True) - reward) / (num - 1)
  raise ValueError(f"fepm.baseline={kind!r}: use 'self_critical' or 'leave_one_out'")


# --- the OGFR objective: named, weighted terms -------------------------------------------------
#
# Each term is a pure function (outputs, batch, ctx) -> TermValue, registered with the config
# field that weighs it and the predicate of the model part it reads. `active_terms(config)` is
# the one place that decides which terms a config trains with (from the config, never from
# which outputs happen to exist); `total_loss` sums them. Adding a term: a function here with
# `@term(...)`, and its weight in config_defaults (section `loss`).


class TermValue(NamedTuple):
  value: jax.Array  # unweighted scalar; logged as loss/<name>
  metrics: dict[str, jax.Array] = {}


@dataclasses.dataclass(frozen=True)
class Context:
  """What terms read besides the model outputs and the batch."""
  loss: Any  # config.loss
  fepm: Any  # config.fepm
  agent_on: Any = 1.0  # 0 during a teacher warm-up phase (fepm.warmup_fraction)


@dataclasses.dataclass(frozen=True)
class Term:
  fn: Callable[[dict, dict, Context], TermValue]
  weight: Callable[[Any], float]  # config -> weight
  needs: Callable[[Any], bool]  # config -> whether the model has what the term reads


TERMS: dict[str, Term] = {}


def term(name: str, weight: Callable[[Any], float],
         needs: Callable[[Any], bool] = lambda config: True):
  def register(fn):
    if name in TERMS:
      raise ValueError(f'loss term {name!r} is registered twice')
    TERMS[name] = Term(fn, weight, needs)
    return fn
  return register


def active_terms(config: Any) -> dict[str, float]:
  """{term name: weight} of the terms `config` trains with (weight 0 terms are still
  computed and logged, as a diagnostic)."""
  return {name: float(t.weight(config)) for name, t in TERMS.items() if t.needs(config)}


def total_loss(outputs: dict[str, Any], batch: dict[str, jax.Array], config: Any, *,
               agent_on: Any = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(sum_t w_t L_t, metrics) over `active_terms(config)`."""
  ctx = Context(config.loss, config.fepm, agent_on)
  total = jnp.zeros((), _F32)
  metrics: dict[str, jax.Array] = {}
  for name, weight in active_terms(config).items():
    out = TERMS[name].fn(outputs, batch, ctx)
    total += weight * out.value
    metrics[f'loss/{name}'] = out.value
    metrics.update(out.metrics)
  metrics['loss/total'] = total
  return total, metrics


def _global_and_parts(global_term: jax.Array, part_term: Optional[jax.Array]) -> jax.Array:
  """TransReID weighting with a part branch: half global, half the mean over parts."""
  return global_term if part_term is None else 0.5 * global_term + 0.5 * part_term


def _branch_id(out: dict[str, jax.Array], pid: jax.Array, lc: Any) -> jax.Array:
  """ID loss on the BNNeck logits, over the global feature and (if present) the JPM parts."""
  ls = float(lc.label_smoothing)
  parts = id_loss(out['part_logits'], pid[:, None], ls) if 'part_logits' in out else None
  return _global_and_parts(id_loss(out['logits'], pid, ls), parts)


def _branch_triplet(out: dict[str, jax.Array], pid: jax.Array, lc: Any,
                    anchors: Optional[jax.Array] = None) -> jax.Array:
  """Triplet loss on the pre-BN features (or the BNNeck outputs, loss.triplet_feature_input),
  global and (if present) parts. `anchors`: see `triplet_loss`."""
  key = lc.triplet_feature_input
  margin = float(lc.triplet_margin)
  parts = (part_triplet_loss(out[f'part_{key}s'], pid, margin, anchors)
           if 'part_logits' in out else None)
  return _global_and_parts(triplet_loss(out[key], pid, margin, anchors), parts)


def _pid(batch) -> jax.Array:
  return jnp.asarray(batch['pid'], jnp.int32)


@term('student_id', lambda c: c.loss.student_weight * c.loss.id_weight)
def student_id_term(outputs, batch, ctx: Context) -> TermValue:
  s = outputs['student']
  return TermValue(_branch_id(s, _pid(batch), ctx.loss),
                   {'student/accuracy': accuracy(s['logits'], _pid(batch))})


@term('student_triplet', lambda c: c.loss.student_weight * c.loss.triplet_weight)
def student_triplet_term(outputs, batch, ctx: Context) -> TermValue:
  """Anchors and positives: all views, or (loss.student_triplet_views='unoccluded') the views
  the synthesiser left holistic."""
  anchors = (jnp.asarray(batch['pattern']) == 0
             if ctx.loss.student_triplet_views == 'unoccluded' else None)
  return TermValue(_branch_triplet(outputs['student'], _pid(batch), ctx.loss, anchors))


@term('teacher_id', lambda c: c.loss.teacher_weight * c.loss.id_weight, build.has_teacher)
def teacher_id_term(outputs, batch, ctx: Context) -> TermValue:
  t = outputs['teacher']
  return TermValue(_branch_id(t, _pid(batch), ctx.loss),
                   {'teacher/accuracy': accuracy(t['logits'], _pid(batch))})


@term('teacher_triplet', lambda c: c.loss.teacher_weight * c.loss.triplet_weight, build.has_teacher)
def teacher_triplet_term(outputs, batch, ctx: Context) -> TermValue:
  return TermValue(_branch_triplet(outputs['teacher'], _pid(batch), ctx.loss))


@term('kd_feature', lambda c: c.loss.kd_weight, build.has_teacher)
def kd_feature_term(outputs, batch, ctx: Context) -> TermValue:
  """Feature distillation from the purified teacher (global, and with JPM the parts)."""
  del batch
  s, t, lc = outputs['student'], outputs['teacher'], ctx.loss
  key = lc.kd_feature_input
  parts = (kd_feature_loss(s[f'part_{key}s'], t[f'part_{key}s'])
           if 'part_feats' in s and 'part_feats' in t else None)
  return TermValue(_global_and_parts(kd_feature_loss(s[key], t[key]), parts))


@term('kd_logit', lambda c: c.loss.kd_logit_weight, build.has_teacher)
def kd_logit_term(outputs, batch, ctx: Context) -> TermValue:
  del batch
  s, t, temp = outputs['student'], outputs['teacher'], ctx.loss.kd_temperature
  parts = (kd_logit_loss(s['part_logits'], t['part_logits'], temp)
           if 'part_logits' in s and 'part_logits' in t else None)
  return TermValue(_global_and_parts(kd_logit_loss(s['logits'], t['logits'], temp), parts))


@term('pattern', lambda c: c.loss.pattern_weight, build.has_pattern_embed)
def pattern_term(outputs, batch, ctx: Context) -> TermValue:
  del ctx
  logits = outputs['student']['pattern_logits']
  pattern = jnp.asarray(batch['pattern'], jnp.int32)
  return TermValue(pattern_loss(logits, pattern),
                   {'pattern/accuracy': accuracy(logits, pattern)})


@term('occluder_token', lambda c: c.student_erase.weight,
      build.student_erases)
def occluder_token_term(outputs, batch, ctx: Context) -> TermValue:
  del batch, ctx
  s = outputs['student']
  return _token_classifier(s['occluder_logits'], s['occluder_target'], 'occluder/token_accuracy',
                           'occluder/predicted_rate', 'occluder/target_rate')


def _token_classifier(logits: jax.Array, target: jax.Array, accuracy: str, predicted_rate: str,
                      target_rate: str) -> TermValue:
  """A per-token occluder classifier's cross-entropy with its accuracy and rates under the
  given metric names."""
  predicted = _f32(logits) > 0
  return TermValue(occluder_token_loss(logits, target), {
      accuracy: jnp.mean(_f32(predicted == target)),
      predicted_rate: jnp.mean(_f32(predicted)),
      target_rate: jnp.mean(_f32(target))})


@term('agent_consistency', lambda c: c.loss.agent_consistency_weight,
      build.agent_learns_consistency)
def agent_consistency_term(outputs, batch, ctx: Context) -> TermValue:
  """Binary cross-entropy of the agent's logits on the clean image against the tokens that
  the other images of the same identity in the batch leave unexplained
  (`fepm.unexplained_tokens`): a label the P x K batch provides on any dataset. It needs no
  reward, so it runs in every phase of the staged schedule."""
  del batch, ctx
  a = outputs['agent']
  return _token_classifier(a['consistency_scores'], a['consistency_target'],
                           'agent/consistency_accuracy', 'agent/consistency_predicted_rate',
                           'agent/consistency_target_rate')


@term('agent', lambda c: c.loss.agent_weight, build.has_agent)
def agent_term(outputs, batch, ctx: Context) -> TermValue:
  """REINFORCE over the sampled token masks: -(R - b) * log pi(a) per sample, minus the
  entropy bonus; zero while `ctx.agent_on` is 0."""
  del batch
  a, fc = outputs['agent'], ctx.fepm
  reward = agent_reward(a['lp_samples'], a['lp_clean'][None], a['sample_rates'], fc.eta)
  greedy_reward = (agent_reward(a['lp_greedy'], a['lp_clean'], a['greedy_select_rate'], fc.eta)
                   if 'lp_greedy' in a else None)
  baseline = agent_baseline(fc.baseline, reward, greedy_reward=greedy_reward)
  value = reinforce_loss(a['logp'], reward, baseline, a['entropy'], fc.entropy_weight)
  metrics = {'agent/reward': jnp.mean(reward),
             'agent/select_rate': jnp.mean(_f32(a['select_rate'])),
             'agent/mean_prob': jnp.mean(_f32(a['probs'])),
             'agent/logprob_gain': jnp.mean(_f32(a['lp_samples']) - _f32(a['lp_clean'])[None]),
             'agent/baseline': jnp.mean(_f32(baseline)),
             'agent/advantage_std': jnp.std(reward - baseline),
             'agent/greedy_select_rate': jnp.mean(_f32(a['greedy_select_rate'])),
             'agent/entropy': jnp.mean(_f32(a['entropy']))}
  if greedy_reward is not None:
    metrics['agent/greedy_reward'] = jnp.mean(greedy_reward)
  return TermValue(_f32(ctx.agent_on) * value, metrics)
