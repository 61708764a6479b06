"""Donor occluder boxes pasted on the devices equal the host's rendering bit for bit, and a
process then decodes only its own rows (data/donor_exchange.py)."""

import os
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from ogfr_jax import config_defaults
from ogfr_jax import config_schema
from ogfr_jax import parallel
from ogfr_jax import train_step
from ogfr_jax.data import donor_exchange
from ogfr_jax.data import image_io
from ogfr_jax.data import occlusion
from ogfr_jax.data import pipeline
from helpers import make_config, write_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 32, 16
PATTERNS = ('object', 'texture', 'person', 'crop', 'bank')
# The loader preset, every image occluded; each test names the bank and the exchange.
DONOR = {'seed': 5, 'input.prefetch': 0, 'occlusion.prob': 1.0, 'occlusion.patterns': PATTERNS}
NON_DONOR_KEYS = ('image', 'pattern', 'occ_mask', 'contam_mask', 'pid', 'camid', 'index',
                  'num_skipped')


def _write_bank(folder):
  os.makedirs(folder, exist_ok=True)
  for name, (h, w, colour) in {'a.png': (12, 8, (250, 0, 0)),
                               'b.png': (6, 14, (0, 0, 240))}.items():
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., :3] = colour
    rgba[1:-1, 1:-1, 3] = 255
    Image.fromarray(rgba, 'RGBA').save(os.path.join(folder, name))
  occlusion.load_bank.cache_clear()
  return str(folder)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('donors')
  return write_split(str(root / 'train'), [3, 4, 2, 5, 3, 4, 3, 2]), _write_bank(root / 'bank')


def _batches(split, config, steps, **process):
  it = pipeline.make_train_iterator(split, config, **process)
  try:
    return [next(it) for _ in range(steps)]
  finally:
    it.close()


_paste = jax.jit(donor_exchange.paste_on_device)


def _device_paste(batch, mesh=None):
  args = [batch[k] for k in ('occluded', 'image', 'row', 'donor_row', 'donor_box')]
  if mesh is not None:
    args = list(parallel.global_batch(dict(zip('abcde', args)), mesh).values())
  return np.asarray(parallel.fetch(_paste(*args)))


@pytest.mark.parametrize('prob', [1.0, 0.75])
def test_device_paste_equals_the_host_rendering(data, prob):
  split, bank = data
  donor = {**DONOR, 'occlusion.bank_dir': bank}
  host = _batches(split, make_config(
      {**donor, 'input.donor_exchange': 'host', 'occlusion.prob': prob}, preset='loader'), 6)
  device = _batches(split, make_config(
      {**donor, 'input.donor_exchange': 'device', 'occlusion.prob': prob}, preset='loader'), 6)
  mesh = parallel.make_mesh(config_defaults.base_config().mesh)  # 8 fake devices
  seen = set()
  for h, d in zip(host, device):
    assert set(d) == set(h) | set(donor_exchange.KEYS)
    for key in NON_DONOR_KEYS:
      np.testing.assert_array_equal(h[key], d[key], err_msg=key)
    np.testing.assert_array_equal(d['row'], np.arange(8))
    takes = d['donor_row'] >= 0
    names = [PATTERNS[k - 1] if k else None for k in d['pattern']]
    assert takes.tolist() == [n in occlusion.DONOR_TYPES for n in names]
    # Rows without a donor box are complete on the host already.
    np.testing.assert_array_equal(h['occluded'][~takes], d['occluded'][~takes])
    np.testing.assert_array_equal(d['occluded'][takes], d['image'][takes])
    np.testing.assert_array_equal(donor_exchange.paste_on_host(d), h['occluded'])
    np.testing.assert_array_equal(_device_paste(d), h['occluded'])
    np.testing.assert_array_equal(_device_paste(d, mesh), h['occluded'])
    seen.update(n for n in names if n)
  assert seen == set(PATTERNS)


