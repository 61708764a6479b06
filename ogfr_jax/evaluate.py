"""Evaluation: sharded student feature extraction and the ranking protocol, on the devices.

Features are extracted by one jitted function over the whole mesh (each process feeds its
share of the split as uint8 pixels, normalised on the device; padded rows carry valid=False
and are dropped) and gathered, still on the devices, into one [N, D] array in split order.
Distances and ranks are then computed on the devices in chunks of query rows, each chunk split
over the devices: a chunk yields only the integer ranks of each query's true matches
(`metrics.match_ranks_device`), so neither the host nor a device ever holds the query x
gallery matrix. The figures come out of the same float64 arithmetic as the numpy reference
`metrics.evaluate_rank`, and equal it exactly on the same distances.

Re-ranking (config.eval.rerank) runs 'exact' (the dense host reference, `metrics.re_ranking`)
or 'approx' (neighbour lists found on the devices in chunks, `metrics.
re_ranking_from_neighbours`), chosen by config.eval.rerank_mode and reported as `rerank_mode`.
Every knob is a field of config.eval and is reported with the results.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from absl import logging
import ml_collections
import numpy as np

from ogfr_jax import console
from ogfr_jax import metrics
from ogfr_jax import parallel
from ogfr_jax import prefetch
from ogfr_jax.data import augment
from ogfr_jax.data import pipeline
from ogfr_jax.data import records
from ogfr_jax.models import ogfr as ogfr_model
from ogfr_jax.models import vit as vit_lib

RERANK_MODES = ('exact', 'approx', 'auto')
_EVAL_KEYS = ('image', 'camid', 'index', 'valid')


# --------------------------------------------------------------------------------------------
# Features


# Whose features an extract function computes: the student (inference), or the teacher with
# or without its purification (the FEPM report of a run).
BRANCHES = ('student', 'teacher_clean', 'teacher_purified')


def student_features(model, variables, image, camid, *, eval_cfg, branch: str = 'student',
                     contam_mask=None) -> jax.Array:
  """Inference feature per config.eval (pre/post-BN, flip averaging, L2 norm) of `branch`.

  `image` is model input (already normalised); see `make_extract_fn` for pixels.
  """
  if branch == 'student':
    extract = functools.partial(model.apply, variables, camid=camid, feature=eval_cfg.feature,
                                method=ogfr_model.OGFR.extract)
  else:
    extract = functools.partial(model.apply, variables, camid=camid, feature=eval_cfg.feature,
                                purify=branch == 'teacher_purified', contam_mask=contam_mask,
                                method=ogfr_model.OGFR.teacher_features)
  feats = extract(image).astype(jnp.float32)
  if eval_cfg.flip and contam_mask is None:
    feats = 0.5 * (feats + extract(image[:, :, ::-1, :]).astype(jnp.float32))
  if eval_cfg.normalize:
    feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
  return feats


def unseen_test_cameras(config: ml_collections.ConfigDict) -> bool:
  """Whether the test images get the mean camera embedding (eval.unseen_camera='mean'): a
  test set other than the training set was shot by cameras the SIE table never saw."""
  d = config.dataset
  return (config.eval.unseen_camera == 'mean' and bool(d.test_name)
          and d.test_name != d.name)


def make_extract_fn(model, config: ml_collections.ConfigDict, mesh, branch: str = 'student',
                    unseen_cameras: bool | None = None):
  """jit(variables, pixels [b, H, W, 3], camid [b][, contam_mask [b, H, W]]) -> features
  [b, D], sharded over the batch (contam_mask: for the teacher's oracle purification).

  Pixels are uint8 (or floats on the 0..255 scale) and are normalised with config.input.mean
  and std inside the jitted function.
  """
  mean, std = tuple(config.input.mean), tuple(config.input.std)
  eval_cfg = config.eval
  # The mean camera embedding for every image; None: the config's test set decides.
  unseen = unseen_test_cameras(config) if unseen_cameras is None else unseen_cameras

  def fn(variables, image, camid, contam_mask=None):
    x = augment.normalize_on_device(image, mean, std)
    camid = vit_lib.UNSEEN_CAMERA if unseen else camid
    return student_features(model, variables, x, camid, eval_cfg=eval_cfg, branch=branch,
                            contam_mask=contam_mask)

  return jax.jit(fn, out_shardings=parallel.batch_sharding(mesh))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _zeros(rows: int, dim: int, sharding) -> jax.Array:
  return lax.with_sharding_constraint(jnp.zeros((rows, dim), jnp.float32), sharding)


@functools.partial(jax.jit, static_argnums=4, donate_argnums=0)
def _scatter_rows(buf: jax.Array, feats: jax.Array, index: jax.Array, valid: jax.Array,
                  sharding) -> jax.Array:
  # Padding rows all land on the spare last row, which is cut off at the end.
  rows = jnp.where(valid, index, buf.shape[0] - 1)
  return lax.with_sharding_constraint(buf.at[rows].set(feats.astype(buf.dtype)), sharding)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _first_rows(x: jax.Array, n: int, sharding) -> jax.Array:
  return lax.with_sharding_constraint(x[:n], sharding)


def _eval_to_devices(batch: dict, mesh, keys: tuple[str, ...] = _EVAL_KEYS
                     ) -> dict[str, jax.Array]:
  return parallel.global_batch({k: batch[k] for k in keys}, mesh)


def extract_features(extract_fn, variables: Any, split: records.Split,
                     config: ml_collections.ConfigDict, mesh, *,
                     with_contam: bool = False, title: str = 'features') -> jax.Array:
  """Features [len(split), D] float32 in split order, replicated over the mesh.

  Every device and process extracts its share; the rows are gathered on the devices (each
  process's batches reach the others through the jitted scatter), never through the host.
  Batches are transferred config.input.device_prefetch ahead of the model; the last one is
  padded only to a multiple of the devices (pipeline.eval_last_batch). Process 0 shows the
  progress (`console.CountProgress`, titled `title`: images/s and ETA).
  """
  n = len(split)
  if n == 0:
    raise ValueError('the split to evaluate is empty')
  replicated = parallel.replicated(mesh)
  processes = jax.process_count()
  it = pipeline.make_eval_iterator(split, config, process_index=jax.process_index(),
                                   process_count=processes,
                                   row_multiple=max(mesh.size // processes, 1))
  buf = None
  keys = _EVAL_KEYS + (('contam_mask',) if with_contam else ())
  in_flight = None  # (output, images) of the batch before: waited for before it counts
  with prefetch.DevicePrefetcher(it, functools.partial(_eval_to_devices, mesh=mesh, keys=keys),
                                 size=config.input.device_prefetch) as batches, \
      console.CountProgress(n, title) as progress:
    for arrays in batches:
      extra = (arrays['contam_mask'],) if with_contam else ()
      out = extract_fn(variables, arrays['image'], arrays['camid'], *extra)
      if buf is None:
        buf = _zeros(n + 1, int(out.shape[-1]), replicated)
      buf = _scatter_rows(buf, out, arrays['index'], arrays['valid'], replicated)
      # Dispatch is asynchronous: the batch before this one is waited for (one batch stays
      # queued behind it, so the devices never idle) and only then counted.
      if in_flight is not None:
        in_flight[0].block_until_ready()
        progress.update(in_flight[1])
      in_flight = (out, int(out.shape[0]))
    progress.update(n)
  return _first_rows(buf, n, replicated)


def extract_split(extract_fn, variables: Any, split: records.Split,
                  config: ml_collections.ConfigDict, mesh) -> np.ndarray:
  """Features [len(split), D] in split order on the host (every process gets all of them)."""
  return np.asarray(parallel.fetch(extract_features(extract_fn, variables, split, config,
                                                    mesh)))


# --------------------------------------------------------------------------------------------
# Placement helpers


def _replicate(x: Any, mesh) -> jax.Array:
  """`x` as an array replicated over the mesh (host values: the same on every process)."""
  sharding = parallel.replicated(mesh)
  if isinstance(x, jax.Array):
    return x if x.sharding == sharding else jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _pad_rows(x: np.ndarray, rows: int, fill) -> np.ndarray:
  out = np.full((rows,) + x.shape[1:], fill, dtype=x.dtype)
  out[:x.shape[0]] = x
  return out


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pad_device_rows(x: jax.Array, rows: int, sharding) -> jax.Array:
  return lax.with_sharding_constraint(jnp.pad(x, ((0, rows - x.shape[0]), (0, 0))), sharding)


def _chunk_rows(query_chunk: int, num_rows: int, mesh) -> int:
  """Rows per chunk: config.eval.query_chunk (at most the rows there are), rounded up to a
  multiple of the device count so that each device takes an equal slice."""
  rows = max(1, min(int(query_chunk), num_rows))
  return -(-rows // mesh.size) * mesh.size


def _slice_rows(x: jax.Array, start: jax.Array, rows: int, sharding) -> jax.Array:
  return lax.with_sharding_constraint(lax.dynamic_slice_in_dim(x, start, rows, axis=0),
                                      sharding)


# --------------------------------------------------------------------------------------------
# Ranking on the devices


@functools.partial(jax.jit, static_argnames=('rows', 'sharding'))
def _rank_chunk(qf, gf, q_pids, match_idx, g_pids, start, *, rows: int, sharding):
  """Distances of one chunk of queries to the gallery and the ranks of their true matches."""
  dist = metrics.pairwise_distance_device(_slice_rows(qf, start, rows, sharding), gf)
  ranks, has_nan = metrics.match_ranks_device(
      dist, _slice_rows(match_idx, start, rows, sharding),
      _slice_rows(q_pids, start, rows, sharding), g_pids)
  return (lax.with_sharding_constraint(ranks, sharding),
          lax.with_sharding_constraint(has_nan, sharding))


def _check_features(name: str, feats: Any, num: int, what: str) -> None:
  shape = tuple(feats.shape)
  if len(shape) != 2 or shape[0] != num:
    raise ValueError(f'{name} must have shape ({num}, D) to match {what}, got {shape}')


def rank_on_device(qf: Any, gf: Any, q_pids: np.ndarray, g_pids: np.ndarray,
                   q_camids: np.ndarray, g_camids: np.ndarray, mesh, *, max_rank: int = 50,
                   query_chunk: int = 256) -> dict[str, Any]:
  """`metrics.evaluate_rank` of Euclidean distances between features, chunked on the devices.

  qf [Q, D] and gf [G, D] may be device arrays (from `extract_features`) or host arrays. Each
  chunk of query rows (query_chunk rounded up to a multiple of the device count) is split over
  the devices, its distances to the whole gallery and the ranks of its true matches are
  computed there, and only the ranks [chunk, P] come back (P: the most true matches of any
  query). The next chunk is dispatched before the host adds up the last one.

  Returns evaluate_rank's dict; equal to `metrics.evaluate_rank` on the same distance matrix
  (the same ranks, the same float64 sums; bitwise when query_chunk is the same there).
  """
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  nq, ng = q_pids.size, g_pids.size
  _check_features('qf', qf, nq, f'{nq} query labels')
  _check_features('gf', gf, ng, f'{ng} gallery labels')
  if qf.shape[1] != gf.shape[1]:
    raise ValueError(f'qf has feature size {qf.shape[1]} but gf has {gf.shape[1]}')
  match_idx, counts = metrics.match_lists(q_pids, g_pids, q_camids, g_camids)
  totals = metrics.RankAccumulator(max_rank)
  rows = _chunk_rows(query_chunk, nq, mesh)
  padded = -(-nq // rows) * rows
  sharding = parallel.batch_sharding(mesh)
  replicated = parallel.replicated(mesh)
  qf_dev = _pad_device_rows(_replicate(qf, mesh), padded, replicated)
  gf_dev = _replicate(gf, mesh)
  match_dev = _replicate(_pad_rows(match_idx, padded, ng), mesh)
  q_pids_dev = _replicate(_pad_rows(q_pids.astype(np.int32), padded, -1), mesh)
  g_pids_dev = _replicate(g_pids.astype(np.int32), mesh)

  def dispatch(start: int):
    return _rank_chunk(qf_dev, gf_dev, q_pids_dev, match_dev, g_pids_dev, np.int32(start),
                       rows=rows, sharding=sharding)

  pending = dispatch(0)
  for start in range(0, nq, rows):
    current = pending
    if start + rows < nq:
      pending = dispatch(start + rows)
    ranks, has_nan = parallel.fetch(current)
    stop = min(start + rows, nq)
    bad = np.flatnonzero(has_nan[:stop - start])
    if bad.size:
      raise ValueError(f'the distances of query {start + int(bad[0])} contain NaN: the '
                       'features are not finite')
    totals.add_match_ranks(ranks[:stop - start], counts[start:stop])
  return totals.result()


# --------------------------------------------------------------------------------------------
# Re-ranking


def resolve_rerank_mode(mode: str, num_items: int, max_bytes: int) -> str:
  """'exact' or 'approx' for config.eval.rerank_mode; 'auto' picks 'exact' when the dense
  float32 (q+g)^2 matrix fits in max_bytes."""
  if mode not in RERANK_MODES:
    raise ValueError(f'config.eval.rerank_mode={mode!r}: must be one of {RERANK_MODES}')
  if mode != 'auto':
    return mode
  return 'exact' if num_items * num_items * 4 <= int(max_bytes) else 'approx'


@functools.partial(jax.jit, static_argnames=('rows', 'top_n', 'sharding'))
def _neighbour_chunk(items_padded, items, start, *, rows: int, top_n: int, sharding):
  """Nearest items of one chunk of rows, by distance squared and divided by the squared row
  maximum (the normalisation of metrics.re_ranking); ties go to the lower index."""
  raw = metrics.pairwise_distance_device(_slice_rows(items_padded, start, rows, sharding), items)
  row_max = jnp.max(raw, axis=1)
  scale = jnp.where(row_max * row_max > 0, row_max * row_max, 1.0)
  normalized = (raw * raw) / scale[:, None]
  neg, idx = lax.top_k(-normalized, top_n)
  return (lax.with_sharding_constraint(idx, sharding),
          lax.with_sharding_constraint(-neg, sharding),
          lax.with_sharding_constraint(scale, sharding))


@functools.partial(jax.jit, static_argnames=('rows', 'sharding'))
def _normalized_query_rows(qf_padded, gf, scale_padded, start, *, rows: int, sharding):
  raw = metrics.pairwise_distance_device(_slice_rows(qf_padded, start, rows, sharding), gf)
  scale = _slice_rows(scale_padded, start, rows, sharding)
  return lax.with_sharding_constraint((raw * raw) / scale[:, None], sharding)


def device_neighbours(feats: Any, top_n: int, mesh, *, chunk: int = 256
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`metrics.nearest_neighbours` from features: each item's top_n nearest items, found on the
  devices in row chunks. Returns (indices int64 [N, n], normalised distances float32 [N, n],
  row scales float32 [N]) on the host, n = min(top_n, N): O(N x n) memory."""
  n_items = int(feats.shape[0])
  n = min(int(top_n), n_items)
  rows = _chunk_rows(chunk, n_items, mesh)
  padded = -(-n_items // rows) * rows
  sharding = parallel.batch_sharding(mesh)
  items = _replicate(feats, mesh)
  items_padded = _pad_device_rows(items, padded, parallel.replicated(mesh))
  idx = np.empty((n_items, n), np.int64)
  val = np.empty((n_items, n), np.float32)
  scale = np.empty(n_items, np.float32)
  for start in range(0, n_items, rows):
    stop = min(start + rows, n_items)
    i, v, s = parallel.fetch(_neighbour_chunk(items_padded, items, np.int32(start), rows=rows,
                                              top_n=n, sharding=sharding))
    idx[start:stop], val[start:stop], scale[start:stop] = i[:stop - start], v[:stop - start], \
        s[:stop - start]
  return idx, val, scale


class _QueryRowSource:
  """Normalised query x gallery rows for the re-ranking's lambda term, computed on the devices
  a chunk at a time and handed out in whatever blocks the re-ranking asks for."""

  def __init__(self, qf: Any, gf: Any, scale: np.ndarray, mesh, chunk: int):
    self._nq = int(qf.shape[0])
    self._rows = _chunk_rows(chunk, self._nq, mesh)
    padded = -(-self._nq // self._rows) * self._rows
    replicated = parallel.replicated(mesh)
    self._qf = _pad_device_rows(_replicate(qf, mesh), padded, replicated)
    self._gf = _replicate(gf, mesh)
    self._scale = _replicate(_pad_rows(scale[:self._nq].astype(np.float32), padded, 1.0), mesh)
    self._sharding = parallel.batch_sharding(mesh)
    self._block: tuple[int, np.ndarray] | None = None

  def _load(self, start: int) -> None:
    out = _normalized_query_rows(self._qf, self._gf, self._scale, np.int32(start),
                                 rows=self._rows, sharding=self._sharding)
    self._block = (start, np.asarray(parallel.fetch(out)))

  def __call__(self, start: int, stop: int) -> np.ndarray:
    parts = []
    while start < stop:
      base = start - start % self._rows
      if self._block is None or self._block[0] != base:
        self._load(base)
      end = min(stop, base + self._rows)
      parts.append(self._block[1][start - base:end - base])
      start = end
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def rerank_and_rank(qf: Any, gf: Any, query: records.Split, gallery: records.Split,
                    eval_cfg: ml_collections.ConfigDict, mesh, mode: str) -> dict[str, Any]:
  """evaluate_rank's dict after k-reciprocal re-ranking in `mode` ('exact' or 'approx')."""
  q_pids, g_pids = np.asarray(query.pids), np.asarray(gallery.pids)
  q_cams, g_cams = np.asarray(query.camids), np.asarray(gallery.camids)
  k1, k2 = int(eval_cfg.rerank_k1), int(eval_cfg.rerank_k2)
  lam = float(eval_cfg.rerank_lambda)
  if mode == 'exact':
    q, g = np.asarray(parallel.fetch(qf)), np.asarray(parallel.fetch(gf))
    dist = metrics.re_ranking(
        metrics.pairwise_distance(q, g), metrics.pairwise_distance(q, q),
        metrics.pairwise_distance(g, g), k1=k1, k2=k2, lambda_value=lam,
        max_bytes=int(eval_cfg.rerank_max_bytes))
    return metrics.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams,
                                 max_rank=eval_cfg.max_rank, query_chunk=eval_cfg.query_chunk)
  if mode != 'approx':
    raise ValueError(f'rerank mode {mode!r}: expected exact or approx')
  items = _concat_rows(_replicate(qf, mesh), _replicate(gf, mesh), parallel.replicated(mesh))
  chunk = int(eval_cfg.query_chunk)
  top_idx, top_val, scale = device_neighbours(items, int(eval_cfg.rerank_topn), mesh,
                                              chunk=chunk)
  source = _QueryRowSource(qf, gf, scale, mesh, chunk)
  totals = metrics.RankAccumulator(eval_cfg.max_rank)
  for start, stop, rows in metrics.re_ranking_from_neighbours(
      top_idx, top_val, source, len(q_pids), k1=k1, k2=k2, lambda_value=lam):
    totals.add_distances(rows, q_pids[start:stop], g_pids, q_cams[start:stop], g_cams,
                         row_offset=start)
  return totals.result()


@functools.partial(jax.jit, static_argnums=2)
def _concat_rows(a: jax.Array, b: jax.Array, sharding) -> jax.Array:
  return lax.with_sharding_constraint(jnp.concatenate([a, b], axis=0), sharding)


# --------------------------------------------------------------------------------------------
# The protocol


def _summary(result: dict, query: records.Split, gallery: records.Split, rerank_mode: str):
  out = metrics.cmc_summary(result)
  out['num_query'] = len(query)
  out['num_gallery'] = len(gallery)
  out['num_valid_queries'] = int(result['num_valid_queries'])
  out['rerank_mode'] = rerank_mode
  return out


def rank(qf: np.ndarray, gf: np.ndarray, query: records.Split, gallery: records.Split,
         eval_cfg: ml_collections.ConfigDict) -> dict:
  """The host reference: dense distances, optional exact re-ranking, `metrics.evaluate_rank`.

  Needs the whole query x gallery matrix in host memory; `rank_features` is the scalable path.
  """
  dist = metrics.pairwise_distance(qf, gf)
  if eval_cfg.rerank:
    dist = metrics.re_ranking(dist, metrics.pairwise_distance(qf, qf),
                              metrics.pairwise_distance(gf, gf), k1=eval_cfg.rerank_k1,
                              k2=eval_cfg.rerank_k2, lambda_value=eval_cfg.rerank_lambda)
  result = metrics.evaluate_rank(dist, query.pids, gallery.pids, query.camids, gallery.camids,
                                 max_rank=eval_cfg.max_rank, query_chunk=eval_cfg.query_chunk)
  return _summary(result, query, gallery, 'exact' if eval_cfg.rerank else 'off')


def rank_features(qf: Any, gf: Any, query: records.Split, gallery: records.Split,
                  eval_cfg: ml_collections.ConfigDict, mesh) -> dict:
  """Ranking figures of query/gallery features on the devices, per config.eval.

  Without re-ranking: `rank_on_device`. With it: the mode from config.eval.rerank_mode
  ('auto' resolves by config.eval.rerank_max_bytes), logged and returned as `rerank_mode`.
  """
  if not eval_cfg.rerank:
    result = rank_on_device(qf, gf, query.pids, gallery.pids, query.camids, gallery.camids,
                            mesh, max_rank=eval_cfg.max_rank, query_chunk=eval_cfg.query_chunk)
    return _summary(result, query, gallery, 'off')
  mode = resolve_rerank_mode(eval_cfg.rerank_mode, len(query) + len(gallery),
                             eval_cfg.rerank_max_bytes)
  logging.info('re-ranking %d queries x %d gallery images: %s mode (config.eval.rerank_mode=%s)',
               len(query), len(gallery), mode, eval_cfg.rerank_mode)
  result = rerank_and_rank(qf, gf, query, gallery, eval_cfg, mesh, mode)
  return _summary(result, query, gallery, mode)


def evaluate_dataset(model, variables: Any, data: records.DatasetSplits,
                     config: ml_collections.ConfigDict, mesh,
                     features_out: Optional[dict] = None) -> dict:
  """The student's metrics on `data`; `features_out` (a dict), when given, receives the
  device arrays of the 'query' and 'gallery' features."""
  extract_fn = make_extract_fn(model, config, mesh)
  qf = extract_features(extract_fn, variables, data.query, config, mesh,
                        title=f'{data.name} query')
  gf = extract_features(extract_fn, variables, data.gallery, config, mesh,
                        title=f'{data.name} gallery')
  if features_out is not None:
    features_out.update(query=qf, gallery=gf)
  return rank_features(qf, gf, data.query, data.gallery, config.eval, mesh)
