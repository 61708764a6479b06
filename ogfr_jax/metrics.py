"""Ranking metrics for person re-identification: CMC, mAP, mINP and k-reciprocal re-ranking.

The reference implementations run on the host in numpy. Distance matrices at benchmark scale
are large (MSMT17: 11,659 x 82,161 float32 is 3.8 GB on its own), so every function walks over
query rows in chunks and never makes a full-size copy or a float64 version of its input.

For evaluation without any full matrix, the same figures come from pieces that work chunk by
chunk: `match_lists` (each query's true matches, from the labels alone), `match_ranks_device`
(a jnp function: the ranks of those matches in one chunk of distance rows, on the device), and
`RankAccumulator` (the CMC / AP / INP sums, shared with `evaluate_rank`, so that both paths do
the same float64 arithmetic on the same integer ranks). Likewise `re_ranking` has a variant
that needs only each image's nearest neighbours (`nearest_neighbours`,
`re_ranking_from_neighbours`). `ogfr_jax.evaluate` drives them on the devices.

Tie rule. Gallery items at exactly the same distance from a query are ranked by gallery index,
lowest first: the order `np.argsort(row, kind='stable')` gives. The results are therefore
deterministic and do not depend on the sorting algorithm, the chunk size or the device.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
  import jax



# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _as_1d(name: str, values: Any, length: int, length_of: str) -> np.ndarray:
  arr = np.asarray(values)
  if arr.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {arr.shape}')
  if arr.shape[0] != length:
    raise ValueError(f'{name} has {arr.shape[0]} entries but {length_of} is {length}')
  return arr


def _check_positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}')
  return int(value)


def _check_distance_dtype(name: str, arr: np.ndarray) -> None:
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f'{name} must hold real numbers, got dtype {arr.dtype}')


def _work_rows(block: np.ndarray, name: str, row_offset: int) -> np.ndarray:
  """`block` in the narrowest dtype that keeps every value; read-only use (may be a view).

  float32 is used whenever the rows convert to it exactly, so that sorting them gives the same
  order as sorting the originals; otherwise float64. A NaN cannot be ranked and is an error.
  """
  if block.dtype == np.float32:
    work = block
  else:
    work = block.astype(np.float32)
    if not np.array_equal(work.astype(block.dtype), block, equal_nan=True):
      work = block.astype(np.float64)
      if not np.array_equal(work.astype(block.dtype), block, equal_nan=True):
        raise ValueError(f'{name} holds values that float64 cannot represent exactly')
  nan_rows = np.flatnonzero(np.isnan(work).any(axis=1))
  if nan_rows.size:
    raise ValueError(f'{name} contains NaN (first in row {row_offset + int(nan_rows[0])})')
  return work


# ---------------------------------------------------------------------------------------------
# CMC / mAP / mINP
# ---------------------------------------------------------------------------------------------


def _positive_ranks_in_chunk(
    rows: np.ndarray, same_pid: np.ndarray, junk: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Ranks (1-based, among non-junk gallery items) of every true match of every query row.

  Instead of argsorting whole rows, only the negatives (different pid) are sorted -- a plain
  value sort, which numpy runs with SIMD and is several times faster than a stable argsort --
  and each true match is placed among them by binary search. A match's rank is then the number
  of negatives before it plus the number of matches before it.

  Returns (row of each match, its 0-based order among its row's matches, its rank), grouped by
  row in increasing order.
  """
  positive = same_pid & ~junk
  pos_rows, pos_cols = np.nonzero(positive)  # row-major, so columns ascend within a row
  pos_vals = rows[pos_rows, pos_cols]
  # Matches ordered by (row, distance, gallery index): lexsort is stable and the columns
  # already ascend, which gives the tie rule.
  order = np.lexsort((pos_vals, pos_rows))
  pos_rows, pos_cols, pos_vals = pos_rows[order], pos_cols[order], pos_vals[order]

  counts = np.bincount(pos_rows, minlength=rows.shape[0])
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  order_in_row = np.arange(pos_rows.size) - starts[pos_rows]

  negatives = rows.copy()
  # NaN sorts after every number (inputs were checked to be NaN-free), so each sorted row holds
  # its negatives first and the excluded items after them.
  np.putmask(negatives, same_pid, np.nan)
  negatives.sort(axis=1)

  negatives_before = np.empty(pos_rows.size, dtype=np.int64)
  for r in np.flatnonzero(counts):
    lo, hi = starts[r], starts[r] + counts[r]
    vals = pos_vals[lo:hi]
    left = np.searchsorted(negatives[r], vals, side='left')
    right = np.searchsorted(negatives[r], vals, side='right')
    # A negative at exactly a match's distance comes first only if its gallery index is lower.
    for t in np.flatnonzero(right > left):
      col = pos_cols[lo + t]
      prefix = rows[r, :col]
      left[t] += np.count_nonzero((prefix == vals[t]) & ~same_pid[r, :col])
    negatives_before[lo:hi] = left
  ranks = negatives_before + order_in_row + 1
  return pos_rows, order_in_row, ranks


def evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    query_chunk: int = 1024,
) -> dict[str, Any]:
  """CMC, mAP and mINP under the Market-1501 protocol.

  For each query, gallery items with the same pid AND the same camera as the query are dropped
  (they are the same view of the person, not a retrieval). A query left with no true match is
  skipped: it has no defined AP, and counting it as zero would penalise the dataset split rather
  than the model. Distractors (pid 0 in Market-1501) are ordinary negatives.

  Ties in distance are ranked by gallery index, lowest first (see the module docstring).

  If `max_rank` exceeds the gallery size, the CMC is padded with its last value. Every valid
  query is hit by then, so the padding is exact (1.0); the result keeps the requested length so
  that callers can index rank-k without checking the gallery size. (torchreid shortens the curve
  to the gallery size instead.)

  Args:
    distmat: (num_query, num_gallery) distances, smaller is closer. Any real dtype; rows are
      converted chunk by chunk, float32 when that is exact, so the matrix is never copied whole.
    q_pids, g_pids: identity labels, 1-D.
    q_camids, g_camids: camera labels, 1-D.
    max_rank: length of the returned CMC curve.
    query_chunk: query rows processed at once; peak extra memory is about
      query_chunk * num_gallery * 8 bytes for float32 input (one sorted copy of the rows and
      a few boolean masks), twice that for input that needs float64.

  Returns:
    dict with `cmc` (float64 array of length max_rank, fractions of valid queries whose first
    true match is within rank k+1), `mAP`, `mINP` (floats in [0, 1]), `num_valid_queries` and
    `num_skipped_queries`.

  Raises:
    ValueError: on shape or dtype mismatches (naming the argument), NaN distances, or when no
      query has a true match in the gallery.
  """
  if not isinstance(distmat, np.ndarray):
    distmat = np.asarray(distmat)
  if distmat.ndim != 2:
    raise ValueError(f'distmat must be 2-D (num_query, num_gallery), got shape {distmat.shape}')
  _check_distance_dtype('distmat', distmat)
  num_q, num_g = distmat.shape
  q_pids = _as_1d('q_pids', q_pids, num_q, 'distmat.shape[0]')
  q_camids = _as_1d('q_camids', q_camids, num_q, 'distmat.shape[0]')
  g_pids = _as_1d('g_pids', g_pids, num_g, 'distmat.shape[1]')
  g_camids = _as_1d('g_camids', g_camids, num_g, 'distmat.shape[1]')
  max_rank = _check_positive_int('max_rank', max_rank)
  query_chunk = _check_positive_int('query_chunk', query_chunk)
  if num_g == 0:
    raise ValueError('distmat has an empty gallery (shape[1] == 0)')

  totals = RankAccumulator(max_rank)
  for start in range(0, num_q, query_chunk):
    stop = min(start + query_chunk, num_q)
    totals.add_distances(distmat[start:stop], q_pids[start:stop], g_pids,
                         q_camids[start:stop], g_camids, row_offset=start)
  return totals.result()


_NO_MATCH_MESSAGE = (
    'no query has a true match in the gallery after removing same-pid same-camera items; '
    'check q_pids/g_pids and q_camids/g_camids')


