"""Training: the train state, the sharded jitted step, and the loop with logging,
periodic evaluation on the student and automatic resume from the latest checkpoint.

Module-level functions (plus the loop's private bookkeeping, `_Progress`); `main.py` calls
`train_and_evaluate` and `evaluate_checkpoint`.

Faults the loop is built to survive (tests/test_faults.py injects each):
- killed at any moment (SIGKILL, also inside a checkpoint write): the same command resumes
  from the last complete checkpoint and, with deterministic settings, ends with the same
  parameters and metrics; lines that the killed run logged after that checkpoint are dropped
  from metrics.jsonl (and hidden in TensorBoard) before they are logged again;
- SIGTERM (preemption notice): checkpoint at the next step boundary, then exit status 143
  (see guards.py; all processes of a multi-process run stop at the same step);
- a non-finite loss or gradient: the step keeps the previous state and reports it;
  config.train.nonfinite_policy='stop' ends the run naming the step, with no checkpoint
  written past it, 'skip' goes on and counts skipped steps in the metrics;
- an exception anywhere in the loop (a corrupt image under the 'fail' policy, ...): checkpoints
  already being written are completed before it propagates.
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
from ogfr_jax import guards
from ogfr_jax import losses
from ogfr_jax import manifest
from ogfr_jax import optim
from ogfr_jax import parallel
from ogfr_jax import prefetch
from ogfr_jax import pretrained
from ogfr_jax.data import augment
from ogfr_jax.data import datasets as datasets_lib
from ogfr_jax.data import pipeline
from ogfr_jax.data import synthetic
from ogfr_jax.models import ogfr as ogfr_model

# The keys of an input batch that the train step consumes (occ_mask stays on the host unless
# the student's occluder head trains on it: `step_keys`).
STEP_KEYS = ('image', 'occluded', 'pattern', 'pid', 'camid')
# Pixel batches (uint8 from the pipeline) that the step normalises on the device.
IMAGE_KEYS = ('image', 'occluded')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  baseline: jax.Array  # moving-average reward baseline of the agent
  rng: jax.Array
  # Updates skipped because the loss or a gradient was not finite (kept with the state, so
  # the count survives restarts and is exact without a host sync per step).
  nonfinite_steps: Any = 0


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
  steps_per_epoch = pipeline.steps_per_epoch(train_split, config)  # honours train.steps_per_epoch
  if steps_per_epoch < 1:
    raise ValueError(
        f'the training split has too few identities/images for one batch of '
        f'{config.input.ids_per_batch} x {config.input.images_per_id}')
  return steps_per_epoch, int(config.train.epochs * steps_per_epoch)


# --------------------------------------------------------------------------------------------
# Model and state


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                num_cameras: int) -> ogfr_model.OGFR:
  return ogfr_model.OGFR(config=ogfr_model.freeze_config(config),
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
      baseline=jnp.zeros((), jnp.float32), rng=train_rng,
      nonfinite_steps=jnp.zeros((), jnp.int32))


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
  """One optimisation step of teacher, student and agent. Pure; jitted by the caller.

  When the loss or the gradient norm is not finite the step still counts (the batch is used
  up) but parameters, optimizer state, BN statistics and the reward baseline keep their
  previous values; metrics 'guard/nonfinite' (this step, 0 or 1) and 'guard/nonfinite_total'
  report it, and the loop applies config.train.nonfinite_policy when it fetches them.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  drop_rng, agent_rng = jax.random.split(step_rng)
  batch = {**batch, **{k: augment.normalize_on_device(batch[k], config.input.mean,
                                                      config.input.std) for k in IMAGE_KEYS}}

  def loss_fn(params):
    outputs, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch, train=True,
        rngs={'dropout': drop_rng, 'agent': agent_rng}, mutable=['batch_stats'])
    loss, metrics, baseline = losses.ogfr_loss(outputs, batch, config, state.baseline)
    return loss, (metrics, updates.get('batch_stats', state.batch_stats), baseline)

  (loss, (metrics, batch_stats, baseline)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  grad_norm = _global_norm(grads)
  finite = guards.is_finite(loss, grad_norm)
  params, opt_state = _update_if_finite(finite, tx, grads, state.params, state.opt_state)
  batch_stats, baseline = guards.finite_update(
      finite, (batch_stats, baseline), (state.batch_stats, state.baseline))
  nonfinite_steps = jnp.asarray(state.nonfinite_steps, jnp.int32) + (~finite).astype(jnp.int32)
  metrics = dict(metrics)
  metrics['grad_norm'] = grad_norm
  metrics['lr'] = lr_fn(state.step)
  metrics['guard/nonfinite'] = (~finite).astype(jnp.float32)
  metrics['guard/nonfinite_total'] = nonfinite_steps.astype(jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, baseline=baseline,
                            nonfinite_steps=nonfinite_steps)
  return new_state, metrics


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))


