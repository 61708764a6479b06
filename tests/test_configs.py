"""Configs load, validate and reject mistakes with messages that name the field."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from ml_collections import config_flags  # noqa: F401  (registers the config loader)

from ogfr_jax import config_defaults
from ogfr_jax import optim
from ogfr_jax import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def _load(path, arg=None):
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg_under_test', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_loads_and_validates(path):
  config = _load(path)
  run_config.validate(config)
  local = _load(path, 'runlocal')
  run_config.validate(local)
  assert config.to_json_best_effort()  # serialisable for WORKDIR/config.json


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_states_its_command_and_expected_score(path):
  """The big_vision form: what it is, the command, the machine and wall time, and the
  expected score (a figure, or 'not measured' with the reason)."""
  import ast  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    source = f.read()
  doc = ast.get_docstring(ast.parse(source)) or ''
  assert 'python -m ogfr_jax.main --config configs/' + os.path.basename(path) in doc
  assert re.search(r'^Machine and wall time:', doc, re.M), 'no machine / wall time line'
  expected = re.search(r'^Expected[^:]*:(.*?)(?:\n\n|\Z)', doc, re.M | re.S)
  assert expected, 'no Expected: paragraph'
  assert (re.search(r'\d\.\d{3}|\d+\.\d / \d+\.\d', expected.group(1))
          or 'not measured' in expected.group(1)), expected.group(1)
  # Figures belong in the docstring and docs/results.md, not in comments.
  comments = [l for l in source.splitlines() if l.lstrip().startswith('#')]
  assert not [l for l in comments if re.search(r'\d\.\d{2,}', l)], comments


def test_parse_arg_rejects_unknown_and_converts_types():
  arg = config_defaults.parse_arg('runlocal,n=3', runlocal=False, n=1)
  assert arg.runlocal is True and arg.n == 3
  with pytest.raises(ValueError, match='unknown config arg'):
    config_defaults.parse_arg('bogus=1', runlocal=False)


def test_ablation_ladder_switches_components():
  from configs import ablations  # the configs folder is importable from the repository root
  seen = {}
  for step in ablations.STEPS:
    c = ablations.apply_step(config_defaults.base_config(), step)
    seen[step] = (c.occlusion.enabled, c.model.teacher, c.fepm.enabled, c.fepm.selection,
                  c.model.pattern_embed, c.student_erase.enabled)
  assert seen['vit_baseline'] == (False, False, False, 'agent', False, False)
  assert seen['kd'] == (True, True, False, 'agent', False, False)
  assert seen['fepm_random'] == (True, True, True, 'random', False, False)
  assert seen['full'] == (True, True, True, 'agent', True, False)
  assert seen['student_erase'] == (True, True, True, 'agent', True, True)
  assert seen['fepm_oracle'] == (True, True, True, 'oracle', True, False)
  with pytest.raises(ValueError, match='unknown ablation step'):
    ablations.apply_step(config_defaults.base_config(), 'nope')


@pytest.mark.parametrize('field,value', [
    ('dataset.name', 'market'), ('model.size', 'huge'), ('fepm.baseline', 'critic'),
    ('input.ids_per_batch', 0), ('student_erase.layer', 13),
    ('student_erase.detector', 'pixels')])
def test_validate_names_the_field(field, value):
  c = config_defaults.extend(config_defaults.base_config(), 'student_erase')
  c.student_erase.enabled = True
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    run_config.validate(c)


def test_student_erase_needs_occlusion_synthesis():
  c = config_defaults.extend(config_defaults.base_config(), 'student_erase')
  c.student_erase.enabled = True
  run_config.validate(c)
  c.occlusion.enabled = False
  with pytest.raises(ValueError, match=r'occlusion\.enabled'):
    run_config.validate(c)


def _main(tmp_path, *args):
  return subprocess.run(
      [sys.executable, '-m', 'ogfr_jax.main', '--config', 'configs/synthetic.py',
       '--workdir', str(tmp_path / 'wd'), *args],
      cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_main_rejects_unknown_field_without_traceback(tmp_path):
  proc = _main(tmp_path, '--config.train.epochz=3')
  assert proc.returncode != 0
  assert '--config.train.epochz' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'wd').exists()


def test_main_rejects_wrong_type(tmp_path):
  proc = _main(tmp_path, '--config.train.log_every=often')
  assert proc.returncode != 0
  assert 'config.train.log_every' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'wd').exists()


def test_workdir_of_another_config_is_refused(tmp_path):
  c = config_defaults.base_config()
  run_config.prepare_workdir(str(tmp_path), c)
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['model']['size'] == c.model.size
  c.train.log_every = 7  # a resumable field: accepted
  run_config.prepare_workdir(str(tmp_path), c)
  c.optim.lr = 0.5
  with pytest.raises(ValueError, match=r'optim\.lr'):
    run_config.prepare_workdir(str(tmp_path), c)
  (tmp_path / 'checkpoints').mkdir()
  run_config.prepare_workdir(str(tmp_path), c, overwrite=True)
  assert not (tmp_path / 'checkpoints').exists()
  assert json.loads((tmp_path / 'config.json').read_text())['optim']['lr'] == 0.5


def test_param_groups_follow_the_transreid_recipe():
  cfg = config_defaults.base_config().optim
  params = {
      'student': {'patch_embed': {'kernel': 1, 'bias': 1}, 'pos_embed': 1, 'cls_token': 1,
                  'block_0': {'norm1': {'scale': 1, 'bias': 1}, 'mlp': {'kernel': 1}}},
      'teacher': {'fepm': {'agent': {'dense': {'kernel': 1, 'bias': 1}}, 'replace_token': 1}},
  }
  labels = optim.param_labels(params, cfg)
  assert labels['student']['patch_embed'] == {'kernel': 'weights', 'bias': 'bias'}
  assert labels['student']['pos_embed'] == 'no_decay'
  assert labels['student']['block_0']['norm1'] == {'scale': 'no_decay', 'bias': 'no_decay'}
  assert labels['teacher']['fepm']['agent']['dense'] == {'kernel': 'agent', 'bias': 'agent'}
  assert labels['teacher']['fepm']['replace_token'] == 'no_decay'
  cfg.no_decay_norm_and_embed = False
  assert optim.param_group(('student', 'pos_embed'), cfg) == 'weights'


def test_optimizer_routes_groups_to_their_own_rates():
  config = config_defaults.base_config()
  config.optim.weight_decay = 0.0
  config.optim.momentum = 0.0
  config.optim.warmup_epochs = 0
  config.optim.agent_lr = 0.5
  tx, lr = optim.make_optimizer(config, global_batch=64, steps_per_epoch=10, total_steps=100)
  params = {'w': {'kernel': jnp.ones(3), 'bias': jnp.ones(3)}, 'agent': {'kernel': jnp.ones(3)}}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  peak = float(lr(0))
  np.testing.assert_allclose(updates['w']['kernel'], -peak, rtol=1e-6)
  np.testing.assert_allclose(updates['w']['bias'], -2 * peak, rtol=1e-6)  # bias lr x2
  # The agent's own Adam: its first step moves every weight by its lr against the gradient.
  np.testing.assert_allclose(updates['agent']['kernel'], -0.5, rtol=1e-5)
  assert float(lr(99)) < 0.05 * peak  # cosine decay to 1% at the end
