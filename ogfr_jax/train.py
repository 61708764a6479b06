"""The training loop: set-up, resume from the latest checkpoint, the steps with logging,
periodic evaluation of the student and checkpoints.

Its parts live beside it: train_state.py (the state and its sharded init), train_step.py (the
pure step and its jit), writers.py (TensorBoard and metrics.jsonl), evaluator.py (evaluation
and results.json), data/loading.py (the datasets of a run). `main.py` calls
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
  already being written are completed before it propagates;
- a checkpoint that cannot be written (disk full): the run stops at the next step (one
  process) or save, with one error naming the step and the last good checkpoint;
- a run that is refused (a workdir or checkpoint of another config, a dataset that cannot be
  read): nothing is written before every check passed, so the workdir is left as it was.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview

from ogfr_jax import checkpoints
from ogfr_jax import console
from ogfr_jax import evaluator
from ogfr_jax import guards
from ogfr_jax import losses
from ogfr_jax import manifest
from ogfr_jax import optim
from ogfr_jax import parallel
from ogfr_jax import precision
from ogfr_jax import prefetch
from ogfr_jax import pretrained
from ogfr_jax import run_config
from ogfr_jax import train_state
from ogfr_jax import train_step as step_lib
from ogfr_jax import writers
from ogfr_jax.data import loading
from ogfr_jax.data import pipeline
from ogfr_jax.models import build
from ogfr_jax.train_state import TrainState
from ogfr_jax.writers import Writer


def setup(config: ml_collections.ConfigDict, workdir: str, *, resume: bool = True):
  """Everything a train or eval run needs: data, mesh, model, optimizer, state, manager.

  The checks that need no data come first, so a config that cannot run fails before anything
  is read, generated or written. Nothing is written in the workdir: the manager only reads
  (`open_workdir` makes the one that writes, once every check has passed). The state holds
  the config.init_from weights when the run starts afresh (resume=False, or no checkpoint).
  """
  mesh = parallel.make_mesh(config.mesh)
  global_batch = config.input.ids_per_batch * config.input.images_per_id
  parallel.batch_size_per_device_check(
      global_batch, mesh,
      'the global train batch config.input.ids_per_batch x config.input.images_per_id')
  parallel.batch_size_per_device_check(config.input.eval_batch_size, mesh,
                                       'config.input.eval_batch_size')
  guards.check_policy(config.train.nonfinite_policy)
  train_data, test_data = loading.load_data(config)
  steps_per_epoch, total_steps = loading.schedule_lengths(config, train_data.train)
  model = build.build_model(config, train_data.num_train_ids,
                      max(train_data.num_cameras, test_data.num_cameras))
  tx, lr_fn = optim.make_optimizer(config, global_batch, steps_per_epoch, total_steps)
  rng = jax.random.PRNGKey(config.seed)
  state, abstract, shardings = train_state.create_sharded_state(model, tx, config, mesh, rng)
  manager = checkpoints.make_manager(workdir, max_to_keep=config.train.keep_checkpoints,
                                     config=config, train_split=train_data.train,
                                     writable=False)
  weights = None  # the import report of config.init_from, when this invocation imports it
  if config.init_from and (not resume or manager.latest_step() is None):
    try:
      state, weights = train_state.load_pretrained(state, abstract, shardings, config)
    except BaseException:
      release_manager(manager)
      raise
  return dict(train_data=train_data, test_data=test_data, mesh=mesh, model=model, tx=tx,
              lr_fn=lr_fn, state=state, abstract=abstract,
              shardings=shardings, manager=manager, steps_per_epoch=steps_per_epoch,
              total_steps=total_steps, global_batch=global_batch, weights=weights,
              layout=parallel.describe_layout(abstract, shardings, mesh))


def release_manager(manager) -> None:
  """Closes a checkpoint manager, first waiting for the clean-up of its folder that orbax
  starts in a thread when the manager is made (close() does not wait for it, and a process
  that exits while it runs prints that thread's traceback)."""
  wait = getattr(manager, '_maybe_await_cleanup_tmp_directory', None)
  if wait is not None:
    wait()
  manager.close()


def restore_latest(s: dict):
  """(state, input iterator state or None, step) of the newest checkpoint that restores.

  Every checkpoint is checked against this run before it is used: its array shapes against
  the model of this config, its recorded config and training data against this run's (both
  raise checkpoints.CheckpointMismatch, a ValueError naming the workdir and what differs), and
  its arrays against the checksums written with them. A damaged step (unreadable, cut short,
  failing its checksums) is moved to checkpoints/corrupt-<step> and the one before it is
  used, unless config.train.damaged_checkpoint='refuse' (checkpoints.restore_newest).
  """
  target = checkpoints.abstract_with_shardings(s['abstract'], s['shardings'])
  state, data_state, step = checkpoints.restore_newest(s['manager'], target)
  if state is None:
    return s['state'], None, 0
  logging.info('resumed from checkpoint at step %d', step)
  return state, data_state, int(step)


def restore_checked(s: dict, config: ml_collections.ConfigDict,
                    check: run_config.WorkdirCheck):
  """`restore_latest`, except where the run starts afresh: --overwrite over the run of
  another config, found in config.json (check.discard) or in the checkpoint's own record
  (CheckpointMismatch, which then sets check.discard). Reads only."""
  if not check.discard:
    try:
      return restore_latest(s)
    except checkpoints.CheckpointMismatch:
      if not check.overwrite:
        raise
      check.discard = True
  if config.init_from and s.get('weights') is None:
    s['state'], s['weights'] = train_state.load_pretrained(s['state'], s['abstract'],
                                                           s['shardings'], config)
  return s['state'], None, 0


def open_workdir(s: dict, config: ml_collections.ConfigDict, check: run_config.WorkdirCheck
                 ) -> None:
  """Once every check has passed: writes config.json and manifest.json (after deleting the
  checkpoints of another run under --overwrite) and replaces s['manager'] by one that writes
  (it removes the unfinished steps of a killed run)."""
  run_config.write_workdir(check, config, layout=s['layout'])
  release_manager(s['manager'])
  s['manager'] = checkpoints.make_manager(
      check.workdir, max_to_keep=config.train.keep_checkpoints, config=config,
      train_split=s['train_data'].train)


def _batches(it: Iterator[dict]) -> Iterator[dict]:
  for batch in it:
    yield dict(batch)


def _to_devices(batch: dict, mesh, keys: tuple[str, ...] = step_lib.STEP_KEYS) -> dict[str, jax.Array]:
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
    self.policy = guards.check_policy(config.train.nonfinite_policy)
    self.start_step = start_step
    self.saved_step = saved_step  # latest checkpoint written or being written
    self.history: list[dict] = []
    self.corrupt_logged = 0
    self.t_last, self.n_last = time.time(), 0
    self.display = console.ProgressDisplay(self.total_steps, self.steps_per_epoch,
                                           self.global_batch, start_step,
                                           loss_weights=losses.active_terms(config))

  def _kept_checkpoint(self, what: str) -> str:
    where = str(self.manager.directory)
    return (f'The {what}, step {self.saved_step}, is kept in {where}.'
            if self.saved_step else f'No checkpoint was written in {where}.')

  def _nonfinite_error(self, step: int, entry: dict) -> FloatingPointError:
    values = jax.device_get({k: entry[k] for k in ('loss/total', 'grad_norm') if k in entry})
    loss, grad_norm = (float(values.get(k, np.nan)) for k in ('loss/total', 'grad_norm'))
    kept = self._kept_checkpoint('last good checkpoint')
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
    summary = writers.summarize(self.history)
    bad_step = (self._first_nonfinite(done) if summary.get('guard/nonfinite_steps', 0) > 0
                else None)
    bad_entry = self.history[bad_step - first] if bad_step is not None else None
    self.history = []
    elapsed = time.time() - self.t_last
    ips = (done - self.start_step - self.n_last) * self.global_batch / max(elapsed, 1e-9)
    self.n_last, self.t_last = done - self.start_step, time.time()
    summary['images_per_sec'] = ips
    corrupt = writers.global_sum(self.train_iter.num_skipped)
    summary['input/corrupt_images_skipped'] = corrupt
    eta = (self.total_steps - done) * self.global_batch / max(ips, 1e-9)
    quiet = ('loss/total', 'images_per_sec')
    # Every metric in the log (with --verbosity=0) and the writer; a few on the console.
    logging.info('step %d/%d epoch %.2f | loss %.4f | %s | %.1f img/s | ETA %s', done,
                 self.total_steps, done / self.steps_per_epoch,
                 summary.get('loss/total', float('nan')),
                 ' '.join(f'{k}={v:.3g}' for k, v in sorted(summary.items()) if k not in quiet),
                 ips, writers.format_eta(eta))
    self.display.report(done, summary, ips)
    self.writer.scalars(done, {f'train/{k}': v
                               for k, v in writers.drop_redundant(summary, self.config).items()})
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
      self._check_skipped_share(done, int(summary.get('guard/nonfinite_total', 0)))

  def _check_skipped_share(self, done: int, skipped: int) -> None:
    """Under the 'skip' policy: stops the run once more than config.train.max_skipped_share
    of its total steps were skipped (a run that barely trained must not write results)."""
    share = float(self.config.train.max_skipped_share)
    if skipped <= share * self.total_steps:
      return
    kept = self._kept_checkpoint('last checkpoint')
    raise FloatingPointError(
        f'{skipped} of the {done} steps so far were skipped for a non-finite loss or gradient, '
        f'more than config.train.max_skipped_share={share:g} of the run\'s {self.total_steps} '
        f'steps: the run stops without results (config.train.nonfinite_policy=skip). {kept} '
        'Lower config.optim.lr or set config.optim.grad_clip; '
        '--config.train.max_skipped_share=1 lets such a run go on.')

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


def header_notes(s: dict, config: ml_collections.ConfigDict) -> list[str]:
  """Extra start-up lines printed at the end of the run's header: the backbone weights, what
  the progress line's loss terms are and, when some array is split over devices, how the
  state is laid out (the devices line already names the mesh); one string per line."""
  notes = list(pretrained.header_lines(s.get('weights'), config))
  notes.append(console.loss_legend(losses.active_terms(config)))
  layout = s['layout']
  if any(layout[k]['num_split'] for k in ('params', 'optimizer')):
    notes += ['sharding:'] + parallel.layout_lines(layout)[1:]
  return notes


def _count(n: int) -> str:
  return f'{n:,d}'


def print_header(s: dict, config: ml_collections.ConfigDict, workdir: str, config_name: str,
                 start_step: int = 0, mode: str = 'train') -> list[str]:
  """The run's header on the console (process 0): config, data, model, devices, schedule,
  workdir, then `header_notes`. Returns the lines."""
  train, test = s['train_data'], s['test_data']
  t = train.train.stats()
  q, g = test.query.stats(), test.gallery.stats()
  mesh = s['mesh']
  slices = int(s['layout']['mesh'].get('slices', 1))
  devices = jax.devices()
  kinds = sorted({d.platform for d in devices})
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s['abstract'].params))
  b = config.input
  eval_every = max(int(config.train.eval_every_epochs * s['steps_per_epoch']), 1)
  evals = (f'eval every {eval_every} steps' if eval_every < s['total_steps']
           else 'eval at the end')
  fields = [
      ('train', f'{train.name}: {_count(t["ids"])} ids, {_count(t["images"])} images, '
                f'{t["cameras"]} cameras ({console.short_path(train.root)})'),
      ('test', f'{test.name}: query {_count(q["images"])} images / {_count(q["ids"])} ids, '
               f'gallery {_count(g["images"])} images / {_count(g["ids"])} ids'),
      ('model', f'{config.model.size} ViT, patch {config.model.patch_size} stride '
                f'{config.model.stride}, {b.height}x{b.width} input; '
                f'{_count(n_params)} parameters'),
      ('precision', precision.describe(config)),
      ('devices', f'{len(devices)} x {"/".join(kinds)} in {jax.process_count()} process(es); '
                  f'mesh ' + ' x '.join(f'{k}={v}' for k, v in mesh.shape.items())
                  + (f' over {slices} slices' if slices > 1 else '')),
  ]
  if mode == 'train':
    fields.append(('schedule', f'{s["total_steps"]} steps = {config.train.epochs} epochs x '
                               f'{s["steps_per_epoch"]}, batch {s["global_batch"]} '
                               f'({b.ids_per_batch} ids x {b.images_per_id}); {evals}, '
                               f'checkpoint every {config.train.checkpoint_every}'))
  fields.append(('workdir', console.short_path(workdir)
                 + (f' (resuming from step {start_step})' if start_step else '')))
  title = f'OGFR {mode}: {config_name}' if config_name else f'OGFR {mode}'
  return console.header(title, fields, header_notes(s, config))