def _update_if_finite(finite: jax.Array, tx, grads, params, opt_state):
  """(params, opt_state) after the optimizer update when `finite`, else as they were.

  On the CPU the update runs under lax.cond, so every leaf is updated in place in its donated
  buffer. Written as a select after the update (guards.finite_update), XLA:CPU fuses the
  optimizer arithmetic into both the parameter and the momentum select, each of which then
  reads the other's old value, so it first copies every parameter and momentum buffer: on
  ViT-B OGFR (172.8 M parameters) the update took 0.73 s of CPU time that way and 0.23 s
  under the cond. GPUs and TPUs keep the select, which they fuse into the update kernels; a
  conditional on a GPU reads its predicate back to the host.
  """
  def update(operands):
    params, opt_state = operands
    updates, new_opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt_state

  if jax.default_backend() == 'cpu':
    return jax.lax.cond(finite, update, lambda operands: operands, (params, opt_state))
  return guards.finite_update(finite, update((params, opt_state)), (params, opt_state))


def step_keys(config) -> tuple[str, ...]:
  """The batch keys the train step of `config` reads."""
  return STEP_KEYS + (('occ_mask',) if config.model.get('student_erase', False) else ())


def jit_train_step(model, tx, config, lr_fn, mesh, state_shardings):
  step = functools.partial(train_step, model=model, tx=tx, config=config, lr_fn=lr_fn)
  batch_shardings = {k: parallel.batch_sharding(mesh) for k in step_keys(config)}
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, parallel.replicated(mesh)),
                 donate_argnums=0)


# --------------------------------------------------------------------------------------------
# Logging


def _read_jsonl(path: str) -> tuple[list[dict], int]:
  """(rows, number of unreadable lines) of a metrics.jsonl; a kill can cut the last line."""
  rows, broken = [], 0
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        broken += 1
  return rows, broken


def truncate_metrics(path: str, resume_step: int, *, redo_eval: bool = False) -> int:
  """Drops the lines of metrics.jsonl logged after `resume_step`; returns how many went.

  A run killed after its last checkpoint logged steps that the resumed run computes (and logs)
  again; without this the file would hold two values for those steps. Lines cut short by the
  kill go too, and with `redo_eval` the evaluation logged at `resume_step` itself (the final
  one, which follows the last checkpoint and runs again). The file is replaced atomically.
  """
  rows, broken = _read_jsonl(path)

  def kept(row: dict) -> bool:
    step = int(row.get('step', 0))
    if redo_eval and step == resume_step and any(k.startswith('eval/') for k in row):
      return False
    return step <= resume_step

  keep = [r for r in rows if kept(r)]
  dropped = len(rows) - len(keep) + broken
  if dropped:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in keep)
    os.replace(tmp, path)
  return dropped


class Writer:
  """TensorBoard events (tensorboardX) and a metrics.jsonl, written by process 0 only.

  `resume_step`: the step the run continues from. Anything logged after it by an earlier,
  interrupted run is dropped from metrics.jsonl and hidden in TensorBoard (purge_step), since
  those steps are about to be logged again; `redo_eval`: so is an evaluation at resume_step.
  """

  def __init__(self, workdir: str, resume_step: int = 0, *, redo_eval: bool = False):
    self._active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self._active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      path = os.path.join(workdir, 'metrics.jsonl')
      if os.path.exists(path):
        dropped = truncate_metrics(path, resume_step, redo_eval=redo_eval)
        if dropped:
          logging.info('%s: dropped %d lines logged after step %d by an interrupted run; those '
                       'steps are run and logged again', path, dropped, resume_step)
      tb_dir = os.path.join(workdir, 'tensorboard')
      purge_step = resume_step + 1 if os.path.isdir(tb_dir) else None
      self._tb = SummaryWriter(logdir=tb_dir, purge_step=purge_step)
      self._jsonl = open(path, 'a')

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
    if self._active and self._jsonl is not None:
      self._tb.close()
      self._jsonl.close()
      self._jsonl = None


