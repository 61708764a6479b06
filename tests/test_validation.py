"""The validation split carved from the training identities (dataset.val_ids)."""

import numpy as np
import pytest

from ogfr_jax import config_defaults
from ogfr_jax.data import loading
from ogfr_jax.data import records
from ogfr_jax.data import synthetic
from ogfr_jax.data import validation


def fabricated(num_ids=10, per_id=6, cams=3):
  paths, pids, camids = [], [], []
  for p in range(num_ids):
    for k in range(per_id):
      paths.append(f'/d/bounding_box_train/{p:04d}_c{k % cams + 1}s1_{k:06d}_00.jpg')
      pids.append(p)
      camids.append(k % cams)
  train = records.Split.from_lists(paths, pids, camids)
  empty = records.Split.from_lists([], [], [])
  return records.DatasetSplits('fab', '/d', train, empty, empty)


def test_held_out_identities_leave_training_and_are_relabelled():
  data = fabricated()
  training, val = validation.carve(data, 3)
  held = validation.held_out_labels(data.train, 3)
  assert held.size == 3 and np.unique(held).size == 3
  assert training.train.num_ids == 7
  np.testing.assert_array_equal(np.unique(training.train.pids), np.arange(7))
  held_paths = {p for p, pid in zip(data.train.paths, data.train.pids) if pid in held}
  assert not held_paths & set(training.train.paths)
  assert set(val.query.paths) | set(val.gallery.paths) == held_paths
  assert not set(val.query.paths) & set(val.gallery.paths)
  # Labels follow their images: each held-out image keeps its own identity (+1).
  own = dict(zip(data.train.paths, data.train.pids))
  for split in (val.query, val.gallery):
    for path, pid in zip(split.paths, split.pids):
      assert pid == own[path] + 1
  assert val.train is training.train


def test_one_query_per_identity_and_camera_without_occlusion_record():
  training, val = validation.carve(fabricated(), 4)
  keys = list(zip(val.query.pids.tolist(), val.query.camids.tolist()))
  assert len(keys) == len(set(keys)) == 4 * 3
  assert len(val.gallery) == 4 * 6 - 12
  del training


def test_recorded_occluded_images_are_the_queries():
  data = fabricated()
  held = validation.held_out_labels(data.train, 2)
  names = [p.rsplit('/', 1)[-1] for p in data.train.paths]
  occluded = {n for n, pid in zip(names, data.train.pids) if pid in held and n.endswith('1_00.jpg')}
  occluded.add(names[0] if data.train.pids[0] not in held else names[-1])  # not held out
  _, val = validation.carve(data, 2, occluded)
  assert {p.rsplit('/', 1)[-1] for p in val.query.paths} == {
      n for n in occluded if n.endswith('1_00.jpg')}
  with pytest.raises(ValueError, match='val_ids'):
    validation.carve(data, 2, set())


@pytest.mark.parametrize('n', [0, 10, -1])
def test_bad_count_names_the_field(n):
  with pytest.raises(ValueError, match=r'config\.dataset\.val_ids'):
    validation.carve(fabricated(), n)


def test_load_data_on_the_synthetic_benchmark(tmp_path):
  c = config_defaults.extend(config_defaults.base_config(), 'synthetic')
  c.synthetic.update(dict(seed=3, num_train_ids=8, num_test_ids=4, images_per_id=6,
                          num_cameras=3, height=48, width=24, occluded_train_fraction=0.3))
  c.dataset.root = str(tmp_path)
  full, test = loading.load_data(c)
  c.dataset.val_ids = 3
  train, val = loading.load_data(c)
  assert train.train.num_ids == 5 and val.name == 'synthetic-val'
  assert test.query.paths != val.query.paths
  side = synthetic.load_side_info(full.root, ('train',))
  # Every query carries a recorded occluder; the gallery holds the other held-out images.
  assert len(val.query) > 0
  assert all(side.get(p.rsplit('/', 1)[-1], {}).get('occluder_type') for p in val.query.paths)
  assert len(val.query) + len(val.gallery) + len(train.train) == len(full.train)
