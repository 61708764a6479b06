"""The benchmark harness on a tiny model (sharded over the 8 test devices), its MFU arithmetic
and peak table, its errors, and the hygiene of the PyTorch reference (which CI cannot run: it
is compiled and its imports are read, never executed)."""

import ast
import json
import math
import os
import py_compile
import subprocess
import sys

import jax
import numpy as np
import pytest

from ogfr_jax import bench
from ogfr_jax import config_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--size', 'tiny', '--height', '64', '--width', '32', '--batch', '8', '--steps', '2',
        '--repeats', '2', '--warmup', '1']


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  path = tmp_path_factory.mktemp('bench') / 'bench.json'
  returned = bench.main(TINY + ['--peak-flops', '2.5e11', '--json', str(path)])
  return returned, json.loads(path.read_text())


def _forward_flops_per_image(dim: int, depth: int, tokens: int) -> float:
  return depth * tokens * (24 * dim * dim + 4 * tokens * dim)


def test_report_has_positive_speed_flops_and_compile_time(tiny_run):
  returned, written = tiny_run
  assert written == json.loads(json.dumps(returned))
  c = written['config']
  assert c['num_devices'] == jax.device_count() == 8
  assert (c['dim'], c['depth'], c['tokens']) == (64, 2, 1 + 5 * 2)
  for what in ('train', 'eval'):
    r = written[what]
    assert r['batch'] == 8
    assert r['compile_s'] > 0
    assert r['images_per_s'] > 0
    steps = r['step_s']
    assert len(steps['all']) == 2
    assert 0 < steps['min'] <= steps['median'] <= steps['max']
    assert math.isclose(r['images_per_s'], 8 / steps['median'])
    assert r['flops_per_step'] > 0
    assert r['peak_memory']['bytes'] > 0 and r['peak_memory']['source']
  train, forward = written['train'], _forward_flops_per_image(64, 2, 11)
  assert np.isfinite(train['loss'])
  assert train['params'] > 0
  # Teacher and student forward + backward are ~6 forwards, plus the reward passes; the
  # compiled program is one device's share, so a figure not scaled by the device count
  # (1/8 of the step) would fail this.
  assert train['flops_per_step'] > 4 * 8 * forward
  assert written['eval']['flops_per_step'] < train['flops_per_step'] / 3


def test_peak_flops_option_gives_mfu_from_the_reports_own_fields(tiny_run):
  _, written = tiny_run
  assert written['peak_flops_per_device'] == 2.5e11
  assert written['peak_flops_source'] == '--peak-flops'
  for what in ('train', 'eval'):
    r = written[what]
    expected = (r['flops_per_step'] / r['step_s']['median']
                / (2.5e11 * written['config']['num_devices']))
    assert r['mfu'] == pytest.approx(expected, rel=1e-9)
    assert r['achieved_flops_per_s'] == pytest.approx(
        r['flops_per_step'] / r['step_s']['median'])
  assert 'ratio' not in written and 'torch' not in written


def test_mfu_is_null_on_cpu_without_a_peak(capsys):
  bench.main(TINY + ['--what', 'eval', '--json', '-'])
  out = capsys.readouterr().out.strip().splitlines()
  assert any(line.startswith('ogfr_jax eval') for line in out)  # the table comes first
  result = json.loads(out[-1])  # and the JSON object is the last line
  assert 'train' not in result and result['eval']['images_per_s'] > 0
  assert result['config']['platform'] == 'cpu'
  assert result['peak_flops_per_device'] is None
  assert 'unknown' in result['peak_flops_source']
  assert result['eval']['mfu'] is None
  assert result['eval']['flops_per_step'] > 0  # FLOPs are known; only the peak is not


def test_peak_table_and_mfu_arithmetic():
  assert bench.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16')[0] == 989.4e12
  assert bench.peak_flops('NVIDIA H100 PCIe', 'bfloat16')[0] == 756.5e12
  assert bench.peak_flops('NVIDIA H200', 'float32')[0] == 494.7e12
  assert bench.peak_flops('NVIDIA A100-SXM4-80GB', 'bfloat16')[0] == 312e12
  assert bench.peak_flops('TPU v5 lite', 'bfloat16')[0] == 197e12
  assert bench.peak_flops('TPU v4', 'bfloat16')[0] == 275e12
  assert bench.peak_flops('cpu', 'float32')[0] is None
  assert bench.mfu(1e12, 0.5, 1e12, 4) == pytest.approx(0.5)
  assert bench.mfu(1e12, 0.5, None, 4) is None
  assert bench.mfu(None, 0.5, 1e12, 4) is None


class _Compiled:

  def __init__(self, cost):
    self._cost = cost

  def cost_analysis(self):
    return self._cost