def summarize(history: list[dict]) -> dict[str, float]:
  """Host summary of a logging window of per-step metrics.

  Means over the window, leaving out steps whose update was skipped as non-finite (their loss
  is NaN and says nothing about the others); 'guard/nonfinite_steps' counts those steps and
  'guard/nonfinite_total' is the run's count so far.
  """
  host = jax.device_get(history)
  bad = np.array([float(h.get('guard/nonfinite', 0.0)) > 0 for h in host])
  use = ~bad if (~bad).any() else np.ones_like(bad)
  out = {}
  for key in host[0]:
    values = np.array([float(h[key]) for h in host], np.float64)
    if key == 'guard/nonfinite':
      out['guard/nonfinite_steps'] = float(values.sum())
    elif key == 'guard/nonfinite_total':
      out[key] = float(values[-1])
    else:
      out[key] = float(np.mean(values[use]))
  return out


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def _global_sum(local: int) -> int:
  """Sum of a host integer over processes (collective when there are several)."""
  if jax.process_count() == 1:
    return int(local)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.sum(multihost_utils.process_allgather(np.int32(local))))


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
  """Everything a train or eval run needs: data, mesh, model, optimizer, state, manager.

  The checks that need no data come first, so a config that cannot run fails before anything
  is read, generated or written.
  """
  mesh = parallel.make_mesh(config.mesh)
  global_batch = config.input.ids_per_batch * config.input.images_per_id
  parallel.batch_size_per_device_check(
      global_batch, mesh,
      'the global train batch config.input.ids_per_batch x config.input.images_per_id')
  parallel.batch_size_per_device_check(config.input.eval_batch_size, mesh,
                                       'config.input.eval_batch_size')
  guards.check_policy(config.train.get('nonfinite_policy', 'stop'))
  train_data, test_data = load_data(config)
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
  """(state, input iterator state or None, step) of the latest complete checkpoint.

  A checkpoint that does not fit the model of this config raises ValueError naming the
  workdir and the arrays that differ (checkpoints.check_compatible).
  """
  step = s['manager'].latest_step()
  if step is None:
    return s['state'], None, 0
  target = checkpoints.abstract_with_shardings(s['abstract'], s['shardings'])
  state, data_state = checkpoints.restore(s['manager'], step, target)
  logging.info('resumed from checkpoint at step %d', step)
  return state, data_state, int(step)


def _batches(it: Iterator[dict]) -> Iterator[dict]:
  for batch in it:
    yield dict(batch)


def _to_devices(batch: dict, mesh, keys: tuple[str, ...] = STEP_KEYS) -> dict[str, jax.Array]:
  """The step's keys of a host batch as global arrays (the prefetch thread calls this)."""
  return parallel.global_batch({k: batch[k] for k in keys}, mesh)


