"""Device prefetch: batches are put on the devices by a background thread ahead of the step.

The accelerator step is dispatched asynchronously, so without prefetch the host would build
and transfer batch s+1 only after dispatching step s, and the device would wait for the copy.
`DevicePrefetcher` keeps up to `size` batches already transferred (global sharded arrays, via
a `put` function such as `parallel.global_batch`) in a queue that a background thread fills.

Checkpoint state. The thread reads ahead of the step, so the source iterator's own state is
that of the last batch *read*, not the last batch *used*: saving it would skip the prefetched
batches on resume. The prefetcher therefore records the source's state right after reading
each batch and hands it out with that batch; `get_state()` is the state recorded with the last
batch the caller received (before the first one: the source's state at construction). A
checkpoint written after the step of batch s thus resumes at batch s + 1, whatever the depth.

Failures in the thread (a corrupt image, a dead worker) are raised in the caller, as the same
exception object, when the caller reaches the batch that could not be built; batches before
it are still delivered in order.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Callable, Iterator

from absl import logging

# How long the caller waits on the queue between checks that the thread is still alive, and
# how long `close` waits for the thread to leave a read in progress.
_POLL_S = 0.5
_JOIN_TIMEOUT_S = 30.0


def _log_notes(notes: list[str]) -> None:
  for note in notes:
    logging.warning('%s', note)


class _End:
  """Queue marker: the source is exhausted."""


class _Failure:
  """Queue marker: reading or transferring a batch raised `error`."""

  def __init__(self, error: BaseException):
    self.error = error


class DevicePrefetcher:
  """Iterator over `put(batch)` for the batches of `source`, up to `size` of them ready ahead.

  Args:
    source: iterator of host batches. If it has `get_state()`, that state is recorded per batch
      (see the module docstring); if it has `close()`, `close` calls it.
    put: host batch -> device batch; runs in the background thread (JAX transfers may be
      issued from any thread).
    size: batches kept ready on the devices (config.input.device_prefetch). 0 reads and
      transfers in the caller's thread, one batch at a time, with the same state semantics.

  The thread starts at the first `next()`. Once it has, use the source only through this
  object: `set_state` stops the thread, drops the batches read ahead and restores the source.
  """

  def __init__(self, source: Iterator[Any], put: Callable[[Any], Any], *, size: int = 2):
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
      raise ValueError(f'config.input.device_prefetch must be an integer >= 0, got {size!r}')
    self._source = source
    self._put = put
    self._size = size
    self._has_state = callable(getattr(source, 'get_state', None))
    # A source with take_notes (pipeline.TrainIterator) hands its warnings about a batch
    # (corrupt files skipped) to this object, which logs them when that batch is handed out:
    # batches read ahead and dropped warn about nothing.
    self._take_notes = getattr(source, 'take_notes', None)
    if callable(self._take_notes):
      source.defer_notes = True
    else:
      self._take_notes = None
    self._state = self._read_state()
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._done: BaseException | None = None  # StopIteration or the failure, once delivered
    self._closed = False

  # ------------------------------------------------------------------------------------------
  # Iteration

  def __iter__(self) -> DevicePrefetcher:
    return self

  def __next__(self) -> Any:
    if self._closed:
      raise RuntimeError('the device prefetcher is closed')
    if self._done is not None:
      raise self._done
    if self._size == 0:
      return self._next_in_caller()
    if self._thread is None:
      self._start()
    item = self._take()
    if isinstance(item, _End):
      self._done = StopIteration()
      raise StopIteration
    if isinstance(item, _Failure):
      self._done = item.error
      raise item.error
    batch, self._state, notes = item
    _log_notes(notes)
    return batch

  def _next_in_caller(self) -> Any:
    try:
      batch = next(self._source)
    except StopIteration:
      self._done = StopIteration()
      raise
    state = self._read_state()
    notes = self._notes()
    out = self._put(batch)
    self._state = state
    _log_notes(notes)
    return out

  def _notes(self) -> list[str]:
    return self._take_notes() if self._take_notes is not None else []

  def _read_state(self) -> Any:
    # A copy: a source may hand out (and later mutate) its own dict.
    return copy.deepcopy(self._source.get_state()) if self._has_state else None

  def _start(self) -> None:
    self._stop.clear()
    self._queue = queue.Queue(maxsize=self._size)
    self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                    name='device-prefetch', daemon=True)
    self._thread.start()

  def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
    """The thread: read, record the state, transfer, enqueue; until stopped or exhausted."""
    try:
      while not stop.is_set():
        try:
          batch = next(self._source)
        except StopIteration:
          self._offer(q, stop, _End())
          return
        state = self._read_state()
        notes = self._notes()
        if not self._offer(q, stop, (self._put(batch), state, notes)):
          return
    except BaseException as e:  # pylint: disable=broad-except
      # Everything, KeyboardInterrupt included, belongs to the caller, who sees it at the
      # batch it concerns.
      self._offer(q, stop, _Failure(e))

  @staticmethod
  def _offer(q: queue.Queue, stop: threading.Event, item: Any) -> bool:
    """Enqueues `item` unless stopped first; a full queue is retried so `close` can end it."""
    while not stop.is_set():
      try:
        q.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def _take(self) -> Any:
    while True:
      try:
        return self._queue.get(timeout=_POLL_S)
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          # The thread always enqueues its end or failure before leaving, unless it was
          # stopped; a stopped thread with nothing queued has nothing more to give.
          return _Failure(RuntimeError('the device prefetch thread ended without a batch'))

  # ------------------------------------------------------------------------------------------
  # State

  def get_state(self) -> Any:
    """The source's state recorded with the last batch handed out (a copy).

    Saving it with a checkpoint of the step that consumed that batch resumes at the next
    batch, whatever was read ahead.
    """
    if not self._has_state:
      raise TypeError(f'the source {type(self._source).__name__} has no get_state()')
    return copy.deepcopy(self._state)

  def set_state(self, state: Any) -> None:
    """Restores the source to `state`; batches read ahead are dropped."""
    if not callable(getattr(self._source, 'set_state', None)):
      raise TypeError(f'the source {type(self._source).__name__} has no set_state()')
    self._halt()
    self._source.set_state(state)
    self._state = self._read_state()
    self._done = None

  @property
  def step(self) -> int:
    """'step' of get_state(): for pipeline.TrainIterator, the global step of the next batch
    this object hands out."""
    return int(self.get_state()['step'])

  @property
  def num_skipped(self) -> int:
    """'num_skipped' of get_state(): for pipeline.TrainIterator, corrupt files replaced in
    the batches handed out so far (0 when the state does not count them)."""
    return int(self.get_state().get('num_skipped', 0))

  # ------------------------------------------------------------------------------------------
  # Shutdown

  def _halt(self) -> bool:
    """Stops the thread and drops what it prefetched; False if it is stuck in a read."""
    if self._thread is None:
      return True
    self._stop.set()
    # Emptying the queue frees the device buffers and unblocks a pending put.
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=_JOIN_TIMEOUT_S)
    stopped = not self._thread.is_alive()
    if not stopped:
      logging.warning('the device prefetch thread is still reading a batch after %.0f s; '
                      'leaving it behind', _JOIN_TIMEOUT_S)
    self._thread = None
    self._queue = None
    return stopped

  def close(self) -> None:
    """Stops the thread, drops prefetched batches, then closes the source. Idempotent."""
    if self._closed:
      return
    self._closed = True
    self._halt()
    close = getattr(self._source, 'close', None)
    if callable(close):
      close()

  def __enter__(self) -> DevicePrefetcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