class RankAccumulator:
  """Running CMC / AP / INP sums over chunks of queries, in the order they are added.

  `evaluate_rank` feeds it distance rows (`add_distances`); the on-device evaluation feeds it
  the ranks of each query's true matches (`add_match_ranks`). Both end in `add_positive_ranks`,
  so the same ranks give bitwise the same figures for the same chunking.
  """

  def __init__(self, max_rank: int = 50):
    self.max_rank = _check_positive_int('max_rank', max_rank)
    self._first_hit_hist = np.zeros(self.max_rank + 1, np.int64)  # last bin: beyond max_rank
    self._ap_sum = 0.0
    self._inp_sum = 0.0
    self._num_valid = 0
    self._num_query = 0

  def add_positive_ranks(self, pos_rows: np.ndarray, order_in_row: np.ndarray,
                         ranks: np.ndarray, num_rows: int) -> None:
    """One chunk of `num_rows` queries: for every true match, its row in the chunk, its
    0-based order among its row's matches and its 1-based rank among the non-junk gallery,
    grouped by row in increasing order (what `_positive_ranks_in_chunk` returns)."""
    self._num_query += int(num_rows)
    if pos_rows.size == 0:
      return
    max_rank = self.max_rank
    counts = np.bincount(pos_rows, minlength=num_rows)
    valid = counts > 0
    ends = np.cumsum(counts)
    first_rank = ranks[ends[valid] - counts[valid]]
    last_rank = ranks[ends[valid] - 1]
    precision_sum = np.bincount(
        pos_rows, weights=(order_in_row + 1) / ranks, minlength=num_rows
    )[valid]
    self._ap_sum += float(np.sum(precision_sum / counts[valid]))
    self._inp_sum += float(np.sum(counts[valid] / last_rank))
    self._first_hit_hist += np.bincount(np.minimum(first_rank - 1, max_rank),
                                        minlength=max_rank + 1)
    self._num_valid += int(valid.sum())

  def add_distances(self, rows: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                    q_camids: np.ndarray, g_camids: np.ndarray, row_offset: int = 0) -> None:
    """Ranks a chunk of distance rows (queries x whole gallery) on the host."""
    rows = _work_rows(np.asarray(rows), 'distmat', row_offset)
    q_pids, q_camids = np.asarray(q_pids), np.asarray(q_camids)
    same_pid = q_pids[:, None] == np.asarray(g_pids)[None, :]
    junk = same_pid & (q_camids[:, None] == np.asarray(g_camids)[None, :])
    self.add_positive_ranks(*_positive_ranks_in_chunk(rows, same_pid, junk), rows.shape[0])

  def add_match_ranks(self, ranks: np.ndarray, counts: np.ndarray) -> None:
    """A chunk from `match_ranks_device`: ranks [c, P], of which the first counts[i] of row i
    are real."""
    ranks, counts = np.asarray(ranks), np.asarray(counts, np.int64)
    keep = np.arange(ranks.shape[1])[None, :] < counts[:, None]
    pos_rows = np.repeat(np.arange(ranks.shape[0]), counts)
    order_in_row = np.nonzero(keep)[1]
    self.add_positive_ranks(pos_rows, order_in_row, ranks[keep].astype(np.int64),
                            ranks.shape[0])

  def result(self) -> dict[str, Any]:
    """evaluate_rank's dict; raises ValueError when no query had a true match."""
    if self._num_valid == 0:
      raise ValueError(_NO_MATCH_MESSAGE)
    num_valid = self._num_valid
    cmc = np.cumsum(self._first_hit_hist[:self.max_rank]) / num_valid
    # CMC padding past the gallery needs no special case: first hits never lie beyond it.
    return {
        'cmc': cmc.astype(np.float64),
        'mAP': self._ap_sum / num_valid,
        'mINP': self._inp_sum / num_valid,
        'num_valid_queries': num_valid,
        'num_skipped_queries': self._num_query - num_valid,
    }


# ---------------------------------------------------------------------------------------------
# Ranking on the device, chunk by chunk
# ---------------------------------------------------------------------------------------------

# Up to this many matches per query, `match_ranks_device` counts the matches ahead of each
# gallery item with one fused pass of comparisons; above it, by binary search (log2 passes).
_LINEAR_COUNT_MAX = 64


