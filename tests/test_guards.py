"""Guards without training: the stop request and its agreement across processes, the
non-finite policies at log time, resumed metrics, and losses that stay finite in bfloat16.
The faults of real training processes are in tests/test_faults.py."""

import json
import logging as std_logging
import os
import random
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ogfr_jax import config_defaults
from ogfr_jax import checkpoints
from ogfr_jax import writers
from ogfr_jax import guards
from ogfr_jax import losses
from ogfr_jax import run_config
from ogfr_jax import train
from helpers import make_config, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, 'tests', 'faults_child.py')


def test_stop_request_in_one_process_catches_sigterm_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with guards.StopRequest() as stop:
    assert stop.mode == 'local'
    handler = signal.getsignal(signal.SIGTERM)
    assert handler is not before and getattr(handler, '__self__', None) is stop
    assert not stop.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    wait_for(lambda: stop.received is not None, 5, 'the handler')
    assert stop.should_stop(1) and stop.received == 'SIGTERM'
  assert signal.getsignal(signal.SIGTERM) is before
  assert guards.Preempted('x').code == 143


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('mode', ['service', 'allgather'])
def test_processes_agree_on_the_step_to_stop(mode):
  address = f'127.0.0.1:{_free_port()}'
  extra = ['--no_service'] if mode == 'allgather' else []
  procs = [subprocess.Popen(
      [sys.executable, CHILD, 'agree', '--coordinator', address, '--num_processes', '2',
       '--process_id', str(i), '--signal_at', '10', *extra],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for proc in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  assert [o['mode'] for o in outs] == [mode, mode]
  # Only process 1 got the signal; both stop, at the same step, after it.
  stopped = {o['stopped_at'] for o in outs}
  assert len(stopped) == 1 and stopped.pop() >= 10
  if mode == 'allgather':
    assert outs[1]['received'] == 'SIGTERM'
    assert outs[0]['received'] == 'a stop request of another process'


def _progress(tmp_path, policy: str):
  config = make_config(preset='synthetic', cache=tmp_path / 'cache')
  config.train.nonfinite_policy = policy

  class Iterator:
    num_skipped = 0

    def get_state(self):
      return {'step': 0}

  s = {'manager': checkpoints.make_manager(str(tmp_path / 'wd')), 'total_steps': 10,
       'steps_per_epoch': 5, 'global_batch': 8}
  writer = writers.Writer(str(tmp_path / 'wd'))
  progress_cls = train._Progress  # pylint: disable=protected-access
  return progress_cls(config, s, writer, Iterator(), 0, None), writer


def _step_metrics(loss: float, total: int) -> dict:
  bad = not np.isfinite(loss)
  return {'loss/total': jnp.float32(loss), 'grad_norm': jnp.float32(1.0),
          'guard/nonfinite': jnp.float32(bad), 'guard/nonfinite_total': jnp.float32(total)}


def test_nonfinite_policy_at_log_time_and_before_a_save(tmp_path, caplog):
  progress, writer = _progress(tmp_path, 'stop')
  progress.history = [_step_metrics(1.0, 0), _step_metrics(np.nan, 1), _step_metrics(2.0, 1)]
  with pytest.raises(FloatingPointError, match='at step 2 .*No checkpoint was written'):
    progress.log_window(3)
  # Before a checkpoint: the unchecked steps are checked and nothing is written.
  progress.history = [_step_metrics(1.0, 1), _step_metrics(np.inf, 2)]
  state = {'w': jnp.ones(3)}
  with pytest.raises(FloatingPointError, match='at step 5'):
    progress.save(5, state)
  progress.manager.wait_until_finished()
  assert progress.manager.all_steps() == []
  writer.close()

  progress, writer = _progress(tmp_path / 'skip', 'skip')
  progress.history = [_step_metrics(1.0, 0), _step_metrics(np.nan, 1), _step_metrics(3.0, 1)]
  with caplog.at_level(std_logging.WARNING):
    progress.log_window(3)
  assert 'skipped 1 update(s) with a non-finite loss or gradient in steps 1-3 (first at step 2' \
      in caplog.text
  line = json.loads(open(tmp_path / 'skip' / 'wd' / 'metrics.jsonl').readline())
  assert line['train/loss/total'] == 2.0  # the mean of the applied steps only
  assert line['train/guard/nonfinite_steps'] == 1 and line['train/guard/nonfinite_total'] == 1
  writer.close()


def test_skip_policy_stops_when_more_than_the_allowed_share_is_skipped(tmp_path):
  progress, writer = _progress(tmp_path, 'skip')  # 10 steps, max_skipped_share 0.1: 1 allowed
  progress.history = [_step_metrics(1.0, 0), _step_metrics(np.nan, 1), _step_metrics(2.0, 1)]
  progress.log_window(3)  # one skipped step: within the share
  progress.history = [_step_metrics(np.nan, 2), _step_metrics(np.inf, 3)]
  with pytest.raises(FloatingPointError) as e:
    progress.log_window(5)
  assert str(e.value).startswith(
      "3 of the 5 steps so far were skipped for a non-finite loss or gradient, more than "
      "config.train.max_skipped_share=0.1 of the run's 10 steps: the run stops without results")
  assert 'No checkpoint was written in' in str(e.value)
  writer.close()
  # metrics.jsonl is strict JSON: the window whose every step was skipped has a NaN loss,
  # written as null.
  text = (tmp_path / 'wd' / 'metrics.jsonl').read_text()
  rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f'bare {c} in {line}'))
          for line in text.splitlines()]
  assert [r['step'] for r in rows] == [3, 5]
  assert rows[0]['train/loss/total'] == 1.5 and rows[1]['train/loss/total'] is None
  assert rows[1]['train/guard/nonfinite_total'] == 3
  # A resumed run rewrites the file with the same encoding.
  assert writers.truncate_metrics(str(tmp_path / 'wd' / 'metrics.jsonl'), 4) == 1
  assert (tmp_path / 'wd' / 'metrics.jsonl').read_text() == text.splitlines(True)[0]
  # And a share of 1 lets such a run go on.
  progress, writer = _progress(tmp_path / 'lenient', 'skip')
  progress.config.train.max_skipped_share = 1.0
  progress.history = [_step_metrics(np.nan, s) for s in range(1, 11)]
  progress.log_window(10)
  writer.close()