class _Progress:
  """Bookkeeping of one train loop: the pending metrics window, what was saved, the policy.

  Keeps the rule that under nonfinite_policy='stop' every step up to a checkpoint has been
  checked before the checkpoint is written.
  """

  def __init__(self, config, s: dict, writer: Writer, train_iter, start_step: int,
               saved_step: int | None):
    self.config, self.writer, self.train_iter = config, writer, train_iter
    self.manager = s['manager']
    self.total_steps, self.steps_per_epoch = s['total_steps'], s['steps_per_epoch']
    self.global_batch = s['global_batch']
    self.policy = guards.check_policy(config.train.get('nonfinite_policy', 'stop'))
    self.start_step = start_step
    self.saved_step = saved_step  # latest checkpoint written or being written
    self.history: list[dict] = []
    self.corrupt_logged = 0
    self.t_last, self.n_last = time.time(), 0

  def _nonfinite_error(self, step: int, entry: dict) -> FloatingPointError:
    values = jax.device_get({k: entry[k] for k in ('loss/total', 'grad_norm') if k in entry})
    loss, grad_norm = (float(values.get(k, np.nan)) for k in ('loss/total', 'grad_norm'))
    where = str(self.manager.directory)
    kept = (f'The last good checkpoint, step {self.saved_step}, is kept in {where}.'
            if self.saved_step else f'No checkpoint was written in {where}.')
    return FloatingPointError(
        f'non-finite loss or gradients at step {step} (loss {loss:.4g}, gradient norm '
        f'{grad_norm:.4g}); that update was not '
        f'applied and the run stops (config.train.nonfinite_policy=stop). {kept} Lower '
        'config.optim.lr, set config.optim.grad_clip, or pass '
        '--config.train.nonfinite_policy=skip to skip such updates.')

  def _first_nonfinite(self, done: int) -> int | None:
    first = done - len(self.history) + 1
    return guards.first_nonfinite([h['guard/nonfinite'] for h in self.history], first)

  def log_window(self, done: int) -> None:
    """Fetches the pending metrics, logs them, and applies the non-finite policy."""
    if not self.history:
      return
    first = done - len(self.history) + 1
    summary = summarize(self.history)
    bad_step = (self._first_nonfinite(done) if summary.get('guard/nonfinite_steps', 0) > 0
                else None)
    bad_entry = self.history[bad_step - first] if bad_step is not None else None
    self.history = []
    elapsed = time.time() - self.t_last
    ips = (done - self.start_step - self.n_last) * self.global_batch / max(elapsed, 1e-9)
    self.n_last, self.t_last = done - self.start_step, time.time()
    summary['images_per_sec'] = ips
    corrupt = _global_sum(self.train_iter.num_skipped)
    summary['input/corrupt_images_skipped'] = corrupt
    eta = (self.total_steps - done) * self.global_batch / max(ips, 1e-9)
    quiet = ('loss/total', 'images_per_sec')
    logging.info('step %d/%d epoch %.2f | loss %.4f | %s | %.1f img/s | ETA %s', done,
                 self.total_steps, done / self.steps_per_epoch,
                 summary.get('loss/total', float('nan')),
                 ' '.join(f'{k}={v:.3g}' for k, v in sorted(summary.items()) if k not in quiet),
                 ips, _format_eta(eta))
    self.writer.scalars(done, {f'train/{k}': v for k, v in summary.items()})
    if corrupt > self.corrupt_logged:
      logging.warning('%d corrupt training image(s) replaced by another image of the same '
                      'identity so far (config.input.corrupt_image_policy=skip); the file names '
                      'are in the warnings above', corrupt)
      self.corrupt_logged = corrupt
    if bad_step is not None:
      if self.policy == 'stop':
        raise self._nonfinite_error(bad_step, bad_entry)
      logging.warning('skipped %d update(s) with a non-finite loss or gradient in steps %d-%d '
                      '(first at step %d; %d in this run so far): the state was left as before '
                      'each of them (config.train.nonfinite_policy=skip)',
                      int(summary['guard/nonfinite_steps']), first, done, bad_step,
                      int(summary.get('guard/nonfinite_total', 0)))

  def verify(self, done: int) -> None:
    """Under the 'stop' policy, checks the steps not yet logged; raises on a non-finite one.

    Called before anything is saved or evaluated: a host sync, but both need the state on the
    host anyway.
    """
    if self.policy != 'stop' or not self.history:
      return
    bad_step = self._first_nonfinite(done)
    if bad_step is not None:
      raise self._nonfinite_error(bad_step,
                                  self.history[bad_step - (done - len(self.history) + 1)])

  def save(self, done: int, state: TrainState, *, force: bool = False) -> None:
    """Checkpoints `state` (after `done` steps) unless it is already saved."""
    if self.saved_step == done:
      return
    self.verify(done)
    checkpoints.save(self.manager, done, state, self.train_iter.get_state(), force=force)
    self.saved_step = done

  def stop(self, done: int, state: TrainState, reason: str) -> None:
    """Final checkpoint of a stop request, waits for it, then raises guards.Preempted."""
    self.log_window(done)  # steps before the checkpoint are not run again: log them now
    self.save(done, state, force=True)
    self.manager.wait_until_finished()
    message = (f'stopped at step {done}/{self.total_steps} on {reason}: the checkpoint of step '
               f'{done} is in {self.manager.directory}; run the same command to resume (exit '
               f'status {guards.PREEMPTED_EXIT_CODE})')
    logging.warning(message)
    raise guards.Preempted(message)


