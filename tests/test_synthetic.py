"""The embedded synthetic benchmark: determinism, Market-1501 layout, protocol promises, side
files (occluder and contamination masks), gallery contamination and its clean twin, held-out
occluder types, the cache and its version check, and token scoring of clutter masks."""

import dataclasses
import json
import os
import re
import socket

import numpy as np
import pytest
from PIL import Image

from ogfr_jax import config_defaults
from ogfr_jax.data import synthetic, synthetic_cache, synthetic_render

MARKET_NAME = re.compile(r'^(\d{4})_c([1-9])s(\d)_(\d{6})_(\d{2})\.jpg$')
SPLITS = ('train', 'query', 'gallery')


def tiny(**overrides) -> dict:
  cfg = dict(seed=3, num_train_ids=5, num_test_ids=4, images_per_id=5, num_cameras=3, height=48,
             width=24, clutter_fraction=0.5, occluded_query_fraction=1.0)
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('syn') / 'data')
  return synthetic.generate(root, tiny())


def files(root: str, split: str) -> list[str]:
  return sorted(os.listdir(os.path.join(root, synthetic.SPLIT_DIRS[split])))


def parsed(root: str, split: str) -> list[tuple[str, int, int]]:
  out = []
  for name in files(root, split):
    m = MARKET_NAME.match(name)
    assert m, f'{split}/{name} does not follow the Market-1501 naming'
    out.append((name, int(m.group(1)), int(m.group(2)) - 1))
  return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path, dataset):
  again = synthetic.generate(str(tmp_path / 'again'), tiny())
  other = synthetic.generate(str(tmp_path / 'other'), tiny(seed=4))
  for split in SPLITS:
    assert files(dataset, split) == files(again, split)
    for name in files(dataset, split):
      path = os.path.join(synthetic.SPLIT_DIRS[split], name)
      with open(os.path.join(dataset, path), 'rb') as a, open(os.path.join(again, path),
                                                              'rb') as b:
        assert a.read() == b.read(), path
  for side in ('masks.npz', 'clutter.npz'):
    with np.load(os.path.join(dataset, side)) as a, np.load(os.path.join(again, side)) as b:
      assert sorted(a.files) == sorted(b.files)
      for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
  name = files(dataset, 'train')[0]
  first = np.asarray(Image.open(os.path.join(dataset, 'bounding_box_train', name)))
  theirs = [f for f in files(other, 'train') if f[:4] == name[:4]][0]
  second = np.asarray(Image.open(os.path.join(other, 'bounding_box_train', theirs)))
  assert np.abs(first.astype(int) - second.astype(int)).mean() > 5


def test_worker_processes_do_not_change_the_output(tmp_path, dataset):
  parallel = synthetic.generate(str(tmp_path / 'parallel'), tiny(), workers=2)
  for split in SPLITS:
    assert files(parallel, split) == files(dataset, split)
    for name in files(dataset, split)[::4]:
      path = os.path.join(synthetic.SPLIT_DIRS[split], name)
      with open(os.path.join(dataset, path), 'rb') as a, open(os.path.join(parallel, path),
                                                              'rb') as b:
        assert a.read() == b.read(), path
  with open(os.path.join(dataset, 'meta.json')) as a, open(os.path.join(parallel,
                                                                        'meta.json')) as b:
    assert a.read() == b.read()
  for side in ('masks.npz', 'clutter.npz'):
    with np.load(os.path.join(dataset, side)) as a, np.load(os.path.join(parallel, side)) as b:
      assert sorted(a.files) == sorted(b.files)
      for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])


def test_market_layout_and_counts(dataset):
  with open(os.path.join(dataset, 'meta.json')) as f:
    meta = json.load(f)
  cfg = synthetic.resolve_config(tiny())
  assert meta['generator_version'] == synthetic.GENERATOR_VERSION
  assert meta['config'] == cfg
  assert meta['occluder_types'] == list(synthetic.OCCLUDER_TYPES)
  for split in SPLITS:
    items = parsed(dataset, split)
    assert len(items) == meta['counts'][split]['images'] > 0
    assert all(0 <= cam < cfg['num_cameras'] for _, _, cam in items)
    pids = {pid for _, pid, _ in items}
    assert (0 in pids) == (split == 'gallery')  # distractors only in the gallery
    assert len(pids - {0}) == meta['counts'][split]['ids']
    for name, _, _ in items[:3]:
      img = Image.open(os.path.join(dataset, synthetic.SPLIT_DIRS[split], name))
      assert img.size == (cfg['width'], cfg['height']) and img.mode == 'RGB'
  assert meta['counts']['train']['images'] == cfg['num_train_ids'] * cfg['images_per_id']
  n_query = meta['counts']['query']['images']
  n_gallery_ids = meta['counts']['gallery']['images'] - meta['counts']['gallery']['distractors']
  assert n_query + n_gallery_ids == cfg['num_test_ids'] * cfg['images_per_id']
  assert meta['counts']['gallery']['distractors'] == round(0.1 * n_gallery_ids)


