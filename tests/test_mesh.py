"""The device layout of the mesh (parallel.device_grid) on fake devices: TPU torus order,
several slices joined over the data-centre network, and what it means for the batch rows."""

import dataclasses
import types

import numpy as np
import pytest

from ogfr_jax import parallel


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
