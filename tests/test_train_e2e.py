"""End to end on the embedded benchmark: train, write results, resume, evaluate a checkpoint."""

import json
import os

import jax
import numpy as np
import pytest
from ml_collections import config_flags  # noqa: F401

from ogfr_jax import run_config
from ogfr_jax import train
from helpers import make_config

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_KEYS = {'rank1', 'rank5', 'rank10', 'mAP', 'mINP', 'step'}


def _train_lines(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [l for l in lines if 'train/loss/total' in l]


def _params_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                   jax.tree_util.tree_leaves(b)))


def test_train_stop_resume_and_eval(tmp_path):
  config = make_config({'train.epochs': 2}, preset='synthetic', cache=tmp_path / 'cache')
  wd = str(tmp_path / 'run')
  run_config.prepare_workdir(wd, config)
  assert train.train_and_evaluate(config, wd, stop_at_step=3) == {}
  assert not os.path.exists(os.path.join(wd, 'results.json'))
  assert [l['step'] for l in _train_lines(wd)] == [1, 2, 3]

  # The same command again resumes at step 3 and finishes the schedule.
  results = train.train_and_evaluate(config, wd)
  split = results['synthetic']
  assert RESULT_KEYS <= set(split)
  assert split['step'] == 6
  for key in ('rank1', 'rank5', 'rank10', 'mAP', 'mINP'):
    assert 0.0 <= split[key] <= 1.0
  assert json.load(open(os.path.join(wd, 'results.json'))) == results
  run = results['manifest']
  assert run['wall_time_s'] > 0 and run['seeds']['seed'] == config.seed
  assert run['devices']['process_count'] == 1
  assert os.path.exists(os.path.join(wd, 'manifest.json'))
  events = os.listdir(os.path.join(wd, 'tensorboard'))
  assert any(f.startswith('events.out.tfevents') for f in events)
  lines = _train_lines(wd)
  assert [l['step'] for l in lines] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(l['train/loss/total']) for l in lines)

  evaluated = train.evaluate_checkpoint(config, wd)
  assert evaluated['synthetic']['step'] == 6
  assert evaluated['synthetic']['mAP'] == pytest.approx(split['mAP'], abs=1e-6)

  # A straight run of the same config ends with the same parameters as the resumed one.
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config, straight)
  sa, _, step_a = train.restore_latest(train.setup(config, straight))
  sb, _, step_b = train.restore_latest(train.setup(config, wd))
  assert step_a == step_b == 6
  assert _params_equal(sa.params, sb.params)


def test_init_from_fills_both_backbones(tmp_path):
  from safetensors.numpy import load_file
  path = os.path.join(ROOT, 'tests', 'fixtures', 'parity', 'vit_tiny.safetensors')
  config = make_config(preset='synthetic', cache=tmp_path / 'cache')
  config.init_from = path
  run_config.validate(config)
  state = train.setup(config, str(tmp_path / 'wd'))['state']
  ref = load_file(path)
  for branch in ('teacher_vit', 'student_vit'):
    np.testing.assert_array_equal(
        np.asarray(state.params[branch]['cls_token']).reshape(-1), ref['cls_token'].reshape(-1))
    np.testing.assert_array_equal(np.asarray(state.params[branch]['norm']['scale']),
                                  ref['norm.weight'])
