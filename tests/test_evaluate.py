"""Evaluation on the devices: features gathered in split order, chunked ranking, re-ranking
modes, against the numpy reference in ogfr_jax.metrics (8 fake CPU devices)."""

import logging as std_logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ogfr_jax import config_defaults
from ogfr_jax import evaluate
from ogfr_jax import metrics
from ogfr_jax import parallel
from ogfr_jax import run_config
from ogfr_jax.data import augment
from ogfr_jax.data import image_io
from ogfr_jax.data import records
from helpers import H, W, make_config, write_split


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh(types.SimpleNamespace(data=-1, fsdp=1))


def _labels(seed, nq=37, ng=120, ids=12, cams=4):
  rng = np.random.default_rng(seed)
  return (rng.integers(1, ids + 1, nq), rng.integers(0, ids + 1, ng), rng.integers(0, cams, nq),
          rng.integers(0, cams, ng))


def _splits(q_pids, g_pids, q_cams, g_cams):
  make = lambda tag, pids, cams: records.Split.from_lists(
      [f'{tag}{i}.jpg' for i in range(len(pids))], list(pids), list(cams))
  return make('q', q_pids, q_cams), make('g', g_pids, g_cams)


def _eval_cfg(**overrides):
  c = config_defaults.base_config().eval
  c.query_chunk = 16
  c.max_rank = 30
  for k, v in overrides.items():
    c[k] = v
  return c


# --------------------------------------------------------------------------------------------
# Features


def test_features_are_gathered_in_split_order_on_the_devices(tmp_path, mesh):
  split = write_split(str(tmp_path), [3, 4, 4, 2], seed=4)  # 13 images: 2 batches, 3 padding
  config = make_config({'input.eval_batch_size': 8}, preset='pipeline')
  mean, std = tuple(config.input.mean), tuple(config.input.std)
  seen = []

  @jax.jit
  def extract_fn(variables, image, camid):
    seen.append((image.dtype, image.shape))
    x = augment.normalize_on_device(image, mean, std)
    return jnp.concatenate([x.mean(axis=(1, 2)), camid[:, None].astype(jnp.float32)], axis=1)

  feats = evaluate.extract_features(extract_fn, None, split, config, mesh)
  assert isinstance(feats, jax.Array) and feats.shape == (13, 4)
  assert feats.sharding.is_fully_replicated
  assert seen == [(jnp.uint8, (8, H, W, 3))]  # pixels cross as uint8; one compilation
  for i, path in enumerate(split.paths):
    pixels = augment.eval_transform(image_io.load_image(path, size=(H, W)),
                                    augment.augment_spec(config))
    # The device sums H x W normalised float32 values in its own order: each mean is within
    # (n + 1) u of exact relative to the mean of |values| (n = H W terms, one division;
    # u = 2^-24), the host reference too. The two normalisations (x / 255 - mean) / std and
    # x * scale + offset each round a few times on operands up to (1 + mean) / std: 8 u of
    # that per value and side.
    n, u = H * W, 2.0 ** -24
    operands = (1 + np.asarray(mean)) / np.asarray(std)
    bound = 2 * (n + 2) * u * np.abs(pixels).mean(axis=(0, 1)) + 16 * u * operands
    assert np.all(np.abs(np.asarray(feats[i, :3]) - pixels.mean(axis=(0, 1))) <= bound)
    assert float(feats[i, 3]) == split.camids[i]
  host = evaluate.extract_split(extract_fn, None, split, config, mesh)
  np.testing.assert_array_equal(host, np.asarray(feats))


