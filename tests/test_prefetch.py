"""The device prefetcher: order, state of the batches consumed, failures, shutdown."""

import threading
import time
import types

import jax
import numpy as np
import pytest

from ogfr_jax import parallel
from ogfr_jax import prefetch
from ogfr_jax.data import pipeline
from helpers import make_config, take, write_split


class CountingSource:
  """Yields {'x': i}; its state is the number of items read so far, as a train iterator's."""

  def __init__(self, n=None, fail_at=None, error=None):
    self.read = 0
    self.n, self.fail_at, self.error = n, fail_at, error
    self.closed = 0
    self.restored = []

  def __iter__(self):
    return self

  def __next__(self):
    if self.fail_at is not None and self.read == self.fail_at:
      raise self.error
    if self.n is not None and self.read >= self.n:
      raise StopIteration
    self.read += 1
    return {'x': self.read - 1}

  def get_state(self):
    return {'step': self.read, 'num_skipped': 2 * self.read}

  def set_state(self, state):
    self.restored.append(state['step'])
    self.read = state['step']

  def close(self):
    self.closed += 1


def _wait_until(predicate, timeout=10.0):
  deadline = time.time() + timeout
  while not predicate():
    assert time.time() < deadline, 'timed out'
    time.sleep(0.01)


@pytest.mark.parametrize('size', [0, 1, 3])
def test_order_and_transform(size):
  source = CountingSource(n=7)
  with prefetch.DevicePrefetcher(source, lambda b: b['x'] * 10, size=size) as it:
    assert list(it) == [0, 10, 20, 30, 40, 50, 60]
    with pytest.raises(StopIteration):
      next(it)
  assert source.closed == 1


@pytest.mark.parametrize('size', [0, 1, 3])
def test_state_is_that_of_the_last_batch_handed_out(size):
  source = CountingSource()
  it = prefetch.DevicePrefetcher(source, lambda b: b, size=size)
  assert it.get_state() == {'step': 0, 'num_skipped': 0} and it.step == 0
  for consumed in range(1, 5):
    assert next(it)['x'] == consumed - 1
    # Let the thread fill its queue (and hold one more batch, blocked on the full queue).
    _wait_until(lambda: source.read >= consumed + size)
    assert source.read >= consumed + size  # the source itself is ahead ...
    assert it.get_state() == {'step': consumed, 'num_skipped': 2 * consumed}  # ... not us
    assert it.step == consumed and it.num_skipped == 2 * consumed
  state = it.get_state()
  state['step'] = -1  # a copy: editing it changes nothing
  assert it.step == 4
  it.close()


def test_set_state_drops_what_was_read_ahead():
  source = CountingSource()
  it = prefetch.DevicePrefetcher(source, lambda b: b['x'], size=2)
  assert [next(it) for _ in range(3)] == [0, 1, 2]
  _wait_until(lambda: source.read >= 5)
  it.set_state({'step': 1})
  assert source.restored == [1] and it.step == 1
  assert [next(it) for _ in range(2)] == [1, 2]
  it.close()


@pytest.mark.parametrize('size', [0, 2])
def test_a_failure_reaches_the_caller_at_its_batch_with_its_message(size):
  error = OSError('cannot read /data/0001_c1_f0000001.jpg: truncated')
  source = CountingSource(fail_at=3, error=error)
  it = prefetch.DevicePrefetcher(source, lambda b: b['x'], size=size)
  assert [next(it) for _ in range(3)] == [0, 1, 2]  # the batches before it still arrive
  assert it.step == 3
  with pytest.raises(OSError, match='truncated') as caught:
    next(it)
  assert caught.value is error
  with pytest.raises(OSError, match='truncated'):  # and again: it does not pretend to go on
    next(it)
  it.close()
  assert source.closed == 1


def test_a_failure_in_the_transfer_and_a_keyboard_interrupt_are_raised_too():
  def put(batch):
    if batch['x'] == 1:
      raise ValueError('batch[image] has 3 rows on process 0')
    return batch['x']

  it = prefetch.DevicePrefetcher(CountingSource(), put, size=2)
  assert next(it) == 0
  with pytest.raises(ValueError, match=r'batch\[image\] has 3 rows'):
    next(it)
  it.close()
  it = prefetch.DevicePrefetcher(CountingSource(fail_at=0, error=KeyboardInterrupt()),
                                 lambda b: b, size=1)
  with pytest.raises(KeyboardInterrupt):
    next(it)
  it.close()


def test_close_stops_the_thread_blocked_on_a_full_queue():
  source = CountingSource()
  it = prefetch.DevicePrefetcher(source, lambda b: b, size=2)
  next(it)
  _wait_until(lambda: source.read >= 4)  # 1 taken, 2 queued, 1 waiting to be queued
  threads = [t for t in threading.enumerate() if t.name == 'device-prefetch']
  assert len(threads) == 1
  start = time.time()
  it.close()
  assert time.time() - start < 5 and not threads[0].is_alive()
  read = source.read
  time.sleep(0.1)
  assert source.read == read and source.closed == 1
  it.close()  # idempotent
  assert source.closed == 1
  with pytest.raises(RuntimeError, match='closed'):
    next(it)


def test_sources_without_state_and_bad_sizes():
  it = prefetch.DevicePrefetcher(iter(range(3)), lambda x: x + 1, size=1)
  assert list(it) == [1, 2, 3]
  with pytest.raises(TypeError, match='get_state'):
    it.get_state()
  for size in (-1, 1.5, True):
    with pytest.raises(ValueError, match='config.input.device_prefetch'):
      prefetch.DevicePrefetcher(iter(()), lambda x: x, size=size)


def test_train_batches_on_the_mesh_and_resume_from_the_consumed_state(tmp_path):
  split = write_split(str(tmp_path), [4, 3, 6, 3, 5, 4])
  config = make_config(preset='pipeline')
  plain = pipeline.make_train_iterator(split, config)
  reference = take(plain, 6)
  plain.close()
  mesh = parallel.make_mesh(types.SimpleNamespace(data=-1, fsdp=1))
  put = lambda b: parallel.global_batch({k: b[k] for k in ('image', 'pid')}, mesh)
  source = pipeline.make_train_iterator(split, config)
  it = prefetch.DevicePrefetcher(source, put, size=3)
  for step in range(2):
    batch = next(it)
    assert isinstance(batch['image'], jax.Array) and batch['image'].dtype == np.uint8
    assert batch['image'].sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(batch['image']), reference[step]['image'])
  _wait_until(lambda: source.step >= 5)  # read ahead ...
  state = it.get_state()
  assert state['step'] == 2  # ... but the state is that of the two batches consumed
  it.close()
  resumed = pipeline.make_train_iterator(split, config)
  resumed.set_state(state)
  for step in range(2, 6):
    np.testing.assert_array_equal(next(resumed)['image'], reference[step]['image'])
  resumed.close()
