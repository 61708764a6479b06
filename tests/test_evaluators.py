"""The named evaluators of the final evaluation (evaluator.py): the token-ranking probe, the
selection report with and without planted contamination, and a real-layout run whose report
has no empty fields."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ogfr_jax import evaluator
import dataset_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_precision_at_recall_takes_the_smallest_top_set_that_reaches_the_recall():
  scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
  planted = np.array([1, 0, 1, 0, 0, 1], bool)
  # Two of the three planted tokens are needed; the third-best token brings the second hit.
  out = evaluator.precision_at_recall(scores, planted, 0.5)
  assert out['precision'] == pytest.approx(2 / 3) and out['chance'] == 0.5
  assert out['x_chance'] == pytest.approx(4 / 3)
  # A perfect ranking is exact; a ranking that puts the planted tokens last scores the
  # precision of the whole set needed to reach them.
  assert evaluator.precision_at_recall(planted.astype(float), planted, 1.0)['precision'] == 1.0
  worst = evaluator.precision_at_recall(-planted.astype(float), planted, 1.0)
  assert worst['precision'] == 0.5  # all six tokens, three of them planted


def test_precision_at_recall_takes_tied_scores_whole():
  planted = np.array([[1, 0, 0, 0]], bool)
  out = evaluator.precision_at_recall(np.ones((1, 4)), planted, 0.5)
  assert out['precision'] == 0.25 == out['chance'] and out['x_chance'] == 1.0
  assert evaluator.precision_at_recall(np.ones(4), np.zeros(4, bool))['precision'] == 0.0


class _Fixed:
  def __init__(self, mask, planted):
    self.mask, self.planted, self.scores = mask, planted, None


def test_selection_counts_without_planted_contamination_give_the_rate_only():
  mask = np.array([[1, 0, 0, 0], [1, 1, 0, 0]], bool)
  planted = np.array([[1, 0, 0, 1], [0, 0, 0, 0]], bool)
  plain = evaluator.selection_counts(_Fixed(mask, planted), recorded=False)
  assert plain == {'select_rate': 3 / 8, 'images': 2}
  full = evaluator.selection_counts(_Fixed(mask, planted), recorded=True)
  assert full['precision'] == pytest.approx(1 / 3) and full['recall'] == 0.5
  assert full['chance'] == 0.25 and full['contaminated_images'] == 1


def _nulls(tree, path=''):
  if isinstance(tree, dict):
    return [p for k, v in tree.items() for p in _nulls(v, f'{path}.{k}')]
  return [path] if tree is None else []


def test_real_layout_run_reports_what_it_can_without_nulls(tmp_path):
  tree = dataset_fixtures.make_market1501(tmp_path)
  wd = tmp_path / 'wd'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  res = subprocess.run(
      [sys.executable, '-m', 'ogfr_jax.main', '--config', 'configs/market1501.py:runlocal',
       '--workdir', str(wd), f'--config.dataset.root={tree.root}',
       '--config.input.height=64', '--config.input.width=32',
       "--config.eval.evaluators=('student_ranking', 'fepm_selection', 'teacher_purification')"],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  results = json.loads((wd / 'results.json').read_text())
  fepm = results['fepm']
  assert not _nulls(results), _nulls(results)
  # Nothing is planted in a real dataset: a rate on the gallery, no training-image pass.
  assert 'train' not in fepm and 'precision' not in fepm['gallery']
  assert fepm['gallery']['select_rate'] > 0  # the recipe's greedy threshold selects tokens
  assert {'mAP', 'rank1'} <= set(fepm['teacher_purified']) == set(fepm['teacher_clean'])
  assert 'selection rate' in res.stdout