def test_the_last_batch_is_padded_only_to_the_device_count(tmp_path, mesh):
  split = write_split(str(tmp_path), [3, 4, 4, 2], seed=4)  # 13 images
  seen = []

  @jax.jit
  def extract_fn(variables, image, camid):
    seen.append(image.shape[0])
    return jnp.concatenate([image.astype(jnp.float32).mean(axis=(1, 2)),
                            camid[:, None].astype(jnp.float32)], axis=1)

  # An eval batch of 32 for 13 images: one batch of 16 rows (13 rounded up to the 8 devices).
  big = evaluate.extract_features(
      extract_fn, None, split, make_config({'input.eval_batch_size': 32}, preset='pipeline'), mesh)
  assert seen == [16]
  # 40 images at 16 a batch: two full batches and one of 8, i.e. one extra shape.
  seen.clear()
  more = records.Split.from_lists(list(split.paths) * 3 + list(split.paths[:1]),
                                  list(split.pids) * 3 + [split.pids[0]],
                                  list(split.camids) * 3 + [split.camids[0]])
  feats = evaluate.extract_features(
      extract_fn, None, more, make_config({'input.eval_batch_size': 16}, preset='pipeline'), mesh)
  assert seen == [8]  # the batch of 16 was compiled above
  assert evaluate.pipeline.eval_last_batch(
      more, make_config({'input.eval_batch_size': 16}, preset='pipeline'), row_multiple=8) == 8
  np.testing.assert_array_equal(np.asarray(feats)[:13], np.asarray(big))
  np.testing.assert_array_equal(np.asarray(feats)[39], np.asarray(big)[0])


def test_last_eval_batch_sizes():
  split = records.Split.from_lists([f'{i}.jpg' for i in range(11)], [1] * 11, [0] * 11)
  last = lambda batch, **kw: evaluate.pipeline.eval_last_batch(  # noqa: E731
      split, make_config({'input.eval_batch_size': batch}, preset='pipeline'), **kw)
  assert last(4) == 3  # 4 + 4 + 3
  assert last(4, row_multiple=2) == 4
  assert last(16, row_multiple=8) == 16
  # Two processes: shares of 6 images, 2 per batch: every process's last batch has 2 rows,
  # and with 4 per process (batch 8), 6 = 4 + 2.
  assert last(4, process_count=2) == 2
  assert last(8, process_count=2) == 2
  assert last(8, process_count=2, row_multiple=4) == 4


# --------------------------------------------------------------------------------------------
# Ranking


def test_chunked_ranking_equals_evaluate_rank_bitwise_with_ties(mesh):
  # Small integer features: every distance is exact in float32 on any device, and many tie.
  rng = np.random.default_rng(0)
  qf = rng.integers(-2, 3, (37, 4)).astype(np.float32)
  gf = rng.integers(-2, 3, (120, 4)).astype(np.float32)
  labels = _labels(1)
  dist = metrics.pairwise_distance(qf, gf)
  assert (np.unique(dist, return_counts=True)[1] > 1).any()
  for chunk in (8, 16, 40):  # 40: one chunk holds every query (rounded up to 40 rows)
    want = metrics.evaluate_rank(dist, *labels, max_rank=30, query_chunk=chunk)
    got = evaluate.rank_on_device(jnp.asarray(qf), gf, *labels, mesh, max_rank=30,
                                  query_chunk=chunk)
    assert got['mAP'] == want['mAP'] and got['mINP'] == want['mINP'], chunk
    np.testing.assert_array_equal(got['cmc'], want['cmc'])
    assert got['num_skipped_queries'] == want['num_skipped_queries']


def test_chunked_ranking_of_float_features_matches_the_host_path(mesh):
  rng = np.random.default_rng(2)
  qf = rng.normal(size=(37, 16)).astype(np.float32)
  gf = rng.normal(size=(120, 16)).astype(np.float32)
  labels = _labels(3)
  want = metrics.evaluate_rank(metrics.pairwise_distance(qf, gf), *labels, max_rank=30,
                               query_chunk=16)
  got = evaluate.rank_on_device(qf, gf, *labels, mesh, max_rank=30, query_chunk=16)
  assert got['mAP'] == pytest.approx(want['mAP'], abs=1e-12)
  np.testing.assert_allclose(got['cmc'], want['cmc'], atol=1e-12)


