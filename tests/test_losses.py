"""Losses against small NumPy references, stop-gradient on every teacher side, and the way
total_loss sums the config's named terms."""

import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ogfr_jax import config_defaults
from ogfr_jax import losses
from ogfr_jax import run_config
from helpers import make_config


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _softplus(x):
  return np.log1p(np.exp(x))


# --- ID -------------------------------------------------------------------------------------


@pytest.mark.parametrize('eps', [0.0, 0.1])
def test_id_loss_matches_numpy_with_label_smoothing(eps):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, size=5)
  target = np.full((5, 7), eps / 7)
  target[np.arange(5), labels] += 1 - eps
  expected = -(target * _np_log_softmax(logits)).sum(-1).mean()
  np.testing.assert_allclose(losses.id_loss(logits, labels, eps), expected, rtol=1e-5)
  # Part logits [B, P, C] with labels broadcast over parts = mean of per-part losses.
  parts = rng.normal(size=(5, 3, 7)).astype(np.float32)
  per_part = [losses.id_loss(parts[:, p], labels, eps) for p in range(3)]
  np.testing.assert_allclose(losses.id_loss(parts, labels[:, None], eps), np.mean(per_part),
                             rtol=1e-5)


def test_id_loss_is_float32_for_bfloat16_logits():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.bfloat16)
  out = losses.id_loss(logits, jnp.array([0, 1, 2, 0]), 0.1)
  assert out.dtype == jnp.float32 and np.isfinite(float(out))


# --- triplet ----------------------------------------------------------------------------------


def test_triplet_batch_hard_on_hand_made_distances():
  # Points on a line: ids 0 at x = 0, 1; ids 1 at x = 3, 7.
  feat = np.array([[0.0], [1.0], [3.0], [7.0]], np.float32)
  labels = np.array([0, 0, 1, 1])
  # (hardest positive, hardest negative) per anchor.
  pairs = [(1, 3), (1, 2), (4, 2), (4, 6)]
  soft = np.mean([_softplus(ap - an) for ap, an in pairs])
  hinge = np.mean([max(0.0, ap - an + 0.3) for ap, an in pairs])
  np.testing.assert_allclose(losses.triplet_loss(feat, labels, 0.0), soft, rtol=1e-5)
  np.testing.assert_allclose(losses.triplet_loss(feat, labels, 0.3), hinge, rtol=1e-5)


def test_triplet_matches_brute_force_reference():
  rng = np.random.default_rng(2)
  feat = rng.normal(size=(12, 5)).astype(np.float32)
  labels = np.repeat(np.arange(4), 3)
  dist = np.sqrt(((feat[:, None] - feat[None]) ** 2).sum(-1))
  ref = []
  for i in range(12):
    pos = [dist[i, j] for j in range(12) if labels[j] == labels[i]]
    neg = [dist[i, j] for j in range(12) if labels[j] != labels[i]]
    ref.append(_softplus(max(pos) - min(neg)))
  np.testing.assert_allclose(losses.triplet_loss(feat, labels), np.mean(ref), rtol=1e-4)
  parts = np.stack([feat, feat[::-1] * 2], axis=1)  # [B, 2, D]
  expected = 0.5 * (losses.triplet_loss(parts[:, 0], labels)
                    + losses.triplet_loss(parts[:, 1], labels))
  np.testing.assert_allclose(losses.part_triplet_loss(parts, labels), expected, rtol=1e-5)


