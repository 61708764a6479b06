"""Fault injection: kills, preemption notices, bad input and non-finite steps.

Each training fault happens to a real process (tests/faults_child.py) running the tiny
end-to-end config for 8 steps with a checkpoint every 2, most of them through the real entry
point, `ogfr_jax.main` (`python -m ogfr_jax.main`, or `faults_child.py main` where a fault is
injected into it). An uninterrupted run of the same
command is the reference: a run that was killed or stopped and then resumed must end with
bitwise the same train state, the same metrics.jsonl lines and the same results. All runs share
one persistent XLA compilation cache (and pytest-xdist workers share it too), so only the first
run compiles.

Checkpoints without training (unfinished folders, shape mismatches) are here too; bad input
(folders, names, images, batch sizes, configs, workdirs) is in tests/test_bad_input.py and the
guards without training (stop requests, non-finite policies, bfloat16 losses) in
tests/test_guards.py.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ogfr_jax import config_defaults
from ogfr_jax import checkpoints
from ogfr_jax.models import build
from ogfr_jax import train_state
from ogfr_jax import guards
from ogfr_jax import losses
from ogfr_jax import optim
from ogfr_jax import parallel
from ogfr_jax import run_config
from ogfr_jax import train
from ogfr_jax.data import image_io
from helpers import make_config, run_main, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, 'tests', 'faults_child.py')
STEPS = 8  # faults_child.STEPS: checkpoints at 2, 4, 6, 8; evaluations at 4 and 8
KILL_SEED = 1501  # picks the moment of the outside SIGKILL
RUN_TIMEOUT = 300
TMP_SUFFIX = '.orbax-checkpoint-tmp'


# --------------------------------------------------------------------------------------------
# Child runs and what they leave on disk


def _shared_root(tmp_path_factory) -> pathlib.Path:
  """A folder that every pytest-xdist worker of this session sees."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent
  root = base / 'faults-shared'
  root.mkdir(exist_ok=True)
  return root


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _train_args(shared: dict, workdir, *extra, cache=None) -> list[str]:
  return [sys.executable, CHILD, 'train', '--workdir', str(workdir),
          '--cache', str(cache or shared['cache']), '--compile_cache', shared['xla'],
          *map(str, extra)]


def _main_args(shared: dict, workdir, *main_args, hooks=(), cache=None) -> list[str]:
  """ogfr_jax.main on the config of faults_child.py train, with faults_child's hooks."""
  return [sys.executable, CHILD, 'main', '--compile_cache', shared['xla'], *map(str, hooks),
          '--', '--config', f'{CHILD}:{cache or shared["cache"]}', '--workdir', str(workdir),
          *map(str, main_args)]


def _python_m_main(shared: dict, workdir, *main_args) -> subprocess.CompletedProcess:
  """`python -m ogfr_jax.main` itself on that config (same devices and compilation cache)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=shared['xla'],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             XLA_FLAGS='--xla_force_host_platform_device_count=2 '
                       '--xla_backend_optimization_level=0')
  env.pop('OGFR_TRACEBACK', None)
  return subprocess.run([sys.executable, '-m', 'ogfr_jax.main', '--config',
                         f'{CHILD}:{shared["cache"]}', '--workdir', str(workdir),
                         *map(str, main_args)],
                        cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)


def tree_digest(folder) -> dict[str, str]:
  """Every entry under `folder`: relative path -> sha256 of a file's bytes, 'folder' for a
  folder. Equal digests: the tree is byte for byte the same."""
  out = {}
  for path in sorted(pathlib.Path(folder).rglob('*')):
    key = str(path.relative_to(folder))
    out[key] = 'folder' if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def _run(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def _tail(proc) -> str:
  return (proc.stderr or '')[-4000:]


@pytest.fixture(scope='module')
def shared(tmp_path_factory) -> dict:
  """Dataset cache, XLA cache and the uninterrupted reference run (made once per session)."""
  root = _shared_root(tmp_path_factory)
  paths = {'cache': str(root / 'data' / 'cache'), 'xla': str(root / 'xla'),
           'reference': str(root / 'reference')}
  with _locked(root / 'lock'):
    if not (root / 'reference.done').exists():
      shutil.rmtree(paths['reference'], ignore_errors=True)
      proc = _run(_train_args(paths, paths['reference']))
      assert proc.returncode == 0, _tail(proc)
      (root / 'reference.done').write_text('done')
  return paths


def saved_steps(workdir) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def unfinished(workdir) -> list[str]:
  return sorted(n for n in os.listdir(os.path.join(workdir, 'checkpoints'))
                if n.endswith(TMP_SUFFIX))


def _read_only_manager(workdir) -> ocp.CheckpointManager:
  """Reads a workdir's checkpoints without creating or cleaning anything there."""
  return ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(create=False, read_only=True),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'data': ocp.JsonCheckpointHandler()})


