"""The train state and its shape-first sharded initialisation.

`create_sharded_state` evaluates the initialiser's shapes (`jax.eval_shape`), derives the
shardings of every leaf over the mesh (parallel.state_shardings: FSDP rules), then runs the
initialiser under `jax.jit(out_shardings=...)`, so no array is ever materialised whole on one
device. `load_pretrained` fills the backbones from config.init_from on a fresh run.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ogfr_jax import parallel
from ogfr_jax import pretrained


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  # Updates skipped because the loss or a gradient was not finite (kept with the state, so
  # the count survives restarts and is exact without a host sync per step).
  nonfinite_steps: Any = 0


def dummy_batch(config: ml_collections.ConfigDict, batch: int = 2) -> dict[str, jnp.ndarray]:
  h, w = config.input.height, config.input.width
  return {
      'image': jnp.zeros((batch, h, w, 3), jnp.float32),
      'occluded': jnp.zeros((batch, h, w, 3), jnp.float32),
      'pattern': jnp.zeros((batch,), jnp.int32),
      'pid': jnp.zeros((batch,), jnp.int32),
      'camid': jnp.zeros((batch,), jnp.int32),
      'occ_mask': jnp.zeros((batch, h, w), jnp.uint8),
      'contam_mask': jnp.zeros((batch, h, w), jnp.uint8),
  }


def init_state(model, tx, config, rng) -> TrainState:
  """Initialises variables and optimizer state. Pure: jit/eval_shape it."""
  init_rng, drop_rng, agent_rng, train_rng = jax.random.split(rng, 4)
  variables = model.init({'params': init_rng, 'dropout': drop_rng, 'agent': agent_rng},
                         dummy_batch(config), train=False)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
      rng=train_rng,
      nonfinite_steps=jnp.zeros((), jnp.int32))


def create_sharded_state(model, tx, config, mesh, rng):
  """Shape-first init: eval_shape, shardings, then jit(init, out_shardings=...)."""
  init = functools.partial(init_state, model, tx, config)
  abstract = jax.eval_shape(init, rng)
  shardings = parallel.state_shardings(abstract, mesh)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, abstract, shardings


def load_pretrained(state: TrainState, abstract: TrainState, shardings: TrainState,
                    config: ml_collections.ConfigDict
                    ) -> tuple[TrainState, pretrained.ImportReport]:
  """Puts config.init_from's backbone weights into teacher and student (fresh runs only).

  Returns the state and the import report. The momentum buffers need no reset: they are
  zeros at init whatever the weights are.
  """
  loaded, report = pretrained.load_backbone(abstract.params, config.init_from, config,
                                            fmt=config.init_format)
  if jax.process_index() == 0:
    logging.info('backbone weights from %s:\n%s', config.init_from, report.table())
  params = jax.tree_util.tree_map(
      lambda new, old, sharding: jax.device_put(new, sharding)
      if isinstance(new, np.ndarray) else old, loaded, state.params, shardings.params)
  return state.replace(params=params), report