def test_triplet_anchor_subset_matches_brute_force_reference():
  rng = np.random.default_rng(3)
  feat = rng.normal(size=(12, 5)).astype(np.float32)
  labels = np.repeat(np.arange(4), 3)
  anchors = np.array([1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0], bool)  # id 3: no anchor at all
  dist = np.sqrt(((feat[:, None] - feat[None]) ** 2).sum(-1))
  ref = []
  for i in np.flatnonzero(anchors):
    pos = [dist[i, j] for j in range(12) if labels[j] == labels[i] and anchors[j]]
    neg = [dist[i, j] for j in range(12) if labels[j] != labels[i]]  # every view
    ref.append(_softplus(max(pos) - min(neg)))
  np.testing.assert_allclose(losses.triplet_loss(feat, labels, 0.0, jnp.asarray(anchors)),
                             np.mean(ref), rtol=1e-4)
  everyone = jnp.ones(12, bool)
  np.testing.assert_allclose(losses.triplet_loss(feat, labels, 0.0, everyone),
                             losses.triplet_loss(feat, labels), rtol=1e-6)
  # A view outside the subset moved far from its identity changes nothing; inside, it does.
  far = feat.copy()
  far[1] += 50.0
  np.testing.assert_allclose(losses.triplet_loss(far, labels, 0.0, jnp.asarray(anchors)),
                             np.mean(ref), rtol=1e-4)
  assert float(losses.triplet_loss(far, labels)) > float(losses.triplet_loss(feat, labels)) + 5
  grad = jax.grad(losses.triplet_loss)(jnp.asarray(feat), labels, 0.0, jnp.zeros(12, bool))
  assert float(losses.triplet_loss(feat, labels, 0.0, jnp.zeros(12, bool))) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_triplet_edge_cases_have_finite_gradients():
  # Duplicate features (distance exactly 0) and a batch with a single identity.
  feat = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  labels = jnp.array([0, 1, 1, 0])
  grad = jax.grad(losses.triplet_loss)(feat, labels)
  assert np.all(np.isfinite(np.asarray(grad)))
  one_id = jnp.zeros(4, jnp.int32)
  assert float(losses.triplet_loss(feat, one_id)) == 0.0  # no negatives: nothing to rank
  assert np.all(np.isfinite(np.asarray(jax.grad(losses.triplet_loss)(feat, one_id))))


# --- distillation -----------------------------------------------------------------------------


def test_kd_feature_loss_and_teacher_stop_gradient():
  s = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
  t = np.array([[0.0, 2.0], [2.0, 2.0]], np.float32)  # orthogonal, then parallel
  np.testing.assert_allclose(losses.kd_feature_loss(s, t), (1.0 + 0.0) / 2, rtol=1e-6)
  g_t = jax.grad(lambda tt: losses.kd_feature_loss(s, tt))(jnp.asarray(t))
  g_s = jax.grad(lambda ss: losses.kd_feature_loss(ss, t))(jnp.asarray(s))
  np.testing.assert_array_equal(g_t, 0.0)
  assert np.abs(np.asarray(g_s)).sum() > 0


def test_kd_logit_loss_is_scaled_kl_with_teacher_constant():
  rng = np.random.default_rng(3)
  s = rng.normal(size=(4, 6)).astype(np.float32)
  t = rng.normal(size=(4, 6)).astype(np.float32)
  temp = 3.0
  pt = np.exp(_np_log_softmax(t / temp))
  kl = (pt * (_np_log_softmax(t / temp) - _np_log_softmax(s / temp))).sum(-1).mean()
  np.testing.assert_allclose(losses.kd_logit_loss(s, t, temp), kl * temp ** 2, rtol=1e-5)
  np.testing.assert_allclose(losses.kd_logit_loss(t, t, temp), 0.0, atol=1e-6)
  g_t = jax.grad(lambda tt: losses.kd_logit_loss(s, tt, temp))(jnp.asarray(t))
  np.testing.assert_array_equal(g_t, 0.0)
  # d/ds of T^2 KL = T (softmax(s/T) - softmax(t/T)) / B.
  g_s = jax.grad(lambda ss: losses.kd_logit_loss(ss, t, temp))(jnp.asarray(s))
  ps = np.exp(_np_log_softmax(s / temp))
  np.testing.assert_allclose(g_s, temp * (ps - pt) / 4, rtol=1e-4, atol=1e-7)


