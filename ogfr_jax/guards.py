"""Run guards: a clean stop on a preemption notice, and updates that must stay finite.

Preemption. Cloud TPU VMs and SLURM announce an eviction with SIGTERM some seconds before they
kill the job. `StopRequest` turns that notice into a decision the train loop reads at step
boundaries; the loop then writes a checkpoint of the current step, waits until it is on disk,
and raises `Preempted`, which ends the program with exit status 143 (128 + SIGTERM, what a
shell reports for a process ended by SIGTERM). Job scripts can so tell "stopped on request,
run the same command to resume" (143) from a crash (1) and a finished run (0).

Saving a checkpoint is collective, so in a multi-process run every process must decide to stop
at the same step, even though the scheduler may signal only some of them:
- with JAX's preemption service (on by default once `jax.distributed.initialize` ran), the
  service catches SIGTERM in any process and `multihost_utils.reached_preemption_sync_point`
  returns True on every process at the same step. It is asked every step; until a notice
  arrives it answers locally, without communication. A Python SIGTERM handler would replace the
  service's own, so none is installed in that mode.
- without the service, each process catches SIGTERM itself and the processes agree every
  `check_every` steps by all-gathering their flags (a host sync and a tiny collective, the
  only cost config.train.stop_check_every trades against the delay of a stop; the JAX service
  is on by default, so this path is the exception).
A single process needs no agreement and reads its flag every step at no cost. The train loop
keeps at most one step in flight, so "the next step" is the devices' next step, not one the
host dispatched far ahead of them. A signal that
arrives before the loop starts (set-up, compilation, restore) ends the process as usual: there
is nothing to save yet.

Non-finite updates. `finite_update` is used inside the jitted train step: when the loss or the
gradient norm is not finite, every part of the state that the update would change keeps its
previous value, and the step reports it. The host learns about it only when it fetches metrics
(no sync per step); the loop's policy ('stop' or 'skip', config.train.nonfinite_policy) acts
then, and before every checkpoint, so a 'stop' run never saves a state past a bad step.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
NONFINITE_POLICIES = ('stop', 'skip')
STOP_SIGNALS = (signal.SIGTERM,)


class Preempted(SystemExit):
  """Raised after the checkpoint of a stop request is on disk; exits with status 143."""

  def __init__(self, message: str):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.message = message

  def __str__(self) -> str:
    return self.message


# --------------------------------------------------------------------------------------------
# Stop requests


def _preemption_service_active() -> bool:
  """True when jax.distributed runs with its preemption service (multi-process runs only).

  JAX has no public query for it. Should the private one below move, the answer is False and
  the processes agree by all-gather instead, which is slower but just as correct.
  """
  if jax.process_count() < 2 or not jax.config.jax_enable_preemption_service:
    return False
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  state = getattr(distributed, 'global_state', None)
  return getattr(state, 'preemption_sync_manager', None) is not None


class StopRequest:
  """Whether the run should stop at a step boundary, the same answer on every process.

  Use as a context manager around the train loop and call `should_stop(step)` at every step
  boundary on every process (it may be collective). The previous signal handlers come back on
  exit, so a signal after the loop (during the final evaluation) has its default effect.
  """

  def __init__(self, *, check_every: int = 10, signals: tuple[int, ...] = STOP_SIGNALS):
    if check_every < 1:
      raise ValueError(f'config.train.stop_check_every must be >= 1, got {check_every}')
    self.check_every = int(check_every)
    self.signals = tuple(signals)
    self.received: str | None = None  # name of the signal this process received
    self._previous: dict[int, Any] = {}
    self._first_step: int | None = None
    if jax.process_count() == 1:
      self.mode = 'local'
    elif _preemption_service_active():
      self.mode = 'service'
    else:
      self.mode = 'allgather'

  # Signal handling ----------------------------------------------------------------------------

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.received is None:
      # Nothing but a flag and a log line (logging's locks are re-entrant): the handler runs
      # between two bytecodes of the main thread, possibly in the middle of a checkpoint write.
      self.received = name
      logging.warning('received %s: stopping at the next step boundary after writing a '
                      'checkpoint', name)

  def __enter__(self) -> 'StopRequest':
    if self.mode == 'service':
      return self
    if threading.current_thread() is not threading.main_thread():
      logging.warning('train loop outside the main thread: %s cannot be caught, a preemption '
                      'notice will end the run without a final checkpoint',
                      '/'.join(signal.Signals(s).name for s in self.signals))
      return self
    for s in self.signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  # The decision ---------------------------------------------------------------------------

  def should_stop(self, step: int) -> bool:
    """Call at every step boundary on every process, with the number of steps done."""
    if self._first_step is None:
      self._first_step = int(step)
    if self.mode == 'local':
      return self.received is not None
    if self.mode == 'service':
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(int(step)):
        self.received = self.received or 'a preemption notice (JAX preemption service)'
        return True
      return False
    if (int(step) - self._first_step) % self.check_every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    if np.any(np.asarray(flags)):
      if self.received is None:
        self.received = 'a stop request of another process'
      return True
    return False


# --------------------------------------------------------------------------------------------
# Non-finite updates


def check_policy(policy: str) -> str:
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f'config.train.nonfinite_policy={policy!r}: must be one of '
                     f'{list(NONFINITE_POLICIES)}')
  return policy


def is_finite(*values: jax.Array) -> jax.Array:
  """Scalar bool: every value finite. Inside jit; one reduction per value."""
  ok = jnp.asarray(True)
  for v in values:
    ok = ok & jnp.all(jnp.isfinite(v))
  return ok


def finite_update(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `finite`, else `old`, leaf by leaf (two pytrees of the same structure)."""
  return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)


def first_nonfinite(flags: list[Any], first_step: int) -> int | None:
  """Step number of the first flagged step, given per-step flags starting at `first_step`."""
  host = np.asarray(jax.device_get(flags), np.float64).reshape(-1)
  bad = np.flatnonzero(host > 0)
  return int(first_step + bad[0]) if bad.size else None