def test_train_and_test_ids_disjoint(dataset):
  train = {pid for _, pid, _ in parsed(dataset, 'train')}
  query = {pid for _, pid, _ in parsed(dataset, 'query')}
  gallery = {pid for _, pid, _ in parsed(dataset, 'gallery')} - {0}
  assert len(train) == 5 and len(query) == 4
  assert query == gallery
  assert not train & gallery
  assert min(train) == 1  # 0000 is reserved for distractors


def test_query_camera_never_in_gallery_of_same_id(dataset):
  gallery = {}
  for _, pid, cam in parsed(dataset, 'gallery'):
    gallery.setdefault(pid, set()).add(cam)
  for _, pid, cam in parsed(dataset, 'query'):
    assert gallery[pid], pid
    assert cam not in gallery[pid], (pid, cam, gallery[pid])


def test_train_ids_seen_by_several_cameras(dataset):
  cams = {}
  for _, pid, cam in parsed(dataset, 'train'):
    cams.setdefault(pid, set()).add(cam)
  assert all(len(c) >= 2 for c in cams.values())


def test_occluder_masks_exactly_for_occluded_images(dataset):
  info = synthetic.load_side_info(dataset)
  occluded = {n for n, e in info.items() if e['occluder_mask'] is not None}
  queries = set(files(dataset, 'query'))
  gallery = [n for n in files(dataset, 'gallery') if not n.startswith('0000')]
  assert queries <= occluded  # occluded_query_fraction = 1
  occluded_gallery = occluded - queries
  assert occluded_gallery <= set(gallery)
  assert len(occluded_gallery) == round(0.1 * len(gallery))
  for name in occluded:
    e = info[name]
    assert e['occluder_type'] in synthetic.OCCLUDER_TYPES
    assert e['occluder_mask'].shape == (48, 24) and e['occluder_mask'].dtype == bool
    assert 0.1 <= e['occluder_mask'].mean() <= 0.6, (name, e['occluder_mask'].mean())
  only_query = synthetic.load_side_info(dataset, splits=('query',))
  assert set(only_query) == queries


def test_half_the_queries_occluded(tmp_path):
  root = synthetic.generate(str(tmp_path / 'd'), tiny(
      occluded_query_fraction=0.5, images_per_id=8, clutter_fraction=0.0,
      contaminated_gallery_fraction=0.0))
  info = synthetic.load_side_info(root)
  queries = files(root, 'query')
  assert sum(n in info for n in queries) == round(0.5 * len(queries))
  assert not any(e['clutter_mask'] is not None for e in info.values())


def test_contamination_recorded_for_the_configured_fractions(dataset):
  info = synthetic.load_side_info(dataset)
  train, gallery = files(dataset, 'train'), files(dataset, 'gallery')
  with open(os.path.join(dataset, 'meta.json')) as f:
    counts = json.load(f)['counts']
  contaminated = {n for n, e in info.items() if e['clutter_mask'] is not None}
  in_train = contaminated & set(train)
  in_gallery = contaminated & set(gallery)
  assert contaminated == in_train | in_gallery  # never a query
  assert len(in_train) == round(0.5 * len(train)) == counts['train']['contaminated']
  holistic = [n for n in gallery if info.get(n, {}).get('occluder_mask') is None]
  # The default fraction of the holistic gallery images, distractors included.
  fraction = synthetic.OPTIONAL_FIELDS['contaminated_gallery_fraction']
  assert len(in_gallery) == round(fraction * len(holistic)) == counts['gallery']['contaminated']
  assert counts['query']['contaminated'] == 0
  pids = {split: {int(n[:4]) for n in files(dataset, split)} - {0}
          for split in ('train', 'gallery')}
  for name in contaminated:
    e = info[name]
    assert e['split'] in ('train', 'gallery')
    assert e['clutter_type'] in synthetic.CONTAMINATION_TYPES
    assert e['occluder_mask'] is None  # gallery contamination only on holistic images
    assert 0 < e['clutter_mask'].mean() < 0.5
    if e['clutter_type'] in synthetic.IDENTITY_CONTAMINATION:
      # Another identity of the image's own split wears it.
      assert e['clutter_source'] in pids[e['split']] - {int(name[:4])}, name
    else:
      assert e['clutter_source'] == 0
  kinds = {info[n]['clutter_type'] for n in contaminated}
  assert kinds == set(synthetic.OPTIONAL_FIELDS['contamination_types'])  # the default mixture