def match_lists(q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                g_camids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each query's true matches under the Market-1501 protocol, from the labels alone.

  A true match has the query's pid and another camera (same pid and camera is junk). Returns
  (indices int32 [num_query, P], counts int32 [num_query]): row i holds the gallery indices of
  query i's matches in increasing order, padded with num_gallery; P is the largest count.
  Host memory O(num_query x P).

  Raises ValueError on label arrays of different lengths (naming them), an empty gallery, or
  when no query has a match (as evaluate_rank does).
  """
  q_pids = np.asarray(q_pids)
  g_pids = np.asarray(g_pids)
  q_camids = _as_1d('q_camids', q_camids, q_pids.size, 'q_pids length')
  g_camids = _as_1d('g_camids', g_camids, g_pids.size, 'g_pids length')
  _as_1d('q_pids', q_pids, q_camids.size, 'q_camids length')
  _as_1d('g_pids', g_pids, g_camids.size, 'g_camids length')
  num_g = g_pids.size
  if num_g == 0:
    raise ValueError('the gallery is empty (g_pids has no entries)')
  order = np.argsort(g_pids, kind='stable')  # within a pid, gallery indices ascend
  sorted_pids = g_pids[order]
  lo = np.searchsorted(sorted_pids, q_pids, side='left')
  same = np.searchsorted(sorted_pids, q_pids, side='right') - lo
  width = max(int(same.max(initial=0)), 1)
  slot = np.arange(width)[None, :]
  cand = order[np.minimum(lo[:, None] + slot, num_g - 1)]
  real = (slot < same[:, None]) & (g_camids[cand] != q_camids[:, None])
  counts = real.sum(axis=1)
  if not counts.any():
    raise ValueError(_NO_MATCH_MESSAGE)
  width = int(counts.max())
  # Matches to the front of each row, keeping their increasing order.
  front = np.argsort(~real, axis=1, kind='stable')[:, :width]
  idx = np.take_along_axis(cand, front, axis=1)
  idx[np.arange(width)[None, :] >= counts[:, None]] = num_g
  return idx.astype(np.int32), counts.astype(np.int32)


def match_ranks_device(dist: jax.Array, match_idx: jax.Array, q_pids: jax.Array,
                       g_pids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Ranks of each query's true matches in one chunk of distance rows; pure jnp, jit it.

  The device's half of the chunked evaluation: no sort of the gallery, which XLA runs slowly
  on CPU and which would need the whole row order. The P matches of each query are sorted by
  (distance, gallery index) -- the module's tie rule -- and for every gallery item k the
  number t_k of matches ahead of it is counted. A negative (other pid) item precedes match m
  exactly when t_k <= m, so a histogram of t over the negatives, summed, gives the negatives
  ahead of each match; its rank is that plus the matches ahead of it, plus 1. Junk items
  (same pid and camera) are neither matches nor negatives, as in `evaluate_rank`.

  Args:
    dist: [c, G] distances of c queries to the whole gallery (float; NaN is reported).
    match_idx: [c, P] int, from `match_lists` (padding = G).
    q_pids: [c] int; g_pids: [G] int.

  Returns:
    (ranks int32 [c, P]: 1-based ranks of the matches in increasing order, entries past a
    row's match count meaningless; has_nan bool [c]: rows holding a NaN distance).
  """
  # Imported here, as scipy in _csr: the host reference functions need neither.
  import jax  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  c, g = dist.shape
  p = match_idx.shape[1]
  real = match_idx < g
  vals = jnp.take_along_axis(dist, jnp.minimum(match_idx, g - 1), axis=1)
  # Padding sorts last and is never ahead of anything: (inf, G) beats no (d, k) with k < G.
  # -0.0 becomes 0.0, which the total order of lax.sort would otherwise put first.
  vals = jnp.where(real, jnp.where(vals == 0, jnp.zeros_like(vals), vals), jnp.inf)
  idx = jnp.where(real, match_idx, g).astype(jnp.int32)
  vals, idx = lax.sort((vals, idx), dimension=1, num_keys=2)
  cols = lax.broadcasted_iota(jnp.int32, (1, g), 1)

  def ahead(v, i):  # match (v, i) precedes gallery item (dist, cols)
    return (v < dist) | ((v == dist) & (i < cols))

  if p <= _LINEAR_COUNT_MAX:
    ahead_count = sum(ahead(vals[:, m:m + 1], idx[:, m:m + 1]).astype(jnp.int32)
                      for m in range(p))
  else:
    lo = jnp.zeros((c, g), jnp.int32)
    hi = jnp.full((c, g), p, jnp.int32)
    for _ in range(math.ceil(math.log2(p + 1))):
      mid = (lo + hi) // 2
      at = jnp.minimum(mid, p - 1)
      yes = ahead(jnp.take_along_axis(vals, at, axis=1), jnp.take_along_axis(idx, at, axis=1))
      active = lo < hi
      lo = jnp.where(active & yes, mid + 1, lo)
      hi = jnp.where(active & ~yes, mid, hi)
    ahead_count = lo
  negative = (q_pids[:, None] != g_pids[None, :]).astype(jnp.int32)
  # A per-row scatter (vmap gives it batch dimensions), so a chunk split by rows over devices
  # stays split.
  hist = jax.vmap(lambda t, w: jnp.zeros(p + 1, jnp.int32).at[t].add(w))(ahead_count, negative)
  negatives_ahead = jnp.cumsum(hist, axis=1)[:, :p]
  ranks = negatives_ahead + jnp.arange(1, p + 1, dtype=jnp.int32)[None, :]
  return ranks, jnp.isnan(dist).any(axis=1)


def pairwise_distance_device(a: jax.Array, b: jax.Array) -> jax.Array:
  """Euclidean distances [len(a), len(b)] in float32 on the device, as `pairwise_distance`.

  Full float32 precision in the product: the default on some accelerators (TF32) would
  change the ranking of near neighbours.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  dot = jnp.matmul(a, b.T, precision=lax.Precision.HIGHEST)
  sq = (jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :]) - 2.0 * dot
  return jnp.sqrt(jnp.maximum(sq, 0.0))


def cmc_summary(result: dict[str, Any]) -> dict[str, float]:
  """The figures written to results.json: rank1, rank3, rank5, rank10, mAP, mINP as plain
  floats (rank3: Partial-REID and Partial-iLIDS are reported as rank-1 / rank-3)."""
  for key in ('cmc', 'mAP', 'mINP'):
    if key not in result:
      raise ValueError(f'result is missing {key!r}; pass the dict returned by evaluate_rank')
  cmc = np.asarray(result['cmc'])
  if cmc.ndim != 1 or cmc.shape[0] < 10:
    raise ValueError(f'result["cmc"] must be 1-D with at least 10 ranks, got shape {cmc.shape}')
  return {
      'rank1': float(cmc[0]),
      'rank3': float(cmc[2]),
      'rank5': float(cmc[4]),
      'rank10': float(cmc[9]),
      'mAP': float(result['mAP']),
      'mINP': float(result['mINP']),
  }


# ---------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------


def pairwise_distance(
    a: np.ndarray, b: np.ndarray, metric: str = 'euclidean', chunk: int = 4096
) -> np.ndarray:
  """(len(a), len(b)) float32 distances between feature rows.

  'euclidean' uses |x|^2 + |y|^2 - 2 x.y, one matrix product per chunk instead of a
  (n, m, d) difference tensor; rounding can make that slightly negative for near-identical
  rows, so it is clipped at 0 before the square root. 'cosine' is 1 - cos, clipped to [0, 2];
  an all-zero row is treated as having unit norm (distance 1 to everything).
  `chunk` bounds the rows of `a` handled per matrix product.
  """
  a = np.asarray(a)
  b = np.asarray(b)
  for name, arr in (('a', a), ('b', b)):
    if arr.ndim != 2:
      raise ValueError(f'{name} must be 2-D (num_items, feature_dim), got shape {arr.shape}')
    _check_distance_dtype(name, arr)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f'a has feature size {a.shape[1]} but b has {b.shape[1]}')
  if metric not in ('euclidean', 'cosine'):
    raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
  chunk = _check_positive_int('chunk', chunk)
  a = a.astype(np.float32, copy=False)
  b = b.astype(np.float32, copy=False)
  if metric == 'cosine':
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), np.float32(1e-12))
  else:
    b_sq = np.einsum('ij,ij->i', b, b)
  out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
  for start in range(0, a.shape[0], chunk):
    block = a[start:start + chunk]
    if metric == 'cosine':
      block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), np.float32(1e-12))
      np.subtract(np.float32(1.0), block @ b.T, out=out[start:start + chunk])
      np.clip(out[start:start + chunk], 0.0, 2.0, out=out[start:start + chunk])
    else:
      dst = out[start:start + chunk]
      np.matmul(block, b.T, out=dst)
      dst *= np.float32(-2.0)
      dst += np.einsum('ij,ij->i', block, block)[:, None]
      dst += b_sq[None, :]
      np.maximum(dst, 0.0, out=dst)
      np.sqrt(dst, out=dst)
  return out


# Re-ranking lives in ogfr_jax.rerank; these names stay part of this module's interface.
_RERANK_NAMES = ('nearest_neighbours', 'normalize_rerank_rows', 're_ranking',
                 're_ranking_from_neighbours')


def __getattr__(name: str):
  if name in _RERANK_NAMES:
    from ogfr_jax import rerank  # pylint: disable=g-import-not-at-top
    return getattr(rerank, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
