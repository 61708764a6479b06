"""Evaluation: sharded student feature extraction and the ranking protocol.

Features are extracted by one jitted function over the whole mesh (each process feeds its
share of the split; padded rows carry valid=False and are dropped), gathered to the host in
split order, and ranked with `ogfr_jax.metrics` under the Market-1501 protocol. Every knob is
a field of config.eval and is reported with the results.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ogfr_jax import metrics
from ogfr_jax import parallel
from ogfr_jax.data import pipeline
from ogfr_jax.data import records
from ogfr_jax.models import ogfr as ogfr_model


def student_features(model, variables, image, camid, *, eval_cfg) -> jax.Array:
  """Student inference feature per config.eval (pre/post-BN, flip averaging, L2 norm)."""
  extract = functools.partial(model.apply, variables, camid=camid, feature=eval_cfg.feature,
                              method=ogfr_model.OGFR.extract)
  feats = extract(image).astype(jnp.float32)
  if eval_cfg.flip:
    feats = 0.5 * (feats + extract(image[:, :, ::-1, :]).astype(jnp.float32))
  if eval_cfg.normalize:
    feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
  return feats


def make_extract_fn(model, config: ml_collections.ConfigDict, mesh):
  fn = functools.partial(student_features, model, eval_cfg=config.eval)
  return jax.jit(lambda variables, image, camid: fn(variables, image, camid),
                 out_shardings=parallel.batch_sharding(mesh))


def extract_split(extract_fn, variables: Any, split: records.Split,
                  config: ml_collections.ConfigDict, mesh) -> np.ndarray:
  """Features [len(split), D] in split order, computed over all devices and processes."""
  it = pipeline.make_eval_iterator(split, config, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  feats = None
  for batch in it:
    arrays = parallel.global_batch(
        {'image': batch['image'], 'camid': batch['camid'], 'index': batch['index'],
         'valid': batch['valid']}, mesh)
    out = extract_fn(variables, arrays['image'], arrays['camid'])
    host = parallel.fetch({'f': out, 'index': arrays['index'], 'valid': arrays['valid']})
    if feats is None:
      feats = np.zeros((len(split), host['f'].shape[-1]), np.float32)
    keep = host['valid'].astype(bool)
    feats[host['index'][keep]] = host['f'][keep]
  if feats is None:
    raise ValueError('the split to evaluate is empty')
  return feats


def rank(qf: np.ndarray, gf: np.ndarray, query: records.Split, gallery: records.Split,
         eval_cfg: ml_collections.ConfigDict) -> dict:
  """Distances, optional k-reciprocal re-ranking, and CMC/mAP/mINP."""
  dist = metrics.pairwise_distance(qf, gf)
  if eval_cfg.rerank:
    dist = metrics.re_ranking(dist, metrics.pairwise_distance(qf, qf),
                              metrics.pairwise_distance(gf, gf), k1=eval_cfg.rerank_k1,
                              k2=eval_cfg.rerank_k2, lambda_value=eval_cfg.rerank_lambda)
  result = metrics.evaluate_rank(dist, query.pids, gallery.pids, query.camids, gallery.camids,
                                 max_rank=eval_cfg.max_rank, query_chunk=eval_cfg.query_chunk)
  out = metrics.cmc_summary(result)
  out['num_query'] = len(query)
  out['num_gallery'] = len(gallery)
  out['num_valid_queries'] = int(result['num_valid_queries'])
  return out


def evaluate_dataset(model, variables: Any, data: records.DatasetSplits,
                     config: ml_collections.ConfigDict, mesh) -> dict:
  extract_fn = make_extract_fn(model, config, mesh)
  qf = extract_split(extract_fn, variables, data.query, config, mesh)
  gf = extract_split(extract_fn, variables, data.gallery, config, mesh)
  return rank(qf, gf, data.query, data.gallery, config.eval)
