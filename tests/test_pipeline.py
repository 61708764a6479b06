"""The grain input pipeline on a small folder of real JPEG files."""

import os

import numpy as np
from PIL import Image
import pytest

from ogfr_jax import config_defaults
from ogfr_jax.data import augment
from ogfr_jax.data import image_io
from ogfr_jax.data import pipeline
from ogfr_jax.data import records
from ogfr_jax.data import sampler

H, W = 32, 16


def _write_split(folder, counts, seed=0):
  """JPEGs named as in DukeMTMC (`0001_c2_f0046182.jpg`), pids already 0..N-1."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  paths, pids, camids = [], [], []
  for pid, count in enumerate(counts):
    base = rng.integers(0, 256, size=3)
    for k in range(count):
      pixels = np.clip(base + rng.integers(-40, 41, size=(48, 24, 3)), 0, 255).astype(np.uint8)
      path = os.path.join(folder, f'{pid + 1:04d}_c{k % 3 + 1}_f{k:07d}.jpg')
      Image.fromarray(pixels).save(path, quality=90)
      paths.append(path)
      pids.append(pid)
      camids.append(k % 3)
  return records.Split.from_lists(paths, pids, camids)


def _config(**input_overrides):
  c = config_defaults.base_config()
  c.seed = 3
  c.input.height, c.input.width = H, W
  c.input.ids_per_batch, c.input.images_per_id = 4, 2
  c.input.pad = 2
  c.input.num_workers = 0
  c.input.prefetch = 1
  c.input.eval_batch_size = 4
  for key, value in input_overrides.items():
    c.input[key] = value
  return c


@pytest.fixture(scope='module')
def train_split(tmp_path_factory):
  # One identity has a single image (filled with replacement); the rest have 3-6.
  return _write_split(str(tmp_path_factory.mktemp('train')), [4, 1, 6, 3, 5, 4, 3, 6, 4])


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_layout_and_paired_views(train_split):
  config = _config()
  it = pipeline.make_train_iterator(train_split, config)
  batch = next(it)
  it.close()
  b = 8
  expected = {'image': ((b, H, W, 3), np.float32), 'occluded': ((b, H, W, 3), np.float32),
              'pattern': ((b,), np.int32), 'occ_mask': ((b, H, W), np.uint8),
              'pid': ((b,), np.int32), 'camid': ((b,), np.int32), 'index': ((b,), np.int32),
              'num_skipped': ((b,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  ids = batch['pid'].reshape(4, 2)
  assert (ids == ids[:, :1]).all() and len(set(ids[:, 0].tolist())) == 4
  np.testing.assert_array_equal(batch['pid'], train_split.pids[batch['index']])
  np.testing.assert_array_equal(batch['camid'], train_split.camids[batch['index']])
  outside = batch['occ_mask'] == 0
  np.testing.assert_array_equal(batch['image'][outside], batch['occluded'][outside])
  assert ((batch['pattern'] == 0) == (batch['occ_mask'].reshape(b, -1).sum(1) == 0)).all()
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0


def test_epochs_follow_the_sampler_and_start_epoch(train_split):
  config = _config()
  spe = pipeline.steps_per_epoch(train_split, config)
  it = pipeline.make_train_iterator(train_split, config)
  batches = _take(it, spe + 1)
  it.close()
  later = pipeline.make_train_iterator(train_split, config, start_epoch=1)
  _assert_same(batches[spe:], _take(later, 1))
  later.close()
  assert not np.array_equal(batches[0]['index'], batches[spe]['index'])
  config.train.steps_per_epoch = 1
  assert pipeline.steps_per_epoch(train_split, config) == 1


@pytest.mark.parametrize('extra', [-1, 1])
def test_configured_epoch_length_maps_onto_sampler_draws(train_split, extra):
  # Shorter than one sampler draw: epoch e is the first steps of draw e. Longer: it continues
  # into the next draw, and epoch e starts at draw 2e (two draws per epoch).
  config = _config()
  natural = pipeline.steps_per_epoch(train_split, config)
  config.train.steps_per_epoch = natural + extra
  assert pipeline.steps_per_epoch(train_split, config) == natural + extra
  it = pipeline.make_train_iterator(train_split, config)
  indices = [b['index'] for b in _take(it, 2 * (natural + extra))]
  it.close()
  P, K = config.input.ids_per_batch, config.input.images_per_id
  draw = lambda d: sampler.epoch_batches(train_split.pids, P, K, config.seed, d)
  if extra < 0:
    expected = list(draw(0)[:natural - 1]) + list(draw(1)[:natural - 1])
  else:
    expected = list(draw(0)) + [draw(1)[0]] + list(draw(2)) + [draw(3)[0]]
  for got, want in zip(indices, expected, strict=True):
    np.testing.assert_array_equal(got, want)


def test_process_slices_concatenate_to_the_global_batch(train_split):
  # prob=1 with donor-based patterns only: most donors sit in the other process's half, which
  # must rebuild exactly the pixels the single-process run uses.
  config = _config()
  config.occlusion.prob = 1.0
  config.occlusion.patterns = ('person', 'crop')
  whole = pipeline.make_train_iterator(train_split, config)
  parts = [pipeline.make_train_iterator(train_split, config, process_index=i, process_count=2)
           for i in range(2)]
  for _ in range(3):
    g = next(whole)
    halves = [next(p) for p in parts]
    for key in g:
      np.testing.assert_array_equal(g[key], np.concatenate([h[key] for h in halves]),
                                    err_msg=key)
    assert (g['pattern'] > 0).all()
  for it in [whole] + parts:
    it.close()


def test_process_count_must_divide_the_batch(train_split):
  with pytest.raises(ValueError, match='not divisible by the number of processes'):
    pipeline.make_train_iterator(train_split, _config(), process_index=0, process_count=3)


def test_restore_resumes_bitwise(train_split):
  config = _config()
  it = pipeline.make_train_iterator(train_split, config)
  reference = _take(it, 7)
  it.close()
  it = pipeline.make_train_iterator(train_split, config)
  _take(it, 4)
  state = it.get_state()
  it.close()
  assert state['step'] == 4
  restored = pipeline.make_train_iterator(train_split, config)
  restored.set_state(state)
  _assert_same(reference[4:], _take(restored, 3))
  assert restored.get_state()['step'] == 7
  restored.close()


def test_two_workers_match_the_main_process_and_restore_across_worker_counts(train_split):
  config = _config()
  it = pipeline.make_train_iterator(train_split, config)
  reference = _take(it, 5)
  state = None
  it.close()
  config.input.num_workers = 2
  workers = pipeline.make_train_iterator(train_split, config)
  try:
    _assert_same(reference[:3], _take(workers, 3))
    state = workers.get_state()
  finally:
    workers.close()
  config.input.num_workers = 0
  single = pipeline.make_train_iterator(train_split, config)
  single.set_state(state)
  _assert_same(reference[3:], _take(single, 2))
  single.close()


@pytest.fixture()
def corrupt_split(tmp_path):
  # 8 ids x 2 images with K = 2: every image is in every epoch, so the bad file is always read.
  split = _write_split(str(tmp_path), [2] * 8, seed=1)
  bad = 5
  with open(split.paths[bad], 'wb') as f:
    f.write(b'\xff\xd8 this is not a complete jpeg')
  return split, bad


def test_corrupt_image_fails_naming_the_file(corrupt_split):
  split, bad = corrupt_split
  it = pipeline.make_train_iterator(split, _config(corrupt_image_policy='fail'))
  spe = pipeline.steps_per_epoch(split, _config())
  with pytest.raises(image_io.CorruptImageError, match=os.path.basename(split.paths[bad])):
    _take(it, spe)
  it.close()


def test_corrupt_image_fails_through_workers(corrupt_split):
  split, bad = corrupt_split
  it = pipeline.make_train_iterator(split, _config(corrupt_image_policy='fail', num_workers=2))
  spe = pipeline.steps_per_epoch(split, _config())
  try:
    with pytest.raises(image_io.CorruptImageError, match=os.path.basename(split.paths[bad])):
      _take(it, spe)
  finally:
    it.close()


def test_corrupt_image_skip_replaces_with_same_identity(corrupt_split):
  split, bad = corrupt_split
  config = _config(corrupt_image_policy='skip')
  spe = pipeline.steps_per_epoch(split, config)
  it = pipeline.make_train_iterator(split, config)
  batches = _take(it, spe)
  assert it.num_skipped == 1 and it.get_state()['num_skipped'] == 1
  it.close()
  skipped = np.concatenate([b['num_skipped'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  pid = np.concatenate([b['pid'] for b in batches])
  assert skipped.sum() == 1
  assert bad not in index
  row = int(np.flatnonzero(skipped)[0])
  assert pid[row] == split.pids[bad] and index[row] != bad


def test_unknown_corrupt_policy_is_rejected(train_split):
  with pytest.raises(ValueError, match='config.input.corrupt_image_policy'):
    pipeline.make_train_iterator(train_split, _config(corrupt_image_policy='ignore'))


def test_too_few_identities_names_the_numbers(tmp_path):
  split = _write_split(str(tmp_path), [2, 2, 2])
  with pytest.raises(ValueError, match=r'3 identities .*P = 4'):
    pipeline.make_train_iterator(split, _config())


def test_eval_shares_padding_and_valid_mask(tmp_path):
  split = _write_split(str(tmp_path), [3, 4, 4], seed=2)  # 11 images
  config = _config()  # eval batch 4 -> 2 per process with 2 processes
  n_batches = pipeline.eval_num_batches(split, config, process_count=2)
  assert n_batches == 3  # shares of 6 and 5 images, 2 per batch
  seen = []
  for p in range(2):
    batches = list(pipeline.make_eval_iterator(split, config, process_index=p, process_count=2))
    assert len(batches) == n_batches
    for batch in batches:
      assert batch['image'].shape == (2, H, W, 3) and batch['valid'].dtype == bool
      valid = batch['valid']
      assert (batch['index'][~valid] == -1).all() and (batch['pid'][~valid] == -1).all()
      assert (batch['image'][~valid] == 0).all()
      for row in np.flatnonzero(valid):
        i = int(batch['index'][row])
        assert batch['pid'][row] == split.pids[i] and batch['camid'][row] == split.camids[i]
        expected = augment.normalize(image_io.load_image(split.paths[i], size=(H, W)),
                                     config.input.mean, config.input.std)
        np.testing.assert_array_equal(batch['image'][row], expected)
      seen.extend(batch['index'][valid].tolist())
    assert sum(int(b['valid'].sum()) for b in batches) == (6 if p == 0 else 5)
  assert seen == list(range(len(split)))
  single = list(pipeline.make_eval_iterator(split, config))
  assert len(single) == pipeline.eval_num_batches(split, config) == 3
  assert [int(b['valid'].sum()) for b in single] == [4, 4, 3]


def test_eval_batch_must_divide_over_processes(tmp_path):
  split = _write_split(str(tmp_path), [2, 2])
  with pytest.raises(ValueError, match='config.input.eval_batch_size'):
    pipeline.make_eval_iterator(split, _config(), process_index=0, process_count=3)
