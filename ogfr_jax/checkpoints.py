"""Orbax checkpoints: one checkpoint per saved step holds the train state and the input
iterator's state, so that a run resumes exactly where it stopped.

Crash safety. Orbax writes step N into `N.orbax-checkpoint-tmp/` and renames it to `N/` only
once every item is complete, so a step that was being written when the process died (SIGKILL,
power loss, preemption without notice) is never listed as a step, and `make_manager` deletes
such leftovers. The latest complete step is what a run resumes from. (On object stores without
atomic rename orbax marks completion with a commit file instead; the same holds.)

Restoring checks the saved shapes against the model of the current config first, so a
checkpoint from another model size, dataset or set of heads fails with the list of arrays that
differ and the workdir that holds them, instead of an error deep inside orbax.

Integrity. Each step also holds an 'integrity' item: a checksum of every array of the state
(`state_checksums`, computed on the devices, independent of the sharding), a digest of the
input state, and the identity of the run (`run_identity`: the config without its resumable
fields, and the training data). On restore the identity is compared first, whatever
config.json says (`CheckpointMismatch`: never used, never moved), then the restored arrays
against their checksums. A step that cannot be read or restored or fails its checksums is
`DamagedCheckpoint`; `restore_newest` moves it to `corrupt-<step>` beside the steps (kept
for inspection, never deleted, with a warning: the run goes on) and tries the step before
it, or refuses under config.train.damaged_checkpoint='refuse'. Steps written before the
integrity item existed restore with a warning naming what is not verified, or are refused
under 'refuse' (`UnverifiedCheckpoint`).

Writes. A write that fails (disk full, permissions, I/O) is raised once, as
`CheckpointWriteError` (an OSError) naming the step, the folder, the space it needs, and the
last good checkpoint, which stays where it is; in one process as soon as the write has ended
(`Manager.check_writes`, called by the train loop at every step). Orbax's own error records
of it, and the 'Event loop is closed' tracebacks of the writes it leaves pending, are kept off
the default console (`_quiet_orbax_failures`; shown with --verbosity=0).

A manager made with writable=False (what a run checks and restores with before it is allowed
to write) creates no folder and removes no unfinished step.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging as std_logging
import os
import shutil
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ogfr_jax import paths

# At most this many differing arrays are listed in a mismatch error (then a count).
_LISTED_MISMATCHES = 8
# Characters of an underlying storage error quoted in ours (tensorstore's run to pages).
_QUOTED_ERROR = 300
# Version of the 'integrity' item of a step (checksums and run identity).
INTEGRITY_FORMAT = 1


class Manager(ocp.CheckpointManager):
  """An orbax CheckpointManager that knows the run it belongs to.

  `identity` (see `run_identity`) is written into every checkpoint and compared on restore;
  `damaged` is config.train.damaged_checkpoint. A failed write (disk full, permissions, an
  I/O error) surfaces once, as `CheckpointWriteError` naming the step, the folder and the
  last good checkpoint, from `save` or `wait_until_finished`, whichever comes first.
  """

  identity: dict | None = None
  damaged: str = 'fall_back'
  _pending: tuple[int, int] | None = None  # (step, bytes) of the write in flight
  _free_before: int | None = None  # bytes free on the disk when that write started
  _reported: bool = False

  def check_writes(self) -> None:
    """Raises the CheckpointWriteError of a write that has failed since the last save, as
    soon as it has ended, without waiting for one in flight (the train loop calls it at
    every step: a run never goes on training past a checkpoint that could not be written).

    In one process only: with several, wait_until_finished of one process alone could meet
    the others in a barrier while they run a step, so there the failure surfaces at the next
    save, on every process.
    """
    if self._pending is None or self._reported or jax.process_count() > 1:
      return
    if not self.is_saving_in_progress():
      self.wait_until_finished()  # returns at once, raising the failure if there was one
      self._pending = None

  def wait_until_finished(self):
    try:
      super().wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if self._reported:
        return  # already raised to the caller; the run is ending
      self._reported = True
      step, nbytes = self._pending or (None, 0)
      raise write_error(self, step, nbytes, e, free_before=self._free_before) from e

  def close(self):
    try:
      self.wait_until_finished()
    finally:
      self._reported = True  # close the rest even after a failed write
      super().close()


def make_manager(workdir: str, *, max_to_keep: int = 2, async_save: bool = True,
                 config: Any = None, train_split: Any = None, writable: bool = True
                 ) -> Manager:
  """The manager of WORKDIR/checkpoints; removes unfinished steps left by a killed run.

  With `config` (and the `train_split` of the run), checkpoints carry the run's identity and
  restoring checks it (`run_identity`); `config.train.damaged_checkpoint` decides what a
  damaged checkpoint does at resume (`restore_newest`). writable=False: a manager to check and
  restore with, which creates nothing and removes no unfinished step (a run that is then
  refused leaves the folder as it was).
  """
  _quiet_orbax_failures()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=writable, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=writable)
  # Named handlers (rather than item names) let `restore` read the saved shapes before it
  # restores anything.
  manager = Manager(
      paths.join(paths.resolve(workdir, '--workdir'), 'checkpoints'), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': ocp.JsonCheckpointHandler(),
                     'integrity': ocp.JsonCheckpointHandler()})
  if config is not None:
    manager.identity = run_identity(config, train_split)
    manager.damaged = str(config.train.damaged_checkpoint)
  return manager


class _OrbaxErrors(std_logging.Filter):
  """Keeps orbax's own error records (each with a traceback, several per failed write) and
  asyncio's reports of the failed writes of its futures that nobody awaited any more off the
  default console: a failed write is reported once, as CheckpointWriteError, and a damaged
  step as DamagedCheckpoint. They come back with --verbosity=0 (absl INFO)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR or logging.get_verbosity() >= logging.INFO:
      return True
    if record.name == 'asyncio':
      return not str(record.msg).startswith(('Future exception was never retrieved',
                                             'Task exception was never retrieved'))
    return f'{os.sep}orbax{os.sep}' not in (record.pathname or '')


