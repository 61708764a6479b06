"""The command-line tools on one tiny trained run: ranked lists, purification figures,
training plots, feature extraction and the deployable export."""

import importlib.util
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from ogfr_jax import evaluate
from ogfr_jax import metrics
from ogfr_jax import run_config
from ogfr_jax import train
from ogfr_jax.data import augment
from ogfr_jax.data import image_io
from ogfr_jax.tools import common
from ogfr_jax.tools import drawing
from ogfr_jax.tools import export
from ogfr_jax.tools import extract
from ogfr_jax.tools import plot_training
from ogfr_jax.tools import visrank
from ogfr_jax.tools import vispurify
from helpers import float32_feature_tol, make_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, config) of a 3-step run of the tiny synthetic config, evaluated."""
  tmp = tmp_path_factory.mktemp('tools')
  config = make_config(preset='synthetic', cache=tmp / 'cache')
  wd = str(tmp / 'run')
  run_config.prepare_workdir(wd, config)
  train.train_and_evaluate(config, wd)
  return wd, config


@pytest.fixture(scope='module')
def trained(run):
  return common.load_trained(run[0])


def _png(path):
  with Image.open(path) as img:
    img.load()
    return img.mode, img.size, np.asarray(img.convert('RGB'))


def _features_fn(trained):
  return jax.jit(lambda v, image, camid: evaluate.student_features(
      trained.model, v, image, camid, eval_cfg=trained.config.eval))


# --------------------------------------------------------------------------------------------
# Reading a run back


def test_load_trained_reproduces_the_evaluation(run, trained):
  wd, config = run
  assert trained.step == 3
  assert trained.num_classes == 8  # the tiny config's training identities
  assert trained.num_cameras == config.synthetic.num_cameras
  data = common.read_split(trained.config, 'test')
  result = evaluate.evaluate_dataset(trained.model, trained.variables, data, trained.config,
                                     common.local_mesh())
  saved = json.load(open(os.path.join(wd, 'results.json')))['synthetic']
  for key in ('rank1', 'mAP', 'mINP'):
    assert result[key] == pytest.approx(saved[key], abs=1e-6)


def test_missing_workdir_pieces_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    common.workdir_config(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='checkpoints'):
    common.restore_state(str(tmp_path))


# --------------------------------------------------------------------------------------------
# Ranked lists


def test_ranked_lists_follow_the_protocol_of_metrics():
  rng = np.random.default_rng(3)
  q_pids, q_cams = rng.integers(0, 5, 12), rng.integers(0, 3, 12)
  g_pids, g_cams = rng.integers(0, 5, 40), rng.integers(0, 3, 40)
  dist = rng.integers(0, 6, (12, 40)).astype(np.float32)  # many ties
  ref = metrics.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=40)

  class S:  # the part of a records.Split that ranking reads
    def __init__(self, pids, camids):
      self.pids, self.camids = pids, camids

  lists = visrank.rank_all(dist, range(12), S(q_pids, q_cams), S(g_pids, g_cams))
  firsts = [l.first_match for l in lists if l.first_match is not None]
  assert len(firsts) == ref['num_valid_queries']
  cmc = np.array([np.mean([f <= k for f in firsts]) for k in range(1, 41)])
  np.testing.assert_allclose(cmc, ref['cmc'])
  aps = [np.mean((np.arange(l.matches.sum()) + 1) / (np.flatnonzero(l.matches) + 1))
         for l in lists if l.matches.any()]
  assert np.mean(aps) == pytest.approx(ref['mAP'])
  for q, l in enumerate(lists):
    dropped = (g_pids == q_pids[q]) & (g_cams == q_cams[q])
    assert sorted(l.dropped) == sorted(np.flatnonzero(dropped))
    assert not set(l.ranked) & set(l.dropped)
    assert len(l.ranked) + len(l.dropped) == 40
    assert np.all(np.diff(l.distances) >= 0)


def test_visrank_draws_the_evaluation_ranking(run, tmp_path):
  wd, _ = run
  out = str(tmp_path / 'vis')
  res = visrank.main(['--workdir', wd, '--out', out, '--num-queries', '3', '--topk', '4',
                      '--per-page', '2', '--num-workers', '0', '--tile-height', '96'])
  saved = json.load(open(os.path.join(wd, 'results.json')))['synthetic']
  assert res['summary']['mAP'] == pytest.approx(saved['mAP'], abs=1e-6)
  assert res['summary']['rank1'] == pytest.approx(saved['rank1'], abs=1e-6)
  assert [os.path.basename(p) for p in res['paths']] == ['visrank_spread_000.png',
                                                       'visrank_spread_001.png']
  assert len(res['chosen']) == 3
  for page, rows in zip(res['paths'], (2, 1)):
    mode, (w, h), pixels = _png(page)
    assert mode == 'RGB'
    # query + 4 ranked tiles of at least 96 x 48 each, stacked `rows` high
    assert w >= 5 * 96 // 2 and h >= rows * 96
    shown = res['chosen'][:2] if rows == 2 else res['chosen'][2:]
    hits = [bool(m) for l in shown for m in l.matches[:4]]
    frames = {c: np.all(pixels == np.array(c, np.uint8), axis=-1).sum()
              for c in (drawing.GREEN, drawing.RED, drawing.BLUE)}
    # A 3-pixel frame around a 96 x 48 tile has 954 pixels; the frame colours are exact
    # RGB values that the noisy benchmark images practically never hit that often.
    assert frames[drawing.BLUE] >= 900 * rows  # the query frames
    assert (frames[drawing.GREEN] >= 900) == any(hits)
    assert (frames[drawing.RED] >= 900) == (not all(hits))


def test_occlusion_tags_come_from_the_side_files_or_the_dataset(trained):
  data = common.read_split(trained.config, 'test')
  q_tags, g_tags = visrank.occlusion_tags(data)
  # The tiny benchmark occludes every query (occluded_query_fraction = 1).
  assert all(t and t.startswith('occluded: ') for t in q_tags)
  assert any(t is None for t in g_tags)

  class Fake:
    name, query, gallery = 'occluded_duke', [0, 1], [0, 1, 2]
  assert visrank.occlusion_tags(Fake) == (['occluded'] * 2, [None] * 3)
  Fake.name = 'market1501'
  assert visrank.occlusion_tags(Fake) == ([None] * 2, [None] * 3)


# --------------------------------------------------------------------------------------------
# Purification figures


def test_token_windows_and_clutter_statistics():
  windows = vispurify.token_windows((2, 3), patch=4, stride=2)
  np.testing.assert_array_equal(windows[4], [2, 2, 6, 6])  # row 1, column 1
  cover = vispurify.token_coverage(np.array([1, 1, 0, 0, 0, 0], bool), (2, 3), 4, 2, (6, 8))
  assert cover[0, 0] == 1 and cover[1, 2] == 2 and cover[0, 6] == 0 and cover[5, 0] == 0
  stats = vispurify.clutter_stats(np.array([[1, 1, 1, 0], [0, 0, 0, 0]], bool),
                                  np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool))
  assert stats['precision'] == pytest.approx(2 / 3)
  assert stats['recall'] == pytest.approx(2 / 3)
  assert stats['chance_precision'] == pytest.approx(3 / 8)
  none = vispurify.clutter_stats(np.zeros((1, 4), bool), np.zeros((1, 4), bool))
  assert none['precision'] is None and none['recall'] is None
  # A selected token on the image's own occluder is counted apart (token 2 of image 0; token
  # 0 is clutter and occluder at once, a hit).
  stats = vispurify.clutter_stats(np.array([[1, 1, 1, 0], [0, 0, 0, 0]], bool),
                                  np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool),
                                  np.array([[1, 0, 1, 1], [0, 0, 0, 0]], bool))
  assert stats['precision'] == pytest.approx(2 / 3)
  assert stats['selected_occluder_tokens'] == 1
  assert stats['occluder_share'] == pytest.approx(1 / 3)


def test_unaugmented_batches_line_up_with_the_stored_images(trained):
  config = trained.config
  data = common.read_split(config, 'train')
  batch = vispurify.train_batches(config, data.train, start_step=2, num_batches=1,
                                  augment=False)[0]
  pixels = common.to_uint8(batch['image'], config.input.mean, config.input.std)
  size = (config.input.height, config.input.width)
  for row, index in enumerate(batch['index']):
    stored = image_io.load_image(data.train.paths[index], size=size)
    assert np.abs(pixels[row].astype(int) - stored).max() <= 1


def test_vispurify_figure_and_statistics(run, trained, tmp_path):
  wd, config = run
  out = str(tmp_path / 'pur')
  summary = vispurify.main(['--workdir', wd, '--out', out, '--num-images', '3',
                            '--num-batches', '2', '--per-row', '2'])
  batch = config.input.ids_per_batch * config.input.images_per_id
  assert summary['images'] == 2 * batch
  gh, gw = summary['token_grid']
  for kind in ('sampled', 'greedy'):
    s = summary[kind]
    assert s['tokens'] == 2 * batch * gh * gw
    assert 0 <= s['selected_clutter_tokens'] <= min(s['selected_tokens'], s['clutter_tokens'])
    if s['selected_tokens']:
      assert s['precision'] == pytest.approx(s['selected_clutter_tokens'] / s['selected_tokens'])
  assert summary['sampled']['clutter_tokens'] > 0  # the benchmark plants clutter
  assert json.load(open(os.path.join(out, 'purification.json')))['images'] == 2 * batch
  # The run's own end-of-training report (results.json `fepm`) is shown beside the batches.
  with open(os.path.join(wd, 'results.json')) as f:
    report = json.load(f)['fepm']
  assert summary['run_report'] == report
  lines = vispurify.describe_fepm_report(report)
  assert any(l.strip().startswith('gallery') and 'random pick' in l for l in lines)
  assert any('teacher mAP' in l for l in lines)
  mode, (w, h), _ = _png(summary['figure'])
  # Panels of 192-pixel-high images: the tiny 64 x 32 input enlarged 3 times; five panels
  # per image (x, sampled, greedy, occ(x), clutter), two images per row, two rows.
  panel_w = config.input.width * 3
  assert mode == 'RGB' and w == 2 * (5 * panel_w + 4 * 3) + 16
  assert h > 2 * 192


def test_sampled_selection_follows_the_policy():
  from ogfr_jax import config_defaults
  config = config_defaults.base_config()
  config.fepm.prob_bounds = (0.1, 0.7)
  rng = np.random.default_rng(1)
  # Far-out logits sit at the policy's bounds: 4,000 draws at p = 0.7 and 0.1 lie within
  # 5 binomial standard deviations (<= 0.037) of them.
  high = vispurify.sample_selection(np.full((500, 8), 30.0, np.float32), config, rng, None)
  low = vispurify.sample_selection(np.full((500, 8), -30.0, np.float32), config, rng, None)
  assert abs(high.mean() - 0.7) < 0.037 and abs(low.mean() - 0.1) < 0.024


# --------------------------------------------------------------------------------------------
# Training plots


def test_plot_training_png(run, tmp_path):
  wd, _ = run
  out = str(tmp_path / 'training.png')
  assert plot_training.main(['--workdir', wd, '--out', out]) == out
  mode, size, _ = _png(out)
  # 2 columns x 2 rows (agent rate, reward, losses, evaluation) of 7.6 x 3.6 in at 90 dpi
  assert size == (1368, 648)


def test_plot_curves_that_draw_one_line_are_merged_and_absent_ones_named():
  rows = [{'step': s, 'a': 1.0 * s, 'b': 1.0 * s, 'c': s + 0.001, 'd': -1.0 * s}
          for s in range(1, 11)]
  drawn, absent = plot_training.panel_curves(
      rows, [('a', 'A'), ('b', 'B'), ('c', 'C'), ('d', 'D'), ('e', 'E')])
  # B equals A; C is 0.001 from it, well under 1% of the panel's range of 20; D is apart.
  assert drawn == [('a', 'A = B\n~ C (within 1.0e-03)'), ('d', 'D')]
  assert absent == ['e']
  # On a log axis closeness is a ratio: 1 and 1.001 merge, 1 and 2 do not.
  rows = [{'step': s, 'a': 1.0, 'b': 1.001, 'c': 2.0, 'z': 100.0} for s in range(1, 4)]
  drawn, _ = plot_training.panel_curves(rows, [('a', 'A'), ('b', 'B'), ('c', 'C'), ('z', 'Z')],
                                        log=True)
  assert [k for k, _ in drawn] == ['a', 'c', 'z'] and drawn[0][1].startswith('A\n~ B')


def test_plot_series_keeps_the_last_value_of_a_repeated_step(tmp_path):
  rows = [{'step': 1, 'a': 1.0}, {'step': 2, 'a': 2.0}, {'step': 2, 'a': 5.0},
          {'step': 3, 'b': 0.0}]
  steps, values = plot_training.series(rows, 'a')
  np.testing.assert_array_equal(steps, [1, 2])
  np.testing.assert_array_equal(values, [1.0, 5.0])
  with pytest.raises(ValueError, match='none of the plotted scalars'):
    plot_training.plot(rows, str(tmp_path / 'x.png'))
  with pytest.raises(FileNotFoundError, match='metrics.jsonl'):
    plot_training.main(['--workdir', str(tmp_path)])


# --------------------------------------------------------------------------------------------
# Feature extraction


@pytest.fixture(scope='module')
def image_folder(trained, tmp_path_factory):
  """Five query images of the benchmark, two of them in a sub-folder, and a broken file."""
  folder = tmp_path_factory.mktemp('images')
  data = common.read_split(trained.config, 'test')
  paths = list(data.query.paths[:5])
  (folder / 'sub').mkdir()
  for i, p in enumerate(paths):
    shutil.copy(p, folder / ('sub' if i >= 3 else '') / os.path.basename(p))
  (folder / 'sub' / 'broken.jpg').write_bytes(b'not a jpeg')
  (folder / '.hidden.jpg').write_bytes(b'ignored')
  (folder / 'notes.txt').write_text('ignored')
  names = sorted([os.path.basename(p) for p in paths[:3]]
                 + [f'sub/{os.path.basename(p)}' for p in paths[3:]])
  return str(folder), names


def _reference_features(trained, folder, names, camid, variables=None):
  """camid: one camera for every image, or one per name."""
  c = trained.config
  images = np.stack([augment.eval_transform(
      image_io.load_image(os.path.join(folder, n)), augment.augment_spec(c)) for n in names])
  camids = np.broadcast_to(np.asarray(camid, np.int32), (len(names),))
  return np.asarray(_features_fn(trained)(variables or trained.variables, images, camids))


def _dataset_cameras(trained, names):
  """The 0-based cameras the dataset reader gives the query images behind `names`."""
  query = common.read_split(trained.config, 'test').query
  by_name = {os.path.basename(p): int(c) for p, c in zip(query.paths, query.camids)}
  return np.array([by_name[os.path.basename(n)] for n in names], np.int32)


def test_extract_names_the_unreadable_file(run, image_folder, tmp_path):
  folder, _ = image_folder
  with pytest.raises(ValueError, match='broken.jpg'):
    extract.main(['--workdir', run[0], '--images', folder, '--out', str(tmp_path / 'f.npz'),
                  '--no-progress'])


def test_extract_features(run, trained, image_folder, tmp_path):
  folder, names = image_folder
  out = str(tmp_path / 'feats.npz')
  extract.main(['--workdir', run[0], '--images', folder, '--out', out, '--batch-size', '3',
                '--skip-bad', '--no-progress'])
  with np.load(out) as z:
    assert list(z['names']) == names
    assert list(z['skipped']) == ['sub/broken.jpg']
    camids = z['camids']
    feats = z['features']
    meta = json.loads(str(z['meta']))
  # The benchmark's file names are in the Market-1501 form: each image gets the camera the
  # dataset reader gives it.
  cameras = _dataset_cameras(trained, names)
  np.testing.assert_array_equal(camids, cameras)
  assert len(set(cameras.tolist())) > 1
  assert feats.shape == (len(names), 64) and feats.dtype == np.float32
  # Unit norm: float32 rounding of a sum of D = 64 squares and one division.
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=4 * 64 * 2.0 ** -24)
  # The reference runs another batch size (hence possibly other kernels): float32 rounding of
  # two computations of the same features.
  tol = float32_feature_tol(trained.config, 2)
  np.testing.assert_allclose(feats, _reference_features(trained, folder, names, cameras),
                             rtol=0, atol=tol)
  assert meta['camera_embedding'].startswith('the camera in the file name for 5 image(s)')
  assert meta['checkpoint_step'] == 3
  # --camera overrides the names: every image gets camera 0's embedding.
  extract.main(['--workdir', run[0], '--images', folder, '--out', out, '--batch-size', '3',
                '--skip-bad', '--no-progress', '--camera', '0'])
  with np.load(out) as z:
    np.testing.assert_array_equal(z['camids'], 0)
    np.testing.assert_allclose(z['features'], _reference_features(trained, folder, names, 0),
                               rtol=0, atol=tol)
    assert float(np.abs(z['features'] - feats).max()) > 10 * tol


def test_cameras_from_file_names():
  names = ['0161_c2s1_012345_01.jpg', 'sub/-1_c6s3_000001_00.png', '0005_c8_f0046985.jpg',
           'person.jpg', '0161_c0s1_012345_01.jpg', '12_34.jpg']
  np.testing.assert_array_equal(extract.cameras_from_names(names), [1, 5, 7, -1, -1, -1])


def test_extract_mean_camera(trained, image_folder):
  folder, names = image_folder
  variables, camid, note = extract.camera_variables(trained.variables, 'mean',
                                                    trained.num_cameras)
  assert 'mean' in note
  extractor = extract.Extractor(trained.model, variables, trained.config, batch_size=8)
  got = extract.extract_folder(extractor, folder, names=names, camid=camid, progress=False)
  # Every camera id now gives the same features: those of the averaged embedding.
  tol = float32_feature_tol(trained.config, 2)
  np.testing.assert_allclose(got.features,
                             _reference_features(trained, folder, names, 3, variables),
                             rtol=0, atol=tol)
  camera_0 = _reference_features(trained, folder, names, 0)
  apart = float(np.abs(got.features - camera_0).max())
  print(f'max |mean camera - camera 0| feature difference: {apart:.3g} (bound {tol:.3g})')
  assert apart > 10 * tol  # not camera 0's features
  with pytest.raises(ValueError, match='outside'):
    extract.camera_variables(trained.variables, '9', trained.num_cameras)


def test_list_images_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a folder'):
    extract.list_images(str(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='no image files'):
    extract.list_images(str(tmp_path))


# --------------------------------------------------------------------------------------------
# Export


def test_exported_student_matches_the_in_process_model(trained):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(5, 64, 32, 3)).astype(np.float32)
  camids = np.array([0, 1, 2, 3, 0], np.int32)
  ref = np.asarray(_features_fn(trained)(trained.variables, images, camids))
  baked, flat = export.export_student(trained)  # symbolic batch, weights baked in
  assert flat is None and str(baked.in_avals[0].shape[0]) == 'b'
  diffs = [float(np.abs(np.asarray(baked.call(images, camids)) - ref).max()),
           float(np.abs(np.asarray(baked.call(images[:2], camids[:2])) - ref[:2]).max())]
  as_arg, flat = export.export_student(trained, params='argument', batch_size=5)
  assert not any(k.startswith(('params/teacher', 'params/agent')) for k in flat)
  diffs.append(float(np.abs(np.asarray(as_arg.call(flat, images, camids)) - ref).max()))
  tol = float32_feature_tol(trained.config, 2)  # two float32 programs of the same features
  print(f'max |exported - in-process| feature difference: {max(diffs):.3g} (bound {tol:.3g})')
  assert max(diffs) <= tol


def test_export_command_line(run, tmp_path):
  wd, _ = run
  out = str(tmp_path / 'student.jaxexport')
  st = str(tmp_path / 'student.safetensors')
  meta = export.main(['--workdir', wd, '--safetensors', st])
  assert meta['safetensors']['ogfr.branch'] == 'student' and os.path.isfile(st)
  umask = os.umask(0)
  os.umask(umask)
  mode = lambda path: os.stat(path).st_mode & 0o777  # noqa: E731
  assert mode(st) == 0o666 & ~umask  # like every other output, not safetensors' 0600
  args = ['--workdir', wd, '--out', out, '--params', 'argument']
  if importlib.util.find_spec('flatbuffers') is None:
    # jax writes programs with flatbuffers, which it does not install: a clear refusal
    # before any work, and no half-written files.
    with pytest.raises(ValueError, match='flatbuffers'):
      export.main(args)
    assert not os.path.exists(out) and not os.path.exists(out + '.json')
    return
  meta = export.main(args)
  exp = jax.export.deserialize(open(out, 'rb').read())
  params = dict(np.load(out + '.params.npz'))
  images = np.zeros((2, 64, 32, 3), np.float32)
  feats = np.asarray(exp.call(params, images, np.zeros(2, np.int32)))
  assert feats.shape == (2, meta['feature_dim'])
  assert json.load(open(out + '.json'))['input_size'] == [64, 32]
  for path in (out, out + '.json', out + '.params.npz'):
    assert mode(path) == 0o666 & ~umask, path
  with pytest.raises(FileExistsError, match='overwrite'):
    export.main(args)


# --------------------------------------------------------------------------------------------
# Re-evaluation under another test protocol


def test_reevaluate_with_post_bn_features(run, trained, tmp_path):
  from ogfr_jax.tools import reevaluate  # pylint: disable=g-import-not-at-top
  wd, _ = run
  before = open(os.path.join(wd, 'results.json')).read()
  out = str(tmp_path / 'post.json')
  result = reevaluate.main(['--workdir', wd, '--set', 'eval.feature=post_bn', '--out', out])
  assert json.load(open(out)) == json.loads(json.dumps(result))
  assert result['overrides'] == {'eval.feature': 'post_bn'} and result['step'] == 3
  config = trained.config.copy_and_resolve_references()
  config.eval.feature = 'post_bn'
  data = common.read_split(config, 'test')
  expected = evaluate.evaluate_dataset(trained.model, trained.variables, data, config,
                                       common.local_mesh())
  for key in ('rank1', 'mAP', 'mINP'):
    assert result['metrics'][key] == pytest.approx(expected[key], abs=1e-6)
  # Without overrides it reproduces the run's own figures, and results.json is untouched.
  again = reevaluate.main(['--workdir', wd, '--out', str(tmp_path / 'again.json')])
  saved = json.loads(before)['synthetic']
  assert again['metrics']['mAP'] == pytest.approx(saved['mAP'], abs=1e-6)
  assert open(os.path.join(wd, 'results.json')).read() == before


def test_reevaluate_refuses_training_fields_and_bad_values(run):
  from ogfr_jax.tools import reevaluate  # pylint: disable=g-import-not-at-top
  wd, _ = run
  with pytest.raises(ValueError, match='model.size'):
    reevaluate.main(['--workdir', wd, '--set', 'model.size=base'])
  with pytest.raises(ValueError, match='eval.flip'):
    reevaluate.main(['--workdir', wd, '--set', 'eval.flip=3'])
  with pytest.raises(ValueError, match='eval.nonexistent'):
    reevaluate.main(['--workdir', wd, '--set', 'eval.nonexistent=1'])
  with pytest.raises(ValueError, match="eval.feature"):
    reevaluate.main(['--workdir', wd, '--set', 'eval.feature=middle'])
  with pytest.raises(ValueError, match='results.json'):
    reevaluate.main(['--workdir', wd, '--out', os.path.join(wd, 'results.json')])


_SIDECAR_CLIENT = '''\
import json, sys
import numpy as np
from jax import export

program, folder, names, camids, out = sys.argv[1:6]
meta = json.load(open(program + '.json'))
scope = {}
exec(meta['preprocessing']['python'], scope)
images = np.stack([scope['preprocess'](folder + '/' + n, meta) for n in names.split(',')])
exp = export.deserialize(open(program, 'rb').read())
feats = np.asarray(exp.call(images, np.array(camids.split(','), np.int32)))
np.save(out, feats)
assert not any(m.split('.')[0] == 'ogfr_jax' for m in sys.modules), 'ogfr_jax was imported'
'''


def test_export_is_reproduced_from_its_sidecar_alone(run, trained, image_folder, tmp_path):
  """A client with jax, flatbuffers, numpy and Pillow, no ogfr_jax: the sidecar's
  preprocessing and the program give the features of tools.extract."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  wd, _ = run
  folder, _ = image_folder
  program = str(tmp_path / 'student.jaxexport')
  export.main(['--workdir', wd, '--out', program])
  result = extract.main(['--workdir', wd, '--images', folder, '--out', str(tmp_path / 'f.npz'),
                         '--skip-bad', '--no-progress'])
  client = tmp_path / 'client.py'
  client.write_text(_SIDECAR_CLIENT)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  proc = subprocess.run(
      [sys.executable, str(client), program, folder, ','.join(result.names),
       ','.join(str(int(c)) for c in result.camids), str(tmp_path / 'client.npy')],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  got = np.load(tmp_path / 'client.npy')
  tol = float32_feature_tol(trained.config, 2)  # two float32 programs of the same features
  diff = float(np.abs(got - result.features).max())
  print(f'max |sidecar client - tools.extract| feature difference: {diff:.3g} (bound {tol:.3g})')
  assert got.shape == result.features.shape and diff <= tol
  # The docs show the same function.
  docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                      'serving.md')
  assert export.REFERENCE_PREPROCESSING.rstrip() in open(docs).read()
  assert 'flatbuffers' in json.load(open(program + '.json'))['requires']


