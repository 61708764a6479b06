"""The grain input pipeline on a small folder of real JPEG files."""

import os

import jax
import numpy as np
from PIL import Image
import pytest

from ogfr_jax.data import augment
from ogfr_jax.data import image_io
from ogfr_jax.data import pipeline
from ogfr_jax.data import records
from ogfr_jax.data import sampler
from helpers import H, W, make_config, take, write_split


@pytest.fixture(scope='module')
def train_split(tmp_path_factory):
  # One identity has a single image (filled with replacement); the rest have 3-6.
  return write_split(str(tmp_path_factory.mktemp('train')), [4, 1, 6, 3, 5, 4, 3, 6, 4])


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_layout_and_paired_views(train_split):
  config = make_config(preset='pipeline')
  it = pipeline.make_train_iterator(train_split, config)
  batch = next(it)
  it.close()
  b = 8
  expected = {'image': ((b, H, W, 3), np.uint8), 'occluded': ((b, H, W, 3), np.uint8),
              'pattern': ((b,), np.int32), 'occ_mask': ((b, H, W), np.uint8),
              'contam_mask': ((b, H, W), np.uint8), 'pid': ((b,), np.int32), 'camid': ((b,), np.int32), 'index': ((b,), np.int32),
              'num_skipped': ((b,), np.int32),
              # The donor boxes, pasted by the train step (data/donor_exchange.py).
              'row': ((b,), np.int32), 'donor_row': ((b,), np.int32),
              'donor_box': ((b, 6), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  ids = batch['pid'].reshape(4, 2)
  assert (ids == ids[:, :1]).all() and len(set(ids[:, 0].tolist())) == 4
  np.testing.assert_array_equal(batch['pid'], train_split.pids[batch['index']])
  np.testing.assert_array_equal(batch['camid'], train_split.camids[batch['index']])
  outside = batch['occ_mask'] == 0
  np.testing.assert_array_equal(batch['image'][outside], batch['occluded'][outside])
  assert ((batch['pattern'] == 0) == (batch['occ_mask'].reshape(b, -1).sum(1) == 0)).all()
  assert batch['image'].max() > 0  # pixels, not an empty canvas


_normalize = jax.jit(augment.normalize_on_device, static_argnums=(1, 2))


def test_device_normalisation_reproduces_the_host_float_path(train_split):
  """uint8 batches normalised on the device equal the float batches the host used to build:
  each row's view is rebuilt from its own generators and normalised on the host."""
  config = make_config({'input.pad': 3, 'input.erase_prob': 1.0, 'input.flip_prob': 0.5},
                       preset='pipeline')
  config.input.mean, config.input.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  mean, std = tuple(config.input.mean), tuple(config.input.std)
  it = pipeline.make_train_iterator(train_split, config)
  batches = take(it, 2)
  it.close()
  spec = augment.augment_spec(config)
  step_unit = 1.0 / (255.0 * min(std))  # one uint8 quantisation step in normalised units
  for step, batch in enumerate(batches):
    for key in ('image', 'occluded'):
      device = np.asarray(_normalize(batch[key], mean, std))
      host = augment.normalize(batch[key], mean, std)
      assert device.dtype == np.float32
      np.testing.assert_allclose(device, host, rtol=0, atol=1e-6, err_msg=key)
    for row, index in enumerate(batch['index']):
      rng = pipeline._row_rng(config.seed, step, row, pipeline._AUGMENT_STREAM)  # pylint: disable=protected-access
      view = augment.train_augment(image_io.load_image(train_split.paths[index], size=(H, W)),
                                   spec, rng)
      old_float = augment.normalize(view, mean, std)
      new = np.asarray(_normalize(batch['image'][row], mean, std))
      assert np.abs(new - old_float).max() <= min(1e-6, step_unit)
  # Float input is read as pixels too, so a planted NaN survives the normalisation.
  assert np.isnan(np.asarray(_normalize(np.full((2, 3), np.nan, np.float32), mean, std))).all()


def test_random_erasing_fills_uniform_uint8_noise():
  spec = augment.AugmentSpec(height=64, width=32, erase_prob=1.0, erase_area=(0.3, 0.3),
                             erase_min_aspect=1.0)
  image = np.full((64, 32, 3), 7, np.uint8)
  out = augment.random_erase(image, 1.0, spec.erase_area, spec.erase_min_aspect,
                             np.random.default_rng(0))
  box = out != 7
  assert out.dtype == np.uint8 and 0.25 < box.mean() < 0.31  # the box, less the few 7s drawn
  values = out[box.any(axis=2)]
  # Uniform over 0..255: mean about 127.5, both ends reached.
  assert abs(values.mean() - 127.5) < 5 and values.min() < 5 and values.max() > 250


def test_epochs_follow_the_sampler_and_start_epoch(train_split):
  config = make_config(preset='pipeline')
  spe = pipeline.steps_per_epoch(train_split, config)
  it = pipeline.make_train_iterator(train_split, config)
  batches = take(it, spe + 1)
  it.close()
  later = pipeline.make_train_iterator(train_split, config, start_epoch=1)
  _assert_same(batches[spe:], take(later, 1))
  later.close()
  assert not np.array_equal(batches[0]['index'], batches[spe]['index'])
  config.train.steps_per_epoch = 1
  assert pipeline.steps_per_epoch(train_split, config) == 1


@pytest.mark.parametrize('extra', [-1, 1])
def test_configured_epoch_length_maps_onto_sampler_draws(train_split, extra):
  # Shorter than one sampler draw: epoch e is the first steps of draw e. Longer: it continues
  # into the next draw, and epoch e starts at draw 2e (two draws per epoch).
  config = make_config(preset='pipeline')
  natural = pipeline.steps_per_epoch(train_split, config)
  config.train.steps_per_epoch = natural + extra
  assert pipeline.steps_per_epoch(train_split, config) == natural + extra
  it = pipeline.make_train_iterator(train_split, config)
  indices = [b['index'] for b in take(it, 2 * (natural + extra))]
  it.close()
  P, K = config.input.ids_per_batch, config.input.images_per_id
  draw = lambda d: sampler.epoch_batches(train_split.pids, P, K, config.seed, d)
  if extra < 0:
    expected = list(draw(0)[:natural - 1]) + list(draw(1)[:natural - 1])
  else:
    expected = list(draw(0)) + [draw(1)[0]] + list(draw(2)) + [draw(3)[0]]
  for got, want in zip(indices, expected, strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('donor_exchange', ['host', 'device'])
def test_process_slices_concatenate_to_the_global_batch(train_split, donor_exchange):
  # prob=1 with donor-based patterns only: most donors sit in the other process's half, which
  # must rebuild exactly the pixels the single-process run uses ('host'), or leave the same
  # boxes to the devices ('device').
  config = make_config({'input.donor_exchange': donor_exchange}, preset='pipeline')
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
    pipeline.make_train_iterator(train_split, make_config(preset='pipeline'), process_index=0,
                                 process_count=3)


def test_restore_resumes_bitwise(train_split):
  config = make_config(preset='pipeline')
  it = pipeline.make_train_iterator(train_split, config)
  reference = take(it, 7)
  it.close()
  it = pipeline.make_train_iterator(train_split, config)
  take(it, 4)
  state = it.get_state()
  it.close()
  assert state['step'] == 4
  restored = pipeline.make_train_iterator(train_split, config)
  restored.set_state(state)
  _assert_same(reference[4:], take(restored, 3))
  assert restored.get_state()['step'] == 7
  restored.close()


def test_two_workers_match_the_main_process_and_restore_across_worker_counts(train_split):
  config = make_config(preset='pipeline')
  it = pipeline.make_train_iterator(train_split, config)
  reference = take(it, 5)
  state = None
  it.close()
  config.input.num_workers = 2
  workers = pipeline.make_train_iterator(train_split, config)
  try:
    _assert_same(reference[:3], take(workers, 3))
    state = workers.get_state()
  finally:
    workers.close()
  config.input.num_workers = 0
  single = pipeline.make_train_iterator(train_split, config)
  single.set_state(state)
  _assert_same(reference[3:], take(single, 2))
  single.close()


@pytest.fixture()
def corrupt_split(tmp_path):
  # 8 ids x 2 images with K = 2: every image is in every epoch, so the bad file is always read.
  split = write_split(str(tmp_path), [2] * 8, seed=1)
  bad = 5
  with open(split.paths[bad], 'wb') as f:
    f.write(b'\xff\xd8 this is not a complete jpeg')
  return split, bad


def test_corrupt_image_fails_naming_the_file(corrupt_split):
  split, bad = corrupt_split
  it = pipeline.make_train_iterator(
      split, make_config({'input.corrupt_image_policy': 'fail'}, preset='pipeline'))
  spe = pipeline.steps_per_epoch(split, make_config(preset='pipeline'))
  with pytest.raises(image_io.CorruptImageError, match=os.path.basename(split.paths[bad])):
    take(it, spe)
  it.close()


def test_corrupt_image_fails_through_workers(corrupt_split):
  split, bad = corrupt_split
  it = pipeline.make_train_iterator(split, make_config(
      {'input.corrupt_image_policy': 'fail', 'input.num_workers': 2}, preset='pipeline'))
  spe = pipeline.steps_per_epoch(split, make_config(preset='pipeline'))
  try:
    with pytest.raises(image_io.CorruptImageError, match=os.path.basename(split.paths[bad])):
      take(it, spe)
  finally:
    it.close()


def test_corrupt_image_skip_replaces_with_same_identity(corrupt_split):
  split, bad = corrupt_split
  config = make_config({'input.corrupt_image_policy': 'skip'}, preset='pipeline')
  spe = pipeline.steps_per_epoch(split, config)
  it = pipeline.make_train_iterator(split, config)
  batches = take(it, spe)
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
    pipeline.make_train_iterator(
        train_split, make_config({'input.corrupt_image_policy': 'ignore'}, preset='pipeline'))


def test_too_few_identities_names_the_numbers(tmp_path):
  split = write_split(str(tmp_path), [2, 2, 2])
  with pytest.raises(ValueError, match=r'3 identities .*P = 4'):
    pipeline.make_train_iterator(split, make_config(preset='pipeline'))


def test_eval_shares_padding_and_valid_mask(tmp_path):
  split = write_split(str(tmp_path), [3, 4, 4], seed=2)  # 11 images
  config = make_config(preset='pipeline')  # eval batch 4 -> 2 per process with 2 processes
  n_batches = pipeline.eval_num_batches(split, config, process_count=2)
  assert n_batches == 3  # shares of 6 and 5 images, 2 per batch
  seen = []
  for p in range(2):
    batches = list(pipeline.make_eval_iterator(split, config, process_index=p, process_count=2))
    assert len(batches) == n_batches
    for batch in batches:
      assert batch['image'].shape == (2, H, W, 3) and batch['image'].dtype == np.uint8
      assert batch['valid'].dtype == bool
      valid = batch['valid']
      assert (batch['index'][~valid] == -1).all() and (batch['pid'][~valid] == -1).all()
      assert (batch['image'][~valid] == 0).all()
      for row in np.flatnonzero(valid):
        i = int(batch['index'][row])
        assert batch['pid'][row] == split.pids[i] and batch['camid'][row] == split.camids[i]
        pixels = image_io.load_image(split.paths[i], size=(H, W))
        np.testing.assert_array_equal(batch['image'][row], pixels)
        np.testing.assert_allclose(
            np.asarray(_normalize(batch['image'][row], tuple(config.input.mean),
                                  tuple(config.input.std))),
            augment.eval_transform(pixels, augment.augment_spec(config)), rtol=0, atol=1e-6)
      seen.extend(batch['index'][valid].tolist())
    assert sum(int(b['valid'].sum()) for b in batches) == (6 if p == 0 else 5)
  assert seen == list(range(len(split)))
  single = list(pipeline.make_eval_iterator(split, config))
  assert len(single) == pipeline.eval_num_batches(split, config) == 3
  assert [int(b['valid'].sum()) for b in single] == [4, 4, 3]


def test_eval_batch_must_divide_over_processes(tmp_path):
  split = write_split(str(tmp_path), [2, 2])
  with pytest.raises(ValueError, match='config.input.eval_batch_size'):
    pipeline.make_eval_iterator(split, make_config(preset='pipeline'), process_index=0,
                                process_count=3)


def _write_contaminated_split(root):
  """A training folder whose images are white exactly on their planted mask (black
  elsewhere), with the masks in the side file next to it, as the synthetic benchmark writes
  them; two images have no entry (clean)."""
  folder = os.path.join(root, 'bounding_box_train')
  os.makedirs(folder)
  rng = np.random.default_rng(5)
  paths, pids, camids, names, masks = [], [], [], [], []
  for pid in range(4):
    for k in range(2):
      name = f'{pid + 1:04d}_c{k + 1}_f{k:07d}.png'
      mask = np.zeros((H, W), bool)
      if (pid, k) not in ((0, 0), (2, 1)):
        y, x = rng.integers(0, H - 8), rng.integers(0, W - 6)
        mask[y:y + 8, x:x + 6] = True
        names.append(name)
        masks.append(np.packbits(mask, axis=-1))
      Image.fromarray(np.repeat((mask * 255).astype(np.uint8)[..., None], 3, -1)).save(
          os.path.join(folder, name))
      paths.append(os.path.join(folder, name))
      pids.append(pid)
      camids.append(k)
  np.savez(os.path.join(root, pipeline.CONTAMINATION_FILE), names=np.array(names),
           masks=np.stack(masks), types=np.array(['shapes'] * len(names)), height=H, width=W)
  return records.Split.from_lists(paths, pids, camids)


def test_contamination_mask_follows_the_augmentation(tmp_path):
  split = _write_contaminated_split(str(tmp_path))
  # Flips and shifts on; erasing off (the mask does not follow random erasing).
  config = make_config({'input.flip_prob': 0.5, 'input.pad': 4, 'input.erase_prob': 0.0},
                       preset='pipeline')
  config.occlusion.enabled = False
  it = pipeline.make_train_iterator(split, config)
  seen = 0
  for batch in take(it, 6):
    assert batch['contam_mask'].shape == (8, H, W) and batch['contam_mask'].dtype == np.uint8
    # The image is its own mask: wherever the view moved, the mask moved with it.
    np.testing.assert_array_equal(batch['contam_mask'], batch['image'][..., 0] >= 128)
    seen += int(batch['contam_mask'].any(axis=(1, 2)).sum())
  assert seen > 0
  it.close()
  ev = next(pipeline.make_eval_iterator(split, config))
  np.testing.assert_array_equal(ev['contam_mask'], ev['image'][..., 0] >= 128)
  assert ev['contam_mask'][ev['index'] == 0].sum() == 0  # no entry: clean


def test_no_side_file_means_no_contamination(train_split):
  batch = next(pipeline.make_train_iterator(train_split, make_config(preset='pipeline')))
  assert batch['contam_mask'].shape == (8, H, W) and not batch['contam_mask'].any()


def test_synthetic_contamination_reaches_train_and_eval_batches(tmp_path):
  from ogfr_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = synthetic.generate(str(tmp_path / 'syn'), dict(
      seed=1, num_train_ids=4, num_test_ids=3, images_per_id=4, num_cameras=2, height=2 * H,
      width=2 * W, clutter_fraction=0.5, occluded_query_fraction=1.0))
  data = datasets.get_dataset('synthetic', root)
  side = synthetic.load_side_info(root)

  def stored(split, i):
    return side.get(os.path.basename(split.paths[i]), {}).get('clutter_mask')

  # Eval: the stored mask at the model input size, zeros for clean images and padding.
  config = make_config({'input.eval_batch_size': 8}, preset='pipeline')
  for split in (data.train, data.query, data.gallery):
    planted = 0
    for batch in pipeline.make_eval_iterator(split, config):
      for row, i in enumerate(batch['index']):
        want = stored(split, i) if i >= 0 else None
        got = batch['contam_mask'][row]
        if want is None:
          assert not got.any()
        else:
          np.testing.assert_array_equal(got, augment.resize_mask(want, H, W))
          planted += 1
    assert planted == sum(stored(split, i) is not None for i in range(len(split)))
    assert (planted > 0) == (split is not data.query)
  # Train: rows of contaminated images carry their mask (moved with the view), others zeros.
  config = make_config({'input.erase_prob': 0.0, 'input.pad': 0, 'input.flip_prob': 0.0},
                       preset='pipeline')
  it = pipeline.make_train_iterator(data.train, config)
  seen = 0
  for batch in take(it, 4):
    for row, i in enumerate(batch['index']):
      want = stored(data.train, i)
      if want is None:
        assert not batch['contam_mask'][row].any()
      else:
        np.testing.assert_array_equal(batch['contam_mask'][row],
                                      augment.resize_mask(want, H, W))
        seen += 1
  it.close()
  assert seen > 0


def test_contamination_masks_survive_resume(tmp_path):
  from ogfr_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = synthetic.generate(str(tmp_path / 'syn'), dict(
      seed=2, num_train_ids=4, num_test_ids=2, images_per_id=4, num_cameras=2, height=H,
      width=W, clutter_fraction=1.0, occluded_query_fraction=1.0))
  train = datasets.get_dataset('synthetic', root).train
  config = make_config(preset='pipeline')
  first = pipeline.make_train_iterator(train, config)
  take(first, 2)
  state = first.get_state()
  expected = take(first, 2)
  first.close()
  again = pipeline.make_train_iterator(train, config)
  again.set_state(state)
  got = take(again, 2)
  again.close()
  _assert_same(expected, got)
  assert all(b['contam_mask'].any() for b in got)