def _is_closed_loop(kind, value) -> bool:
  """'Event loop is closed' raised outside the main thread: a callback of a write still
  pending in tensorstore when a failed save closed its event loop (one traceback each,
  hundreds on a full disk)."""
  return (kind is not None and issubclass(kind, RuntimeError)
          and str(value) == 'Event loop is closed'
          and threading.current_thread() is not threading.main_thread())


def _closed_loop_excepthook(previous):
  def hook(kind, value, tb):
    if not _is_closed_loop(kind, value):
      previous(kind, value, tb)
  hook.ogfr_closed_loop = True
  return hook


def _closed_loop_unraisablehook(previous):
  def hook(unraisable):
    if not _is_closed_loop(unraisable.exc_type, unraisable.exc_value):
      previous(unraisable)
  hook.ogfr_closed_loop = True
  return hook


def _quiet_orbax_failures() -> None:
  """Installs `_OrbaxErrors`, and hooks that drop `_is_closed_loop` errors, once per process."""
  for name in ('absl', 'asyncio'):
    logger = std_logging.getLogger(name)
    if not any(isinstance(f, _OrbaxErrors) for f in logger.filters):
      logger.addFilter(_OrbaxErrors())
  if not getattr(sys.excepthook, 'ogfr_closed_loop', False):
    sys.excepthook = _closed_loop_excepthook(sys.excepthook)
  if not getattr(sys.unraisablehook, 'ogfr_closed_loop', False):
    sys.unraisablehook = _closed_loop_unraisablehook(sys.unraisablehook)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         *, force: bool = False) -> bool:
  """Writes (state, input state) of `step` with their checksums and the run's identity.

  The checksums are computed on the devices before the (asynchronous) write starts: one pass
  over the state and a host sync (see `state_checksums`).
  """
  if isinstance(manager, Manager):
    manager.wait_until_finished()  # the error of the previous write belongs to that step
  integrity = {'format': INTEGRITY_FORMAT, 'state': state_checksums(state),
               'data': _json_digest(data_state),
               'run': getattr(manager, 'identity', None) or {}}
  nbytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(state) if hasattr(x, 'shape')
               and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended))
  if isinstance(manager, Manager):
    manager._pending = (int(step), nbytes)  # pylint: disable=protected-access
    manager._free_before = _free_bytes(str(manager.directory))  # pylint: disable=protected-access
  try:
    return manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state),
                                      integrity=ocp.args.JsonSave(integrity)), force=force)
  except CheckpointWriteError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise write_error(manager, int(step), nbytes, e,
                      free_before=getattr(manager, '_free_before', None)) from e