# --------------------------------------------------------------------------------------------
# What the tools print on stderr


def _tool_commands(wd, tmp):
  return {
      'export': ['ogfr_jax.tools.export', '--workdir', wd, '--out', f'{tmp}/s.jaxexport'],
      'extract': ['ogfr_jax.tools.extract', '--workdir', wd, '--images', f'{tmp}/images',
                  '--out', f'{tmp}/f.npz'],
      'visrank': ['ogfr_jax.tools.visrank', '--workdir', wd, '--out', f'{tmp}/visrank',
                  '--num-queries', '2'],
      'vispurify': ['ogfr_jax.tools.vispurify', '--workdir', wd, '--out', f'{tmp}/vispurify',
                    '--num-images', '2', '--num-batches', '1'],
      'plot_training': ['ogfr_jax.tools.plot_training', '--workdir', wd, '--out',
                        f'{tmp}/training.png'],
      'reevaluate': ['ogfr_jax.tools.reevaluate', '--workdir', wd, '--out', f'{tmp}/re.json'],
      'convert': ['ogfr_jax.tools.convert', '--export-student', wd, '--output',
                  f'{tmp}/s.safetensors'],
      'convert --help': ['ogfr_jax.tools.convert', '--help'],
  }


@pytest.mark.parametrize('tool', ['export', 'extract', 'visrank', 'vispurify', 'plot_training',
                                  'reevaluate', 'convert', 'convert --help'])