def test_masks_cover_exactly_the_pixels_that_change():
  """An image drawn with and without its occluder / contamination differs only inside the
  mask, for every contamination kind."""
  cfg = tiny(occluded_query_fraction=1.0, clutter_fraction=1.0)
  planned = synthetic.plan(cfg)
  queries = [it for it in planned if it.split == 'query'][:8]
  train = [it for it in planned if it.split == 'train']
  items = queries + [dataclasses.replace(it, clutter=kind, source=1 + (it.pid % 5))
                     for it, kind in zip(train[3::2], synthetic.CONTAMINATION_TYPES * 2)]
  assert len({it.occluder for it in queries}) >= 3
  assert {it.clutter for it in items} - {None} == set(synthetic.CONTAMINATION_TYPES)
  plain = [dataclasses.replace(it, occluder=None, clutter=None) for it in items]
  drawn = [r for _, r in synthetic.iter_images(cfg, items)]
  bare = [r for _, r in synthetic.iter_images(cfg, plain)]
  for it, with_, without in zip(items, drawn, bare):
    mask = with_.occluder_mask if it.occluder else with_.clutter_mask
    changed = np.any(with_.image != without.image, axis=-1)
    assert not changed[~mask].any(), it
    assert changed[mask].mean() > 0.5, it


def test_every_occluder_type_covers_a_part_and_leaves_the_rest():
  cfg = tiny()
  queries = [it for it in synthetic.plan(cfg) if it.split == 'query']
  variants = [dataclasses.replace(q, occluder=k) for q in queries
              for k in synthetic.OCCLUDER_TYPES]
  for it, r in synthetic.iter_images(cfg, variants):
    assert 0.15 <= r.occluder_mask.mean() <= 0.55, (it, r.occluder_mask.mean())
    hidden = np.count_nonzero(r.occluder_mask & r.person_mask) / r.person_mask.sum()
    assert hidden <= 0.7, (it, hidden)


def test_side_pedestrian_is_cut_by_the_border_and_behind_the_target():
  cfg = tiny()
  train = [it for it in synthetic.plan(cfg) if it.split == 'train']
  items = [dataclasses.replace(it, clutter='pedestrian', occluder=None,
                               source=1 + it.pid % 5) for it in train]
  lo, hi = synthetic_render._PEDESTRIAN_AREA
  for it, r in synthetic.iter_images(cfg, items):
    m = r.clutter_mask
    assert not (m & r.person_mask).any(), it  # the target is never hidden by it
    assert m[:, 0].any() or m[:, -1].any(), it  # partly outside the image
    assert lo - 0.06 <= m.mean() <= hi + 0.06, (it, m.mean())


def test_clean_twin_differs_only_in_the_contaminated_gallery_images(tmp_path, dataset):
  twin = synthetic.generate(str(tmp_path / 'twin'), tiny(contaminated_gallery_fraction=0.0))
  info = synthetic.load_side_info(dataset)
  twin_info = synthetic.load_side_info(twin)
  assert not any(e['clutter_mask'] is not None and e['split'] == 'gallery'
                 for e in twin_info.values())
  changed = 0
  for split in SPLITS:
    assert files(twin, split) == files(dataset, split)
    for name in files(dataset, split):
      path = os.path.join(synthetic.SPLIT_DIRS[split], name)
      same = open(os.path.join(dataset, path), 'rb').read() == open(
          os.path.join(twin, path), 'rb').read()
      contaminated = split == 'gallery' and info.get(name, {}).get('clutter_mask') is not None
      assert same != contaminated, path
      changed += not same
  assert changed > 0
  # Where they differ: test_masks_cover_exactly_the_pixels_that_change (before JPEG).