def test_device_paste_follows_the_rows_in_any_order(data):
  """The global array may order the processes' rows otherwise (interleaved hosts): `row`
  says where each donor is."""
  split, bank = data
  donor = {**DONOR, 'occlusion.bank_dir': bank}
  config = make_config({**donor, 'input.donor_exchange': 'device',
                        'occlusion.patterns': ('person', 'crop')}, preset='loader')
  [d] = _batches(split, config, 1)
  [h] = _batches(split, make_config({**donor, 'input.donor_exchange': 'host',
                                     'occlusion.patterns': ('person', 'crop')}, preset='loader'), 1)
  order = np.random.default_rng(1).permutation(8)
  shuffled = {k: v[order] for k, v in d.items() if k != pipeline.NOTES_KEY}
  np.testing.assert_array_equal(_device_paste(shuffled), h['occluded'][order])
  with pytest.raises(ValueError, match='which this batch does not hold'):
    donor_exchange.paste_on_host({k: v[:4] for k, v in shuffled.items()})


def _count_decodes(monkeypatch):
  calls = []
  load = image_io.load_image

  def counted(path, **kwargs):
    calls.append(path)
    return load(path, **kwargs)

  monkeypatch.setattr(pipeline.image_io, 'load_image', counted)
  return calls


def test_a_process_decodes_only_its_own_rows_when_the_devices_paste(data, monkeypatch):
  split, bank = data
  donor = {**DONOR, 'occlusion.bank_dir': bank}
  calls = _count_decodes(monkeypatch)
  steps, processes = 4, 4
  decoded = {}
  for mode in ('device', 'host'):
    config = make_config({**donor, 'input.donor_exchange': mode,
                          'occlusion.patterns': ('person', 'crop')}, preset='loader')
    per_process = []
    for p in range(processes):
      del calls[:]
      batches = _batches(split, config, steps, process_index=p, process_count=processes)
      per_process.append(len(calls))
      assert all(len(b['image']) == 2 for b in batches)
    decoded[mode] = per_process
  assert decoded['device'] == [steps * 2] * processes
  # Every row takes a donor, mostly from another process: those are decoded again.
  assert min(decoded['host']) > steps * 2


def test_the_field_and_the_step_keys(data):
  split, bank = data
  donor = {**DONOR, 'occlusion.bank_dir': bank}
  config = make_config({**donor, 'input.donor_exchange': 'device'}, preset='loader')
  config_schema.check_choice(config.input.donor_exchange, 'input.donor_exchange')
  assert config_defaults.base_config().input.donor_exchange == 'device'
  assert train_step.step_keys(config)[-3:] == donor_exchange.KEYS
  for other in (make_config({**donor, 'input.donor_exchange': 'host'}, preset='loader'),
                make_config({**donor, 'input.donor_exchange': 'device',
                             'occlusion.patterns': ('object', 'bank')}, preset='loader')):
    assert not set(donor_exchange.KEYS) & set(train_step.step_keys(other))
    assert not set(donor_exchange.KEYS) & set(_batches(split, other, 1)[0])
  config.input.donor_exchange = 'network'
  with pytest.raises(ValueError, match=r"config.input.donor_exchange='network': must be one"):
    config_schema.check_choice(config.input.donor_exchange, 'input.donor_exchange')
  with pytest.raises(ValueError, match=r'config.input.donor_exchange'):
    pipeline.make_train_iterator(split, config)


