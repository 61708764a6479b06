"""Multi-host start-up, the device mesh, shardings and the host <-> global array plumbing.

One jitted program runs over a global mesh with axes ('data', 'fsdp') that spans every device
of every process (JAX's multi-controller runtime: each process runs the same program and feeds
its own devices). Batches are sharded over both axes, so every device holds a slice of the
global batch and batch statistics (BNNeck, triplet mining, the agent's baseline) are computed
over the whole global batch by XLA's collectives. Parameters and optimizer state are
replicated over 'data'; under FSDP each large array is split along one dimension over 'fsdp'
and gathered by XLA where a layer needs it.

Why no tensor-parallel ('model') axis: the largest recipe, ViT-L teacher + student with SGD
momentum, is about 0.6 G parameters (7.3 GB in float32 with gradients and momentum), which FSDP
over 8 chips brings below 1 GB per chip, and a ViT-L layer's activations at one 211-token image
per chip are about 10 MB. Tensor parallelism would only pay once a chip holds less than one image
of the global batch, and then the global batch (P x K) is the thing to grow.

Device layout: `make_mesh` follows the topology (`device_grid`: jax's mesh_utils, the TPU
torus; a hybrid mesh with the data axis over the data-centre network when there are several
slices). Row layout: the input pipeline gives process p the rows [p * b, (p + 1) * b) of the
global batch, and `global_batch` puts them on process p's own devices. On a process-major mesh
(CPU, GPU, single-host and one-slice-per-host layouts) the global array is then the pipeline's
global batch whatever the device count (tests/test_scaling.py); the values still differ
across layouts by float rounding, which grows over training (see WORKSPACE.md).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')
# Arrays smaller than this (in elements) stay replicated under FSDP: splitting them saves
# little memory and costs a collective each. Tests lower it to shard tiny models.
FSDP_MIN_SIZE = 2**16
DISTRIBUTED_MODES = ('auto', 'on', 'off')


# --------------------------------------------------------------------------------------------
# Multi-host start-up


def detect_cluster() -> str | None:
  """Names the multi-process environment this process runs in, or None for a plain machine.

  'tpu': a Cloud TPU VM (libtpu installed and TPU chips attached) or a GKE TPU pod;
  'slurm': a SLURM job step with more than one task; 'env': JAX_COORDINATOR_ADDRESS is set.
  In each case `jax.distributed.initialize()` can find the coordinator, the process count and
  this process's id by itself. A single-task SLURM step is not a cluster: initialising there
  would pin the process to one GPU (jax maps SLURM_LOCALID to a device).
  """
  if os.environ.get('TPU_WORKER_HOSTNAMES') or (
      importlib.util.find_spec('libtpu') is not None
      and (glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'))):
    return 'tpu'
  if ('SLURM_JOB_ID' in os.environ and 'SLURM_STEP_NODELIST' in os.environ
      and int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1):
    return 'slurm'
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'env'
  return None


def parse_device_ids(text: str | Sequence[str] | Sequence[int] | None) -> list[int] | None:
  """'0,1,2' or ['0', '1'] -> [0, 1, 2]; None or empty -> None."""
  if text is None:
    return None
  items = text.split(',') if isinstance(text, str) else list(text)
  items = [str(i).strip() for i in items if str(i).strip()]
  if not items:
    return None
  try:
    ids = [int(i) for i in items]
  except ValueError:
    raise ValueError(f'--local_device_ids={text!r}: expected comma-separated integers') from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise ValueError(f'--local_device_ids={text!r}: ids must be distinct and >= 0')
  return ids


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None, *,
                           mode: str = 'auto', timeout_s: int = 300) -> bool:
  """Starts JAX's multi-controller runtime when this is one process of several.

  Must run before any other JAX call (device queries included). Explicit arguments win; all
  three of coordinator_address, num_processes and process_id go together. Without them,
  mode 'auto' calls `jax.distributed.initialize()` with no arguments when `detect_cluster`
  finds a TPU VM/pod, a multi-task SLURM step or JAX_COORDINATOR_ADDRESS, and does nothing
  on a plain machine; 'on' always calls it (any cluster jax can detect, e.g. Open MPI);
  'off' never does. CPU processes exchange data through gloo collectives.

  Returns True when the runtime was started.
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f'--distributed={mode!r}: must be one of {DISTRIBUTED_MODES}')
  explicit = {'--coordinator_address': coordinator_address, '--num_processes': num_processes,
              '--process_id': process_id}
  given = [k for k, v in explicit.items() if v is not None]
  if given and mode == 'off':
    raise ValueError(f'{", ".join(given)} given with --distributed=off')
  if given and len(given) != len(explicit):
    missing = [k for k in explicit if k not in given]
    raise ValueError(f'{", ".join(given)} given without {", ".join(missing)}: a multi-process '
                     'start needs all three (or none, to detect them from the environment)')
  if given:
    if int(num_processes) < 1:
      raise ValueError(f'--num_processes={num_processes} must be >= 1')
    if not 0 <= int(process_id) < int(num_processes):
      raise ValueError(f'--process_id={process_id} must be in [0, --num_processes='
                       f'{num_processes})')
    if ':' not in coordinator_address:
      raise ValueError(f'--coordinator_address={coordinator_address!r}: expected HOST:PORT')
  cluster = detect_cluster()
  if not given and (mode == 'off' or (mode == 'auto' and cluster is None)):
    if local_device_ids:
      raise ValueError('--local_device_ids only applies to a multi-process start')
    return False
  # gloo is what CPU processes use to run collectives with each other; the TPU and GPU
  # backends ignore it. Setting it must precede backend creation.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs: dict[str, Any] = {'initialization_timeout': int(timeout_s)}
  if given:
    kwargs.update(coordinator_address=coordinator_address, num_processes=int(num_processes),
                  process_id=int(process_id))
  if local_device_ids:
    kwargs['local_device_ids'] = list(local_device_ids)
  if cluster == 'slurm' and not local_device_ids and _slurm_tasks_per_node() == 1:
    logging.warning('SLURM runs one task per node: jax will use only device SLURM_LOCALID=0 '
                    'of each node unless --local_device_ids lists them all (e.g. 0,1,...,7)')
  jax.distributed.initialize(**kwargs)
  logging.info('multi-process runtime: process %d of %d (%s), %d local devices of %d',
               jax.process_index(), jax.process_count(), 'flags' if given else cluster,
               jax.local_device_count(), jax.device_count())
  return True


