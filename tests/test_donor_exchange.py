"""Donor occluder boxes pasted on the devices equal the host's rendering bit for bit, and a
process then decodes only its own rows (data/donor_exchange.py)."""

import os

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
from ogfr_jax.data import records

H, W = 32, 16
PATTERNS = ('object', 'texture', 'person', 'crop', 'bank')
NON_DONOR_KEYS = ('image', 'pattern', 'occ_mask', 'contam_mask', 'pid', 'camid', 'index',
                  'num_skipped')


def _write_split(folder, counts):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  paths, pids, camids = [], [], []
  for pid, count in enumerate(counts):
    for k in range(count):
      pixels = rng.integers(0, 256, size=(48, 24, 3), dtype=np.uint8)
      path = os.path.join(folder, f'{pid + 1:04d}_c{k % 3 + 1}_f{k:07d}.jpg')
      Image.fromarray(pixels).save(path, quality=90)
      paths.append(path)
      pids.append(pid)
      camids.append(k % 3)
  return records.Split.from_lists(paths, pids, camids)


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
  return _write_split(str(root / 'train'), [3, 4, 2, 5, 3, 4, 3, 2]), _write_bank(root / 'bank')


def _config(bank, mode, *, prob=1.0, patterns=PATTERNS):
  c = config_defaults.base_config()
  c.seed = 5
  c.input.height, c.input.width = H, W
  c.input.ids_per_batch, c.input.images_per_id = 4, 2
  c.input.pad = 2
  c.input.num_workers, c.input.prefetch = 0, 0
  c.input.donor_exchange = mode
  c.occlusion.prob = prob
  c.occlusion.patterns = patterns
  c.occlusion.bank_dir = bank
  return c


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
  host = _batches(split, _config(bank, 'host', prob=prob), 6)
  device = _batches(split, _config(bank, 'device', prob=prob), 6)
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
  config = _config(bank, 'device', patterns=('person', 'crop'))
  [d] = _batches(split, config, 1)
  [h] = _batches(split, _config(bank, 'host', patterns=('person', 'crop')), 1)
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
  calls = _count_decodes(monkeypatch)
  steps, processes = 4, 4
  decoded = {}
  for mode in ('device', 'host'):
    config = _config(bank, mode, patterns=('person', 'crop'))
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
  config = _config(bank, 'device')
  config_schema.check_choice(config.input.donor_exchange, 'input.donor_exchange')
  assert config_defaults.base_config().input.donor_exchange == 'device'
  assert train_step.step_keys(config)[-3:] == donor_exchange.KEYS
  for other in (_config(bank, 'host'), _config(bank, 'device', patterns=('object', 'bank'))):
    assert not set(donor_exchange.KEYS) & set(train_step.step_keys(other))
    assert not set(donor_exchange.KEYS) & set(_batches(split, other, 1)[0])
  config.input.donor_exchange = 'network'
  with pytest.raises(ValueError, match=r"config.input.donor_exchange='network': must be one"):
    config_schema.check_choice(config.input.donor_exchange, 'input.donor_exchange')
  with pytest.raises(ValueError, match=r'config.input.donor_exchange'):
    pipeline.make_train_iterator(split, config)
