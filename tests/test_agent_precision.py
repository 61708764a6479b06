"""The ranking figures of benchmarks/agent_precision.py on hand-made scores."""

import importlib.util
import os

import numpy as np

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, 'benchmarks', 'agent_precision.py')
_spec = importlib.util.spec_from_file_location('agent_precision', _PATH)
agent_precision = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(agent_precision)


def test_ranking_of_perfect_reversed_and_blind_scores():
  clutter = np.array([[1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0]], bool)
  perfect = np.where(clutter, 2.0, -1.0) + np.arange(8) * 1e-3
  r = agent_precision._ranking(perfect, clutter)
  assert r == {'images': 2, 'r_precision': 1.0, 'chance_r_precision': (2 / 8 + 1 / 8) / 2,
               'auc': 1.0}
  r = agent_precision._ranking(-perfect, clutter)
  assert r['r_precision'] == 0.0 and r['auc'] == 0.0
  r = agent_precision._ranking(np.zeros((2, 8)), clutter)  # ties: half credit
  assert r['auc'] == 0.5
  # One of image 0's two clutter tokens is ranked first, the other below every clean token.
  mixed = np.array([[5, -5, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0]], float)
  r = agent_precision._ranking(mixed, clutter)
  np.testing.assert_allclose(r['r_precision'], (0.5 + 1.0) / 2)
  np.testing.assert_allclose(r['auc'], (0.5 + 1.0) / 2)