def test_ranking_errors_name_the_problem(mesh):
  labels = _labels(4)
  qf, gf = np.zeros((37, 4), np.float32), np.ones((120, 4), np.float32)
  bad = qf.copy()
  bad[21, 1] = np.nan
  with pytest.raises(ValueError, match='query 21 contain NaN'):
    evaluate.rank_on_device(bad, gf, *labels, mesh, query_chunk=8)
  with pytest.raises(ValueError, match=r'gf must have shape \(120, D\)'):
    evaluate.rank_on_device(qf, gf[:5], *labels, mesh)
  with pytest.raises(ValueError, match='feature size'):
    evaluate.rank_on_device(qf, gf[:, :3], *labels, mesh)


# --------------------------------------------------------------------------------------------
# Re-ranking modes


def test_rerank_mode_resolution():
  assert evaluate.resolve_rerank_mode('auto', 100, 100 * 100 * 4) == 'exact'
  assert evaluate.resolve_rerank_mode('auto', 101, 100 * 100 * 4) == 'approx'
  assert evaluate.resolve_rerank_mode('exact', 10**6, 1) == 'exact'
  with pytest.raises(ValueError, match='config.eval.rerank_mode'):
    evaluate.resolve_rerank_mode('fast', 10, 10)


def test_approx_with_every_neighbour_equals_exact_and_modes_are_reported(mesh, caplog):
  rng = np.random.default_rng(5)
  qf = rng.integers(-2, 3, (20, 4)).astype(np.float32)
  gf = rng.integers(-2, 3, (60, 4)).astype(np.float32)
  query, gallery = _splits(*_labels(6, nq=20, ng=60, ids=8))
  cfg = _eval_cfg(rerank=True, rerank_k1=6, rerank_k2=3)
  off = evaluate.rank_features(qf, gf, query, gallery, _eval_cfg(), mesh)
  assert off['rerank_mode'] == 'off'
  cfg.rerank_mode = 'exact'
  exact = evaluate.rank_features(qf, gf, query, gallery, cfg, mesh)
  reference = evaluate.rank(qf, gf, query, gallery, cfg)  # the dense host path
  cfg.rerank_mode, cfg.rerank_topn = 'approx', 80  # every one of the q + g = 80 items
  with caplog.at_level(std_logging.INFO):
    approx = evaluate.rank_features(qf, gf, query, gallery, cfg, mesh)
  assert 'approx mode (config.eval.rerank_mode=approx)' in caplog.text
  assert (exact['rerank_mode'], approx['rerank_mode']) == ('exact', 'approx')
  for key in ('rank1', 'rank5', 'rank10', 'mAP', 'mINP'):
    assert exact[key] == reference[key]
    assert approx[key] == pytest.approx(exact[key], abs=1e-12), key
  assert exact['mAP'] != off['mAP']  # re-ranking changed something
  # 'auto' with a byte limit below the 80^2 float32 matrix takes the approximate path.
  cfg.rerank_mode, cfg.rerank_max_bytes = 'auto', 80 * 80 * 4 - 1
  assert evaluate.rank_features(qf, gf, query, gallery, cfg, mesh)['rerank_mode'] == 'approx'
  cfg.rerank_mode = 'exact'
  with pytest.raises(ValueError, match='max_bytes'):
    evaluate.rank_features(qf, gf, query, gallery, cfg, mesh)


@pytest.mark.parametrize('field,value,message', [
    ('input.device_prefetch', -1, 'config.input.device_prefetch'),
    ('eval.rerank_mode', 'fast', 'config.eval.rerank_mode'),
    ('eval.rerank_topn', 20, r'config.eval.rerank_topn=20 must be >= .* = 21'),
    ('eval.query_chunk', 0, 'config.eval.query_chunk'),
])
def test_new_config_fields_are_validated(field, value, message):
  config = config_defaults.base_config()
  run_config.validate(config)  # the defaults are valid
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    run_config.validate(config)
