"""The FEPM modes: bounded Bernoulli policy, the expected-count greedy action, the oracle
selection, and the staged schedule of the train step."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ogfr_jax import config_defaults
from ogfr_jax import train_step
from ogfr_jax.models import build
from ogfr_jax.models import fepm


def _enumerate_masks(n):
  return np.array(list(itertools.product([False, True], repeat=n)))


@pytest.mark.parametrize('bounds', [(0.0, 1.0), (0.05, 0.8)])
def test_bounded_bernoulli_log_prob_and_entropy_are_exact(bounds):
  logits = jnp.asarray([[-2.0, 0.3, 1.5, -0.7]], jnp.float32)
  masks = _enumerate_masks(4)
  logp = np.array([float(fepm.bernoulli_log_prob(logits, m[None], bounds)[0]) for m in masks])
  # A distribution: the probabilities of all 16 masks sum to one.
  np.testing.assert_allclose(np.exp(logp).sum(), 1.0, rtol=1e-5)
  p = bounds[0] + (bounds[1] - bounds[0]) / (1 + np.exp(-np.asarray(logits[0], np.float64)))
  expected = np.log(np.where(masks, p, 1 - p)).sum(-1)
  np.testing.assert_allclose(logp, expected, rtol=1e-5)
  np.testing.assert_allclose(float(fepm.bernoulli_entropy(logits, bounds)[0]),
                             -np.sum(np.exp(expected) * expected), rtol=1e-5)
  # Bounds hold however far the logits go.
  extreme = jnp.asarray([[-50.0, 50.0]])
  probs = np.asarray(fepm.selection_probs(extreme, bounds))[0]
  # (up to the float32 rounding of exp(log p): a few eps_32 relative)
  eps = 4 * np.finfo(np.float32).eps
  assert probs[0] >= bounds[0] * (1 - eps) and probs[1] <= bounds[1] * (1 + eps)


def test_expected_count_greedy_selects_the_policy_mean_number_of_best_tokens():
  logits = jnp.full((2, 20), -2.0).at[0, 3].set(1.0).at[1, :5].set(0.5)
  mask = np.asarray(fepm.expected_count_mask(logits))
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  np.testing.assert_array_equal(mask.sum(-1), np.round(p.sum(-1)))
  assert mask[0, 3]  # the best-scored token comes first
  sel = fepm.select(logits, action='bernoulli', k=0, key=None, greedy='expected_count')
  np.testing.assert_array_equal(sel.mask, mask)
  # The 'positive' rule is empty at the prior, the point of the new rule.
  assert not np.asarray(fepm.select(jnp.full((1, 20), -2.0), action='bernoulli', k=0,
                                    key=None).mask).any()
  with pytest.raises(ValueError, match='fepm.greedy'):
    fepm.select(logits, action='bernoulli', k=0, key=None, greedy='all')


def test_window_mean_averages_the_grid_cells_inside_the_window():
  grid = (4, 3)
  logits = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 12)), np.float32)
  x = logits.reshape(2, *grid).astype(np.float64)
  for window in ((3, 1), (1, 3), (3, 3), (1, 1)):
    expected = np.zeros_like(x)
    for r, c in itertools.product(range(grid[0]), range(grid[1])):
      rows = slice(max(r - window[0] // 2, 0), r + window[0] // 2 + 1)
      cols = slice(max(c - window[1] // 2, 0), c + window[1] // 2 + 1)
      expected[:, r, c] = x[:, rows, cols].mean(axis=(1, 2))
    got = np.asarray(fepm.window_mean(jnp.asarray(logits), grid, window))
    # A float32 sum of at most 9 terms and one division.
    np.testing.assert_allclose(got, expected.reshape(2, 12), rtol=0,
                               atol=10 * np.finfo(np.float32).eps * np.abs(x).max())
  with pytest.raises(ValueError, match='window'):
    fepm.window_mean(jnp.asarray(logits), grid, (2, 1))


def _tiny_config(**fepm_fields):
  c = config_defaults.base_config()
  c.model.size = 'tiny'
  c.input.height, c.input.width = 32, 16
  c.model.patch_size, c.model.stride = 8, 6  # a 5 x 2 grid
  c.model.drop_path = 0.0
  c.fepm.update(fepm_fields)
  return c


def _tiny_batch(**extra):
  """A training batch of 4 images for `_tiny_config` models and the rngs of one step."""
  batch = {'image': jax.random.normal(jax.random.PRNGKey(0), (4, 32, 16, 3)),
           'occluded': jax.random.normal(jax.random.PRNGKey(1), (4, 32, 16, 3)),
           'camid': jnp.zeros((4,), jnp.int32), 'pattern': jnp.zeros((4,), jnp.int32),
           'pid': jnp.asarray([0, 1, 2, 3], jnp.int32), **extra}
  rngs = {'params': jax.random.PRNGKey(2), 'agent': jax.random.PRNGKey(3),
          'dropout': jax.random.PRNGKey(4)}
  return batch, rngs


def test_oracle_selection_replaces_exactly_the_planted_tokens():
  c = _tiny_config(selection='oracle', layer=0)
  model = build.build_model(c, 4, 2)
  image = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 16, 3))
  camid = jnp.zeros((2,), jnp.int32)
  contam = np.zeros((2, 32, 16), np.uint8)
  contam[0, :8, :8] = 1  # the window of token (0, 0) only
  contam[1, 12:20, 6:14] = 1  # token (2, 1): rows 12..19, columns 6..13
  variables = model.init(jax.random.PRNGKey(1), image, camid, jnp.asarray(contam),
                         method=model.teacher_selection)
  sel = model.apply(variables, image, camid, jnp.asarray(contam),
                    method=model.teacher_selection)
  mask = np.asarray(sel['mask']).reshape(2, 5, 2)
  assert mask[0, 0, 0] and mask.sum(axis=(1, 2)).tolist() == [1, 1] and mask[1, 2, 1]
  assert 'agent' not in variables['params']  # nothing to learn


def test_staged_schedule_phases():
  c = _tiny_config(teacher_warmup_epochs=2.0, agent_only_epochs=1.0)
  phases = [tuple(bool(x) for x in train_step.fepm_phase(jnp.int32(s), c, steps_per_epoch=10))
            for s in (0, 19, 20, 29, 30, 100)]
  # (purify, teacher trains): warm-up, agent against the held teacher, joint.
  assert phases == [(False, True), (False, True), (True, False), (True, False), (True, True),
                    (True, True)]
  held = train_step._hold_teacher(jnp.bool_(False), {'teacher_vit': 1.0, 'agent': 2.0},
                                  {'teacher_vit': 0.0, 'agent': 0.0})
  assert float(held['teacher_vit']) == 0.0 and float(held['agent']) == 2.0


def test_token_credit_pushes_each_logit_toward_the_action_the_reward_prefers():
  """Per-token REINFORCE: a token whose replacement raises the reward (positive slope) gets a
  higher logit whichever action was sampled, one whose replacement lowers it a lower one; the
  gradient is the closed form -A_i dlog pi(a_i)/dl_i of the unbounded sigmoid policy."""
  from ogfr_jax import losses  # pylint: disable=g-import-not-at-top
  logits = jnp.asarray([[0.4, -1.0, 2.0, -0.3]], jnp.float32)
  masks = jnp.asarray([[[True, False, True, False]], [[False, True, False, True]]])
  grads = jnp.asarray([[[0.5, 0.5, -0.5, -0.5]], [[0.5, 0.5, -0.5, -0.5]]], jnp.float32)
  eta = 0.0
  adv = losses.token_advantage(grads, masks, eta)
  np.testing.assert_array_equal(np.asarray(adv), np.where(masks, 1.0, -1.0) * grads)
  g = jax.grad(lambda l: losses.token_reinforce_loss(l, masks, adv, (0.0, 1.0),
                                                     jnp.zeros((1,)), 0.0))(logits)
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  dlogpi = np.where(np.asarray(masks), 1 - p, -p)  # d log pi(a_i) / d l_i
  expected = -(np.asarray(adv, np.float64) * dlogpi).mean(axis=0)  # mean over the S samples
  np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-7)
  # Descent raises the logits of tokens 0, 1 (positive slope) and lowers those of 2, 3.
  assert (np.sign(-np.asarray(g)[0]) == [1, 1, -1, -1]).all()
  # The selection price eta / N is part of every token's slope.
  np.testing.assert_allclose(np.asarray(losses.token_advantage(jnp.zeros((1, 1, 4)),
                                                               masks[:1], 2.0)),
                             np.where(np.asarray(masks[:1]), -0.5, 0.5))


def test_token_credit_reports_the_reward_gradient_of_every_sampled_token():
  c = _tiny_config(layer=0, credit='token', num_samples=2, baseline='leave_one_out',
                   prob_bounds=(0.1, 0.9))
  model = build.build_model(c, 4, 2)
  batch, rngs = _tiny_batch()
  variables = model.init(rngs, batch, train=True)
  out, _ = model.apply(variables, batch, train=True, rngs=rngs, mutable=['batch_stats'])
  a = out['agent']
  assert a['token_grads'].shape == a['sample_masks'].shape == (2, 4, 10)
  g = np.asarray(a['token_grads'])
  assert np.isfinite(g).all() and np.abs(g).max() > 0
  # The advantage enters the agent's loss, and the gradient reaches the agent only.
  from ogfr_jax import losses  # pylint: disable=g-import-not-at-top
  value = losses.agent_term(out, batch, losses.Context(c.loss, c.fepm, jnp.float32(0.0)))
  assert np.isfinite(float(value.value)) and 'agent/token_advantage_std' in value.metrics


def test_token_credit_needs_independent_tokens():
  from ogfr_jax import config_schema  # pylint: disable=g-import-not-at-top
  c = _tiny_config(credit='token', action='topk')
  with pytest.raises(ValueError, match='fepm.credit'):
    config_schema.validate(c)


def test_warmup_replaces_random_tokens_only_while_purification_is_off():
  def teacher_feat(rate, purify):
    c = _tiny_config(layer=0, warmup_random_rate=rate)
    model = build.build_model(c, 4, 2)
    batch, rngs = _tiny_batch()
    variables = model.init(rngs, batch, train=True)
    out, _ = model.apply(variables, batch, train=True, rngs=rngs, mutable=['batch_stats'],
                         purify=purify)
    return np.asarray(out['teacher']['feat'])

  clean = teacher_feat(0.0, False)
  warm = teacher_feat(0.5, False)
  assert np.abs(warm - clean).max() > 0  # some tokens were replaced in the warm-up pass
  # Once purification is on, the warm-up rate changes nothing: same sampled action, same pass.
  np.testing.assert_array_equal(teacher_feat(0.5, True), teacher_feat(0.0, True))


def test_agent_occluder_auxiliary_scores_the_synthesised_occluder_tokens():
  from ogfr_jax import config_schema  # pylint: disable=g-import-not-at-top
  from ogfr_jax import losses  # pylint: disable=g-import-not-at-top
  c = _tiny_config(layer=0)
  c.loss.agent_occluder_weight = 1.0
  assert 'occ_mask' in build.batch_keys(c)
  model = build.build_model(c, 4, 2)
  occ_mask = np.zeros((4, 32, 16), np.uint8)
  occ_mask[:, :8, :8] = 1  # exactly the window of token (0, 0)
  batch, rngs = _tiny_batch(occ_mask=jnp.asarray(occ_mask))
  variables = model.init(rngs, batch, train=True)
  out, _ = model.apply(variables, batch, train=True, rngs=rngs, mutable=['batch_stats'])
  target = np.asarray(out['agent']['occluder_target'])
  assert target.shape == (4, 10) and target[:, 0].all() and target.sum() == 4
  # The agent scores occ(x), not x: its logits there differ from those of the selection.
  assert np.abs(np.asarray(out['agent']['occluder_scores'])
                - np.asarray(out['agent']['scores'])).max() > 0
  term = losses.agent_occluder_term(out, batch, losses.Context(c.loss, c.fepm, jnp.float32(0)))
  logits = np.asarray(out['agent']['occluder_scores'], np.float64)
  log_sig = lambda z: -np.logaddexp(0.0, -z)
  expected = -np.mean(target * log_sig(logits) + (1 - target) * log_sig(-logits))
  np.testing.assert_allclose(float(term.value), expected, rtol=1e-5)
  assert losses.active_terms(c)['agent_occluder'] == 1.0
  c.occlusion.enabled = False
  with pytest.raises(ValueError, match='agent_occluder_weight'):
    config_schema.validate(c)


def _brute_force_match(tokens, pid, grid, radius, memory=None, valid=None):
  """float64 reference of fepm.identity_match: a loop over every token pair."""
  b, n, _ = tokens.shape
  gh, gw = grid
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  x = unit(tokens.astype(np.float64))
  match = np.ones((b, n))
  for i in range(b):
    others = [x[j] for j in range(b) if j != i and pid[j] == pid[i]]
    if memory is not None:
      others += [unit(memory[i, m].astype(np.float64)) for m in range(memory.shape[1])
                 if valid[i, m]]
    if not others:
      continue
    for t in range(n):
      r, c = divmod(t, gw)
      near = [rr * gw + cc for rr in range(gh) for cc in range(gw)
              if abs(rr - r) <= radius and abs(cc - c) <= radius]
      match[i, t] = max(float(x[i, t] @ o[s]) for o in others for s in near)
  return match


@pytest.mark.parametrize('radius', [0, 1])
def test_identity_match_equals_the_pairwise_reference(radius):
  grid, dim = (4, 3), 16
  pid = np.array([0, 0, 1, 1, 1, 2])  # identity 2 has no other image
  tokens = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (6, 12, dim)), np.float32)
  match, has_other = fepm.identity_match(jnp.asarray(tokens), jnp.asarray(pid), grid, radius)
  np.testing.assert_array_equal(has_other, [True] * 5 + [False])
  # Cosines of unit vectors: a float32 dot product over `dim` terms plus the two
  # normalisations, each within a few eps_32 per term.
  atol = 4 * (dim + 2) * np.finfo(np.float32).eps
  np.testing.assert_allclose(np.asarray(match), _brute_force_match(tokens, pid, grid, radius),
                             atol=atol, rtol=0)


@pytest.mark.parametrize('radius', [0, 1])
def test_identity_match_with_memory_equals_the_pairwise_reference(radius):
  grid, dim, slots = (4, 3), 16, 3
  pid = np.array([0, 0, 1, 2, 2, 3])
  tokens = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (6, 12, dim)), np.float32)
  memory = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (6, slots, 12, dim)), np.float32)
  # Row 2 (identity 1, alone in the batch) is explained by its memory alone; row 5 has none.
  valid = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 1], [0, 0, 0]], bool)
  match, has_other = fepm.identity_match(jnp.asarray(tokens), jnp.asarray(pid), grid, radius,
                                         jnp.asarray(memory), jnp.asarray(valid))
  np.testing.assert_array_equal(has_other, [True] * 5 + [False])
  atol = 4 * (dim + 2) * np.finfo(np.float32).eps  # as in the test without memory
  np.testing.assert_allclose(
      np.asarray(match), _brute_force_match(tokens, pid, grid, radius, memory, valid),
      atol=atol, rtol=0)


def test_identity_memory_is_a_ring_buffer_per_identity_that_skips_the_images_own_slot():
  ids, slots, n, d = 3, 2, 4, 2
  table = jnp.zeros((ids, slots, n, d)), jnp.full((ids, slots), -1, jnp.int32)
  nxt = jnp.zeros((ids,), jnp.int32)
  tok = lambda index: jnp.broadcast_to(jnp.asarray(index, jnp.float32)[:, None, None],
                                       (len(index), n, d))
  # Identity 0 has three rows: the first two fill its two slots, the third is not stored.
  index = jnp.asarray([10, 11, 12, 20], jnp.int32)
  memory, index_table, nxt = fepm.memory_write(*table, nxt, tok(index), jnp.asarray([0, 0, 0, 1]),
                                               index)
  np.testing.assert_array_equal(index_table, [[10, 11], [20, -1], [-1, -1]])
  np.testing.assert_array_equal(nxt, [0, 1, 0])
  np.testing.assert_array_equal(memory[:, :, 0, 0], [[10, 11], [20, 0], [0, 0]])
  # Identity 1 continues at slot 1 and then wraps around to overwrite slot 0.
  index = jnp.asarray([21, 22], jnp.int32)
  memory, index_table, nxt = fepm.memory_write(memory, index_table, nxt, tok(index),
                                               jnp.asarray([1, 1]), index)
  np.testing.assert_array_equal(index_table, [[10, 11], [22, 21], [-1, -1]])
  np.testing.assert_array_equal(nxt, [0, 1, 0])
  np.testing.assert_array_equal(memory[1, :, 0, 0], [22, 21])
  # Reading: every filled slot of the row's identity except the row's own image.
  read, valid = fepm.memory_read(memory, index_table, jnp.asarray([0, 1, 2]),
                                 jnp.asarray([11, 5, 7]))
  np.testing.assert_array_equal(valid, [[True, False], [True, True], [False, False]])
  np.testing.assert_array_equal(read[:, :, 0, 0], [[10, 11], [22, 21], [0, 0]])


def test_consistency_memory_explains_an_identity_alone_in_the_batch():
  c = _tiny_config(layer=0, consistency_share=0.25, consistency_memory=2)
  c.loss.agent_consistency_weight = 1.0
  assert 'index' in build.batch_keys(c)
  model = build.build_model(c, 4, 2)
  batch, rngs = _tiny_batch(index=jnp.asarray([10, 11, 12, 13], jnp.int32))
  batch['pid'] = jnp.asarray([0, 0, 1, 1], jnp.int32)
  variables = model.init(rngs, batch, train=False)
  out, updates = model.apply(variables, batch, train=True, rngs=rngs, mutable=['batch_stats'])
  state = updates['batch_stats']['teacher_branch']
  np.testing.assert_array_equal(state['consistency_memory_index'][:2], [[10, 11], [12, 13]])

  def tokens_after(m, image, camid):
    vit = m.teacher_branch.vit
    return vit.run_blocks(vit.embed(image, camid), 0, build.consistency_blocks(c),
                          train=False)[:, 1:]

  stored = model.apply(variables, batch['image'], batch['camid'], method=tokens_after)
  # The same blocks in two programs, which may round differently: per block a float32 error of
  # about (64 + 256) eps relative to O(1) activations (its widest reductions), so 1e-4 over
  # the two blocks of the tiny ViT.
  np.testing.assert_allclose(state['consistency_memory'][[0, 0, 1, 1], [0, 1, 0, 1]], stored,
                             atol=1e-4, rtol=1e-4)
  # Next batch: one image per identity. Identities 0 and 1 are now compared with their stored
  # images (image 10 not with itself), identities 2 and 3 with nothing, so they get no label.
  nxt = dict(batch, pid=jnp.asarray([0, 1, 2, 3], jnp.int32),
             index=jnp.asarray([10, 14, 15, 16], jnp.int32))
  out, _ = model.apply({**variables, 'batch_stats': updates['batch_stats']}, nxt, train=True,
                       rngs=rngs, mutable=['batch_stats'])
  target = np.asarray(out['agent']['consistency_target'])
  assert target[:2].sum() == 10 and not target[2:].any()
  # Without the memory the same batch has no identity to compare within.
  c.fepm.consistency_memory = 0
  plain = build.build_model(c, 4, 2)
  out, _ = plain.apply({'params': variables['params'], 'batch_stats': {
      k: v for k, v in variables['batch_stats'].items() if k != 'teacher_branch'}}, nxt,
      train=True, rngs=rngs, mutable=['batch_stats'])
  assert not np.asarray(out['agent']['consistency_target']).any()


def test_quantile_greedy_uses_a_running_threshold_calibrated_on_training_batches():
  from ogfr_jax import config_schema  # pylint: disable=g-import-not-at-top
  c = _tiny_config(layer=0, greedy='quantile', greedy_share=0.25, greedy_momentum=0.5,
                   score_window=(3, 1))
  config_schema.validate(c)
  model = build.build_model(c, 4, 2)
  batch, rngs = _tiny_batch()
  variables = model.init(rngs, batch, train=False)
  out, updates = model.apply(variables, batch, train=True, rngs=rngs, mutable=['batch_stats'])
  scores = np.asarray(out['agent']['scores'])
  # The selection reads the window mean of the agent's own token scores.
  raw = model.apply(variables, batch['image'], batch['camid'],
                    method=lambda m, image, camid: m.teacher_branch.agent(
                        m.teacher_branch.vit.embed(image, camid)[:, 1:]))
  np.testing.assert_array_equal(
      scores, np.asarray(fepm.window_mean(raw, build.token_grid(c), (3, 1))))
  state = updates['batch_stats']['teacher_branch']
  tenth = np.sort(scores.reshape(-1))[-10]  # round(0.25 x 40) = 10 tokens
  # One step at momentum 0.5: sum 0.5 x q, weight 0.5, so the threshold is q itself.
  assert float(state['greedy_threshold_weight']) == 0.5
  assert float(state['greedy_threshold_sum']) == 0.5 * tenth
  np.testing.assert_array_equal(out['agent']['greedy_mask'], scores >= tenth)
  # Evaluation keeps the stored threshold, whatever the batch: a shifted threshold selects
  # what it says, not the batch's own top share.
  shifted = jax.tree.map(lambda v: v, updates['batch_stats'])
  shifted['teacher_branch']['greedy_threshold_sum'] = jnp.float32(0.5 * (tenth + 1.0))
  sel = model.apply({**variables, 'batch_stats': shifted}, batch['image'], batch['camid'],
                    method=model.teacher_selection)
  np.testing.assert_array_equal(sel['mask'], scores >= np.float32(tenth + 1.0))
  for field, value in (('score_window', (2, 1)), ('score_window', (7, 1)),
                       ('greedy_share', 1.0), ('greedy_momentum', 1.0)):
    bad = _tiny_config(layer=0, **{field: value})
    with pytest.raises(ValueError, match=field):
      config_schema.validate(bad)


def test_unexplained_tokens_flag_what_the_identitys_other_images_lack():
  grid, dim = (4, 3), 16
  # One-hot tokens, so every cosine is exactly 0 or 1: cell t of identity 0 shows e_t. Image 1
  # carries a foreign patch (e_15) at cell 5; image 2 shows at cell 7 what belongs one row
  # lower (e_10, cell 10); image 3 is the only image of identity 1.
  eye = np.eye(dim, dtype=np.float32)
  tokens = np.stack([eye[:12]] * 3 + [eye[::-1][:12]]).copy()
  tokens[1, 5] = eye[15]
  tokens[2, 7] = eye[10]
  pid = jnp.asarray([0, 0, 0, 1])

  def labels(radius, count):
    return np.asarray(fepm.unexplained_tokens(jnp.asarray(tokens), pid, grid, radius,
                                              share=count / tokens[..., 0].size))

  at1 = labels(1, 1)
  assert at1.sum() == 1 and at1[1, 5]
  # At radius 0 the displaced token is no longer explained by its neighbour cell.
  at0 = labels(0, 2)
  assert at0.sum() == 2 and at0[1, 5] and at0[2, 7]
  # An identity alone in the batch gets no label, however large the share.
  assert not labels(1, 40)[3].any()


def test_agent_consistency_auxiliary_labels_a_share_of_the_batch():
  from ogfr_jax import config_schema  # pylint: disable=g-import-not-at-top
  from ogfr_jax import losses  # pylint: disable=g-import-not-at-top
  c = _tiny_config(layer=0, consistency_share=0.25)
  c.loss.agent_consistency_weight = 1.0
  model = build.build_model(c, 4, 2)
  batch, rngs = _tiny_batch()
  batch['pid'] = jnp.asarray([0, 0, 1, 1], jnp.int32)
  variables = model.init(rngs, batch, train=True)
  out, _ = model.apply(variables, batch, train=True, rngs=rngs, mutable=['batch_stats'])
  a = out['agent']
  target = np.asarray(a['consistency_target'])
  assert target.shape == (4, 10) and target.sum() == 10  # round(0.25 x 40)
  # The scorer reads the clean tokens the selection reads: the same logits.
  np.testing.assert_array_equal(a['consistency_scores'], a['scores'])
  term = losses.agent_consistency_term(out, batch,
                                       losses.Context(c.loss, c.fepm, jnp.float32(0)))
  logits = np.asarray(a['consistency_scores'], np.float64)
  log_sig = lambda z: -np.logaddexp(0.0, -z)
  expected = -np.mean(target * log_sig(logits) + (1 - target) * log_sig(-logits))
  np.testing.assert_allclose(float(term.value), expected, rtol=1e-5)
  assert losses.active_terms(c)['agent_consistency'] == 1.0
  c.input.images_per_id = 1
  with pytest.raises(ValueError, match='agent_consistency_weight'):
    config_schema.validate(c)


@pytest.mark.parametrize('block', [0, 1, -1])
def test_consistency_labels_compare_the_tokens_after_the_configured_block(block):
  from ogfr_jax import config_schema  # pylint: disable=g-import-not-at-top
  c = _tiny_config(layer=0, consistency_share=0.25, consistency_block=block)
  c.loss.agent_consistency_weight = 1.0
  config_schema.validate(c)
  model = build.build_model(c, 4, 2)
  batch, rngs = _tiny_batch()
  batch['pid'] = jnp.asarray([0, 0, 1, 1], jnp.int32)
  variables = model.init(rngs, batch, train=True)
  out, _ = model.apply(variables, batch, train=True, rngs=rngs, mutable=['batch_stats'])
  target = np.asarray(out['agent']['consistency_target'])
  stop = build.consistency_blocks(c)
  assert stop == (block if block >= 0 else build.vit_size(c)[1])

  def tokens_after(m, image, camid):
    vit = m.teacher_branch.vit
    return vit.run_blocks(vit.embed(image, camid), 0, stop, train=False)[:, 1:]

  tokens = model.apply(variables, batch['image'], batch['camid'], method=tokens_after)
  match, _ = fepm.identity_match(tokens, batch['pid'], build.token_grid(c), 1)
  match = np.asarray(match, np.float64)
  # The labels are the 10 (= 0.25 x 40) lowest matches. The two programs may round the
  # blocks differently: a cosine of 64-wide float32 vectors after at most two blocks moves by
  # well under 1e-4, so only tokens that close to the threshold may disagree.
  threshold = np.sort(match.reshape(-1))[9]
  near = np.abs(match - threshold) <= 1e-4
  np.testing.assert_array_equal(target[~near], (match <= threshold)[~near])
  assert target.sum() == 10


def test_consistency_block_must_not_precede_the_selection():
  from ogfr_jax import config_schema  # pylint: disable=g-import-not-at-top
  depth = build.vit_size(_tiny_config())[1]
  for layer, block in ((1, 0), (0, depth + 1), (0, -depth - 2)):
    c = _tiny_config(layer=layer, consistency_block=block)
    c.loss.agent_consistency_weight = 1.0
    with pytest.raises(ValueError, match='consistency_block'):
      config_schema.validate(c)


def _gelu64(x):
  from scipy import special  # pylint: disable=g-import-not-at-top
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def _agent_reference(params, x, context):
  """The agent's logits in float64 from its parameters, and the same chain over absolute
  values (what bounds the float32 rounding of each product)."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
  x = np.asarray(x, np.float64)
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  z = (x - mu) / np.sqrt(var + 1e-6) * p['norm']['scale'] + p['norm']['bias']
  h = _gelu64(z @ p['fc1']['kernel'] + p['fc1']['bias'])
  mag = np.abs(z) @ np.abs(p['fc1']['kernel']) + np.abs(p['fc1']['bias'])
  if context == 'global':
    half = h.shape[-1] // 2
    h = np.concatenate([h[..., :half], np.broadcast_to(h[..., half:].mean(1, keepdims=True),
                                                       h[..., half:].shape)], -1)
    mag = np.concatenate([mag[..., :half], np.broadcast_to(mag[..., half:].max(1, keepdims=True),
                                                           mag[..., half:].shape)], -1)
    h = _gelu64(h @ p['mix']['kernel'] + p['mix']['bias'])
    mag = 1.2 * mag @ np.abs(p['mix']['kernel']) + np.abs(p['mix']['bias'])
  out = h @ p['fc2']['kernel'] + p['fc2']['bias']
  mag = 1.2 * mag @ np.abs(p['fc2']['kernel']) + np.abs(p['fc2']['bias'])
  return out[..., 0], mag[..., 0]


