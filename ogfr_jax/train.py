"""Training: the train state, the sharded jitted step, and the loop with logging,
periodic evaluation on the student and automatic resume from the latest checkpoint.

Module-level functions only; `main.py` calls `train_and_evaluate` and `evaluate_checkpoint`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview

from ogfr_jax import checkpoints
from ogfr_jax import evaluate
from ogfr_jax import losses
from ogfr_jax import optim
from ogfr_jax import parallel
from ogfr_jax import pretrained
from ogfr_jax.data import datasets as datasets_lib
from ogfr_jax.data import pipeline
from ogfr_jax.data import synthetic
from ogfr_jax.models import ogfr as ogfr_model

# The keys of an input batch that the train step consumes (occ_mask stays on the host).
STEP_KEYS = ('image', 'occluded', 'pattern', 'pid', 'camid')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  baseline: jax.Array  # moving-average reward baseline of the agent
  rng: jax.Array


# --------------------------------------------------------------------------------------------
# Data


def load_data(config: ml_collections.ConfigDict):
  """Returns (train DatasetSplits, test DatasetSplits) per config.dataset."""
  def read(name, root):
    if name == 'synthetic':
      root = synthetic.ensure(config.synthetic, root or None)
    elif not root:
      raise ValueError(f'config.dataset.root is empty: set it to the folder of {name!r}')
    return datasets_lib.get_dataset(name, root, **_reader_options(config, name))

  train = read(config.dataset.name, config.dataset.root)
  if config.dataset.test_name and config.dataset.test_name != config.dataset.name:
    test = read(config.dataset.test_name, config.dataset.test_root)
  else:
    test = train
  return train, test


def _reader_options(config, name):
  return {'merge_train_val': config.dataset.merge_train_val} if name == 'msmt17' else {}


def schedule_lengths(config: ml_collections.ConfigDict, train_split) -> tuple[int, int]:
  """(steps per epoch, total steps)."""
  steps_per_epoch = config.train.steps_per_epoch or pipeline.steps_per_epoch(train_split, config)
  if steps_per_epoch < 1:
    raise ValueError(
        f'the training split has too few identities/images for one batch of '
        f'{config.input.ids_per_batch} x {config.input.images_per_id}')
  return steps_per_epoch, int(config.train.epochs * steps_per_epoch)


# --------------------------------------------------------------------------------------------
# Model and state


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                num_cameras: int) -> ogfr_model.OGFR:
  return ogfr_model.OGFR(config=ml_collections.FrozenConfigDict(config),
                         num_classes=num_classes, num_cameras=max(num_cameras, 1))


def dummy_batch(config: ml_collections.ConfigDict, batch: int = 2) -> dict[str, jnp.ndarray]:
  h, w = config.input.height, config.input.width
  return {
      'image': jnp.zeros((batch, h, w, 3), jnp.float32),
      'occluded': jnp.zeros((batch, h, w, 3), jnp.float32),
      'pattern': jnp.zeros((batch,), jnp.int32),
      'pid': jnp.zeros((batch,), jnp.int32),
      'camid': jnp.zeros((batch,), jnp.int32),
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
      baseline=jnp.zeros((), jnp.float32), rng=train_rng)


def create_sharded_state(model, tx, config, mesh, rng):
  """Shape-first init: eval_shape, shardings, then jit(init, out_shardings=...)."""
  init = functools.partial(init_state, model, tx, config)
  abstract = jax.eval_shape(init, rng)
  shardings = parallel.state_shardings(abstract, mesh)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, abstract, shardings


def load_pretrained(state: TrainState, abstract: TrainState, shardings: TrainState,
                    config: ml_collections.ConfigDict) -> TrainState:
  """Puts config.init_from's backbone weights into teacher and student (fresh runs only).

  The momentum buffers need no reset: they are zeros at init whatever the weights are.
  """
  loaded, report = pretrained.load_backbone(abstract.params, config.init_from, config,
                                            fmt=config.init_format)
  if jax.process_index() == 0:
    logging.info('backbone weights from %s:\n%s', config.init_from, report.table())
  params = jax.tree_util.tree_map(
      lambda new, old, sharding: jax.device_put(new, sharding)
      if isinstance(new, np.ndarray) else old, loaded, state.params, shardings.params)
  return state.replace(params=params)


# --------------------------------------------------------------------------------------------
# The step


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model, tx,
               config: ml_collections.ConfigDict, lr_fn) -> tuple[TrainState, dict]:
  """One optimisation step of teacher, student and agent. Pure; jitted by the caller."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  drop_rng, agent_rng = jax.random.split(step_rng)

  def loss_fn(params):
    outputs, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch, train=True,
        rngs={'dropout': drop_rng, 'agent': agent_rng}, mutable=['batch_stats'])
    loss, metrics, baseline = losses.ogfr_loss(outputs, batch, config, state.baseline)
    return loss, (metrics, updates.get('batch_stats', state.batch_stats), baseline)

  grads, (metrics, batch_stats, baseline) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics)
  metrics['grad_norm'] = _global_norm(grads)
  metrics['lr'] = lr_fn(state.step)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, baseline=baseline)
  return new_state, metrics


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))