def test_held_out_occluders_only_in_queries(tmp_path):
  held = ('vehicle', 'board')
  root = synthetic.generate(str(tmp_path / 'held'), tiny(
      holdout_occluders=held, occluded_train_fraction=0.4, occluded_gallery_fraction=0.3,
      images_per_id=8))
  info = synthetic.load_side_info(root)
  by_split = {s: [e['occluder_type'] for e in info.values()
                  if e['split'] == s and e['occluder_type']] for s in SPLITS}
  assert by_split['query'] and set(by_split['query']) == set(held)
  for split in ('train', 'gallery'):
    assert by_split[split] and not set(by_split[split]) & set(held), split
  bank = json.load(open(os.path.join(root, synthetic.OCCLUDER_BANK_DIR, 'index.json')))
  assert bank and not {e['type'] for e in bank.values()} & set(held)
  with open(os.path.join(root, 'meta.json')) as f:
    assert json.load(f)['config']['holdout_occluders'] == ['vehicle', 'board']
  # The order of the names does not make another dataset.
  assert synthetic.config_hash(tiny(holdout_occluders=('board', 'vehicle'))) == (
      synthetic.config_hash(tiny(holdout_occluders=held)))
  assert synthetic.config_hash(tiny(holdout_occluders=held)) != synthetic.config_hash(tiny())


def test_holdout_config_file():
  import importlib.util  # noqa: PLC0415
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      'synthetic_holdout.py')
  spec = importlib.util.spec_from_file_location('holdout_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  p = synthetic.resolve_config(c.synthetic)
  assert p['holdout_occluders'] == ['vehicle', 'board']
  assert p['occluded_train_fraction'] > 0  # the bank has something to paste
  assert tuple(c.occlusion.patterns) == ('bank',)
  assert synthetic.resolve_config(module.get_config('holdout=pole').synthetic)[
      'holdout_occluders'] == ['pole']
  with pytest.raises(ValueError, match='holdout_occluders'):
    module.get_config('holdout=truck')


def test_reader_loads_it(dataset):
  from ogfr_jax.data import datasets  # noqa: PLC0415
  splits = datasets.get_dataset('synthetic', dataset)
  with open(os.path.join(dataset, 'meta.json')) as f:
    counts = json.load(f)['counts']
  assert len(splits.train) == counts['train']['images']
  assert len(splits.query) == counts['query']['images']
  assert len(splits.gallery) == counts['gallery']['images']
  assert splits.train.num_ids == 5
  assert sorted(np.unique(splits.train.pids)) == list(range(5))
  assert splits.num_cameras == 3


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='num_cameras'):
    synthetic.resolve_config(tiny(num_cameras=1))
  with pytest.raises(ValueError, match='clutter_fraction'):
    synthetic.resolve_config(tiny(clutter_fraction=1.5))
  with pytest.raises(ValueError, match='colour'):
    synthetic.resolve_config(tiny(colour=1))
  with pytest.raises(ValueError, match='contaminated_gallery_fraction'):
    synthetic.resolve_config(tiny(contaminated_gallery_fraction=-0.1))
  with pytest.raises(ValueError, match='contamination_types.*smoke'):
    synthetic.resolve_config(tiny(contamination_types=('noise', 'smoke')))
  with pytest.raises(ValueError, match='contamination_types'):
    synthetic.resolve_config(tiny(contamination_types=()))
  assert synthetic.resolve_config(tiny(contamination_types=(), clutter_fraction=0.0,
                                       contaminated_gallery_fraction=0.0))
  with pytest.raises(ValueError, match='holdout_occluders.*truck'):
    synthetic.resolve_config(tiny(holdout_occluders=('truck',)))
  with pytest.raises(ValueError, match='every occluder type'):
    synthetic.resolve_config(tiny(holdout_occluders=synthetic.OCCLUDER_TYPES))
  with pytest.raises(ValueError, match='twice'):
    synthetic.resolve_config(tiny(holdout_occluders=('pole', 'pole')))
  cfg = tiny()
  del cfg['height']
  with pytest.raises(ValueError, match='height'):
    synthetic.resolve_config(cfg)
  default = synthetic.add_config(config_defaults.base_config()).synthetic
  resolved = synthetic.resolve_config(default)
  assert resolved['occluded_gallery_fraction'] == synthetic.OPTIONAL_FIELDS[
      'occluded_gallery_fraction']
  explicit = dict(default.to_dict(), **synthetic.OPTIONAL_FIELDS)
  assert synthetic.config_hash(explicit) == synthetic.config_hash(default)


