"""P x K identity sampler: batch structure, determinism and a seed-free epoch length."""

import logging

import numpy as np
import pytest

from ogfr_jax.data import sampler


def _pids(counts):
  return np.repeat(np.arange(len(counts)), counts)


def _assert_pk(pids, batches, P, K):
  for row in batches:
    ids = pids[row].reshape(P, K)
    assert (ids == ids[:, :1]).all(), 'each identity must fill K consecutive slots'
    assert len(set(ids[:, 0].tolist())) == P, 'the P identities must be distinct'


def test_batches_are_p_distinct_ids_times_k():
  rng = np.random.default_rng(0)
  pids = _pids(rng.integers(1, 15, size=60))
  batches = sampler.epoch_batches(pids, 8, 4, seed=3, epoch=0)
  assert batches.shape == (sampler.steps_per_epoch(pids, 8, 4), 32)
  assert batches.shape[0] > 0
  _assert_pk(pids, batches, 8, 4)


def test_images_are_not_repeated_within_an_epoch():
  # Every identity has at least K images, so nothing is drawn with replacement.
  rng = np.random.default_rng(1)
  pids = _pids(rng.integers(4, 12, size=40))
  batches = sampler.epoch_batches(pids, 4, 4, seed=0, epoch=0)
  flat = batches.reshape(-1)
  assert np.unique(flat).size == flat.size


def test_balanced_split_uses_every_image_once():
  pids = _pids([8] * 12)
  batches = sampler.epoch_batches(pids, 3, 4, seed=5, epoch=2)
  assert batches.shape == (8, 12)
  assert sorted(batches.reshape(-1).tolist()) == list(range(pids.size))


def test_deterministic_in_seed_and_epoch():
  pids = _pids([5, 9, 4, 7, 6, 8, 3, 10])
  a = sampler.epoch_batches(pids, 4, 2, seed=7, epoch=1)
  b = sampler.epoch_batches(pids, 4, 2, seed=7, epoch=1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, sampler.epoch_batches(pids, 4, 2, seed=7, epoch=2))
  assert not np.array_equal(a, sampler.epoch_batches(pids, 4, 2, seed=8, epoch=1))


def test_steps_per_epoch_does_not_depend_on_the_seed():
  # A skewed split: one identity holds most images, so a greedy sampler that stops when fewer
  # than P identities are left would produce a seed-dependent number of batches.
  pids = _pids([60, 9, 3, 2, 5, 7, 4, 2, 11])
  expected = sampler.steps_per_epoch(pids, 4, 2)
  for seed in range(12):
    for epoch in range(3):
      batches = sampler.epoch_batches(pids, 4, 2, seed=seed, epoch=epoch)
      assert batches.shape[0] == expected
      _assert_pk(pids, batches, 4, 2)


def test_steps_per_epoch_is_the_largest_feasible_count():
  # Groups of K: id 0 has 100, ids 1..19 have one each. B batches of P=4 distinct ids need
  # sum(min(groups, B)) >= 4B, i.e. 19 + B >= 4B, so B = 6.
  pids = _pids([400] + [4] * 19)
  assert sampler.steps_per_epoch(pids, 4, 4) == 6
  _assert_pk(pids, sampler.epoch_batches(pids, 4, 4, seed=0, epoch=0), 4, 4)


def test_identities_under_k_are_filled_with_replacement(caplog):
  counts = [1, 2, 6, 5, 4, 7, 3]
  pids = _pids(counts)
  # Both loggers: the console may have raised absl's own level in an earlier test.
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger='absl'):
    batches = sampler.epoch_batches(pids, 3, 4, seed=0, epoch=0)
    sampler.epoch_batches(pids, 3, 4, seed=0, epoch=1)
  _assert_pk(pids, batches, 3, 4)
  seen = set(pids[batches[:, ::4]].reshape(-1).tolist())
  assert {0, 1} & seen, 'identities with fewer than K images still take part'
  for row in batches:
    for group in row.reshape(3, 4):
      pid = pids[group[0]]
      assert set(group.tolist()) <= set(np.flatnonzero(pids == pid).tolist())
  notes = [r for r in caplog.records if 'fewer than K=4' in r.getMessage()]
  assert len(notes) == 1, 'the under-K note is logged once, not once per epoch'
  assert notes[0].getMessage().startswith('3 identities')


def test_too_few_identities_is_an_error_naming_the_numbers():
  pids = _pids([5, 5, 5])
  with pytest.raises(ValueError, match=r'3 identities .*P = 4'):
    sampler.epoch_batches(pids, 4, 2, seed=0, epoch=0)


def test_batch_shape_must_match_the_configured_global_batch():
  assert sampler.check_batch_shape(16, 4, 64) == 64
  with pytest.raises(ValueError, match='16 x 4 = 64 must equal the configured global batch 32'):
    sampler.check_batch_shape(16, 4, 32)
  with pytest.raises(ValueError, match='positive'):
    sampler.check_batch_shape(0, 4)
