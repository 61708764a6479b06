"""A device out-of-memory error (XLA RESOURCE_EXHAUSTED) as one line naming what to change.

XLA reports a program that does not fit, at compilation or when it runs, as a JaxRuntimeError
whose message starts with RESOURCE_EXHAUSTED; with asynchronous dispatch it surfaces wherever
the run next reads a result (often the metrics of a logging window). `as_user_error` turns it
into an `OutOfMemoryError` (a ValueError, so main prints it as `error: ...` with exit 2) that
names the batch, the compute dtype and the remat choice in force and the settings that need
less memory. benchmarks/memory_table.py gives the memory of each choice.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import ml_collections

MARKER = 'RESOURCE_EXHAUSTED'
# model.remat from most to least activation memory (models/vit.py, remat_block).
REMAT_ORDER = ('none', 'dots', 'block')


class OutOfMemoryError(ValueError):
  """The run does not fit in device memory at its batch, dtype and remat settings."""


def is_out_of_memory(error: BaseException) -> bool:
  """Whether `error` is XLA's out-of-memory (at compile or run time)."""
  return isinstance(error, RuntimeError) and MARKER in str(error)


def _xla_reason(error: BaseException) -> str:
  line = next((s.strip() for s in str(error).splitlines() if MARKER in s), str(error).strip())
  return line if len(line) <= 160 else line[:157] + '...'


def message(config: Optional[ml_collections.ConfigDict], error: BaseException,
            platform: Optional[str] = None) -> str:
  """What `as_user_error` says: the XLA reason, the settings in force, the ones to try."""
  reason = _xla_reason(error)
  if config is None:
    return (f'out of device memory ({reason}); lower input.ids_per_batch, set '
            f'model.dtype=bfloat16 or model.remat=block')
  from ogfr_jax import precision  # pylint: disable=g-import-not-at-top
  b, m = config.input, config.model
  dtype = precision.compute_dtype(m, platform)
  tries = []
  if dtype == 'float32':
    tries.append('--config.model.dtype=bfloat16')
  later = REMAT_ORDER[REMAT_ORDER.index(m.remat) + 1:] if m.remat in REMAT_ORDER else ()
  if later:
    tries.append(f'--config.model.remat={" or ".join(later)}')
  if b.ids_per_batch > 1:
    tries.append(f'--config.input.ids_per_batch={b.ids_per_batch // 2}')
  if b.eval_batch_size > 1:
    tries.append(f'in evaluation --config.input.eval_batch_size={b.eval_batch_size // 2}')
  return (f'out of device memory ({reason}) at train batch {b.ids_per_batch * b.images_per_id}'
          f' = input.ids_per_batch {b.ids_per_batch} x input.images_per_id {b.images_per_id}, '
          f'eval batch {b.eval_batch_size}, model.dtype={dtype}'
          f'{" (auto)" if m.dtype == "auto" else ""}, model.remat={m.remat}; try '
          f'{", ".join(tries) or "more devices with --config.mesh.fsdp"} (memory of each '
          'choice: python benchmarks/memory_table.py)')


@contextlib.contextmanager
def as_user_error(config_fn: Callable[[], ml_collections.ConfigDict]) -> Iterator[None]:
  """Re-raises XLA's out-of-memory inside the block as an OutOfMemoryError naming the
  settings of `config_fn()` (called only then; None when the config cannot be read)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if not is_out_of_memory(e):
      raise
    try:
      config = config_fn()
    except Exception:  # pylint: disable=broad-except
      config = None
    raise OutOfMemoryError(message(config, e)) from e
