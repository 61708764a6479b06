"""TFDS builders: every supported layout to ArrayRecord and back, as the folder reader sees it."""

import os
import pickle

import grain
import numpy as np
import pytest

import dataset_fixtures as fx
from ogfr_jax.data import arrayrecord_source
from ogfr_jax.data import datasets
from ogfr_jax.data import image_io
from ogfr_jax.data import tfds_builders


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """{layout: (FixtureTree, builder folder)} with every layout built once."""
  tmp = tmp_path_factory.mktemp('tfds')
  out = {}
  for layout, make in fx.ALL_LAYOUTS.items():
    tree = make(tmp / 'src' / layout)
    out[layout] = (tree, tfds_builders.build(tree.name, str(tree.root), str(tmp / 'data')))
  return out


@pytest.mark.parametrize('layout', sorted(fx.ALL_LAYOUTS))
def test_records_equal_the_folder_reader(prepared, layout):
  tree, builder_dir = prepared[layout]
  ref = datasets.get_dataset(tree.name, str(tree.root))
  got = arrayrecord_source.dataset_splits(builder_dir)
  assert got.name == tree.name
  for name in arrayrecord_source.SPLITS:
    want, have = getattr(ref, name), getattr(got, name)
    assert list(have.paths) == [os.path.relpath(p, ref.root) for p in want.paths]
    np.testing.assert_array_equal(have.pids, want.pids)
    np.testing.assert_array_equal(have.camids, want.camids)
    # The stats a training run prints are the same from either source.
    assert have.stats() == want.stats() == tree.stats()[name]
  source = arrayrecord_source.ArrayRecordSplit(builder_dir, 'query')
  for i, path in enumerate(ref.query.paths):
    record = source[i]
    assert record['image'] == open(path, 'rb').read()  # the file's bytes, unchanged


def test_grain_reads_decoded_images(prepared):
  tree, builder_dir = prepared['occluded_reid']  # .tif files
  ref = datasets.get_dataset(tree.name, str(tree.root))
  source = arrayrecord_source.ArrayRecordSplit(builder_dir, 'gallery')
  ds = grain.MapDataset.source(source).map(arrayrecord_source.DecodeImage((32, 16)))
  items = list(ds.to_iter_dataset())
  assert len(items) == len(ref.gallery)
  for item, path, pid, camid in zip(items, ref.gallery.paths, ref.gallery.pids,
                                    ref.gallery.camids):
    np.testing.assert_array_equal(item['image'], image_io.load_image(path, size=(32, 16)))
    assert (item['pid'], item['camid']) == (pid, camid)
  # grain workers receive the source pickled: it reopens its files on the other side.
  clone = pickle.loads(pickle.dumps(source))
  assert len(clone) == len(source) and clone[1] == source[1]


def test_msmt17_train_val_config(tmp_path):
  tree = fx.make_msmt17(tmp_path / 'src')
  plain = tfds_builders.build('msmt17', str(tree.root), str(tmp_path / 'data'))
  merged = tfds_builders.build('msmt17', str(tree.root), str(tmp_path / 'data'),
                               merge_train_val=True)
  assert plain != merged
  for builder_dir, records in ((plain, tree.expected['train']),
                               (merged, tree.merged_train)):
    train = arrayrecord_source.split(builder_dir, 'train')
    assert sorted(train.paths) == sorted(r[0] for r in records)


def test_test_only_sets_have_no_train_split(prepared):
  _, builder_dir = prepared['partial_ilids']
  with pytest.raises(ValueError, match="no split 'train'"):
    arrayrecord_source.ArrayRecordSplit(builder_dir, 'train')
  assert len(arrayrecord_source.dataset_splits(builder_dir).train) == 0


def test_bad_input_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a folder'):
    tfds_builders.build('market1501', str(tmp_path / 'missing'), str(tmp_path / 'data'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='bounding_box_train'):
    tfds_builders.build('market1501', str(tmp_path / 'empty'), str(tmp_path / 'data'))
  with pytest.raises(ValueError, match='no TFDS builder'):
    tfds_builders.builder('cuhk03', str(tmp_path))
  with pytest.raises(ValueError, match='msmt17 option'):
    tfds_builders.builder('market1501', str(tmp_path), merge_train_val=True)
  with pytest.raises(FileNotFoundError, match='dataset_info.json'):
    arrayrecord_source.ArrayRecordSplit(str(tmp_path), 'query')
