"""Dataset readers on fixture trees in the public layouts, and the inspect command."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ogfr_jax.data import datasets
from ogfr_jax.data.records import DatasetSplits

import dataset_fixtures as fx

REPO = pathlib.Path(__file__).resolve().parent.parent


def _records(split, root) -> list[tuple[str, int, int]]:
  return [(pathlib.Path(p).relative_to(root).as_posix(), int(i), int(c))
          for p, i, c in zip(split.paths, split.pids, split.camids)]


def _by_original_pid(split, root, expected) -> dict[int, set[int]]:
  """original pid -> set of labels the reader gave its images (matched by path)."""
  original = {rel: pid for rel, pid, _ in expected}
  out: dict[int, set[int]] = {}
  for rel, label, _ in _records(split, root):
    out.setdefault(original[rel], set()).add(label)
  return out


@pytest.fixture(params=sorted(fx.ALL_LAYOUTS))
def tree(request, tmp_path) -> fx.FixtureTree:
  return fx.ALL_LAYOUTS[request.param](tmp_path)


def test_registry_lists_every_layout():
  assert set(datasets.dataset_names()) == {
      'market1501', 'dukemtmc', 'occluded_duke', 'occluded_reid', 'partial_reid',
      'partial_ilids', 'msmt17', 'synthetic'}


def test_register_rejects_a_duplicate_name():
  with pytest.raises(ValueError, match='market1501'):
    datasets.register('market1501')(lambda root: None)


def test_reader_finds_exactly_the_expected_records(tree):
  splits = datasets.get_dataset(tree.name, tree.root)
  assert isinstance(splits, DatasetSplits)
  assert splits.name == tree.name
  assert splits.root == str(tree.root)
  for subset in ('query', 'gallery'):
    got = _records(getattr(splits, subset), tree.root)
    assert sorted(got) == sorted(tree.expected[subset]), subset
  # Train: same files and cameras; labels are 0..N-1 by sorted original pid.
  order = sorted({pid for _, pid, _ in tree.expected['train']})
  want_train = sorted((rel, order.index(pid), cam) for rel, pid, cam in tree.expected['train'])
  assert sorted(_records(splits.train, tree.root)) == want_train
  assert dict(splits.ignored) == tree.ignored
  assert splits.stats() == tree.stats()
  for split in (splits.train, splits.query, splits.gallery):
    assert list(split.paths) == sorted(split.paths)
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in split.paths)
    assert split.pids.dtype == np.int32 and split.camids.dtype == np.int32


def test_market_conventions(tmp_path):
  tree = fx.make_market1501(tmp_path)
  splits = datasets.get_dataset('market1501', tree.root)
  names = [os.path.basename(p) for s in (splits.train, splits.query, splits.gallery)
           for p in s.paths]
  assert not any(n.startswith('-1_') for n in names)  # junk dropped everywhere
  assert (splits.gallery.pids == 0).sum() == 2  # both distractors kept in the gallery
  assert 0 not in splits.query.pids
  # Original train ids 2, 7, 15, 100 become 0, 1, 2, 3.
  assert _by_original_pid(splits.train, tree.root, tree.expected['train']) == {
      2: {0}, 7: {1}, 15: {2}, 100: {3}}
  # Cameras c1..c6 on disk are 0..5.
  assert sorted(set(splits.train.camids.tolist())) == [0, 1, 2, 3, 4, 5]
  assert splits.num_cameras == 6
  assert splits.num_train_ids == 4


def test_distractor_in_train_or_query_is_dropped(tmp_path):
  tree = fx.make_market1501(tmp_path)
  fx.write_image(tree.root / 'bounding_box_train' / '0000_c1s1_000001_01.jpg')
  fx.write_image(tree.root / 'query' / '0000_c2s1_000001_01.jpg')
  splits = datasets.get_dataset('market1501', tree.root)
  assert 0 not in [pid for _, pid, _ in _records(splits.query, tree.root)]
  assert splits.stats() == tree.stats()


def test_relabel_follows_sorted_ids_not_disk_order(tmp_path):
  tree = fx.make_occluded_duke(tmp_path)
  splits = datasets.get_dataset('occluded_duke', tree.root)
  assert _by_original_pid(splits.train, tree.root, tree.expected['train']) == {
      8: {0}, 64: {1}, 905: {2}}


def test_unparseable_image_name_warns_with_example(tmp_path, caplog):
  tree = fx.make_market1501(tmp_path)
  with caplog.at_level(logging.WARNING):
    datasets.get_dataset('market1501', tree.root)
  assert 'IMG_0001.jpg' in caplog.text and 'query' in caplog.text


def test_camera_zero_on_disk_is_not_a_camera(tmp_path):
  tree = fx.make_dukemtmc(tmp_path)
  fx.write_image(tree.root / 'query' / '0020_c0_f0000001.jpg')
  splits = datasets.get_dataset('dukemtmc', tree.root)
  assert splits.stats() == tree.stats()
  assert splits.ignored['query'] == 1
  assert splits.query.camids.min() >= 0


@pytest.mark.parametrize('ext', ['.jpg', '.TIF', '.tiff'])
def test_occluded_reid_extension_variants(tmp_path, ext):
  tree = fx.make_occluded_reid(tmp_path, ext=ext)
  splits = datasets.get_dataset('occluded_reid', tree.root)
  assert splits.stats() == tree.stats()
  assert len(splits.train) == 0
  assert set(splits.query.camids.tolist()) == {0}
  assert set(splits.gallery.camids.tolist()) == {1}


def test_test_only_sets_never_use_the_image_index_as_camera(tmp_path):
  tree = fx.make_partial_reid(tmp_path)
  splits = datasets.get_dataset('partial_reid', tree.root)
  # Query images 001_01 and 001_02 differ only in the index: same camera.
  assert set(splits.query.camids.tolist()) == {0}
  assert set(splits.gallery.camids.tolist()) == {1}
  assert not any('occluded_body_images' in p for p in splits.query.paths + splits.gallery.paths)


@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_msmt17_train_only_by_default(tmp_path, version):
  tree = fx.make_msmt17(tmp_path, version)
  splits = datasets.get_dataset('msmt17', tree.root)
  assert splits.stats() == tree.stats()
  assert _by_original_pid(splits.train, tree.root, tree.expected['train']) == {
      0: {0}, 4: {1}, 9: {2}}
  # Camera field 15 on disk is camera 14.
  assert splits.train.camids.max() == 14


@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_msmt17_merge_relabels_over_the_sorted_union(tmp_path, version):
  tree = fx.make_msmt17(tmp_path, version)
  splits = datasets.get_dataset('msmt17', tree.root, merge_train_val=True)
  assert splits.stats() == tree.stats(merged=True)
  assert len(splits.train) == 7
  # Train ids {0, 4, 9} and val ids {4, 6}: pid 4 from either list gets the same label.
  assert _by_original_pid(splits.train, tree.root, tree.merged_train) == {
      0: {0}, 4: {1}, 6: {2}, 9: {3}}


def test_msmt17_bad_list_line_names_file_and_line(tmp_path):
  tree = fx.make_msmt17(tmp_path)
  list_path = tree.root / 'list_query.txt'
  lines = list_path.read_text().splitlines()
  lines.insert(1, 'this line has three fields')
  list_path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=r'list_query\.txt, line 2'):
    datasets.get_dataset('msmt17', tree.root)


def test_msmt17_unreadable_camera_names_file_and_line(tmp_path):
  tree = fx.make_msmt17(tmp_path)
  list_path = tree.root / 'list_gallery.txt'
  list_path.write_text(list_path.read_text() + '0001/0001_bad.jpg 1\n')
  with pytest.raises(ValueError, match=r'list_gallery\.txt, line 5.*0001_bad\.jpg'):
    datasets.get_dataset('msmt17', tree.root)


def test_msmt17_missing_image_is_named(tmp_path):
  tree = fx.make_msmt17(tmp_path)
  rel = tree.expected['gallery'][2][0]
  os.remove(tree.root / rel)
  with pytest.raises(FileNotFoundError) as e:
    datasets.get_dataset('msmt17', tree.root)
  assert str(tree.root / rel) in str(e.value) and 'list_gallery.txt' in str(e.value)


def test_msmt17_missing_list_and_folders(tmp_path):
  tree = fx.make_msmt17(tmp_path)
  os.remove(tree.root / 'list_val.txt')
  datasets.get_dataset('msmt17', tree.root)  # val is not needed unless merging
  with pytest.raises(FileNotFoundError, match='list_val.txt'):
    datasets.get_dataset('msmt17', tree.root, merge_train_val=True)
  shutil.rmtree(tree.root / 'train')
  with pytest.raises(FileNotFoundError, match='mask_train_v2'):
    datasets.get_dataset('msmt17', tree.root)


def test_missing_folder_is_named(tmp_path):
  tree = fx.make_market1501(tmp_path)
  shutil.rmtree(tree.root / 'query')
  with pytest.raises(FileNotFoundError) as e:
    datasets.get_dataset('market1501', tree.root)
  assert str(tree.root / 'query') in str(e.value) and 'market1501' in str(e.value)


def test_root_one_level_too_high_gets_a_hint(tmp_path):
  tree = fx.make_occluded_reid(tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    datasets.get_dataset('occluded_reid', tmp_path)
  assert str(tmp_path / 'occluded_body_images') in str(e.value)
  assert str(tree.root) in str(e.value)


def test_empty_query_or_gallery_is_an_error(tmp_path):
  tree = fx.make_partial_ilids(tmp_path)
  for p in (tree.root / 'partial_body_images').glob('*.jpg'):
    p.unlink()
  with pytest.raises(datasets.DatasetError) as e:
    datasets.get_dataset('partial_ilids', tree.root)
  # The folder, what was expected there, and what was found instead.
  assert f'query is empty: no usable images in {tree.root / "partial_body_images"} ' \
      '(expected image files named like <pid>.jpg; found none)' in str(e.value)
  tree = fx.make_dukemtmc(tmp_path / 'duke')
  for p in (tree.root / 'bounding_box_test').iterdir():
    p.unlink()
  with pytest.raises(datasets.DatasetError, match='gallery is empty'):
    datasets.get_dataset('dukemtmc', tree.root)
  # A query folder of junk images only: empty after the protocol's drops, and says why.
  tree = fx.make_market1501(tmp_path / 'market')
  for p in (tree.root / 'query').iterdir():
    p.unlink()
  fx.write_image(tree.root / 'query' / '-1_c1s1_000001_01.jpg')
  with pytest.raises(datasets.DatasetError) as e:
    datasets.get_dataset('market1501', tree.root)
  assert str(tree.root / 'query') in str(e.value)
  assert 'found 1 junk image(s) (pid -1)' in str(e.value)
  assert '0002_c1s1_000451_03.jpg' in str(e.value)


def test_folder_of_foreign_names_is_an_error_naming_folder_pattern_and_names(tmp_path):
  """DukeMTMC-reID read as Market-1501: no name parses. The reader says so for the first
  folder, instead of an empty training split that fails later in the sampler."""
  tree = fx.make_dukemtmc(tmp_path)
  with pytest.raises(datasets.DatasetError) as e:
    datasets.get_dataset('market1501', tree.root)
  msg = str(e.value)
  assert str(tree.root / 'bounding_box_train') in msg
  assert '<pid>_c<camera>s<sequence>_<frame>_<box>.jpg, e.g. 0002_c1s1_000451_03.jpg' in msg
  first = sorted(p.name for p in (tree.root / 'bounding_box_train').glob('*.jpg'))[:3]
  assert first and all(name in msg for name in first), (first, msg)
  assert '\n' not in msg
  # Only the training folder renamed (query and gallery fine): still named, still an error.
  tree = fx.make_market1501(tmp_path / 'market')
  for i, p in enumerate(sorted((tree.root / 'bounding_box_train').glob('*.jpg'))):
    p.rename(p.with_name(f'person{i:03d}.jpg'))
  with pytest.raises(datasets.DatasetError, match=r'bounding_box_train.*person000\.jpg'):
    datasets.get_dataset('market1501', tree.root)
  # Test-only layouts too.
  tree = fx.make_partial_reid(tmp_path / 'partial')
  for p in (tree.root / 'whole_body_images').glob('*.jpg'):
    p.rename(p.with_name('img_' + p.name))
  with pytest.raises(datasets.DatasetError, match=r'whole_body_images.*<pid>_<k>\.jpg.*img_'):
    datasets.get_dataset('partial_reid', tree.root)


def test_data_errors_are_dataset_errors(tmp_path):
  """Every user-facing reader error is a DatasetError (so entry points print one line) and
  keeps its older type (ValueError, FileNotFoundError) for callers that catch those."""
  tree = fx.make_market1501(tmp_path)
  shutil.rmtree(tree.root / 'query')
  with pytest.raises(datasets.DatasetNotFoundError) as e:
    datasets.get_dataset('market1501', tree.root)
  assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, datasets.DatasetError)
  for name, root, kwargs in (('market', tmp_path, {}), ('market1501', '', {}),
                             ('market1501', tmp_path / 'none', {}),
                             ('market1501', tree.root, {'merge_train_val': True})):
    with pytest.raises(datasets.DatasetError):
      datasets.get_dataset(name, root, **kwargs)


def test_sampler_on_an_empty_or_too_small_train_split():
  from ogfr_jax.data import sampler
  with pytest.raises(datasets.DatasetError, match='train split has no images'):
    sampler.steps_per_epoch(np.zeros((0,), np.int64), 4, 2)
  with pytest.raises(datasets.DatasetError, match=r'3 identities .*P = 4'):
    sampler.steps_per_epoch(np.array([0, 1, 2, 2]), 4, 2)


def test_unknown_dataset_lists_known_names(tmp_path):
  with pytest.raises(ValueError) as e:
    datasets.get_dataset('market', tmp_path)
  for name in datasets.dataset_names():
    assert name in str(e.value)


def test_bad_options_and_roots(tmp_path):
  tree = fx.make_market1501(tmp_path)
  with pytest.raises(ValueError, match='msmt17 only'):
    datasets.get_dataset('market1501', tree.root, merge_train_val=True)
  with pytest.raises(ValueError, match='merge_tran_val'):
    datasets.get_dataset('msmt17', tree.root, merge_tran_val=True)
  with pytest.raises(FileNotFoundError, match='does_not_exist'):
    datasets.get_dataset('market1501', tmp_path / 'does_not_exist')
  with pytest.raises(ValueError, match='no root'):
    datasets.get_dataset('market1501', '')


# ------------------------------------------------------------------------------------------------
# python -m ogfr_jax.data.inspect


def _inspect(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, '-m', 'ogfr_jax.data.inspect', *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


def test_inspect_json_for_every_layout(tmp_path):
  for name, make in sorted(fx.ALL_LAYOUTS.items()):
    tree = make(tmp_path / name)
    result = _inspect('--dataset', name, '--root', str(tree.root), '--json')
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert json.loads(last) == tree.stats(), name
    assert '# ids' in result.stdout and 'gallery' in result.stdout
    for folder, count in tree.ignored.items():
      assert f'{folder}: {count}' in result.stdout, name


def test_inspect_msmt17_merge(tmp_path):
  tree = fx.make_msmt17(tmp_path, 'v2')
  result = _inspect('--dataset', 'msmt17', '--root', str(tree.root), '--json',
                    '--merge_train_val')
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout.strip().splitlines()[-1]) == tree.stats(merged=True)


def test_inspect_expected_errors_are_one_line(tmp_path):
  tree = fx.make_market1501(tmp_path)
  shutil.rmtree(tree.root / 'bounding_box_test')
  for args, needle in (
      (('--dataset', 'market1501', '--root', str(tree.root)),
       str(tree.root / 'bounding_box_test')),
      (('--dataset', 'no_such_set', '--root', str(tree.root)), 'market1501')):
    result = _inspect(*args, '--json')
    assert result.returncode != 0
    assert result.stdout == ''
    assert 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0]