def read_checkpoint(workdir, step=None) -> tuple[dict[str, np.ndarray], dict, int]:
  """({'params/...': array, 'opt_state/...': ..., 'step': ...}, input state, step) on the host."""
  manager = _read_only_manager(workdir)
  try:
    step = manager.latest_step() if step is None else step
    meta = manager.item_metadata(step)['state']
    tree = getattr(meta, 'tree', meta)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args),
        data=ocp.args.JsonRestore()))
  finally:
    manager.close()
  flat = {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(out['state'])[0]}
  return flat, dict(out['data']), int(step)


def metrics_lines(workdir) -> dict[tuple[int, str], dict]:
  """metrics.jsonl as {(step, 'train' | 'eval' | 'fepm'): values}; wall-clock speed left
  out. The final evaluation's FEPM report is a row of its own (eval/fepm/...)."""
  out = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    row = json.loads(line)
    kind = ('train' if 'train/loss/total' in row
            else 'fepm' if any(k.startswith('eval/fepm/') for k in row) else 'eval')
    key = (row.pop('step'), kind)
    assert key not in out, f'{key} logged twice'
    row.pop('train/images_per_sec', None)
    out[key] = row
  return out


def _max_diff(a: dict, b: dict) -> float:
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
             if a[k].size else 0.0 for k in a)


def assert_same_as_reference(workdir, reference) -> str:
  """The resumed run ended exactly where the uninterrupted one did; returns a summary line."""
  state, data, step = read_checkpoint(workdir)
  ref_state, ref_data, ref_step = read_checkpoint(reference)
  assert step == ref_step == STEPS
  assert data == ref_data
  worst = _max_diff(state, ref_state)
  assert worst == 0.0, f'max |difference| {worst}'
  lines, ref_lines = metrics_lines(workdir), metrics_lines(reference)
  assert lines == ref_lines
  results = json.load(open(os.path.join(workdir, 'results.json')))
  reference_results = json.load(open(os.path.join(reference, 'results.json')))
  # The manifest records wall time and start time, which differ between the runs.
  assert results.pop('manifest')['seeds'] == reference_results.pop('manifest')['seeds']
  assert results == reference_results
  assert unfinished(workdir) == []
  final = results['synthetic']
  return (f'step {step}: train loss {lines[(STEPS, "train")]["train/loss/total"]:.6f}, '
          f'rank1 {final["rank1"]:.4f}, mAP {final["mAP"]:.6f}, mINP {final["mINP"]:.6f}; '
          f'max |difference| over {len(state)} state arrays {worst}; '
          f'{len(lines)} metrics.jsonl lines identical')


# --------------------------------------------------------------------------------------------
# Kills and preemption (real processes)


@pytest.mark.slow
def test_reference_run_moves_the_parameters(shared):
  # Equality after a resume says something only if the steps after a checkpoint change things.
  early, _, _ = read_checkpoint(shared['reference'], 2)
  final, data, step = read_checkpoint(shared['reference'])
  assert step == STEPS and data['step'] == STEPS
  params = {k: v for k, v in early.items() if k.startswith('params/')}
  assert _max_diff(params, {k: final[k] for k in params}) > 1e-3
  lines = metrics_lines(shared['reference'])
  assert sorted(k for k in lines if k[1] == 'train') == [(s, 'train') for s in range(1, 9)]
  assert sorted(k for k in lines if k[1] == 'eval') == [(4, 'eval'), (8, 'eval')]


