"""P x K identity sampling: each global batch holds P distinct identities with K images each.

Batch-hard triplet mining needs every identity of a batch to bring K images, so batches are
built from groups of K images of one identity (in the spirit of TransReID's
RandomIdentitySampler). Unlike a sampler that draws identities until too few are left, the
number of batches here is a function of the group counts alone, never of the random draws:
the schedule, the checkpoint step and the data iterator all agree on the epoch length for
every seed, and an epoch is a pure function of (seed, epoch) so that any process or worker can
rebuild it without communication.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from ogfr_jax.data.datasets import DatasetError

# Separates the sampler's random stream from the per-example augmentation streams that are
# seeded from the same config seed.
_SAMPLER_STREAM = 0x5A4D

# (number of images, number of identities under K, K) already reported, so the note about
# identities filled with replacement appears once per process rather than once per epoch.
_REPORTED_UNDER_K: set[tuple[int, int, int]] = set()


def check_batch_shape(P: int, K: int, global_batch: int | None = None) -> int:
  """Validates P and K and returns the global batch size P * K."""
  if int(P) != P or int(K) != K or P < 1 or K < 1:
    raise ValueError(
        f'config.input.ids_per_batch (P={P}) and config.input.images_per_id (K={K}) must be '
        'positive integers')
  if global_batch is not None and P * K != global_batch:
    raise ValueError(
        f'P x K = {P} x {K} = {P * K} must equal the configured global batch {global_batch} '
        '(config.input.ids_per_batch x config.input.images_per_id)')
  return int(P * K)


def _groups_per_id(pids: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
  """Sorted unique ids and how many K-groups each contributes (at least one)."""
  uniq, counts = np.unique(pids, return_counts=True)
  return uniq, np.maximum(counts // K, 1)


def _max_batches(groups: np.ndarray, P: int) -> int:
  """Largest B such that B batches of P distinct ids can be cut from the groups.

  B batches are possible exactly when sum_i min(g_i, B) >= P * B (no identity can appear twice
  in a batch, so at most B of its groups are usable). The feasible B form an interval
  [0, B*], found by bisection.
  """
  lo, hi = 0, int(groups.sum()) // P
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if int(np.minimum(groups, mid).sum()) >= P * mid:
      lo = mid
    else:
      hi = mid - 1
  return lo


def _check_ids(pids: np.ndarray, P: int) -> None:
  """Too few identities is a fact about the data on disk (or the choice of P): a
  `DatasetError`, which entry points print as one line."""
  num_ids = int(np.unique(pids).size)
  if not pids.size:
    raise DatasetError(
        'the train split has no images: nothing to train on (is the training folder of '
        'config.dataset.root empty?)')
  if num_ids < P:
    raise DatasetError(
        f'the train split has {num_ids} identities ({pids.size} images) but each batch needs '
        f'P = {P} distinct identities (config.input.ids_per_batch)')


def steps_per_epoch(pids, P: int, K: int) -> int:
  """Number of P x K batches per epoch; depends only on the per-identity image counts."""
  pids = np.asarray(pids).reshape(-1)
  check_batch_shape(P, K)
  _check_ids(pids, P)
  _, groups = _groups_per_id(pids, K)
  return _max_batches(groups, P)


def _report_under_k(num_images: int, num_under: int, K: int) -> None:
  key = (num_images, num_under, K)
  if num_under and key not in _REPORTED_UNDER_K:
    _REPORTED_UNDER_K.add(key)
    logging.info(
        '%d identities have fewer than K=%d images; their single group of K is drawn with '
        'replacement', num_under, K)


def epoch_batches(pids, P: int, K: int, seed: int, epoch: int) -> np.ndarray:
  """Indices into the split for every batch of one epoch, int64 [num_batches, P * K].

  Row r is P runs of K indices, one run per identity, all P identities distinct. The result is
  a pure function of (pids, P, K, seed, epoch), and num_batches == steps_per_epoch(pids, P, K).
  """
  pids = np.asarray(pids).reshape(-1)
  num_batches = steps_per_epoch(pids, P, K)
  if seed < 0 or epoch < 0:
    raise ValueError(f'seed ({seed}) and epoch ({epoch}) must be non-negative')
  rng = np.random.default_rng([int(seed), int(epoch), _SAMPLER_STREAM])
  uniq, groups_per_id = _groups_per_id(pids, K)
  order = np.argsort(pids, kind='stable')
  starts = np.searchsorted(pids[order], uniq)
  ends = np.append(starts[1:], pids.size)

  # Per identity: shuffle its images and cut them into groups of K (the remainder is dropped,
  # as in TransReID); an identity with fewer than K images gets one group drawn with
  # replacement.
  groups = []
  num_under = 0
  for s, e in zip(starts, ends):
    members = order[s:e]
    if members.size < K:
      num_under += 1
      members = rng.choice(members, size=K, replace=True)
    else:
      members = rng.permutation(members)
    n = members.size // K
    groups.append(members[:n * K].reshape(n, K))
  _report_under_k(pids.size, num_under, K)

  # Keep at most num_batches groups per identity, then drop random groups until exactly
  # P * num_batches remain. Dropping never breaks feasibility: with every count <= B and a
  # total of P * B the groups can always be dealt into B batches of P distinct ids.
  counts = np.minimum(groups_per_id, num_batches)
  excess = int(counts.sum()) - P * num_batches
  if excess:
    owner = np.repeat(np.arange(uniq.size), counts)
    dropped = rng.choice(owner.size, size=excess, replace=False)
    counts = counts - np.bincount(owner[dropped], minlength=uniq.size)
  # Which of an identity's (already shuffled) groups are used: its first counts[i].
  used = np.zeros(uniq.size, np.int64)

  # Deal batches one at a time. With r batches left, an identity holding r groups must be in
  # this batch (otherwise it could not be placed later); at most P are in that state because
  # the counts sum to P * r. The other slots go to distinct ids drawn uniformly among those
  # that still have groups, as TransReID's sampler does.
  out = np.empty((num_batches, P * K), np.int64)
  for b in range(num_batches):
    remaining = num_batches - b
    forced = np.flatnonzero(counts == remaining)
    free = np.flatnonzero((counts > 0) & (counts < remaining))
    chosen = np.concatenate([forced, rng.choice(free, size=P - forced.size, replace=False)])
    chosen = rng.permutation(chosen)
    for slot, i in enumerate(chosen):
      out[b, slot * K:(slot + 1) * K] = groups[i][used[i]]
    used[chosen] += 1
    counts[chosen] -= 1
  # Forced identities cluster at the end of the deal; shuffling the batch order spreads them.
  return out[rng.permutation(num_batches)]