def test_pattern_loss_is_cross_entropy():
  logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]], np.float32)
  expected = -np.mean([_np_log_softmax(logits)[0, 0], _np_log_softmax(logits)[1, 1]])
  np.testing.assert_allclose(losses.pattern_loss(logits, np.array([0, 1])), expected, rtol=1e-6)


def test_occluder_token_loss_is_binary_cross_entropy():
  logits = np.array([[3.0, -1.0, 0.0], [-4.0, 2.0, 0.5]], np.float32)
  target = np.array([[True, False, True], [False, False, True]])
  p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
  expected = -np.mean(np.where(target, np.log(p), np.log(1.0 - p)))
  np.testing.assert_allclose(losses.occluder_token_loss(logits, target), expected, rtol=1e-6)


def test_total_loss_adds_the_weighted_occluder_token_term():
  rng = np.random.default_rng(8)
  out, batch, c = _outputs(rng), _batch(rng), make_config(LOSS)
  total, m = total_loss(out, batch, c)
  assert 'loss/occluder_token' not in m
  logits = rng.normal(size=(len(batch['pid']), 6)).astype(np.float32)
  target = rng.random((len(batch['pid']), 6)) < 0.3
  out['student'] = dict(out['student'], occluder_logits=logits, occluder_target=target)
  config_defaults.extend(c, 'student_erase')
  c.student_erase.weight, c.student_erase.enabled = 0.7, True
  total_tok, m_tok = total_loss(out, batch, c)
  term = losses.occluder_token_loss(logits, target)
  np.testing.assert_allclose(m_tok['loss/occluder_token'], term, rtol=1e-6)
  np.testing.assert_allclose(total_tok, total + 0.7 * term, rtol=1e-5)
  np.testing.assert_allclose(m_tok['occluder/target_rate'], target.mean(), rtol=1e-6)
  np.testing.assert_allclose(m_tok['occluder/token_accuracy'],
                             ((logits > 0) == target).mean(), rtol=1e-6)


# --- agent ------------------------------------------------------------------------------------


def test_reward_baselines_and_reinforce_value():
  lp_s, lp_c = np.array([-1.0, -2.0]), np.array([-1.5, -1.0])
  rate = np.array([0.2, 0.5])
  reward = losses.agent_reward(lp_s, lp_c, rate, eta=0.1)
  np.testing.assert_allclose(reward, [0.5 - 0.02, -1.0 - 0.05], rtol=1e-6)
  greedy = np.array([0.1, -0.3])
  b = losses.agent_baseline('self_critical', reward, greedy_reward=greedy)
  np.testing.assert_allclose(b, greedy)
  with pytest.raises(ValueError, match='self_critical'):
    losses.agent_baseline('self_critical', reward)
  with pytest.raises(ValueError, match='fepm.num_samples'):
    losses.agent_baseline('leave_one_out', reward)  # one action per image: nothing to leave
  with pytest.raises(ValueError, match='fepm.baseline'):
    losses.agent_baseline('critic', reward)
  logp, ent = np.array([-3.0, -4.0]), np.array([2.0, 1.0])
  val = losses.reinforce_loss(logp, reward, 0.7, ent, 0.01)
  np.testing.assert_allclose(val, -np.mean((np.asarray(reward) - 0.7) * logp) - 0.01 * 1.5,
                             rtol=1e-6)
  # Reward and baseline are constants for differentiation.
  g_r = jax.grad(lambda r: losses.reinforce_loss(logp, r, 0.0, ent, 0.0))(jnp.asarray(reward))
  g_b = jax.grad(lambda bb: losses.reinforce_loss(logp, reward, bb, ent, 0.0))(0.3)
  np.testing.assert_array_equal(g_r, 0.0)
  assert float(g_b) == 0.0


# --- the assembled objective ------------------------------------------------------------------

B, C, D, K1, N, S = 8, 4, 6, 5, 10, 2


