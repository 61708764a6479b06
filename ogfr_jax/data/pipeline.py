"""The grain input pipeline: P x K train batches with paired occluded views, and eval batches.

Train: one dataset element is one whole per-process batch, built from the global step number:
`MapDataset.range(step, ...).map(TrainBatchLoader)`. grain's workers each take every n-th
element, so worker parallelism is per batch and the P x K structure cannot be split across
workers (batching consecutive records inside workers would cut it). Everything random about a
row of a global batch is drawn from generators seeded with (seed, step, row), so a batch is
bitwise the same for any number of workers or processes, and the iterator state is just the
next global step: restoring it rebuilds the grain pipeline from that step, with any worker
count.

Eval: a fixed order; each process reads a contiguous share of the split in batches of
eval_batch_size / process_count, the last ones padded and flagged by `valid`, and every
process runs the same number of batches.

Donor occluders: the 'person' and 'crop' types paste a box of another row of the global
batch. Under config.input.donor_exchange='device' a process decodes only its own rows and
sends where each donor box goes (`row`, `donor_row`, `donor_box`); the train step pastes the
boxes from the global image array (data/donor_exchange.py). Under 'host' a process decodes and
augments again each donor row that another process owns. Every random number is drawn on the
host in the same order either way, so the pixels are bitwise the same.

Planted contamination: where a split's images lie in a synthetic benchmark folder, its side
file (`synthetic.contamination_masks`) gives each image's contamination mask, and train and
eval batches carry it as `contam_mask` (uint8 [b, H, W], 1 on planted pixels), resized,
flipped and shifted with the image (`augment.train_augment_pair`; random erasing replaces
pixel values and leaves the mask as it is); all zeros for images without contamination and
for datasets that record none.

Images leave the pipeline as uint8 pixels, train and eval alike: normalisation
((x / 255 - mean) / std) runs on the device inside the jitted train step and feature
extraction (`augment.normalize_on_device`), so host-to-device traffic is a quarter of float32
and the host does no float work per pixel.

Callables sent to workers are module-level classes (workers start with spawn).
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import sys
import threading
import time
from typing import Any, Iterator

from absl import flags
from absl import logging
import grain
from grain._src.python.ipc import shared_memory_array
import numpy as np

from ogfr_jax.data import augment
from ogfr_jax.data import donor_exchange
from ogfr_jax.data import image_io
from ogfr_jax.data import occlusion
from ogfr_jax.data import records
from ogfr_jax.data import sampler
from ogfr_jax.data import synthetic

# Independent random streams of one row of one step (seeded with [seed, step, row, stream]).
_AUGMENT_STREAM = 1
_OCCLUSION_STREAM = 2
_REPLACEMENT_STREAM = 3
# An infinite stream of steps, kept well inside int64 for grain's index bookkeeping.
_STEP_LIMIT = 2 ** 62
CORRUPT_IMAGE_POLICIES = ('fail', 'skip')
# Key of a loader batch with its warnings (corrupt files skipped); TrainIterator takes it out.
NOTES_KEY = '_notes'


def _row_rng(seed: int, step: int, row: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(step), int(row), stream])


def _per_process(total: int, process_count: int, what: str) -> int:
  if process_count < 1:
    raise ValueError(f'process_count must be >= 1, got {process_count}')
  if total % process_count:
    raise ValueError(f'{what} = {total} is not divisible by the number of processes '
                     f'({process_count}); each process must load an equal share')
  return total // process_count


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} out of range for {process_count} processes')


def steps_per_epoch(split: records.Split, config) -> int:
  """Training steps per epoch: config.train.steps_per_epoch if set, else the sampler's count."""
  configured = int(config.train.steps_per_epoch)
  if configured < 0:
    raise ValueError(f'config.train.steps_per_epoch must be >= 0, got {configured}')
  natural = sampler.steps_per_epoch(split.pids, config.input.ids_per_batch,
                                    config.input.images_per_id)
  return configured or natural


