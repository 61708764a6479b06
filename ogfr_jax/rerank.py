"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), on the host in numpy, in chunks: the exact
form over the (q+g)^2 distance matrix (`re_ranking`, never assembled whole) and the form built
from each item's nearest neighbours (`nearest_neighbours`, `re_ranking_from_neighbours`).
`ogfr_jax.metrics` re-exports them; `ogfr_jax.evaluate` picks the mode.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from ogfr_jax.metrics import _check_distance_dtype, _check_positive_int

# Past this many pair terms per step the Jaccard accumulation in `re_ranking` is split further,
# which bounds its temporary index arrays to a few hundred MB.
_RERANK_PAIR_BUDGET = 8_000_000
# Rows of the (q+g)-wide distance matrix assembled at a time in `re_ranking`.
_RERANK_ROW_CHUNK = 512


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