def sync_processes(name: str) -> None:
  """Returns once every process of the run has called it with the same `name` (a barrier:
  multihost_utils.sync_global_devices); a no-op in a single process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _slurm_tasks_per_node() -> int | None:
  text = os.environ.get('SLURM_NTASKS_PER_NODE') or os.environ.get('SLURM_TASKS_PER_NODE', '')
  head = text.split('(')[0].split(',')[0]
  return int(head) if head.isdigit() else None


# --------------------------------------------------------------------------------------------
# Mesh


def process_major(devices: Sequence[Any]) -> list[Any]:
  """Devices grouped by process in process order, each group in the order given.

  Within a host the given order (jax.devices(): by id) follows the chips' physical layout, so
  an 'fsdp' group no larger than a host stays on neighbouring chips.
  """
  return sorted(devices, key=lambda d: d.process_index)


def num_slices(devices: Sequence[Any]) -> int:
  """Slices (TPU pods joined over the data-centre network) among `devices`; 1 elsewhere."""
  return len({int(getattr(d, 'slice_index', 0) or 0) for d in devices})


def mesh_shape(mesh_config: Any, n: int) -> tuple[int, int]:
  """(data, fsdp) of config.mesh for n devices; -1 on one axis takes the remaining ones."""
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
  return data, fsdp


def device_grid(devices: Sequence[Any], data: int, fsdp: int) -> np.ndarray:
  """The [data, fsdp] array of devices: the layout of the mesh.

  One slice: `mesh_utils.create_device_mesh`, which on TPU follows the chips' torus (an
  'fsdp' ring of physical neighbours; physical axes may be split to fit the shape), on GPU
  orders by device id and elsewhere keeps the given (process-major) order. Several slices
  (devices carry different `slice_index`): `create_hybrid_device_mesh` with the 'data' axis
  split as (slices over the data-centre network) x (data // slices inside each slice), and
  'fsdp' inside a slice, so that only the gradient all-reduce of data parallelism crosses
  the slower network; 'fsdp' spanning slices is refused. Where the torus order puts a
  process's devices apart, `global_batch` still places that process's rows on them.
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  devices = process_major(devices)
  slices = num_slices(devices)
  if slices > 1:
    per_slice = len(devices) // slices
    if data % slices or len(devices) % slices:
      raise ValueError(
          f'config.mesh: data={data} x fsdp={fsdp} over {slices} slices of {per_slice} '
          f'devices: the data axis goes over the slices, so data must be a multiple of '
          f'{slices} (fsdp at most {per_slice}, inside a slice)')
    return mesh_utils.create_hybrid_device_mesh(
        (data // slices, fsdp), (slices, 1), devices, allow_split_physical_axes=True)
  try:
    return mesh_utils.create_device_mesh((data, fsdp), devices,
                                         allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    # A shape the torus cannot hold as rings: plain order (slower collectives, same results).
    logging.warning('mesh %dx%d does not follow the device topology (%s); using the '
                    'process-major device order', data, fsdp, e)
    return np.asarray(devices, dtype=object).reshape(data, fsdp)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh over `devices` (default: all), topology-aware."""
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = mesh_shape(mesh_config, len(devices))
  return Mesh(device_grid(devices, data, fsdp), MESH_AXES)


def batch_size_per_device_check(global_batch: int, mesh: Mesh, what: str) -> None:
  """Global batch sizes must split evenly over the devices and over the processes."""
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


# --------------------------------------------------------------------------------------------
# Parameter and optimizer-state sharding


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """Splits the largest dimension that the fsdp axis divides; small arrays stay whole.

  For ViT-B/L this splits every qkv/proj/fc kernel and the classifier along their widest
  dimension, the patch-embedding kernel along its output channels and the position
  embedding along its width; LayerNorm/BNNeck vectors and biases stay replicated.
  The same rule applied to optimizer state (momentum, Adam moments: same shapes as the
  parameters) shards it the same way.
  """
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
    return NamedSharding(mesh, fsdp_spec(shape, fsdp_size))

  return jax.tree_util.tree_map(one, abstract_state)


def sharding_summary(abstract_state: Any, shardings: Any) -> dict[str, float]:
  """How much of a state the shardings split: counts, bytes, and the per-device share.

  `per_device_bytes` is what one device stores of the whole tree; with FSDP over n devices
  it approaches total_bytes / n as the split arrays dominate.
  """
  leaves = jax.tree_util.tree_leaves(abstract_state)
  specs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  total = split = per_device = 0
  num_split = 0
  for leaf, sharding in zip(leaves, specs, strict=True):
    nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    shard = sharding.shard_shape(tuple(leaf.shape))
    shard_bytes = int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    total += nbytes
    per_device += shard_bytes
    if shard_bytes < nbytes:
      num_split += 1
      split += nbytes
  return {'num_arrays': len(leaves), 'num_split': num_split, 'total_bytes': total,
          'split_bytes': split, 'per_device_bytes': per_device}


def _spec_text(sharding: NamedSharding) -> str:
  parts = [repr(a) if isinstance(a, str) else 'None' if a is None else repr(tuple(a))
           for a in sharding.spec]
  return f'P({", ".join(parts)})'


def describe_layout(abstract_state: Any, shardings: Any, mesh: Mesh, *,
                    num_largest: int = 5) -> dict[str, Any]:
  """What FSDP does with a train state on `mesh`, as plain JSON (run manifest, header).

  'mesh': axis sizes, devices, processes, slices, device kind and whether the global batch
  is the pipeline's rows in order; 'params', 'optimizer' (opt_state) and 'total' (the whole
  state): array and split counts, total bytes and the bytes one device stores; 'largest':
  the `num_largest` biggest parameters with their shape, partition spec and per-device
  shape.
  """
  devices = list(mesh.devices.reshape(-1))

  def part(name):
    tree = getattr(abstract_state, name, None) if name else abstract_state
    shard_tree = getattr(shardings, name, None) if name else shardings
    if tree is None:
      return {'num_arrays': 0, 'num_split': 0, 'total_bytes': 0, 'split_bytes': 0,
              'per_device_bytes': 0}
    return {k: int(v) for k, v in sharding_summary(tree, shard_tree).items()}

  # The largest parameters (optimizer state mirrors their shapes and shardings).
  big = getattr(abstract_state, 'params', None)
  big_shardings = getattr(shardings, 'params', None) if big is not None else shardings
  leaves = jax.tree_util.tree_flatten_with_path(abstract_state if big is None else big)[0]
  specs = jax.tree_util.tree_leaves(big_shardings,
                                    is_leaf=lambda x: isinstance(x, NamedSharding))
  rows = []
  for (path, leaf), sharding in zip(leaves, specs, strict=True):
    shape = tuple(int(d) for d in leaf.shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    rows.append((nbytes, jax.tree_util.keystr(path, simple=True, separator='/'), shape,
                 str(leaf.dtype), sharding))
  rows.sort(key=lambda r: (-r[0], r[1]))
  return {
      'mesh': {'shape': {k: int(v) for k, v in mesh.shape.items()}, 'devices': len(devices),
               'processes': len({d.process_index for d in devices}),
               'slices': num_slices(devices), 'device_kind': devices[0].device_kind,
               'pipeline_order': pipeline_order(mesh)},
      'params': part('params'), 'optimizer': part('opt_state'), 'total': part(None),
      'largest': [{'name': name, 'shape': list(shape), 'dtype': dtype, 'bytes': nbytes,
                   'spec': _spec_text(sharding),
                   'per_device_shape': list(sharding.shard_shape(shape))}
                  for nbytes, name, shape, dtype, sharding in rows[:num_largest]],
  }


def _mib(n: int) -> str:
  return f'{n / 2**20:,.1f} MiB'


def layout_lines(layout: dict[str, Any]) -> list[str]:
  """`describe_layout` as a few console lines."""
  m = layout['mesh']
  axes = ' x '.join(f'{k}={v}' for k, v in m['shape'].items())
  lines = [f'layout: mesh {axes} over {m["devices"]} {m["device_kind"]} devices, '
           f'{m["processes"]} process(es), {m["slices"]} slice(s)']
  for key, label in (('params', 'parameters'), ('optimizer', 'optimizer state')):
    p = layout[key]
    lines.append(f'  {label}: {_mib(p["per_device_bytes"])} per device of '
                 f'{_mib(p["total_bytes"])} ({p["num_split"]} of {p["num_arrays"]} arrays '
                 f'split)')
  for a in layout['largest']:
    lines.append(f'  {a["name"]} {tuple(a["shape"])} {a["spec"]} -> '
                 f'{tuple(a["per_device_shape"])} per device')
  return lines


# --------------------------------------------------------------------------------------------
# Host <-> global arrays


def row_block(device_processes: Sequence[int], process_index: int) -> tuple[int, int]:
  """(block index, block count) of one process's devices along the flattened batch axes.

  `device_processes` is the process index of each device in batch order. Raises when the
  process's devices are not one contiguous, aligned run, since its pipeline rows would then
  be scattered over the global batch.
  """
  mine = [i for i, p in enumerate(device_processes) if p == process_index]
  n = len(mine)
  if (n == 0 or mine != list(range(mine[0], mine[0] + n)) or mine[0] % n
      or len(device_processes) % n):
    raise ValueError(
        f'the mesh does not give process {process_index} a contiguous block of the batch '
        'axes; build it with parallel.make_mesh')
  return mine[0] // n, len(device_processes) // n


def pipeline_order(mesh: Mesh) -> bool:
  """Whether the global batch is the pipeline's rows in order (process p's rows at
  [p * b, (p + 1) * b)): each process's devices form one aligned block of the batch axes."""
  processes = [d.process_index for d in mesh.devices.reshape(-1)]
  try:
    return all(row_block(processes, p) == (i, len(set(processes)))
               for i, p in enumerate(sorted(set(processes))))
  except ValueError:
    return False


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-process numpy batches into global arrays sharded over the batch axes.

  Each process's rows go to its own devices, in the mesh's order. With a process-major mesh
  (`pipeline_order`: CPU, GPU, one host, or one slice per host) process p's rows become rows
  [p * b, (p + 1) * b) of the global arrays; where a TPU torus order interleaves the hosts'
  chips, the global batch is a permutation of those rows, which the step's losses and batch
  statistics do not depend on (up to float rounding) and evaluation undoes through `index`.
  """
  sharding = batch_sharding(mesh)
  mine = sum(d.process_index == jax.process_index() for d in mesh.devices.reshape(-1))
  if mine * jax.process_count() != mesh.size:
    raise ValueError(
        f'process {jax.process_index()} drives {mine} of the {mesh.size} devices of the mesh; '
        'every process must drive the same number')
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    if v.ndim == 0 or v.shape[0] % mine:
      raise ValueError(
          f'batch[{k!r}] has {v.shape[0] if v.ndim else "no"} rows on process '
          f'{jax.process_index()}; each process needs a multiple of its {mine} devices')
    out[k] = jax.make_array_from_process_local_data(
        sharding, v, (v.shape[0] * jax.process_count(),) + v.shape[1:])
  return out


def _to_host(x: Any) -> np.ndarray:
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  # Split over devices of other processes: gather it (XLA all-gather) to every process.
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def fetch(tree: Any) -> Any:
  """The full value of every array in `tree` as host numpy, on every process.

  Arrays local to this process are copied; arrays replicated over the mesh are read from a
  local copy; arrays split over several processes are all-gathered first (every process must
  call this with the same tree). Host values pass through unchanged.
  """
  return jax.tree_util.tree_map(_to_host, tree)


def dtype_from_name(name: str):
  try:
    return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[name]
  except KeyError:
    raise ValueError(f'config.model.dtype={name!r}: use float32 or bfloat16') from None