class TrainBatchLoader:
  """Builds this process's rows of the global P x K batch of a given global step.

  Epoch e of `epoch_length` steps takes its batches, in order, from the sampler draws
  epoch_batches(seed, d) for d = e * R, ..., e * R + R - 1, with R = ceil(epoch_length / draw
  length). Usually R = 1, so epoch e is draw e (cut short if config.train.steps_per_epoch asks
  for fewer steps); a configured epoch longer than one draw continues into the next draws.
  """

  def __init__(self, split: records.Split, *, P: int, K: int, seed: int, epoch_length: int,
               process_index: int, process_count: int, augment_spec: augment.AugmentSpec,
               occlusion_spec: occlusion.OcclusionSpec, corrupt_policy: str,
               contam: records.PixelMasks | None = None, donors_on_device: bool = False):
    if corrupt_policy not in CORRUPT_IMAGE_POLICIES:
      raise ValueError(f'config.input.corrupt_image_policy must be one of '
                       f'{CORRUPT_IMAGE_POLICIES}, got {corrupt_policy!r}')
    self.paths = split.paths
    self.pids = np.asarray(split.pids, np.int32)
    self.camids = np.asarray(split.camids, np.int32)
    self.P, self.K, self.seed = int(P), int(K), int(seed)
    self.global_batch = sampler.check_batch_shape(P, K)
    self.draw_length = sampler.steps_per_epoch(self.pids, P, K)
    self.epoch_length = int(epoch_length)
    self.draws_per_epoch = -(-self.epoch_length // self.draw_length)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.batch = _per_process(
        self.global_batch, process_count,
        'the global train batch config.input.ids_per_batch x config.input.images_per_id')
    self.augment_spec = augment_spec
    self.occlusion_spec = occlusion_spec
    self.corrupt_policy = corrupt_policy
    self.contam = contam
    self.donors_on_device = bool(donors_on_device)
    self._draw_cache: tuple[int, np.ndarray] | None = None
    self._members: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state['_draw_cache'] = None  # rebuilt on demand in each worker
    return state

  def global_indices(self, step: int) -> np.ndarray:
    """Split indices of the whole global batch of `step`, int64 [P * K]."""
    epoch, within = divmod(int(step), self.epoch_length)
    draw = epoch * self.draws_per_epoch + within // self.draw_length
    if self._draw_cache is None or self._draw_cache[0] != draw:
      self._draw_cache = (draw, sampler.epoch_batches(self.pids, self.P, self.K, self.seed,
                                                      draw))
    return self._draw_cache[1][within % self.draw_length]

  def _same_identity(self, index: int) -> np.ndarray:
    if self._members is None:
      order = np.argsort(self.pids, kind='stable')
      uniq = np.unique(self.pids)
      self._members = (order, uniq, np.searchsorted(self.pids[order], uniq))
    order, uniq, starts = self._members
    i = int(np.searchsorted(uniq, self.pids[index]))
    end = starts[i + 1] if i + 1 < uniq.size else order.size
    return order[starts[i]:end]

  def _decode(self, step: int, row: int, index: int) -> tuple[np.ndarray, int, int, list[str]]:
    """(uint8 image, index actually read, number of corrupt files skipped, their warnings).

    Only undecodable files fall under config.input.corrupt_image_policy; a missing file means
    the dataset folder changed under the run and always raises. The warnings travel with the
    batch and are logged when it is consumed (TrainIterator), so batches read ahead and never
    used warn about nothing and every warning is counted in num_skipped.
    """
    size = (self.augment_spec.height, self.augment_spec.width)
    try:
      return image_io.load_image(self.paths[index], size=size), index, 0, []
    except image_io.CorruptImageError as e:
      if self.corrupt_policy == 'fail':
        raise image_io.CorruptImageError(
            f'{e} (set config.input.corrupt_image_policy="skip" to replace corrupt training '
            'images by another image of the same identity)') from e
      notes = [f'skipping corrupt training image: {e}']
    # Replacement candidates in a random order that depends only on (seed, step, row), so a
    # skip is reproduced identically on resume and by any process that needs this row.
    rng = _row_rng(self.seed, step, row, _REPLACEMENT_STREAM)
    candidates = [int(i) for i in rng.permutation(self._same_identity(index)) if i != index]
    skipped = 1
    for candidate in candidates:
      try:
        return image_io.load_image(self.paths[candidate], size=size), candidate, skipped, notes
      except image_io.CorruptImageError as e:
        skipped += 1
        notes.append(f'skipping corrupt training image: {e}')
    raise image_io.CorruptImageError(
        f'all {skipped} images of identity {int(self.pids[index])} are corrupt, e.g. '
        f'{self.paths[index]}; nothing can replace them')

  def _row(self, step: int, row: int, index: int
           ) -> tuple[np.ndarray, int, int, np.ndarray | None, list[str]]:
    """(x, index read, corrupt files skipped, contamination mask of x or None, warnings)."""
    image, used, skipped, notes = self._decode(step, row, index)
    mask = None if self.contam is None else self.contam.mask(used)
    x, m = augment.train_augment_pair(image, mask, self.augment_spec,
                                      _row_rng(self.seed, step, row, _AUGMENT_STREAM))
    return x, used, skipped, m, notes

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    indices = self.global_indices(step)
    batch_pids = self.pids[indices]
    lo = self.process_index * self.batch
    rows = range(lo, lo + self.batch)
    # Holistic views by global row. With the donors pasted on the devices only this
    # process's rows are decoded; otherwise donor rows owned by another process are
    # recomputed here (same generators, hence the same pixels).
    views = {r: self._row(step, r, int(indices[r])) for r in rows}
    n, (H, W) = self.batch, (self.augment_spec.height, self.augment_spec.width)
    occluded = np.empty((n, H, W, 3), np.uint8)
    masks = np.empty((n, H, W), np.uint8)
    patterns = np.empty(n, np.int32)
    donors = donor_exchange.no_donors(np.arange(lo, lo + n))
    for i, r in enumerate(rows):
      rng = _row_rng(self.seed, step, r, _OCCLUSION_STREAM)
      plan = occlusion.plan_occlusion(self.occlusion_spec, batch_pids, r, rng)
      occ, masks[i], box = occlusion.draw_occlusion(views[r][0], plan, self.occlusion_spec,
                                                    rng)
      if box is not None and self.donors_on_device:
        donors['donor_row'][i], donors['donor_box'][i] = plan.donor, box.as_array()
      elif box is not None:
        if plan.donor not in views:
          views[plan.donor] = self._row(step, plan.donor, int(indices[plan.donor]))
        occ = occlusion.paste_donor(occ, views[plan.donor][0], box)
      occluded[i] = occ
      patterns[i] = plan.pattern
    clean = np.stack([views[r][0] for r in rows])
    used = np.array([views[r][1] for r in rows], np.int32)
    contam = np.zeros((n, H, W), np.uint8)
    for i, r in enumerate(rows):
      if views[r][3] is not None:
        contam[i] = views[r][3]
    out = {
        'image': clean,
        'occluded': occluded,
        'pattern': patterns,
        'occ_mask': masks,
        'contam_mask': contam,
        'pid': self.pids[used],
        'camid': self.camids[used],
        'index': used,
        'num_skipped': np.array([views[r][2] for r in rows], np.int32),
        # This process's rows only: donor rows of other processes are theirs to report.
        NOTES_KEY: [note for r in rows for note in views[r][4]],
    }
    if self.donors_on_device:
      out.update(donors)
    return out