def test_cost_flops_reads_dict_list_and_missing_forms():
  assert bench.cost_flops(_Compiled({'flops': 12.0})) == 12.0
  assert bench.cost_flops(_Compiled([{'flops': 7.0, 'bytes accessed': 1.0}])) == 7.0
  assert bench.cost_flops(_Compiled(None)) is None
  assert bench.cost_flops(_Compiled([])) is None
  assert bench.cost_flops(_Compiled({'bytes accessed': 3.0})) is None


def test_time_repeats_waits_once_per_repeat():
  calls = []
  times = bench.time_repeats(lambda: calls.append(1) or np.zeros(1), steps=3, repeats=4,
                             chained=False)
  assert len(times) == 4 and len(calls) == 12 and all(t >= 0 for t in times)


def test_missing_torch_interpreter_is_named(tmp_path):
  missing = str(tmp_path / 'nowhere' / 'python')
  proc = subprocess.run([sys.executable, '-m', 'ogfr_jax.bench', *TINY, '--torch-python',
                         missing], capture_output=True, text=True, cwd=ROOT, check=False,
                        timeout=120)
  assert proc.returncode != 0
  assert missing in proc.stderr and 'no such executable' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_interpreter_without_torch_is_named(tmp_path):
  fake = tmp_path / 'python'
  fake.write_text('#!/bin/sh\necho "ModuleNotFoundError: No module named \'torch\'" >&2\n'
                  'exit 1\n')
  fake.chmod(0o755)
  with pytest.raises(ValueError, match='cannot import torch and timm') as e:
    bench.check_torch_python(str(fake))
  assert str(fake) in str(e.value) and "No module named 'torch'" in str(e.value)


def test_bad_batch_and_what_are_named():
  with pytest.raises(ValueError, match='--batch=6'):
    bench.build_config(bench.parse_args(['--batch', '6']))
  with pytest.raises(SystemExit):
    bench.parse_args(['--what', 'train,infer'])


def test_remat_flag_exists_only_with_the_config_field(capsys):
  with pytest.raises(SystemExit):
    bench.parse_args(['--help'])
  has_field = 'remat' in config_defaults.base_config().model
  assert ('--remat' in capsys.readouterr().out) == has_field


# --- the PyTorch reference --------------------------------------------------------------------


def _reference_tree() -> ast.Module:
  with open(bench.TORCH_REFERENCE) as f:
    return ast.parse(f.read(), bench.TORCH_REFERENCE)


def test_torch_reference_compiles_and_imports_no_jax(tmp_path):
  py_compile.compile(bench.TORCH_REFERENCE, cfile=str(tmp_path / 'ref.pyc'), doraise=True)
  roots = set()
  for node in ast.walk(_reference_tree()):
    if isinstance(node, ast.Import):
      roots.update(a.name.split('.')[0] for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, 'relative import in the standalone reference'
      roots.add(node.module.split('.')[0])
  assert {'torch', 'timm'} <= roots
  allowed = {'torch', 'timm', 'numpy'} | set(sys.stdlib_module_names)
  assert roots <= allowed, sorted(roots - allowed)
  assert not roots & {'jax', 'jaxlib', 'flax', 'optax', 'ogfr_jax'}


def test_torch_reference_sizes_match_config_defaults():
  sizes = next(ast.literal_eval(node.value) for node in _reference_tree().body
               if isinstance(node, ast.Assign) and node.targets[0].id == 'VIT_SIZES')
  assert sizes == config_defaults.VIT_SIZES


def test_torch_command_carries_the_configs_shapes():
  args = bench.parse_args(['--size', 'small', '--stride', '11', '--batch', '16', '--dtype',
                           'bfloat16', '--torch-python', '/opt/py'])
  config = bench.build_config(args)
  cmd = bench.torch_command('/opt/py', config, args)
  flags = dict(zip(cmd[2::2], cmd[3::2]))
  assert cmd[:2] == ['/opt/py', bench.TORCH_REFERENCE] and cmd[-1] == '--amp'
  assert flags['--size'] == 'small' and flags['--stride'] == '11'
  assert (flags['--height'], flags['--width'], flags['--batch']) == ('256', '128', '16')
  assert flags['--fepm-layer'] == '0'  # fepm.layer of the recipe
  assert float(flags['--lr']) == pytest.approx(0.008 * 16 / 64)
  assert bench.torch_mismatches(config) == []
  config.model.jpm = True
  config.fepm.num_samples = 2
  assert len(bench.torch_mismatches(config)) == 2
  # Without the reference, the bench measures the recipe's own agent.
  recipe = bench.build_config(bench.parse_args(['--size', 'small']))
  assert recipe.fepm.num_samples == config_defaults.base_config().fepm.num_samples
