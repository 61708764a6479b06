"""benchmarks/ablation_table.py on a dataset in its real layout (runlocal: tiny ViT, 4 steps).

The random_init row and one trained row of the Occluded-Duke ladder run as the command runs
them (subprocesses of the normal entry point), on a fixture tree in Occluded_Duke's layout.
"""

import json
import os
import subprocess
import sys

import pytest

import dataset_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'ablation_table.py')
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import ablation_table  # noqa: E402  pylint: disable=g-import-not-at-top


def test_config_spec_and_test_metrics():
  assert (ablation_table.config_spec('kd', dataset='msmt17', config_args='runlocal')
          == 'configs/ablations.py:step=kd,dataset=msmt17,runlocal')
  assert ablation_table.config_spec('none', 'configs/fepm_rows.py', 'row') == (
      'configs/fepm_rows.py:row=none')
  metrics = {'mAP': 0.5}
  results = {'occluded_reid': metrics, 'fepm': {}, 'manifest': {}}
  assert ablation_table.test_metrics(results) == metrics
  with pytest.raises(ValueError, match='one test dataset'):
    ablation_table.test_metrics({'a': {}, 'b': {}, 'manifest': {}})


def test_ladder_on_a_real_layout(tmp_path):
  tree = fx.make_occluded_duke(tmp_path)  # 3 training identities: P = 2
  root = tmp_path / 'table'
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  proc = subprocess.run(
      [sys.executable, SCRIPT, '--root', str(root), '--dataset', 'occluded_duke',
       '--config-args', 'runlocal', '--steps', 'vit_baseline', '--seeds', '0', '--',
       f'--config.dataset.root={tree.root}', '--config.input.ids_per_batch=2'],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  with open(root / 'table.json') as f:
    table = json.load(f)
  assert table['dataset'] == 'occluded_duke'
  assert list(table['table']) == ['random_init', 'vit_baseline']
  with open(root / 'vit_baseline_seed0' / 'results.json') as f:
    results = json.load(f)
  trained = results['occluded_duke']
  for metric in ablation_table.METRICS:
    assert table['table']['vit_baseline'][metric]['values'] == [trained[metric]]
  with open(root / 'random_init_seed0.json') as f:
    untrained = json.load(f)
  assert table['table']['random_init']['mAP']['values'] == [untrained['mAP']]
  assert 0.0 < untrained['mAP'] <= 1.0 and untrained['step'] == 0
  with open(root / 'vit_baseline_seed0' / 'config.json') as f:
    config = json.load(f)
  # The row is the ladder's vit_baseline step of the Occluded-Duke recipe, shrunk by runlocal.
  assert config['dataset']['name'] == 'occluded_duke' and config['model']['size'] == 'tiny'
  assert config['model']['teacher'] is False and config['occlusion']['enabled'] is False


def test_summary_uses_the_sample_spread_and_keeps_each_seed():
  rows = {'occ_synthesis': [{'mAP': 0.442, 'rank1': 0.465}, {'mAP': 0.401, 'rank1': 0.389},
                            {'mAP': 0.422, 'rank1': 0.451}],
          'single': [{'mAP': 0.5, 'rank1': 0.25}]}
  table = ablation_table.summarize(rows)
  cell = table['occ_synthesis']['mAP']
  # mean 1.265 / 3; deviations +0.0203, -0.0207, +0.0003 -> sum of squares 8.407e-4 / 2.
  assert cell['values'] == [0.442, 0.401, 0.422]
  assert abs(cell['mean'] - 1.265 / 3) < 1e-12
  assert abs(cell['std'] - (8.406666e-4 / 2) ** 0.5) < 1e-6
  assert table['single']['mAP']['std'] == 0.0
  assert 'teacher_mAP' not in table['single']  # no row has it
  text = ablation_table.markdown(table)
  assert '| occ_synthesis | 0.422 +- 0.021 | 0.442 / 0.401 / 0.422 |' in text
  assert text.splitlines()[1] == '| --- | --- | --- | --- | --- |'
  rows['single'][0]['teacher_mAP'] = 0.4  # a row without it shows '-' in the text table
  text = ablation_table.text_table(ablation_table.summarize(rows))
  assert text.splitlines()[1].split()[-1] == '-'


def test_runs_at_a_time_are_pinned_to_a_cpu_each_and_failures_name_their_log(tmp_path):
  cpus = sorted(os.sched_getaffinity(0))
  probe = 'import os, sys; open(sys.argv[1], "w").write(repr(sorted(os.sched_getaffinity(0))))'
  jobs = min(2, len(cpus))
  commands = [([sys.executable, '-c', probe, str(tmp_path / f'cpus{k}')], str(tmp_path / f'{k}.log'))
              for k in range(3)]
  ablation_table.run_pinned(commands, jobs)
  seen = [eval((tmp_path / f'cpus{k}').read_text()) for k in range(3)]  # pylint: disable=eval-used
  if jobs > 1:
    assert all(len(s) == 1 and s[0] in cpus[:jobs] for s in seen), seen
  ablation_table.run_pinned(commands[:1], 1)  # one at a time: every CPU this process has
  assert eval((tmp_path / 'cpus0').read_text()) == cpus  # pylint: disable=eval-used
  with pytest.raises(ValueError, match='CPUs'):
    ablation_table.run_pinned(commands, len(cpus) + 1)
  failing = [([sys.executable, '-c', 'raise SystemExit(3)'], str(tmp_path / 'bad.log'))]
  with pytest.raises(RuntimeError, match='exit 3.*bad.log'):
    ablation_table.run_pinned(failing, jobs)
