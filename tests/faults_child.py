"""A training run (or a stop-agreement loop) in a process of its own, with faults to inject.

tests/test_faults.py kills, signals and breaks these processes from outside, so each runs in a
fresh interpreter:

  python tests/faults_child.py train --workdir WD --cache DATA --compile_cache CC \
      [--step_sleep S] [--park_at N --release FILE] [--kill_in_save N] [--nan_at N,M] \
      [--nonfinite_policy stop|skip] [--corrupt_policy fail|skip] [--log_every N]
  python tests/faults_child.py main --compile_cache CC [hooks of train] -- ARGS OF ogfr_jax.main
  python tests/faults_child.py workers --root MARKET_ROOT [--num_workers N]
  python tests/faults_child.py agree --coordinator HOST:PORT --num_processes 2 \
      --process_id I --signal_at N [--no_service]

`train` runs `train.train_and_evaluate` on the tiny end-to-end config (8 steps, a checkpoint
every 2, an evaluation after step 4) with these hooks:
  --step_sleep S      sleep S seconds before each batch (gives an outside kill room to land)
  --park_at N         before the batch of step N: print 'PARKED N' and wait until the file
                      --release exists (an outside signal arrives while the run waits)
  --kill_in_save N    SIGKILL this process inside the checkpoint write of step N, after every
                      item is written and just before orbax renames the folder into place
  --nan_at N[,M..]    fill the images of the batches of these steps with NaN
  --enospc_in_save N  the write of step N fails with 'No space left on device' (ENOSPC) in
                      orbax's background commit, as a full disk does; with --release, that
                      file is created when it fails
  --trace_batches     print 'BATCH N UNFINISHED U' before the batch of step N is read: U is the
                      number of steps dispatched before whose results are not ready yet
  --epochs N          train.epochs (another schedule for the same workdir)
  --max_skipped_share S   train.max_skipped_share
Its exit status is the run's: 0, 143 after a SIGTERM checkpoint, 1 on an error.

`main` runs the real entry point, `ogfr_jax.main`, with the arguments after `--`, the same
fake CPU devices and compilation cache, and the hooks above (--step_sleep, --park_at,
--release, --kill_in_save, --nan_at, --enospc_in_save). This file is also the config file of
those runs: `--config tests/faults_child.py:DATA_CACHE` gives the tiny config of `train`
(other settings as --config.FIELD overrides).

`workers` reads one train batch of a Market-1501 fixture through grain workers, prints
'WORKERS {"workers": [pids], "tracker": pid}' and waits to be killed.

`agree` joins a jax.distributed run of several CPU processes and calls
guards.StopRequest.should_stop at every step; process 1 sends itself SIGTERM at step
--signal_at. Each process prints one JSON line: the step it stopped at and the mode used.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 8, 4, 2


def _add_hook_args(p: argparse.ArgumentParser) -> None:
  p.add_argument('--compile_cache', default='', help='persistent XLA cache shared by runs')
  p.add_argument('--devices', type=int, default=2, help='fake CPU devices')
  p.add_argument('--step_sleep', type=float, default=0.0)
  p.add_argument('--park_at', type=int, default=-1)
  p.add_argument('--release', default='')
  p.add_argument('--kill_in_save', type=int, default=-1)
  p.add_argument('--nan_at', default='', help='comma-separated steps')
  p.add_argument('--enospc_in_save', type=int, default=-1)
  p.add_argument('--trace_batches', action='store_true')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest='command', required=True)
  t = sub.add_parser('train')
  t.add_argument('--workdir', required=True)
  t.add_argument('--cache', required=True, help='synthetic dataset cache folder')
  _add_hook_args(t)
  t.add_argument('--log_every', type=int, default=1)
  t.add_argument('--nonfinite_policy', default='stop')
  t.add_argument('--corrupt_policy', default='fail')
  t.add_argument('--max_skipped_share', type=float, default=0.1)
  t.add_argument('--epochs', type=int, default=0, help='train.epochs (0: STEPS / STEPS_PER_EPOCH)')
  m = sub.add_parser('main')
  _add_hook_args(m)
  m.add_argument('main_args', nargs=argparse.REMAINDER, help='-- then ogfr_jax.main\'s')
  w = sub.add_parser('workers')
  w.add_argument('--root', required=True, help='a Market-1501 layout (dataset_fixtures)')
  w.add_argument('--num_workers', type=int, default=2)
  a = sub.add_parser('agree')
  a.add_argument('--coordinator', required=True)
  a.add_argument('--num_processes', type=int, required=True)
  a.add_argument('--process_id', type=int, required=True)
  a.add_argument('--signal_at', type=int, required=True)
  a.add_argument('--steps', type=int, default=400)
  a.add_argument('--check_every', type=int, default=3)
  a.add_argument('--no_service', action='store_true', help='JAX preemption service off')
  return p.parse_args(argv)


def fault_config(cache: str, args: argparse.Namespace):
  """The synthetic preset of helpers.make_config, 8 steps, deterministic on CPU."""
  from helpers import make_config  # pylint: disable=g-import-not-at-top
  from ogfr_jax import run_config  # pylint: disable=g-import-not-at-top
  c = make_config({
      'train.epochs': args.epochs or STEPS // STEPS_PER_EPOCH,
      'train.steps_per_epoch': STEPS_PER_EPOCH,
      'train.checkpoint_every': CHECKPOINT_EVERY,
      'train.keep_checkpoints': STEPS,  # keep them all: tests compare intermediate states
      'train.log_every': args.log_every,
      'train.eval_every_epochs': 1,  # one evaluation mid-run (step 4) and the final one
      'train.nonfinite_policy': args.nonfinite_policy,
      'input.corrupt_image_policy': args.corrupt_policy,
      'train.max_skipped_share': args.max_skipped_share,
      'input.num_workers': 0,
  }, preset='synthetic', cache=cache)
  run_config.validate(c)
  return c


def get_config(cache: str):
  """The config of `train` with its default options, as a config file for ogfr_jax.main."""
  for path in (ROOT, os.path.join(ROOT, 'tests')):
    if path not in sys.path:
      sys.path.insert(0, path)
  return fault_config(cache, parse_args(['train', '--workdir', '', '--cache', cache]))


def _install_hooks(args: argparse.Namespace) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ogfr_jax import train  # pylint: disable=g-import-not-at-top
  original = train._batches  # pylint: disable=protected-access
  nan_steps = {int(v) for v in args.nan_at.split(',') if v}
  dispatched = []  # the metrics of every step run (--trace_batches)
  if args.trace_batches:
    jit_train_step = train.step_lib.jit_train_step

    def traced_jit(*a, **k):
      step_fn = jit_train_step(*a, **k)

      def traced(state, batch):
        out = step_fn(state, batch)
        dispatched.append(out[1])
        return out
      return traced

    train.step_lib.jit_train_step = traced_jit

  def batches(it):
    inner = original(it)
    while True:
      step = it.step  # global step of the batch about to be read
      if args.trace_batches:
        import jax  # pylint: disable=g-import-not-at-top
        unfinished = sum(not all(x.is_ready() for x in jax.tree.leaves(m)) for m in dispatched)
        print(f'BATCH {step} UNFINISHED {unfinished}', flush=True)
      if args.step_sleep:
        time.sleep(args.step_sleep)
      if step == args.park_at:
        print(f'PARKED {step}', flush=True)
        deadline = time.time() + 120
        while not os.path.exists(args.release):
          if time.time() > deadline:
            sys.exit('faults_child: never released')
          time.sleep(0.02)
      batch = next(inner)
      if step in nan_steps:
        batch['image'] = np.full(batch['image'].shape, np.nan, np.float32)  # pixels are uint8
      yield batch

  train._batches = batches  # pylint: disable=protected-access

  if args.kill_in_save >= 0:
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_or_die(self):
      if self.get_final().name == str(args.kill_in_save):
        print(f'KILLED IN SAVE {args.kill_in_save}', flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die

  if args.enospc_in_save >= 0:
    import errno  # pylint: disable=g-import-not-at-top
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
    finalize_once = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_or_full(self):
      if self.get_final().name == str(args.enospc_in_save):
        if args.release:
          open(args.release, 'w').close()
        raise OSError(errno.ENOSPC, 'No space left on device', str(self.get_final()))
      return await finalize_once(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_full


def _start_jax(args: argparse.Namespace) -> None:
  # The backend's optimisations cost more compile time than they save on 8 tiny steps; every
  # run uses the same flags, so their results stay comparable bit for bit.
  os.environ['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={args.devices} '
                             '--xla_backend_optimization_level=0')
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  if args.compile_cache:
    # Every run here compiles the same programs; sharing them keeps the tests fast.
    jax.config.update('jax_compilation_cache_dir', args.compile_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def run_train(args: argparse.Namespace) -> None:
  _start_jax(args)
  from ogfr_jax import train  # pylint: disable=g-import-not-at-top
  config = fault_config(args.cache, args)
  _install_hooks(args)
  results = train.train_and_evaluate(config, args.workdir)  # writes config.json, as main does
  print('RESULTS ' + json.dumps(results, sort_keys=True), flush=True)


def run_main(args: argparse.Namespace) -> None:
  """ogfr_jax.main as `python -m ogfr_jax.main ARGS` runs it, after the hooks."""
  _start_jax(args)
  _install_hooks(args)
  from ogfr_jax import main as entry  # pylint: disable=g-import-not-at-top
  rest = args.main_args[1:] if args.main_args[:1] == ['--'] else args.main_args
  sys.argv = ['ogfr_jax.main', *rest]
  entry.run()


def run_workers(args: argparse.Namespace) -> None:
  """Reads one train batch through grain workers, prints their pids, then waits forever."""
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import multiprocessing  # pylint: disable=g-import-not-at-top
  from multiprocessing import resource_tracker  # pylint: disable=g-import-not-at-top
  from helpers import MARKET, make_config  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import loading  # pylint: disable=g-import-not-at-top
  from ogfr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = make_config({**MARKET, 'occlusion.patterns': ('object', 'texture'),
                   'input.num_workers': args.num_workers, 'input.prefetch': 2},
                  preset='synthetic', cache=args.root)
  train_data, _ = loading.load_data(c)
  it = pipeline.make_train_iterator(train_data.train, c)
  next(it)
  # pylint: disable-next=protected-access
  tracker = getattr(resource_tracker._resource_tracker, '_pid', None)
  print('WORKERS ' + json.dumps({'workers': [p.pid for p in multiprocessing.active_children()],
                                 'tracker': tracker}), flush=True)
  while True:
    time.sleep(1)


def run_agree(args: argparse.Namespace) -> None:
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  if args.no_service:
    jax.config.update('jax_enable_preemption_service', False)
  jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                             initialization_timeout=60)
  from ogfr_jax import guards  # pylint: disable=g-import-not-at-top
  stopped = None
  with guards.StopRequest(check_every=args.check_every) as stop:
    for step in range(args.steps):
      if args.process_id == 1 and step == args.signal_at:
        os.kill(os.getpid(), signal.SIGTERM)
      if stop.should_stop(step):
        stopped = step
        break
      time.sleep(0.01)
  print(json.dumps({'process': args.process_id, 'stopped_at': stopped, 'mode': stop.mode,
                    'received': stop.received}), flush=True)
  jax.distributed.shutdown()


def main(argv=None) -> None:
  args = parse_args(argv)
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  if args.command == 'main':
    run_main(args)  # parses its own absl flags and sets its own log level
    return
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS(sys.argv[:1])  # grain reads absl flags
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  if args.command == 'train':
    run_train(args)
  elif args.command == 'workers':
    run_workers(args)
  else:
    run_agree(args)


if __name__ == '__main__':
  main()