@pytest.mark.slow
def test_killed_in_a_checkpoint_write_and_at_a_random_moment_then_resumed(shared, tmp_path):
  """A run killed twice with SIGKILL ends exactly where the uninterrupted one does."""
  wd = tmp_path / 'run'
  # 1. Killed inside the write of step 4: every item is on disk, the folder not yet renamed.
  proc = _run(_train_args(shared, wd, '--kill_in_save', 4))
  assert proc.returncode == -signal.SIGKILL, _tail(proc)
  assert 'KILLED IN SAVE 4' in proc.stdout
  assert saved_steps(wd) == [2]
  assert unfinished(wd) == ['4' + TMP_SUFFIX]
  assert (wd / 'checkpoints' / ('4' + TMP_SUFFIX) / 'state').is_dir()
  manager = _read_only_manager(wd)
  assert manager.latest_step() == 2  # orbax's own listing agrees
  manager.close()

  # 2. The same command resumes from step 2 and is killed from outside at a seeded random
  # moment after it wrote step 4 again. Steps are slowed to 0.15 s so that the kill lands
  # inside the run (between steps, in a step, in the evaluation at step 4 or a checkpoint
  # write), and the run waits before its last step so that it cannot finish first.
  delay = random.Random(KILL_SEED).uniform(0.0, 0.8)
  with open(tmp_path / 'killed.log', 'w') as log:
    proc = subprocess.Popen(
        _train_args(shared, wd, '--step_sleep', 0.15, '--park_at', STEPS - 1,
                    '--release', tmp_path / 'never'),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    try:
      wait_for(lambda: (wd / 'checkpoints' / '4').is_dir() or proc.poll() is not None,
                RUN_TIMEOUT, 'the checkpoint of step 4')
      assert proc.poll() is None, (tmp_path / 'killed.log').read_text()[-3000:]
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
  assert proc.returncode == -signal.SIGKILL
  assert 'resumed from checkpoint at step 2' in (tmp_path / 'killed.log').read_text()
  survived = saved_steps(wd)
  assert survived[:2] == [2, 4] and survived[-1] < STEPS
  assert not (wd / 'results.json').exists()

  # 3. And once more, to the end.
  proc = _run(_train_args(shared, wd))
  assert proc.returncode == 0, _tail(proc)
  assert f'resumed from checkpoint at step {survived[-1]}' in proc.stderr
  assert saved_steps(wd) == [2, 4, 6, 8]
  print('resumed run vs uninterrupted run:', assert_same_as_reference(wd, shared['reference']))


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_exits_143(shared, tmp_path):
  """Through ogfr_jax.main, with logging and checkpoints far apart (log_every and
  checkpoint_every 100 > the run's 8 steps): the stop comes at the next step, not at a
  logging boundary, and the host never runs more than one step ahead of the devices."""
  wd, release = tmp_path / 'run', tmp_path / 'release'
  spaced = ['--config.train.log_every=100', '--config.train.checkpoint_every=100']
  with open(tmp_path / 'stopped.log', 'w') as log:
    proc = subprocess.Popen(
        _main_args(shared, wd, *spaced,
                   hooks=['--park_at', 4, '--release', release, '--trace_batches']),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
      lines = []
      line = proc.stdout.readline()
      while line and not line.startswith('PARKED'):  # the run's header comes first
        lines.append(line)
        line = proc.stdout.readline()
      assert line.strip() == 'PARKED 4', (tmp_path / 'stopped.log').read_text()[-3000:]
      proc.send_signal(signal.SIGTERM)  # while the run waits before the batch of step 4
      release.touch()
      out, _ = proc.communicate(timeout=RUN_TIMEOUT)
      lines += out.splitlines()
    finally:
      if proc.poll() is None:
        proc.kill()
  err = (tmp_path / 'stopped.log').read_text()
  assert proc.returncode == guards.PREEMPTED_EXIT_CODE == 143, err[-3000:]
  assert all(l.startswith('warning: ') for l in err.splitlines()), err[-3000:]
  assert 'warning: received SIGTERM' in err
  assert f'stopped at step 5/{STEPS} on SIGTERM' in err
  # Step 5 is neither a logging nor a checkpoint step: it was written because of the signal.
  assert saved_steps(wd) == [5] and unfinished(wd) == []
  _, data, _ = read_checkpoint(wd, 5)
  assert data['step'] == 5
  assert not (wd / 'results.json').exists()
  traced = [l.split() for l in lines if l.startswith('BATCH ')]
  assert [int(t[1]) for t in traced] == list(range(5))
  assert max(int(t[3]) for t in traced) <= 1, traced  # steps not finished when the next is read

  proc = _run(_main_args(shared, wd, *spaced))
  assert proc.returncode == 0, _tail(proc)
  assert '(resuming from step 5)' in proc.stdout
  final, _, step = read_checkpoint(wd)
  reference, _, _ = read_checkpoint(shared['reference'])
  assert step == STEPS and _max_diff(final, reference) == 0.0


# --------------------------------------------------------------------------------------------
# Non-finite steps and corrupt images during training (real processes)


@pytest.mark.slow
def test_nonfinite_step_stops_and_keeps_the_last_good_checkpoint(shared, tmp_path):
  wd = tmp_path / 'run'
  # The batch of step 3 (the 4th update) is NaN. Metrics are fetched at steps 3 and 6, so the
  # check that catches it is the one before the checkpoint of step 4.
  proc = _run(_train_args(shared, wd, '--nan_at', 3, '--log_every', 3))
  assert proc.returncode == 1
  assert 'FloatingPointError: non-finite loss or gradients at step 4' in proc.stderr
  assert 'The last good checkpoint, step 2, is kept in' in proc.stderr
  assert 'nonfinite_policy=skip' in proc.stderr
  assert saved_steps(wd) == [2] and unfinished(wd) == []
  good, _, _ = read_checkpoint(wd, 2)
  reference, _, _ = read_checkpoint(shared['reference'], 2)
  assert _max_diff(good, reference) == 0.0
  assert not (wd / 'results.json').exists()


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_identically(shared,
                                                                             tmp_path):
  """Bit flips in the newest step (which orbax alone may load without an error) fail its
  checksums; the step moves to corrupt-<step> and the run resumes from the one before."""
  wd = tmp_path / 'run'
  shutil.copytree(shared['reference'], wd)
  os.remove(wd / 'results.json')
  folder = wd / 'checkpoints' / str(STEPS) / 'state' / 'ocdbt.process_0' / 'd'
  path = max(folder.iterdir(), key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 64):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))
  proc = _run(_main_args(shared, wd))
  assert proc.returncode == 0, _tail(proc)
  # What the run survives is a warning, never an error (a wrapper may read 'error:' as failure).
  lines = proc.stderr.strip().splitlines()
  assert lines and all(l.startswith('warning: ') for l in lines), lines
  assert lines[0].startswith(f'warning: checkpoint {wd}/checkpoints/{STEPS} (step {STEPS}) is '
                             'damaged: ')
  assert f'moved it to {wd}/checkpoints/corrupt-{STEPS}' in lines[0]
  assert f'(resuming from step {STEPS - 2})' in proc.stdout
  assert (wd / 'checkpoints' / f'corrupt-{STEPS}' / path.relative_to(
      wd / 'checkpoints' / str(STEPS))).read_bytes() == bytes(data)
  print('resumed run vs uninterrupted run:', assert_same_as_reference(wd, shared['reference']))