def test_generate_refuses_a_non_empty_folder(tmp_path):
  (tmp_path / 'x').mkdir()
  (tmp_path / 'x' / 'keep.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='x'):
    synthetic.generate(str(tmp_path / 'x'), tiny())


# --- cache --------------------------------------------------------------------------------


@pytest.fixture
def counting(monkeypatch):
  calls = []
  real = synthetic.generate

  def counted(root, cfg):
    calls.append(root)
    return real(root, cfg)

  monkeypatch.setattr(synthetic_cache, 'generate', counted)
  return calls


def test_ensure_generates_once(tmp_path, counting):
  cache = str(tmp_path / 'cache')
  first = synthetic.ensure(tiny(), cache)
  meta = os.path.join(first, 'meta.json')
  stamp = os.stat(meta).st_mtime_ns
  again = synthetic.ensure(tiny(), cache)
  assert again == first and len(counting) == 1
  assert os.stat(meta).st_mtime_ns == stamp
  assert os.path.dirname(first) == cache
  other = synthetic.ensure(tiny(seed=9), cache)
  assert other != first and len(counting) == 2
  assert sorted(e for e in os.listdir(cache) if not e.endswith('.lock')) == sorted(
      [os.path.basename(first), os.path.basename(other)])


def test_ensure_default_cache_from_environment(tmp_path, monkeypatch, counting):
  monkeypatch.setenv('OGFR_JAX_CACHE', str(tmp_path / 'env'))
  root = synthetic.ensure(tiny())
  assert root.startswith(str(tmp_path / 'env' / 'synthetic'))


def test_leftover_temp_folder_is_not_a_dataset(tmp_path, counting):
  cache = tmp_path / 'cache'
  cache.mkdir()
  name = f'synthetic-v{synthetic.GENERATOR_VERSION}-{synthetic.config_hash(tiny())}'
  # A killed run on this host (its pid no longer exists) and one on another host.
  dead = cache / f'.{name}.tmp.{socket.gethostname()}.999999999.abc'
  foreign = cache / f'.{name}.tmp.otherhost.1.abc'
  for d in (dead, foreign):
    (d / 'query').mkdir(parents=True)
    (d / 'query' / '0001_c1s1_000001_01.jpg').write_bytes(b'partial')
  root = synthetic.ensure(tiny(), str(cache))
  assert root == str(cache / name) and len(counting) == 1
  assert os.path.isfile(os.path.join(root, 'meta.json'))
  assert len(files(root, 'train')) == 25
  assert not dead.exists()  # cleaned: its process is gone
  assert foreign.exists()  # not ours to judge


def test_killed_generation_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
  cache = str(tmp_path / 'cache')
  real = synthetic.generate

  def dies(root, cfg):
    os.makedirs(os.path.join(root, 'query'))
    raise KeyboardInterrupt

  monkeypatch.setattr(synthetic_cache, 'generate', dies)
  with pytest.raises(KeyboardInterrupt):
    synthetic.ensure(tiny(), cache)
  assert [e for e in os.listdir(cache) if not e.endswith('.lock')] == []
  monkeypatch.setattr(synthetic_cache, 'generate', real)
  root = synthetic.ensure(tiny(), cache)
  assert os.path.isfile(os.path.join(root, 'meta.json'))


def test_losing_the_rename_race_uses_the_winner(tmp_path, monkeypatch):
  cache = str(tmp_path / 'cache')
  real = synthetic.generate
  name = f'synthetic-v{synthetic.GENERATOR_VERSION}-{synthetic.config_hash(tiny())}'
  target = os.path.join(cache, name)

  def racing(root, cfg):
    real(root, cfg)
    # Another process finishes first and renames its copy into place.
    real(os.path.join(cache, 'winner'), cfg)
    os.rename(os.path.join(cache, 'winner'), target)
    with open(os.path.join(target, 'winner.txt'), 'w') as f:
      f.write('1')

  monkeypatch.setattr(synthetic_cache, 'generate', racing)
  assert synthetic.ensure(tiny(), cache) == target
  assert os.path.exists(os.path.join(target, 'winner.txt'))
  assert sorted(e for e in os.listdir(cache) if not e.endswith('.lock')) == [name]


def _as_version_2(root: str) -> None:
  """Rewrites a generated folder's meta.json and clutter.npz as generator version 2 wrote
  them (train-only contamination, no `splits` or `sources`)."""
  meta_path = os.path.join(root, 'meta.json')
  with open(meta_path) as f:
    meta = json.load(f)
  meta['generator_version'] = '2'
  for key in ('contaminated_gallery_fraction', 'contamination_types', 'holdout_occluders'):
    meta['config'].pop(key)
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  path = os.path.join(root, 'clutter.npz')
  with np.load(path) as z:
    keep = z['splits'] == 'train'
    old = {'names': z['names'][keep], 'types': z['types'][keep], 'masks': z['masks'][keep],
           'height': z['height'], 'width': z['width']}
  np.savez_compressed(path, **old)


def test_a_version_2_folder_is_refused_naming_the_version(tmp_path):
  root = synthetic.generate(str(tmp_path / 'old'), tiny())
  _as_version_2(root)
  # config.dataset.root pointing at the dataset folder itself.
  with pytest.raises(RuntimeError, match=r'generator version 2.*version '
                     + re.escape(synthetic.GENERATOR_VERSION) + '.*delete'):
    synthetic.ensure(tiny(), root)
  # A cache entry under this version's name that holds a version 2 dataset.
  cache = tmp_path / 'cache'
  name = f'synthetic-v{synthetic.GENERATOR_VERSION}-{synthetic.config_hash(tiny())}'
  cache.mkdir()
  os.rename(root, cache / name)
  with pytest.raises(RuntimeError, match='generator version 2'):
    synthetic.ensure(tiny(), str(cache))


def test_a_dataset_folder_as_root_is_used_when_it_matches(tmp_path, counting):
  root = synthetic.ensure(tiny(), str(tmp_path / 'cache'))
  assert synthetic.ensure(tiny(), root) == root and len(counting) == 1
  with pytest.raises(RuntimeError, match='another config'):
    synthetic.ensure(tiny(seed=5), root)


def test_version_2_side_files_still_read(tmp_path):
  root = synthetic.generate(str(tmp_path / 'old'), tiny())
  new = synthetic.load_side_info(root)
  _as_version_2(root)
  old = synthetic.load_side_info(root)
  assert {n for n, e in old.items() if e['clutter_mask'] is not None} == {
      n for n, e in new.items() if e['clutter_mask'] is not None and e['split'] == 'train'}
  for name, e in old.items():
    if e['clutter_mask'] is not None:
      np.testing.assert_array_equal(e['clutter_mask'], new[name]['clutter_mask'])
      assert e['split'] == 'train' and e['clutter_source'] == 0
  from ogfr_jax.data import datasets  # noqa: PLC0415
  splits = datasets.get_dataset('synthetic', root)
  masks = synthetic.contamination_masks(splits.train)
  assert masks.num_masked == sum(e['clutter_mask'] is not None for e in old.values())
  assert synthetic.contamination_masks(splits.gallery).num_masked == 0


def test_contamination_masks_of_the_splits(dataset):
  from ogfr_jax.data import datasets  # noqa: PLC0415
  splits = datasets.get_dataset('synthetic', dataset)
  info = synthetic.load_side_info(dataset)
  for split in (splits.train, splits.query, splits.gallery):
    masks = synthetic.contamination_masks(split)
    assert len(masks) == len(split)
    for i, path in enumerate(split.paths):
      want = info.get(os.path.basename(path), {}).get('clutter_mask')
      got = masks.mask(i)
      assert (got is None) == (want is None), path
      if want is not None:
        np.testing.assert_array_equal(got, want)
  assert synthetic.contamination_masks(splits.gallery).num_masked > 0
  assert synthetic.contamination_masks(splits.query).num_masked == 0


def test_incomplete_target_is_an_error_not_a_dataset(tmp_path):
  cache = tmp_path / 'cache'
  name = f'synthetic-v{synthetic.GENERATOR_VERSION}-{synthetic.config_hash(tiny())}'
  (cache / name / 'query').mkdir(parents=True)
  with pytest.raises(RuntimeError, match=name):
    synthetic.ensure(tiny(), str(cache))


# --- token scoring ------------------------------------------------------------------------


def test_clutter_token_mask_hand_made():
  mask = np.zeros((16, 16), bool)
  mask[0:8, 0:8] = True  # exactly the first 8x8 window
  # patch 8, stride 4 -> 3x3 tokens with windows starting at 0, 4, 8.
  tokens = synthetic.clutter_token_mask(mask, 3, 3, patch=8, stride=4)
  expected = np.array([[1, 1, 0],  # (0,1) window cols 4..11: half clutter
                       [1, 0, 0],  # (1,1) rows and cols 4..11: a quarter
                       [0, 0, 0]], bool)
  np.testing.assert_array_equal(tokens, expected)
  strict = synthetic.clutter_token_mask(mask, 3, 3, patch=8, stride=4, min_cover=0.6)
  np.testing.assert_array_equal(strict, np.eye(3, dtype=bool) & expected)
  loose = synthetic.clutter_token_mask(mask, 3, 3, patch=8, stride=4, min_cover=0.25)
  assert loose.sum() == 4


def test_clutter_token_mask_matches_brute_force_and_batches():
  rng = np.random.default_rng(0)
  masks = rng.random((2, 40, 28)) < 0.4
  got = synthetic.clutter_token_mask(masks, 3, 2, patch=16, stride=12, min_cover=0.4)
  assert got.shape == (2, 3, 2)
  for b in range(2):
    for i in range(3):
      for j in range(2):
        cover = masks[b, 12 * i:12 * i + 16, 12 * j:12 * j + 16].mean()
        assert got[b, i, j] == (cover >= 0.4)


def test_clutter_token_mask_resizes_to_the_model_input():
  small = np.zeros((16, 16), bool)
  small[0:8, 0:8] = True
  big = small.repeat(2, 0).repeat(2, 1)  # the stored image is twice the model input
  np.testing.assert_array_equal(
      synthetic.clutter_token_mask(big, 3, 3, 8, 4, input_size=(16, 16)),
      synthetic.clutter_token_mask(small, 3, 3, 8, 4))
  with pytest.raises(ValueError, match='needs'):
    synthetic.clutter_token_mask(small, 4, 3, 8, 4)


def test_occluded_training_images_and_their_bank(tmp_path, dataset):
  root = synthetic.generate(str(tmp_path / 'occ'), tiny(occluded_train_fraction=0.25))
  info = synthetic.load_side_info(root, splits=('train',))
  train = files(root, 'train')
  occluded = sorted(n for n, e in info.items() if e['occluder_mask'] is not None)
  assert len(occluded) == round(0.25 * len(train)) and set(occluded) <= set(train)
  # The training occluders draw from their own stream: images without one are unchanged, and
  # so are the query and gallery splits.
  for split in SPLITS:
    for name in files(dataset, split):
      if name in occluded:
        continue
      a = os.path.join(dataset, synthetic.SPLIT_DIRS[split], name)
      b = os.path.join(root, synthetic.SPLIT_DIRS[split], name)
      assert open(a, 'rb').read() == open(b, 'rb').read(), name
  # One cut-out per occluded training image, opaque exactly on the occluder (minus clutter on
  # top of it), with its box in the source image.
  bank = os.path.join(root, synthetic.OCCLUDER_BANK_DIR)
  index = json.load(open(os.path.join(bank, 'index.json')))
  assert sorted(index) == sorted(os.path.splitext(n)[0] + '.png' for n in occluded)
  for name in occluded:
    entry = index[os.path.splitext(name)[0] + '.png']
    assert entry['type'] == info[name]['occluder_type']
    rgba = np.asarray(Image.open(os.path.join(bank, os.path.splitext(name)[0] + '.png')))
    y0, x0, y1, x1 = (round(v * s) for v, s in zip(entry['box'], (48, 24, 48, 24)))
    assert rgba.shape == (y1 - y0, x1 - x0, 4)
    visible = info[name]['occluder_mask']
    if info[name]['clutter_mask'] is not None:
      visible = visible & ~info[name]['clutter_mask']
    np.testing.assert_array_equal(rgba[..., 3] > 0, visible[y0:y1, x0:x1])
    assert not visible[:y0].any() and not visible[y1:].any()
  assert json.load(open(os.path.join(dataset, synthetic.OCCLUDER_BANK_DIR, 'index.json'))) == {}