# --------------------------------------------------------------------------------------------
# Errors


class CheckpointMismatch(ValueError):
  """A readable checkpoint of another model, config or dataset: never used, never moved."""


class DamagedCheckpoint(ValueError):
  """A checkpoint that cannot be read or restored, or whose contents fail their checksums."""

  def __init__(self, folder: str, step: int, reason: str):
    super().__init__(f'checkpoint {folder} (step {step}) is damaged: {reason}')
    self.folder, self.step, self.reason = folder, int(step), reason


class UnverifiedCheckpoint(ValueError):
  """A checkpoint without its integrity record, refused under damaged_checkpoint='refuse'."""


# What a checkpoint without its 'integrity' item (written before checksums existed, or with
# the item removed) leaves unchecked.
_UNVERIFIED = ('no integrity record (written before checksums existed, or its integrity '
               'folder was removed): its arrays are not checked against checksums, nor its '
               'input state, nor the config and training data it was written with against '
               'this run\'s')


class CheckpointWriteError(OSError):
  """Writing a checkpoint failed (e.g. no space left); names the step and the last good one."""


def _errno_in_chain(e: BaseException) -> int | None:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e.errno
    if 'No space left on device' in str(e):
      return errno.ENOSPC
    e = e.__cause__ or e.__context__
  return None


def _finished_steps(directory: str) -> list[int]:
  try:
    return sorted(int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit())
  except OSError:
    return []


def _megabytes(n: float) -> str:
  return f'{n / 2**20:.1f} MB'


def _free_bytes(directory: str) -> int | None:
  """Free bytes on the local disk holding `directory` (None: unknown, e.g. an object store)."""
  try:
    return shutil.disk_usage(directory).free
  except OSError:
    return None


def write_error(manager: Any, step: int | None, nbytes: int, e: BaseException, *,
                free_before: int | None = None) -> CheckpointWriteError:
  """One message for a failed checkpoint write: what, where, why, and what is kept.

  free_before: the free bytes when the write started (what it wrote before failing has
  filled the disk since); else the free bytes now.
  """
  directory = str(manager.directory)
  folder = f'{directory}/{step}' if step is not None else directory
  good = [s for s in _finished_steps(directory) if s != step]
  kept = (f'the last good checkpoint, step {good[-1]}, is kept in {directory}' if good else
          f'no earlier checkpoint exists in {directory}')
  code = _errno_in_chain(e)
  if code == errno.ENOSPC:
    if free_before is not None:
      free = f', {_megabytes(free_before)} free when it started'
    else:
      now = _free_bytes(directory)
      free = f', {_megabytes(now)} free there' if now is not None else ''
    need = f' (it needs about {_megabytes(nbytes)}{free})' if nbytes else ''
    message = (f'no space left on device writing the checkpoint of step {step} to '
               f'{folder}{need}; {kept}. Free space and run the same command to resume.')
  else:
    message = (f'writing the checkpoint of step {step} to {folder} failed ({_quote(e)}); '
               f'{kept}. Run the same command to resume from it.')
  error = CheckpointWriteError(message)  # str() is the message alone
  error.errno = code or errno.EIO
  return error


# --------------------------------------------------------------------------------------------
# Integrity: checksums and the run's identity


