"""The device layout of the mesh (parallel.device_grid) on fake devices: TPU torus order,
several slices joined over the data-centre network, and what it means for the batch rows."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from ogfr_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  process_index: int
  slice_index: int = 0
  coords: tuple = (0, 0, 0)
  core_on_chip: int = 0
  platform: str = 'cpu'
  device_kind: str = 'cpu'


def _tpu_v4_2x2x2():
  """8 TPU v4 chips, 2 hosts (z = 0, 1), each host's chips listed in a scrambled id order."""
  order = [(0, 0), (1, 1), (0, 1), (1, 0)]
  return [FakeDevice(id=z * 4 + i, process_index=z, coords=(x, y, z), platform='tpu',
                     device_kind='TPU v4')
          for z in range(2) for i, (x, y) in enumerate(order)]


def _slices(num_slices, per_slice, hosts_per_slice=1):
  devs = []
  for s in range(num_slices):
    for i in range(per_slice):
      devs.append(FakeDevice(id=len(devs), slice_index=s,
                             process_index=s * hosts_per_slice + i * hosts_per_slice // per_slice))
  return devs


def _differing_axes(group):
  coords = np.array([d.coords for d in group])
  return int(np.sum(coords.max(0) != coords.min(0)))


def test_tpu_fsdp_groups_follow_the_torus_not_the_id_order():
  devs = _tpu_v4_2x2x2()
  grid = parallel.device_grid(devs, 4, 2)
  assert grid.shape == (4, 2)
  # Each fsdp pair is two physical neighbours along one axis (id order would pair the
  # diagonal (0,0,z)-(1,1,z)).
  for row in grid:
    assert _differing_axes(row) == 1, [d.coords for d in row]
  # 2 x 4: an fsdp group is a whole 2x2 plane of one host; data goes across the hosts.
  grid = parallel.device_grid(devs, 2, 4)
  for row in grid:
    assert len({d.coords[2] for d in row}) == 1 and len({d.process_index for d in row}) == 1
  assert {d.id for d in grid.reshape(-1)} == set(range(8))


def test_a_torus_order_may_interleave_hosts_and_the_batch_follows():
  grid = parallel.device_grid(_tpu_v4_2x2x2(), 1, 8)
  processes = [d.process_index for d in grid.reshape(-1)]
  assert sorted(processes) == [0] * 4 + [1] * 4
  # jax's order for one 8-long axis alternates the two hosts' chips: not the pipeline's row
  # order, which parallel.pipeline_order reports (global_batch then permutes the rows).
  assert processes != sorted(processes)
  assert not parallel.pipeline_order(types.SimpleNamespace(devices=grid))
  assert parallel.pipeline_order(
      types.SimpleNamespace(devices=parallel.device_grid(_tpu_v4_2x2x2(), 2, 4)))


@pytest.mark.parametrize('data,fsdp', [(2, 4), (4, 2), (8, 1)])
def test_several_slices_put_the_data_axis_over_the_network(data, fsdp):
  devs = _slices(2, 4, hosts_per_slice=2)
  grid = parallel.device_grid(devs[::-1], data, fsdp)  # any given order
  assert grid.shape == (data, fsdp)
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  # fsdp never crosses a slice; the first half of the data axis is slice 0, the rest slice 1.
  assert (slice_of == slice_of[:, :1]).all()
  np.testing.assert_array_equal(slice_of[:, 0], np.repeat([0, 1], data // 2))
  assert {d.id for d in grid.reshape(-1)} == set(range(8))
  assert parallel.pipeline_order(types.SimpleNamespace(devices=grid))


def test_fsdp_across_slices_is_refused():
  devs = _slices(2, 4)
  with pytest.raises(ValueError, match=r'config.mesh: data=1 x fsdp=8 over 2 slices of 4 '
                     r'devices.*data must be a multiple of 2'):
    parallel.device_grid(devs, 1, 8)
  with pytest.raises(ValueError, match='data must be a multiple of 4'):
    parallel.device_grid(_slices(4, 2), 2, 4)


def test_one_slice_of_plain_devices_keeps_the_process_major_order():
  devs = [FakeDevice(id=i, process_index=p) for i, p in enumerate([1, 1, 0, 0, 1, 1, 0, 0])]
  grid = parallel.device_grid(devs, 2, 4)
  assert [d.id for d in grid.reshape(-1)] == [2, 3, 6, 7, 0, 1, 4, 5]
  assert parallel.num_slices(devs) == 1 and parallel.num_slices(_slices(3, 2)) == 3


def test_mesh_shape_fills_one_axis():
  assert parallel.mesh_shape(types.SimpleNamespace(data=-1, fsdp=4), 16) == (4, 4)
  with pytest.raises(ValueError, match='config.mesh: data=3 x fsdp=-1 does not cover the 16'):
    parallel.mesh_shape(types.SimpleNamespace(data=3, fsdp=-1), 16)


# --------------------------------------------------------------------------------------------
# What FSDP does: the layout record and the collectives of the compiled step


def _tiny_state():
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from ogfr_jax import config_defaults  # pylint: disable=g-import-not-at-top
  from ogfr_jax import optim  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train_state  # pylint: disable=g-import-not-at-top
  from ogfr_jax.models import build  # pylint: disable=g-import-not-at-top
  c = config_defaults.base_config()
  c.model.size, c.model.patch_size, c.model.stride = 'tiny', 16, 16
  c.input.height, c.input.width = 64, 32
  c.model.mlp_ratio = 16.0  # 64 x 1024 MLP kernels: over parallel.FSDP_MIN_SIZE
  model = build.build_model(c, 10, 2)
  tx, _ = optim.make_optimizer(c, 8, 10, 100)
  return jax.eval_shape(functools.partial(train_state.init_state, model, tx, c),
                        jax.random.PRNGKey(0))


def test_describe_layout_matches_the_arrays_on_a_device(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from ogfr_jax import manifest  # pylint: disable=g-import-not-at-top
  abstract = _tiny_state()
  mesh = parallel.make_mesh(types.SimpleNamespace(data=2, fsdp=4))
  shardings = parallel.state_shardings(abstract, mesh)
  layout = parallel.describe_layout(abstract, shardings, mesh)
  assert layout['mesh'] == {'shape': {'data': 2, 'fsdp': 4}, 'devices': 8, 'processes': 1,
                            'slices': 1, 'device_kind': jax.devices()[0].device_kind,
                            'pipeline_order': True}
  # Independently: put zeros with those shardings and add up what device 0 holds.
  arrays = jax.tree_util.tree_map(
      lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, shardings)
  dev = mesh.devices.reshape(-1)[0]

  def on_device(tree):
    return sum(next(sh.data.nbytes for sh in x.addressable_shards if sh.device == dev)
               for x in jax.tree_util.tree_leaves(tree))

  def whole(tree):
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))

  for key, tree in (('params', arrays.params), ('optimizer', arrays.opt_state),
                    ('total', arrays)):
    assert layout[key]['per_device_bytes'] == on_device(tree), key
    assert layout[key]['total_bytes'] == whole(tree), key
  # The MLP kernels (fc1, fc2) of the 2 blocks of teacher and student are split 4 ways, and
  # so are their SGD momentum buffers.
  assert layout['params']['num_split'] == 8
  assert layout['optimizer']['num_split'] == 8
  top = layout['largest'][0]
  assert top['shape'] in ([64, 1024], [1024, 64]) and top['bytes'] == 64 * 1024 * 4
  assert 'fsdp' in top['spec'] and np.prod(top['per_device_shape']) == 64 * 1024 // 4
  lines = parallel.layout_lines(layout)
  assert lines[0].startswith('layout: mesh data=2 x fsdp=4 over 8 ')
  assert any('parameters:' in l and '(8 of ' in l for l in lines)
  # Written into the run manifest next to config.json.
  (tmp_path / 'manifest.json').write_text(json.dumps({'git': {'commit': None}}))
  manifest.record_layout(str(tmp_path), layout)
  record = json.loads((tmp_path / 'manifest.json').read_text())
  assert record['layout'] == json.loads(json.dumps(layout)) and 'git' in record


def test_weight_gradient_all_reduce_detector():
  sys.path.insert(0, LAUNCH)
  import fsdp_hlo  # pylint: disable=g-import-not-at-top
  split = {'fc1/kernel': (64, 1024), 'fc2/kernel': (1024, 64)}
  whole = ('%ar = (f32[], f32[64,1024]{1,0}) all-reduce(%a, %b), channel_id=1\n'
           '%ag = f32[1024,64]{1,0} all-gather(%c), dimensions={0}\n')
  scattered = ('%rs = f32[8,1024]{1,0} reduce-scatter(%a), dimensions={0}\n'
               '%ars = f32[16,9,64]{2,1,0} all-reduce-start(%x)\n')
  assert fsdp_hlo.full_weight_all_reduces(whole, split) == {'fc1/kernel': 1}
  assert fsdp_hlo.full_weight_all_reduces(scattered, split) == {}
  assert [op for op, _ in fsdp_hlo.collectives(scattered)] == ['reduce-scatter', 'all-reduce']


def test_compiled_fsdp_step_on_xla_cpu_all_reduces_whole_weight_gradients(tmp_path):
  """XLA:CPU has no reduce-scatter creation pass: on 8 fake CPU devices (fsdp=8, activations
  larger than the weights, as in real recipes) the gradients of split weights are all-reduced
  whole and then sliced. GPU and TPU compilers turn that into reduce-scatter; the same script
  checks it there (launch/fsdp_hlo.py, exit status 1 on a full-size all-reduce). This test
  keeps the dumped HLO and the detector honest; when XLA:CPU gains the pass it fails and the
  expectation flips."""
  out = tmp_path / 'step_hlo.txt'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run(
      [sys.executable, os.path.join(LAUNCH, 'fsdp_hlo.py'), '--devices', '8', '--mesh', '1x8',
       '--batch', '64', '--height', '256', '--width', '128', '--out', str(out), '--json',
       '--expect-full-all-reduce'], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  report = json.loads(proc.stdout[proc.stdout.index('{'):])
  assert report['backend'] == 'cpu' and report['mesh'] == {'data': 1, 'fsdp': 8}
  assert report['split_params'] == 8  # the MLP kernels of 2 blocks, teacher and student
  assert len(report['full_size_weight_all_reduces']) == 8
  assert 'reduce-scatter' not in report['collectives']
  hlo = out.read_text()
  assert 'all-reduce(' in hlo and 'f32[64,1024]' in hlo
