"""The FEPM: bounded Bernoulli policy, score window, oracle selection, the teacher's warm-up,
the identity-consistency labels and their memory, and the running greedy threshold."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ogfr_jax import train_step
from ogfr_jax.models import build
from ogfr_jax.models import fepm
from helpers import make_config

# The tiny preset with no score window unless a test asks.
FEPM = {'fepm.score_window': (1, 1)}


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


def _tiny_batch(**extra):
  """A training batch of 4 images for `FEPM` models and the rngs of one step."""
  batch = {'image': jax.random.normal(jax.random.PRNGKey(0), (4, 32, 16, 3)),
           'occluded': jax.random.normal(jax.random.PRNGKey(1), (4, 32, 16, 3)),
           'camid': jnp.zeros((4,), jnp.int32), 'pattern': jnp.zeros((4,), jnp.int32),
           'pid': jnp.asarray([0, 1, 2, 3], jnp.int32), **extra}
  rngs = {'params': jax.random.PRNGKey(2), 'agent': jax.random.PRNGKey(3),
          'dropout': jax.random.PRNGKey(4)}
  return batch, rngs


def test_oracle_selection_replaces_exactly_the_planted_tokens():
  c = make_config({**FEPM, 'fepm.selection': 'oracle', 'fepm.layer': 0}, preset='tiny')
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


def test_warmup_is_a_fraction_of_the_run():
  c = make_config({**FEPM, 'fepm.warmup_fraction': 0.25}, preset='tiny')
  c.train.epochs = 2
  purify = [bool(train_step.fepm_phase(jnp.int32(s), c, steps_per_epoch=10))
            for s in (0, 4, 5, 19)]
  assert purify == [False, False, True, True]  # round(0.25 x 2 x 10) = 5 warm-up steps
  c.train.epochs = 40  # a longer run warms up longer
  assert train_step.warmup_steps(c, steps_per_epoch=10) == 100


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
  c = make_config({**FEPM, 'fepm.layer': 0, 'fepm.share': 0.25, 'fepm.consistency_memory': 2},
                  preset='tiny')
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
  from ogfr_jax.models import teacher  # pylint: disable=g-import-not-at-top
  c = make_config({**FEPM, 'fepm.layer': 0, 'fepm.share': 0.25, 'fepm.score_window': (3, 1)},
                  preset='tiny')
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
  # One step from zero at momentum m: sum (1 - m) q, weight 1 - m (float32), so the threshold
  # is q up to the rounding of that product and quotient.
  w = np.float32(1 - teacher.THRESHOLD_MOMENTUM)
  assert float(state['greedy_threshold_weight']) == w
  assert float(state['greedy_threshold_sum']) == w * tenth
  threshold = (w * tenth) / w
  np.testing.assert_array_equal(out['agent']['greedy_mask'], scores >= threshold)
  # Evaluation keeps the stored threshold, whatever the batch: a shifted threshold selects
  # what it says, not the batch's own top share.
  shifted = jax.tree.map(lambda v: v, updates['batch_stats'])
  shifted['teacher_branch']['greedy_threshold_sum'] = w * np.float32(tenth + 1.0)
  sel = model.apply({**variables, 'batch_stats': shifted}, batch['image'], batch['camid'],
                    method=model.teacher_selection)
  np.testing.assert_array_equal(sel['mask'], scores >= (w * np.float32(tenth + 1.0)) / w)
  for field, value in (('score_window', (2, 1)), ('score_window', (7, 1)), ('share', 1.0),
                       ('warmup_fraction', 1.0)):
    bad = make_config({**FEPM, 'fepm.layer': 0, f'fepm.{field}': value}, preset='tiny')
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
  c = make_config({**FEPM, 'fepm.layer': 0, 'fepm.share': 0.25}, preset='tiny')
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
                                       losses.Context(c.loss, c.fepm))
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
  c = make_config({**FEPM, 'fepm.layer': 0, 'fepm.share': 0.25, 'fepm.consistency_block': block},
                  preset='tiny')
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
  depth = build.vit_size(make_config(FEPM, preset='tiny'))[1]
  for layer, block in ((1, 0), (0, depth + 1), (0, -depth - 2)):
    c = make_config({**FEPM, 'fepm.layer': layer, 'fepm.consistency_block': block}, preset='tiny')
    c.loss.agent_consistency_weight = 1.0
    with pytest.raises(ValueError, match='consistency_block'):
      config_schema.validate(c)


def test_a_calibrated_teacher_purifies_at_evaluation():
  """After one training step the greedy threshold selects about `share` of the tokens, and the
  teacher's purified features differ from its clean ones exactly on the images with a
  selection."""
  c = make_config({**FEPM, 'fepm.layer': 0, 'fepm.share': 0.25}, preset='tiny')
  model = build.build_model(c, 4, 2)
  batch, rngs = _tiny_batch()
  variables = model.init(rngs, batch, train=False)
  _, updates = model.apply(variables, batch, train=True, rngs=rngs, mutable=['batch_stats'])
  trained = {**variables, 'batch_stats': updates['batch_stats']}
  image, camid = batch['image'], batch['camid']
  sel = model.apply(trained, image, camid, method=model.teacher_selection)
  selected = np.asarray(sel['mask']).any(axis=-1)
  # The threshold is this batch's 10th-best score up to one float32 rounding: 10 of 40 tokens,
  # give or take the tokens tied with it.
  assert 9 <= int(np.asarray(sel['mask']).sum()) <= 11 and selected.any()
  feats = {p: np.asarray(model.apply(trained, image, camid, purify=p,
                                     method=model.teacher_features)) for p in (True, False)}
  changed = np.abs(feats[True] - feats[False]).max(axis=-1) > 0
  np.testing.assert_array_equal(changed, selected)