def _outputs(rng, *, teacher=True, agent=True, parts=False, pattern=True, samples=S):
  def branch():
    o = {'feat': rng.normal(size=(B, D)), 'bn_feat': rng.normal(size=(B, D)),
         'logits': rng.normal(size=(B, C))}
    if parts:
      o.update(part_feats=rng.normal(size=(B, 2, D)), part_bn_feats=rng.normal(size=(B, 2, D)),
               part_logits=rng.normal(size=(B, 2, C)))
    return o

  out = {'student': branch()}
  if pattern:
    out['student']['pattern_logits'] = rng.normal(size=(B, K1))
  if teacher:
    out['teacher'] = branch()
  if teacher and agent:
    lp_samples = -rng.random((samples, B))
    rates = rng.random((samples, B))
    out['agent'] = {
        'mask': rng.random((B, N)) < 0.3, 'select_rate': rates[0],
        'lp_sampled': lp_samples[0], 'lp_clean': -rng.random(B), 'lp_samples': lp_samples,
        'sample_rates': rates, 'logp': -5 * rng.random((samples, B)),
        'entropy': rng.random(B) * 3, 'probs': rng.random((B, N)) * 0.5,
        'greedy_mask': rng.random((B, N)) < 0.2, 'greedy_select_rate': rng.random(B),
        'lp_greedy': -rng.random(B), 'consistency_scores': rng.normal(size=(B, N)),
        'consistency_target': rng.random((B, N)) < 0.1}
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32)
                                if x.dtype != bool else jnp.asarray(x), out)


def total_loss(outputs, batch, config, agent_on=1.0):
  """losses.total_loss under jit (one compilation instead of hundreds of eager ones)."""
  # A copy: FrozenConfigDict hashes through the ConfigDict it wraps, and the tests edit theirs.
  return _jit_total_loss(outputs, batch, ml_collections.FrozenConfigDict(copy.deepcopy(config)),
                         jnp.float32(agent_on))


_jit_total_loss = jax.jit(lambda o, b, c, on: losses.total_loss(o, b, c, agent_on=on),
                          static_argnums=2)