def jit_train_step(model, tx, config, lr_fn, mesh, state_shardings):
  step = functools.partial(train_step, model=model, tx=tx, config=config, lr_fn=lr_fn)
  batch_shardings = {k: parallel.batch_sharding(mesh) for k in STEP_KEYS}
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, parallel.replicated(mesh)),
                 donate_argnums=0)


# --------------------------------------------------------------------------------------------
# Logging


class Writer:
  """TensorBoard events (tensorboardX) and a metrics.jsonl, written by process 0 only."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self._active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir=os.path.join(workdir, 'tensorboard'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self._active:
      return
    for k, v in values.items():
      self._tb.add_scalar(k, float(v), step)
    self._jsonl.write(json.dumps({'step': step, **{k: float(v) for k, v in values.items()}})
                      + '\n')
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._jsonl.close()


def _mean_metrics(history: list[dict]) -> dict[str, float]:
  host = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


# --------------------------------------------------------------------------------------------
# Evaluation hooks


def write_results(workdir: str, results: dict) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'results.json')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def run_evaluation(model, state: TrainState, test_data, config, mesh, step: int,
                   writer: Writer | None) -> dict:
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  metrics = evaluate.evaluate_dataset(model, variables, test_data, config, mesh)
  result = {test_data.name: {**metrics, 'step': int(step)}}
  logging.info('eval @ step %d on %s: %s', step, test_data.name,
               ', '.join(f'{k}={v:.4f}' for k, v in metrics.items() if isinstance(v, float)))
  if writer is not None:
    writer.scalars(step, {f'eval/{test_data.name}/{k}': v for k, v in metrics.items()
                          if isinstance(v, float)})
  return result


# --------------------------------------------------------------------------------------------
# The loop


def setup(config: ml_collections.ConfigDict, workdir: str):
  """Everything a train or eval run needs: data, mesh, model, optimizer, state, manager."""
  train_data, test_data = load_data(config)
  mesh = parallel.make_mesh(config.mesh)
  global_batch = config.input.ids_per_batch * config.input.images_per_id
  parallel.batch_size_per_device_check(global_batch, mesh, 'the train batch (P x K)')
  parallel.batch_size_per_device_check(config.input.eval_batch_size, mesh,
                                       'config.input.eval_batch_size')
  steps_per_epoch, total_steps = schedule_lengths(config, train_data.train)
  model = build_model(config, train_data.num_train_ids,
                      max(train_data.num_cameras, test_data.num_cameras))
  tx, lr_fn = optim.make_optimizer(config, global_batch, steps_per_epoch, total_steps)
  rng = jax.random.PRNGKey(config.seed)
  state, abstract, shardings = create_sharded_state(model, tx, config, mesh, rng)
  manager = checkpoints.make_manager(workdir, max_to_keep=config.train.keep_checkpoints)
  if config.init_from and manager.latest_step() is None:
    state = load_pretrained(state, abstract, shardings, config)
  return dict(train_data=train_data, test_data=test_data, mesh=mesh, model=model, tx=tx,
              lr_fn=lr_fn, state=state, abstract=abstract,
              shardings=shardings, manager=manager, steps_per_epoch=steps_per_epoch,
              total_steps=total_steps, global_batch=global_batch)


def restore_latest(s: dict):
  step = s['manager'].latest_step()
  if step is None:
    return s['state'], None, 0
  target = checkpoints.abstract_with_shardings(s['abstract'], s['shardings'])
  state, data_state = checkpoints.restore(s['manager'], step, target)
  logging.info('resumed from checkpoint at step %d', step)
  return state, data_state, int(step)


def _batches(it: Iterator[dict]) -> Iterator[dict]:
  for batch in it:
    yield {k: batch[k] for k in STEP_KEYS}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> dict:
  """Trains (resuming from the latest checkpoint in workdir), then evaluates the student.

  `stop_at_step` ends the run early after checkpointing that step, as a preemption would;
  running again continues it. Returns the results written to WORKDIR/results.json ({} when
  stopped early).
  """
  s = setup(config, workdir)
  mesh, model = s['mesh'], s['model']
  if jax.process_index() == 0:
    logging.info('parameters:\n%s', parameter_overview.get_parameter_overview(s['state'].params))
    logging.info('parameter groups: %s', optim.group_sizes(s['state'].params, config.optim))
  state, data_state, start_step = restore_latest(s)
  total_steps, steps_per_epoch = s['total_steps'], s['steps_per_epoch']
  train_iter = pipeline.make_train_iterator(
      s['train_data'].train, config, process_index=jax.process_index(),
      process_count=jax.process_count())
  if data_state is not None:
    train_iter.set_state(data_state)
  step_fn = jit_train_step(model, s['tx'], config, s['lr_fn'], mesh, s['shardings'])
  writer = Writer(workdir)
  eval_every = max(int(config.train.eval_every_epochs * steps_per_epoch), 1)
  logging.info('training %d steps (%d per epoch), global batch %d on %d devices', total_steps,
               steps_per_epoch, s['global_batch'], mesh.size)

  results: dict = {}
  history: list[dict] = []
  t_last, n_last = time.time(), 0
  batches = _batches(train_iter)
  for step in range(start_step, total_steps):
    batch = parallel.global_batch(next(batches), mesh)
    state, metrics = step_fn(state, batch)
    history.append(metrics)  # device arrays: fetched every log_every steps, no sync here
    done = step + 1
    if done % config.train.log_every == 0 or done == total_steps:
      summary = _mean_metrics(history)
      history.clear()
      elapsed = time.time() - t_last
      ips = (done - start_step - n_last) * s['global_batch'] / max(elapsed, 1e-9)
      n_last, t_last = done - start_step, time.time()
      summary['images_per_sec'] = ips
      eta = (total_steps - done) * s['global_batch'] / max(ips, 1e-9)
      logging.info('step %d/%d epoch %.2f | loss %.4f | %s | %.1f img/s | ETA %s', done,
                   total_steps, done / steps_per_epoch, summary.get('loss/total', float('nan')),
                   ' '.join(f'{k}={v:.3g}' for k, v in sorted(summary.items())
                            if k not in ('loss/total', 'images_per_sec')), ips, _format_eta(eta))
      writer.scalars(done, {f'train/{k}': v for k, v in summary.items()})
      if not np.isfinite(summary.get('loss/total', 0.0)):
        s['manager'].wait_until_finished()
        raise FloatingPointError(
            f'non-finite loss at step {done}; the last good checkpoint is kept in '
            f'{s["manager"].directory}')
    stopping = done == stop_at_step
    if done % config.train.checkpoint_every == 0 or done == total_steps or stopping:
      checkpoints.save(s['manager'], done, state, train_iter.get_state(), force=stopping)
    if stopping:
      s['manager'].wait_until_finished()
      writer.close()
      s['manager'].close()
      return {}
    if done % eval_every == 0 and done != total_steps:
      results = run_evaluation(model, state, s['test_data'], config, mesh, done, writer)
  s['manager'].wait_until_finished()
  final_step = int(jax.device_get(state.step))
  results = run_evaluation(model, state, s['test_data'], config, mesh, final_step, writer)
  writer.close()
  write_results(workdir, results)
  s['manager'].close()
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  s = setup(config, workdir)
  state, _, step = restore_latest(s)
  if step == 0:
    raise FileNotFoundError(f'no checkpoint to evaluate in {s["manager"].directory}')
  results = run_evaluation(s['model'], state, s['test_data'], config, s['mesh'], step, None)
  write_results(workdir, results)
  s['manager'].close()
  return results