# The side file of the planted contamination (written by data/synthetic.py).
CONTAMINATION_FILE = synthetic.CONTAMINATION_FILE


def _read_options(num_workers: int, prefetch: int) -> grain.ReadOptions:
  if num_workers > 0:
    # Inside a worker the batch is built in the worker's own loop; the worker's output queue
    # (per_worker_buffer_size) is the prefetch.
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  # In the main process one background thread keeps up to `prefetch` batches ready while the
  # accelerator step runs (JAX releases the GIL while it waits for the device).
  return grain.ReadOptions(num_threads=1 if prefetch > 0 else 0, prefetch_buffer_size=prefetch)


def _ensure_flags_parsed() -> None:
  """grain reads absl flags; a library caller (a notebook, a script) may never parse them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1], known_only=True)


# How often a grain worker checks that the process that started it is still alive.
_PARENT_POLL_S = 0.5


def _watch_parent(parent_pid: int) -> None:
  while os.getppid() == parent_pid:
    time.sleep(_PARENT_POLL_S)
  os._exit(1)  # pylint: disable=protected-access  (no clean-up: the parent is gone)


def _die_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
  """grain worker start-up: the worker ends itself once its parent process is gone.

  grain's workers stop only when the main process asks them to; a main process killed by
  SIGKILL (the OOM killer) never asks, and its workers (with the resource tracker, which waits
  for them) would live on holding their shared memory. grain has no parent-death mechanism
  of its own, and prctl(PR_SET_PDEATHSIG) fires when the *thread* that started the worker
  ends (here the device prefetch thread, which may be replaced while the run goes on), so a
  daemon thread in each worker watches the parent's pid instead. Once parent and workers are
  gone, multiprocessing's resource tracker unlinks their leftover /dev/shm blocks and exits.
  """
  del worker_index, worker_count
  if os.getppid() != parent_pid:
    os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=_watch_parent, args=(parent_pid,), name='parent-watch',
                   daemon=True).start()


# Whether `_release_shared_memory` is registered to run at exit.
_RELEASE_AT_EXIT: list[bool] = []


def _off_shared_memory(batch: dict[str, Any]) -> dict[str, Any]:
  """A batch from grain's workers with every array copied out of its shared memory block.

  Each array a worker sends lives in a /dev/shm block that the main process unlinks when the
  array is garbage collected, through grain's deletion thread pool. A block whose array is
  collected only at interpreter exit, after multiprocessing's exit handler has stopped that
  pool, is never unlinked, and the resource tracker reports it ("There appear to be 50
  leaked shared_memory objects", 50 being grain's limit on pending deletions). With the copy
  (about 13 MB per batch of 64 images) a block lives only until its batch is read, whatever
  holds the batch afterwards (the device prefetcher, the loop); `_release_shared_memory`
  frees the few that grain itself keeps reachable.
  """
  return {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def _release_shared_memory() -> None:
  """At exit, before multiprocessing's exit handler stops grain's deletion pool: frees the
  worker arrays that grain's iterators leave reachable only through reference cycles (an
  exhausted evaluation iterator with 2 workers leaves one batch so), then waits until the
  pool has run every deletion queued so far (one thread, in order)."""
  gc.collect()
  pool = getattr(shared_memory_array.SharedMemoryArray, '_del_thread_pool', None)
  if pool is not None:
    pool.apply(int)


def _to_iterator(ds: grain.MapDataset, num_workers: int, prefetch: int) -> grain.DatasetIterator:
  _ensure_flags_parsed()
  if num_workers > 0 and not _RELEASE_AT_EXIT:
    # Registered after multiprocessing's own handler, so it runs before it.
    atexit.register(_release_shared_memory)
    _RELEASE_AT_EXIT.append(True)
  it_ds = ds.to_iter_dataset(_read_options(num_workers, prefetch))
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers,
                                     per_worker_buffer_size=max(1, prefetch)),
        worker_init_fn=functools.partial(_die_with_parent, os.getpid())).map(_off_shared_memory)
  return iter(it_ds)


class TrainIterator(grain.DatasetIterator):
  """Infinite iterator over per-process train batches, resumable from its state.

  State: {'step': next global step, 'num_skipped': corrupt files skipped so far by this
  process, plus 'seed', 'num_examples' and 'global_batch' to detect a state from another run}.
  Restoring works with any number of grain workers and any process count.
  """

  def __init__(self, loader: TrainBatchLoader, *, start_step: int, num_workers: int,
               prefetch: int):
    super().__init__()
    self._loader = loader
    self._num_workers, self._prefetch = int(num_workers), int(prefetch)
    self._step = int(start_step)
    self._num_skipped = 0
    self._it: grain.DatasetIterator | None = None
    # Warnings about the last batch read (corrupt files skipped). Logged by __next__, unless
    # a consumer that reads ahead (prefetch.DevicePrefetcher) sets defer_notes and logs them,
    # via take_notes, when it hands that batch out.
    self.defer_notes = False
    self._notes: list[str] = []

  @property
  def step(self) -> int:
    """Global step of the next batch."""
    return self._step

  @property
  def num_skipped(self) -> int:
    """Corrupt training files replaced so far (this process's rows; kept across restores)."""
    return self._num_skipped

  def _ensure(self) -> grain.DatasetIterator:
    if self._it is None:
      ds = grain.MapDataset.range(self._step, _STEP_LIMIT).map(self._loader)
      self._it = _to_iterator(ds, self._num_workers, self._prefetch)
    return self._it

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    batch = dict(next(self._ensure()))
    self._step += 1
    self._num_skipped += int(batch['num_skipped'].sum())
    self._notes = [str(n) for n in batch.pop(NOTES_KEY, ())]
    if not self.defer_notes:
      for note in self.take_notes():
        logging.warning('%s', note)
    return batch

  def take_notes(self) -> list[str]:
    """The warnings about the batch last returned (and forgets them)."""
    notes, self._notes = self._notes, []
    return notes

  def get_state(self) -> dict[str, Any]:
    return {'step': self._step, 'num_skipped': self._num_skipped, 'seed': self._loader.seed,
            'num_examples': len(self._loader.paths),
            'global_batch': self._loader.global_batch}

  def set_state(self, state: dict[str, Any]) -> None:
    if 'step' not in state:
      raise ValueError(f'not a train iterator state (no "step"): {state!r}')
    for key, mine in (('seed', self._loader.seed), ('num_examples', len(self._loader.paths)),
                      ('global_batch', self._loader.global_batch)):
      if key in state and int(state[key]) != mine:
        logging.warning('restoring an input state saved with %s=%s into a pipeline with %s=%s:'
                        ' the batches will not continue the saved run', key, state[key], key,
                        mine)
    self._drop_inner()
    self._step = int(state['step'])
    self._num_skipped = int(state.get('num_skipped', 0))

  def start_prefetch(self) -> None:
    self._ensure().start_prefetch()

  def _drop_inner(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None

  def close(self) -> None:
    self._drop_inner()
    super().close()


def make_train_iterator(split: records.Split, config, *, process_index: int = 0,
                        process_count: int = 1, start_epoch: int = 0) -> TrainIterator:
  """Per-process train batches, infinite over epochs.

  Each batch is a dict of numpy arrays with b = P * K / process_count rows (this process's
  rows [process_index * b, (process_index + 1) * b) of the global batch):
    image uint8 [b, H, W, 3]       x (pixels; normalised on the device)
    occluded uint8 [b, H, W, 3]    occ(x), pixel-aligned with x
    pattern int32 [b]              occlusion pattern id (0 = none)
    occ_mask uint8 [b, H, W]       1 on occluder pixels
    contam_mask uint8 [b, H, W]    1 on the planted contamination of x (zeros where none is
                                   recorded: see the module docstring)
    pid, camid, index int32 [b]    of the image actually read (see num_skipped)
    num_skipped int32 [b]          corrupt files replaced for that row ('skip' policy), else 0
  and, when `donor_exchange.on_device(config)` (config.input.donor_exchange='device' with a
  donor type to synthesise), `occluded` still lacks the donor boxes of the person and crop
  occluders, which the train step pastes from the global `image` batch:
    row, donor_row int32 [b]       global rows of each row and of its donor (-1: none)
    donor_box int32 [b, 6]         (y, x, h, w, sy, sx) of the paste (data/donor_exchange.py)
  """
  _check_process(process_index, process_count)
  if len(split) == 0:
    raise ValueError('the train split is empty')
  if int(config.seed) < 0:
    raise ValueError(f'config.seed must be >= 0, got {config.seed}')
  c = config.input
  loader = TrainBatchLoader(
      split, P=c.ids_per_batch, K=c.images_per_id, seed=int(config.seed),
      epoch_length=steps_per_epoch(split, config), process_index=process_index,
      process_count=process_count, augment_spec=augment.augment_spec(config),
      occlusion_spec=occlusion.occlusion_spec(config),
      corrupt_policy=str(c.corrupt_image_policy),
      contam=synthetic.contamination_masks(split),
      donors_on_device=donor_exchange.on_device(config))
  if start_epoch < 0:
    raise ValueError(f'start_epoch must be >= 0, got {start_epoch}')
  if c.num_workers < 0 or c.prefetch < 0:
    raise ValueError(f'config.input.num_workers ({c.num_workers}) and config.input.prefetch '
                     f'({c.prefetch}) must be >= 0')
  return TrainIterator(loader, start_step=start_epoch * loader.epoch_length,
                       num_workers=c.num_workers, prefetch=c.prefetch)


# --------------------------------------------------------------------------------------------
# Evaluation


def _eval_layout(num_examples: int, config, process_count: int) -> tuple[int, int, int]:
  """(per-process batch, examples per process share, batches per process)."""
  batch = _per_process(int(config.input.eval_batch_size), process_count,
                       'config.input.eval_batch_size')
  share = -(-num_examples // process_count)
  return batch, share, -(-share // batch)


def eval_num_batches(split: records.Split, config, *, process_count: int = 1) -> int:
  """Eval batches per process; the same on every process (the last ones may be padding)."""
  return _eval_layout(len(split), config, process_count)[2]


def eval_last_batch(split: records.Split, config, *, process_count: int = 1,
                    row_multiple: int = 1) -> int:
  """Rows of each process's last eval batch: what is left of its share, rounded up to a
  multiple of `row_multiple` (its devices, so that the batch splits over them), at most the
  batch. The same on every process, so the global batch lines up."""
  batch, share, num_batches = _eval_layout(len(split), config, process_count)
  rest = max(share - (num_batches - 1) * batch, 1)
  multiple = max(int(row_multiple), 1)
  return min(batch, -(-rest // multiple) * multiple)


class EvalBatchLoader:
  """Batch i of one process's contiguous share of an eval split, padded to a fixed size: the
  batch, and `last_batch` rows for the last of `num_batches` (None: the batch)."""

  def __init__(self, split: records.Split, spec: augment.AugmentSpec, *, begin: int, end: int,
               batch: int, contam: records.PixelMasks | None = None,
               num_batches: int | None = None, last_batch: int | None = None):
    self.paths = split.paths
    self.contam = contam
    self.pids = np.asarray(split.pids, np.int32)
    self.camids = np.asarray(split.camids, np.int32)
    self.spec = spec
    self.begin, self.end, self.batch = int(begin), int(end), int(batch)
    self.num_batches = num_batches
    self.last_batch = int(batch if last_batch is None else last_batch)

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    H, W = self.spec.height, self.spec.width
    rows = (self.last_batch if self.num_batches is not None and int(i) == self.num_batches - 1
            else self.batch)
    lo = min(self.begin + int(i) * self.batch, self.end)
    hi = min(lo + rows, self.end)
    n = hi - lo
    images = np.zeros((rows, H, W, 3), np.uint8)
    contam = np.zeros((rows, H, W), np.uint8)
    for j in range(n):
      images[j] = image_io.load_image(self.paths[lo + j], size=(H, W))
      mask = None if self.contam is None else self.contam.mask(lo + j)
      if mask is not None:
        contam[j] = augment.resize_mask(mask, H, W)
    out = {
        'image': images,
        'contam_mask': contam,
        'pid': np.full(rows, -1, np.int32),
        'camid': np.full(rows, -1, np.int32),
        'index': np.full(rows, -1, np.int32),
        'valid': np.zeros(rows, bool),
    }
    # Padded rows keep a zero image and -1 ids; `valid` is what consumers must check.
    out['pid'][:n] = self.pids[lo:hi]
    out['camid'][:n] = self.camids[lo:hi]
    out['index'][:n] = np.arange(lo, hi, dtype=np.int32)
    out['valid'][:n] = True
    return out


def make_eval_iterator(split: records.Split, config, *, process_index: int = 0,
                       process_count: int = 1, row_multiple: int | None = None
                       ) -> Iterator[dict[str, np.ndarray]]:
  """Eval batches of this process's contiguous share of `split`, in split order.

  Keys: image uint8 [b, H, W, 3] (pixels; the extraction normalises them on the device), pid,
  camid, index int32 [b] (-1 on padding), valid bool [b], contam_mask uint8 [b, H, W] (the
  planted contamination resized with the image; zeros where none is recorded and on
  padding), with b = config.input.eval_batch_size / process_count, except for the last batch
  (`eval_last_batch`): what is left, padded to a multiple of `row_multiple` (default: this
  process's device count) and no further. A jitted consumer thus compiles one more shape per
  split at most, where padding to the batch would run up to b - 1 images for nothing.
  """
  _check_process(process_index, process_count)
  batch, share, num_batches = _eval_layout(len(split), config, process_count)
  if row_multiple is None:
    import jax  # pylint: disable=g-import-not-at-top
    row_multiple = jax.local_device_count()
  last = eval_last_batch(split, config, process_count=process_count, row_multiple=row_multiple)
  begin = min(process_index * share, len(split))
  end = min(begin + share, len(split))
  loader = EvalBatchLoader(split, augment.augment_spec(config), begin=begin, end=end,
                           batch=batch, contam=synthetic.contamination_masks(split),
                           num_batches=num_batches, last_batch=last)
  ds = grain.MapDataset.range(num_batches).map(loader)
  return _to_iterator(ds, int(config.input.num_workers), int(config.input.prefetch))