def _finish(manager, writer: Writer, train_iter) -> None:
  """Completes checkpoints in flight and releases files and input workers, also on errors."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    logging.error('a checkpoint being written failed: %s', e)
  writer.close()
  train_iter.close()
  manager.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> dict:
  """Trains (resuming from the latest checkpoint in workdir), then evaluates the student.

  `stop_at_step` ends the run early after checkpointing that step, as a preemption would;
  running again continues it. Returns the results written to WORKDIR/results.json ({} when
  stopped early).

  Raises guards.Preempted (a SystemExit with status 143) after checkpointing on SIGTERM, and
  FloatingPointError on a non-finite step under config.train.nonfinite_policy='stop'.
  """
  t_start = time.time()  # wall time of this invocation (a resumed run reports its own part)
  s = setup(config, workdir)
  mesh, model, manager = s['mesh'], s['model'], s['manager']
  if jax.process_index() == 0:
    # Shapes only: under FSDP the values span devices of other processes.
    logging.info('parameters:\n%s', parameter_overview.get_parameter_overview(
        s['abstract'].params, include_stats=False))
    logging.info('parameter groups: %s', optim.group_sizes(s['state'].params, config.optim))
  state, data_state, start_step = restore_latest(s)
  total_steps, steps_per_epoch = s['total_steps'], s['steps_per_epoch']
  train_iter = pipeline.make_train_iterator(
      s['train_data'].train, config, process_index=jax.process_index(),
      process_count=jax.process_count())
  if data_state is not None:
    train_iter.set_state(data_state)
  # Batches reach the step already on the devices; checkpoints take the input state of the
  # last batch consumed, not of those read ahead (prefetch.py).
  train_iter = prefetch.DevicePrefetcher(
      train_iter, functools.partial(_to_devices, mesh=mesh, keys=step_keys(config)),
      size=int(config.input.get('device_prefetch', 2)))
  # Periodic evaluations come before the checkpoint of their step and are kept; the final one
  # follows the last checkpoint, so a run resumed there evaluates (and logs) it again.
  writer = Writer(workdir, resume_step=start_step, redo_eval=start_step == total_steps)
  try:
    step_fn = jit_train_step(model, s['tx'], config, s['lr_fn'], mesh, s['shardings'])
    eval_every = max(int(config.train.eval_every_epochs * steps_per_epoch), 1)
    logging.info('training %d steps (%d per epoch), global batch %d on %d devices', total_steps,
                 steps_per_epoch, s['global_batch'], mesh.size)
    progress = _Progress(config, s, writer, train_iter, start_step,
                         start_step if data_state is not None else None)
    stop = guards.StopRequest(check_every=int(config.train.get('stop_check_every', 10)))
    results: dict = {}
    batches = _batches(train_iter)
    with stop:
      for step in range(start_step, total_steps):
        if stop.should_stop(step):
          progress.stop(step, state, stop.received)
        try:
          batch = next(batches)
        except Exception:
          if stop.received is None or stop.mode != 'local':
            raise
          # Input workers may die of the same signal before the loop gets to stop: the state
          # after `step` steps is still whole and is what the checkpoint holds. (Only in a
          # single process: elsewhere the others would wait for this one in the save.)
          logging.exception('the input pipeline failed after %s', stop.received)
          progress.stop(step, state, stop.received)
        state, metrics = step_fn(state, batch)
        progress.history.append(metrics)  # device arrays: fetched every log_every steps
        done = step + 1
        if done % config.train.log_every == 0 or done == total_steps:
          progress.log_window(done)
        # Evaluation before the checkpoint of the same step: a run killed during it resumes
        # from the checkpoint before and evaluates again, so no evaluation is ever lost.
        if done % eval_every == 0 and done != total_steps:
          progress.verify(done)
          results = run_evaluation(model, state, s['test_data'], config, mesh, done, writer)
        stopping = done == stop_at_step
        if done % config.train.checkpoint_every == 0 or done == total_steps or stopping:
          progress.save(done, state, force=stopping)
        if stopping:
          return {}
    manager.wait_until_finished()
    final_step = int(jax.device_get(state.step))
    results = run_evaluation(model, state, s['test_data'], config, mesh, final_step, writer)
    results['manifest'] = manifest.run_manifest(config, wall_time_s=time.time() - t_start,
                                                start_time=t_start)
    write_results(workdir, results)
    return results
  finally:
    _finish(manager, writer, train_iter)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  s = setup(config, workdir)
  try:
    state, _, step = restore_latest(s)
    if step == 0:
      raise FileNotFoundError(f'no checkpoint to evaluate in {s["manager"].directory}')
    results = run_evaluation(s['model'], state, s['test_data'], config, s['mesh'], step, None)
    write_results(workdir, results)
  finally:
    s['manager'].close()
  return results