def _key_path(path: Any) -> str:
  return '/'.join(_key_name(k) for k in path)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser (every input bit affects every output bit)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words, element by element (8-byte types: a trailing 2)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = np.dtype(x.dtype).itemsize
  if size in (4, 8):
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
  """Row-major element index (mod 2**32) of every element, built without a reshape, so a
  sharded array is never gathered."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
    stride *= shape[d]
  return index


def _checksum(x: jax.Array) -> jax.Array:
  """Two uint32 sums over the elements: of word * (2 i + 1) and of a mix of (word, i).

  Modular sums do not depend on the order of reduction, so the value is the same for any
  sharding or device count. A change of any single bit changes the first sum (2^k times an
  odd number is never 0 mod 2^32); other changes slip through both only by chance (~2^-64).
  """
  w = _words(x)
  i = _positions(w.shape)
  a = jnp.sum(w * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  b = jnp.sum(_fmix32(w ^ _fmix32(i + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
  return jnp.stack([a, b])


# One program per (shape, dtype, sharding), dispatched leaf by leaf: a state repeats a few
# dozen shapes (blocks, optimizer moments), and one program over the whole tree took
# minutes to compile for ViT-B on CPU.
_checksum_jit = jax.jit(_checksum)


def _np_fmix32(h: np.ndarray) -> np.ndarray:
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def _np_words(x: np.ndarray) -> np.ndarray:
  """numpy twin of `_words` (uint32 words, a trailing 2 for 8-byte types)."""
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  size = x.dtype.itemsize
  if size == 4:
    return np.ascontiguousarray(x).view(np.uint32)
  if size == 8:
    return np.ascontiguousarray(x).view(np.uint32).reshape(x.shape + (2,))
  return np.ascontiguousarray(x).view({1: np.uint8, 2: np.uint16}[size]).astype(np.uint32)


def _local_partial_sums(x: jax.Array) -> np.ndarray:
  """The two sums of `_checksum` over the elements of `x` held by this process (each element
  counted by the one shard with replica_id 0), with their global positions: the sums are
  modular, so the processes' partial sums add up to the whole array's."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
    x = jax.random.key_data(x)
  total = np.zeros(2, np.uint32)
  for shard in x.addressable_shards:
    if shard.replica_id != 0:
      continue
    w = _np_words(np.asarray(shard.data))
    full = tuple(x.shape) + w.shape[x.ndim:]
    starts = [sl.indices(n)[0] for sl, n in zip(shard.index, x.shape)] + [0] * (w.ndim - x.ndim)
    index = np.zeros(w.shape, np.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
      axis = (np.arange(w.shape[d], dtype=np.uint64) + starts[d]) * (stride % 2**32)
      shape = [1] * w.ndim
      shape[d] = w.shape[d]
      index = index + (axis % 2**32).astype(np.uint32).reshape(shape)
      stride *= full[d]
    sums = np.array([np.sum(w * (index * np.uint32(2) + np.uint32(1)), dtype=np.uint32),
                     np.sum(_np_fmix32(w ^ _np_fmix32(index + np.uint32(0x9E3779B9))),
                            dtype=np.uint32)], np.uint32)
    total = total + sums  # array arithmetic: wraps mod 2**32 like the device sums
  return total


def _host_sums(leaves: dict[str, jax.Array]) -> dict[str, np.ndarray]:
  """`_checksum` of every leaf from the processes' host copies of their own shards, combined
  with one all-gather: no device collective per leaf."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  names = sorted(leaves)
  local = np.stack([_local_partial_sums(leaves[k]) for k in names]) if names else np.zeros(
      (0, 2), np.uint32)
  if jax.process_count() > 1:
    gathered = np.asarray(multihost_utils.process_allgather(local))
    local = np.sum(gathered.astype(np.uint32), axis=0, dtype=np.uint32)
  return dict(zip(names, local))


def state_checksums(state: Any, *, on_host: bool | None = None) -> dict[str, str]:
  """'path' -> 16 hex digits for every array leaf of `state`.

  In one process they are computed on the devices, leaf by leaf. With several processes
  (`on_host` None: decided by the process count) each process sums its own shards on the
  host and one all-gather adds the partial sums up: a device checksum of a leaf sharded
  over processes is a cross-process reduction, and hundreds of those at every save and
  restore are hundreds of chances for a slow process to miss the collective's deadline.
  Both ways give the same digits.
  """
  leaves = {_key_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(state)[0]
            if hasattr(v, 'shape')}
  if on_host is None:
    on_host = jax.process_count() > 1
  if on_host:
    leaves = {k: v if isinstance(v, jax.Array) else jnp.asarray(v) for k, v in leaves.items()}
    sums = _host_sums(leaves)
  else:
    # One leaf at a time, each finished before the next is dispatched: on XLA:CPU a sharded
    # checksum is a cross-device reduction, and many of them in flight beside another
    # program's collectives can leave the devices' rendezvous waiting on each other.
    sums = {k: jax.device_get(jax.block_until_ready(_checksum_jit(v)))
            for k, v in leaves.items()}
  return {k: f'{int(v[0]):08x}{int(v[1]):08x}' for k, v in sorted(sums.items())}


def _json_digest(value: Any) -> str:
  text = json.dumps(value, sort_keys=True, separators=(',', ':'), default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:32]


def run_identity(config: Any, train_split: Any = None) -> dict:
  """What a checkpoint must agree with to be resumed: the config (all fields but the
  resumable ones, run_config.RESUMABLE_FIELDS) and the training data (image and identity
  counts, a digest of the file names and labels, the synthetic generator's version)."""
  from ogfr_jax import run_config  # pylint: disable=g-import-not-at-top
  flat = run_config.flatten_config(json.loads(config.to_json_best_effort()))
  identity = {'config': {k: v for k, v in flat.items()
                         if k not in run_config.RESUMABLE_FIELDS}, 'data': {}}
  if train_split is not None:
    names = '\n'.join(f'{os.path.basename(str(p))} {int(i)} {int(c)}' for p, i, c in
                       zip(train_split.paths, train_split.pids, train_split.camids))
    identity['data'] = {'train_images': len(train_split.paths),
                        'train_ids': len(set(int(i) for i in train_split.pids)),
                        'train_files': hashlib.sha256(names.encode()).hexdigest()[:32]}
  if config.dataset.name == 'synthetic' or config.dataset.get('test_name') == 'synthetic':
    from ogfr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    identity['data']['generator_version'] = synthetic.GENERATOR_VERSION
  return json.loads(json.dumps(identity))


def identity_diff(saved: dict, current: dict) -> list[str]:
  lines = []
  for section in ('config', 'data'):
    a, b = saved.get(section, {}), current.get(section, {})
    for k in sorted(set(a) | set(b)):
      if a.get(k, '<absent>') != b.get(k, '<absent>'):
        name = k if section == 'config' else f'data.{k}'
        lines.append(f'{name}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}')
  return lines


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """'a/b/c' -> (shape, dtype name) for every array leaf of a pytree or of orbax metadata.

  Dataclass fields, dict keys and tuple indices all become plain path parts, so a TrainState
  and the nested dicts orbax records for it give the same paths.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, 'shape', None)
    if shape is None:
      continue
    dtype = getattr(leaf, 'dtype', None)
    out['/'.join(_key_name(k) for k in path)] = (tuple(shape), str(dtype))
  return out


def shape_mismatches(saved: dict, wanted: dict) -> list[str]:
  """Human-readable differences between two `flat_shapes` results (saved vs this config)."""
  lines = []
  # Parameters first: optimizer state and BN statistics only mirror them.
  for path in sorted(set(saved) | set(wanted), key=lambda p: (not p.startswith('params/'), p)):
    if path not in wanted:
      lines.append(f'{path}: in the checkpoint {saved[path][0]}, not in this model')
    elif path not in saved:
      lines.append(f'{path}: in this model {wanted[path][0]}, not in the checkpoint')
    elif saved[path][0] != wanted[path][0]:
      lines.append(f'{path}: checkpoint {saved[path][0]}, this config {wanted[path][0]}')
  return lines


def _describe(lines: list[str]) -> str:
  shown = lines[:_LISTED_MISMATCHES]
  more = len(lines) - len(shown)
  return '\n  '.join(shown) + (f'\n  ... and {more} more' if more else '')


def _quote(e: Exception) -> str:
  text = f'{type(e).__name__}: {e}'
  root, seen = e, {id(e)}
  while (root.__cause__ or root.__context__) is not None:
    root = root.__cause__ or root.__context__
    if id(root) in seen:
      break
    seen.add(id(root))
  if root is not e:  # the innermost error usually says what is wrong; it goes first
    text = f'{type(root).__name__}: {root} (raised as {text})'
  text = ' '.join(text.split())  # one line
  return text if len(text) <= _QUOTED_ERROR else text[:_QUOTED_ERROR] + ' ...'


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises CheckpointMismatch (a ValueError) naming the checkpoint folder and the arrays that
  differ, if any; DamagedCheckpoint when its metadata cannot be read."""
  folder = os.path.join(str(manager.directory), str(step))
  try:
    meta = manager.item_metadata(step)['state']
  except Exception as e:  # pylint: disable=broad-except
    raise DamagedCheckpoint(folder, step, f'its metadata cannot be read ({_quote(e)})'
                            ) from None
  meta = getattr(meta, 'tree', meta)
  if not meta:
    raise DamagedCheckpoint(folder, step, 'it holds no train state')
  lines = shape_mismatches(flat_shapes(meta), flat_shapes(abstract_state))
  if lines:
    workdir = os.path.dirname(str(manager.directory))
    raise CheckpointMismatch(
        f'the checkpoint in {workdir} (step {step}) does not match the model of this config '
        f'({len(lines)} arrays differ):\n  {_describe(lines)}\nThe dataset (number of '
        'identities or cameras) or the model config changed since it was written. '
        + _ways_out(manager, 'the model config and dataset it was written with'))


def _ways_out(manager: ocp.CheckpointManager,
              written_with: str = 'the values it was written with (on the left)') -> str:
  """The end of a refusal: what loses nothing first, then what --overwrite would delete."""
  from ogfr_jax import run_config  # pylint: disable=g-import-not-at-top
  workdir = os.path.dirname(str(manager.directory))
  return (f'To resume it, run the command with {written_with}; to run this config, use '
          f'another --workdir. Nothing was changed in {workdir}; '
          f'{run_config.overwrite_note(sorted(manager.all_steps()))}.')


def _read_integrity(manager: ocp.CheckpointManager, step: int, folder: str) -> dict | None:
  """The step's integrity record; None for a checkpoint written before records existed."""
  if not epath.Path(folder, 'integrity').exists():
    return None
  try:
    record = manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))
    record = dict(record['integrity'])
  except Exception as e:  # pylint: disable=broad-except
    raise DamagedCheckpoint(folder, step, f'its checksum record cannot be read ({_quote(e)})'
                            ) from None
  if not isinstance(record.get('state'), dict):
    raise DamagedCheckpoint(folder, step, 'its checksum record holds no array checksums')
  return record


