"""Evaluation of a train state inside a run: the student on the test protocol (evaluate.py),
logged and written to WORKDIR/results.json, and what the purification module did
(`fepm_report`: results.json's `fepm` object)."""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import logging

from ogfr_jax import console
from ogfr_jax import evaluate
from ogfr_jax import parallel
from ogfr_jax import paths
from ogfr_jax.data import augment
from ogfr_jax.data import image_io
from ogfr_jax.data import pipeline
from ogfr_jax.models import fepm as fepm_lib
from ogfr_jax.models import ogfr as ogfr_model


def write_results(workdir: str, results: dict) -> None:
  if jax.process_index() != 0:
    return
  paths.write_text(paths.join(workdir, 'results.json'),
                   json.dumps(results, indent=2, sort_keys=True))


def run_evaluation(model, state, test_data, config, mesh, step: int, writer=None, *,
                   show: bool = True) -> dict:
  """The student's metrics on test_data ({name: {..., 'step'}}), logged and written to the
  writer (writers.Writer or None); with `show`, printed as a table on the console."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  metrics = evaluate.evaluate_dataset(model, variables, test_data, config, mesh)
  result = {test_data.name: {**metrics, 'step': int(step)}}
  logging.info('eval @ step %d on %s: %s', step, test_data.name,
               ', '.join(f'{k}={v:.4f}' for k, v in metrics.items() if isinstance(v, float)))
  if show:
    console.print_evaluation(step, result)
  if writer is not None:
    writer.scalars(step, {f'eval/{test_data.name}/{k}': v for k, v in metrics.items()
                          if isinstance(v, float)})
  return result


# --------------------------------------------------------------------------------------------
# What the purification module did


def _selection_fn(model, config, mesh, with_contam: bool):
  mean, std = tuple(config.input.mean), tuple(config.input.std)
  f = config.fepm

  def fn(variables, image, camid, contam_mask):
    x = augment.normalize_on_device(image, mean, std)
    sel = model.apply(variables, x, camid, contam_mask if with_contam else None,
                      method=ogfr_model.OGFR.teacher_selection)
    planted = fepm_lib.covered_tokens(contam_mask, config.model.patch_size,
                                      config.model.stride, f.oracle_min_cover)
    return sel['mask'], planted

  return jax.jit(fn, out_shardings=parallel.batch_sharding(mesh))


def selection_counts(model, variables, split, config, mesh) -> dict[str, float]:
  """The teacher's evaluation-time (greedy) selection over every image of `split` against
  the planted contamination: precision, recall, the chance precision (the contaminated share
  of all tokens, what a random selection scores), and the mean selection rate. Images carry
  their planted masks as `contam_mask` (zeros where a dataset records none)."""
  fn = _selection_fn(model, config, mesh, config.fepm.selection == 'oracle')
  it = pipeline.make_eval_iterator(split, config, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  keys = ('image', 'camid', 'contam_mask', 'valid')
  tp = selected = planted_total = tokens = 0.0
  contaminated_images = images = 0
  for batch in it:
    if 'contam_mask' not in batch:
      raise ValueError(f'the {split.name} split has no planted contamination masks '
                       '(contam_mask): the FEPM report needs a dataset that records them')
    arrays = parallel.global_batch({k: batch[k] for k in keys}, mesh)
    mask, planted = (np.asarray(parallel.fetch(x)) for x in fn(variables, arrays['image'],
                                                                arrays['camid'],
                                                                arrays['contam_mask']))
    valid = np.asarray(parallel.fetch(arrays['valid'])).astype(bool)
    mask, planted = mask[valid], planted[valid]
    tp += float(np.sum(mask & planted))
    selected += float(np.sum(mask))
    planted_total += float(np.sum(planted))
    tokens += float(mask.size)
    images += int(valid.sum())
    contaminated_images += int(np.sum(planted.any(axis=-1)))
  return {
      'precision': tp / selected if selected else 0.0,
      'recall': tp / planted_total if planted_total else 0.0,
      'chance': planted_total / tokens if tokens else 0.0,
      'select_rate': selected / tokens if tokens else 0.0,
      'images': images, 'contaminated_images': contaminated_images,
  }


def fepm_report(model, state, train_data, test_data, config, mesh) -> dict:
  """results.json's `fepm` object: the greedy selection against the planted contamination of
  the training and gallery images, and the teacher's test mAP with and without purification
  (same protocol as the student's)."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  report = {'selection': config.fepm.selection, 'layer': config.fepm.layer}
  for name, split in (('train', train_data.train), ('gallery', test_data.gallery)):
    try:
      report[name] = selection_counts(model, variables, split, config, mesh)
    except image_io.CorruptImageError as e:
      if name != 'train' or config.input.corrupt_image_policy != 'skip':
        raise
      # Training skipped corrupt images; the report's pass over every training image
      # cannot, so it leaves that part out rather than failing the run at its end.
      logging.warning('FEPM report: training-image figures left out: %s', e)
      report[name] = None
      continue
    if not report[name]['contaminated_images']:
      # Nothing planted (a real dataset): precision and recall say nothing.
      report[name]['precision'] = report[name]['recall'] = None
  oracle = config.fepm.selection == 'oracle'
  for branch in ('teacher_clean', 'teacher_purified'):
    fn = evaluate.make_extract_fn(model, config, mesh, branch=branch)
    contam = oracle and branch == 'teacher_purified'
    qf = evaluate.extract_features(fn, variables, test_data.query, config, mesh,
                                   with_contam=contam)
    gf = evaluate.extract_features(fn, variables, test_data.gallery, config, mesh,
                                   with_contam=contam)
    ranked = evaluate.rank_features(qf, gf, test_data.query, test_data.gallery, config.eval,
                                    mesh)
    report[branch] = {k: ranked[k] for k in ('mAP', 'rank1')}
  logging.info('FEPM (%s): gallery %s; train %s; teacher mAP %.4f purified vs %.4f clean',
               report['selection'], report['gallery'], report['train'],
               report['teacher_purified']['mAP'], report['teacher_clean']['mAP'])
  return report