def test_invalid_config_json_is_refused_and_overwrite_starts_afresh(tmp_path):
  wd = tmp_path / 'wd'
  (wd / 'checkpoints' / '2').mkdir(parents=True)
  config = config_defaults.base_config()
  for garbage in ('{"train": {"epochs": 4', '[1, 2]'):
    (wd / 'config.json').write_text(garbage)
    with pytest.raises(ValueError) as e:
      run_config.prepare_workdir(str(wd), config)
    assert str(e.value).startswith(f'{wd / "config.json"} is not ')
    assert str(e.value).endswith('or use another --workdir; --overwrite starts afresh there '
                                 'and deletes its checkpoints of steps [2].')
    assert (wd / 'config.json').read_text() == garbage and (wd / 'checkpoints' / '2').is_dir()
  # What the message advises works.
  run_config.prepare_workdir(str(wd), config, overwrite=True)
  assert json.loads((wd / 'config.json').read_text()) == json.loads(config.to_json_best_effort())
  assert not (wd / 'checkpoints').exists()


def test_finite_update_keeps_every_leaf_of_a_bad_step():
  old = {'w': jnp.ones(3), 'count': jnp.int32(4), 'nested': (jnp.zeros(2),)}
  new = jax.tree.map(lambda x: x + 1, old)
  kept = guards.finite_update(guards.is_finite(jnp.float32(np.nan)), new, old)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), kept, old))
  taken = guards.finite_update(guards.is_finite(jnp.float32(1.0), jnp.ones(2)), new, old)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), taken, new))


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  rows = [{'step': s, 'train/loss/total': float(s)} for s in range(1, 7)]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 7, "train/lo')
  writer = writers.Writer(str(tmp_path), resume_step=4)  # killed mid-line after step 6
  writer.scalars(5, {'x': 1.0})
  writer.close()
  steps = [json.loads(l)['step'] for l in path.read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5]
  # Killed during the final evaluation, after the last checkpoint (step 5): it runs again.
  with open(path, 'a') as f:
    f.write(json.dumps({'step': 5, 'eval/synthetic/mAP': 0.5}) + '\n')
  writers.Writer(str(tmp_path), resume_step=5, redo_eval=True).close()
  rows = [json.loads(l) for l in path.read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5] and 'x' in rows[-1]


def test_losses_stay_finite_in_bfloat16_with_identical_and_zero_features():
  config = config_defaults.base_config()
  config.model.dtype = 'bfloat16'
  config.loss.kd_feature = 'both'
  config.fepm.enabled = False  # the fabricated outputs have no agent
  pid = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  key = jax.random.PRNGKey(0)

  def outputs(feat):
    logits = jnp.tile(jnp.arange(8, dtype=jnp.bfloat16), (8, 1))
    branch = {'feat': feat, 'bn_feat': feat, 'logits': logits}
    return {'student': {**branch, 'pattern_logits': logits[:, :5]},
            'teacher': {'feat': jnp.zeros_like(feat), 'bn_feat': jnp.zeros_like(feat),
                        'logits': logits}}

  batch = {'pid': pid, 'pattern': jnp.zeros(8, jnp.int32)}
  cases = {
      'identical': jnp.full((8, 64), 0.3, jnp.bfloat16),
      'zero': jnp.zeros((8, 64), jnp.bfloat16),
      'nearly identical': (0.5 + 1e-3 * jax.random.normal(key, (8, 64))).astype(jnp.bfloat16),
      'large': jnp.full((8, 64), 3e4, jnp.bfloat16),
  }
  total = jax.jit(jax.value_and_grad(
      lambda f: losses.total_loss(outputs(f), batch, config)[0]))
  hinge = jax.jit(jax.grad(lambda f: losses.triplet_loss(f, pid, 0.3)))
  for name, feat in cases.items():
    value, grad = total(feat)
    assert np.isfinite(float(value)), name
    assert np.all(np.isfinite(np.asarray(grad, np.float32))), name
    assert np.all(np.isfinite(np.asarray(hinge(feat), np.float32))), name