def _batch(rng):
  return {'pid': jnp.asarray(np.repeat(np.arange(B // 2), 2), jnp.int32),
          'pattern': jnp.asarray(rng.integers(0, K1, B), jnp.int32)}


# Distinct weights, so that a term scaled by another's weight shows.
LOSS = {'loss.id_weight': 1.3, 'loss.triplet_weight': 0.7, 'loss.kd_weight': 0.5,
        'loss.kd_logit_weight': 0.25, 'loss.pattern_weight': 0.1, 'loss.agent_weight': 2.0,
        'loss.teacher_weight': 0.9, 'loss.student_weight': 1.1, 'loss.label_smoothing': 0.1}


def test_active_terms_come_from_the_config():
  c = make_config(LOSS)
  assert set(losses.active_terms(c)) == {
      'student_id', 'student_triplet', 'teacher_id', 'teacher_triplet', 'kd_feature',
      'kd_logit', 'pattern', 'agent', 'agent_consistency'}
  lc = c.loss
  assert losses.active_terms(c)['teacher_triplet'] == pytest.approx(
      lc.teacher_weight * lc.triplet_weight)
  c.loss.agent_consistency_weight = 0.0
  assert 'agent_consistency' not in losses.active_terms(c) and 'agent' in losses.active_terms(c)
  c.loss.agent_consistency_weight = 1.0
  c.fepm.selection = 'random'
  assert not {'agent', 'agent_consistency'} & set(losses.active_terms(c))
  c.fepm.selection = 'agent'
  c.fepm.enabled = False
  assert 'agent' not in losses.active_terms(c) and 'teacher_id' in losses.active_terms(c)
  c.model.teacher = False
  assert set(losses.active_terms(c)) == {'student_id', 'student_triplet', 'pattern'}
  c.model.pattern_embed = False
  config_defaults.extend(c, 'student_erase').student_erase.enabled = True
  assert set(losses.active_terms(c)) == {'student_id', 'student_triplet', 'occluder_token'}


def test_total_is_the_weighted_sum_of_its_terms():
  rng = np.random.default_rng(4)
  out, batch, c = _outputs(rng), _batch(rng), make_config(LOSS)
  total, m = total_loss(out, batch, c)
  expected = sum(w * m[f'loss/{name}'] for name, w in losses.active_terms(c).items())
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  np.testing.assert_allclose(m['loss/total'], total)
  a = out['agent']
  np.testing.assert_allclose(
      m['loss/agent_consistency'],
      losses.occluder_token_loss(a['consistency_scores'], a['consistency_target']), rtol=1e-6)
  np.testing.assert_allclose(m['agent/consistency_target_rate'],
                             np.mean(np.asarray(a['consistency_target'])), rtol=1e-6)
  assert all(v.shape == () and v.dtype == jnp.float32 for v in m.values())
  assert 0.0 <= float(m['pattern/accuracy']) <= 1.0


def test_a_term_whose_model_part_is_missing_fails_loudly():
  rng = np.random.default_rng(5)
  # The config trains with a teacher, the outputs have none: an error, not a silent skip.
  with pytest.raises(KeyError, match='teacher'):
    losses.total_loss(_outputs(rng, teacher=False), _batch(rng), make_config(LOSS))


def test_student_and_teacher_id_terms():
  rng = np.random.default_rng(12)
  out, batch, c = _outputs(rng), _batch(rng), make_config(LOSS)
  ctx = losses.Context(c.loss, c.fepm)
  pid = batch['pid']
  v = losses.student_id_term(out, batch, ctx)
  np.testing.assert_allclose(v.value, losses.id_loss(out['student']['logits'], pid, 0.1),
                             rtol=1e-6)
  np.testing.assert_allclose(v.metrics['student/accuracy'],
                             losses.accuracy(out['student']['logits'], pid))
  v = losses.teacher_id_term(out, batch, ctx)
  np.testing.assert_allclose(v.value, losses.id_loss(out['teacher']['logits'], pid, 0.1),
                             rtol=1e-6)


def test_kd_feature_term_reads_the_configured_feature():
  rng = np.random.default_rng(13)
  out, batch, c = _outputs(rng), _batch(rng), make_config(LOSS)
  s, t = out['student'], out['teacher']
  ctx = losses.Context(c.loss, c.fepm)
  bn = losses.kd_feature_term(out, batch, ctx).value
  np.testing.assert_allclose(bn, losses.kd_feature_loss(s['bn_feat'], t['bn_feat']), rtol=1e-6)
  c.loss.kd_feature_input = 'feat'
  pre = losses.kd_feature_term(out, batch, losses.Context(c.loss, c.fepm)).value
  np.testing.assert_allclose(pre, losses.kd_feature_loss(s['feat'], t['feat']), rtol=1e-6)
  assert abs(float(pre) - float(bn)) > 1e-6


def test_pattern_term():
  rng = np.random.default_rng(14)
  out, batch, c = _outputs(rng), _batch(rng), make_config(LOSS)
  v = losses.pattern_term(out, batch, losses.Context(c.loss, c.fepm))
  np.testing.assert_allclose(v.value, losses.pattern_loss(out['student']['pattern_logits'],
                                                          batch['pattern']), rtol=1e-6)


def test_agent_term_self_critical():
  rng = np.random.default_rng(15)
  out, batch, c = _outputs(rng, samples=1), _batch(rng), make_config(LOSS)
  c.fepm.baseline = 'self_critical'
  c.fepm.num_samples = 1
  a = out['agent']
  v = losses.agent_term(out, batch, losses.Context(c.loss, c.fepm))
  reward = losses.agent_reward(a['lp_samples'], a['lp_clean'][None], a['sample_rates'],
                               c.fepm.eta)
  greedy = losses.agent_reward(a['lp_greedy'], a['lp_clean'], a['greedy_select_rate'],
                               c.fepm.eta)
  np.testing.assert_allclose(
      v.value, losses.reinforce_loss(a['logp'], reward, greedy, a['entropy'],
                                     c.fepm.entropy_weight), rtol=1e-6)
  np.testing.assert_allclose(v.metrics['agent/reward'], np.mean(reward), rtol=1e-6)
  np.testing.assert_allclose(v.metrics['agent/baseline'], np.mean(greedy), rtol=1e-6)
  np.testing.assert_allclose(v.metrics['agent/greedy_reward'], np.mean(greedy), rtol=1e-6)
  # Off (teacher warm-up): no loss, the metrics still logged.
  off = losses.agent_term(out, batch, losses.Context(c.loss, c.fepm, 0.0))
  assert float(off.value) == 0.0 and float(v.value) != 0.0
  np.testing.assert_allclose(off.metrics['agent/reward'], v.metrics['agent/reward'])


def test_agent_term_leave_one_out():
  rng = np.random.default_rng(16)
  out, batch, c = _outputs(rng, samples=3), _batch(rng), make_config(LOSS)
  # The model runs no greedy reward pass for this baseline.
  out['agent'] = a = {k: v for k, v in out['agent'].items() if k != 'lp_greedy'}
  c.fepm.baseline = 'leave_one_out'
  c.fepm.num_samples = 3
  v = losses.agent_term(out, batch, losses.Context(c.loss, c.fepm))
  r = np.asarray(losses.agent_reward(a['lp_samples'], a['lp_clean'][None], a['sample_rates'],
                                     c.fepm.eta), np.float64)
  loo = np.stack([(r.sum(0) - r[i]) / 2 for i in range(3)])
  expected = (-np.mean((r - loo) * np.asarray(a['logp'], np.float64))
              - c.fepm.entropy_weight * np.mean(np.asarray(a['entropy'], np.float64)))
  np.testing.assert_allclose(v.value, expected, rtol=1e-5)
  np.testing.assert_allclose(v.metrics['agent/baseline'], np.mean(loo), rtol=1e-5)
  assert 'agent/greedy_reward' not in v.metrics


def test_total_loss_ablations():
  rng = np.random.default_rng(5)
  batch = _batch(rng)
  # Student only (ViT baseline): no teacher, KD or agent terms.
  c = make_config(LOSS)
  c.model.teacher = False
  total, m = total_loss(_outputs(rng, teacher=False), batch, c)
  assert not any(k.startswith(('loss/teacher', 'loss/kd', 'loss/agent', 'agent/')) for k in m)
  lc = c.loss
  np.testing.assert_allclose(
      total, lc.student_weight * (lc.id_weight * m['loss/student_id']
                                  + lc.triplet_weight * m['loss/student_triplet'])
      + lc.pattern_weight * m['loss/pattern'], rtol=1e-6)
  # FEPM off: teacher without agent.
  c = make_config(LOSS)
  c.fepm.enabled = False
  _, m = total_loss(_outputs(rng, agent=False), batch, c)
  assert 'loss/teacher_id' in m and 'loss/agent' not in m and 'agent/reward' not in m
  # No pattern embeddings: no pattern term.
  c = make_config(LOSS)
  c.model.pattern_embed = False
  _, m = total_loss(_outputs(rng, pattern=False), batch, c)
  assert 'loss/pattern' not in m


def test_total_loss_parts():
  rng = np.random.default_rng(6)
  out, batch = _outputs(rng, parts=True), _batch(rng)
  c = make_config(LOSS)
  total, m = total_loss(out, batch, c)
  s, t = out['student'], out['teacher']
  pid = batch['pid']
  expected_id = 0.5 * losses.id_loss(s['logits'], pid, 0.1) + 0.5 * losses.id_loss(
      s['part_logits'], pid[:, None], 0.1)
  np.testing.assert_allclose(m['loss/student_id'], expected_id, rtol=1e-6)
  expected_kd = 0.5 * losses.kd_logit_loss(s['logits'], t['logits'], 4.0) + 0.5 * (
      losses.kd_logit_loss(s['part_logits'], t['part_logits'], 4.0))
  np.testing.assert_allclose(m['loss/kd_logit'], expected_kd, rtol=1e-6)
  expected_feat = 0.5 * losses.kd_feature_loss(s['bn_feat'], t['bn_feat']) + 0.5 * (
      losses.kd_feature_loss(s['part_bn_feats'], t['part_bn_feats']))
  np.testing.assert_allclose(m['loss/kd_feature'], expected_feat, rtol=1e-6)
  assert np.isfinite(float(total))


@pytest.mark.parametrize('parts', [False, True])
def test_triplet_reads_the_configured_feature(parts):
  rng = np.random.default_rng(7)
  out, batch = _outputs(rng, parts=parts), _batch(rng)
  s, t, pid = out['student'], out['teacher'], batch['pid']
  expected = {}
  for key in ('feat', 'bn_feat'):
    glob = losses.triplet_loss(s[key], pid)
    expected[key] = (0.5 * glob + 0.5 * losses.part_triplet_loss(s[f'part_{key}s'], pid)
                     if parts else glob)
  c = make_config(LOSS)
  _, m_default = total_loss(out, batch, c)
  np.testing.assert_allclose(m_default['loss/student_triplet'], expected['feat'], rtol=1e-6)
  c.loss.triplet_feature_input = 'bn_feat'
  _, m_bn = total_loss(out, batch, c)
  np.testing.assert_allclose(m_bn['loss/student_triplet'], expected['bn_feat'], rtol=1e-6)
  t_glob = losses.triplet_loss(t['bn_feat'], pid)
  if not parts:
    np.testing.assert_allclose(m_bn['loss/teacher_triplet'], t_glob, rtol=1e-6)
  assert abs(float(expected['feat']) - float(expected['bn_feat'])) > 1e-4
  c.loss.triplet_feature_input = 'logits'
  with pytest.raises(ValueError, match='loss.triplet_feature_input'):
    run_config.validate(c)


@pytest.mark.parametrize('parts', [False, True])
def test_student_triplet_on_unoccluded_views(parts):
  rng = np.random.default_rng(11)
  out, batch = _outputs(rng, parts=parts), _batch(rng)
  batch['pattern'] = jnp.asarray(np.arange(B) % K1, jnp.int32)
  s, pid = out['student'], batch['pid']
  unoccluded = batch['pattern'] == 0
  glob = losses.triplet_loss(s['feat'], pid, 0.0, unoccluded)
  expected = (0.5 * glob + 0.5 * losses.part_triplet_loss(s['part_feats'], pid, 0.0, unoccluded)
              if parts else glob)
  c = make_config(LOSS)
  _, m_all = total_loss(out, batch, c)
  c.loss.student_triplet_views = 'unoccluded'
  run_config.validate(c)
  _, m = total_loss(out, batch, c)
  np.testing.assert_allclose(m['loss/student_triplet'], expected, rtol=1e-6)
  assert abs(float(m['loss/student_triplet']) - float(m_all['loss/student_triplet'])) > 1e-4
  # The teacher sees holistic images: its triplet keeps every view.
  np.testing.assert_allclose(m['loss/teacher_triplet'], m_all['loss/teacher_triplet'])
  c.loss.student_triplet_views = 'clean'
  with pytest.raises(ValueError, match='loss.student_triplet_views'):
    run_config.validate(c)


def test_total_loss_gradients_never_reach_the_teacher_through_kd():
  rng = np.random.default_rng(7)
  out, batch = _outputs(rng), _batch(rng)
  # Leave only the KD terms touching the teacher outputs.
  c = make_config({**LOSS, 'loss.teacher_weight': 0.0})

  def f(teacher):
    o = dict(out, teacher=teacher)
    return losses.total_loss(o, batch, c)[0]

  grads = jax.grad(f)(out['teacher'])
  for key in ('feat', 'logits'):
    np.testing.assert_array_equal(grads[key], 0.0)