def test_tools_write_nothing_on_stderr(run, image_folder, tool, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  wd, _ = run
  images = tmp_path / 'images'
  images.mkdir()
  for name in image_folder[1][:2]:
    shutil.copy(os.path.join(image_folder[0], name), images)
  args = _tool_commands(wd, tmp_path)[tool]
  proc = subprocess.run([sys.executable, '-m'] + args, capture_output=True, text=True,
                        timeout=600, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ''
  assert proc.stdout.strip()  # what it wrote, or the help


def test_tfds_builders_write_no_progress_bars_into_a_pipe(run, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  config = run[1]
  root = common.read_split(config, 'test').root
  proc = subprocess.run([sys.executable, '-m', 'ogfr_jax.data.tfds_builders', '--dataset',
                         'synthetic', '--manual_dir', root, '--data_dir', str(tmp_path / 'tfds')],
                        capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ''
  assert proc.stdout.startswith('wrote ') and len(proc.stdout.splitlines()) == 1
  assert 'Downloading' not in proc.stdout and '\x1b' not in proc.stdout


# --------------------------------------------------------------------------------------------
# What a run shows: the console's loss terms, TensorBoard


def _tensorboard(workdir):
  """{(tag, kind): [values]} of a run's TensorBoard events (kind: simple_value, image,
  tensor)."""
  import glob  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events*')):
    data = open(path, 'rb').read()
    i = 0
    while i < len(data):
      n = struct.unpack('<Q', data[i:i + 8])[0]
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        kind = v.WhichOneof('value')
        value = {'simple_value': lambda: v.simple_value,  # noqa: E731
                 'image': lambda: v.image.encoded_image_string,
                 'tensor': lambda: v.tensor.string_val}[kind]()
        out.setdefault((v.tag, kind), []).append(value)
  return out


def test_console_terms_add_up_to_the_logged_loss(run):
  """The weights the console applies are those the train step summed: on every logged step
  the shown terms add up to loss/total."""
  from ogfr_jax import console  # pylint: disable=g-import-not-at-top
  from ogfr_jax import losses  # pylint: disable=g-import-not-at-top
  wd, config = run
  weights = losses.active_terms(config)
  rows = [r for r in common.read_jsonl(os.path.join(wd, 'metrics.jsonl'))
          if 'train/loss/total' in r]
  assert rows
  for row in rows:
    summary = {k[len('train/'):]: v for k, v in row.items() if k.startswith('train/')}
    parts = console.loss_parts(summary, weights)
    assert [label for label, _ in parts][-1] == 'other'
    assert 'kd-logit' in dict(parts)
    # float32 sum in the step of the weighted terms, float64 here: a few float32 roundings of
    # the largest partial sum.
    scale = sum(abs(v) for _, v in parts)
    assert abs(sum(v for _, v in parts) - summary['loss/total']) <= 8 * scale * 2.0 ** -24


def test_tensorboard_holds_config_fepm_report_and_ranked_lists(run):
  wd, config = run
  tb = _tensorboard(wd)
  results = json.load(open(os.path.join(wd, 'results.json')))
  text = b''.join(tb[('config/text_summary', 'tensor')][0]).decode()
  assert '"eval_batch_size": 16' in text
  fepm = results['fepm']
  for split in ('gallery', 'train'):
    for key in ('precision', 'recall', 'select_rate', 'chance'):
      got = tb[(f'eval/fepm/{split}/{key}', 'simple_value')]
      assert got == [pytest.approx(fepm[split][key], abs=2.0 ** -24 * 4)]
  # Every other evaluator that ran has its figures there too.
  for branch, key in (('teacher_purified', 'mAP'), ('teacher_clean', 'mAP'),
                      ('token_ranking', 'precision')):
    if branch in fepm:
      got = tb[(f'eval/fepm/{branch}/{key}', 'simple_value')]
      assert got == [pytest.approx(fepm[branch][key], abs=2.0 ** -24 * 4)]
    else:
      assert (f'eval/fepm/{branch}/{key}', 'simple_value') not in tb
  (png,) = tb[('eval/synthetic/ranked_lists', 'image')]
  import io  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(png)) as img:
    assert img.size[0] > 5 * 32 and img.size[1] > 4 * 64  # 4 queries x (1 + 5) tiles
  # Under the leave-one-out baseline the mean baseline is the mean reward: drawn once.
  assert config.fepm.baseline == 'leave_one_out'
  assert ('train/agent/reward', 'simple_value') in tb
  assert ('train/agent/baseline', 'simple_value') not in tb


# --------------------------------------------------------------------------------------------
# The README example and bitwise reruns


def _readme_example():
  spec = importlib.util.spec_from_file_location(
      'readme_example', os.path.join(os.path.dirname(os.path.dirname(
          os.path.abspath(__file__))), 'tools', 'readme_example.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_CONSOLE = '''OGFR train: configs/synthetic.py
  workdir   runs/synthetic
step  10/40  epoch 0.50  loss 9.000 = id 2.000 + other 7.000  lr 1.0e-04  50.0 img/s  ETA 0:00:30
step  20/40  epoch 1.00  loss 8.000 = id 2.000 + other 6.000  lr 2.0e-04  80.0 img/s  ETA 0:00:20
evaluation at step 20
  dataset     rank1   rank5  rank10     mAP    mINP
  synthetic  0.2847  0.5347  0.7014  0.2690  0.1172
step  30/40  epoch 1.50  loss 7.000 = id 2.000 + other 5.000  lr 3.0e-04  81.0 img/s  ETA 0:00:10
step  40/40  epoch 2.00  loss 6.000 = id 2.000 + other 4.000  lr 4.0e-04  82.0 img/s  ETA 0:00:00
results at step 40 (0:01:50 wall time)
  dataset     rank1   rank5  rank10     mAP    mINP
  synthetic  0.3819  0.6597  0.7361  0.3741  0.1753
'''


def test_readme_example_checker_compares_every_figure_but_the_timings():
  m = _readme_example()
  block = m.example_block(_CONSOLE)
  lines = _CONSOLE.splitlines()
  # The first step line, the one before the evaluation, then '...' for step 30, the last.
  assert block == lines[:7] + ['...'] + lines[8:]
  text = f'# x\n\n{m.SECTION}\n\nintro\n\n```\nold\n```\n\n(3 lines in all when piped)\n'
  updated = m.update_readme(text, block, len(lines))
  first, end = m.readme_block(updated)
  assert updated.splitlines()[first:end] == block
  assert f'({len(lines)} lines in all when piped)' in updated
  # A rerun: other throughput, ETA and wall time, the same figures: current.
  rerun = (_CONSOLE.replace('80.0 img/s', '91.5 img/s').replace('ETA 0:00:20', 'ETA 0:00:18')
           .replace('0:01:50 wall', '0:02:03 wall'))
  assert m.compare(block, m.example_block(rerun)) == []
  # Any figure else differs: the mAP of the final results, a loss term.
  for old, new in (('0.3741', '0.3725'), ('id 2.000 + other 6.000', 'id 2.001 + other 5.999')):
    diffs = m.compare(block, m.example_block(_CONSOLE.replace(old, new)))
    assert any(d.startswith('-') and old in d for d in diffs)
    assert any(d.startswith('+') and new in d for d in diffs)


# The README run shrunk to a few seconds (the fields of the synthetic preset of
# tests/helpers.make_config).
_TINY = ('synthetic.num_train_ids=8', 'synthetic.num_test_ids=6', 'synthetic.images_per_id=6',
         'synthetic.height=64', 'synthetic.width=32', 'input.height=64', 'input.width=32',
         'model.patch_size=16', 'model.stride=16', 'input.ids_per_batch=4',
         'input.images_per_id=2', 'input.eval_batch_size=16', 'train.epochs=2',
         'train.steps_per_epoch=2', 'train.log_every=1', 'train.checkpoint_every=4',
         'train.eval_every_epochs=1')


def test_reruns_on_one_device_and_one_thread_are_bitwise_identical(tmp_path):
  """The layout the README example states: 1 CPU device, XLA:CPU pinned to one core. Two runs
  of the same command print the same figures and log bitwise the same metrics."""
  m = _readme_example()
  extra = tuple(f'--config.{o}' for o in _TINY) + (f'--config.dataset.root={tmp_path}/data',)
  env_flags = os.environ.pop('XLA_FLAGS', None)  # 1 device, not the tests' 8
  try:
    outputs = [m.run_readme_command('0', str(tmp_path / f'run{i}'), extra) for i in range(2)]
  finally:
    if env_flags is not None:
      os.environ['XLA_FLAGS'] = env_flags
  blocks = [m.example_block(o) for o in outputs]
  assert re.search(r'devices +1 x cpu', outputs[0]) and 'evaluation at step 2' in outputs[0]
  assert m.compare(*blocks) == []
  rows = [[r for r in common.read_jsonl(str(tmp_path / f'run{i}' / 'metrics.jsonl'))
           if 'train/loss/total' in r or any(k.startswith('eval/') for k in r)]
          for i in range(2)]
  drop = ('train/images_per_sec',)
  rows = [[{k: v for k, v in r.items() if k not in drop} for r in rs] for rs in rows]
  # 4 steps, 2 evaluations and the FEPM report of the final one
  assert len(rows[0]) == 4 + 2 + 1 and rows[0] == rows[1]