def _print_end(workdir: str, results: dict, step: int, wall_time_s: float | None,
               trained: bool) -> None:
  """The results table and the paths written, at the end of a run (process 0)."""
  def at(*parts):
    return console.short_path(os.path.join(workdir, *parts))
  written = [('results', at('results.json'))]
  if trained:
    written += [('metrics', f'{at("metrics.jsonl")}, TensorBoard {at("tensorboard")}'),
                ('checkpoint', at('checkpoints', str(step))), ('config', at('config.json')),
                ('manifest', at('manifest.json'))]
  console.print_final(results, written, wall_time_s)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None, config_name: str = '',
                       overwrite: bool = False) -> dict:
  """Trains (resuming from the latest checkpoint in workdir), then evaluates the student.

  The workdir is written to (config.json, manifest.json, checkpoints, logs) only after every
  check passed: its config.json (run_config.check_workdir), the data, the model, and the
  identity of its newest checkpoint. A refused run leaves it as it was. `overwrite` starts
  afresh over the run of another config (its checkpoints are deleted).

  `stop_at_step` ends the run early after checkpointing that step, as a preemption would;
  running again continues it. Returns the results written to WORKDIR/results.json ({} when
  stopped early). `config_name` (the config file) titles the console header.

  Raises guards.Preempted (a SystemExit with status 143) after checkpointing on SIGTERM, and
  FloatingPointError on a non-finite step under config.train.nonfinite_policy='stop'.
  """
  t_start = time.time()  # wall time of this invocation (a resumed run reports its own part)
  check = run_config.check_workdir(workdir, config, overwrite=overwrite)
  s = setup(config, workdir, resume=not check.discard)
  mesh, model = s['mesh'], s['model']
  # A fault before the loop (a checkpoint that does not fit, a bad occlusion setting, ...)
  # releases the checkpoint manager (release_manager).
  try:
    state, data_state, start_step = restore_checked(s, config, check)
    if jax.process_index() == 0:
      # Shapes only: under FSDP the values span devices of other processes.
      logging.info('parameters:\n%s', parameter_overview.get_parameter_overview(
          s['abstract'].params, include_stats=False))
      logging.info('parameter groups: %s', optim.group_sizes(s['state'].params, config.optim))
    print_header(s, config, workdir, config_name, start_step)
    total_steps, steps_per_epoch = s['total_steps'], s['steps_per_epoch']
    train_iter = pipeline.make_train_iterator(
        s['train_data'].train, config, process_index=jax.process_index(),
        process_count=jax.process_count())
    if data_state is not None:
      train_iter.set_state(data_state)
    open_workdir(s, config, check)  # every check passed: the first write in the workdir
    manager = s['manager']
    # Batches reach the step already on the devices; checkpoints take the input state of the
    # last batch consumed, not of those read ahead (prefetch.py).
    train_iter = prefetch.DevicePrefetcher(
        train_iter, functools.partial(_to_devices, mesh=mesh, keys=step_lib.step_keys(config)),
        size=config.input.device_prefetch)
    # Periodic evaluations come before the checkpoint of their step and are kept; the final one
    # follows the last checkpoint, so a run resumed there evaluates (and logs) it again.
    writer = Writer(workdir, resume_step=start_step, redo_eval=start_step == total_steps,
                    config=config)
  except BaseException:
    if 'train_iter' in locals():
      train_iter.close()
    release_manager(s['manager'])
    raise
  try:
    step_fn = step_lib.jit_train_step(model, s['tx'], config, s['lr_fn'], mesh, s['shardings'],
                                      steps_per_epoch)
    eval_every = max(int(config.train.eval_every_epochs * steps_per_epoch), 1)
    logging.info('training %d steps (%d per epoch), global batch %d on %d devices', total_steps,
                 steps_per_epoch, s['global_batch'], mesh.size)
    progress = _Progress(config, s, writer, train_iter, start_step,
                         start_step if data_state is not None else None)
    display = progress.display
    stop = guards.StopRequest(check_every=config.train.stop_check_every)
    results: dict = {}
    batches = _batches(train_iter)
    with stop:
      for step in range(start_step, total_steps):
        manager.check_writes()  # a checkpoint that failed to write ends the run here
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
        if len(progress.history) > 1:
          # One step in flight at most besides this one. Dispatch is asynchronous: unchecked,
          # the host runs up to log_every steps ahead of the devices, and a SIGTERM or a
          # failed checkpoint write would be acted on only after all of them.
          jax.block_until_ready(progress.history[-2])
        done = step + 1
        display.advance(done)
        if done % config.train.log_every == 0 or done == total_steps:
          progress.log_window(done)
        # Evaluation before the checkpoint of the same step: a run killed during it resumes
        # from the checkpoint before and evaluates again, so no evaluation is ever lost.
        if done % eval_every == 0 and done != total_steps:
          progress.verify(done)
          results = evaluator.run_evaluation(model, state, s['test_data'], config, mesh, done,
                                             writer)
        stopping = done == stop_at_step
        if done % config.train.checkpoint_every == 0 or done == total_steps or stopping:
          progress.save(done, state, force=stopping)
        if stopping:
          return {}
    manager.wait_until_finished()
    final_step = int(jax.device_get(state.step))
    results = evaluator.final_evaluation(model, state, s['train_data'], s['test_data'], config,
                                         mesh, final_step, writer)
    if isinstance(results.get('fepm'), dict):
      writer.scalars(final_step, writers.fepm_scalars(results['fepm']))
    results['manifest'] = manifest.run_manifest(config, wall_time_s=time.time() - t_start,
                                                start_time=t_start, layout=s['layout'])
    evaluator.write_results(workdir, results)
    display.close()
    _print_end(workdir, results, final_step, time.time() - t_start, trained=True)
    return results
  finally:
    if 'display' in locals():
      display.close()
    _finish(manager, writer, train_iter)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        config_name: str = '') -> dict:
  t_start = time.time()
  check = run_config.check_workdir(workdir, config)
  s = setup(config, workdir)
  try:
    state, _, step = restore_latest(s)
    if step == 0:
      raise FileNotFoundError(f'no checkpoint to evaluate in {s["manager"].directory}')
    run_config.write_workdir(check, config, layout=s['layout'])
    print_header(s, config, workdir, config_name, mode='eval')
    results = evaluator.final_evaluation(s['model'], state, s['train_data'], s['test_data'],
                                         config, s['mesh'], step)
    evaluator.write_results(workdir, results)
  finally:
    release_manager(s['manager'])
  _print_end(workdir, results, step, time.time() - t_start, trained=False)
  return results