def _assert_refused(proc, *needles) -> str:
  """One 'error:' line on stderr, exit status 2; returns the line."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), (
      proc.returncode, lines[-5:])
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


@pytest.mark.slow
def test_refused_runs_leave_the_workdir_byte_for_byte_as_they_found_it(shared, tmp_path):
  """config.json deleted, then a run of another schedule: refused by the checkpoint's own
  record, with nothing written (no config.json, manifest, log or folder), so the original
  command still resumes. The same for a checkpoint without its integrity record under
  damaged_checkpoint='refuse', and for a first run on a dataset folder that does not exist."""
  wd = tmp_path / 'run'
  shutil.copytree(shared['reference'], wd)
  os.remove(wd / 'config.json')
  # A write that a killed run left unfinished: a refused run does not clean it up either.
  leftover = wd / 'checkpoints' / ('10' + TMP_SUFFIX) / 'state'
  leftover.mkdir(parents=True)
  (leftover / 'partial').write_bytes(b'\0' * 10)
  before = tree_digest(wd)
  proc = _python_m_main(shared, wd, '--config.train.epochs=3')  # 12 steps instead of 8
  line = _assert_refused(
      proc, f'the checkpoint in {wd} (step {STEPS}) was written by a run of another config or '
      'dataset; refusing to mix them (1 difference):; train.epochs: 2 -> 3;',
      'To resume it, run the command with the values it was written with',
      'use another --workdir', f'Nothing was changed in {wd}',
      '--overwrite starts afresh there and deletes its checkpoints of steps [2, 4, 6, 8]')
  assert tree_digest(wd) == before, line

  # Without checksums, under 'refuse': refused too, nothing moved.
  integrity = wd / 'checkpoints' / str(STEPS) / 'integrity'
  shutil.move(integrity, tmp_path / 'integrity')
  before = tree_digest(wd)
  proc = _python_m_main(shared, wd, '--config.train.damaged_checkpoint=refuse')
  _assert_refused(proc, f'checkpoint {wd}/checkpoints/{STEPS} (step {STEPS}) has no integrity '
                  'record', 'its arrays are not checked against checksums',
                  'damaged_checkpoint=fall_back')
  assert tree_digest(wd) == before
  shutil.move(tmp_path / 'integrity', integrity)

  # The original command resumes (at the last step: only the final evaluation is left).
  proc = _python_m_main(shared, wd)
  assert proc.returncode == 0, _tail(proc)
  assert f'(resuming from step {STEPS})' in proc.stdout
  assert json.loads((wd / 'config.json').read_text())['train']['epochs'] == 2
  assert not leftover.parent.exists()  # a run that goes on cleans up what a killed one left

  # A first run on a dataset folder that does not exist writes nothing at all.
  fresh = tmp_path / 'fresh'
  proc = _python_m_main(shared, fresh, f'--config.dataset.root={tmp_path / "nowhere"}',
                        '--config.dataset.name=market1501')
  _assert_refused(proc, str(tmp_path / 'nowhere'))
  assert not fresh.exists()


@pytest.mark.slow
def test_disk_full_in_a_checkpoint_write_ends_with_one_line_and_keeps_the_last_good_one(
    shared, tmp_path):
  """The write of step 4 fails with ENOSPC in orbax's background commit. The run stops at
  the next step boundary once that is known (the batch of step 4 waits until it is), long
  before a logging boundary, and says so in one line: no orbax error records, tracebacks or
  'Event loop is closed'."""
  wd, failed = tmp_path / 'run', tmp_path / 'failed'
  proc = _run(_main_args(shared, wd, '--config.train.log_every=100',
                         hooks=['--enospc_in_save', 4, '--park_at', 4, '--release', failed,
                                '--trace_batches']))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
  folder = wd / 'checkpoints'
  assert lines[0].startswith('error: no space left on device writing the checkpoint of step 4 '
                             f'to {folder}/4 (it needs about ')
  assert f'the last good checkpoint, step 2, is kept in {folder}' in lines[0]
  # Step 5 (the batch of step 4) ran while the failure became known; no step after it.
  batches = [int(l.split()[1]) for l in proc.stdout.splitlines() if l.startswith('BATCH ')]
  assert batches == [0, 1, 2, 3, 4], proc.stdout[-2000:]
  assert saved_steps(wd) == [2]
  good, _, _ = read_checkpoint(wd, 2)
  reference, _, _ = read_checkpoint(shared['reference'], 2)
  assert _max_diff(good, reference) == 0.0


def _corrupt_copy(shared, tmp_path, empty: bool = True) -> tuple[str, list[str]]:
  """A copy of the dataset with four training images broken (every other one empty, with
  `empty`, the others cut short)."""
  cache = tmp_path / 'data' / 'cache'
  shutil.copytree(shared['cache'], cache)
  (dataset,) = [d for d in cache.iterdir() if d.is_dir()]
  files = sorted((dataset / 'bounding_box_train').glob('*.jpg'))[::12]
  assert len(files) == 4
  for i, path in enumerate(files):
    data = path.read_bytes()
    path.write_bytes(b'' if i % 2 and empty else data[:len(data) // 3])
  return str(cache), [str(f) for f in files]


@pytest.mark.slow
def test_nonfinite_and_corrupt_images_are_skipped_and_counted(shared, tmp_path):
  cache, broken = _corrupt_copy(shared, tmp_path)
  wd = tmp_path / 'run'
  proc = _run(_train_args(shared, wd, '--nan_at', '2,3', '--nonfinite_policy', 'skip',
                          '--corrupt_policy', 'skip', '--max_skipped_share', 0.5, cache=cache))
  assert proc.returncode == 0, _tail(proc)
  assert 'skipped 1 update(s) with a non-finite loss or gradient in steps 3-3' in proc.stderr
  assert 'skipping corrupt training image' in proc.stderr
  assert any(path in proc.stderr for path in broken)

  lines = metrics_lines(wd)
  train_lines = [lines[(s, 'train')] for s in range(1, STEPS + 1)]
  assert [l['train/guard/nonfinite_steps'] for l in train_lines] == [0, 0, 1, 1, 0, 0, 0, 0]
  assert [l['train/guard/nonfinite_total'] for l in train_lines] == [0, 0, 1, 2, 2, 2, 2, 2]
  corrupt = [l['train/input/corrupt_images_skipped'] for l in train_lines]
  assert corrupt[-1] > 0 and corrupt == sorted(corrupt)

  # Steps 3 and 4 were skipped: the state after them is the state after step 2.
  before, _, _ = read_checkpoint(wd, 2)
  after, _, _ = read_checkpoint(wd, 4)
  for key in before:
    if key not in ('step', 'nonfinite_steps'):
      np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  assert int(after['step']) == 4 and int(after['nonfinite_steps']) == 2
  final, data, _ = read_checkpoint(wd)
  assert all(np.all(np.isfinite(v)) for k, v in final.items() if v.dtype.kind == 'f')
  assert data['num_skipped'] == corrupt[-1]
  assert json.load(open(wd / 'results.json'))['synthetic']['step'] == STEPS


@pytest.mark.slow
def test_corrupt_image_under_fail_policy_names_the_file(shared, tmp_path):
  # Empty files are named when the folder is scanned, before anything is built or written.
  cache, broken = _corrupt_copy(shared, tmp_path / 'empty')
  wd = tmp_path / 'run'
  proc = _run(_main_args(shared, wd, cache=cache))
  _assert_refused(proc, 'image file(s) of 0 bytes in ', os.path.basename(broken[1]),
                  os.path.basename(broken[3]), 'corrupt_image_policy=skip')
  assert not wd.exists()
  # Files cut short are found when read.
  cache, broken = _corrupt_copy(shared, tmp_path, empty=False)
  proc = _run(_train_args(shared, wd, cache=cache))
  assert proc.returncode == 1
  assert 'CorruptImageError' in proc.stderr
  assert 'corrupt_image_policy="skip"' in proc.stderr
  error = [l for l in proc.stderr.splitlines() if l.startswith(
      'ogfr_jax.data.image_io.CorruptImageError: ')][-1]  # the one that ended the run
  assert 'corrupt_image_policy="skip"' in error
  assert len([path for path in broken if path in error]) == 1
  assert unfinished(wd) == []  # checkpoints in flight were completed before the error left
  assert not (wd / 'results.json').exists()


# --------------------------------------------------------------------------------------------
# Checkpoints without training


def test_unfinished_checkpoint_folder_is_ignored_and_removed(tmp_path):
  wd = str(tmp_path / 'wd')
  manager = checkpoints.make_manager(wd)
  state = {'w': jnp.arange(4.0), 'step': jnp.int32(3)}
  checkpoints.save(manager, 3, state, {'step': 3}, force=True)
  manager.wait_until_finished()
  manager.close()
  # What a process killed while writing step 5 leaves behind.
  leftover = tmp_path / 'wd' / 'checkpoints' / ('5' + TMP_SUFFIX) / 'state'
  leftover.mkdir(parents=True)
  (leftover / 'partial').write_bytes(b'\0' * 10)
  manager = checkpoints.make_manager(wd)
  assert manager.latest_step() == 3
  # Orbax removes it in the background when the manager starts (and before any save).
  wait_for(lambda: unfinished(wd) == [], 10, 'the unfinished step to be removed')
  restored, data = checkpoints.restore(manager, 3, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  np.testing.assert_array_equal(restored['w'], np.arange(4.0))
  assert data == {'step': 3}
  manager.close()


def _restore_into(workdir, num_classes: int):
  """train.restore_latest with the model of the tiny config and `num_classes` identities."""
  config = make_config(preset='synthetic', cache='unused/cache')
  model = build.build_model(config, num_classes, 4)
  tx, _ = optim.make_optimizer(config, 8, 4, 8)
  abstract = jax.eval_shape(lambda r: train_state.init_state(model, tx, config, r),
                            jax.random.PRNGKey(0))
  s = {'manager': checkpoints.make_manager(str(workdir)), 'abstract': abstract,
       'shardings': parallel.state_shardings(abstract, parallel.make_mesh(config.mesh)),
       'state': None}
  try:
    return train.restore_latest(s)
  finally:
    s['manager'].close()


@pytest.mark.slow
def test_checkpoint_of_another_model_or_damaged_is_refused_with_a_clear_error(shared, tmp_path):
  wd = tmp_path / 'run'
  shutil.copytree(shared['reference'], wd)
  # The same config with 10 training identities instead of 8: another classifier.
  with pytest.raises(ValueError) as e:
    _restore_into(wd, 10)
  text = str(e.value)
  assert f'the checkpoint in {wd} (step {STEPS})' in text
  assert 'params/student_head/classifier/kernel: checkpoint (64, 8), this config (64, 10)' in text
  assert e.value.__cause__ is None and e.value.__context__ is None  # no orbax traceback
  assert saved_steps(wd) == [2, 4, 6, 8]
  # A damaged latest checkpoint (its array data cut short) is set aside, never deleted, and
  # the run resumes from the one before it.
  for chunk in (wd / 'checkpoints' / str(STEPS) / 'state' / 'd').iterdir():
    chunk.write_bytes(chunk.read_bytes()[:64])
  state, data, step = _restore_into(wd, 8)
  assert step == 6 and data['step'] == 6
  assert saved_steps(wd) == [2, 4, 6]
  assert (wd / 'checkpoints' / f'corrupt-{STEPS}' / 'state' / 'd').is_dir()


@pytest.mark.slow
def test_overwrite_discards_another_runs_checkpoint_only_once_every_check_passed(shared,
                                                                                tmp_path):
  """config.json gone, the checkpoint of another config: refused without --overwrite; with
  it, the run starts afresh, and the checkpoints go only when the workdir is written."""
  wd = tmp_path / 'run'
  shutil.copytree(shared['reference'], wd)
  os.remove(wd / 'config.json')
  before = tree_digest(wd)
  # Another schedule than the reference's.
  config = make_config(preset='synthetic', cache='unused/cache')
  model = build.build_model(config, 8, 4)
  tx, _ = optim.make_optimizer(config, 8, 4, 8)
  abstract = jax.eval_shape(lambda r: train_state.init_state(model, tx, config, r),
                            jax.random.PRNGKey(0))
  for overwrite in (False, True):
    s = {'manager': checkpoints.make_manager(str(wd), config=config, writable=False),
         'abstract': abstract, 'state': 'fresh state',
         'shardings': parallel.state_shardings(abstract, parallel.make_mesh(config.mesh))}
    check = run_config.check_workdir(str(wd), config, overwrite=overwrite)
    try:
      if overwrite:
        assert train.restore_checked(s, config, check) == ('fresh state', None, 0)
      else:
        with pytest.raises(checkpoints.CheckpointMismatch, match='deletes its checkpoints of '
                           r'steps \[2, 4, 6, 8\]'):
          train.restore_checked(s, config, check)
    finally:
      s['manager'].close()
    assert check.discard == overwrite
    assert tree_digest(wd) == before
  run_config.write_workdir(check, config)
  assert not (wd / 'checkpoints').exists()
  assert json.loads((wd / 'config.json').read_text())['train']['epochs'] == config.train.epochs


@pytest.mark.slow
def test_workdir_of_another_config_is_refused_and_left_intact(shared, tmp_path):
  wd = tmp_path / 'run'
  shutil.copytree(shared['reference'], wd)
  before = tree_digest(wd)
  proc = run_main('--config', 'configs/synthetic.py:runlocal', '--workdir', wd)
  _assert_refused(proc, f'{wd} holds a run of a different config',
                  'synthetic.num_train_ids: 8 -> 16', 'To resume it, run the command with its '
                  'values (on the left)', 'use another --workdir', f'Nothing was changed in {wd}',
                  '--overwrite starts afresh there and deletes its checkpoints of steps '
                  '[2, 4, 6, 8]')
  assert tree_digest(wd) == before
  # Resumable fields (logging, the non-finite policy) may change between runs.
  config = config_defaults.base_config()
  run_config.prepare_workdir(str(tmp_path / 'other'), config)
  config.train.nonfinite_policy = 'skip'
  config.train.log_every = 3
  run_config.prepare_workdir(str(tmp_path / 'other'), config)
