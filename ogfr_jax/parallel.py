"""Device mesh, shardings and the host <-> global array plumbing.

One jitted program runs over a global mesh with axes ('data', 'fsdp'). Batches are sharded
over both axes (every device holds a slice of the global batch). Parameters are replicated,
except under FSDP where each large array is split along one dimension over 'fsdp'.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
# Arrays smaller than this stay replicated under FSDP: splitting them saves nothing.
FSDP_MIN_SIZE = 2**16


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh; -1 on one axis takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if data == -1 and fsdp == -1:
    raise ValueError('config.mesh: at most one of data and fsdp may be -1')
  if data == -1:
    data = n // fsdp if fsdp > 0 else 0
  if fsdp == -1:
    fsdp = n // data if data > 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != n:
    raise ValueError(
        f'config.mesh: data={mesh_config.data} x fsdp={mesh_config.fsdp} does not cover the '
        f'{n} available devices')
  grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
  return Mesh(grid, BATCH_AXES)


def batch_size_per_device_check(global_batch: int, mesh: Mesh, what: str) -> None:
  if global_batch % mesh.size:
    raise ValueError(
        f'{what}={global_batch} is not divisible by the {mesh.size} devices of the mesh '
        f'{dict(mesh.shape)}; choose a multiple of {mesh.size}')
  if global_batch % jax.process_count():
    raise ValueError(
        f'{what}={global_batch} is not divisible by the {jax.process_count()} processes')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """Splits the largest dimension that the fsdp axis divides; small arrays stay whole."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """Shardings for a pytree of ShapeDtypeStructs (params, optimizer state, ...)."""
  fsdp_size = mesh.shape['fsdp']

  def one(leaf):
    shape = tuple(getattr(leaf, 'shape', ()))
    return NamedSharding(mesh, _fsdp_spec(shape, fsdp_size))

  return jax.tree_util.tree_map(one, abstract_state)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-process numpy batches into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def fetch(tree: Any) -> Any:
  """Brings (possibly sharded, multi-process) arrays to host numpy on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
  return multihost_utils.process_allgather(tree, tiled=True)


def dtype_from_name(name: str):
  try:
    return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[name]
  except KeyError:
    raise ValueError(f'config.model.dtype={name!r}: use float32 or bfloat16') from None