def test_two_processes_paste_on_the_devices_as_the_host_renders(data, tmp_path):
  """2 processes x 2 devices (gloo): the donor boxes pasted on a process-major mesh and on
  one that interleaves the processes' devices equal the host rendering, and every row of the
  global arrays is the pipeline's row named by `row` (a permutation on the interleaved mesh).
  """
  sys.path.insert(0, os.path.join(ROOT, 'launch'))
  import local  # pylint: disable=g-import-not-at-top
  import donor_child  # pylint: disable=g-import-not-at-top
  split, _ = data
  assert donor_child.read_split(os.path.dirname(split.paths[0])).paths == split.paths
  steps = 3
  out = tmp_path / 'out'
  child = [sys.executable, os.path.join(ROOT, 'tests', 'donor_child.py'),
           '--split', os.path.dirname(split.paths[0]), '--out', str(out),
           '--steps', str(steps)]
  code = local.launch(child, num_processes=2, devices_per_process=2,
                      log_dir=str(tmp_path / 'logs'), timeout_s=240)
  logs = ''.join(p.read_text() for p in sorted((tmp_path / 'logs').iterdir()))
  assert code == 0, logs[-3000:]
  results = [dict(np.load(f'{out}.{i}.npz')) for i in (0, 1)]
  for key in results[0]:  # every process gathers the same global arrays
    np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
  r = results[0]
  assert bool(r['major/pipeline_order']) and not bool(r['interleaved/pipeline_order'])
  whole = _batches(split, make_config({**donor_child.CONFIG, 'input.donor_exchange': 'host'},
                                     preset='loader'), steps)
  for mesh in ('major', 'interleaved'):
    for step in range(steps):
      prefix = f'{mesh}/{step}/'
      row = r[prefix + 'row']
      np.testing.assert_array_equal(np.sort(row), np.arange(8))
      assert (row == np.arange(8)).all() == (mesh == 'major')
      for key in donor_child.KEYS:
        np.testing.assert_array_equal(r[prefix + 'host_' + key], whole[step][key][row],
                                      err_msg=prefix + key)
      np.testing.assert_array_equal(r[prefix + 'pasted'], r[prefix + 'host_occluded'])
      assert (r[prefix + 'pasted'] != r[prefix + 'unpasted']).any()


@pytest.mark.slow
def test_train_steps_are_bitwise_the_same_with_either_exchange(data):
  """Two jitted train steps over 8 devices: metrics and parameters bit for bit."""
  import functools  # pylint: disable=g-import-not-at-top
  from ogfr_jax import optim  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train_state  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  split, bank = data
  donor = {**DONOR, 'occlusion.bank_dir': bank}
  configs = {mode: make_config({**donor, 'input.donor_exchange': mode,
                                'occlusion.patterns': ('object', 'person', 'crop'),
                                'model.patch_size': 16, 'model.stride': 16,
                                'model.drop_path': 0.0,
                                # The occluded view's way into the step needs no agent.
                                'fepm.enabled': False}, preset='loader')
             for mode in ('host', 'device')}
  for config in configs.values():
    config_defaults.shrink_for_local_run(config)
  # The model and optimizer do not read input.donor_exchange: one init serves both.
  model = build.build_model(configs['host'], 8, 3)
  tx, lr_fn = optim.make_optimizer(configs['host'], 8, 4, 8)
  mesh = parallel.make_mesh(configs['host'].mesh)
  init = functools.partial(train_state.init_state, model, tx, configs['host'])
  shardings = parallel.state_shardings(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)
  init = jax.jit(init, out_shardings=shardings)
  results = {}
  for mode, config in configs.items():
    state = init(jax.random.PRNGKey(0))  # a fresh one: the step donates it
    step = train_step.jit_train_step(model, tx, config, lr_fn, mesh, shardings)
    keys = train_step.step_keys(config)
    metrics = []
    for batch in _batches(split, config, 2):
      state, m = step(state, parallel.global_batch({k: batch[k] for k in keys}, mesh))
      metrics.append(parallel.fetch(m))
    results[mode] = metrics, parallel.fetch(state.params)
  (host_metrics, host_params), (device_metrics, device_params) = results.values()
  for a, b in zip(host_metrics, device_metrics, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert float(host_metrics[0]['loss/total']) != float(host_metrics[1]['loss/total'])
  for a, b in zip(jax.tree_util.tree_leaves(host_params), jax.tree_util.tree_leaves(
      device_params), strict=True):
    np.testing.assert_array_equal(a, b)
