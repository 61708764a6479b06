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
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ogfr_jax import paths

# At most this many differing arrays are listed in a mismatch error (then a count).
_LISTED_MISMATCHES = 8
# Characters of an underlying storage error quoted in ours (tensorstore's run to pages).
_QUOTED_ERROR = 300


def make_manager(workdir: str, *, max_to_keep: int = 2, async_save: bool = True
                 ) -> ocp.CheckpointManager:
  """The manager of WORKDIR/checkpoints; removes unfinished steps left by a killed run."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
  # Named handlers (rather than item names) let `restore` read the saved shapes before it
  # restores anything.
  return ocp.CheckpointManager(
      paths.join(paths.resolve(workdir, '--workdir'), 'checkpoints'), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         *, force: bool = False) -> bool:
  return manager.save(
      step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=ocp.args.JsonSave(data_state)), force=force)


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
  return text if len(text) <= _QUOTED_ERROR else text[:_QUOTED_ERROR] + ' ...'


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises ValueError naming the checkpoint folder and the arrays that differ, if any."""
  folder = os.path.join(str(manager.directory), str(step))
  try:
    meta = manager.item_metadata(step)['state']
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'checkpoint {folder} cannot be read ({_quote(e)}); if it '
                     'is damaged, move it away to resume from the checkpoint before it'
                     ) from None
  meta = getattr(meta, 'tree', meta)
  if not meta:
    raise ValueError(f'checkpoint {folder} holds no train state; move it away to resume from '
                     'the checkpoint before it')
  lines = shape_mismatches(flat_shapes(meta), flat_shapes(abstract_state))
  if lines:
    workdir = os.path.dirname(str(manager.directory))
    raise ValueError(
        f'the checkpoint in {workdir} (step {step}) does not match the model of this config '
        f'({len(lines)} arrays differ):\n  {_describe(lines)}\nThe dataset (number of '
        'identities or cameras) or the model config changed since it was written. Use another '
        '--workdir, or --overwrite to start afresh there.')


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
            ) -> tuple[Any, dict]:
  """Restores (state, data_state) at `step` into the shardings of `abstract_state`."""
  check_compatible(manager, step, abstract_state)
  folder = os.path.join(str(manager.directory), str(step))
  try:
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
  except (ValueError, KeyError, TypeError, OSError) as e:
    raise ValueError(
        f'checkpoint {folder} matches this config but cannot be restored '
        f'({_quote(e)}); if it is damaged, move it away to resume from the checkpoint '
        'before it') from e
  return restored['state'], dict(restored['data'])
