"""Evaluation of a train state inside a run, by named evaluators (config.eval.evaluators, as
big_vision's config.evals), written to WORKDIR/results.json:

  student_ranking       the student on the test protocol (evaluate.py): the run's score, also
                        at every periodic evaluation; results.json's {dataset: metrics}
  fepm_selection        the teacher's greedy selection: its rate on the gallery and, where the
                        dataset records planted contamination (the synthetic benchmark),
                        precision, recall and chance on the training and gallery images;
                        results.json's fepm.gallery / fepm.train
  teacher_purification  the teacher's test mAP / rank-1 with its purification and without
                        (two teacher passes over query and gallery); fepm.teacher_purified /
                        fepm.teacher_clean
  token_ranking         the agent's gallery token scores as a ranking of the planted
                        contamination: precision at recall 0.5 against chance (needs planted
                        contamination); fepm.token_ranking

The FEPM evaluators run at the final evaluation of a model with FEPM and are skipped
otherwise. Cost: fepm_selection runs the teacher's first fepm.layer blocks and the agent (with
layer 0: the patch embedding only) over the gallery, and over the training images only where
contamination is recorded; teacher_purification costs about twice the student's pass.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import logging

from ogfr_jax import console
from ogfr_jax import evaluate
from ogfr_jax import parallel
from ogfr_jax import paths
from ogfr_jax import writers
from ogfr_jax.data import augment
from ogfr_jax.data import image_io
from ogfr_jax.data import pipeline
from ogfr_jax.data import synthetic
from ogfr_jax.models import build
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
  features = {}
  metrics = evaluate.evaluate_dataset(model, variables, test_data, config, mesh, features)
  result = {test_data.name: {**metrics, 'step': int(step)}}
  logging.info('eval @ step %d on %s: %s', step, test_data.name,
               ', '.join(f'{k}={v:.4f}' for k, v in metrics.items() if isinstance(v, float)))
  if show:
    console.print_evaluation(step, result)
  if writer is not None:
    writer.scalars(step, {f'eval/{test_data.name}/{k}': v for k, v in metrics.items()
                          if isinstance(v, float)})
    writer.image(f'eval/{test_data.name}/ranked_lists', writers.ranked_thumbnail(
        features['query'], features['gallery'], test_data.query, test_data.gallery), step)
  return result


# --------------------------------------------------------------------------------------------
# What the purification module did


def _selection_fn(model, config, mesh, with_contam: bool):
  mean, std = tuple(config.input.mean), tuple(config.input.std)

  def fn(variables, image, camid, contam_mask):
    x = augment.normalize_on_device(image, mean, std)
    sel = model.apply(variables, x, camid, contam_mask if with_contam else None,
                      method=ogfr_model.OGFR.teacher_selection)
    planted = fepm_lib.covered_tokens(contam_mask, config.model.patch_size,
                                      config.model.stride)
    return sel['mask'], planted, sel['scores']

  return jax.jit(fn, out_shardings=parallel.batch_sharding(mesh))


class _Selections:
  """The teacher's evaluation-time selection over a split: the greedy mask, the planted
  tokens and the agent's scores [images, tokens] of its valid images, computed once."""

  def __init__(self, model, variables, split, config, mesh):
    fn = _selection_fn(model, config, mesh, config.fepm.selection == 'oracle')
    it = pipeline.make_eval_iterator(split, config, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    keys = ('image', 'camid', 'contam_mask', 'valid')
    masks, planted, scores = [], [], []
    for batch in it:
      arrays = parallel.global_batch({k: batch[k] for k in keys}, mesh)
      out = [np.asarray(parallel.fetch(x)) for x in fn(variables, arrays['image'],
                                                      arrays['camid'], arrays['contam_mask'])]
      valid = np.asarray(parallel.fetch(arrays['valid'])).astype(bool)
      for acc, x in zip((masks, planted, scores), out):
        acc.append(x[valid])
    self.mask, self.planted, self.scores = (np.concatenate(x) for x in (masks, planted, scores))


def selection_counts(sel: _Selections, recorded: bool) -> dict[str, float]:
  """The greedy selection's rate and, where contamination is `recorded`, its precision,
  recall and chance precision (the contaminated share of all tokens, what a random selection
  scores) against the planted tokens."""
  mask, planted = sel.mask, sel.planted
  tokens, selected = float(mask.size), float(np.sum(mask))
  out = {'select_rate': selected / tokens if tokens else 0.0, 'images': int(mask.shape[0])}
  if recorded:
    tp, total = float(np.sum(mask & planted)), float(np.sum(planted))
    out.update(precision=tp / selected if selected else 0.0,
               recall=tp / total if total else 0.0,
               chance=total / tokens if tokens else 0.0,
               contaminated_images=int(np.sum(planted.any(axis=-1))))
  return out


def precision_at_recall(scores: np.ndarray, planted: np.ndarray,
                        recall: float = 0.5) -> dict[str, float]:
  """The token scores as a ranking of the planted tokens: the precision of the smallest
  top-scored set that reaches `recall`, the chance precision, and their ratio. Ties are taken
  whole, in score order (a stable sort on the negated score)."""
  scores, planted = scores.reshape(-1), planted.reshape(-1).astype(bool)
  total = int(planted.sum())
  chance = total / planted.size if planted.size else 0.0
  if not total:
    return {'precision': 0.0, 'chance': chance, 'x_chance': 0.0, 'recall': recall}
  order = np.argsort(-scores, kind='stable')
  hits = np.cumsum(planted[order])
  k = int(np.searchsorted(hits, np.ceil(recall * total))) + 1
  # Extend over tokens tied with the k-th score: a threshold cannot split them.
  k = int(np.searchsorted(-scores[order], -scores[order][k - 1], side='right'))
  precision = float(hits[k - 1]) / k
  return {'precision': precision, 'chance': chance, 'x_chance': precision / chance,
          'recall': recall}


def _fepm_selection(ctx: dict) -> dict:
  report = {}
  for name in ('train', 'gallery'):
    split = ctx['train_data'].train if name == 'train' else ctx['test_data'].gallery
    recorded = synthetic.contamination_masks(split) is not None
    if name == 'train' and not recorded:
      continue  # on real data a pass over every training image would only give a rate
    try:
      report[name] = selection_counts(ctx['selections'](name), recorded)
    except image_io.CorruptImageError as e:
      if name != 'train' or ctx['config'].input.corrupt_image_policy != 'skip':
        raise
      # Training skipped corrupt images; the report's pass over every training image
      # cannot, so it leaves that part out rather than failing the run at its end.
      logging.warning('FEPM report: training-image figures left out: %s', e)
      report[name] = None
  return report


def _teacher_purification(ctx: dict) -> dict:
  model, config, mesh, data = ctx['model'], ctx['config'], ctx['mesh'], ctx['test_data']
  oracle = config.fepm.selection == 'oracle'
  report = {}
  for branch in ('teacher_clean', 'teacher_purified'):
    fn = evaluate.make_extract_fn(model, config, mesh, branch=branch)
    contam = oracle and branch == 'teacher_purified'
    qf = evaluate.extract_features(fn, ctx['variables'], data.query, config, mesh,
                                   with_contam=contam)
    gf = evaluate.extract_features(fn, ctx['variables'], data.gallery, config, mesh,
                                   with_contam=contam)
    ranked = evaluate.rank_features(qf, gf, data.query, data.gallery, config.eval, mesh)
    report[branch] = {k: ranked[k] for k in ('mAP', 'rank1')}
  return report


def _token_ranking(ctx: dict) -> dict:
  if synthetic.contamination_masks(ctx['test_data'].gallery) is None:
    return {}  # nothing planted: nothing to rank against
  sel = ctx['selections']('gallery')
  return {'token_ranking': precision_at_recall(sel.scores, sel.planted)}


# name -> fn(context) -> the keys it adds to results.json's `fepm` object.
FEPM_EVALUATORS = {
    'fepm_selection': _fepm_selection,
    'teacher_purification': _teacher_purification,
    'token_ranking': _token_ranking,
}
EVALUATORS = ('student_ranking',) + tuple(FEPM_EVALUATORS)


def final_evaluation(model, state, train_data, test_data, config, mesh, step: int,
                     writer=None) -> dict:
  """results.json's evaluation objects at the end of a run: every evaluator of
  config.eval.evaluators (the student's figures are shown with the results)."""
  names = tuple(config.eval.evaluators)
  results = {}
  if 'student_ranking' in names:
    results = run_evaluation(model, state, test_data, config, mesh, step, writer, show=False)
  fepm = [n for n in names if n in FEPM_EVALUATORS]
  if fepm and build.has_fepm(config):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    cache = {}

    def selections(name):
      if name not in cache:
        split = train_data.train if name == 'train' else test_data.gallery
        cache[name] = _Selections(model, variables, split, config, mesh)
      return cache[name]

    ctx = dict(model=model, variables=variables, train_data=train_data, test_data=test_data,
               config=config, mesh=mesh, selections=selections)
    report = {'selection': config.fepm.selection, 'layer': config.fepm.layer}
    for name in fepm:
      report.update(FEPM_EVALUATORS[name](ctx))
    logging.info('FEPM (%s): %s', report['selection'], report)
    results['fepm'] = report
  return results
