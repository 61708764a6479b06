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
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

if TYPE_CHECKING:
  import jax

# Past this many pair terms per step the Jaccard accumulation in `re_ranking` is split further,
# which bounds its temporary index arrays to a few hundred MB.
_RERANK_PAIR_BUDGET = 8_000_000
# Rows of the (q+g)-wide distance matrix assembled at a time in `re_ranking`.
_RERANK_ROW_CHUNK = 512


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
  """The figures written to results.json: rank1, rank5, rank10, mAP, mINP as plain floats."""
  for key in ('cmc', 'mAP', 'mINP'):
    if key not in result:
      raise ValueError(f'result is missing {key!r}; pass the dict returned by evaluate_rank')
  cmc = np.asarray(result['cmc'])
  if cmc.ndim != 1 or cmc.shape[0] < 10:
    raise ValueError(f'result["cmc"] must be 1-D with at least 10 ranks, got shape {cmc.shape}')
  return {
      'rank1': float(cmc[0]),
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


# ---------------------------------------------------------------------------------------------
# k-reciprocal re-ranking (Zhong et al., CVPR 2017)
# ---------------------------------------------------------------------------------------------


class _FullDistance:
  """Rows of the (q+g) x (q+g) matrix [[q_q, q_g], [q_g^T, g_g]] without assembling it.

  Values are the squared input distances divided by their row maximum: squaring follows the
  authors' reference setting (Euclidean input, squared Euclidean used), and the per-row scaling
  makes the kernel exp(-d) independent of the feature scale.
  """

  def __init__(self, q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray):
    self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
    self.nq, self.ng = q_g.shape
    self.n = self.nq + self.ng
    row_max = np.concatenate([
        np.maximum(q_q.max(axis=1), q_g.max(axis=1)),
        np.maximum(q_g.max(axis=0), g_g.max(axis=1)),
    ]).astype(np.float32)
    # Squaring is monotone on non-negative floats, so max(d)^2 equals max(d^2) exactly.
    row_max_sq = row_max * row_max
    # An all-zero row stays all zero instead of becoming 0/0.
    self.scale = np.where(row_max_sq > 0, row_max_sq, np.float32(1.0)).astype(np.float32)

  def rows(self, start: int, stop: int) -> np.ndarray:
    """Normalised rows start..stop-1, float32."""
    parts = []
    if start < self.nq:
      s, e = start, min(stop, self.nq)
      parts.append(np.concatenate([self.q_q[s:e], self.q_g[s:e]], axis=1).astype(np.float32))
    if stop > self.nq:
      s, e = max(start, self.nq) - self.nq, stop - self.nq
      parts.append(np.concatenate([self.q_g[:, s:e].T, self.g_g[s:e]], axis=1).astype(np.float32))
    block = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    block *= block
    block /= self.scale[start:stop, None]
    return block

  def at(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Normalised values at scattered positions (i, j)."""
    out = np.empty(i.shape, dtype=np.float32)
    iq, jq = i < self.nq, j < self.nq
    for sel, block, ii, jj in (
        (iq & jq, self.q_q, i, j),
        (iq & ~jq, self.q_g, i, j - self.nq),
        (~iq & jq, self.q_g, j, i - self.nq),  # gallery row of q_g^T
        (~iq & ~jq, self.g_g, i - self.nq, j - self.nq),
    ):
      out[sel] = block[ii[sel], jj[sel]]
    out *= out
    out /= self.scale[i]
    return out


def _top_k_stable(block: np.ndarray, k: int) -> np.ndarray:
  """Column indices of the k smallest entries of each row, ordered as a stable argsort would.

  argpartition alone picks arbitrarily among values tied at the k-th place; here ties are
  resolved by column index, in O(n) per row rather than a full O(n log n) sort.
  """
  n = block.shape[1]
  if k >= n:
    return np.argsort(block, axis=1, kind='stable')
  kth = np.partition(block, k - 1, axis=1)[:, k - 1:k]
  less = block < kth
  tied = block == kth
  room = k - less.sum(axis=1, keepdims=True)
  chosen = less | (tied & (np.cumsum(tied, axis=1) <= room))
  cols = np.nonzero(chosen)[1].reshape(block.shape[0], k)  # ascending within each row
  vals = np.take_along_axis(block, cols, axis=1)
  return np.take_along_axis(cols, np.argsort(vals, axis=1, kind='stable'), axis=1)


def _reciprocal_sets(top: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """R(i, k): the i's top-(k+1) neighbours that also have i in their own top-(k+1).

  Returns the neighbour indices (N, k+1) and a boolean mask of which belong to R(i, k).
  """
  fwd = top[:, :k + 1]
  ids = np.arange(top.shape[0])[:, None, None]
  mask = (top[fwd, :k + 1] == ids).any(axis=2)
  return fwd, mask


def _expanded_reciprocal_sets(top: np.ndarray, k1: int) -> list[np.ndarray]:
  """R*(i, k1): R(i, k1) plus R(c, k1/2) of each member c that overlaps it by more than 2/3.

  The 1/2 expansion recovers true matches that the strict k-reciprocal test misses (for example
  when one view is occluded), and the 2/3 overlap test keeps it from pulling in neighbours of
  neighbours that are merely close. Half of k1 is rounded as np.around does (to even on .5),
  matching the authors' reference setting.
  """
  n = top.shape[0]
  half = int(np.around(k1 / 2))
  fwd, mask = _reciprocal_sets(top, k1)
  fwd_h, mask_h = _reciprocal_sets(top, half)
  sets_k = np.where(mask, fwd, -1)  # (N, k1+1), -1 = not in R(i, k1)
  sets_h = np.where(mask_h, fwd_h, -2)  # (N, half+1), -2 never equals a member of sets_k
  size_h = mask_h.sum(axis=1)

  merged = []
  step = max(1, 4_000_000 // (sets_k.shape[1] ** 2 * sets_h.shape[1]))
  for start in range(0, n, step):
    stop = min(start + step, n)
    own = sets_k[start:stop]  # (c, k1+1)
    cand = np.where(own >= 0, own, 0)
    cand_sets = sets_h[cand]  # (c, k1+1, half+1)
    overlap = (cand_sets[:, :, :, None] == own[:, None, None, :]).any(axis=3).sum(axis=2)
    accept = (own >= 0) & (overlap > (2.0 / 3.0) * size_h[cand])
    extra = np.where(accept[:, :, None], cand_sets, -1).reshape(stop - start, -1)
    rows = np.concatenate([own, extra], axis=1)
    rows = np.where(rows >= 0, rows, n)  # n sorts last and marks "empty"
    rows.sort(axis=1)
    keep = rows < n
    keep[:, 1:] &= rows[:, 1:] != rows[:, :-1]
    merged.extend(r[k] for r, k in zip(rows, keep))
  return merged


def _csr(n_rows: int, n_cols: int, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray):
  import scipy.sparse  # jax depends on scipy; imported here to keep module import light

  return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(n_rows, n_cols))


def _jaccard_min_sums(v_query, v_gallery_csc, num_gallery: int, start: int, stop: int):
  """sum_k min(V[i, k], V[j, k]) for query rows start..stop-1 and every gallery row j.

  The sum only has terms where both rows are non-zero, so it walks each query row's non-zero
  columns k and the gallery rows that are non-zero in column k (an inverted index), never
  forming a dense (q+g)-wide V.
  """
  block = v_query[start:stop].tocoo()
  cols = block.col
  col_ptr = v_gallery_csc.indptr
  counts = col_ptr[cols + 1] - col_ptr[cols]
  total = int(counts.sum())
  local_rows = np.repeat(block.row, counts)
  offsets = np.repeat(col_ptr[cols] - (np.cumsum(counts) - counts), counts) + np.arange(total)
  gal_rows = v_gallery_csc.indices[offsets]
  mins = np.minimum(np.repeat(block.data, counts), v_gallery_csc.data[offsets])
  flat = local_rows.astype(np.int64) * num_gallery + gal_rows
  sums = np.bincount(flat, weights=mins, minlength=(stop - start) * num_gallery)
  return sums.reshape(stop - start, num_gallery)


def re_ranking(
    q_g_dist: np.ndarray,
    q_q_dist: np.ndarray,
    g_g_dist: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_bytes: int = 4 * 1024**3,
) -> np.ndarray:
  """k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with
  k-reciprocal Encoding", CVPR 2017). Returns the re-ranked (num_query, num_gallery) float32
  distance.

  Over all N = q + g images:
    1. d: the input distances squared and divided by their row maximum (see _FullDistance).
    2. R*(i): the k1-reciprocal neighbours of i, expanded with the k1/2-reciprocal sets of its
       members that overlap it by more than 2/3.
    3. V(i, j) = exp(-d(i, j)) for j in R*(i), else 0, each row scaled to sum 1 (Gaussian-kernel
       encoding of the neighbour set).
    4. Local query expansion: V(i) is replaced by the mean of V over i's k2 nearest neighbours
       (i included); skipped when k2 == 1.
    5. Jaccard distance d_J(i, j) = 1 - sum min(V_i, V_j) / sum max(V_i, V_j), where
       sum max = sum V_i + sum V_j - sum min, so only the shared non-zeros need visiting.
    6. Result: d_J * (1 - lambda_value) + d * lambda_value, on query rows and gallery columns.
  Neighbour lists break distance ties by index (stable-sort order). If k1 + 1 or k2 exceed N the
  lists hold all N images.

  Memory: the method needs all (q+g)^2 distances (the caller's g_g_dist alone is g^2 values), so
  when (q+g)^2 * 4 bytes exceeds `max_bytes` it refuses rather than approximating. Internally it
  never assembles the full matrix: rows are built in chunks, V is kept sparse, and only the
  q x g result is dense.

  Args:
    q_g_dist: (q, g) query-gallery distances (plain, non-negative, e.g. Euclidean).
    q_q_dist: (q, q) query-query distances.
    g_g_dist: (g, g) gallery-gallery distances.
    k1, k2: neighbourhood sizes (paper: 20 and 6).
    lambda_value: weight of the original distance in the result, in [0, 1].
    max_bytes: refuse problems whose float32 (q+g)^2 matrix would exceed this.
  """
  q_g = np.asarray(q_g_dist)
  q_q = np.asarray(q_q_dist)
  g_g = np.asarray(g_g_dist)
  if q_g.ndim != 2:
    raise ValueError(f'q_g_dist must be 2-D (num_query, num_gallery), got shape {q_g.shape}')
  nq, ng = q_g.shape
  if q_q.shape != (nq, nq):
    raise ValueError(f'q_q_dist must have shape {(nq, nq)} to match q_g_dist, got {q_q.shape}')
  if g_g.shape != (ng, ng):
    raise ValueError(f'g_g_dist must have shape {(ng, ng)} to match q_g_dist, got {g_g.shape}')
  if nq == 0 or ng == 0:
    raise ValueError(f'q_g_dist must be non-empty, got shape {q_g.shape}')
  k1 = _check_positive_int('k1', k1)
  k2 = _check_positive_int('k2', k2)
  if not 0.0 <= float(lambda_value) <= 1.0:
    raise ValueError(f'lambda_value must be in [0, 1], got {lambda_value!r}')
  n = nq + ng
  needed = n * n * 4
  if needed > max_bytes:
    raise ValueError(
        f're-ranking {nq} queries against {ng} gallery images needs the full ({n} x {n}) '
        f'distance matrix, about {needed:,} bytes ({needed / 1024**3:.1f} GiB) in float32, over '
        f'max_bytes={max_bytes:,}. Disable re-ranking or evaluate on a smaller gallery.'
    )
  for name, arr in (('q_g_dist', q_g), ('q_q_dist', q_q), ('g_g_dist', g_g)):
    _check_distance_dtype(name, arr)
    # Row chunks keep the temporary masks small for a large g_g_dist.
    for start in range(0, arr.shape[0], _RERANK_ROW_CHUNK):
      block = arr[start:start + _RERANK_ROW_CHUNK]
      if np.isnan(block).any():
        raise ValueError(f'{name} contains NaN')
      if block.size and block.min() < 0:
        raise ValueError(f'{name} has negative entries; re-ranking needs non-negative distances')

  full = _FullDistance(q_g, q_q, g_g)
  k = min(max(k1 + 1, k2), n)
  top = np.empty((n, k), dtype=np.int64)
  for start in range(0, n, _RERANK_ROW_CHUNK):
    stop = min(start + _RERANK_ROW_CHUNK, n)
    top[start:stop] = _top_k_stable(full.rows(start, stop), k)

  v = _k_reciprocal_encoding(top, k1, k2, full.at)
  out = np.empty((nq, ng), dtype=np.float32)
  lam = float(lambda_value)
  for start, stop, jaccard in _jaccard_blocks(v, nq, ng):
    original = full.rows(start, stop)[:, nq:]
    out[start:stop] = jaccard * (1.0 - lam) + original * lam
  return out


def _k_reciprocal_encoding(top: np.ndarray, k1: int, k2: int,
                           value_at: Callable[[np.ndarray, np.ndarray], np.ndarray],
                           keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None):
  """Steps 2-4 of `re_ranking`: the sparse (N x N) encoding V, query expansion included.

  `top` holds each item's nearest items (stable order), at least max(k1 + 1, k2) of them or
  all N; `value_at(i, j)` gives the normalised distances at scattered positions. `keep(i, j)`,
  if given, selects which members of the expanded neighbour sets stay (the top-N variant
  keeps those in the item's own list, where their distance is known).
  """
  n = top.shape[0]
  # Gaussian-kernel encoding of each expanded neighbour set, rows summing to 1.
  sets = _expanded_reciprocal_sets(top, k1)
  sizes = np.array([s.size for s in sets], dtype=np.int64)
  v_rows = np.repeat(np.arange(n), sizes)
  v_cols = np.concatenate(sets)
  if keep is not None:
    kept = keep(v_rows, v_cols)
    v_rows, v_cols = v_rows[kept], v_cols[kept]
  weights = np.exp(-value_at(v_rows, v_cols).astype(np.float64))
  row_sums = np.bincount(v_rows, weights=weights, minlength=n)
  weights /= row_sums[v_rows]
  v = _csr(n, n, v_rows, v_cols, weights)

  if k2 != 1:
    k2_eff = min(k2, n)
    qe_rows = np.repeat(np.arange(n), k2_eff)
    qe = _csr(n, n, qe_rows, top[:, :k2_eff].ravel(), np.full(qe_rows.size, 1.0 / k2_eff))
    v = (qe @ v).tocsr()
  v.sum_duplicates()
  return v


def _jaccard_blocks(v, nq: int, ng: int) -> Iterator[tuple[int, int, np.ndarray]]:
  """Step 5 of `re_ranking`: (start, stop, Jaccard distances float64 [stop - start, ng]) for
  consecutive blocks of query rows, sized so that each block's work stays in budget."""
  row_sums_v = np.asarray(v.sum(axis=1)).ravel()
  v_query = v[:nq]
  v_gallery_csc = v[nq:].tocsc()
  v_gallery_csc.sort_indices()
  col_nnz = np.diff(v_gallery_csc.indptr)
  # Pair terms each query row generates; query rows are grouped so each step stays in budget.
  per_query = np.bincount(
      np.repeat(np.arange(nq), np.diff(v_query.indptr)),
      weights=col_nnz[v_query.indices],
      minlength=nq,
  )
  row_cap = max(1, 16_000_000 // (8 * ng))  # bounds the dense (rows, g) float64 min-sums
  start = 0
  while start < nq:
    stop = start + 1
    budget = per_query[start]
    while stop < nq and stop - start < row_cap and budget + per_query[stop] <= _RERANK_PAIR_BUDGET:
      budget += per_query[stop]
      stop += 1
    min_sum = _jaccard_min_sums(v_query, v_gallery_csc, ng, start, stop)
    # sum max(a, b) = sum a + sum b - sum min(a, b). Row sums are 1 unless a neighbour set came
    # out empty (possible with many exact duplicates); two empty rows share nothing: d_J = 1.
    max_sum = row_sums_v[start:stop, None] + row_sums_v[None, nq:] - min_sum
    yield start, stop, 1.0 - np.divide(min_sum, max_sum, out=np.zeros_like(min_sum),
                                       where=max_sum > 0)
    start = stop


# ---------------------------------------------------------------------------------------------
# Re-ranking from each item's nearest neighbours (no (q+g)^2 matrix)
# ---------------------------------------------------------------------------------------------


def normalize_rerank_rows(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(normalised rows float32, per-row scale float32) of raw distance rows over all q+g
  items: squared and divided by the squared row maximum, as `re_ranking` does (_FullDistance)."""
  block = np.array(raw, dtype=np.float32, copy=True)
  row_max = block.max(axis=1)
  row_max_sq = row_max * row_max
  scale = np.where(row_max_sq > 0, row_max_sq, np.float32(1.0)).astype(np.float32)
  block *= block
  block /= scale[:, None]
  return block, scale


def nearest_neighbours(rows_fn: Callable[[int, int], np.ndarray], num_items: int, top_n: int,
                       row_chunk: int = _RERANK_ROW_CHUNK
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each item's top_n nearest items by normalised distance, on the host, in row chunks.

  `rows_fn(start, stop)` returns raw (non-negative) distances of items start..stop-1 to all
  `num_items` items (queries first, then gallery). Returns (indices int64 [N, n], normalised
  distances float32 [N, n], row scales float32 [N]) with n = min(top_n, N), each row in
  increasing order with ties by index. `ogfr_jax.evaluate` computes the same lists from
  features on the devices.
  """
  top_n = _check_positive_int('top_n', top_n)
  n = min(top_n, num_items)
  idx = np.empty((num_items, n), np.int64)
  val = np.empty((num_items, n), np.float32)
  scales = np.empty(num_items, np.float32)
  for start in range(0, num_items, row_chunk):
    stop = min(start + row_chunk, num_items)
    raw = np.asarray(rows_fn(start, stop))
    if raw.shape != (stop - start, num_items):
      raise ValueError(f'rows_fn({start}, {stop}) returned shape {raw.shape}, expected '
                       f'{(stop - start, num_items)}')
    block, scales[start:stop] = normalize_rerank_rows(raw)
    idx[start:stop] = _top_k_stable(block, n)
    val[start:stop] = np.take_along_axis(block, idx[start:stop], axis=1)
  return idx, val, scales


def re_ranking_from_neighbours(
    top_idx: np.ndarray,
    top_val: np.ndarray,
    original_rows: Callable[[int, int], np.ndarray],
    num_query: int,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> Iterator[tuple[int, int, np.ndarray]]:
  """k-reciprocal re-ranking from each item's nearest-neighbour list; yields re-ranked rows.

  The same steps as `re_ranking`, with one restriction: the expanded neighbour set R*(i) keeps
  only members found in i's own list (an expansion may bring in neighbours of neighbours that
  lie further away). With lists of all q+g items nothing is dropped and the result equals
  `re_ranking` on the same distances; with lists of n >= k1 + 1 items every other step is
  unchanged, so only far expansions are lost. Memory is O((q+g) x n) plus one block of rows,
  instead of the (q+g)^2 matrix.

  Args:
    top_idx, top_val: [q+g, n] from `nearest_neighbours` (or its device counterpart): indices
      and normalised distances, each row sorted (ties by index); queries first.
    original_rows: (start, stop) -> normalised distances float32 [stop - start, g] of those
      query rows to the gallery (same normalisation as top_val), for the lambda term.
    num_query: q.
    k1, k2, lambda_value: as in `re_ranking`.

  Yields:
    (start, stop, re-ranked distances float32 [stop - start, g]) for consecutive query blocks.
  """
  top_idx = np.asarray(top_idx)
  top_val = np.asarray(top_val)
  if top_idx.ndim != 2 or top_idx.shape != top_val.shape:
    raise ValueError(f'top_idx {top_idx.shape} and top_val {top_val.shape} must be the same 2-D '
                     'shape')
  n_items, width = top_idx.shape
  nq = int(num_query)
  ng = n_items - nq
  if not 0 < nq < n_items:
    raise ValueError(f'num_query={num_query} must lie in [1, {n_items - 1}] for lists of '
                     f'{n_items} items')
  k1 = _check_positive_int('k1', k1)
  k2 = _check_positive_int('k2', k2)
  if not 0.0 <= float(lambda_value) <= 1.0:
    raise ValueError(f'lambda_value must be in [0, 1], got {lambda_value!r}')
  k = min(max(k1 + 1, k2), n_items)
  if width < k:
    raise ValueError(f'neighbour lists of {width} items are too short for k1={k1}, k2={k2}: '
                     f'need {k} (config.eval.rerank_topn >= k1 + 1)')
  # (row, column) -> position in the lists, for the weights of the kept set members.
  keys = (np.arange(n_items, dtype=np.int64)[:, None] * n_items + top_idx).ravel()
  order = np.argsort(keys, kind='stable')
  sorted_keys = keys[order]
  flat_val = top_val.ravel()

  def locate(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    wanted = i.astype(np.int64) * n_items + j
    at = np.minimum(np.searchsorted(sorted_keys, wanted), sorted_keys.size - 1)
    return sorted_keys[at] == wanted, order[at]

  v = _k_reciprocal_encoding(top_idx[:, :k], k1, k2,
                             value_at=lambda i, j: flat_val[locate(i, j)[1]],
                             keep=lambda i, j: locate(i, j)[0])
  lam = float(lambda_value)
  for start, stop, jaccard in _jaccard_blocks(v, nq, ng):
    original = np.asarray(original_rows(start, stop), np.float32)
    if original.shape != (stop - start, ng):
      raise ValueError(f'original_rows({start}, {stop}) returned shape {original.shape}, '
                       f'expected {(stop - start, ng)}')
    yield start, stop, (jaccard * (1.0 - lam) + original * lam).astype(np.float32)