@pytest.mark.parametrize('context', ['none', 'global'])
def test_agent_context_scores_each_token_against_its_own_image_only(context):
  b, n, dim, hidden = 3, 10, 12, 8
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (b, n, dim)), np.float32)
  agent = fepm.Agent(hidden=hidden, prior_logit=-1.0, context=context)
  variables = agent.init(jax.random.PRNGKey(2), jnp.asarray(x))
  logits = np.asarray(agent.apply(variables, jnp.asarray(x)))
  reference, magnitude = _agent_reference(variables['params'], x, context)
  # float32 products over at most max(dim, hidden) terms per layer, the token mean over n, and
  # the LayerNorm's statistics over dim: each within (terms + 2) eps_32 of the absolute-value
  # chain (GELU's slope is below 1.2, which the chain carries).
  eps = np.finfo(np.float32).eps
  atol = 3 * (max(dim, hidden, n) + 2) * eps * magnitude
  assert np.all(np.abs(logits - reference) <= atol), np.max(np.abs(logits - reference) / atol)
  # Changing one token of image 1 leaves images 0 and 2 bitwise alone; in its own image it
  # moves the other tokens' scores only when the agent reads the image's summary.
  changed = x.copy()
  changed[1, 4] = -2.0 * x[1, 4]  # a new direction (LayerNorm removes a plain offset)
  moved = np.asarray(agent.apply(variables, jnp.asarray(changed)))
  np.testing.assert_array_equal(moved[[0, 2]], logits[[0, 2]])
  others = np.delete(np.arange(n), 4)
  if context == 'none':
    np.testing.assert_array_equal(moved[1, others], logits[1, others])
  else:
    assert np.all(moved[1, others] != logits[1, others])
  assert moved[1, 4] != logits[1, 4]


def test_agent_context_global_needs_an_even_hidden_width():
  c = config_defaults.base_config()
  c.fepm.agent_context, c.fepm.agent_hidden = 'global', 7
  from ogfr_jax import config_schema  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='agent_hidden=7 must be even'):
    config_schema.validate(c)