def _check_identity(manager: ocp.CheckpointManager, step: int, record: dict) -> None:
  current, saved = getattr(manager, 'identity', None), record.get('run')
  if not current or not saved:  # written or read without a config (a library caller)
    return
  lines = identity_diff(saved, current)
  if lines:
    workdir = os.path.dirname(str(manager.directory))
    raise CheckpointMismatch(
        f'the checkpoint in {workdir} (step {step}) was written by a run of another config or '
        f'dataset; refusing to mix them ({len(lines)} difference{"s" * (len(lines) > 1)}):\n  '
        f'{_describe(lines)}\n' + _ways_out(manager))


def _verify(folder: str, step: int, record: dict, state: Any, data_state: dict) -> None:
  saved = record['state']
  now = state_checksums(state)
  bad = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if bad:
    raise DamagedCheckpoint(folder, step, f'{len(bad)} of {len(now)} arrays differ from their '
                            'checksums written with them: ' + ', '.join(bad[:_LISTED_MISMATCHES])
                            + (' ...' if len(bad) > _LISTED_MISMATCHES else ''))
  if record.get('data') != _json_digest(data_state):
    raise DamagedCheckpoint(folder, step, 'the input state differs from its checksum')


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
            ) -> tuple[Any, dict]:
  """Restores (state, data_state) at `step` into the shardings of `abstract_state`.

  Raises CheckpointMismatch for a checkpoint of another model, config or dataset, and
  DamagedCheckpoint for one that cannot be read or fails its checksums (both ValueError).
  """
  check_compatible(manager, step, abstract_state)
  folder = os.path.join(str(manager.directory), str(step))
  record = _read_integrity(manager, step, folder)
  if record is not None:
    _check_identity(manager, step, record)
  elif getattr(manager, 'damaged', 'fall_back') == 'refuse':
    raise UnverifiedCheckpoint(
        f'checkpoint {folder} (step {step}) has {_UNVERIFIED}; refused '
        'under config.train.damaged_checkpoint=refuse. Pass '
        '--config.train.damaged_checkpoint=fall_back to resume from it unverified')
  try:
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except
    # Orbax and tensorstore raise anything from ValueError to a bare Exception here.
    raise DamagedCheckpoint(folder, step, f'it cannot be restored ({_quote(e)})') from None
  state, data_state = restored['state'], dict(restored['data'])
  if record is None:
    logging.warning('checkpoint %s (step %d) has %s; resuming from it unverified '
                    '(config.train.damaged_checkpoint=refuse refuses such a checkpoint)',
                    folder, step, _UNVERIFIED)
  else:
    _verify(folder, step, record, state, data_state)
  return state, data_state


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves step `step` to checkpoints/corrupt-<step> (corrupt-<step>.2, ... if taken)."""
  directory = epath.Path(str(manager.directory))
  target = directory / f'corrupt-{step}'
  n = 1
  while target.exists():
    n += 1
    target = directory / f'corrupt-{step}.{n}'
  if jax.process_index() == 0:
    (directory / str(step)).rename(target)
  if jax.process_count() > 1:  # every process sees the move before it lists the steps again
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'checkpoints: step {step} set aside')
  manager.reload()  # forget the step, so that keeping max_to_keep never deletes it
  return str(target)


def restore_newest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[Any, dict | None, int]:
  """(state, input state, step) of the newest checkpoint that restores; (None, None, 0)
  when there is none.

  A damaged step is moved aside (`set_aside`, never deleted) and the one before it is tried,
  or, with manager.damaged == 'refuse' (config.train.damaged_checkpoint), the run stops with
  the reason. A checkpoint of another config or model is never skipped: CheckpointMismatch.
  """
  moved = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, data_state = restore(manager, step, abstract_state)
    except DamagedCheckpoint as e:
      if getattr(manager, 'damaged', 'fall_back') == 'refuse':
        raise DamagedCheckpoint(e.folder, e.step, e.reason + '. Move it away to resume from '
                                'the checkpoint before it, or set '
                                'config.train.damaged_checkpoint=fall_back') from None
      where = set_aside(manager, step)
      moved.append(f'{step} -> {where}')
      # The run goes on from an earlier step: a warning, not an error.
      logging.warning('%s; moved it to %s and trying the checkpoint before it', e, where)
      continue
    if moved:
      logging.warning('resuming from step %d: damaged checkpoints set aside: %s', step,
                      '; '.join(moved))
    return state, data_state, int(step)
  if moved:
    raise ValueError(f'no checkpoint in {manager.directory} restores; the damaged ones were '
                     f'set aside ({"; ".join(moved)}), so the same command now starts afresh')
  return None, None, 0
