"""Orbax checkpoints: one checkpoint per saved step holds the train state and the input
iterator's state, so that a run resumes exactly where it stopped.

Orbax writes each step into a temporary folder and renames it when complete, so a step that
was being written when the process died is never listed as the latest.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, *, max_to_keep: int = 2, async_save: bool = True
                 ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options,
      item_names=('state', 'data'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         *, force: bool = False) -> bool:
  return manager.save(
      step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=ocp.args.JsonSave(data_state)), force=force)


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
            ) -> tuple[Any, dict]:
  """Restores (state, data_state) at `step` into the shardings of `abstract_state`."""
  try:
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f'checkpoint {manager.directory}/{step} does not match the model of this config '
        f'(different model size, dataset or heads?): {e}') from e
  return restored['state'], dict(restored['data'])
