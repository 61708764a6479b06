"""OGFR models: shapes for every variant, token grid, position-embedding resampling, token
replacement, the reward passes, gradient routing to the agent, bfloat16.

Compile budget (the slow part on CPU): shapes use jax.eval_shape (tracing only); numerical checks
share two jitted functions (one float32 and one bfloat16 "step") and one jitted extract, built
once per module with XLA's cheaper CPU optimisation level.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ogfr_jax import config_defaults
from ogfr_jax import config_schema
from ogfr_jax import losses
from ogfr_jax.models import fepm
from ogfr_jax.models import build as build_lib
from ogfr_jax.models import ogfr
from ogfr_jax.models import vit
from helpers import H, W, make_config

B = 8
NUM_CLASSES, NUM_CAMERAS = 4, 3
# The student_erase section, off unless a variant turns it on.
ERASE = ('student_erase',)
FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'image': jnp.asarray(rng.normal(size=(B, H, W, 3)), jnp.float32),
      'occluded': jnp.asarray(rng.normal(size=(B, H, W, 3)), jnp.float32),
      'camid': jnp.asarray(np.arange(B) % NUM_CAMERAS, jnp.int32),
      'pattern': jnp.asarray(np.arange(B) % 5, jnp.int32),
      'pid': jnp.asarray(np.repeat(np.arange(B // 2), 2), jnp.int32),
  }


def build(config):
  return build_lib.build_model(config, NUM_CLASSES, NUM_CAMERAS)


RNGS = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1),
        'agent': jax.random.PRNGKey(2)}


def fast_jit(fn, *args):
  return jax.jit(fn).lower(*args).compile(FAST)


# --- geometry -------------------------------------------------------------------------------


def test_token_grid_for_overlapping_strides():
  assert build_lib.token_grid(make_config(preset='tiny', extend=ERASE)) == (5, 2)
  c = config_defaults.base_config()
  assert build_lib.token_grid(c) == (21, 10)  # 256x128, patch 16, stride 12 (TransReID)
  c.model.stride = 11
  assert build_lib.token_grid(c) == (22, 11)
  c.model.stride = 16
  assert build_lib.token_grid(c) == (16, 8)
  with pytest.raises(ValueError, match='input.height'):
    vit.patch_grid(8, 16, 16, 12)


def test_fepm_layer_resolution_and_errors():
  c = make_config({'fepm.layer': -1}, preset='tiny', extend=ERASE)  # tiny depth 2
  assert build_lib.fepm_layer(c) == 1
  c.fepm.layer = 0
  assert build_lib.fepm_layer(c) == 0
  for bad in (2, -3):
    c.fepm.layer = bad
    with pytest.raises(ValueError, match='fepm.layer'):
      config_schema.validate(c)


def test_resize_pos_embed():
  # Bilinear resampling without antialiasing: each output is two weighted taps per axis,
  # one axis after the other, with weights computed in float32; each stage is within a few
  # eps_32 of exact. 16 eps_32 x max |x| bounds both stages with room.
  def tol(x):
    return 16 * 2.0 ** -24 * float(np.abs(x).max())

  rng = np.random.default_rng(0)
  pe = rng.normal(size=(1, 1 + 5 * 2, 8)).astype(np.float32)
  np.testing.assert_allclose(vit.resize_pos_embed(pe, (5, 2), (5, 2)), pe, atol=tol(pe), rtol=0)
  out = vit.resize_pos_embed(pe, (5, 2), (7, 3))
  assert out.shape == (1, 1 + 21, 8)
  np.testing.assert_array_equal(out[:, 0], pe[:, 0])  # CLS untouched
  # A constant grid stays constant, and a grid without CLS is accepted.
  const = np.full((5 * 2, 4), 0.25, np.float32)
  np.testing.assert_allclose(vit.resize_pos_embed(const, (5, 2), (3, 4)), 0.25,
                             atol=tol(const), rtol=0)
  # Upsampling by 2 with half-pixel centres: interior samples are the means of neighbours.
  ramp = np.arange(4, dtype=np.float32).reshape(4, 1) * np.ones((1, 1), np.float32)
  up = np.asarray(vit.resize_pos_embed(ramp, (4, 1), (8, 1)))[:, 0]
  np.testing.assert_allclose(up[1:-1], [0.25, 0.75, 1.25, 1.75, 2.25, 2.75], atol=tol(ramp),
                             rtol=0)
  with pytest.raises(ValueError, match='fits neither'):
    vit.resize_pos_embed(pe, (4, 2), (5, 2))


def test_shift_and_shuffle_is_a_permutation_with_padding():
  x = jnp.arange(10, dtype=jnp.float32).reshape(1, 10, 1)
  y = np.asarray(vit.shift_and_shuffle(x, 3, 2))[0, :, 0]
  # Rotate by 3: 3..9,0,1,2; two groups of five read column-wise.
  np.testing.assert_array_equal(y, [3, 8, 4, 9, 5, 0, 6, 1, 7, 2])
  y = np.asarray(vit.shift_and_shuffle(x[:, :9], 0, 2))[0, :, 0]  # 9 -> padded to 10
  np.testing.assert_array_equal(y, [0, 5, 1, 6, 2, 7, 3, 8, 4, 8])


# --- token replacement and selection ----------------------------------------------------------


def test_replacement_leaves_unselected_tokens_untouched():
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.normal(size=(3, 1 + 6, 4)), jnp.float32)
  pos = jnp.asarray(rng.normal(size=(1, 6, 4)), jnp.float32)
  mask = jnp.asarray(rng.random((3, 6)) < 0.5)
  module = fepm.TokenReplacement()
  variables = module.init(jax.random.PRNGKey(0), tokens, mask, pos)
  replacement = variables['params']['replace_token']
  nothing = module.apply(variables, tokens, jnp.zeros_like(mask), pos)
  np.testing.assert_array_equal(nothing, tokens)  # the all-false pass is the identity
  out = np.asarray(module.apply(variables, tokens, mask, pos))
  keep = ~np.asarray(mask)
  np.testing.assert_array_equal(out[:, 0], np.asarray(tokens)[:, 0])  # CLS never replaced
  np.testing.assert_array_equal(out[:, 1:][keep], np.asarray(nothing)[:, 1:][keep])
  expected = np.broadcast_to(np.asarray(replacement + pos), out[:, 1:].shape)
  # The same single float32 addition, correctly rounded on any machine: equal bits.
  np.testing.assert_array_equal(out[:, 1:][~keep], expected[~keep])
  assert mask.any() and (~mask).any()


def test_selection_policies_static_shapes_and_counts():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 10)), jnp.float32)
  key = jax.random.PRNGKey(3)
  bounds = (0.02, 0.6)
  # The greedy threshold of a share: the round(0.1 x 40) = 4th best score of the batch.
  threshold = fepm.top_share_threshold(logits, 0.1)
  assert float(threshold) == np.sort(np.asarray(logits).ravel())[-4]
  greedy = fepm.select(logits, key=None, threshold=threshold, bounds=bounds)
  assert greedy.mask.shape == (4, 10) and greedy.mask.dtype == jnp.bool_
  np.testing.assert_array_equal(greedy.mask, logits >= threshold)
  np.testing.assert_array_equal(greedy.greedy_mask, greedy.mask)
  assert int(greedy.mask.sum()) == 4
  np.testing.assert_array_equal(greedy.log_prob,
                                fepm.bernoulli_log_prob(logits, greedy.mask, bounds))
  sampled = fepm.select(logits, key=key, threshold=threshold, bounds=bounds)
  np.testing.assert_array_equal(sampled.mask, fepm.bernoulli_sample(key, logits, bounds))
  np.testing.assert_array_equal(sampled.greedy_mask, greedy.mask)
  np.testing.assert_array_equal(sampled.log_prob,
                                fepm.bernoulli_log_prob(logits, sampled.mask, bounds))
  assert sampled.log_prob.shape == sampled.entropy.shape == (4,)
  rand = fepm.random_mask(key, (4, 10), 2)
  np.testing.assert_array_equal(rand.sum(-1), 2)
  assert fepm.num_selected(0.1, 210) == 21
  with pytest.raises(ValueError, match='fepm.random_fraction'):
    fepm.num_selected(0.01, 10)


# --- shapes of every variant (tracing only) -------------------------------------------------

VARIANTS = {
    'default': {},
    'jpm': {'model.jpm': True},
    'no_teacher': {'model.teacher': False},
    'fepm_off': {'fepm.enabled': False},
    'random': {'fepm.selection': 'random'},
    'jpm_last_layer': {'model.jpm': True, 'fepm.layer': -1, 'model.pattern_dropout': 0.5},
    'no_pattern_no_sie': {'model.pattern_embed': False, 'model.sie': False},
    'oracle': {'fepm.selection': 'oracle'},
    'self_critical': {'fepm.baseline': 'self_critical', 'fepm.num_samples': 1},
    'leave_one_out_three': {'fepm.num_samples': 3, 'fepm.prob_bounds': (0.05, 0.9)},
    'no_consistency': {'loss.agent_consistency_weight': 0.0},
    'consistency_memory': {'fepm.consistency_memory': 2, 'fepm.consistency_block': -1},
    'student_erase_jpm': {'student_erase.enabled': True, 'student_erase.layer': 2,
                          'model.jpm': True},
    'student_erase_separate': {'student_erase.enabled': True, 'student_erase.layer': 1,
                               'student_erase.detector': 'separate'},
}


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_output_shapes(name):
  config = make_config(VARIANTS[name], preset='tiny', extend=ERASE)
  model = build(config)
  batch = make_batch()
  batch['occ_mask'] = jnp.zeros((B, H, W), jnp.uint8)
  batch['contam_mask'] = jnp.zeros((B, H, W), jnp.uint8)
  batch['index'] = jnp.arange(B, dtype=jnp.int32)
  d, n, k1, p = 64, 10, 5, vit.JPM_PARTS

  def train_fwd():
    variables = model.init(RNGS, batch, train=False)
    out, updates = model.apply(variables, batch, train=True, rngs=RNGS, mutable=['batch_stats'])
    loss, metrics = losses.total_loss(out, batch, config)
    return variables, out, loss, metrics

  variables, out, loss, metrics = jax.eval_shape(train_fwd)
  params = variables['params']
  m = config.model
  teacher = m.teacher
  expected_top = {'student_head', 'student_vit'}
  if teacher:
    expected_top |= {'teacher_head', 'teacher_vit'}
  if m.jpm:
    expected_top |= {'student_part_head'} | ({'teacher_part_head'} if teacher else set())
  if m.pattern_embed:
    expected_top |= {'pattern_embed', 'pattern_head'}
  if teacher and config.fepm.enabled:
    expected_top |= {'fepm'} | ({'agent'} if config.fepm.selection == 'agent' else set())
  erase = config.student_erase
  if erase.enabled:
    expected_top |= {'student_erase', 'occluder_head'}
    if erase.detector == 'separate':
      expected_top |= {'occluder_vit'}
      # The student's patch embedding and first block, nothing after them.
      assert set(params['occluder_vit']) == {'patch_embed', 'cls_token', 'pos_embed',
                                             'sie_embed', 'blocks_0'}
  assert set(params) == expected_top
  assert set(build_lib.backbone_names(config)) <= set(params)

  branches = ['student'] + (['teacher'] if teacher else [])
  for branch in branches:
    o = out[branch]
    assert o['feat'].shape == (B, d) and o['bn_feat'].shape == (B, d)
    assert o['logits'].shape == (B, NUM_CLASSES)
    if m.jpm:
      assert o['part_feats'].shape == (B, p, d)
      assert o['part_logits'].shape == (B, p, NUM_CLASSES)
    else:
      assert 'part_feats' not in o
  assert ('occluder_logits' in out['student']) == erase.enabled
  assert ('loss/occluder_token' in metrics) == erase.enabled
  if erase.enabled:
    assert out['student']['occluder_logits'].shape == (B, n)
    assert out['student']['occluder_target'].shape == (B, n)
  assert ('pattern_logits' in out['student']) == m.pattern_embed
  if m.pattern_embed:
    assert out['student']['pattern_logits'].shape == (B, k1)
  assert ('agent' in out) == (teacher and config.fepm.enabled)
  if 'agent' in out:
    a = out['agent']
    assert a['mask'].shape == (B, n) and a['mask'].dtype == jnp.bool_
    for key in ('lp_sampled', 'lp_clean', 'select_rate'):
      if config.fepm.selection != 'oracle':
        assert a[key].shape == (B,)
    learned = config.fepm.selection == 'agent'
    assert ('logp' in a) == learned and ('loss/agent' in metrics) == learned
    if learned:
      s = config.fepm.num_samples
      assert a['logp'].shape == a['lp_samples'].shape == a['sample_rates'].shape == (s, B)
      assert a['entropy'].shape == (B,)
      # The greedy action's reward pass runs only for the self-critical baseline.
      assert ('lp_greedy' in a) == (config.fepm.baseline == 'self_critical')
      if 'lp_greedy' in a:
        assert a['lp_greedy'].shape == (B,)
      assert a['greedy_mask'].shape == (B, n) and a['probs'].shape == (B, n)
    consistency = build_lib.agent_learns_consistency(config)
    assert ('consistency_target' in a) == consistency
    assert ('loss/agent_consistency' in metrics) == consistency
    if consistency:
      assert a['consistency_scores'].shape == a['consistency_target'].shape == (B, n)
  memory = config.fepm.consistency_memory if build_lib.agent_learns_consistency(config) else 0
  assert ('index' in build_lib.batch_keys(config)) == bool(memory)
  if memory:
    stats = variables['batch_stats']['teacher_branch']
    assert stats['consistency_memory'].shape == (NUM_CLASSES, memory, n, d)
  assert loss.shape == ()
  assert all(v.shape == () for v in metrics.values())
  assert ('loss/teacher_id' in metrics) == teacher

  feat = jax.eval_shape(
      lambda v: model.apply(v, batch['image'], batch['camid'], method=ogfr.OGFR.extract),
      variables)
  assert feat.shape == (B, d * (1 + p) if m.jpm else d) and feat.dtype == jnp.float32
  if teacher and config.fepm.enabled:
    sel = jax.eval_shape(lambda v: model.apply(v, batch['image'], batch['camid'],
                                               batch['contam_mask'],
                                               method=ogfr.OGFR.teacher_selection), variables)
    assert sel['mask'].shape == (B, n) and sel['scores'].shape == (B, n)


def test_bad_config_values_name_the_field():
  batch = make_batch()
  for key, value, field in [('model.size', 'huge', 'model.size'),
                            ('model.dtype', 'float16', 'model.dtype'),
                            ('model.kernels', 'gpu', 'model.kernels'),
                            ('fepm.selection', 'greedy', 'fepm.selection'),
                            ('fepm.baseline', 'none', 'fepm.baseline'),
                            ('fepm.share', 1.0, 'fepm.share'),
                            ('fepm.warmup_fraction', 1.0, 'fepm.warmup_fraction'),
                            ('fepm.consistency_memory', -1, 'fepm.consistency_memory'),
                            ('fepm.prob_bounds', (0.5, 0.2), 'fepm.prob_bounds'),
                            ('fepm.num_samples', 0, 'fepm.num_samples'),
                            ('eval.feature', 'bn', 'eval.feature')]:
    with pytest.raises(ValueError, match=field):
      config_schema.validate(make_config({key: value}, preset='tiny', extend=ERASE))
  c = make_config({'fepm.baseline': 'leave_one_out', 'fepm.num_samples': 1}, preset='tiny',
                  extend=ERASE)
  with pytest.raises(ValueError, match='fepm.num_samples'):
    config_schema.validate(c)
  # The grid no longer matches the images.
  model = build(make_config({'input.height': 40}, preset='tiny', extend=ERASE))
  with pytest.raises(ValueError, match='input.height'):
    jax.eval_shape(lambda: model.init(RNGS, batch, train=False))


# --- numerical checks on shared compiled functions ---------------------------------------------


def _step_fn(config, split: bool):
  """One compiled call: loss values, gradients, outputs, new batch_stats and metrics.

  split: gradients of the supervised part (everything but the agent's terms), of the agent's
  REINFORCE term and of its consistency term separately (one batched backward pass); otherwise
  the gradient of the total.
  """
  model = build(config)
  supervised_only = ml_collections.ConfigDict(config.to_dict())
  supervised_only.loss.agent_weight = 0.0
  supervised_only.loss.agent_consistency_weight = 0.0

  def fn(params, batch_stats, batch, rngs):
    def parts(p):
      out, updates = model.apply({'params': p, 'batch_stats': batch_stats}, batch, train=True,
                                 rngs=rngs, mutable=['batch_stats'])
      total, metrics = losses.total_loss(out, batch, config)
      if not split:
        return total[None], (out, updates['batch_stats'], metrics)
      supervised, _ = losses.total_loss(out, batch, supervised_only)
      agent = config.loss.agent_weight * metrics['loss/agent']
      consistency = (config.loss.agent_consistency_weight
                     * metrics['loss/agent_consistency'])
      return (jnp.stack([supervised, agent, consistency]),
              (out, updates['batch_stats'], metrics))

    values, vjp, aux = jax.vjp(parts, params, has_aux=True)
    grads = jax.vmap(lambda ct: vjp(ct)[0])(jnp.eye(values.shape[0]))
    return values, grads, aux

  return model, fn


@pytest.fixture(scope='module')
def default_state():
  config = make_config({'model.jpm': True}, preset='tiny', extend=ERASE)
  model, step = _step_fn(config, split=True)
  batch = make_batch()
  variables = fast_jit(lambda r, b: model.init(r, b, train=False), RNGS, batch)(RNGS, batch)
  rngs = {'dropout': jax.random.PRNGKey(5), 'agent': jax.random.PRNGKey(6)}
  args = (variables['params'], variables['batch_stats'], batch, rngs)
  compiled = fast_jit(step, *args)
  return {'config': config, 'model': model, 'variables': variables, 'batch': batch,
          'compiled': compiled, 'result': compiled(*args)}


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_agent_gets_gradient_only_from_its_own_terms(default_state):
  values, grads, (_, _, metrics) = default_state['result']
  assert np.all(np.isfinite(np.asarray(values)))
  sup = _flat(jax.tree_util.tree_map(lambda g: g[0], grads))
  agent = _flat(jax.tree_util.tree_map(lambda g: g[1], grads))
  consistency = _flat(jax.tree_util.tree_map(lambda g: g[2], grads))
  # Both sides sum the same float32 terms w_t L_t (T of them, each product rounded once) in
  # some order: each sum is within T u sum |w_t L_t| of exact, plus u for each of the final
  # two additions.
  weights = losses.active_terms(default_state['config'])
  assert {'agent', 'agent_consistency'} <= set(weights)
  magnitude = sum(abs(w * float(metrics[f'loss/{name}'])) for name, w in weights.items())
  np.testing.assert_allclose(values[0] + values[1] + values[2], metrics['loss/total'], rtol=0,
                             atol=(2 * len(weights) + 2) * 2.0 ** -24 * magnitude)
  agent_keys = [k for k in sup if k.startswith('agent/')]
  assert agent_keys
  for k in sup:
    if k.startswith('agent/'):
      np.testing.assert_array_equal(sup[k], 0.0, err_msg=k)  # no supervised gradient
    else:
      # REINFORCE and the consistency labels stay in the agent.
      np.testing.assert_array_equal(agent[k], 0.0, err_msg=k)
      np.testing.assert_array_equal(consistency[k], 0.0, err_msg=k)
  assert sum(float(np.abs(agent[k]).sum()) for k in agent_keys) > 0
  assert sum(float(np.abs(consistency[k]).sum()) for k in agent_keys) > 0
  # The teacher backbone, the replacement token and the student all learn from the rest.
  for prefix in ('teacher_vit/', 'student_vit/', 'fepm/', 'pattern_embed', 'teacher_head/'):
    assert any(np.abs(v).sum() > 0 for k, v in sup.items() if k.startswith(prefix)), prefix


def test_reward_passes_match_the_main_forward(default_state):
  """The batched reward rows reproduce the teacher's own forward (drop-path is off here):
  lp_sampled is the true-class log-prob of the logits the ID loss sees. BatchNorm's running
  averages move with the real teacher batch only."""
  _, _, (out, new_stats, metrics) = default_state['result']
  batch = default_state['batch']
  a, t = out['agent'], out['teacher']
  lp_main = jax.nn.log_softmax(t['logits'])[np.arange(B), batch['pid']]
  np.testing.assert_allclose(a['lp_sampled'], lp_main, atol=2e-5)
  np.testing.assert_array_equal(a['lp_samples'][0], a['lp_sampled'])
  assert a['mask'].any(), 'sampling at the prior rate should select some tokens here'
  np.testing.assert_allclose(a['select_rate'], np.asarray(a['mask']).mean(-1), rtol=1e-6)
  # The leave-one-out baseline of the recipe runs no greedy reward pass.
  assert default_state['config'].fepm.baseline == 'leave_one_out' and 'lp_greedy' not in a
  # First training step: the running threshold is this batch's own, the score of its
  # round(share x B x N)-th best token, through the bias correction (a product and a quotient
  # by the same weight in float32: within (1 + u)^2 - 1 < 3 u relative). Away from that band
  # the greedy action is exactly the tokens scored at or above it.
  u = 2.0 ** -24
  scores = np.asarray(a['scores'])
  k = round(default_state['config'].fepm.share * scores.size)
  kth = np.sort(scores.ravel())[-k]
  band = np.abs(scores - kth) <= 3 * u * abs(kth)
  greedy = np.asarray(a['greedy_mask'])
  np.testing.assert_array_equal(greedy[~band], (scores >= kth)[~band])
  assert band.sum() < scores.size and greedy.any() and not greedy.all()
  # The running averages (momentum 0.9 from mean 0, var 1) are batch means over B rows in
  # float32, here and in the reference: each side within (B + 4) eps_32 of the exact mean of
  # the magnitudes (|x| for the mean, x^2 for the variance, whichever way it is formed),
  # scaled by the 0.1 weight, plus the rounding of the final value (the largest over the
  # feature dimensions: assert_allclose takes one atol).
  feat = np.asarray(t['feat'], np.float64)
  stats = new_stats['teacher_head']['bnneck']
  mean_ref, var_ref = 0.1 * feat.mean(0), 0.9 + 0.1 * feat.var(0)
  np.testing.assert_allclose(
      stats['mean'], mean_ref, rtol=0,
      atol=2 * (B + 4) * u * 0.1 * np.abs(feat).mean(0).max() + 2 * u * np.abs(mean_ref).max())
  np.testing.assert_allclose(
      stats['var'], var_ref, rtol=0,
      atol=2 * (B + 4) * u * 0.1 * (feat ** 2).mean(0).max() + 2 * u * np.abs(var_ref).max())
  # The logged reward: the mean over S x B rows (S sampled actions per image) of three terms,
  # in float32 on each side.
  terms = (np.asarray(a['lp_samples'], np.float64), -np.asarray(a['lp_clean'], np.float64)[None],
           -default_state['config'].fepm.eta * np.asarray(a['sample_rates'], np.float64))
  reward = sum(terms)
  rows = reward.size
  magnitude = float(np.mean(sum(np.abs(x) for x in terms)))
  np.testing.assert_allclose(metrics['agent/reward'], np.mean(reward), rtol=0,
                             atol=2 * (rows + 4) * u * magnitude)


def test_new_batch_and_rngs_reuse_the_compiled_step(default_state):
  """The compiled step takes any batch of the same shapes; a new 'agent' rng gives new
  actions (the sampling is not frozen into the compiled function)."""
  compiled = default_state['compiled']
  variables = default_state['variables']
  other = make_batch(seed=7)
  values, _, (out, _, _) = compiled(variables['params'], variables['batch_stats'], other,
                                    {'dropout': jax.random.PRNGKey(8),
                                     'agent': jax.random.PRNGKey(9)})
  assert np.all(np.isfinite(np.asarray(values)))
  assert not np.array_equal(out['agent']['mask'],
                            default_state['result'][2][0]['agent']['mask'])


def test_bfloat16_runs_with_finite_losses(default_state):
  config = make_config({'model.dtype': 'bfloat16', 'model.jpm': True}, preset='tiny',
                       extend=ERASE)
  model, step = _step_fn(config, split=False)
  batch = default_state['batch']
  # Parameters are float32 whatever the compute dtype, so the float32 model's variables fit.
  variables = default_state['variables']
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      jax.eval_shape(lambda: model.init(RNGS, batch, train=False)))
  rngs = {'dropout': jax.random.PRNGKey(5), 'agent': jax.random.PRNGKey(6)}
  args = (variables['params'], variables['batch_stats'], batch, rngs)
  values, grads, (out, _, metrics) = fast_jit(step, *args)(*args)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables['params']))
  assert np.all(np.isfinite(np.asarray(values)))
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
  assert out['student']['feat'].dtype == jnp.float32


def test_extract_and_greedy_selection(default_state):
  """The student's test feature reads E[0] of the pattern embeddings, whatever the others
  hold; the teacher's greedy selection of a fresh model is the batch's own top share."""
  variables = default_state['variables']
  batch = default_state['batch']
  model = default_state['model']

  def features(v, image, camid):
    other = jax.tree_util.tree_map(lambda x: x, v)
    other['params']['pattern_embed'] = v['params']['pattern_embed'].at[1:].add(1.0)
    return {
        'feat': model.apply(v, image, camid, method=ogfr.OGFR.extract),
        'post': model.apply(v, image, camid, feature='post_bn', method=ogfr.OGFR.extract),
        'other': model.apply(other, image, camid, method=ogfr.OGFR.extract),
        'selection': model.apply(v, image, camid, method=ogfr.OGFR.teacher_selection),
    }

  args = (variables, batch['occluded'], batch['camid'])
  out = fast_jit(features, *args)(*args)
  assert out['feat'].shape == (B, 64 * (1 + vit.JPM_PARTS))  # global + the parts
  np.testing.assert_array_equal(out['other'], out['feat'])
  # Fresh BNNeck: running mean 0, variance 1, scale 1.
  np.testing.assert_allclose(out['post'], np.asarray(out['feat']) / np.sqrt(1 + 1e-5),
                             rtol=1e-6, atol=1e-6)
  # No training step has set the running threshold: evaluation takes the batch's own, the
  # score of its round(share x B x N)-th best token.
  scores, mask = np.asarray(out['selection']['scores']), np.asarray(out['selection']['mask'])
  k = round(default_state['config'].fepm.share * scores.size)
  np.testing.assert_array_equal(mask, scores >= np.sort(scores.ravel())[-k])
  assert mask.sum() >= k and not mask.all()


@pytest.mark.parametrize('head_input', ['bn_feat', 'feat'])
def test_pattern_head_reads_the_configured_feature(head_input):
  config = make_config({'model.pattern_head_input': head_input}, preset='tiny',
                       extend=ERASE)
  model = build(config)
  batch = make_batch()
  variables = model.init(RNGS, batch, train=False)
  # Training mode: the BNNeck normalises with batch statistics, so bn_feat differs from feat.
  out, _ = model.apply(variables, batch, train=True, rngs=RNGS, mutable=['batch_stats'])
  out = out['student']
  head = variables['params']['pattern_head']
  expected = out[head_input] @ head['kernel'] + head['bias']
  # Two float32 dot products of length n = D (XLA's and numpy's, in their own orders): each
  # within (n + 1) u of exact relative to the sum of |terms| (u = 2^-24).
  terms = np.abs(out[head_input]) @ np.abs(head['kernel']) + np.abs(head['bias'])
  bound = 2 * (out[head_input].shape[-1] + 1) * 2.0 ** -24 * terms
  assert np.all(np.abs(out['pattern_logits'] - expected) <= bound)
  other = out['feat' if head_input == 'bn_feat' else 'bn_feat'] @ head['kernel'] + head['bias']
  assert not np.allclose(out['pattern_logits'], other, atol=1e-3)


# --- occluder-token erasure in the student ---------------------------------------------------


def test_covered_tokens_match_the_numpy_reference():
  from ogfr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  mask = np.zeros((4, 40, 28), np.uint8)
  for i in range(4):  # boxes of random size and place, so coverage varies around one half
    y, x = rng.integers(0, 30), rng.integers(0, 20)
    mask[i, y:y + rng.integers(4, 20), x:x + rng.integers(4, 14)] = 1
  got = np.asarray(fepm.covered_tokens(mask, 8, 6))
  gh, gw = vit.patch_grid(40, 28, 8, 6)
  want = synthetic.clutter_token_mask(mask, gh, gw, 8, 6).reshape(4, gh * gw)
  np.testing.assert_array_equal(got, want)
  assert want.any() and not want.all()


@pytest.mark.parametrize('detector', ['student', 'separate'])
def test_student_erase_blends_by_the_head_and_trains_it(detector):
  config = make_config({'student_erase.enabled': True, 'model.teacher': False,
                        'student_erase.detector': detector}, preset='tiny', extend=ERASE)
  model = build(config)
  batch = make_batch()
  batch['occ_mask'] = jnp.asarray(np.arange(H)[None, :, None] < 12, jnp.uint8) * jnp.ones(
      (B, H, W), jnp.uint8)  # the top rows occluded in every view
  variables = model.init(RNGS, batch, train=False)
  with pytest.raises(ValueError, match='occ_mask'):
    model.apply(variables, {k: v for k, v in batch.items() if k != 'occ_mask'}, train=True,
                rngs=RNGS, mutable=['batch_stats'])

  def with_bias(bias):
    v = jax.tree_util.tree_map(lambda x: x, variables)
    v['params']['occluder_head'] = {'kernel': jnp.zeros_like(v['params']['occluder_head']['kernel']),
                                    'bias': jnp.full((1,), bias)}
    return v

  def features(v):
    camid = jnp.zeros((B,), jnp.int32)  # same camera: only the image differs
    return model.apply(v, batch['occluded'], camid, method=ogfr.OGFR.extract)

  f = jax.jit(features)
  erased, kept = np.asarray(f(with_bias(30.0))), np.asarray(f(with_bias(-30.0)))
  # Every patch token replaced: the feature no longer depends on the image.
  np.testing.assert_allclose(erased, np.broadcast_to(erased[:1], erased.shape), atol=1e-5)
  assert np.abs(kept - kept[:1]).max() > 1e-3

  def occluder_loss(params):
    out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, batch,
                         train=True, rngs=RNGS, mutable=['batch_stats'])
    _, metrics = losses.total_loss(out, batch, config)
    return metrics['loss/occluder_token'], out['student']['occluder_target']

  grads, target = jax.jit(jax.grad(occluder_loss, has_aux=True))(variables['params'])
  gh, gw = build_lib.token_grid(config)
  # Rows 0..11 are occluded: the first token row (pixels 0..7) and the second (6..13,
  # 6 of 8 rows) are covered; the third (12..19) is not.
  want = np.zeros((gh, gw), bool)
  want[:2] = True
  np.testing.assert_array_equal(np.asarray(target), np.broadcast_to(want.reshape(-1), (B, gh * gw)))
  assert np.abs(np.asarray(grads['occluder_head']['kernel'])).max() > 0
  reader = 'occluder_vit' if detector == 'separate' else 'student_vit'
  assert np.abs(np.asarray(grads[reader]['blocks_0']['attn']['qkv']['kernel'])).max() > 0
